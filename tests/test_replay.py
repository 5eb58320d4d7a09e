"""Journal and replay: a resumed instance replays its recorded steps instead of running them again.

Each test runs an instance on one App until it waits, closes that App, and resumes the instance with a
new App object on the same database file, with the same (or, for divergence, changed) registrations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

import geste
from geste.errors import ActivityError, NonDeterminismError, WorkflowFailed

from .support import wait_status

MakeApp = Callable[..., geste.App]


class PaymentDeclined(Exception):
    """Defined at module level, so a recorded error of this type is rebuilt as this type."""


def history_rows(entries: list[geste.HistoryEntry]) -> list[tuple[int, str, str, Any, bool]]:
    return [(e.seq, str(e.kind), e.name, e.payload, e.is_error) for e in entries]


async def test_resumed_instance_replays_recorded_activities_without_running_them(make_app: MakeApp) -> None:
    calls: list[tuple[int, int]] = []

    def register(app: geste.App) -> None:
        @app.activity
        async def add(ctx: geste.ActivityContext, a: int, b: int) -> int:
            calls.append((a, b))
            return a + b

        @app.workflow
        async def flow(ctx: geste.WorkflowContext, x: int) -> list[int]:
            first = await add(ctx, x, 1)
            second = await add(ctx, first, 10)
            event = await ctx.wait_event("go")
            third = await add(ctx, second, event.data["n"])
            return [first, second, third]

    first_app = make_app()
    register(first_app)
    async with first_app:
        await first_app.start_workflow("flow", 1, instance_id="resume-1")
        await wait_status(first_app, "resume-1", geste.Status.WAITING)
    assert calls == [(1, 1), (2, 10)]

    second_app = make_app()
    register(second_app)
    async with second_app:
        await second_app.send_event("go", {"n": 100})
        handle = second_app.get_handle("resume-1")
        assert await handle.result(timeout=10) == [2, 12, 112]
        history = await handle.history()

    assert calls == [(1, 1), (2, 10), (12, 100)]
    assert [(e.seq, str(e.kind), e.name) for e in history] == [
        (1, "activity", "add"),
        (2, "activity", "add"),
        (3, "wait_event", "go"),
        (4, "event", "go"),
        (5, "activity", "add"),
    ]
    assert [e.payload["result"] for e in history if e.kind == geste.StepKind.ACTIVITY] == [2, 12, 112]


async def test_recorded_errors_are_raised_again_on_replay(make_app: MakeApp) -> None:
    class LocalError(Exception):
        """Defined inside a function: not importable, so it comes back as ActivityError."""

    calls: list[str] = []
    seen: list[dict[str, Any]] = []

    def register(app: geste.App) -> None:
        @app.activity(retry=geste.RetryPolicy(max_attempts=1))
        async def pay(ctx: geste.ActivityContext, amount: int) -> None:
            calls.append("pay")
            raise PaymentDeclined(f"card declined for {amount}")

        @app.activity(retry=geste.RetryPolicy(max_attempts=1))
        async def ship(ctx: geste.ActivityContext) -> None:
            calls.append("ship")
            raise LocalError("no courier")

        @app.workflow
        async def flow(ctx: geste.WorkflowContext) -> str:
            try:
                await pay(ctx, 42)
            except PaymentDeclined as exc:
                seen.append({"step": "pay", "type": type(exc), "args": exc.args})
            try:
                await ship(ctx)
            except ActivityError as exc:
                seen.append(
                    {
                        "step": "ship",
                        "type": type(exc),
                        "type_name": exc.type_name,
                        "message": exc.message,
                        "traceback": exc.traceback,
                    }
                )
            await ctx.wait_event("go")
            return "done"

    first_app = make_app()
    register(first_app)
    async with first_app:
        await first_app.start_workflow("flow", instance_id="errors-1")
        await wait_status(first_app, "errors-1", geste.Status.WAITING)
    assert calls == ["pay", "ship"]
    assert len(seen) == 2

    second_app = make_app()
    register(second_app)
    async with second_app:
        await second_app.send_event("go")
        assert await second_app.get_handle("errors-1").result(timeout=10) == "done"
        history = await second_app.history("errors-1")

    assert calls == ["pay", "ship"], "a recorded error must not run the activity again"
    assert len(seen) == 4
    live, replayed = seen[:2], seen[2:]
    assert live == replayed
    pay_seen, ship_seen = replayed
    assert pay_seen == {"step": "pay", "type": PaymentDeclined, "args": ("card declined for 42",)}
    assert ship_seen["type"] is ActivityError
    assert ship_seen["type_name"] == f"{LocalError.__module__}.{LocalError.__qualname__}"
    assert ship_seen["message"] == "no courier"
    assert "LocalError: no courier" in ship_seen["traceback"]
    assert 'raise LocalError("no courier")' in ship_seen["traceback"]

    recorded = {e.name: e for e in history if e.kind == geste.StepKind.ACTIVITY}
    assert recorded["pay"].is_error and recorded["ship"].is_error
    assert recorded["pay"].payload["error"]["type"] == f"{__name__}.PaymentDeclined"


async def test_now_uuid_and_random_return_the_recorded_values_on_replay(make_app: MakeApp) -> None:
    runs: list[tuple[Any, ...]] = []

    def register(app: geste.App) -> None:
        @app.workflow
        async def flow(ctx: geste.WorkflowContext) -> list[str]:
            values = (ctx.now(), ctx.uuid4(), ctx.random())
            runs.append(values)
            await ctx.wait_event("go")
            return [values[0].isoformat(), str(values[1]), repr(values[2])]

    first_app = make_app()
    register(first_app)
    async with first_app:
        before = time.time()
        await first_app.start_workflow("flow", instance_id="helpers-1")
        await wait_status(first_app, "helpers-1", geste.Status.WAITING)
    assert len(runs) == 1

    second_app = make_app()
    register(second_app)
    async with second_app:
        await second_app.send_event("go")
        result = await second_app.get_handle("helpers-1").result(timeout=10)
        history = await second_app.history("helpers-1")

    assert len(runs) == 2
    assert runs[0] == runs[1]
    now, uid, rnd = runs[0]
    assert now.tzinfo is not None and before - 1 <= now.timestamp() <= time.time()
    assert uid.version == 4
    assert 0.0 <= rnd < 1.0
    assert result == [now.isoformat(), str(uid), repr(rnd)]
    assert [str(e.kind) for e in history] == ["now", "uuid", "random", "wait_event", "event"]


async def test_is_replaying_is_true_only_for_steps_taken_before(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="geste.workflow")
    flags: list[tuple[str, bool]] = []

    def register(app: geste.App) -> None:
        @app.activity
        async def step(ctx: geste.ActivityContext) -> None:
            return None

        @app.workflow
        async def flow(ctx: geste.WorkflowContext) -> None:
            flags.append(("start", ctx.is_replaying))
            ctx.logger.info("starting")  # said once: the logger is quiet while replaying
            await step(ctx)
            flags.append(("after step", ctx.is_replaying))
            await ctx.wait_event("go")
            flags.append(("after event", ctx.is_replaying))
            ctx.logger.info("got the event")
            await step(ctx)
            flags.append(("end", ctx.is_replaying))

    first_app = make_app()
    register(first_app)
    async with first_app:
        await first_app.start_workflow("flow", instance_id="flags-1")
        await wait_status(first_app, "flags-1", geste.Status.WAITING)
    assert flags == [("start", False), ("after step", False)]

    second_app = make_app()
    register(second_app)
    async with second_app:
        await second_app.send_event("go")
        await second_app.get_handle("flags-1").result(timeout=10)

    assert flags[2:] == [("start", True), ("after step", True), ("after event", False), ("end", False)]
    said = [r.getMessage() for r in caplog.records if r.name == "geste.workflow"]
    assert said == ["[flow flags-1] starting", "[flow flags-1] got the event"]


def _changed_activity(app: geste.App, calls: list[str]) -> None:
    @app.activity
    async def other(ctx: geste.ActivityContext) -> str:
        calls.append("other")
        return "other"

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        await other(ctx)
        await ctx.wait_event("go")
        return "changed"


def _inserted_step(app: geste.App, calls: list[str]) -> None:
    @app.activity
    async def original(ctx: geste.ActivityContext) -> str:
        calls.append("original")
        return "original"

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        await original(ctx)
        ctx.now()  # new: the history has the event wait at step 2
        await ctx.wait_event("go")
        return "changed"


def _swallowed(app: geste.App, calls: list[str]) -> None:
    """A changed workflow whose broad ``except`` catches the NonDeterminismError of its step."""

    @app.activity
    async def other(ctx: geste.ActivityContext) -> str:
        calls.append("other")
        return "other"

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        try:
            await other(ctx)
        except Exception:
            calls.append("caught")
        return "changed"


@pytest.mark.parametrize(
    ("changed", "step", "recorded", "asked", "extra_calls"),
    [
        (_changed_activity, 1, "activity 'original'", "activity 'other'", []),
        (_inserted_step, 2, "wait_event 'go'", "now 'now'", []),
        (_swallowed, 1, "activity 'original'", "activity 'other'", ["caught"]),
    ],
    ids=["renamed-activity", "inserted-step", "caught-by-the-workflow"],
)
async def test_a_diverging_replay_fails_the_instance_and_leaves_its_history(
    make_app: MakeApp,
    changed: Callable[[geste.App, list[str]], None],
    step: int,
    recorded: str,
    asked: str,
    extra_calls: list[str],
) -> None:
    calls: list[str] = []

    first_app = make_app()

    @first_app.activity
    async def original(ctx: geste.ActivityContext) -> str:
        calls.append("original")
        return "original"

    @first_app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        await original(ctx)
        await ctx.wait_event("go")
        return "done"

    async with first_app:
        await first_app.start_workflow("flow", instance_id="diverge-1")
        await wait_status(first_app, "diverge-1", geste.Status.WAITING)
        before = history_rows(await first_app.history("diverge-1"))
        steps_before = (await first_app.get_instance("diverge-1")).steps
    assert calls == ["original"]

    second_app = make_app()
    changed(second_app, calls)
    async with second_app:
        await second_app.send_event("go")
        handle = second_app.get_handle("diverge-1")
        with pytest.raises(WorkflowFailed) as failed:
            await handle.result(timeout=10)
        info = await handle.info()
        after = history_rows(await handle.history())

    assert calls == ["original", *extra_calls], "no step may run past the divergence"
    assert info.status == geste.Status.FAILED
    assert info.error is not None
    assert info.error["type"] == "geste.errors.NonDeterminismError"
    assert f"at step {step}:" in info.error["message"]
    assert recorded in info.error["message"] and asked in info.error["message"]
    assert failed.value.error["type"] == "geste.errors.NonDeterminismError"
    # the event was handed to the waiting instance (its delivery is a fact recorded by send_event);
    # the failed replay itself wrote nothing
    delivered = after[len(before) :]
    assert after[: len(before)] == before
    assert [(row[1], row[2]) for row in delivered] == [("event", "go")]
    assert info.steps == steps_before + len(delivered)


async def test_non_determinism_error_names_the_step(make_app: MakeApp) -> None:
    """The exception itself, as the workflow sees it at the diverging step."""
    seen: list[NonDeterminismError] = []
    first_app = make_app()

    @first_app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        ctx.uuid4()
        await ctx.wait_event("go")

    async with first_app:
        await first_app.start_workflow("flow", instance_id="nd-1")
        await wait_status(first_app, "nd-1", geste.Status.WAITING)

    second_app = make_app()

    @second_app.workflow(name="flow")
    async def changed(ctx: geste.WorkflowContext) -> None:
        try:
            ctx.random()
        except NonDeterminismError as exc:
            seen.append(exc)
            raise

    async with second_app:
        await second_app.send_event("go")
        with pytest.raises(WorkflowFailed):
            await second_app.get_handle("nd-1").result(timeout=10)

    assert len(seen) == 1
    assert (seen[0].seq, seen[0].expected, seen[0].found) == (1, "uuid 'uuid'", "random 'random'")


async def test_values_handed_to_an_activity_survive_its_rerun_after_a_restart(make_app: MakeApp) -> None:
    """Regression: now/uuid4/random were only buffered while the activity ran, so an App that stopped
    during the activity lost them and the rerun got new values under the same idempotency key."""
    seen: list[tuple[str, list[Any]]] = []
    started = asyncio.Event()
    hang = {"on": True}

    def register(app: geste.App) -> None:
        @app.activity
        async def create(ctx: geste.ActivityContext, values: list[Any]) -> list[Any]:
            seen.append((ctx.idempotency_key, values))
            if hang["on"]:
                started.set()
                await asyncio.Event().wait()  # the App closes meanwhile: this run is cut off
            return values

        @app.workflow
        async def flow(ctx: geste.WorkflowContext) -> list[Any]:
            values = [ctx.now().isoformat(), str(ctx.uuid4()), ctx.random()]
            return await create(ctx, values)

    first_app = make_app(shutdown_grace=0.1)
    register(first_app)
    async with first_app:
        await first_app.start_workflow("flow", instance_id="rerun-1")
        await asyncio.wait_for(started.wait(), 10)

    hang["on"] = False
    second_app = make_app()
    register(second_app)
    async with second_app:
        result = await second_app.get_handle("rerun-1").result(timeout=10)
        history = await second_app.history("rerun-1")

    assert len(seen) == 2
    assert seen[0] == seen[1]
    assert result == seen[0][1]
    assert [str(e.kind) for e in history] == ["now", "uuid", "random", "activity"]
