"""Claims that step over no held lease (issue 15), on both backends.

A held instance's ``run_at`` is its take-over time (schema 11): its lease's expiry as of its claim, or as
of the last heartbeat that moved it (when less than half a lease was left); a step commit renews the
lease only. The runnable index holds the free instances; ``geste_instances_leased_by_name`` the held
ones, in take-over order. So a claim reads the free instances due and the leases that ran out, never a
live lease: checked on the plans of the real statements over 10,000 held leases and 100,000 finished
instances (PostgreSQL ``EXPLAIN ANALYZE`` with the custom and the generic plan, SQLite ``EXPLAIN QUERY
PLAN`` and its instruction count); a live lease stays out of every claim while its worker's heartbeat
renews it, and the one whose worker stops is taken over at its expiry, with ``expired_at``; a database
migrated from schema 10 gives its held instances their take-over time. Never a sleep: the clocks are
numbers passed to the storage.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import geste
from geste._status import UNSERVED_CAP
from geste.storage.base import Commit, HistoryRow, Lease, NewEvent, NewInstance, Storage

from .support import (
    database_at_version,
    instance_steps_searching,
    instances_read,
    plan_nodes,
    raw_query,
    sql_literal,
    vm_steps,
)

HELD = 10_000
FINISHED = 100_000
EXPIRED = 5
FREE = 10
LATER = 1_000
"""A seeded table: FINISHED completed instances of ``mine``; HELD instances of ``mine`` under a live lease
of another worker, as a claim leaves them (run_at = lock_expires_at, 15 s ahead), older than every free
one; EXPIRED of ``mine`` whose worker died (lease and take-over time a few seconds past); FREE of ``mine``
due (for ten minutes); LATER of ``mine`` sleeping (run_at an hour ahead)."""

SEED_POSTGRES = """
INSERT INTO geste_instances
    (instance_id, workflow_name, status, input, created_at, updated_at, finished_at, run_at, locked_by,
     lease_id, lock_expires_at)
SELECT 'done-' || g, 'mine', 'completed', '{}', $1 - 9000 + g * 0.01, $1, $1, NULL, NULL, NULL, NULL
FROM generate_series(1, $2::integer) AS g
UNION ALL
SELECT 'held-' || g, 'mine', 'running', '{}', $1 - 120, $1, NULL, $1 + 15 - g * 0.0001, 'alive',
       'lease-' || g, $1 + 15 - g * 0.0001
FROM generate_series(1, $3::integer) AS g
UNION ALL
SELECT 'expired-' || g, 'mine', 'running', '{}', $1 - 120, $1, NULL, $1 - 10 + g, 'dead', 'old-' || g,
       $1 - 10 + g
FROM generate_series(1, $4::integer) AS g
UNION ALL
SELECT 'free-' || g, 'mine', 'pending', '{}', $1 - 60, $1 - 60, NULL,
       CASE WHEN g <= $5 THEN $1 - 600 + g * 0.001 ELSE $1 + 3600 + g END, NULL, NULL, NULL
FROM generate_series(1, $5::integer + $6::integer) AS g
"""

SEED_SQLITE = """
WITH RECURSIVE g(n) AS (
    SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :finished + :held + :expired + :free + :later
)
INSERT INTO geste_instances
    (instance_id, workflow_name, status, input, created_at, updated_at, finished_at, run_at, locked_by,
     lease_id, lock_expires_at)
