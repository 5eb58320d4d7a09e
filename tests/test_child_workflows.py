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
from geste.testing import check_replay

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
    async def waits_then(ctx: geste.WorkflowContext) -> str:
        event = await ctx.wait_event("go")
        if event.data == "fail":
            raise RuntimeError("the child's own failure")
        return str(event.data)

    @app.activity()
    async def undo(ctx: geste.ActivityContext, what: str) -> str:
        return what

    @app.workflow()
    async def fails_with_a_wait_child(ctx: geste.WorkflowContext) -> None:
        await ctx.start_child(waits_then, parent_close="wait")
        ctx.on_failure(undo, "the parent's work")
        raise ValueError("the parent's own failure")

    @app.workflow()
    async def holds_three(ctx: geste.WorkflowContext) -> list[str]:
        started = [(await ctx.start_child(waits, parent_close=p)).id for p in ("cancel", "wait", "abandon")]
        await ctx.wait_event("never")
        return started

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


@pytest.mark.parametrize("child_workflow", ["one_step", "no_step"])
async def test_a_child_cancelled_before_it_ran_records_its_parent(
    make_app: MakeApp, child_workflow: str
) -> None:
    """A child still pending when its parent's end cancels it (no worker had its workflow yet) never
    runs its code: the first worker that takes it delivers the cancel at its first step, recorded as by
    its parent (the ``cancelled`` row's ``by_parent``, the error's ``cancelled_by_parent``), as for a
    child that ran. A workflow with no step at all too (its code would complete it)."""
    parents = make_app()
    ran: list[str] = []

    @parents.workflow()
    async def leaves_remote(ctx: geste.WorkflowContext, name: str) -> str:
        return (await ctx.start_child(name)).id  # by name: a workflow only the other worker registers

    children = make_app()

    @children.activity()
    async def work(ctx: geste.ActivityContext) -> None:
        ran.append("work")

    @children.workflow()
    async def one_step(ctx: geste.WorkflowContext) -> None:
        ran.append("one_step")
        await work(ctx)

    @children.workflow()
    async def no_step(ctx: geste.WorkflowContext) -> str:
        ran.append("no_step")
        return "completed"

    async with parents:
        handle = await parents.workflows["leaves_remote"].start_with_id("rp", child_workflow)
        assert await handle.result(timeout=30) == "rp:1"

        async def flagged() -> bool:
            return (await parents.get_instance("rp:1")).cancel_requested

        await wait_until(flagged, "the pending child flagged by its parent's end", 30)
        assert (await parents.get_instance("rp:1")).status == geste.Status.PENDING
    async with children:
        await wait_status(children, "rp:1", geste.Status.CANCELLED, timeout=30)
        history = await children.history("rp:1")
        kid = await children.get_instance("rp:1")
        listed = {info.instance_id: info.parent_id for info in await children.list_instances()}
    assert listed == {"rp": None, "rp:1": "rp"}  # the lists read the link too
    assert ran == []  # its code never started
    assert [(e.kind, e.name, e.payload) for e in history] == [
        (geste.StepKind.CANCELLED, "cancelled", {"by_parent": "rp"})
    ]
    assert kid.error is not None and kid.error["cancelled_by_parent"] == "rp"
    assert (
        kid.error["type"] == "geste.errors.WorkflowCancelled" and "by its parent rp" in kid.error["message"]
    )
    report = await check_replay(children, database_url=children.url, workflow=child_workflow)
    assert report.ok and [r.status for r in report.results] == ["ok"], report  # replayed as it ran


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
        # a parent whose code raised with a WAIT child: the wait (then its compensation) after the raise
        failing = await app.workflows["fails_with_a_wait_child"].start_with_id("r-fails")
        await wait_status(app, "r-fails:1", geste.Status.WAITING, timeout=30)
        await wait_status(app, "r-fails", geste.Status.WAITING, timeout=30)
        await app.send_event("go", "now", instance_id="r-fails:1")
        with pytest.raises(geste.errors.WorkflowFailed):
            await failing.result(timeout=30)
    report = await check_replay(app, database_url=url)
    by_id = {r.instance_id: str(r.status) for r in report.results}
    assert {i: by_id[i] for i in ("r-done", "r-failed", "r-waiting", "r-kept", "r-fails")} == {
        "r-done": "ok",
        "r-failed": "ok",
        "r-waiting": "ok",
        "r-kept": "ok",
        "r-fails": "ok",
    }, report.summary()

    changed = geste.App(url)

    @changed.workflow(name="awaits_waiter")
    async def awaits_waiter(ctx: geste.WorkflowContext) -> str:
        await ctx.sleep(1)  # a sleep where a start_child was recorded
        return ""

    report = await check_replay(changed, database_url=url, workflow="awaits_waiter")
    assert [str(r.status) for r in report.results] == ["diverged"], report.summary()


