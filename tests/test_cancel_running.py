"""A cancel reaches a running ``async def`` activity (issue 18): the holder of the instance's lease learns
of it (a notification routed to it on PostgreSQL; its lease renewal on both backends; at once when the
cancel is requested in its own process), cancels the activity's task, records ``ActivityCancelled`` as
the step's outcome, runs no further attempt, and the workflow's cancellation goes on as before (its
compensations run, never cancelled themselves). Cooperative code reads ``ctx.cancelled``.

Across processes the workers run ``tests/apps/cancel_app.py`` (``tests/processes.py``); how each cancel
reached the worker is read from its log ("via notification" / "via renewal"): the mechanism is asserted,
never a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import geste
from geste.errors import ActivityCancelled, WorkflowCancelled
from geste.storage.postgres import PostgresStorage
from geste.storage.sqlite import SQLiteStorage

from .processes import WorkerProcesses, worker_processes, workers_client
from .support import CANCELLED_TYPE, cancelled_outcome, wait_until

MakeApp = Callable[..., geste.App]

workers = worker_processes("cancel_app")
client = workers_client()
"""An App of the test process that starts, cancels and reads (no worker); it creates the schema."""


@pytest.mark.parametrize("listen", [True, False], ids=["listening", "listener-off"])
async def test_a_cancel_from_another_process_reaches_the_running_activity(
    workers: WorkerProcesses, client: geste.App, db_url: str, listen: bool
) -> None:
    """The activity blocks on an ``asyncio.Event`` nobody sets, with two attempts left. A cancel from the
    test process reaches it in the worker process: its task gets ``CancelledError`` (and ``ctx.cancelled``
    is True), its outcome is ``ActivityCancelled`` after one attempt, the compensation runs there.

    PostgreSQL listening: by the notification to the holder (a lease of 30 s: no renewal within the
    test's wait). SQLite, or the listener off: by the lease renewal (every lock_timeout / 3)."""
    postgres = db_url.startswith("postgresql")  # SQLite has no listener: both variants take the renewal
    by_notification = postgres and listen
    proc = await workers.spawn("w1", lock_timeout=30.0 if by_notification else 1.5, listen_notify=int(listen))
    handle = await client.start_workflow("saga")
    iid = handle.instance_id
    await wait_until(lambda: workers.entries(instance=iid, event="start"), "the activity to start")

    info = await client.cancel(iid)
    assert info.cancel_requested and not info.status.is_finished
    with pytest.raises(WorkflowCancelled):
        await handle.result(timeout=20)

    assert (await handle.info()).status == geste.Status.CANCELLED
    starts = workers.entries(instance=iid, event="start")
    assert [e["attempt"] for e in starts] == [1]  # two attempts were left: none ran
    (seen,) = workers.entries(instance=iid, event="cancelled")
    assert seen["flag"] is True and seen["worker"] == "w1"
    assert [e["what"] for e in workers.entries(instance=iid, event="undo")] == ["saga"]
    history = await client.history(iid)
    assert [(e.kind, e.name) for e in history] == [
        (geste.StepKind.ACTIVITY, "hang"),
        (geste.StepKind.COMPENSATION, "undo"),
    ]
    error = cancelled_outcome(history[0])
    assert history[0].payload["attempts"] == 1 and "deadline" not in error
    via = "notification" if by_notification else "renewal"
    assert f"{iid}: a cancel reached its run here (via {via})" in workers.output(proc)


async def test_a_cancel_requested_in_the_worker_process_reaches_it_at_once(make_app: MakeApp) -> None:
    """Requested where the instance runs: no notification or renewal needed (a lease of 60 s, the listener
    off). The activity's own task sees ``CancelledError``; the workflow sees ``WorkflowCancelled`` at the
    activity's step, and its ``except`` there runs like any cancel's."""
    app = make_app(lock_timeout=60.0, listen_notify=False)
    started, saw = asyncio.Event(), []

    @app.activity(retry=geste.RetryPolicy(max_attempts=5, initial_interval=0.01))
    async def hang(ctx: geste.ActivityContext) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            saw.append(("CancelledError", ctx.cancelled))
            raise

    @app.activity
    async def undo(ctx: geste.ActivityContext) -> None:
        saw.append(("undo", ctx.cancelled))

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        ctx.on_failure(undo)
        try:
            await hang(ctx)
        except WorkflowCancelled as exc:
            saw.append(("workflow", type(exc).__name__))
            raise
        return "done"

    async with app:
        handle = await flow.start()
        await asyncio.wait_for(started.wait(), 10)
        await app.cancel(handle.instance_id)
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=10)
        history = await handle.history()
        worker = app._worker
        assert worker is not None and worker.renewal_cancels == 0

    assert saw == [("CancelledError", True), ("workflow", "WorkflowCancelled"), ("undo", False)]
    assert [(e.kind, e.name) for e in history] == [
        (geste.StepKind.ACTIVITY, "hang"),
        (geste.StepKind.COMPENSATION, "undo"),
    ]
    cancelled_outcome(history[0])