SELECT CASE WHEN n <= :finished THEN 'done-' || n
            WHEN n <= :finished + :held THEN 'held-' || (n - :finished)
            WHEN n <= :finished + :held + :expired THEN 'expired-' || (n - :finished - :held)
            ELSE 'free-' || (n - :finished - :held - :expired) END,
       'mine',
       CASE WHEN n <= :finished THEN 'completed' WHEN n <= :finished + :held + :expired THEN 'running'
            ELSE 'pending' END,
       '{}', :now - 120, :now, NULL,
       CASE WHEN n <= :finished THEN NULL
            WHEN n <= :finished + :held THEN :now + 15 - (n - :finished) * 0.0001
            WHEN n <= :finished + :held + :expired THEN :now - 10 + (n - :finished - :held)
            WHEN n <= :finished + :held + :expired + :free
                THEN :now - 600 + (n - :finished - :held - :expired) * 0.001
            ELSE :now + 3600 + (n - :finished - :held - :expired) END,
       CASE WHEN n <= :finished THEN NULL WHEN n <= :finished + :held THEN 'alive'
            WHEN n <= :finished + :held + :expired THEN 'dead' END,
       CASE WHEN n <= :finished THEN NULL WHEN n <= :finished + :held + :expired THEN 'lease-' || n END,
       CASE WHEN n <= :finished THEN NULL
            WHEN n <= :finished + :held THEN :now + 15 - (n - :finished) * 0.0001
            WHEN n <= :finished + :held + :expired THEN :now - 10 + (n - :finished - :held) END
