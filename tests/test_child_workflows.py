"""Child workflows (ctx.start_child / run_child): a recorded step that creates the child, a durable wait
for its end woken by that end (NOTIFY on PostgreSQL), typed failures, the parent-close policies, and the
parent/child link, on both backends; across worker processes in tests/test_child_crash.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import geste
from geste.errors import (
    ChildWorkflowError,
    ConfigurationError,
    InstanceAlreadyExistsError,
    UnknownWorkflowError,
    WorkflowCancelled,
)

from .processes import WorkerProcesses, worker_processes
from .support import count_storage_calls, raw_query, wait_until

MakeApp = Callable[..., geste.App]


async def wait_status(app: geste.App, instance_id: str, status: geste.Status, timeout: float = 30.0) -> None:
    """Wait until the instance exists with ``status`` (a child is created by its parent's step)."""

    async def reached() -> bool:
        found = await app.list_instances(status=status, limit=1000)
        return any(info.instance_id == instance_id for info in found)

    await wait_until(reached, f"{instance_id} to be {status}", timeout)


def family(make_app: MakeApp, **options: Any) -> geste.App:
    app = make_app(**options)
    other = geste.App("sqlite:///:memory:")

    @other.workflow()
    async def stranger(ctx: geste.WorkflowContext, n: int) -> int:
        return n

    @app.activity()
    async def double(ctx: geste.ActivityContext, n: int) -> int:
        return 2 * n

    @app.workflow()
    async def child(ctx: geste.WorkflowContext, n: int) -> int:
        return await double(ctx, n)

    @app.workflow()
    async def failing(ctx: geste.WorkflowContext, message: str) -> int:
        raise ValueError(message)

    @app.workflow()
    async def waits(ctx: geste.WorkflowContext) -> str:
        event = await ctx.wait_event("go")
        return str(event.data)

    @app.workflow()
    async def parent(ctx: geste.WorkflowContext, n: int) -> dict[str, Any]:
        handle = await ctx.start_child(child, n)
        first = await handle.result()
        second = await ctx.run_child(child, first, child_id=f"{ctx.instance_id}-second")
        return {"first": first, "second": second, "child": handle.id}

    @app.workflow()
    async def catches(ctx: geste.WorkflowContext) -> dict[str, Any]:
        try:
            await ctx.run_child(failing, "boom")
        except ChildWorkflowError as exc:
            return {
                "id": exc.child_id,
                "workflow": exc.workflow_name,
                "type": exc.error_type,
                "message": exc.error_message,
                "status": exc.status,
            }
        return {}

    @app.workflow()
    async def propagates(ctx: geste.WorkflowContext) -> int:
        return await ctx.run_child(failing, "deep")

    @app.workflow()
    async def late_wait(ctx: geste.WorkflowContext) -> int:
        handle = await ctx.start_child(child, 5)
        await ctx.wait_event("after-child")  # the child ends meanwhile
        return await handle.result()

    @app.workflow()
    async def leaves(ctx: geste.WorkflowContext, policy: str) -> str:
        handle = await ctx.start_child(waits, parent_close=policy)
        return handle.id

    @app.workflow()
    async def awaits_waiter(ctx: geste.WorkflowContext) -> str:
        return await ctx.run_child(waits)

    @app.workflow()
    async def bad(ctx: geste.WorkflowContext, what: str) -> str:
        try:
            if what == "unknown":
                await ctx.start_child(object(), 1)  # type: ignore[call-overload]
            elif what == "unregistered":
                await ctx.start_child(stranger, 1)
            elif what == "name":
                await ctx.start_child("", 1)
            elif what == "id":
                await ctx.start_child(child, 1, child_id="")
            elif what == "policy":
                await ctx.start_child(child, 1, parent_close="later")
            elif what == "args":
                await ctx.start_child(child, 1, 2)
            elif what == "taken":
                await ctx.start_child(child, 1, child_id="taken")
        except (TypeError, ConfigurationError, UnknownWorkflowError, InstanceAlreadyExistsError) as exc:
            return type(exc).__name__
        return "none"

    return app


async def test_a_parent_starts_children_and_gets_their_results(make_app: MakeApp, db_url: str) -> None:
    app = family(make_app)
    async with app:
        handle = await app.workflows["parent"].start_with_id("p1", 3)
        assert await handle.result(timeout=30) == {"first": 6, "second": 12, "child": "p1:1"}
        history = await handle.history()
        assert [(e.seq, e.kind, e.name) for e in history] == [
            (1, geste.StepKind.START_CHILD, "child"),
            (2, geste.StepKind.CHILD, "p1:1"),
            (3, geste.StepKind.START_CHILD, "child"),
            (4, geste.StepKind.CHILD, "p1-second"),
        ]
        assert history[0].payload == {"child_id": "p1:1", "parent_close": "cancel"}
        assert history[1].payload == {"workflow": "child", "status": "completed", "error": None, "result": 6}
        kid = await app.get_instance("p1:1")
        assert (kid.parent_id, kid.status, kid.result) == ("p1", geste.Status.COMPLETED, 6)
        assert (await app.get_instance("p1")).parent_id is None
        assert [c.instance_id for c in await app.children("p1")] == ["p1:1", "p1-second"]
        rows = await raw_query(db_url, "SELECT count(*) AS n FROM geste_instances WHERE parent_id = $1", "p1")
        assert rows[0]["n"] == 2  # exactly one child per start_child step


async def test_a_childs_failure_is_a_typed_error_in_the_parent(make_app: MakeApp) -> None:
    app = family(make_app)
    async with app:
        caught = await app.workflows["catches"].start_with_id("c1")
        assert await caught.result(timeout=30) == {
            "id": "c1:1",
            "workflow": "failing",
            "type": "builtins.ValueError",
            "message": "boom",
            "status": "failed",
        }
        uncaught = await app.workflows["propagates"].start_with_id("c2")
        with pytest.raises(geste.errors.WorkflowFailed) as failed:
            await uncaught.result(timeout=30)
        assert failed.value.error["type"] == "geste.errors.ChildWorkflowError"
        assert "'failing' ('c2:1') failed: builtins.ValueError: deep" in failed.value.error["message"]
        entries = await uncaught.history()
        assert entries[-1].kind == geste.StepKind.CHILD and entries[-1].is_error


async def test_a_child_that_ended_before_the_wait_gives_its_result_at_once(make_app: MakeApp) -> None:
    app = family(make_app)
    async with app:
        handle = await app.workflows["late_wait"].start_with_id("l1")
        await wait_status(app, "l1:1", geste.Status.COMPLETED, timeout=30)
        await app.send_event("after-child", instance_id="l1")
        assert await handle.result(timeout=30) == 10
        assert [e.kind for e in await handle.history()][-1] == geste.StepKind.CHILD


async def test_bad_calls_raise_typed_errors_at_the_call(make_app: MakeApp) -> None:
    app = family(make_app)
    async with app:
        await app.workflows["child"].start_with_id("taken", 1)
        for what, expected in [
            ("unknown", "TypeError"),
            ("unregistered", "UnknownWorkflowError"),
            ("name", "ConfigurationError"),
            ("id", "ConfigurationError"),
            ("policy", "ConfigurationError"),
            ("args", "SerializationError"),
            ("taken", "InstanceAlreadyExistsError"),
        ]:
            handle = await app.workflows["bad"].start_with_id(f"bad-{what}", what)
            assert await handle.result(timeout=30) == expected, what
        assert (await app.get_instance("taken")).parent_id is None


async def test_a_cancelled_parent_cancels_its_children(make_app: MakeApp) -> None:
    app = family(make_app)
    async with app:
        handle = await app.workflows["awaits_waiter"].start_with_id("cp")
        await wait_status(app, "cp:1", geste.Status.WAITING, timeout=30)
        await wait_status(app, "cp", geste.Status.WAITING, timeout=30)
        await app.cancel("cp")
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=30)
        await wait_status(app, "cp:1", geste.Status.CANCELLED, timeout=30)
        assert [e.kind for e in await app.history("cp")][-1] == geste.StepKind.CANCELLED
        last = (await app.history("cp:1"))[-1]  # the child's history says its parent cancelled it
        assert (last.kind, last.payload) == (geste.StepKind.CANCELLED, {"by_parent": "cp"})
        kid = await app.get_instance("cp:1")
        assert kid.error is not None and kid.error["cancelled_by_parent"] == "cp"
        assert "by its parent cp" in kid.error["message"]