async def test_cooperative_code_reads_ctx_cancelled(make_app: MakeApp) -> None:
    """An activity that shields itself from ``CancelledError`` (here: swallows it) sees ``ctx.cancelled``
    and stops on its own; what it returns then is its recorded result, and the cancel is delivered at the
    workflow's next step (no later activity runs)."""
    app = make_app(lock_timeout=60.0)
    started, flags, later = asyncio.Event(), [], []

    @app.activity
    async def careful(ctx: geste.ActivityContext) -> str:
        flags.append(ctx.cancelled)
        started.set()
        while not ctx.cancelled:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                flags.append("swallowed")
        flags.append(ctx.cancelled)
        return "stopped cleanly"

    @app.activity
    async def after(ctx: geste.ActivityContext) -> None:
        later.append(ctx.instance_id)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        await careful(ctx)
        await after(ctx)
        return "done"

    async with app:
        handle = await flow.start()
        await asyncio.wait_for(started.wait(), 10)
        await app.cancel(handle.instance_id)
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=10)
        history = await handle.history()

    assert flags == [False, "swallowed", True]
    assert later == []
    assert [(e.kind, e.name) for e in history] == [
        (geste.StepKind.ACTIVITY, "careful"),
        (geste.StepKind.CANCELLED, "cancelled"),
    ]
    assert history[0].payload["result"] == "stopped cleanly"


async def test_a_cancel_ends_a_retry_wait_at_once(make_app: MakeApp) -> None:
    """Between attempts (a back-off of an hour), a cancel ends the wait: no further attempt, the outcome
    ``ActivityCancelled`` after the attempts made."""
    app = make_app(lock_timeout=60.0)
    attempts: list[int] = []

    @app.activity(retry=geste.RetryPolicy(max_attempts=10, initial_interval=3600.0))
    async def flaky(ctx: geste.ActivityContext) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("down")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        await flaky(ctx)

    async with app:
        handle = await flow.start()
        await wait_until(lambda: attempts, "the first attempt")
        await app.cancel(handle.instance_id)
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=10)
        history = await handle.history()

    assert attempts == [1]
    assert len(history) == 1
    cancelled_outcome(history[0])
    assert history[0].payload["attempts"] == 1


async def test_compensations_are_not_cancelled(make_app: MakeApp) -> None:
    """A cancel that comes while a compensation runs (the workflow failed on its own) does not reach it:
    the compensation finishes and its result is recorded."""
    app = make_app(lock_timeout=60.0)
    compensating, release = asyncio.Event(), asyncio.Event()
    seen: list[bool] = []

    @app.activity(retry=geste.RetryPolicy(max_attempts=1))
    async def boom(ctx: geste.ActivityContext) -> None:
        raise ValueError("no")

    @app.activity
    async def undo(ctx: geste.ActivityContext) -> str:
        compensating.set()
        await release.wait()
        seen.append(ctx.cancelled)
        return "undone"

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        ctx.on_failure(undo)
        await boom(ctx)

    async with app:
        handle = await flow.start()
        await asyncio.wait_for(compensating.wait(), 10)
        await app.cancel(handle.instance_id)
        release.set()
        with pytest.raises(geste.errors.WorkflowFailed):
            await handle.result(timeout=10)
        history = await handle.history()

    assert seen == [False]
    assert history[-1].kind == geste.StepKind.COMPENSATION and history[-1].payload["result"] == "undone"


