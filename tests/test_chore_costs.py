"""What each chore statement reads (issue 15): the rows due, or a bounded batch, never a whole table.

Tables of 100,000 rows each, seeded by SQL: 100,000 instances waiting in ``receive`` as competing
subscribers of one channel (their cursors spread over its messages), 100,000 messages of that channel
(taken, an hour old), 100,000 events (an hour old) and their deliveries. With nothing due (every
message taken, nothing past the two hours' retention), the re-wake and the retention of messages and
events read a handful of rows; with some due (a message nobody took, 1,000 old messages nobody needs,
500 old events), about as many as they wake or delete; the walk of the subscriptions reads its batch
(1,000) and no more. On PostgreSQL: ``EXPLAIN ANALYZE`` of the real statements with the storage's
parameters, the custom and the generic plan; on SQLite: no ``SCAN`` of a seeded table in ``EXPLAIN
QUERY PLAN``, and a small fraction of the instructions of one pass over a table.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import geste

from .support import vm_steps
from .test_held_leases import explain

ROWS = 100_000
BATCH = 1000
RETENTION = 7200.0

SEED_POSTGRES = [
    """INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, run_at)
       SELECT 'sub-' || g, 'w', 'waiting', '{}', $1 - 7200, $1 - 7200, NULL FROM generate_series(1, $2) g""",
    """INSERT INTO geste_channel_subscriptions
           (channel, instance_id, mode, cursor_seq, waiting_since, created_at)
       SELECT 'jobs', 'sub-' || g, 'competing', g, $1 - 3600, $1 - 7200 FROM generate_series(1, $2) g""",
    """INSERT INTO geste_channel_messages (message_id, channel, data, created_at, claimed_by)
       SELECT 'm-' || g, 'jobs', '1', $1 - 3600 + g * 0.001, 'sub-1' FROM generate_series(1, $2) g""",
    """INSERT INTO geste_events (event_id, event_type, data, created_at)
       SELECT 'e-' || g, 't', '{}', $1 - 3600 FROM generate_series(1, $2) g""",
    """INSERT INTO geste_event_deliveries (instance_id, event_seq)
       SELECT 'sub-' || g, g FROM generate_series(1, $2) g WHERE $1::float8 > 0""",
    """INSERT INTO geste_event_keys (match_key, event_seq)
       SELECT g * 7919, g FROM generate_series(1, $2) g WHERE $1::float8 > 0""",
]
DUE_POSTGRES = [  # a message nobody took, 1,000 old messages nobody needs, 500 old events
    """INSERT INTO geste_channel_messages (message_id, channel, data, created_at)
       SELECT 'left', 'jobs', '1', $1 - 600 WHERE $2::integer > 0""",
    """INSERT INTO geste_channel_messages (message_id, channel, data, created_at)
       SELECT 'old-' || g, 'gone', '1', $1 - 10000 + g * 0.001 FROM generate_series(1, $2 / 100) g""",
    """INSERT INTO geste_events (event_id, event_type, data, created_at)
       SELECT 'old-' || g, 't', '{}', $1 - 10000 FROM generate_series(1, $2 / 200) g""",
]


def statements(now: float) -> dict[str, tuple[str, tuple[Any, ...]]]:
    """Each chore statement with the parameters the storage passes (a first cleanup round: from the
    start of each walk)."""
    return {
        "channel_rewake": ("channel_rewake", (now, now - 5.0, 100)),
        "cleanup_subscriptions": ("channel_cleanup_subscriptions", ("", "", BATCH)),
        "cleanup_messages": ("channel_cleanup_messages", (now - RETENTION, -math.inf, 0, BATCH)),
        "cleanup_events": ("channel_cleanup_events", (now - RETENTION, BATCH)),
        "chore_take": ("chore_take", ("channel_rewake", "w1", now, 5.0, 5.0)),
    }


def rows_read(nodes: list[dict[str, Any]]) -> dict[str, int]:
    """Rows each table's scans took, kept or filtered out, over all their loops."""
    read: dict[str, int] = {}
    for node in nodes:
        relation = node.get("Relation Name")
        if relation and node["Node Type"] != "ModifyTable":
            removed = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
            read[relation] = read.get(relation, 0) + round(
                (node["Actual Rows"] + removed) * node["Actual Loops"]
            )
    return read