async def settled(app: geste.App, instance_id: str) -> geste.Status:
    """The instance's status once it is neither pending nor running (waiting, or ended)."""
    found: list[geste.Status] = []

    async def done() -> bool:
        status = (await app.get_instance(instance_id)).status
        found[:] = [status]
        return status not in (geste.Status.PENDING, geste.Status.RUNNING)

    await wait_until(done, f"{instance_id} to wait or end")
    return found[0]


@pytest.mark.parametrize("child_ends", ["completed", "failed"])
async def test_a_failing_parent_waits_for_its_wait_children_then_fails_with_its_own_error(
    make_app: MakeApp, child_ends: str
) -> None:
    """ParentClose.WAIT on a failure: the parent's code raised, yet it waits (durably) for its WAIT child
    before its failure and its compensation are recorded; the child's outcome, a failure included, is
    not the parent's: its error is its own."""
    app = family(make_app)
    async with app:
        handle = await app.workflows["fails_with_a_wait_child"].start_with_id("fw")
        await wait_status(app, "fw:1", geste.Status.WAITING)
        assert await settled(app, "fw") == geste.Status.WAITING  # not failed: waiting for its child
        await app.send_event("go", "fail" if child_ends == "failed" else "ok", instance_id="fw:1")
        with pytest.raises(geste.errors.WorkflowFailed) as failed:
            await handle.result(timeout=30)
        assert (failed.value.error["type"], failed.value.error["message"]) == (
            "builtins.ValueError",
            "the parent's own failure",
        )
        assert (await app.get_instance("fw:1")).status == geste.Status(child_ends)
        history = await handle.history()
        assert [(e.kind, e.name) for e in history] == [
            (geste.StepKind.START_CHILD, "waits_then"),
            (geste.StepKind.CHILD, "fw:1"),  # the child's end, then the compensation
            (geste.StepKind.COMPENSATION, "undo"),
        ]
        assert history[1].payload["status"] == child_ends


async def test_a_parent_cancelled_while_it_waits_for_its_wait_children_after_a_failure(
    make_app: MakeApp,
) -> None:
    """A cancel that reaches a failing parent at that wait wins, as at a completion: the parent ends
    cancelled (its compensation runs), and its cancel reaches the WAIT child."""
    app = family(make_app)
    async with app:
        handle = await app.workflows["fails_with_a_wait_child"].start_with_id("fc")
        await wait_status(app, "fc:1", geste.Status.WAITING)
        assert await settled(app, "fc") == geste.Status.WAITING
        await app.cancel("fc")
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=30)
        assert [e.kind for e in await handle.history()] == [
            geste.StepKind.START_CHILD,
            geste.StepKind.CANCELLED,
            geste.StepKind.COMPENSATION,
        ]
        await wait_status(app, "fc:1", geste.Status.CANCELLED)
        kid = await app.get_instance("fc:1")
        assert kid.error is not None and kid.error["cancelled_by_parent"] == "fc"