async def test_a_recorded_cancelled_activity_replays_as_the_cancel(make_app: MakeApp) -> None:
    """The history ends with the ``ActivityCancelled`` row (the end not committed: the worker stopped):
    a replay delivers the cancel there again (``WorkflowCancelled`` in the workflow, not the activity's
    error), and the compensations run."""
    app = make_app(lock_timeout=60.0)
    started = asyncio.Event()
    caught: list[str] = []

    @app.activity
    async def hang(ctx: geste.ActivityContext) -> None:
        started.set()
        await asyncio.Event().wait()

    @app.activity
    async def undo(ctx: geste.ActivityContext) -> None:
        caught.append("undo")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        ctx.on_failure(undo)
        try:
            await hang(ctx)
        except Exception as exc:
            caught.append(type(exc).__name__)
            raise

    async with app:
        handle = await flow.start()
        await asyncio.wait_for(started.wait(), 10)
        await app.cancel(handle.instance_id)
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=10)
        history = await handle.history()
    cancelled_outcome(history[0])
    assert caught == ["WorkflowCancelled", "undo"]

    from geste.testing import check_replay

    report = await check_replay(app, database_url=app.url)
    assert report.ok and len(report.results) == 1, report


async def _count_statements(storage: Any, call: Callable[[], Any]) -> tuple[int, Any]:
    """The statements ``call`` runs on the storage's connections (PostgreSQL: every asyncpg call;
    SQLite: the statements of its connection's trace)."""
    count = 0
    if isinstance(storage, PostgresStorage):
        import asyncpg

        originals = {
            name: getattr(asyncpg.Connection, name) for name in ("execute", "fetch", "fetchrow", "fetchval")
        }

        def counting(original: Any) -> Any:
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                nonlocal count
                count += 1
                return await original(*args, **kwargs)

            return wrapper

        try:
            for name, original in originals.items():
                setattr(asyncpg.Connection, name, counting(original))
            result = await call()
        finally:
            for name, original in originals.items():
                setattr(asyncpg.Connection, name, original)
        return count, result
    assert isinstance(storage, SQLiteStorage)
    traced: list[str] = []
    conn = storage._conn
    assert conn is not None
    conn.set_trace_callback(traced.append)
    try:
        result = await call()
    finally:
        conn.set_trace_callback(None)
    return sum(1 for sql in traced if sql.lstrip().upper().startswith(("UPDATE", "SELECT", "INSERT"))), result


async def test_the_renewal_reports_cancels_in_the_statements_it_had(make_app: MakeApp, db_url: str) -> None:
    """The renewal of 5 held leases, one of them cancelled: PostgreSQL runs one statement, SQLite one
    UPDATE per lease (as before), and the result names the cancelled instance."""
    app = make_app(run_worker=False)
    async with app:
        storage = app.storage
        now = app.clock()
        leases = []
        for n in range(5):
            lease = geste.storage.base.Lease(f"i{n}", f"lease-{n}")
            await storage.create_instance(
                geste.storage.base.NewInstance(f"i{n}", "w", "{}", now),
                lease=lease,
                worker_id="w1",
                lock_expires_at=now + 30,
            )
            leases.append(lease)
        await storage.request_cancel("i3", now)
        statements, kept = await _count_statements(storage, lambda: storage.renew(leases, now + 60, now=now))
    assert kept == {f"i{n}" for n in range(5)}
    assert kept.cancel_requested == {"i3"}
    assert statements == (1 if db_url.startswith("postgresql") else 5)


def test_activity_cancelled_is_in_the_error_tree() -> None:
    assert issubclass(ActivityCancelled, geste.errors.GesteError)
    assert "ActivityCancelled" in geste.errors.__all__


