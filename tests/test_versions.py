"""Versions (schema 27; docs/versioning.md): a rolling deploy of two worker versions, in worker processes
(``tests/apps/version_app.py``), against running instances of both; the version an instance started on,
the claim keys a worker registers, and the status of pinned instances no live worker can run.
"""

from __future__ import annotations

import asyncio
import re
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

import geste
from geste._versions import SEPARATOR, claim_keys, source_version

from .processes import WorkerProcesses
from .support import raw_query, run_cli, wait_status, wait_until


def steps(group: WorkerProcesses, instance_id: str) -> list[tuple[str, str, str]]:
    """(step, version, worker) of each activity the instance ran, in order."""
    return [(e["name"], e["version"], e["worker"]) for e in group.entries(instance=instance_id, event="step")]


async def test_a_rolling_deploy_of_two_versions(tmp_path: Path, db_url: str) -> None:
    """v1 workers run instances of both workflows; v2 workers come up and the v1 ones go: the pinned
    instances stay on the version they started on (one of v1 waits, counted in the status, until a v1
    worker is back), the upgrading ones resume on v2's code, its patches taking the old branch before the
    point their history reached and the new one after it; new instances take v2's new branches."""
    group = WorkerProcesses(tmp_path, db_url, "version_app", stop_gracefully=True)
    with group:
        old = group.client(code="v1")
        new = group.client(code="v2")
        async with old, new:
            assert (old.version, new.version) == ("v1", "v2")
            await group.spawn("w1", code="v1")
            await old.workflows["pinned_flow"].start_with_id("p1")
            await old.workflows["upgrading_flow"].start_with_id("u1")
            for iid in ("p1", "u1"):
                await wait_status(old, iid, geste.Status.WAITING)
            w2 = await group.spawn("w2", code="v2")
            await new.workflows["pinned_flow"].start_with_id("p2")  # pinned to v2: w2 only
            await wait_status(new, "p2", geste.Status.WAITING)
            rows = {r["instance_id"]: r for r in await raw_query(db_url, "SELECT * FROM geste_instances")}
            assert {i: (r["version"], bool(r["pinned"])) for i, r in rows.items()} == {
                "p1": ("v1", True),
                "u1": ("v1", False),
                "p2": ("v2", True),
            }
            assert rows["p1"]["runner"] == f"pinned_flow{SEPARATOR}v1"
            assert rows["u1"]["runner"] is None  # a claim matches coalesce(runner, workflow_name)

            group.by_id["w1"].send_signal(signal.SIGTERM)  # the v1 workers go
            assert group.by_id["w1"].wait(timeout=30) == 0
            await new.workflows["upgrading_flow"].start_with_id("u2")
            for iid in ("p1", "u1", "u2"):
                await new.send_event("go", {"id": iid}, event_id=f"go-{iid}")
            assert await new.get_handle("u1").result(timeout=15) == ["a", "post", "b"]
            assert await new.get_handle("u2").result(timeout=15) == ["pre", "a", "post", "b"]
            # p1 is runnable, but pinned to v1, and no v1 worker is alive: nobody claims it
            status = await new.status()
            assert status.unserved_versions == {"v1": {"pinned_flow": 1}}
            assert status.unserved == {}
            live = {w.worker_id: (w.version, w.pinned, w.workflows) for w in status.workers if w.alive}
            assert live == {"w2": ("v2", ("pinned_flow",), ("pinned_flow", "upgrading_flow"))}
            assert (await new.get_instance("p1")).status is geste.Status.WAITING

            await group.spawn("w3", code="v1")  # a v1 worker again: it finishes p1 on v1's code
            assert await new.get_handle("p1").result(timeout=15) == ["a1", "b1"]
            await new.send_event("go", {"id": "p2"}, event_id="go-p2")
            assert await new.get_handle("p2").result(timeout=15) == ["a2", "b2"]
            assert (await new.status()).unserved_versions == {}
            assert w2.poll() is None

    assert steps(group, "p1") == [("a1", "v1", "w1"), ("b1", "v1", "w3")]
    assert steps(group, "p2") == [("a2", "v2", "w2"), ("b2", "v2", "w2")]
    assert steps(group, "u1") == [("a", "v1", "w1"), ("post", "v2", "w2"), ("b", "v2", "w2")]
    assert steps(group, "u2") == [
        ("pre", "v2", "w2"),
        ("a", "v2", "w2"),
        ("post", "v2", "w2"),
        ("b", "v2", "w2"),
    ]