async def test_a_cancelled_parent_cancels_its_wait_children_too_but_not_the_abandoned(
    make_app: MakeApp, db_url: str
) -> None:
    """A cancel reaches every child but the abandoned ones: the parent's cancellation flags its CANCEL and
    its WAIT children (not awaited: a cancel waits for nothing), in its end's transaction."""
    app = family(make_app)
    async with app:
        handle = await app.workflows["holds_three"].start_with_id("h3")
        for kid in ("h3:1", "h3:2", "h3:3"):
            await wait_status(app, kid, geste.Status.WAITING)
        await wait_status(app, "h3", geste.Status.WAITING)
        await app.cancel("h3")
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=30)
        flags = await raw_query(
            db_url,
            "SELECT instance_id, cancel_requested, parent_close FROM geste_instances "
            "WHERE parent_id = $1 ORDER BY instance_id",
            "h3",
        )
        assert [(r["instance_id"], bool(r["cancel_requested"]), r["parent_close"]) for r in flags] == [
            ("h3:1", True, "cancelled"),
            ("h3:2", True, "cancelled"),  # ParentClose.WAIT: cancelled, not awaited
            ("h3:3", False, "abandon"),
        ]
        for kid in ("h3:1", "h3:2"):
            await wait_status(app, kid, geste.Status.CANCELLED)
            error = (await app.get_instance(kid)).error
            assert error is not None and error["cancelled_by_parent"] == "h3", kid
        assert (await app.get_instance("h3:3")).status == geste.Status.WAITING


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


@pytest.mark.parametrize("end", ["completed", "cancelled"])
async def test_a_parents_end_cancels_its_children_in_its_own_transaction_even_if_its_worker_dies_then(
    workers: WorkerProcesses, db_url: str, end: str
) -> None:
    """The parent-close policies commit with the parent's end, not after it: worker A exits (os._exit)
    right after the parent's end committed, and its children are flagged already (CANCEL ones on a
    completion, CANCEL and WAIT ones on a cancellation; never the abandoned one). Worker B then runs them:
    they end cancelled, by their parent."""
    from tests.apps.child_app import build_app

    dying = await workers.spawn("A", die_after_end="ce")
    starter = build_app(db_url, markers=str(workers.markers), run_worker=False)
    policies = ["cancel", "abandon"] + (["wait"] if end == "cancelled" else [])
    async with starter:
        handle = await starter.workflows["closer"].start_with_id("ce", policies, end == "cancelled")
        if end == "cancelled":
            await wait_status(starter, "ce", geste.Status.WAITING)  # its children started
            await starter.cancel("ce")
        await asyncio.to_thread(dying.wait, 30)
        assert dying.returncode == 9
        assert (await starter.get_instance("ce")).status == geste.Status(end)
        flags = await raw_query(
            db_url,
            "SELECT instance_id, cancel_requested, parent_close FROM geste_instances "
            "WHERE parent_id = $1 ORDER BY instance_id",
            "ce",
        )
        expected = [("ce:1", True, "cancelled"), ("ce:2", False, "abandon")]
        if end == "cancelled":
            expected.append(("ce:3", True, "cancelled"))
        assert [(r["instance_id"], bool(r["cancel_requested"]), r["parent_close"]) for r in flags] == expected
        await workers.spawn("B")
        for kid, flagged in [(kid, flagged) for kid, flagged, _ in expected]:
            if flagged:
                await wait_status(starter, kid, geste.Status.CANCELLED, timeout=60)
                error = (await starter.get_instance(kid)).error
                assert error is not None and error["cancelled_by_parent"] == "ce"
        if end == "completed":
            assert await handle.result(timeout=10) == ["ce:1", "ce:2"]


