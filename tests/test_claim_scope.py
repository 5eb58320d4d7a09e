"""A worker claims only what it can run (issue 13, item 3), on both backends.

Two services on one database never take each other's instances (before, a worker claimed any runnable
instance and put back the ones it does not register for 30 s); a worker that registers nothing claims
nothing; a workflow registered on an open App is claimed from then on; ``app.status()`` and
``geste status`` name the workflows with runnable instances that no live worker registers. The claim
reads, per registered name, the head of ``geste_instances_runnable_by_name`` however many instances of
other workflows are due: checked on the plans (PostgreSQL custom and generic, SQLite) over a seeded table.
Two worker processes racing on a backlog of two workflows run every instance exactly once.

Every wait is for a condition (claim rounds counted, a row, a result) with a deadline: never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import geste
from geste._status import UNSERVED_CAP
from geste.runtime.worker import Worker
from geste.storage.base import WorkerRow

from .processes import Cluster
from .support import (
    instance_steps_searching,
    instances_read,
    plan_nodes,
    raw_query,
    run_cli,
    sql_literal,
    vm_steps,
    wait_until,
)

MakeApp = Callable[..., geste.App]


def register(app: geste.App, *names: str) -> None:
    """Workflows ``names``, each returning ``"<name>:<x>"``."""
    for name in names:

        async def run(ctx: geste.WorkflowContext, x: int, name: str = name) -> str:
            return f"{name}:{x}"

        app.workflow(name=name)(run)


def worker_of(app: geste.App) -> Worker:
    worker = app._worker
    assert worker is not None, "the App runs no worker"
    return worker


async def row(url: str, instance_id: str) -> dict[str, Any]:
    (found,) = await raw_query(
        url,
        "SELECT status, locked_by, lease_id, lock_expires_at, run_at FROM geste_instances "
        "WHERE instance_id = $1",
        instance_id,
    )
    return found


async def rounds_after(app: geste.App, rounds: int, count: Callable[[], int] | None = None) -> None:
    """Wait until the App's worker has run ``rounds`` more claim rounds than now (poked, so that a
    worker sleeping out its poll interval, or the LISTEN/NOTIFY fallback, runs them at once)."""
    worker = worker_of(app)
    counted = count or (lambda: worker.claim_rounds)
    target = counted() + rounds

    def done() -> bool:
        worker.poke()
        return counted() >= target

    await wait_until(done, f"{rounds} claim rounds of {worker.worker_id}")


async def assert_untouched(url: str, instance_id: str, before: dict[str, Any]) -> None:
    """Still pending, never leased, runnable at the time it was created: nobody claimed it (a claim of
    an instance the worker cannot run put it back 30 s later, in 'running')."""
    now = await row(url, instance_id)
    assert now == before, (before, now)
    assert now["status"] == "pending" and now["locked_by"] is None and now["lease_id"] is None, now


async def status_json(url: str) -> dict[str, Any]:
    result = await asyncio.to_thread(run_cli, ["status", "--database-url", url, "--json"])
    assert result.exit_code == 0, result.output
    found: dict[str, Any] = json.loads(result.stdout)
    return found


async def status_text(url: str) -> str:
    result = await asyncio.to_thread(run_cli, ["status", "--database-url", url])
    assert result.exit_code == 0, result.output
    text: str = result.stdout
    return text


UNSERVED_LINE = "runnable, but no live worker registers the workflow:"


# -- two services, one database --------------------------------------------------------------------------
async def test_two_services_on_one_database_never_take_each_others_instances(
    make_app: MakeApp, db_url: str
) -> None:
    """Service A registers ``a``, service B ``b``; a client starts both. Before, A's next claim took b's
    instance, could not run it and put it back 30 s later, again at each unlucky claim. Now A runs claim
    rounds after b's instance exists and it stays pending, unleased, runnable when it was; B runs it as
    soon as it opens. ``status()``, ``geste status`` and its JSON say b is unserved while only A lives."""
    client = make_app(run_worker=False)
    register(client, "a", "b")
    service_a = make_app(worker_id="service-a")
    register(service_a, "a")
    service_b = make_app(worker_id="service-b")
    register(service_b, "b")
    async with client, service_a:
        handle_b = await client.start_workflow("b", 2)
        before = await row(db_url, handle_b.instance_id)
        handle_a = await client.start_workflow("a", 1)
        assert await handle_a.result(timeout=10) == "a:1"  # A claims and runs what it registers

        # A's claim rounds run, started well after b's instance committed: none of them takes it
        await rounds_after(service_a, 5)
        await assert_untouched(db_url, handle_b.instance_id, before)

        # while only A is alive, b's instance is runnable and served by no live worker
        found = await client.status()
        assert found.unserved == {"b": 1}
        assert [(w.worker_id, w.workflows) for w in found.workers if w.alive] == [("service-a", ("a",))]
        assert (await status_json(db_url))["unserved"] == {"b": 1}
        assert f"  {UNSERVED_LINE} b 1" in (await status_text(db_url)).splitlines()

        async with service_b:  # B comes: b's instance runs at once, not after a 30 s put-back
            assert await handle_b.result(timeout=10) == "b:2"
            assert (await client.status()).unserved == {}
            assert (await status_json(db_url))["unserved"] == {}


async def test_unserved_counts_what_no_live_worker_registers(make_app: MakeApp, db_url: str) -> None:
    """A live worker registering ``b`` serves it even while it has not claimed its instances yet; a stale
    one does not; a live worker of a geste older than schema 9 (no ``workflows`` recorded) claimed any
    workflow, so nothing is said to be unserved while one is registered."""
    client = make_app(run_worker=False)
    register(client, "b", "c")
    async with client:
        for x in range(3):
            await client.start_workflow("b", x)
        await client.start_workflow("c", 0)
        assert (await client.status()).unserved == {"b": 3, "c": 1}  # no worker at all

        now = time.time()
        live = WorkerRow("b-server", "h", 1, now, now, 0, 1, None, lock_timeout=2.0, workflows='["b"]')
        await client.storage.upsert_worker(live)
        assert (await client.status()).unserved == {"c": 1}
        stale = WorkerRow(
            "c-server", "h", 2, now - 60, now - 60, 0, 1, None, lock_timeout=2.0, workflows='["c"]'
        )
        await client.storage.upsert_worker(stale)
        assert [w.state for w in (await client.status()).workers if w.worker_id == "c-server"] == ["stale"]
        assert (await client.status()).unserved == {"c": 1}
        assert f"  {UNSERVED_LINE} c 1" in (await status_text(db_url)).splitlines()
        old = WorkerRow("old-geste", "h", 3, now, now, 0, 1, None, lock_timeout=2.0)
        await client.storage.upsert_worker(old)
        assert (await client.status()).unserved == {}
        assert UNSERVED_LINE not in await status_text(db_url)


async def test_names_with_a_quote_unicode_or_200_characters(make_app: MakeApp, db_url: str) -> None:
    """The names go to the claim as parameters and to the registry as JSON: nothing to escape by hand."""
    names = ["it's", "ünï-cødé ワークフロー", "w" * 200, "a'); DROP TABLE geste_instances; --"]
    client = make_app(run_worker=False)
    register(client, *names)
    worker = make_app(worker_id="odd-names")
    register(worker, *names)
    async with client:
        handles = [await client.start_workflow(name, n) for n, name in enumerate(names)]
        assert (await client.status()).unserved == dict.fromkeys(names, 1)
        assert (await status_json(db_url))["unserved"] == dict.fromkeys(names, 1)
        async with worker:
            for n, (name, handle) in enumerate(zip(names, handles, strict=True)):
                assert await handle.result(timeout=10) == f"{name}:{n}"
            (registered,) = [w for w in (await client.status()).workers if w.worker_id == "odd-names"]
            assert registered.workflows == tuple(sorted(names))
            assert (await client.status()).unserved == {}


# -- a worker that registers nothing ------------------------------------------------------------------------
async def test_a_worker_that_registers_no_workflow_claims_nothing(make_app: MakeApp, db_url: str) -> None:
    """A client App with a worker (``run_worker`` left on, nothing registered): its claim loop runs,
    but no claim statement does, and another process's instance is never taken, not even once."""
    client = make_app(run_worker=False)
    register(client, "x")
    idle = make_app(worker_id="client-with-a-worker")
    calls: list[tuple[Any, ...]] = []
    claim = idle.storage.claim

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await claim(*args, **kwargs)

    idle.storage.claim = counted  # type: ignore[method-assign]
    async with client:
        handle = await client.start_workflow("x", 1)
        before = await row(db_url, handle.instance_id)
        async with idle:
            worker = worker_of(idle)
            loops = 0
            claim_round = worker._claim_round

            async def round_counted(*args: Any) -> float:
                nonlocal loops
                loops += 1
                return await claim_round(*args)

            worker._claim_round = round_counted  # type: ignore[method-assign]
            await rounds_after(idle, 5, lambda: loops)
            assert calls == [] and worker.claim_rounds == 0 and worker.claimed == 0
            assert sum(idle.metrics.claim_rounds.values.values()) == 0
            await assert_untouched(db_url, handle.instance_id, before)
            (registered,) = [w for w in (await client.status()).workers if w.worker_id == worker.worker_id]
            assert registered.workflows == ()
        runner = make_app(worker_id="runner")
        register(runner, "x")
        async with runner:
            assert await handle.result(timeout=10) == "x:1"