# -- the claim reads no pinned instance of another version ------------------------------------------------
OLD, NEW = 20_000, 30
SEED_POSTGRES = """
INSERT INTO geste_instances
    (instance_id, workflow_name, status, input, created_at, updated_at, run_at, version, pinned)
SELECT 'old-' || n, 'flow', 'pending', '{"args": [], "kwargs": {}}', $1::float8 - 600, $1::float8 - 600,
       $1::float8 - 600 + n * 0.001, 'old', true FROM generate_series(1, $2::int) AS n
UNION ALL
SELECT 'new-' || n, 'flow', 'pending', '{"args": [], "kwargs": {}}', $1::float8 - 600, $1::float8 - 600,
       $1::float8 - 60 + n, 'new', true FROM generate_series(1, $3::int) AS n
"""
SEED_SQLITE = """
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :old + :new)
INSERT INTO geste_instances
    (instance_id, workflow_name, status, input, created_at, updated_at, run_at, version, pinned)
SELECT CASE WHEN n <= :old THEN 'old-' || n ELSE 'new-' || (n - :old) END, 'flow', 'pending',
       '{"args": [], "kwargs": {}}', :now - 600, :now - 600,
       CASE WHEN n <= :old THEN :now - 600 + n * 0.001 ELSE :now - 60 + (n - :old) END,
       CASE WHEN n <= :old THEN 'old' ELSE 'new' END, 1
FROM g
"""
KEYS = ["flow", f"flow{SEPARATOR}new"]
"""What a worker of version ``new`` that registers ``flow`` pinned claims (``claim_keys``)."""


