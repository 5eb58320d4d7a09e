"""Events: ``ctx.wait_event`` and ``app.send_event``.

The semantics under test: an instance sees the events sent at or after its start, each at most once,
oldest first, filtered by type, ``match`` and ``instance_id``; an event goes to every matching instance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

import geste
from geste.errors import EventTimeout

from .support import MovableClock, wait_status, wait_until

MakeApp = Callable[..., geste.App]
HOUR = 3600.0


def kinds(history: list[geste.HistoryEntry]) -> list[tuple[str, str, bool]]:
    return [(str(e.kind), e.name, e.is_error) for e in history]


async def test_an_event_sent_before_the_workflow_waits_is_not_lost(make_app: MakeApp) -> None:
    entered, opened = asyncio.Event(), asyncio.Event()
    app = make_app()

    @app.activity
    async def gate(ctx: geste.ActivityContext) -> None:
        entered.set()
        await opened.wait()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> dict[str, Any]:
        await gate(ctx)
        event = await ctx.wait_event("order.paid")
        assert event.time is not None
        return {
            "id": event.event_id,
            "type": event.type,
            "data": event.data,
            "source": event.source,
            "extensions": event.extensions,
            "time": event.time.timestamp(),
        }

    async with app:
        handle = await flow.start()
        await asyncio.wait_for(entered.wait(), 10)
        sent_at = time.time()
        event_id = await app.send_event(
            "order.paid", {"order": 7}, source="shop", extensions={"tenant": "eu"}, event_id="paid-7"
        )
        assert await handle.status() == geste.Status.RUNNING
        opened.set()
        result = await handle.result(timeout=10)
        history = await handle.history()

    assert event_id == "paid-7"
    assert result == {
        "id": "paid-7",
        "type": "order.paid",
        "data": {"order": 7},
        "source": "shop",
        "extensions": {"tenant": "eu"},
        "time": pytest.approx(sent_at, abs=5),
    }
    assert kinds(history) == [
        ("activity", "gate", False),
        ("wait_event", "order.paid", False),
        ("event", "order.paid", False),
    ]


async def test_match_filters_events_and_the_others_are_kept(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> list[Any]:
        wanted = await ctx.wait_event("shipment", match={"order": "A", "carrier": "post"})
        other = await ctx.wait_event("shipment")
        return [wanted.data, other.data]

    async with app:
        handle = await flow.start_with_id("match-1")
        await wait_status(app, "match-1", geste.Status.WAITING)
        await app.send_event("shipment", {"order": "B", "carrier": "post"})
        await app.send_event("shipment", {"order": "A", "carrier": "van"})
        await app.send_event("shipment", ["not", "a", "mapping"])
        await app.send_event("shipment", {"order": "A", "carrier": "post", "extra": 1})
        result = await handle.result(timeout=10)

    # the first wait takes the only match; the second takes the oldest event left
    assert result == [{"order": "A", "carrier": "post", "extra": 1}, {"order": "B", "carrier": "post"}]


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_two_waits_in_a_row_take_two_events_in_order(make_app: MakeApp) -> None:
    entered, opened = asyncio.Event(), asyncio.Event()
    app = make_app()

    @app.activity
    async def gate(ctx: geste.ActivityContext) -> None:
        entered.set()
        await opened.wait()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext, gated: bool) -> list[int]:
        if gated:
            await gate(ctx)
        first = await ctx.wait_event("tick")
        second = await ctx.wait_event("tick")
        return [first.data, second.data]

    async with app:
        both_early = await flow.start(True)
        await asyncio.wait_for(entered.wait(), 10)
        one_by_one = await flow.start_with_id("ticks", False)
        await wait_status(app, "ticks", geste.Status.WAITING)
        await app.send_event("tick", 1)
        await app.send_event("tick", 2)
        opened.set()
        assert await both_early.result(timeout=10) == [1, 2]
        assert await one_by_one.result(timeout=10) == [1, 2]


@pytest.mark.parametrize("timeout", [0.2, timedelta(milliseconds=200)], ids=["seconds", "timedelta"])
async def test_a_wait_that_times_out_raises_event_timeout_in_the_workflow(
    make_app: MakeApp, timeout: float | timedelta
) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        try:
            await ctx.wait_event("never", timeout=timeout)
        except EventTimeout as exc:
            return f"gave up: {exc}"
        return "got it"

    async with app:
        handle = await flow.start()
        result = await handle.result(timeout=10)
        history = await handle.history()

    assert result.startswith("gave up: no 'never' event arrived within 0.2")
    assert kinds(history) == [("wait_event", "never", False), ("event_timeout", "never", True)]
    assert history[0].payload["timeout"] == pytest.approx(0.2)


async def test_an_uncaught_event_timeout_fails_the_instance(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        await ctx.wait_event("never", timeout=0.1)

    async with app:
        with pytest.raises(geste.errors.WorkflowFailed) as failed:
            await (await flow.start()).result(timeout=10)
    assert failed.value.error["type"] == "geste.errors.EventTimeout"


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_an_event_in_time_cancels_the_timeout_and_a_timeout_survives_a_restart(
    make_app: MakeApp,
) -> None:
    clock = MovableClock()

    def register(app: geste.App) -> None:
        @app.workflow
        async def flow(ctx: geste.WorkflowContext) -> list[Any]:
            first = await ctx.wait_event("first", timeout=HOUR)
            try:
                second = await ctx.wait_event("second", timeout=2 * HOUR)
            except EventTimeout:
                return [first.data, "second timed out"]
            return [first.data, second.data]

    first_app = make_app(clock=clock)
    register(first_app)
    async with first_app:
        await first_app.start_workflow("flow", instance_id="deadline-1")
        await wait_status(first_app, "deadline-1", geste.Status.WAITING)
        await first_app.send_event("first", "in time")

        async def second_wait() -> bool:
            history = await first_app.history("deadline-1")
            return (
                len(history) == 3
                and (await first_app.get_instance("deadline-1")).status == geste.Status.WAITING
            )

        await wait_until(second_wait)

    clock.advance(HOUR + 60)  # past the first deadline only: nothing happens
    second_app = make_app(clock=clock)
    register(second_app)
    async with second_app:
        await second_app.send_event("unrelated")
        with pytest.raises(geste.errors.ResultTimeout):
            await second_app.get_handle("deadline-1").result(timeout=0.2)
        clock.advance(2 * HOUR)  # past the second deadline
        result = await second_app.get_handle("deadline-1").result(timeout=10)
        history = await second_app.history("deadline-1")

    assert result == ["in time", "second timed out"]
    assert kinds(history) == [
        ("wait_event", "first", False),
        ("event", "first", False),
        ("wait_event", "second", False),
        ("event_timeout", "second", True),
    ]


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_an_event_id_sent_twice_is_delivered_once(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> list[Any]:
        first = await ctx.wait_event("charge")
        try:
            again = await ctx.wait_event("charge", timeout=0.3)
        except EventTimeout:
            return [first.data, "no second delivery"]
        return [first.data, again.data]

    async with app:
        handle = await flow.start_with_id("dedup-1")
        await wait_status(app, "dedup-1", geste.Status.WAITING)
        assert await app.send_event("charge", {"n": 1}, event_id="charge-1") == "charge-1"
        assert await app.send_event("charge", {"n": 2}, event_id="charge-1") == "charge-1"
        assert await handle.result(timeout=10) == [{"n": 1}, "no second delivery"]


async def test_instance_id_targets_one_instance(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> Any:
        event = await ctx.wait_event("poke")
        return event.data

    async with app:
        first = await flow.start_with_id("target-a")
        second = await flow.start_with_id("target-b")
        await wait_status(app, "target-a", geste.Status.WAITING)
        await wait_status(app, "target-b", geste.Status.WAITING)
        await app.send_event("poke", "for a only", instance_id="target-a")
        assert await first.result(timeout=10) == "for a only"
        assert await second.status() == geste.Status.WAITING
        await app.send_event("poke", "for everyone")
        # b never saw the targeted event, though it is older than the broadcast one
        assert await second.result(timeout=10) == "for everyone"


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_an_event_is_delivered_to_every_matching_waiting_instance(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext, region: str) -> list[Any]:
        event = await ctx.wait_event("price.changed", match={"region": region})
        return [event.event_id, event.data]

    async with app:
        eu = [await flow.start("eu") for _ in range(3)]
        us = await flow.start("us")
        for handle in [*eu, us]:
            await wait_status(app, handle.instance_id, geste.Status.WAITING)
        event_id = await app.send_event("price.changed", {"region": "eu", "price": 3})
        results = [await handle.result(timeout=10) for handle in eu]
        assert await us.status() == geste.Status.WAITING
        await app.send_event("price.changed", {"region": "us", "price": 4})
        assert (await us.result(timeout=10))[1] == {"region": "us", "price": 4}

    assert results == [[event_id, {"region": "eu", "price": 3}]] * 3


async def test_an_event_sent_before_the_instance_started_is_not_delivered_to_it(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> Any:
        event = await ctx.wait_event("announcement")
        return event.data

    async with app:
        await app.send_event("announcement", "too early")
        handle = await flow.start_with_id("late-1")
        await wait_status(app, "late-1", geste.Status.WAITING)
        await app.send_event("announcement", "after the start")
        assert await handle.result(timeout=10) == "after the start"


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_an_event_sent_while_no_worker_runs_is_delivered_when_one_starts(make_app: MakeApp) -> None:
    def register(app: geste.App) -> None:
        @app.workflow
        async def flow(ctx: geste.WorkflowContext) -> Any:
            return (await ctx.wait_event("mail")).data

    worker = make_app()
    register(worker)
    async with worker:
        await worker.start_workflow("flow", instance_id="offline-1")
        await wait_status(worker, "offline-1", geste.Status.WAITING)

    client = make_app(run_worker=False)
    register(client)
    async with client:
        await client.send_event("mail", "sent while nobody ran")
        assert await client.get_handle("offline-1").status() == geste.Status.WAITING

    second_worker = make_app()
    register(second_worker)
    async with second_worker:
        assert await second_worker.get_handle("offline-1").result(timeout=10) == "sent while nobody ran"


async def test_an_event_is_written_into_a_waiting_instances_history_by_send_event(make_app: MakeApp) -> None:
    """The event is handed over in send_event's own transaction: the woken run only replays it."""
    client = make_app(run_worker=False)

    @client.workflow
    async def waiter(ctx: geste.WorkflowContext) -> Any:
        return (await ctx.wait_event("ping")).data

    runner = make_app()
    runner.workflow(name="waiter")(waiter.fn)
    async with runner:
        await runner.start_workflow("waiter", instance_id="w-1")
        await wait_status(runner, "w-1", geste.Status.WAITING)
    async with client:  # nobody runs it now: whatever is in the history was written by send_event
        await client.send_event("ping", {"n": 1})
        entries = await client.history("w-1")
        assert [(e.seq, e.kind, e.name) for e in entries] == [(1, "wait_event", "ping"), (2, "event", "ping")]
        assert entries[1].payload["data"] == {"n": 1}
        info = await client.get_instance("w-1")
        assert info.status == geste.Status.WAITING and info.locked_by is None
    async with runner:
        assert await runner.get_handle("w-1").result(timeout=10) == {"n": 1}
        assert len(await runner.history("w-1")) == 2  # nothing taken twice


async def test_an_instance_held_by_a_worker_takes_the_event_itself(make_app: MakeApp) -> None:
    """While a worker holds the instance, send_event only wakes it; the holder records the event."""
    app = make_app()
    gate = asyncio.Event()

    @app.activity
    async def hold(ctx: geste.ActivityContext) -> None:
        await gate.wait()

    @app.workflow
    async def busy(ctx: geste.WorkflowContext) -> Any:
        await hold(ctx)
        return (await ctx.wait_event("ping")).data

    async with app:
        handle = await busy.start_with_id("b-1")
        await wait_until(lambda: app._worker is not None and "b-1" in app._worker._running, "b-1 to run")
        await app.send_event("ping", {"n": 2})
        assert [e.kind for e in await app.history("b-1")] == []  # held: nothing written for it yet
        gate.set()
        assert await handle.result(timeout=10) == {"n": 2}
        kinds = [(e.kind, e.name) for e in await app.history("b-1")]
        assert kinds == [("activity", "hold"), ("wait_event", "ping"), ("event", "ping")]