@pytest.mark.parametrize("policy", ["cancel", "abandon", "wait"])
async def test_the_parent_close_policy_applies_at_the_parents_end(make_app: MakeApp, policy: str) -> None:
    app = family(make_app)
    async with app:
        handle = await app.workflows["leaves"].start_with_id("pc", policy)
        if policy != "cancel":  # (a cancelled child may never wait)
            await wait_status(app, "pc:1", geste.Status.WAITING, timeout=30)
        if policy == "wait":
            await wait_status(app, "pc", geste.Status.WAITING, timeout=30)
            assert (await app.get_instance("pc")).status == geste.Status.WAITING
            await app.send_event("go", "now", instance_id="pc:1")
        assert await handle.result(timeout=30) == "pc:1"
        expected = {
            "cancel": geste.Status.CANCELLED,
            "abandon": geste.Status.WAITING,
            "wait": geste.Status.COMPLETED,
        }
        if policy == "cancel":
            await wait_status(app, "pc:1", geste.Status.CANCELLED, timeout=30)
        assert (await app.get_instance("pc:1")).status == expected[policy]


async def test_the_replay_check_replays_child_steps_and_stops_at_a_childs_wait(tmp_path: Any) -> None:
    """A parent waiting for its child, one finished, one whose child failed: all replay ok (with the
    parent's workflow alone, as the check runs each); code that takes another step there diverges."""
    from geste.testing import check_replay

    url = f"sqlite:///{tmp_path / 'replay.db'}"
    app = family(lambda **options: geste.App(url, poll_interval=0.05, **options))
    async with app:
        done = await app.workflows["parent"].start_with_id("r-done", 2)
        await done.result(timeout=30)
        failed = await app.workflows["catches"].start_with_id("r-failed")
        await failed.result(timeout=30)
        await app.workflows["awaits_waiter"].start_with_id("r-waiting")
        await wait_status(app, "r-waiting", geste.Status.WAITING)
        # a parent whose code ends with a ParentClose.WAIT child it never awaited: the engine waits for it
        # there (a `child` row after the code's end), and so must the replay
        kept = await app.workflows["leaves"].start_with_id("r-kept", "wait")
        await wait_status(app, "r-kept:1", geste.Status.WAITING, timeout=30)
        await wait_status(app, "r-kept", geste.Status.WAITING, timeout=30)
        await app.send_event("go", "now", instance_id="r-kept:1")
        assert await kept.result(timeout=30) == "r-kept:1"
    report = await check_replay(app, database_url=url)
    by_id = {r.instance_id: str(r.status) for r in report.results}
    assert {i: by_id[i] for i in ("r-done", "r-failed", "r-waiting", "r-kept")} == {
        "r-done": "ok",
        "r-failed": "ok",
        "r-waiting": "ok",
        "r-kept": "ok",
    }, report.summary()

    changed = geste.App(url)

    @changed.workflow(name="awaits_waiter")
    async def awaits_waiter(ctx: geste.WorkflowContext) -> str:
        await ctx.sleep(1)  # a sleep where a start_child was recorded
        return ""

    report = await check_replay(changed, database_url=url, workflow="awaits_waiter")
    assert [str(r.status) for r in report.results] == ["diverged"], report.summary()