async def assert_the_storage_takes_the_new_ones(app: geste.App, now: float) -> None:
    taken = await app.storage.claim("w-new", now, now + 15.0, 1000, workflows=KEYS)
    assert sorted(c.lease.instance_id for c in taken) == sorted(f"new-{n}" for n in range(1, NEW + 1))
    runnable = dict(await app.storage.runnable_workflows(now, cap=100, limit=10))
    assert runnable == {f"flow{SEPARATOR}old": 100}  # counted up to the cap; the new ones are held now


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_claim_reads_no_pinned_instance_of_another_version_on_postgres(
    pg_url: str, plan_cache_mode: str
) -> None:
    """EXPLAIN ANALYZE of the claim a worker of version ``new`` runs (``claim_names`` over its claim keys)
    among 20,000 due instances pinned to ``old``: it reads the runnable index's ranges of its own keys
    (about the rows it takes), never the old version's backlog, with the custom and the generic plan."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    from .support import instances_read, plan_nodes, sql_literal

    dsn, options = parse_postgres_url(pg_url)
    queries = schema_queries(options["schema"])
    now = __import__("time").time()
    async with geste.App(pg_url, run_worker=False) as app:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            await conn.execute(SEED_POSTGRES, now, OLD, NEW)
            await conn.execute("ANALYZE geste_instances")
            await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            params = ("w1", "0123456789ab/", now, now + 15.0, 100, now + 0.025, KEYS, None)
            arguments = ", ".join(sql_literal(value) for value in params)
            transaction = conn.transaction()
            await transaction.start()
            try:  # EXPLAIN ANALYZE runs the claim's UPDATE: rolled back
                await conn.execute(f"PREPARE plan_under_test AS {queries['claim_names']}")
                found = await conn.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE plan_under_test({arguments})"
                )
            finally:
                await transaction.rollback()
                await conn.execute("DEALLOCATE ALL")
            nodes = plan_nodes(json_loads(found)[0]["Plan"])
            on_table = [node for node in nodes if node.get("Relation Name") == "geste_instances"]
            shown = [(n["Node Type"], n.get("Index Name"), instances_read([n])) for n in on_table]
            assert not any(node["Node Type"] == "Seq Scan" for node in on_table), shown
            assert any(n.get("Index Name") == "geste_instances_runnable_by_name" for n in on_table), shown
            assert instances_read(nodes) <= 3 * NEW, shown  # range, lock by key, update: none of OLD
        finally:
            await conn.close()
        await assert_the_storage_takes_the_new_ones(app, now)


async def test_a_claim_reads_no_pinned_instance_of_another_version_on_sqlite(tmp_path: Path) -> None:
    """The same on SQLite: ``claim_pick`` of each claim key searches the runnable index and runs a small
    fraction of the instructions of one pass over the table."""
    import contextlib
    import sqlite3
    import time

    from geste.storage.sqlite import Q

    from .support import instance_steps_searching, vm_steps

    url = f"sqlite:///{tmp_path / 'seeded.db'}"
    now = time.time()
    async with geste.App(url, run_worker=False) as app:
        with contextlib.closing(sqlite3.connect(tmp_path / "seeded.db")) as conn:
            with conn:
                conn.execute(SEED_SQLITE, {"old": OLD, "new": NEW, "now": now})
            conn.execute("ANALYZE")
            one_pass = vm_steps(conn, "SELECT count(*) FROM geste_instances WHERE input <> ''", {})
            for key in KEYS:
                params = {"name": key, "due": now + 0.025, "now": now, "limit": 100}
                on_table = instance_steps_searching(conn, Q["claim_pick"], params)
                assert any("geste_instances_runnable_by_name" in step for step in on_table), on_table
                assert vm_steps(conn, Q["claim_pick"], params) <= one_pass // 100
        await assert_the_storage_takes_the_new_ones(app, now)


# -- the version of an App, the claim keys, bad input -----------------------------------------------------
def test_the_version_is_declared_or_derived_from_the_workflows_source() -> None:
    def build(body: str, **options: Any) -> geste.App:
        app = geste.App("sqlite:///never-opened.db", **options)
        namespace: dict[str, Any] = {"geste": geste}
        exec(f"async def flow(ctx):\n    return {body}\n", namespace)
        app.workflow(versioning="pinned")(namespace["flow"])
        return app

    a, same, other = build("1"), build("1"), build("2")
    assert a.version == same.version != other.version
    assert a.version.startswith("src-") and len(a.version) == 16
    assert build("1", version="2026.12").version == "2026.12"
    assert claim_keys(a.workflows, "v9") == ["flow", f"flow{SEPARATOR}v9"]
    assert source_version([]) == source_version(())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"version": ""}, "version must be a non-empty string"),
        ({"version": "a\x1fb"}, "no U\\+001F"),
        ({"version": 3}, "version must be"),
        ({"version": "x" * 101}, "at most 100"),
    ],
)
def test_a_bad_version_is_a_configuration_error(options: dict[str, Any], message: str) -> None:
    with pytest.raises(geste.errors.ConfigurationError, match=message):
        geste.App("sqlite:///never-opened.db", **options)


def test_a_bad_policy_or_name_is_a_configuration_error() -> None:
    app = geste.App("sqlite:///never-opened.db")

    async def flow(ctx: geste.WorkflowContext) -> None:
        return None

    with pytest.raises(geste.errors.ConfigurationError, match="versioning must be 'upgrading' or 'pinned'"):
        app.workflow(versioning="sticky")(flow)
    with pytest.raises(geste.errors.ConfigurationError, match="U\\+001F"):
        app.workflow(name="a\x1fb")(flow)


async def test_a_child_records_its_parents_version_and_its_own_policy(make_app: Any) -> None:
    """``ctx.start_child`` of a pinned workflow: the child is pinned to the version of the code that
    started it, like a start from a client; an upgrading child records the version too."""
    app = make_app(version="v7")

    @app.workflow(versioning="pinned")
    async def kid(ctx: geste.WorkflowContext) -> int:
        return 1

    @app.workflow
    async def loose(ctx: geste.WorkflowContext) -> int:
        return 2

    @app.workflow
    async def parent(ctx: geste.WorkflowContext) -> int:
        a = await ctx.start_child(kid, child_id="k")
        b = await ctx.start_child(loose, child_id="l")
        return await a.result() + await b.result()

    async with app:
        assert await (await parent.start_with_id("p")).result(timeout=10) == 3
        found = await raw_query(
            app.url, "SELECT instance_id, version, pinned FROM geste_instances ORDER BY instance_id"
        )
    assert [(r["instance_id"], r["version"], bool(r["pinned"])) for r in found] == [
        ("k", "v7", True),
        ("l", "v7", False),
        ("p", "v7", False),
    ]


def json_loads(text: str) -> Any:
    import json

    return json.loads(text)


async def test_a_schedules_tick_records_the_version_of_the_code_that_fires_it() -> None:
    from datetime import UTC, datetime, timedelta

    from geste.testing import WorkflowEnvironment

    app = geste.App("sqlite:///never-opened.db", version="v3")

    @app.schedule("0 * * * *")
    @app.workflow(versioning="pinned")
    async def hourly(ctx: geste.WorkflowContext) -> str:
        return "done"

    async with WorkflowEnvironment(app, start_at=datetime(2030, 1, 1, tzinfo=UTC)) as env:
        await env.advance(timedelta(hours=2))
        found = await raw_query(env.database_url, "SELECT status, version, pinned FROM geste_instances")
    assert [(r["status"], r["version"], bool(r["pinned"])) for r in found] == [("completed", "v3", True)] * 2


async def test_the_viewer_and_the_cli_show_versions_and_pinned_instances_no_worker_runs(
    make_app: Any, db_url: str
) -> None:
    """A v2 worker runs; a v1 process started a pinned instance: ``/ui/versions`` lists the v2 worker and
    the instance pinned to v1 that no live worker runs, as ``geste status`` does."""
    import httpx

    from .test_viewer import page

    worker = make_app(version="v2")
    client = make_app(version="v1", run_worker=False)
    for app in (worker, client):

        @app.workflow(name="flow", versioning="pinned")
        async def flow(ctx: geste.WorkflowContext) -> str:
            return "done"

    async with worker, client:
        await client.start_workflow("flow", instance_id="f1")
        transport = httpx.ASGITransport(app=worker.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            body = await page(http, "/ui/versions")
            assert '<a href="/ui/versions">Versions</a>' in await page(http, "/ui")  # in the bar
        assert "<h1>Versions</h1>" in body
        live, stuck = body.split("<tbody>")[1:3]
        assert ">v2<" in live and worker.worker_id in live and ">flow<" in live
        cells = [re.sub(r"<[^>]+>", "", cell) for cell in stuck.split("</td>")[:3]]
        assert cells == ["v1", "flow", "1"], cells
        result = await asyncio.to_thread(run_cli, ["status", "--database-url", db_url])
        assert (
            "runnable, pinned to version v1, but no live worker of it registers them: flow 1" in result.output
        )
        assert (await worker.get_instance("f1")).status is geste.Status.PENDING


# -- a pinned instance's wake-up is routed to a worker of its version ------------------------------------
@pytest.fixture
def own_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own: a notification of another test run without a schema (an
    older geste's) would make every worker here run a whole claim, which could take the instance."""
    from .conftest import POSTGRES_URL, _admin

    name = f"geste_versions_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def versioned_app(url: str, version: str, **options: Any) -> geste.App:
    """An App of ``version`` whose two pinned workflows say which version ran them. Its poll net runs
    every minute (``min(notify_fallback_interval, lock_timeout)``): never within a test's wait."""
    app = geste.App(
        url,
        version=version,
        worker_id=f"worker-{version}",
        lock_timeout=60.0,
        notify_fallback_interval=60.0,
        **options,
    )

    @app.workflow(versioning="pinned")
    async def leaf(ctx: geste.WorkflowContext) -> str:
        return version

    @app.workflow(versioning="pinned")
    async def trunk(ctx: geste.WorkflowContext, child_id: str) -> list[str]:
        child = await ctx.start_child(leaf, child_id=child_id)
        return [version, await child.result()]

    return app


