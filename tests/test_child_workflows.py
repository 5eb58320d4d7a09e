"""Child workflows (ctx.start_child / run_child): a recorded step that creates the child, a durable wait
for its end woken by that end (NOTIFY on PostgreSQL), typed failures, the parent-close policies, and the
parent/child link, on both backends; across worker processes in tests/test_child_crash.py."""

from __future__ import annotations

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

from .support import raw_query, wait_until

MakeApp = Callable[..., geste.App]


async def wait_status(app: geste.App, instance_id: str, status: geste.Status, timeout: float = 30.0) -> None:
    """Wait until the instance exists with ``status`` (a child is created by its parent's step)."""

    async def reached() -> bool:
        found = await app.list_instances(status=status, limit=1000)
        return any(info.instance_id == instance_id for info in found)

    await wait_until(reached, f"{instance_id} to be {status}", timeout)


def family(make_app: MakeApp, **options: Any) -> geste.App:
    app = make_app(**options)

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
                await ctx.start_child("child", 1)  # type: ignore[arg-type]
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
        assert [e.kind for e in await app.history("cp:1")][-1] == geste.StepKind.CANCELLED


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