# -- across worker processes ------------------------------------------------------------------------------
workers = worker_processes("child_app")


async def count_children(url: str, parent: str) -> int:
    found = await raw_query(url, "SELECT count(*) AS n FROM geste_instances WHERE parent_id = $1", parent)
    return int(found[0]["n"])


async def test_a_child_on_another_worker_wakes_a_parent_whose_worker_was_killed_mid_wait(
    workers: WorkerProcesses, db_url: str
) -> None:
    """Worker A runs the parent, which waits; its child holds on A. A is killed (SIGKILL) mid-wait; worker
    B takes the child over, ends it, and the parent, woken by that end, completes on B: one child."""
    first = await workers.spawn("A")

    starter = workers.client()
    async with starter:
        handle = await starter.workflows["parent"].start_with_id("xp", 4)
        await wait_status(starter, "xp", geste.Status.WAITING)
        await wait_status(starter, "xp:1", geste.Status.RUNNING)
        first.kill()
        first.wait()
        workers.go("xp:1")
        await workers.spawn("B")
        assert await handle.result(timeout=60) == 8
        assert (workers.markers / "ran-xp:1-B").exists()
        assert not (workers.markers / "ran-xp:1-A").exists()
        assert await count_children(db_url, "xp") == 1
        kinds = [e.kind for e in await handle.history()]
        assert kinds == [geste.StepKind.START_CHILD, geste.StepKind.CHILD]


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_worker_killed_at_the_child_start_leaves_exactly_one_child(
    workers: WorkerProcesses, db_url: str, when: str
) -> None:
    """The parent's worker exits inside start_child's transaction (before it is sent, or once it
    committed); another worker takes the parent over: one child, with the derived id, and the result."""
    starter = workers.client()
    crashing = await workers.spawn("A", crash=when)
    async with starter:
        handle = await starter.workflows["quick_parent"].start_with_id("qp", 1)
        await asyncio.to_thread(crashing.wait, 30)
        assert crashing.returncode == 9
        assert await count_children(db_url, "qp") == (1 if when == "after" else 0)
        await workers.spawn("B")
        assert await handle.result(timeout=60) == 2
        assert await count_children(db_url, "qp") == 1
        assert [c.instance_id for c in await starter.children("qp")] == ["qp:1"]