def hashed_to(worker: str, among: list[str], prefix: str) -> str:
    """An instance id whose wake-up, routed by a hash over ``among``, goes to ``worker``."""
    from geste.runtime.routing import score

    for n in range(10_000):
        key = f"{prefix}-{n}"
        if max(among, key=lambda w: score(key, w)) == worker:
            return key
    raise AssertionError("no key found")  # pragma: no cover


async def test_a_pinned_instances_wake_ups_are_routed_to_a_worker_of_its_version(own_database: str) -> None:
    """Workers of v1 and v2 run, both registering the pinned workflows. A client of v1 starts an instance
    (its notification names no worker: routed by a hash), which starts a child (the same), whose end
    wakes the parent. Both ids hash to the v2 worker among the workers of the workflow's name: routed by
    name, v2 got the wake-ups and could not claim them (claim_ids matches the runner), and they waited
    for v1's poll net, a minute away. Routed by runner, v1's worker is the only candidate: it claims each
    by id at once, v2's never hears of them, and no whole claim (a poll) takes them."""
    v1, v2 = versioned_app(own_database, "v1"), versioned_app(own_database, "v2")
    client = versioned_app(own_database, "v1", run_worker=False)
    by_id: dict[str, list[str]] = {"worker-v1": [], "worker-v2": []}
    by_poll: list[str] = []
    for app in (v1, v2):
        claim_ids = app.storage.claim_ids

        async def counted(*args: Any, _claim: Any = claim_ids, _w: str = app.worker_id, **kw: Any) -> Any:
            by_id[_w].extend(args[3])
            return await _claim(*args, **kw)

        app.storage.claim_ids = counted  # type: ignore[method-assign]
        whole_claim = app.storage.claim

        async def whole(*args: Any, _claim: Any = whole_claim, **kw: Any) -> Any:
            taken = await _claim(*args, **kw)
            by_poll.extend(c.lease.instance_id for c in taken)
            return taken

        app.storage.claim = whole  # type: ignore[method-assign]

    async with v1, v2, client:

        async def listening() -> bool:
            rows = await raw_query(own_database, "SELECT listener FROM geste_workers")
            return len(rows) == 2 and all('"listening"' in (r["listener"] or "") for r in rows)

        await wait_until(listening, "both workers to register as listening")
        for app in (v1, v2):  # then each reads the other as listening: the views agree
            worker = app._worker
            assert worker is not None
            await worker.beat()
        workers = ["worker-v1", "worker-v2"]
        trunk_id, leaf_id = hashed_to("worker-v2", workers, "trunk"), hashed_to("worker-v2", workers, "leaf")
        for app in (v1, v2):
            router = app._worker.router  # type: ignore[union-attr]
            assert router is not None
            assert router.target(trunk_id, "trunk") == "worker-v2"  # by name: v2, which cannot claim it
            assert router.target(leaf_id, "leaf") == "worker-v2"
            assert router.target(trunk_id, f"trunk{SEPARATOR}v1") == "worker-v1"  # by runner: v1 only
            assert router.target(trunk_id, f"trunk{SEPARATOR}v2") == "worker-v2"

        handle = await client.workflows["trunk"].start_with_id(trunk_id, leaf_id)
        assert await handle.result(timeout=20) == ["v1", "v1"]

    assert by_id["worker-v2"] == []  # never routed to the worker of the other version
    # its start (then the child's end, unless the child ended before the parent suspended to await it:
    # the suspension then goes on at once), and the child's start
    assert by_id["worker-v1"].count(trunk_id) in (1, 2) and by_id["worker-v1"].count(leaf_id) == 1
    assert trunk_id not in by_poll and leaf_id not in by_poll
    rows = await raw_query(
        own_database, "SELECT instance_id, runner, last_worker FROM geste_instances ORDER BY instance_id"
    )
    assert {r["instance_id"]: (r["runner"], r["last_worker"]) for r in rows} == {
        trunk_id: (f"trunk{SEPARATOR}v1", "worker-v1"),
        leaf_id: (f"leaf{SEPARATOR}v1", "worker-v1"),
    }


