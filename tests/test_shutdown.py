"""Shutdown: the loops stop at a boundary and hand back what a claim in flight took; a cancelled
``App.close()`` (``asyncio.timeout``) ends at once and leaves nothing running."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import geste

from .support import raw_query, wait_until

MakeApp = Callable[..., geste.App]


def answer_once_stopping(app: geste.App, method: str, part: str) -> asyncio.Event:
    """Make ``app.storage.<method>`` (a claim) answer, when it took something, only once the App's
    ``part`` (``_worker`` or ``_relay``) is stopping: a claim in flight when the App closes. The event
    returned is set when such a claim has committed."""
    real = getattr(app.storage, method)
    claimed = asyncio.Event()

    async def late(*args: Any, **kwargs: Any) -> Any:
        owner = getattr(app, part)
        assert owner is not None
        claims = await real(*args, **kwargs)
        if claims:
            claimed.set()
            await wait_until(lambda: owner.stopping, f"{part} to stop", timeout=30)
        return claims

    setattr(app.storage, method, late)
    return claimed


async def test_a_claim_in_flight_when_the_app_closes_is_handed_back(make_app: MakeApp, db_url: str) -> None:
    """The claim has committed (the instances are leased) but its answer is not back when close() is
    called: the worker waits for the round to end and hands the instances back at once."""
    worker = make_app(lock_timeout=60.0, shutdown_grace=10.0, worker_id="closing")

    @worker.workflow
    async def flow(ctx: geste.WorkflowContext, n: int) -> int:
        return n

    claimed = answer_once_stopping(worker, "claim", "_worker")
    routed = answer_once_stopping(worker, "claim_ids", "_worker")  # the starts' notifications, routed to it
    client = make_app(run_worker=False)
    client.workflow(flow.fn)
    async with client:
        await worker.open()
        handles = [await client.start_workflow("flow", n) for n in range(3)]
        await wait_until(lambda: claimed.is_set() or routed.is_set(), "a claim to commit", timeout=15)
        await worker.close()
        rows = await raw_query(
            db_url, "SELECT instance_id, status, locked_by, lease_id, run_at FROM geste_instances"
        )
        assert len(rows) == 3
        assert all(
            r["locked_by"] is None and r["lease_id"] is None and r["run_at"] is not None for r in rows
        ), rows
        async with make_app() as other:
            other.workflow(flow.fn)
            for n, handle in enumerate(handles):
                assert await handle.result(timeout=10) == n


async def test_a_relay_claim_in_flight_when_the_app_closes_gives_its_events_back(
    make_app: MakeApp, db_url: str
) -> None:
    sent: list[str] = []

    async def handler(event: geste.OutboxEvent) -> None:
        sent.append(event.event_id)

    app = make_app(outbox_handler=handler, lock_timeout=60.0, shutdown_grace=10.0)

    @app.workflow
    async def emit(ctx: geste.WorkflowContext) -> str:
        return await ctx.send_event("thing.done", {"n": 1})

    claimed = answer_once_stopping(app, "outbox_claim", "_relay")
    await app.open()
    try:
        event_id = await (await emit.start()).result(timeout=10)
        await asyncio.wait_for(claimed.wait(), 15)
    finally:
        await app.close()
    assert sent == []
    async with make_app(run_worker=False) as reader:
        (entry,) = await reader.outbox()
        assert (entry.event_id, str(entry.status), entry.claimed_by) == (event_id, "pending", None)


async def test_a_timeout_around_close_is_honoured(make_app: MakeApp) -> None:
    """close() drains for shutdown_grace (a minute here); a caller that gives it half a second gets its
    TimeoutError then, and the App is closed: nothing of it runs on."""
    entered, cancelled = asyncio.Event(), asyncio.Event()
    app = make_app(shutdown_grace=60.0)

    @app.activity
    async def forever(ctx: geste.ActivityContext) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        await forever(ctx)

    await app.open()
    await flow.start()
    await asyncio.wait_for(entered.wait(), 10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await app.close()
    await asyncio.wait_for(cancelled.wait(), 5)  # the run was ended, not left running
    with pytest.raises(geste.errors.AppNotOpenError):
        await flow.start()

    def ours_ended() -> bool:
        current = asyncio.current_task()
        return not [t for t in asyncio.all_tasks() if t is not current and t.get_name().startswith("geste-")]

    await wait_until(ours_ended, "every task of the App to end")
    await app.close()  # closing again is a no-op


async def test_cancelling_the_task_that_closes_the_app_cancels_the_close(make_app: MakeApp) -> None:
    """Cancelling the task that closes the App cancels the close: it does not run on."""
    app = make_app(shutdown_grace=60.0)

    @app.activity
    async def forever(ctx: geste.ActivityContext) -> None:
        await asyncio.Event().wait()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        await forever(ctx)

    await app.open()
    await flow.start()
    closing = asyncio.create_task(app.close())
    await wait_until(lambda: app._worker is None, "close() to begin")
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    with pytest.raises(geste.errors.AppNotOpenError):
        await flow.start()