NOTHING_DUE = {  # most rows read per table, nothing due
    "channel_rewake": 10,
    "cleanup_subscriptions": BATCH + 1,  # the batch, whatever is due: the walk goes on next round
    "cleanup_messages": 5,
    "cleanup_events": 5,
    "chore_take": 2,
}
SOME_DUE = {  # most rows read per table, with rows due: about as many as it wakes or deletes (a row
    # deleted is read twice: when it is judged, then by its key as it is deleted)
    "channel_rewake": 3 * 100 + 10,
    "cleanup_subscriptions": BATCH + 1,
    "cleanup_messages": 2 * BATCH + 5,
    "cleanup_events": 2 * (ROWS // 200) + 5,  # (at most; fewer on a smaller seed)
    "chore_take": 2,
}


@pytest.mark.parametrize("rows", [10_000, ROWS])  # at 10,000 the re-wake's join once hashed every row
@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_each_chore_statement_reads_what_is_due_on_postgres(
    pg_url: str, plan_cache_mode: str, rows: int
) -> None:
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    dsn, options = parse_postgres_url(pg_url)
    queries = schema_queries(options["schema"])
    now = time.time()
    async with geste.App(pg_url, run_worker=False) as app:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            for seed in SEED_POSTGRES:
                await conn.execute(seed, now, rows)
            await conn.execute(FINISHED_POSTGRES, now, ROWS)  # the instances table much larger
            await conn.execute("VACUUM ANALYZE")
            await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            for due, most in ((False, NOTHING_DUE), (True, SOME_DUE)):
                if due:
                    for seed in DUE_POSTGRES:
                        await conn.execute(seed, now, rows)
                    await conn.execute("ANALYZE")
                for case, (name, params) in statements(now).items():
                    nodes = await explain(conn, queries[name], params)
                    read = rows_read(nodes)
                    shown = (
                        case,
                        due,
                        [(n["Node Type"], n.get("Index Name"), n.get("Relation Name")) for n in nodes],
                    )
                    scans = [n for n in nodes if n["Node Type"] == "Seq Scan"]
                    assert all(n["Relation Name"] == "geste_chores" for n in scans), shown  # a row per chore
                    assert all(n <= most[case] for n in read.values()), (read, shown)
                    if name == "channel_rewake" and due:  # it woke 100, from the message nobody took
                        assert nodes[0]["Actual Rows"] == 100, shown
        finally:
            await conn.close()
        # the storage's own round, with nothing of the seeded tables but what is due deleted
        done = await app.storage.channel_cleanup(
            messages_before=now - RETENTION, events_before=now - RETENTION, limit=BATCH
        )
        assert done.deleted == rows // 100 + rows // 200 and done.full  # the subscriptions' batch was full
        woken = await app.storage.channel_rewake(now, published_before=now - 5.0, limit=100)
        assert len(woken) == 100


FINISHED_POSTGRES = """
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, finished_at)
SELECT 'done-' || g, 'w', 'completed', '{}', $1 - 9000, $1 - 9000, $1 - 9000 FROM generate_series(1, $2) AS g
"""
"""Finished instances: with 10,000 subscribers among 110,000 instances, the re-wake's join of the
waiting subscriptions with their instances was a hash join of both (0.2 s; scale.py found it)."""

SEED_SQLITE = [
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows)
       INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, run_at)
       SELECT 'sub-' || n, 'w', 'waiting', '{}', :now - 7200, :now - 7200, NULL FROM g""",
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows)
       INSERT INTO geste_channel_subscriptions
           (channel, instance_id, mode, cursor_seq, waiting_since, created_at)
       SELECT 'jobs', 'sub-' || n, 'competing', n, :now - 3600, :now - 7200 FROM g""",
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows)
       INSERT INTO geste_channel_messages (message_id, channel, data, created_at, claimed_by)
       SELECT 'm-' || n, 'jobs', '1', :now - 3600 + n * 0.001, 'sub-1' FROM g""",
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows)
       INSERT INTO geste_events (event_id, event_type, data, created_at)
       SELECT 'e-' || n, 't', '{}', :now - 3600 FROM g""",
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows)
       INSERT INTO geste_event_deliveries (instance_id, event_seq) SELECT 'sub-' || n, n FROM g""",
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows)
       INSERT INTO geste_event_keys (match_key, event_seq) SELECT n * 7919, n FROM g""",
]
DUE_SQLITE = [  # as DUE_POSTGRES
    """INSERT INTO geste_channel_messages (message_id, channel, data, created_at)
       VALUES ('left', 'jobs', '1', :now - 600)""",
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows / 100)
       INSERT INTO geste_channel_messages (message_id, channel, data, created_at)
       SELECT 'old-' || n, 'gone', '1', :now - 10000 + n * 0.001 FROM g""",
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows / 200)
       INSERT INTO geste_events (event_id, event_type, data, created_at)
       SELECT 'old-' || n, 't', '{}', :now - 10000 FROM g""",
]
SEEDED = (
    "geste_instances",
    "geste_channel_subscriptions",
    "geste_channel_messages",
    "geste_events",
    "geste_event_deliveries",
    "geste_event_keys",
)