FROM g
"""

EXPECTED = [f"expired-{g}" for g in range(1, EXPIRED + 1)] + [f"free-{g}" for g in range(1, FREE + 1)]
"""What a claim of 100 takes on the seeded table: the leases that ran out, then the free instances due."""


async def assert_the_storage_takes_the_due_ones(storage: Storage, now: float) -> None:
    """On a seeded table: the storage's own claim takes the expired leases (with when each ran out) and
    the free instances due, none of the live leases; the counts of ``geste status`` and of the metrics
    count those, and nothing else."""
    assert (await storage.queue_stats(now)).runnable == EXPIRED + FREE
    assert await storage.runnable_workflows(now, cap=UNSERVED_CAP, limit=1000) == [("mine", EXPIRED + FREE)]
    assert await storage.next_run_at() == pytest.approx(now - 600 + 0.001)  # the first free one due
    claims = await storage.claim("w1", now, now + 15.0, 100, due_before=now + 0.025, workflows=["mine"])
    assert sorted(c.lease.instance_id for c in claims) == sorted(EXPECTED)
    for claim in claims:
        if claim.lease.instance_id.startswith("expired-"):
            assert claim.lease_expired_at == claim.run_at and claim.run_at is not None and claim.run_at <= now
        else:
            assert claim.lease_expired_at is None
    assert claims.next_run_at == pytest.approx(now + 3600 + FREE + 1)
    stats = await storage.queue_stats(now)
    assert stats.runnable == 0 and stats.held_leases == HELD + EXPIRED + FREE


async def explain(conn: Any, query: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    """The nodes of ``EXPLAIN ANALYZE`` of the prepared ``query`` run with ``params`` (as the storage
    passes them), in a transaction rolled back (a claim's UPDATE runs)."""
    arguments = ", ".join(sql_literal(value) for value in params)
    call = f"EXECUTE plan_under_test({arguments})" if params else "EXECUTE plan_under_test"
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(f"PREPARE plan_under_test AS {query}")
        found = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {call}")
    finally:
        await transaction.rollback()
        await conn.execute("DEALLOCATE plan_under_test")  # not ALL: asyncpg's own statements stay
    return plan_nodes(json.loads(found)[0]["Plan"])


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_claim_reads_no_live_lease_on_postgres(pg_url: str, plan_cache_mode: str) -> None:
    """EXPLAIN ANALYZE of the real statements, with the parameters the storage passes, over 10,000 live
    leases of the same workflow (older than every free instance: before, each claim read all of them
    first) and 100,000 finished instances: ``claim`` and ``claim_names`` read the two partial indexes and
    about as many rows as they take (15) plus the next run; ``runnable_workflows`` and ``count_runnable``
    (``geste status``, the metrics) as many as are runnable; ``next_run_at`` one per name. Never a
    sequential scan, with the custom plan and the generic one asyncpg switches to after five runs."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    dsn, options = parse_postgres_url(pg_url)
    queries = schema_queries(options["schema"])
    now = time.time()
    async with geste.App(pg_url, run_worker=False) as app:  # migrated
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            await conn.execute(SEED_POSTGRES, now, FINISHED, HELD, EXPIRED, FREE, LATER)
            await conn.execute("VACUUM ANALYZE geste_instances")
            await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            claim = ("w1", "0123456789ab/", now, now + 15.0, 100, now + 0.025)
            cases: dict[str, tuple[tuple[Any, ...], int]] = {
                # parameters, most rows of geste_instances read
                "claim": ((*claim, "mine", None), 3 * len(EXPECTED)),
                "claim_names": ((*claim, ["mine", "mine2"], None), 3 * len(EXPECTED)),
                "runnable_workflows": ((now, UNSERVED_CAP, 1000), 3 * len(EXPECTED)),
                "count_runnable": ((now,), 3 * len(EXPECTED)),
                "next_run_at": ((), 10),
            }
            for name, (params, most) in cases.items():
                nodes = await explain(conn, queries[name], params)
                on_table = [node for node in nodes if node.get("Relation Name") == "geste_instances"]
                shown = (name, [(n["Node Type"], n.get("Index Name"), instances_read([n])) for n in on_table])
                assert on_table and not any(node["Node Type"] == "Seq Scan" for node in on_table), shown
                used = {n.get("Index Name") for n in on_table}
                assert "geste_instances_runnable_by_name" in used, shown
                if name != "next_run_at":  # the leases that ran out come from their own index
                    assert "geste_instances_leased_by_name" in used, shown
                assert instances_read(nodes) <= most, shown
        finally:
            await conn.close()
        await assert_the_storage_takes_the_due_ones(app.storage, now)


async def test_a_claim_reads_no_live_lease_on_sqlite(tmp_path: Path) -> None:
    """The same seeded table on SQLite: ``claim_pick``, ``next_run_after``, ``runnable_workflows``,
    ``count_runnable`` and ``next_run_at`` search the two partial indexes and never scan the table, and
    run a small fraction of the instructions of one pass over it (before, ``claim_pick`` read the 10,000
    live leases); the storage's claim takes the expired leases and the free instances due."""
    from geste.storage.sqlite import Q

    url = f"sqlite:///{tmp_path / 'seeded.db'}"
    now = time.time()
    async with geste.App(url, run_worker=False) as app:
        with contextlib.closing(sqlite3.connect(tmp_path / "seeded.db")) as conn:
            seed = {"finished": FINISHED, "held": HELD, "expired": EXPIRED, "free": FREE, "later": LATER}
            with conn:
                conn.execute(SEED_SQLITE, {**seed, "now": now})
            conn.execute("ANALYZE")
            params = {"name": "mine", "due": now + 0.025, "now": now, "limit": 100, "cap": UNSERVED_CAP}
            one_pass = vm_steps(conn, "SELECT count(*) FROM geste_instances WHERE input <> ''", {})
            for name in (
                "claim_pick",
                "next_run_after",
                "runnable_workflows",
                "count_runnable",
                "next_run_at",
            ):
                instance_steps_searching(conn, Q[name], params)
                steps = vm_steps(conn, Q[name], params)
                assert steps <= one_pass // 200, (name, steps, one_pass)
        await assert_the_storage_takes_the_due_ones(app.storage, now)


# -- a live lease stays out of the claims; a dead one is taken over at its expiry --------------------------
async def test_a_heartbeat_keeps_a_lease_out_of_every_claim_and_a_dead_worker_is_taken_over_on_time(
    make_app: Any,
) -> None:
    """A run that lasts ten leases: its worker's heartbeat (``renew`` with ``now``, every third of a lease)
    keeps its take-over time ahead, moving it at most every other beat, and step commits (``record``)
    leave it alone; a claim at every moment in between takes nothing. The worker then stops renewing:
    the first claim after the lease's end takes it over (``expired_at``: the lease's end), none before."""
    lease_time = 15.0
    app = make_app(run_worker=False)
    async with app:
        storage = app.storage
        t0 = 1_000.0
        await storage.create_instance(
            NewInstance("long", "wf", "{}", t0), lease=None, worker_id=None, lock_expires_at=None
        )
        (first,) = await storage.claim("A", t0, t0 + lease_time, 10, workflows=["wf"])
        assert first.run_at == t0
        takeover = [(await storage.get_instance("long")).run_at]  # type: ignore[union-attr]
        assert takeover == [t0 + lease_time]
        now, moved = t0, 0
        for beat in range(30):  # ten leases
            now = t0 + (beat + 1) * lease_time / 3
            row = HistoryRow(beat + 1, "activity", "step", '{"result":null}', False, now)
            await storage.record(Commit(first.lease, [row], now, now + lease_time))
            assert (await storage.get_instance("long")).run_at == takeover[-1]  # type: ignore[union-attr]
            assert await storage.renew([first.lease], now + lease_time, now=now) == {"long"}
            run_at = (await storage.get_instance("long")).run_at  # type: ignore[union-attr]
            assert run_at is not None and run_at >= now + lease_time / 2, (beat, run_at - now)
            if run_at != takeover[-1]:
                moved += 1
                takeover.append(run_at)
            for at in (now, now + lease_time / 6):  # before the next beat, with its lookahead
                found = await storage.claim(
                    "B", at, at + lease_time, 10, due_before=at + 0.025, workflows=["wf"]
                )
                assert found == []
            assert (await storage.queue_stats(now)).runnable == 0
        assert 10 <= moved <= 16, moved  # every other beat (30 beats), not at each
        expiry = now + lease_time  # the worker stops: its last renewal
        assert await storage.claim("B", expiry - 0.001, expiry + lease_time, 10, workflows=["wf"]) == []
        assert (await storage.queue_stats(expiry)).runnable == 1
        (second,) = await storage.claim("B", expiry, expiry + lease_time, 10, workflows=["wf"])
        assert second.lease_expired_at == expiry and second.run_at == takeover[-1]
        assert (await storage.get_instance("long")).run_at == expiry + lease_time  # type: ignore[union-attr]


async def test_a_local_start_a_wake_and_a_cancel_leave_a_held_instances_take_over_time(
    make_app: Any, db_url: str
) -> None:
    """An instance created already claimed (a local start) gets its lease's expiry as its take-over
    time, as a claim gives it; an event for it, or a cancel, while it runs leave that time alone (its
    holder takes the event itself, or learns of the cancel at its next step), so that it never comes
    back into the claims' range while its lease lives."""
    app = make_app(run_worker=False)
    async with app:
        storage = app.storage
        now = time.time()
        row, created = await storage.create_instance(
            NewInstance("local", "wf", "{}", now),
            lease=Lease("", "l1"),
            worker_id="A",
            lock_expires_at=now + 60,
        )
        assert created and row.run_at == now + 60 and row.locked_by == "A"
        await raw_query(  # it waited for ping before this run (a timeout woke it): the wait is there
            db_url,
            "INSERT INTO geste_event_waits (instance_id, event_type, match, since, outcome_seq, after_seq)"
            " VALUES ('local', 'ping', NULL, $1, 2, 0)",
            now,
        )
        assert await storage.send_event(NewEvent("e1", "ping", "{}", "test", None, None, now)) == (True, [])
        await storage.request_cancel("local", now)
        (found,) = await raw_query(
            db_url, "SELECT run_at, cancel_requested FROM geste_instances WHERE instance_id = $1", "local"
        )
        assert found["run_at"] == now + 60 and found["cancel_requested"]
        assert await storage.claim("B", now, now + 60, 10, workflows=["wf"]) == []


# -- a database of schema 10 ----------------------------------------------------------------------------
async def test_the_migration_gives_held_instances_their_take_over_time(db_url: str) -> None:
    """Schema 10 left a held instance with the run_at of its claim, in the past. Migrated, its run_at is
    its lease's expiry: no claim reads it while its lease lives, and the first one after takes it over."""
    now = time.time()
    insert = (
        "INSERT INTO {t}geste_instances (instance_id, workflow_name, status, input, created_at, updated_at,"
        " run_at, locked_by, lease_id, lock_expires_at) VALUES"
        f" ('held', 'wf', 'running', '{{{{}}}}', {now - 60}, {now - 60}, {now - 60}, 'A', 'l1', {now + 30}),"
        f" ('free', 'wf', 'pending', '{{{{}}}}', {now - 30}, {now - 30}, {now - 30}, NULL, NULL, NULL)"
    )
    await database_at_version(db_url, 10, [insert])
    async with geste.App(db_url, run_worker=False) as app:
        (held,) = await raw_query(db_url, "SELECT run_at FROM geste_instances WHERE instance_id = 'held'")
        assert held["run_at"] == now + 30
        claims = await app.storage.claim("B", now, now + 60, 10, workflows=["wf"])
        assert [c.lease.instance_id for c in claims] == ["free"]
        (taken,) = await app.storage.claim("B", now + 30, now + 90, 10, workflows=["wf"])
        assert taken.lease.instance_id == "held" and taken.lease_expired_at == now + 30


BACKLOG = 100_000


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_claim_in_a_backlog_of_its_own_workflow_reads_what_it_takes(
    pg_url: str, plan_cache_mode: str
) -> None:
    """100,000 instances of ``mine`` due and 5 leases of ``mine`` run out, under statistics taken before
    (when 10,000 others were due, since claimed): a claim of 100 takes the 5 take-overs (a backlog never
    starves them) and 95 of the backlog in run_at order, reading at most 100 rows of each index: index
    scans that stop at their limit, a constant to the planner (with a limit it cannot read, it guesses a
    tenth of the range, and on a million finished instances it chose a bitmap scan of the whole range
    and a sort, 10 ms a claim)."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    dsn, options = parse_postgres_url(pg_url)
    queries = schema_queries(options["schema"])
    now = time.time()
    async with geste.App(pg_url, run_worker=False) as app:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            # the statistics of a moment when 10,000 instances of `mine` were due among 100,000 finished
            await conn.execute(SEED_POSTGRES, now, FINISHED, 0, 0, HELD, 0)
            await conn.execute("VACUUM ANALYZE geste_instances")
            # then claimed (their run_at their take-over time), and a backlog came: no ANALYZE since
            await conn.execute(
                "UPDATE geste_instances SET status = 'running', locked_by = 'alive', lease_id = instance_id,"
                " lock_expires_at = $1 + 15, run_at = $1 + 15 WHERE instance_id LIKE 'free-%'",
                now,
            )
            await conn.execute(
                "UPDATE geste_instances SET instance_id = 'held-' || substr(instance_id, 6)"
                " WHERE instance_id LIKE 'free-%'"
            )
            await conn.execute(SEED_POSTGRES, now, 0, 0, EXPIRED, BACKLOG, 0)
            await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            for name, names in (("claim", "mine"), ("claim_names", ["mine", "mine2"])):
                params = ("w1", "0123456789ab/", now, now + 15.0, 100, now + 0.025, names, None)
                nodes = await explain(conn, queries[name], params)
                on_table = [node for node in nodes if node.get("Relation Name") == "geste_instances"]
                shown = (name, [(n["Node Type"], n.get("Index Name"), instances_read([n])) for n in on_table])
                assert {n["Node Type"] for n in on_table} <= {
                    "Index Scan",
                    "Index Only Scan",
                    "ModifyTable",
                }, shown
                assert instances_read(nodes) <= 350, shown  # 100 + 100 per range at most, the 100 taken
        finally:
            await conn.close()
        claims = await app.storage.claim("w1", now, now + 15.0, 100, workflows=["mine"])
        taken = {c.lease.instance_id for c in claims}
        assert taken == {f"expired-{g}" for g in range(1, EXPIRED + 1)} | {f"free-{g}" for g in range(1, 96)}