async def test_a_cancel_reaches_every_activity_of_a_gather(make_app: MakeApp) -> None:
    """Two activities run side by side: both are cancelled, both outcomes recorded, the compensation runs
    once, and a replay of that history (the replay check) ends the same way."""
    app = make_app(lock_timeout=60.0)
    running: list[str] = []
    cancelled: list[str] = []
    undone: list[str] = []

    @app.activity
    async def hang(ctx: geste.ActivityContext, name: str) -> None:
        running.append(name)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    @app.activity
    async def undo(ctx: geste.ActivityContext) -> None:
        undone.append(ctx.instance_id)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        ctx.on_failure(undo)
        await asyncio.gather(hang(ctx, "a"), hang(ctx, "b"))

    async with app:
        handle = await flow.start()
        await wait_until(lambda: len(running) == 2, "both activities to run")
        await app.cancel(handle.instance_id)
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=10)
        history = await handle.history()

    assert sorted(cancelled) == ["a", "b"]
    assert undone == [handle.instance_id]
    assert [(e.kind, e.name) for e in history] == [
        (geste.StepKind.ACTIVITY, "hang"),
        (geste.StepKind.ACTIVITY, "hang"),
        (geste.StepKind.COMPENSATION, "undo"),
    ]
    for entry in history[:2]:
        cancelled_outcome(entry)

    from geste.testing import check_replay

    report = await check_replay(app, database_url=app.url)
    assert report.ok and len(report.results) == 1, report


# -- what follows a cancel delivered ----------------------------------------------------------------------
async def test_cleanup_steps_after_a_caught_cancel_are_not_cancelled_by_renewals(make_app: MakeApp) -> None:
    """A workflow may catch the cancel and clean up with more steps. The database's flag stays set while
    it runs, and every lease renewal reports it again: a cleanup activity that spans several renewals
    must run to its end (before, each renewal cancelled it again, and the workflow ended cancelled)."""
    app = make_app(lock_timeout=0.6)  # a renewal every 0.2 s
    renewals = 0
    started, cleaned = asyncio.Event(), asyncio.Event()

    @app.activity
    async def work(ctx: geste.ActivityContext) -> None:
        started.set()
        await asyncio.Event().wait()  # only the cancel ends it

    @app.activity
    async def cleanup(ctx: geste.ActivityContext) -> str:
        seen = renewals
        await wait_until(lambda: renewals >= seen + 3, "three renewals during the cleanup", timeout=20)
        cleaned.set()
        return "cleaned"

    @app.workflow
    async def careful(ctx: geste.WorkflowContext) -> str:
        try:
            await work(ctx)
        except WorkflowCancelled:
            return await cleanup(ctx)
        return "not cancelled"

    async with app:
        real_renew = app.storage.renew

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal renewals
            kept = await real_renew(*args, **kwargs)
            renewals += 1
            return kept

        app.storage.renew = counted  # type: ignore[method-assign]
        handle = await careful.start_with_id("careful")
        await asyncio.wait_for(started.wait(), 10)
        await app.cancel("careful")
        assert await handle.result(timeout=30) == "cleaned"
    assert cleaned.is_set()


async def test_a_cancel_during_the_read_of_stored_heartbeat_details_is_recorded(make_app: MakeApp) -> None:
    """The first attempt of an activity with a ``heartbeat_timeout`` reads the details a crashed attempt
    left; a cancel that comes during that read is the activity's cancel like any other (before, the
    ``CancelledError`` escaped the step and killed the run without a word, the lease left to expire)."""
    app = make_app()
    reading, go_on = asyncio.Event(), asyncio.Event()

    @app.activity(heartbeat_timeout=30)
    async def beats(ctx: geste.ActivityContext) -> str:
        return "ran"

    @app.workflow
    async def beating(ctx: geste.WorkflowContext) -> str:
        return await beats(ctx)

    async with app:
        real_read = app.storage.heartbeat_details

        async def slow_read(instance_id: str) -> Any:
            reading.set()
            await go_on.wait()  # never set: only the cancel ends it
            return await real_read(instance_id)

        app.storage.heartbeat_details = slow_read  # type: ignore[method-assign]
        handle = await beating.start_with_id("beating")
        await asyncio.wait_for(reading.wait(), 10)
        await app.cancel("beating")
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=30)
        history = await app.history("beating")
    (step,) = [e for e in history if e.kind == "activity"]
    assert step.payload["error"]["type"] == CANCELLED_TYPE