# -- costs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [None, 0], ids=["cached", "replayed"])
async def test_a_child_round_trip_costs_one_start_one_suspension_and_two_ends(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch, cache: int | None
) -> None:
    """Pinned as tests/test_costs.py pins a workflow's commits: the parent's start_child (one statement on
    PostgreSQL), its wait that suspends, the child's end (which wakes the parent in its own statement),
    the parent's wait again, which writes nothing, and the parent's end with the ``child`` row. No
    record, no suspend, no poll of the child. The woken wait reads nothing on PostgreSQL: the claim that
    woke the parent returned the child's end (schema 21, ``awaits``); on SQLite it reads the child by its
    key (an in-process read). The same whether the parent's run was kept in memory at its wait (the
    workflow cache) or replays from its history."""

    names = ("start_child", "take_child_or_suspend", "finish", "record", "suspend", "get_instance")
    counts = count_storage_calls(monkeypatch, names)
    app = family(make_app, lock_timeout=30.0, workflow_cache_size=cache)
    async with app:
        handle = await app.workflows["awaits_waiter"].start_with_id("cost")
        await wait_status(app, "cost:1", geste.Status.WAITING)
        await wait_status(app, "cost", geste.Status.WAITING)
        counts.clear()
        await app.send_event("go", "x", instance_id="cost:1")
        await wait_until(lambda: counts["finish"] == 2, "both ends")
        reads = 2 if app.url.startswith("sqlite") else 1  # send_event's check that "cost:1" exists, and
        assert dict(counts) == {"finish": 2, "get_instance": reads}  # on SQLite the woken wait's read
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
    reads its 20 rows by geste_instances_by_parent, not the table (EXPLAIN ANALYZE)."""
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
            plan = await conn.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {storage._q['list_children']}", "p0", 1000
            )
            nodes = plan_nodes(_json.loads(plan)[0]["Plan"])
            assert "geste_instances_by_parent" in {n.get("Index Name") for n in nodes}, nodes
            assert instances_read(nodes) <= 20, instances_read(nodes)
        finally:
            await conn.close()


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_an_end_probes_only_the_children_it_cancels_on_postgres(
    pg_url: str, plan_cache_mode: str
) -> None:
    """EXPLAIN ANALYZE of ``finish`` and ``finish_batch`` among 20,000 instances, with the custom plan and
    the generic one asyncpg switches to: with no child to cancel, the gate (an empty array) is a one-time
    filter and the end reads its own row alone (each batched end its own row, locked then updated); with
    20 children to cancel, it reads those 20 (locked with the parent by their key, in instance_id order,
    then flagged: by key or by the parent's range of geste_instances_by_parent), never the table."""
    import json as _json

    import asyncpg

    from .support import instances_read, plan_nodes

    app = geste.App(pg_url, run_worker=False)
    async with app:
        storage: Any = app.storage
        conn = await asyncpg.connect(pg_url.split("?", 1)[0])
        try:
            await conn.execute(
                f"""INSERT INTO "{storage.schema}".geste_instances
                    (instance_id, workflow_name, status, input, created_at, updated_at, lease_id,
                     parent_id, parent_close)
                SELECT CASE WHEN n <= 20 THEN 'fp:' || n WHEN n <= 22 THEN 'fp' || n ELSE 'i' || n END,
                       'w', CASE WHEN n BETWEEN 21 AND 22 THEN 'running' ELSE 'waiting' END, '{{}}', n, n,
                       CASE WHEN n BETWEEN 21 AND 22 THEN 'lease' END,
                       CASE WHEN n <= 20 THEN 'fp21' END, CASE WHEN n <= 20 THEN 'cancel' END
                FROM generate_series(1, 20000) AS n"""
            )
            await conn.execute(f'ANALYZE "{storage.schema}".geste_instances')
            await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            kids = "ARRAY[" + ", ".join(f"'fp:{n}'" for n in range(1, 21)) + "]"
            empty = "'{}'"
            one = "'fp21', 'lease', 'completed', NULL, NULL, 1.0, " + ", ".join([empty] * 6) + ", false, "
            batch = (
                "ARRAY['fp21', 'fp22'], ARRAY['lease', 'lease'], ARRAY['completed', 'completed'], "
                "ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::text[], ARRAY[1.0, 1.0], ARRAY[0, 0], "
                + ", ".join([empty] * 7)
                + ", false, "
            )
            for name, call, most in (
                ("finish", one + empty, 1),
                ("finish", one + kids, 1 + 21 + 20),
                ("finish_batch", batch + empty, 2 + 2),
                ("finish_batch", batch + kids, 2 + 20 + 2 + 2 * 20),
            ):
                transaction = conn.transaction()
                await transaction.start()
                try:
                    await conn.execute(f"PREPARE end_under_test AS {storage._q[name]}")
                    found = await conn.fetchval(
                        f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE end_under_test({call})"
                    )
                finally:
                    await transaction.rollback()
                    await conn.execute("DEALLOCATE end_under_test")
                nodes = plan_nodes(_json.loads(found)[0]["Plan"])
                on_table = [n for n in nodes if n.get("Relation Name") == "geste_instances"]
                shown = (
                    name,
                    call[-12:],
                    [(n["Node Type"], n.get("Index Name"), instances_read([n])) for n in on_table],
                )
                assert not any(n["Node Type"] == "Seq Scan" for n in on_table), shown
                assert instances_read(nodes) <= most, (instances_read(nodes), shown)
                if call.endswith(empty):
                    assert any("One-Time Filter" in n for n in nodes), shown
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


async def test_a_group_commit_of_ends_cancels_the_children_of_the_parents_it_ends(pg_url: str) -> None:
    """PostgreSQL's finish_batch flags the children each end cancels in its one statement (one counted:
    not split into ends alone), where that end's lease held; a child ending in the same batch is left to
    its own end (one statement must not update a row twice)."""
    import time as _time

    from geste.storage import postgres as pg
    from geste.storage.base import Commit, Lease, LeaseLost, NewInstance

    app = geste.App(pg_url, run_worker=False)
    async with app:
        storage: Any = app.storage
        now = _time.time()
        held = [Lease("gp", "lease-p"), Lease("gp:2", "lease-c"), Lease("gx", "lease-x")]
        for lease in held:
            await storage.create_instance(
                NewInstance(lease.instance_id, "w", '{"args":[],"kwargs":{}}', now),
                lease=lease,
                worker_id="me",
                lock_expires_at=now + 60,
            )
        for free in ("gp:1", "gx:1"):
            await storage.create_instance(
                NewInstance(free, "w", '{"args":[],"kwargs":{}}', now),
                lease=None,
                worker_id=None,
                lock_expires_at=None,
            )
        await raw_query(
            pg_url,
            "UPDATE geste_instances SET parent_id = split_part(instance_id, ':', 1), parent_close = 'cancel' "
            "WHERE instance_id LIKE '%:%'",
        )
        ends = [
            pg._Finish(Commit(held[0], [], now), geste.Status.COMPLETED, "1", None, ("gp:1", "gp:2")),
            pg._Finish(Commit(held[1], [], now), geste.Status.COMPLETED, "2", None),
            pg._Finish(Commit(Lease("gx", "stale"), [], now), geste.Status.FAILED, None, "{}", ("gx:1",)),
        ]
        before = storage.step_commits
        outcomes = await storage._finish_batch(ends)
        assert storage.step_commits == before + 1
        assert outcomes[:2] == [None, None] and isinstance(outcomes[2], LeaseLost)
        rows = await raw_query(
            pg_url,
            "SELECT instance_id, status, cancel_requested, parent_close FROM geste_instances ORDER BY 1",
        )
        assert [(r["instance_id"], r["status"], r["cancel_requested"], r["parent_close"]) for r in rows] == [
            ("gp", "completed", False, None),
            ("gp:1", "pending", True, "cancelled"),
            ("gp:2", "completed", False, "cancel"),
            ("gx", "running", False, None),
            ("gx:1", "pending", False, "cancel"),
        ]


async def test_an_end_aborted_to_break_a_deadlock_with_its_childs_end_is_written_again(pg_url: str) -> None:
    """The one lock order left that can deadlock (docs/design.md, "Parent close"): a child's end holds
    the child's row and then updates its parent's (the wake-up), while the parent's end, which cancels
    that child, holds the parent's row (its id sorts first) and waits for the child's. PostgreSQL aborts
    the parent's end (it waited first; the child's side waits 20 s before it looks); the storage writes
    it again at once, and it goes through once the child's transaction has committed."""
    import time as _time

    import asyncpg

    from geste.storage.base import Commit, Lease, NewInstance

    app = geste.App(pg_url, run_worker=False)
    async with app:
        storage: Any = app.storage
        now = _time.time()
        lease = Lease("dp", "lease-p")
        await storage.create_instance(
            NewInstance("dp", "w", '{"args":[],"kwargs":{}}', now),
            lease=lease,
            worker_id="me",
            lock_expires_at=now + 60,
        )
        await storage.create_instance(
            NewInstance("dp:1", "w", '{"args":[],"kwargs":{}}', now),
            lease=None,
            worker_id=None,
            lock_expires_at=None,
        )
        await raw_query(
            pg_url,
            "UPDATE geste_instances SET parent_id = 'dp', parent_close = 'cancel' WHERE instance_id = 'dp:1'",
        )
        child_side = await asyncpg.connect(
            pg_url.split("?", 1)[0], server_settings={"search_path": storage.schema}
        )
        try:
            await child_side.execute("SET deadlock_timeout = '20s'")
            transaction = child_side.transaction()
            await transaction.start()
            await child_side.execute(
                "UPDATE geste_instances SET updated_at = updated_at WHERE instance_id = 'dp:1'"
            )
            ending = asyncio.create_task(
                storage.finish(
                    Commit(lease, [], now),
                    status=geste.Status.COMPLETED,
                    result="1",
                    cancel_children=["dp:1"],
                )
            )

            async def blocked() -> bool:
                found = await raw_query(
                    pg_url,
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE $1",
                    f'%"{storage.schema}".geste_instances%closing%',
                )
                return int(found[0]["n"]) > 0

            await wait_until(blocked, "the parent's end to wait for the child's row")
            # the child's end wakes its parent: it waits for the parent's row, held by the parent's end
            await child_side.execute("UPDATE geste_instances SET run_at = run_at WHERE instance_id = 'dp'")
            await transaction.commit()
            await asyncio.wait_for(ending, 30)
        finally:
            await child_side.close()
        rows = await raw_query(
            pg_url, "SELECT instance_id, status, cancel_requested FROM geste_instances ORDER BY 1"
        )
        assert [(r["instance_id"], r["status"], r["cancel_requested"]) for r in rows] == [
            ("dp", "completed", False),
            ("dp:1", "pending", True),
        ]


@pytest.mark.parametrize("child_end", ["before", "after"])
async def test_a_childs_end_racing_its_parents_suspension_is_never_missed(
    pg_url: str, child_end: str
) -> None:
    """The suspension at a child wait is one statement (schema 21): it locks the parent's row, then reads
    the child in a fresh snapshot. A child's end holds the parent's row (its wake-up of the parent)
    while the suspension waits for that row: "before", the end commits and the suspension, which began
    before that commit, must still see the child ended (a read in the statement's own snapshot would not,
    and would suspend a parent that nothing wakes: the end saw it held). "after": the end reaches the
    parent's row once the suspension has committed, and finds it waiting and free, so it wakes it."""
    import time as _time

    import asyncpg

    from geste.storage.base import ChildState, Commit, Lease, NewInstance, Suspension

    app = geste.App(pg_url, run_worker=False)
    async with app:
        storage: Any = app.storage
        now = _time.time()
        lease = Lease("rp", "lease-rp")
        await storage.create_instance(
            NewInstance("rp", "w", '{"args":[],"kwargs":{}}', now),
            lease=lease,
            worker_id="me",
            lock_expires_at=now + 60,
        )
        child_lease = Lease("rp:1", "lease-rp:1")
        await storage.create_instance(
            NewInstance("rp:1", "w", '{"args":[],"kwargs":{}}', now),
            lease=child_lease,
            worker_id="other",
            lock_expires_at=now + 60,
        )
        await raw_query(pg_url, "UPDATE geste_instances SET parent_id = 'rp' WHERE instance_id = 'rp:1'")
        child_side = await asyncpg.connect(
            pg_url.split("?", 1)[0], server_settings={"search_path": storage.schema}
        )
        try:
            if child_end == "before":
                transaction = child_side.transaction()
                await transaction.start()
                await child_side.execute(
                    "UPDATE geste_instances SET status = 'completed', result = '7' WHERE instance_id = 'rp:1'"
                )
                await child_side.execute(
                    "UPDATE geste_instances SET run_at = run_at WHERE instance_id = 'rp'"
                )
                suspending = asyncio.create_task(
                    storage.take_child_or_suspend(Commit(lease, [], now), "rp:1")
                )

                async def blocked() -> bool:
                    found = await raw_query(
                        pg_url,
                        "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE $1",
                        f'%"{storage.schema}".geste_child_now%',
                    )
                    return int(found[0]["n"]) > 0

                await wait_until(blocked, "the suspension to wait for the parent's row")
                await transaction.commit()
                outcome = await asyncio.wait_for(suspending, 30)
                assert isinstance(outcome, ChildState)
                assert (outcome.status, outcome.result) == (geste.Status.COMPLETED, "7")
                rows = await raw_query(
                    pg_url, "SELECT status, lease_id FROM geste_instances WHERE instance_id = 'rp'"
                )
                assert (rows[0]["status"], rows[0]["lease_id"]) == ("running", "lease-rp")  # nothing written
            else:
                outcome = await storage.take_child_or_suspend(Commit(lease, [], now), "rp:1")
                assert outcome is Suspension.SUSPENDED
                await storage.finish(Commit(child_lease, [], now), status=geste.Status.COMPLETED, result="7")
                rows = await raw_query(
                    pg_url,
                    "SELECT status, awaits, run_at IS NOT NULL AS due FROM geste_instances"
                    " WHERE instance_id = 'rp'",
                )
                assert (rows[0]["status"], rows[0]["awaits"], rows[0]["due"]) == ("waiting", "rp:1", True)
                # the claim that takes the woken parent returns its child's end: nothing to read
                claims = await storage.claim_ids("me", now + 1, now + 61, ["rp"], workflows=["w"])
                assert [c.awaited for c in claims] == [
                    ("rp:1", ChildState("w", geste.Status.COMPLETED, "7", None, "rp"))
                ]
        finally:
            await child_side.close()


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


async def test_a_cancel_flagged_before_a_child_start_commits_is_delivered_at_the_next_step(
    make_app: MakeApp, db_url: str
) -> None:
    """The child start's commit says, as every commit does, whether a cancel of the parent was requested:
    a cancel flagged while the parent ran, its notice lost (written straight into the row; 60 s leases,
    no renewal to tell it), is delivered at the step after the start, so the activity there never runs."""
    app = make_app(lock_timeout=60.0)
    ran: list[str] = []

    @app.activity
    async def flag_own(ctx: geste.ActivityContext, instance_id: str) -> None:
        query = "UPDATE geste_instances SET cancel_requested = true WHERE instance_id = $1"
        await raw_query(db_url, query, instance_id)

    @app.activity
    async def after(ctx: geste.ActivityContext) -> None:
        ran.append("after")

    @app.workflow
    async def kid(ctx: geste.WorkflowContext) -> None:
        await ctx.wait_event("never")

    @app.workflow
    async def starter(ctx: geste.WorkflowContext) -> None:
        await flag_own(ctx, ctx.instance_id)  # its row is buffered: the child's start commits it
        await ctx.start_child(kid)
        await after(ctx)

    async with app:
        handle = await starter.start_with_id("cs")
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=30)
        kinds = [e.kind for e in await app.history("cs")]
    assert ran == []
    assert kinds[-2:] == [geste.StepKind.START_CHILD, geste.StepKind.CANCELLED]