async def test_every_wake_up_notification_of_a_pinned_instance_names_its_runner(pg_url: str) -> None:
    """What the listeners route by is the payload's ``workflow_name``: for a pinned instance it must be
    its runner (``coalesce(runner, workflow_name)``) in every statement that makes it runnable: a
    client's start, an event, a timer announced, a child's start and its end waking the parent, a
    channel message, a retry, a resume, a cancel. An unpinned instance's names its workflow, as before."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(pg_url)
    heard: list[tuple[str, dict[str, Any]]] = []
    conn = await asyncpg.connect(dsn)

    def hear(_conn: Any, _pid: int, channel: str, payload: str) -> None:
        body = json_loads(payload)
        if body.get("schema") == options["schema"]:
            heard.append((channel, body))

    channels = ("geste_workflow_resumable", "geste_timer_expired", "geste_channel_message")
    for channel in channels:
        await conn.add_listener(channel, hear)
    app = geste.App(pg_url, version="v1", lock_timeout=2.0)  # a 3 s sleep outlives its lease: announced
    client = geste.App(pg_url, version="v1", run_worker=False)
    for each in (app, client):

        @each.workflow(versioning="pinned")
        async def kid(ctx: geste.WorkflowContext) -> str:
            await ctx.wait_event("go")  # so that its parent waits for its end: woken by it
            return "kid"

        @each.workflow(versioning="pinned")
        async def flow(ctx: geste.WorkflowContext) -> str:
            await ctx.wait_event("go")
            await ctx.sleep(3.0)
            child = await ctx.start_child("kid", child_id=f"{ctx.instance_id}-kid")
            await child.result()
            return str((await ctx.receive("pings")).data)

        @each.workflow(versioning="pinned")
        async def fragile(ctx: geste.WorkflowContext) -> None:
            await ctx.wait_event("go")
            raise RuntimeError("again")

        @each.workflow(versioning="pinned")
        async def waiter(ctx: geste.WorkflowContext) -> None:
            await ctx.wait_event("never")

        @each.workflow
        async def plain(ctx: geste.WorkflowContext) -> None:
            await ctx.wait_event("go")

    async def settled(instance_id: str, status: str) -> bool:
        rows = await raw_query(
            pg_url,
            "SELECT status, run_at, locked_by FROM geste_instances WHERE instance_id = $1",
            instance_id,
        )
        return bool(
            rows
            and rows[0]["status"] == status
            and rows[0]["run_at"] is None
            and rows[0]["locked_by"] is None
        )

    try:
        async with app, client:
            await wait_until(lambda: app.listener_status().state == "listening", "the listener")
            for name in ("flow", "fragile", "waiter", "plain"):
                await client.workflows[name].start_with_id(name)
                await wait_status(client, name, geste.Status.WAITING)
            for name in ("flow", "fragile", "plain"):
                await client.send_event("go", None, instance_id=name)
            await wait_status(client, "fragile", geste.Status.FAILED)
            await client.retry("fragile")  # runs again from its failed step, and fails again
            await wait_until(lambda: settled("fragile", "failed"), "fragile to fail again")
            await client.resume("waiter")  # runnable now: it runs, and waits again
            await wait_until(lambda: settled("waiter", "waiting"), "the waiter to wait again")
            await client.cancel("waiter")  # nobody holds it: woken, routed
            await wait_status(client, "waiter", geste.Status.CANCELLED)

            await wait_until(lambda: settled("flow-kid", "waiting"), "the child to wait")
            await wait_until(lambda: settled("flow", "waiting"), "the parent to await the child")
            await client.send_event("go", None, instance_id="flow-kid")  # its end wakes the parent

            async def receiving() -> bool:
                rows = await raw_query(
                    pg_url, "SELECT run_at, steps FROM geste_instances WHERE instance_id = 'flow'"
                )
                return bool(rows[0]["run_at"] is None and rows[0]["steps"] >= 5)

            await wait_until(receiving, "flow to wait for its message")
            await client.publish("pings", "pong")
            assert await client.get_handle("flow").result(timeout=20) == "pong"
            await wait_status(client, "plain", geste.Status.COMPLETED)
    finally:
        await conn.close()
    rows = await raw_query(pg_url, "SELECT instance_id, workflow_name, runner FROM geste_instances")
    key = {r["instance_id"]: r["runner"] or r["workflow_name"] for r in rows}
    assert key["flow"] == f"flow{SEPARATOR}v1" and key["plain"] == "plain"
    routed = [
        (channel, body["instance_id"], body["workflow_name"])
        for channel, body in heard
        if "workflow_name" in body and not {"finished", "cancel", "queue", "state"} & body.keys()
    ]
    assert [r for r in routed if r[2] != key[r[1]]] == []  # each named by its key
    kinds = Counter((channel.removeprefix("geste_"), iid) for channel, iid, _ in routed)
    assert kinds["workflow_resumable", "flow"] >= 3  # its start, the event, the child's end
    assert kinds["timer_expired", "flow"] >= 1  # the 3 s sleep, announced (it outlives the lease)
    assert kinds["channel_message", "flow"] == 1
    assert kinds["workflow_resumable", "flow-kid"] == 2  # started by its parent, its event
    assert kinds["workflow_resumable", "fragile"] >= 3  # start, event, retry
    assert kinds["workflow_resumable", "waiter"] >= 3  # start, resume, cancel
    assert kinds["workflow_resumable", "plain"] >= 2  # unpinned: its name