async def test_each_chore_statement_reads_what_is_due_on_sqlite(tmp_path: Path) -> None:
    from geste.storage.sqlite import Q

    path = tmp_path / "seeded.db"
    now = time.time()
    async with geste.App(f"sqlite:///{path}", run_worker=False) as app:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            with conn:
                for seed in [*SEED_SQLITE, *DUE_SQLITE]:
                    conn.execute(seed, {"rows": ROWS, "now": now})
            conn.execute("ANALYZE")
            one_pass = vm_steps(conn, "SELECT count(*) FROM geste_channel_messages WHERE data <> ''", {})
            cases = {
                "channel_leftovers": {"published_before": now - 5.0},
                "channel_rewake": {"now": now, "channel": "jobs", "seq": ROWS + 1, "limit": 100},
                "channel_cleanup_subscriptions": {"channel": "", "instance_id": "", "limit": BATCH},
                "channel_cleanup_messages": {
                    "before": now - RETENTION,
                    "at": -math.inf,
                    "seq": 0,
                    "limit": BATCH,
                },
                "channel_cleanup_event_deliveries": {"before": now - RETENTION, "limit": BATCH},
                "channel_cleanup_events": {"before": now - RETENTION, "limit": BATCH},
                "chore_take": {"chore": "c", "worker": "w1", "now": now, "interval": 5.0, "grace": 5.0},
            }
            for name, params in cases.items():
                plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + Q[name], params)]
                scans = [step for step in plan if step.startswith("SCAN") and step.split()[1] in SEEDED]
                assert not scans, (name, plan)
                with conn:  # the writes run, then are rolled back
                    conn.execute("SAVEPOINT measured")
                    steps = vm_steps(conn, Q[name], params)
                    conn.execute("ROLLBACK TO measured")
                    conn.execute("RELEASE measured")
                # the subscriptions' batch and the 1,000 old messages: a fifth of a pass; the others less
                assert steps <= one_pass // 5, (name, steps, one_pass)
        done = await app.storage.channel_cleanup(
            messages_before=now - RETENTION, events_before=now - RETENTION, limit=BATCH
        )
        assert done.deleted == ROWS // 100 + ROWS // 200 and done.full
        assert len(await app.storage.channel_rewake(now, published_before=now - 5.0, limit=100)) == 100