# -- costs ------------------------------------------------------------------------------------------------
async def test_a_child_round_trip_costs_one_start_one_suspension_and_two_ends(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinned as tests/test_costs.py pins a workflow's commits: the parent's start_child (one statement on
    PostgreSQL), its wait that suspends, the child's end (which wakes the parent in its own statement),
    the parent's wait again, which reads the child by its key and writes nothing, and the parent's end
    with the ``child`` row. No record, no suspend, no poll of the child."""

    names = ("start_child", "take_child_or_suspend", "finish", "record", "suspend")
    counts = count_storage_calls(monkeypatch, names)
    app = family(make_app, lock_timeout=30.0)
    async with app:
        handle = await app.workflows["awaits_waiter"].start_with_id("cost")
        await wait_status(app, "cost:1", geste.Status.WAITING)
        await wait_status(app, "cost", geste.Status.WAITING)
        counts.clear()
        await app.send_event("go", "x", instance_id="cost:1")
        await wait_until(lambda: counts["finish"] == 2, "both ends")
        assert dict(counts) == {"finish": 2}  # the woken wait read the child by its key: no transaction
        assert await handle.result(timeout=30) == "x"
        counts.clear()
        again = await app.workflows["awaits_waiter"].start_with_id("cost-2")
        await wait_status(app, "cost-2", geste.Status.WAITING)
        await wait_status(app, "cost-2:1", geste.Status.WAITING)
        assert (counts["start_child"], counts["take_child_or_suspend"], counts["record"]) == (1, 1, 0)
        await again.cancel()


# -- the link, where operators look -----------------------------------------------------------------------
async def test_geste_show_the_viewer_and_the_api_link_parent_and_children(
    make_app: MakeApp, db_url: str
) -> None:
    import httpx

    from .support import run_cli

    app = family(make_app)
    async with app:
        await (await app.workflows["parent"].start_with_id("v1", 1)).result(timeout=30)
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            parent = (await http.get("/instances/v1")).json()
            assert parent["parent_id"] is None
            assert [(c["instance_id"], c["status"]) for c in parent["children"]] == [
                ("v1:1", "completed"),
                ("v1-second", "completed"),
            ]
            kid = (await http.get("/instances/v1:1")).json()
            assert (kid["parent_id"], kid["children"]) == ("v1", [])
            page = (await http.get("/ui/instances/v1", headers={"accept": "text/html"})).text
            assert "Children · 2" in page and 'href="/ui/instances/v1%3A1"' in page
            assert "starts child" in page and "child ended" in page
            kid_page = (await http.get("/ui/instances/v1:1", headers={"accept": "text/html"})).text
            assert "Parent" in kid_page and 'href="/ui/instances/v1"' in kid_page
    shown = await asyncio.to_thread(run_cli, ["show", "v1", "--database-url", db_url])
    assert shown.exit_code == 0, shown.output
    assert "children:\n  v1:1  child  completed\n  v1-second  child  completed" in shown.output
    assert "started child v1:1 (parent close: cancel" in shown.output
    assert "child child completed → 2" in shown.output
    shown = await asyncio.to_thread(run_cli, ["show", "v1:1", "--database-url", db_url])
    assert "parent     v1 (geste show v1)" in shown.output


async def test_the_children_of_an_instance_are_read_by_the_parent_index(pg_url: str) -> None:
    """Among 20,000 waiting instances of which 40 are children of 2 parents, listing one parent's children
    and cancelling them read its 20 rows by geste_instances_by_parent, not the table (EXPLAIN ANALYZE)."""
    import json as _json

    import asyncpg

    from .support import instances_read, plan_nodes

    app = geste.App(pg_url, run_worker=False)
    async with app:
        storage: Any = app.storage
        schema = storage.schema
        conn = await asyncpg.connect(pg_url.split("?", 1)[0])
        try:
            await conn.execute(
                f"""INSERT INTO "{schema}".geste_instances
                    (instance_id, workflow_name, status, input, created_at, updated_at,
                     parent_id, parent_close)
                SELECT 'i' || n, 'w', 'waiting', '{{}}', n, n,
                       CASE WHEN n % 500 = 0 THEN 'p' || (n % 1000 / 500) END,
                       CASE WHEN n % 500 = 0 THEN 'cancel' END
                FROM generate_series(1, 20000) AS n"""
            )
            await conn.execute(f'ANALYZE "{schema}".geste_instances')
            for name, args in (("list_children", ("p0", 1000)), ("cancel_children", ("p0", 1.0, False))):
                plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {storage._q[name]}", *args)
                nodes = plan_nodes(_json.loads(plan)[0]["Plan"])
                assert "geste_instances_by_parent" in {n.get("Index Name") for n in nodes}, (name, nodes)
                assert instances_read(nodes) <= 20, (name, instances_read(nodes))
        finally:
            await conn.close()


async def test_a_parent_and_its_child_ending_in_one_group_commit_both_end(pg_url: str) -> None:
    """PostgreSQL's finish_batch wakes the parents of the children it ends, but not a parent it ends in
    the same statement: a row updated twice by one statement keeps one of the two updates, which one is
    not said, so the parent's end could be lost (a guard: PostgreSQL kept the end when we tried)."""
    import time as _time

    from geste.storage import postgres as pg
    from geste.storage.base import Commit, Lease, NewInstance

    app = geste.App(pg_url, run_worker=False)
    async with app:
        storage: Any = app.storage
        now = _time.time()
        leases = [Lease("bp", "lease-p"), Lease("bp:1", "lease-c")]
        for lease in leases:
            await storage.create_instance(
                NewInstance(lease.instance_id, "w", '{"args":[],"kwargs":{}}', now),
                lease=lease,
                worker_id="me",
                lock_expires_at=now + 60,
            )
        await raw_query(pg_url, "UPDATE geste_instances SET parent_id = 'bp' WHERE instance_id = 'bp:1'")
        ends = [pg._Finish(Commit(lease, [], now), geste.Status.COMPLETED, "1", None) for lease in leases]
        assert await storage._finish_batch(ends) == [None, None]
        rows = await raw_query(pg_url, "SELECT instance_id, status, lease_id FROM geste_instances ORDER BY 1")
        assert rows == [
            {"instance_id": "bp", "status": "completed", "lease_id": None},
            {"instance_id": "bp:1", "status": "completed", "lease_id": None},
        ]


async def test_a_parents_end_reaches_a_childs_running_activity_at_once_on_postgres(pg_url: str) -> None:
    """A child running a long activity when its parent ends (ParentClose.CANCEL): on PostgreSQL its holder
    is told at once, as for ``app.cancel`` (a ``"cancel": true`` notification routed to it), not at its
    next lease renewal: with 60 s leases (a renewal every 20 s) the child's activity is cancelled and the
    child ends cancelled well before."""
    app = geste.App(pg_url, poll_interval=0.05, lock_timeout=60.0)
    started, cancelled = asyncio.Event(), asyncio.Event()

    @app.activity
    async def long_task(ctx: geste.ActivityContext) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    @app.workflow
    async def busy_child(ctx: geste.WorkflowContext) -> None:
        await long_task(ctx)

    @app.workflow
    async def short_parent(ctx: geste.WorkflowContext) -> str:
        handle = await ctx.start_child(busy_child)
        await ctx.wait_event("end-parent")
        return handle.id

    async with app:
        parent = await short_parent.start_with_id("sp")
        await asyncio.wait_for(started.wait(), 10)
        await app.send_event("end-parent", None, instance_id="sp")
        assert await parent.result(timeout=10) == "sp:1"
        await asyncio.wait_for(cancelled.wait(), 10)  # a renewal would come only after 20 s
        await wait_status(app, "sp:1", geste.Status.CANCELLED, timeout=10)