# -- a workflow registered on an open App ------------------------------------------------------------------
async def test_a_workflow_registered_after_open_is_claimed_from_then_on(
    make_app: MakeApp, db_url: str
) -> None:
    client = make_app(run_worker=False)
    register(client, "early", "late")
    app = make_app(worker_id="growing")
    register(app, "early")
    async with client, app:
        handle = await client.start_workflow("late", 7)
        before = await row(db_url, handle.instance_id)
        assert await (await client.start_workflow("early", 1)).result(timeout=10) == "early:1"
        await rounds_after(app, 5)
        await assert_untouched(db_url, handle.instance_id, before)
        assert (await client.status()).unserved == {"late": 1}

        register(app, "late")  # on the open App: its worker claims it at its next round, unpoked
        assert await handle.result(timeout=10) == "late:7"

        async def registered() -> bool:  # the registry says so at the next heartbeat
            workers = (await client.status()).workers
            return any(w.worker_id == "growing" and w.workflows == ("early", "late") for w in workers)

        await wait_until(registered, "the registry to list the new workflow")


# -- the cost of a claim over a big table of other workflows' instances ------------------------------------
OTHERS = 100_000
MINE = 10
MINE_LATER = 1_000
"""A seeded table: OTHERS instances of ``other`` due for a while (another service's backlog, older than
anything of ``mine``), MINE of ``mine`` due, and MINE_LATER of ``mine`` sleeping (run_at an hour ahead)."""