async def test_an_activity_cancelling_its_own_instance_ends_it_at_the_next_step(make_app: MakeApp) -> None:
    """``app.cancel`` of its own instance from inside an activity (run by this worker: the cancel goes to
    the run at once): the activity's result is recorded and the cancel is delivered at the next step (or
    the cancel's notice, on PostgreSQL, cancels the call still in flight). Before, the task's cancel of
    itself was thrown at the run's next await, after the attempt had returned, and the run stopped with
    its lease held (60 s here)."""
    app = make_app(lock_timeout=60.0)
    ran: list[str] = []

    @app.activity
    async def cancel_own(ctx: geste.ActivityContext, instance_id: str) -> str:
        await app.cancel(instance_id)
        return "asked"

    @app.activity
    async def after(ctx: geste.ActivityContext) -> None:
        ran.append("after")

    @app.workflow
    async def self_cancelling(ctx: geste.WorkflowContext) -> None:
        await cancel_own(ctx, ctx.instance_id)
        await after(ctx)

    async with app:
        handle = await self_cancelling.start_with_id("sc")
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=30)
        history = await app.history("sc")
    assert ran == []
    first = history[0]
    assert (first.kind, first.name) == (geste.StepKind.ACTIVITY, "cancel_own")
    if first.is_error:  # on PostgreSQL the cancel's notice may come back while the call still awaits
        assert first.payload is not None and first.payload["error"]["type"].endswith("ActivityCancelled")
        assert len(history) == 1  # the cancel delivered at that step
    else:  # the attempt returned: its result recorded, the cancel delivered at the next step
        assert first.payload is not None and first.payload["result"] == "asked"
        assert [e.kind for e in history[1:]] == [geste.StepKind.CANCELLED]


