"""What a batch of the retention of finished instances reads (issue 21): rows in proportion to its batch,
never a whole table.

On PostgreSQL, 1,000,000 finished instances that ended an hour ago (within the day's retention), seeded
by SQL, and 10,000 that ended two days ago, each with 3 history rows and a delivered outbox event; the
first 1,000 of those are children of a running parent (kept). ``EXPLAIN ANALYZE`` of the real statement
with the storage's parameters, the custom and the generic plan: with nothing due (a retention of three
days) it reads a handful of rows; a batch from the start reads the 1,000 kept children and their parent
by key; a batch after them deletes 1,000 instances and reads about as many rows of each table as it
deletes. On SQLite, the same seed: no ``SCAN`` of a seeded table in ``EXPLAIN QUERY PLAN``, and each
statement of a batch under a twentieth of the instructions of one pass over the instances.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import geste

from .support import instances_read, vm_steps
from .test_chore_costs import rows_read
from .test_held_leases import explain

DAY = 86400.0
BATCH = 1000
RECENT = 1_000_000
OLD = 10_000
KEPT = 1000

SEED_POSTGRES = [
    """INSERT INTO geste_instances
           (instance_id, workflow_name, status, input, created_at, updated_at, finished_at)
       SELECT 'recent-' || g, 'w', 'completed', '{}', $1 - 7200, $1 - 3600, $1 - 3600 + g * 0.000001
       FROM generate_series(1, $2) g""",
    """INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, run_at)
       SELECT 'parent', 'w', 'running', '{}', $1 - 3 * 86400, $1, NULL WHERE $2::integer > 0""",
    """INSERT INTO geste_instances
           (instance_id, workflow_name, status, input, created_at, updated_at, finished_at, parent_id)
       SELECT 'old-' || lpad(g::text, 6, '0'), 'w', 'completed', '{}', $1 - 3 * 86400, $1 - 2 * 86400,
              $1 - 2 * 86400 + g * 0.001, CASE WHEN g <= $2 / 10 THEN 'parent' END
       FROM generate_series(1, $2) g""",
    """INSERT INTO geste_history (instance_id, seq, kind, name, created_at)
       SELECT 'old-' || lpad(g::text, 6, '0'), s, 'activity', 'a', $1 - 2 * 86400
       FROM generate_series(1, $2) g, generate_series(1, 3) s""",
    """INSERT INTO geste_outbox
           (event_id, instance_id, step_seq, event_type, source, status, created_at, updated_at, delivered_at)
       SELECT 'ev-' || g, 'old-' || lpad(g::text, 6, '0'), 1, 't', 's', 'delivered',
              $1 - 2 * 86400, $1 - 2 * 86400, $1 - 2 * 86400
       FROM generate_series(1, $2) g""",
]


async def test_a_retention_batch_reads_rows_in_proportion_to_it_on_postgres(pg_url: str) -> None:
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    dsn, options = parse_postgres_url(pg_url)
    query = schema_queries(options["schema"])["prune_instances"]
    now = time.time()
    async with geste.App(pg_url, run_worker=False) as app:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            await conn.execute(SEED_POSTGRES[0], now, RECENT)
            for seed in SEED_POSTGRES[1:]:
                await conn.execute(seed, now, OLD)
            await conn.execute("VACUUM ANALYZE")
            assert await conn.fetchval("SELECT count(*) FROM geste_instances") == RECENT + OLD + 1
            start = (-math.inf, "")
            after_kept = (now - 2 * DAY + KEPT * 0.001, f"old-{KEPT:06}")
            # (parameters, as the storage passes them, apply as text: most rows read of any table, instances
            # deleted)
            cases = {
                "nothing due": ((now - 3 * DAY, *start, BATCH, "true"), 5, 0),
                "kept children": ((now - DAY, *start, BATCH, "true"), 3 * BATCH + 5, 0),
                "due": ((now - DAY, *after_kept, BATCH, "true"), 3 * BATCH + 5, BATCH),
                "dry run": ((now - DAY, *after_kept, BATCH, "false"), 3 * BATCH + 5, 0),
            }
            for mode in ("force_custom_plan", "force_generic_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                for case, (params, most, deleted) in cases.items():
                    nodes = await explain(conn, query, params)
                    read = rows_read(nodes)
                    shown = (mode, case, read, [(n["Node Type"], n.get("Index Name")) for n in nodes])
                    seq_scans = {n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"}
                    # only of tables the seed left empty (the planner may read an empty table whole)
                    assert not seq_scans & {"geste_instances", "geste_history", "geste_outbox"}, shown
                    assert all(n <= most for n in read.values()), shown
                    assert instances_read(nodes) <= most, shown
                    gone = [n for n in nodes if n.get("Relation Name") == "geste_instances"]
                    modify = [n for n in gone if n["Node Type"] == "ModifyTable"]
                    assert modify and modify[0]["Actual Rows"] == deleted, shown
        finally:
            await conn.close()
        # the storage's own batches: the kept children stepped over, then 1,000 deleted with their rows
        first = await app.storage.prune_instances(now - DAY, limit=BATCH)
        assert (first.examined, first.instances) == (BATCH, 0) and first.full
        second = await app.storage.prune_instances(now - DAY, limit=BATCH, position=first.position)
        assert (second.instances, second.deleted) == (BATCH, BATCH * 5)  # the instance, 3 history, 1 event


SEED_SQLITE = [
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :recent)
       INSERT INTO geste_instances
           (instance_id, workflow_name, status, input, created_at, updated_at, finished_at)
       SELECT 'recent-' || n, 'w', 'completed', '{}', :now - 7200, :now - 3600, :now - 3600 + n * 0.000001
       FROM g""",
    """INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at)
       VALUES ('parent', 'w', 'running', '{}', :now - 3 * 86400, :now)""",
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :old)
       INSERT INTO geste_instances
           (instance_id, workflow_name, status, input, created_at, updated_at, finished_at, parent_id)
       SELECT printf('old-%06d', n), 'w', 'completed', '{}', :now - 3 * 86400, :now - 2 * 86400,
              :now - 2 * 86400 + n * 0.001, CASE WHEN n <= :old / 10 THEN 'parent' END
       FROM g""",
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :old)
       INSERT INTO geste_history (instance_id, seq, kind, name, created_at)
       SELECT printf('old-%06d', n), s.value, 'activity', 'a', :now FROM g, json_each('[1, 2, 3]') s""",
    """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :old)
       INSERT INTO geste_outbox
           (event_id, instance_id, step_seq, event_type, source, status, created_at, updated_at)
       SELECT 'ev-' || n, printf('old-%06d', n), 1, 't', 's', 'delivered', :now, :now FROM g""",
]
SEEDED = ("geste_instances", "geste_history", "geste_outbox")