SEED_POSTGRES = """
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, run_at)
SELECT 'other-' || g, 'other', 'pending', '{"args": [], "kwargs": {}}', $1 - 600, $1 - 600,
       $1 - 600 + g * 0.001
FROM generate_series(1, $2::integer) AS g
UNION ALL
SELECT 'mine-' || g, 'mine', 'pending', '{"args": [], "kwargs": {}}', $1 - 60, $1 - 60,
       CASE WHEN g <= $3 THEN $1 - 60 + g ELSE $1 + 3600 + g END
FROM generate_series(1, $3::integer + $4::integer) AS g
"""


async def assert_the_storage_takes_mine(app: geste.App, now: float) -> None:
    """On a seeded table: the storage's own claim takes exactly the due instances of ``mine``, and
    ``runnable_workflows`` counts ``other`` up to its cap."""
    claims = await app.storage.claim("w1", now, now + 15.0, 100, due_before=now + 0.025, workflows=["mine"])
    assert [c.lease.instance_id for c in claims] == [f"mine-{g}" for g in range(1, MINE + 1)]
    assert claims.next_run_at == pytest.approx(now + 3600 + MINE + 1)
    assert await app.storage.runnable_workflows(now, cap=UNSERVED_CAP, limit=1000) == [
        ("other", UNSERVED_CAP)
    ]


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_claim_reads_only_its_own_workflows_index_range_on_postgres(
    pg_url: str, plan_cache_mode: str
) -> None:
    """EXPLAIN ANALYZE of the real claim, with the parameters ``PostgresStorage.claim`` passes, over
    100,000 due instances of another workflow: the plan reads ``geste_instances_runnable_by_name``, never
    the table sequentially, and about as many rows as it claims (not the other service's backlog, not its
    own sleeping instances), with the custom plan and with the generic one asyncpg's prepared statement
    switches to after five runs. The same for ``runnable_workflows`` (``geste status``), which reads at
    most its cap per name. Then the storage's own claim takes exactly the due instances of ``mine``."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    dsn, options = parse_postgres_url(pg_url)
    queries = schema_queries(options["schema"])
    now = time.time()
    async with geste.App(pg_url, run_worker=False) as app:  # migrated
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            await conn.execute(SEED_POSTGRES, now, OTHERS, MINE, MINE_LATER)
            await conn.execute("ANALYZE geste_instances")
            await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            cases = {
                # worker_id, lease prefix, now, lock_expires_at, limit, due (now + lookahead), names, known
                "claim": ("w1", "0123456789ab/", now, now + 15.0, 100, now + 0.025, "mine", None),
                "claim_names": (
                    *("w1", "0123456789ab/", now, now + 15.0, 100, now + 0.025),
                    *(["mine", "mine2"], None),
                ),
                "runnable_workflows": (now, UNSERVED_CAP, 1000),
            }
            for name, params in cases.items():
                arguments = ", ".join(sql_literal(value) for value in params)  # EXECUTE takes no $n
                transaction = conn.transaction()
                await transaction.start()
                try:  # EXPLAIN ANALYZE runs the claim's UPDATE: rolled back
                    await conn.execute(f"PREPARE plan_under_test AS {queries[name]}")
                    found = await conn.fetchval(
                        f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE plan_under_test({arguments})"
                    )
                finally:
                    await transaction.rollback()
                    await conn.execute("DEALLOCATE ALL")
                nodes = plan_nodes(json.loads(found)[0]["Plan"])
                on_table = [node for node in nodes if node.get("Relation Name") == "geste_instances"]
                shown = (name, [(n["Node Type"], n.get("Index Name"), instances_read([n])) for n in on_table])
                assert not any(node["Node Type"] == "Seq Scan" for node in on_table), shown
                assert any(n.get("Index Name") == "geste_instances_runnable_by_name" for n in on_table), shown
                read = instances_read(nodes)
                if name.startswith("claim"):  # MINE claimed, the next run_at: not OTHERS, not MINE_LATER
                    assert read < 100, shown
                else:  # each name's count stops at the cap: `other` reads UNSERVED_CAP rows, `mine` its own
                    assert read < UNSERVED_CAP + 100, shown
        finally:
            await conn.close()

        await assert_the_storage_takes_mine(app, now)


SEED_SQLITE = """
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :others + :mine + :later)
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, run_at)
SELECT CASE WHEN n <= :others THEN 'other-' || n ELSE 'mine-' || (n - :others) END,
       CASE WHEN n <= :others THEN 'other' ELSE 'mine' END,
       'pending', '{"args": [], "kwargs": {}}', :now - 600, :now - 600,
       CASE WHEN n <= :others THEN :now - 600 + n * 0.001
            WHEN n <= :others + :mine THEN :now - 60 + (n - :others)
            ELSE :now + 3600 + (n - :others) END