async def test_a_child_started_with_options_has_a_deadline_of_its_own(make_app: MakeApp) -> None:
    """``ctx.start_child(workflow.options(timeout=...))``: the child's deadline counts from the start
    step's time; when it passes the child is cancelled with ``WorkflowTimeout`` (not blamed on its
    parent), and the parent's wait raises ``ChildWorkflowError`` carrying that error."""
    app = make_app()

    @app.workflow
    async def slow_child(ctx: geste.WorkflowContext) -> str:
        await ctx.wait_event("never-sent")
        return "done"

    @app.workflow
    async def impatient(ctx: geste.WorkflowContext) -> dict[str, Any]:
        try:
            await ctx.run_child(slow_child.options(timeout=0.5))
        except ChildWorkflowError as exc:
            return {"status": str(exc.status), "error": (exc.error or {}).get("type")}
        return {"status": "completed"}

    async with app:
        handle = await impatient.start_with_id("dl")
        assert await handle.result(timeout=30) == {
            "status": "cancelled",
            "error": "geste.errors.WorkflowTimeout",
        }
        child = await app.get_instance("dl:1")
        start = next(e for e in await app.history("dl") if e.kind == geste.StepKind.START_CHILD)
    assert child.deadline is not None
    assert child.deadline.timestamp() == pytest.approx(start.created_at.timestamp() + 0.5, abs=0.01)
    assert child.error is not None and "cancelled_by_parent" not in child.error
    assert child.status == geste.Status.CANCELLED