async def test_a_retention_batch_reads_rows_in_proportion_to_it_on_sqlite(tmp_path: Path) -> None:
    from geste.storage.sqlite import PRUNE_DELETES, Q

    path = tmp_path / "seeded.db"
    now = time.time()
    async with geste.App(f"sqlite:///{path}", run_worker=False) as app:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            with conn:
                for seed in SEED_SQLITE:
                    conn.execute(seed, {"now": now, "recent": RECENT, "old": OLD})
            conn.execute("ANALYZE")
            one_pass = vm_steps(conn, "SELECT count(*) FROM geste_instances WHERE input <> ''", {})
            ids = '["' + '", "'.join(f"old-{n:06}" for n in range(KEPT + 1, KEPT + BATCH + 1)) + '"]'
            after_kept = now - 2 * DAY + KEPT * 0.001
            cases: dict[str, tuple[str, dict[str, Any]]] = {
                "nothing due": (
                    "prune_instances_examine",
                    {"before": now - 3 * DAY, "at": -math.inf, "id": "", "limit": BATCH},
                ),
                "kept children": (
                    "prune_instances_examine",
                    {"before": now - DAY, "at": -math.inf, "id": "", "limit": BATCH},
                ),
                "due": (
                    "prune_instances_examine",
                    {"before": now - DAY, "at": after_kept, "id": f"old-{KEPT:06}", "limit": BATCH},
                ),
                **{name: (name, {"ids": ids}) for name in ("prune_delete_instances", *PRUNE_DELETES)},
            }
            for case, (name, params) in cases.items():
                plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + Q[name], params)]
                scans = [step for step in plan if step.startswith("SCAN") and step.split()[1] in SEEDED]
                assert not scans, (case, plan)
                with conn:  # the writes run, then are rolled back
                    conn.execute("SAVEPOINT measured")
                    steps = vm_steps(conn, Q[name], params)
                    conn.execute("ROLLBACK TO measured")
                    conn.execute("RELEASE measured")
                assert steps <= one_pass // 20, (case, steps, one_pass)
        first = await app.storage.prune_instances(now - DAY, limit=BATCH)
        assert (first.examined, first.instances) == (BATCH, 0) and first.full
        second = await app.storage.prune_instances(now - DAY, limit=BATCH, position=first.position)
        assert (second.instances, second.deleted) == (BATCH, BATCH * 5)