FROM g
"""


async def test_a_concurrent_claim_gets_what_another_claim_wanted_but_not(pg_url: str) -> None:
    """Claim A (batch 1, two names) is in flight, its transaction open; claim B at the same moment takes
    the other due instance. A claim locks only the rows it takes: one that locked a head per name and
    kept one made B come back empty while work was due, and sleep."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    dsn, options = parse_postgres_url(pg_url)
    async with geste.App(pg_url, run_worker=False) as app:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            now = time.time()
            await conn.execute(
                "INSERT INTO geste_instances"
                " (instance_id, workflow_name, status, input, created_at, updated_at, run_at) VALUES"
                " ('x1', 'x', 'pending', '[]', $1::float8, $1::float8, $1::float8 - 2),"
                " ('y1', 'y', 'pending', '[]', $1::float8, $1::float8, $1::float8 - 1)",
                now,
            )
            claim = schema_queries(options["schema"])["claim_names"]
            async with conn.transaction():
                rows = await conn.fetch(claim, "A", "a/", now, now + 60, 1, now, ["x", "y"], None)
                assert [r[0] for r in rows if r[0] is not None] == ["x1"]
                taken = await app.storage.claim("B", now, now + 60, 10, workflows=["x", "y"])
                assert [c.lease.instance_id for c in taken] == ["y1"]
        finally:
            await conn.close()


