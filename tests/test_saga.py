"""Saga compensations: ``ctx.on_failure(activity, *args)`` run newest first when the workflow fails or is
cancelled, each recorded as a ``compensation`` step and retried by its own policy."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

import geste
from geste.errors import WorkflowCancelled, WorkflowFailed

from .support import wait_status

MakeApp = Callable[..., geste.App]


class OutOfStock(Exception):
    pass


class RefundRejected(Exception):
    pass


def steps(history: list[geste.HistoryEntry]) -> list[tuple[str, str]]:
    return [(str(e.kind), e.name) for e in history]


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_compensations_run_newest_first_when_the_workflow_fails(make_app: MakeApp) -> None:
    undone: list[str] = []
    app = make_app()

    @app.activity
    async def do(ctx: geste.ActivityContext, what: str) -> str:
        return f"did {what}"

    @app.activity
    async def undo(ctx: geste.ActivityContext, what: str) -> None:
        assert ctx.is_compensation
        undone.append(what)

    @app.activity(retry=geste.RetryPolicy(max_attempts=1))
    async def reserve(ctx: geste.ActivityContext) -> None:
        raise OutOfStock("no stock left")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        for what in ("flight", "hotel", "car"):
            await do(ctx, what)
            ctx.on_failure(undo, what)
        await reserve(ctx)

    async with app:
        handle = await flow.start()
        with pytest.raises(WorkflowFailed) as failed:
            await handle.result(timeout=10)
        info = await handle.info()
        history = await handle.history()

    assert undone == ["car", "hotel", "flight"]
    assert info.status == geste.Status.FAILED
    assert failed.value.error["type"] == f"{__name__}.OutOfStock"
    assert "compensation_errors" not in failed.value.error
    assert steps(history) == [
        ("activity", "do"),
        ("activity", "do"),
        ("activity", "do"),
        ("activity", "reserve"),
        ("compensation", "undo"),
        ("compensation", "undo"),
        ("compensation", "undo"),
    ]
    compensations = [e for e in history if e.kind == geste.StepKind.COMPENSATION]
    assert [e.payload["input"]["args"] for e in compensations] == [["car"], ["hotel"], ["flight"]]
    assert not any(e.is_error for e in compensations)


async def test_compensations_do_not_run_when_the_workflow_succeeds(make_app: MakeApp) -> None:
    undone: list[str] = []
    app = make_app()

    @app.activity
    async def undo(ctx: geste.ActivityContext, what: str) -> None:
        undone.append(what)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        ctx.on_failure(undo, "everything")
        return "fine"

    async with app:
        handle = await flow.start()
        assert await handle.result(timeout=10) == "fine"
        assert await handle.history() == []
    assert undone == []


async def test_each_compensation_is_retried_by_its_own_policy(make_app: MakeApp) -> None:
    attempts: dict[str, list[int]] = {"patient": [], "impatient": []}
    app = make_app()

    @app.activity(retry=geste.RetryPolicy(max_attempts=4, initial_interval=0.01))
    async def patient(ctx: geste.ActivityContext) -> None:
        attempts["patient"].append(ctx.attempt)
        if ctx.attempt < 3:
            raise RefundRejected("try later")

    @app.activity(retry=geste.RetryPolicy(max_attempts=2, initial_interval=0.01))
    async def impatient(ctx: geste.ActivityContext) -> None:
        attempts["impatient"].append(ctx.attempt)
        if ctx.attempt < 2:
            raise RefundRejected("try later")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        ctx.on_failure(patient)
        ctx.on_failure(impatient)
        raise OutOfStock("fail")

    async with app:
        handle = await flow.start()
        with pytest.raises(WorkflowFailed) as failed:
            await handle.result(timeout=10)
        history = await handle.history()

    assert attempts == {"patient": [1, 2, 3], "impatient": [1, 2]}
    assert steps(history) == [("compensation", "impatient"), ("compensation", "patient")]
    assert [e.payload["attempts"] for e in history] == [2, 3]
    assert "compensation_errors" not in failed.value.error


async def test_a_compensation_that_keeps_failing_is_recorded_and_the_others_still_run(
    make_app: MakeApp,
) -> None:
    undone: list[str] = []
    attempts: list[int] = []
    app = make_app()

    @app.activity
    async def undo(ctx: geste.ActivityContext, what: str) -> None:
        undone.append(what)

    @app.activity(retry=geste.RetryPolicy(max_attempts=3, initial_interval=0.01))
    async def refund(ctx: geste.ActivityContext, amount: int) -> None:
        attempts.append(ctx.attempt)
        raise RefundRejected(f"refund of {amount} rejected")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        ctx.on_failure(undo, "first")
        ctx.on_failure(refund, 30)
        ctx.on_failure(undo, "last")
        raise OutOfStock("nothing left")

    async with app:
        handle = await flow.start()
        with pytest.raises(WorkflowFailed) as failed:
            await handle.result(timeout=10)
        info = await handle.info()
        history = await handle.history()

    assert undone == ["last", "first"]
    assert attempts == [1, 2, 3]
    assert info.status == geste.Status.FAILED
    assert steps(history) == [("compensation", "undo"), ("compensation", "refund"), ("compensation", "undo")]
    assert [e.is_error for e in history] == [False, True, False]
    assert history[1].payload["attempts"] == 3
    assert history[1].payload["error"]["type"] == f"{__name__}.RefundRejected"
    error = failed.value.error
    assert error["type"] == f"{__name__}.OutOfStock"
    assert error["message"] == "nothing left"
    (comp_error,) = error["compensation_errors"]
    assert comp_error["activity"] == "refund"
    assert comp_error["type"] == f"{__name__}.RefundRejected"
    assert comp_error["message"] == "refund of 30 rejected"


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_cancelling_a_waiting_workflow_runs_its_compensations(make_app: MakeApp) -> None:
    undone: list[str] = []
    after_wait: list[str] = []
    app = make_app()

    @app.activity
    async def book(ctx: geste.ActivityContext, what: str) -> None:
        return None

    @app.activity
    async def unbook(ctx: geste.ActivityContext, what: str) -> None:
        undone.append(what)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        for what in ("seat", "meal"):
            await book(ctx, what)
            ctx.on_failure(unbook, what)
        await ctx.wait_event("payment")
        after_wait.append("ran on")
        return "booked"

    async with app:
        handle = await flow.start_with_id("trip-1")
        await wait_status(app, "trip-1", geste.Status.WAITING)
        cancelled = await app.cancel("trip-1")
        assert cancelled.cancel_requested
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=10)
        info = await handle.info()
        history = await handle.history()

    assert undone == ["meal", "seat"]
    assert after_wait == []
    assert info.status == geste.Status.CANCELLED
    assert steps(history) == [
        ("activity", "book"),
        ("activity", "book"),
        ("wait_event", "payment"),
        ("cancelled", "cancelled"),
        ("compensation", "unbook"),
        ("compensation", "unbook"),
    ]


async def test_compensations_registered_before_a_restart_run_on_cancellation(make_app: MakeApp) -> None:
    """The compensation list is rebuilt by replay: a new App knows what the first one registered."""
    undone: list[str] = []
    booked: list[str] = []

    def register(app: geste.App) -> None:
        @app.activity
        async def book(ctx: geste.ActivityContext, what: str) -> str:
            booked.append(what)
            return f"{what}-ref"

        @app.activity
        async def unbook(ctx: geste.ActivityContext, ref: str) -> None:
            undone.append(ref)

        @app.workflow
        async def flow(ctx: geste.WorkflowContext) -> None:
            ref = await book(ctx, "room")
            ctx.on_failure(unbook, ref)
            await ctx.sleep(3600)

    first_app = make_app()
    register(first_app)
    async with first_app:
        await first_app.start_workflow("flow", instance_id="stay-1")
        await wait_status(first_app, "stay-1", geste.Status.WAITING)

    second_app = make_app()
    register(second_app)
    async with second_app:
        await second_app.cancel("stay-1")
        with pytest.raises(WorkflowCancelled):
            await second_app.get_handle("stay-1").result(timeout=10)
        history = await second_app.history("stay-1")

    assert booked == ["room"]
    assert undone == ["room-ref"]
    assert steps(history) == [
        ("activity", "book"),
        ("sleep", "sleep"),
        ("cancelled", "cancelled"),
        ("compensation", "unbook"),
    ]


async def test_on_failure_takes_a_registered_activity_with_fitting_arguments(make_app: MakeApp) -> None:
    app = make_app()

    @app.activity
    async def undo(ctx: geste.ActivityContext, what: str) -> None:
        return None

    async def not_an_activity(ctx: geste.ActivityContext) -> None:
        return None

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> list[str]:
        errors = []
        for call in (
            lambda: ctx.on_failure(not_an_activity),  # type: ignore[arg-type]
            lambda: ctx.on_failure(undo),
            lambda: ctx.on_failure(undo, object()),
        ):
            try:
                call()
            except Exception as exc:
                errors.append(type(exc).__name__)
        return errors

    async with app:
        result = await (await flow.start()).result(timeout=10)
    assert result == ["TypeError", "SerializationError", "SerializationError"]


async def test_the_status_is_compensating_while_compensations_run(make_app: MakeApp) -> None:
    """Regression: the status stayed "running" until the first compensation had finished."""
    entered, opened = asyncio.Event(), asyncio.Event()
    app = make_app()

    @app.activity
    async def undo(ctx: geste.ActivityContext) -> None:
        entered.set()
        await opened.wait()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        ctx.on_failure(undo)
        raise OutOfStock("gone")

    async with app:
        handle = await flow.start()
        await asyncio.wait_for(entered.wait(), 10)
        assert await handle.status() == geste.Status.COMPENSATING
        opened.set()
        with pytest.raises(WorkflowFailed):
            await handle.result(timeout=10)
        assert await handle.status() == geste.Status.FAILED


async def test_cancelling_a_workflow_inside_an_activity_cancels_the_activity(make_app: MakeApp) -> None:
    """The cancel reaches the running activity (issue 18): its task is cancelled, its outcome recorded as
    ``ActivityCancelled``, no later step runs and the compensations do (tests/test_cancel_running.py)."""
    entered, opened = asyncio.Event(), asyncio.Event()
    done: list[str] = []
    undone: list[str] = []
    app = make_app()

    @app.activity
    async def gate(ctx: geste.ActivityContext) -> str:
        entered.set()
        await opened.wait()
        return "through"

    @app.activity
    async def step(ctx: geste.ActivityContext, what: str) -> None:
        done.append(what)

    @app.activity
    async def undo(ctx: geste.ActivityContext, what: str) -> None:
        undone.append(what)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        ctx.on_failure(undo, "gate")
        await gate(ctx)
        await step(ctx, "after the gate")

    async with app:
        handle = await flow.start()
        await asyncio.wait_for(entered.wait(), 10)
        info = await app.cancel(handle.instance_id)
        assert info.status == geste.Status.RUNNING and info.cancel_requested
        opened.set()
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=10)
        history = await handle.history()

    assert done == []
    assert undone == ["gate"]
    assert steps(history) == [("activity", "gate"), ("compensation", "undo")]
    assert history[0].payload["error"]["type"] == "geste.errors.ActivityCancelled"