async def test_a_claim_reads_only_its_own_workflows_index_range_on_sqlite(tmp_path: Path) -> None:
    """The same seeded table on SQLite: ``claim_pick`` and ``next_run_after`` (run once per registered
    name) and ``runnable_workflows`` search ``geste_instances_runnable_by_name`` and never scan the table;
    each runs a small fraction of the instructions of one pass over the table; the storage's claim takes
    exactly the due instances of ``mine``."""
    from geste.storage.sqlite import Q

    url = f"sqlite:///{tmp_path / 'seeded.db'}"
    now = time.time()
    async with geste.App(url, run_worker=False) as app:
        with contextlib.closing(sqlite3.connect(tmp_path / "seeded.db")) as conn:
            seed = {"others": OTHERS, "mine": MINE, "later": MINE_LATER, "now": now}
            with conn:
                conn.execute(SEED_SQLITE, seed)
            conn.execute("ANALYZE")
            params = {"name": "mine", "due": now + 0.025, "now": now, "limit": 100, "cap": UNSERVED_CAP}
            one_pass = vm_steps(conn, "SELECT count(*) FROM geste_instances WHERE input <> ''", {})
            for name in ("claim_pick", "next_run_after", "runnable_workflows"):
                on_table = instance_steps_searching(conn, Q[name], params)
                assert any("geste_instances_runnable_by_name" in step for step in on_table), (name, on_table)
                steps = vm_steps(conn, Q[name], params)
                limit = one_pass // 20 if name == "runnable_workflows" else one_pass // 200
                assert steps <= limit, (name, steps, one_pass)  # runnable_workflows: UNSERVED_CAP of `other`

        await assert_the_storage_takes_mine(app, now)


# -- two worker processes racing on a backlog of two workflows --------------------------------------------
async def test_two_worker_processes_race_on_a_backlog_of_two_workflows(cluster: Cluster) -> None:
    """Both processes register the same workflows (``tests/apps/crash_app.py``); a backlog of ``batch``
    and ``long`` instances waits before they start together. Each claim locks only the rows it takes (the
    other process skips them while it runs): every instance runs exactly once, in one process, its
    history one run's steps, and none is left leased. Leases of 30 s rule a lost lease out: the counts
    are exact. Each ``long`` instance sleeps 0.1 s in an activity and a worker runs 5 at a time, so one
    process alone needs at least 1.5 s (SQLite) or 3 s (PostgreSQL) for the backlog: far longer than
    the other takes to start after it, so both take part in the race (with no sleep, a worker that
    started first could empty a SQLite backlog alone)."""
    per_workflow = 150 if cluster.url.startswith("postgres") else 75
    async with cluster.client() as client:
        handles: list[geste.WorkflowHandle[Any]] = []
        activities: dict[str, list[str]] = {}
        for i in range(per_workflow):
            for handle, steps in (
                (await client.start_workflow("batch", i), ["one", "two", "three"]),
                (await client.start_workflow("long", 0.1), ["slow", "one"]),
            ):
                handles.append(handle)
                activities[handle.instance_id] = steps
        await asyncio.gather(*(cluster.spawn(f"w{n}", concurrency=5, lock_timeout=30.0) for n in (1, 2)))
        results = await asyncio.gather(*(h.result(timeout=90) for h in handles))
        assert results == [
            r for i in range(per_workflow) for r in ([f"one:{i}", f"two:{i}", f"three:{i}"], "slow+one:0")
        ]

        starts = cluster.entries()
        runs = Counter((e["instance"], e["activity"]) for e in starts)
        expected = {(iid, a) for iid, steps in activities.items() for a in steps}
        assert set(runs) == expected and set(runs.values()) == {1}, runs.most_common(3)
        workers: dict[str, set[str]] = defaultdict(set)
        for e in starts:
            workers[e["instance"]].add(e["worker"])
        assert all(len(ran) == 1 for ran in workers.values()), [w for w in workers.items() if len(w[1]) > 1]
        assert {w for ran in workers.values() for w in ran} == {"w1", "w2"}, "one process did all the work"

        rows = await raw_query(
            cluster.url,
            "SELECT i.instance_id, i.status, i.steps, i.locked_by, i.lease_id, i.lock_expires_at, "
            "count(h.seq) AS recorded, count(DISTINCT h.seq) AS distinct_seqs, max(h.seq) AS last_seq "
            "FROM geste_instances i LEFT JOIN geste_history h ON h.instance_id = i.instance_id "
            "GROUP BY i.instance_id, i.status, i.steps, i.locked_by, i.lease_id, i.lock_expires_at",
        )
        assert len(rows) == len(handles)
        for found in rows:
            assert found["status"] == "completed", found
            assert (found["locked_by"], found["lease_id"], found["lock_expires_at"]) == (None, None, None)
            assert found["steps"] == found["recorded"] == found["distinct_seqs"] == found["last_seq"], found
            assert found["recorded"] == len(activities[found["instance_id"]]), found  # one run's steps
