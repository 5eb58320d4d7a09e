"""Activity heartbeats, on each backend: ``ctx.heartbeat(details)`` and ``heartbeat_timeout``.

A hung attempt (no heartbeat within its timeout) fails with ``ActivityHeartbeatTimeout`` and is retried
by its policy; the next attempt reads the last details, in this process or, after the worker died, in
another (the details reach the database with the worker's lease renewal); heartbeats cost no statement.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import geste
from geste._serde import decode_error
from geste.errors import ActivityHeartbeatTimeout, ActivityTimeout, ConfigurationError, SerializationError
from geste.storage.base import Lease, Storage

from .apps.heartbeat_app import build_app
from .processes import WorkerProcesses
from .support import count_storage_calls, raw_query, wait_until

FAST_RETRY = geste.RetryPolicy(max_attempts=3, initial_interval=0.01)


async def test_a_hung_activity_fails_by_heartbeat_timeout_and_its_retry_sees_the_last_details(
    make_app: Callable[..., geste.App],
) -> None:
    app = make_app()
    seen: list[tuple[int, Any]] = []
    cancelled: list[int] = []

    @app.activity(heartbeat_timeout=0.3, retry=FAST_RETRY)
    async def hang(ctx: geste.ActivityContext) -> Any:
        seen.append((ctx.attempt, ctx.heartbeat_details))
        if ctx.attempt == 1:
            ctx.heartbeat({"page": 1})
            ctx.heartbeat()  # alive, no new details: the last ones stay
            try:
                await asyncio.Event().wait()  # stuck, no heartbeat any more
            except asyncio.CancelledError:
                cancelled.append(ctx.attempt)
                raise
        return ctx.heartbeat_details

    @app.workflow
    async def hanging(ctx: geste.WorkflowContext) -> Any:
        return await hang(ctx)

    async with app:
        handle = await hanging.start()
        assert await handle.result(timeout=30) == {"page": 1}
        history = await app.history(handle.instance_id)
    assert seen == [(1, None), (2, {"page": 1})]
    assert cancelled == [1]  # the hung attempt's task was cancelled
    step = [e for e in history if e.kind == geste.StepKind.ACTIVITY]
    assert len(step) == 1 and step[0].payload["attempts"] == 2


async def test_every_attempt_hung_fails_the_workflow_with_the_typed_error(
    make_app: Callable[..., geste.App],
) -> None:
    app = make_app()
    attempts: list[int] = []

    @app.activity(
        heartbeat_timeout=timedelta(seconds=0.2), retry=geste.RetryPolicy(max_attempts=2, initial_interval=0)
    )
    async def stuck(ctx: geste.ActivityContext) -> None:
        attempts.append(ctx.attempt)
        await asyncio.Event().wait()

    @app.workflow
    async def stuck_flow(ctx: geste.WorkflowContext) -> str:
        try:
            await stuck(ctx)
        except ActivityHeartbeatTimeout as exc:  # also an ActivityTimeout, a TimeoutError
            assert isinstance(exc, ActivityTimeout) and isinstance(exc, TimeoutError)
            return f"gave up: {exc}"
        return "unreachable"

    async with app:
        handle = await stuck_flow.start()
        result = await handle.result(timeout=30)
        history = await app.history(handle.instance_id)
    assert attempts == [1, 2]
    (step,) = [e for e in history if e.kind == geste.StepKind.ACTIVITY]
    assert step.is_error and step.payload["attempts"] == 2
    rebuilt = decode_error(step.payload["error"])  # what a replay raises in the workflow: the same type
    assert type(rebuilt) is ActivityHeartbeatTimeout and "gave no heartbeat for 0.2s" in str(rebuilt)
    assert result.startswith("gave up: attempt 2 of activity stuck gave no heartbeat for 0.2s")


async def test_an_activity_that_keeps_beating_outlives_its_heartbeat_timeout(
    make_app: Callable[..., geste.App],
) -> None:
    app = make_app()
    attempts: list[int] = []

    @app.activity(heartbeat_timeout=1.0, retry=FAST_RETRY)
    async def busy(ctx: geste.ActivityContext) -> int:
        attempts.append(ctx.attempt)
        for i in range(15):  # 1.5 s in all, more than the heartbeat timeout: alive by its heartbeats
            ctx.heartbeat(i)
            await asyncio.sleep(0.1)
        return ctx.attempt

    @app.workflow
    async def busy_flow(ctx: geste.WorkflowContext) -> int:
        return await busy(ctx)

    async with app:
        assert await (await busy_flow.start()).result(timeout=30) == 1
    assert attempts == [1]


async def test_details_that_are_not_json_raise_at_the_call(make_app: Callable[..., geste.App]) -> None:
    app = make_app()

    @app.activity(heartbeat_timeout=5)
    async def bad(ctx: geste.ActivityContext) -> str:
        try:
            ctx.heartbeat({"when": object()})
        except SerializationError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "accepted"

    @app.workflow
    async def bad_flow(ctx: geste.WorkflowContext) -> str:
        return await bad(ctx)

    async with app:
        result = await (await bad_flow.start()).result(timeout=30)
    assert result.startswith("SerializationError: heartbeat details of activity bad cannot be stored as JSON")


@pytest.mark.parametrize("value", [0, -1, "soon", float("nan")])
def test_a_bad_heartbeat_timeout_is_refused(value: Any) -> None:
    app = geste.App("sqlite:///unused.db")
    with pytest.raises(ConfigurationError, match="heartbeat_timeout"):
        app.activity(heartbeat_timeout=value)


def test_a_context_built_by_hand_takes_heartbeats_and_has_no_details() -> None:
    ctx = geste.ActivityContext("i", "w", "a", 1, 1, 1)
    ctx.heartbeat({"ok": True})
    assert ctx.heartbeat_details is None


# -- cost: no statement per heartbeat ------------------------------------------------------------------
@pytest.fixture
def operations(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every storage operation (each one statement or more), by name, on both backends."""
    names = [
        n for n in dir(Storage) if not n.startswith("_") and asyncio.iscoroutinefunction(getattr(Storage, n))
    ]
    return count_storage_calls(monkeypatch, names)


async def test_a_thousand_heartbeats_cost_no_statement_and_the_renewal_writes_the_last(
    make_app: Callable[..., geste.App], operations: Counter[str], db_url: str
) -> None:
    """A long lease (renewals every 20 s) and a long poll: nothing else runs while the activity beats."""
    app = make_app(lock_timeout=60.0, poll_interval=60.0, listen_notify=False)
    counted: dict[str, int] = {}
    beating, renewed = asyncio.Event(), asyncio.Event()

    @app.activity(heartbeat_timeout=60)
    async def beat(ctx: geste.ActivityContext) -> int:
        await asyncio.sleep(0)  # the start's commit, if any, is done
        before = Counter(operations)
        for i in range(1000):
            ctx.heartbeat({"done": i + 1})
        counted.update(Counter(operations) - before)
        beating.set()
        await renewed.wait()
        return 1000

    @app.workflow
    async def beats(ctx: geste.WorkflowContext) -> int:
        return await beat(ctx)

    async with app:
        handle = await beats.start()
        await asyncio.wait_for(beating.wait(), 30)
        assert counted == {}  # 1,000 heartbeats: no storage operation, no statement
        worker = app._worker
        assert worker is not None
        operations.clear()
        await worker.renew()  # the heartbeat loop's renewal, now: one statement carries the details
        assert operations["renew"] == 1  # (a chore of the App may run meanwhile: not counted here)
        rows = await raw_query(
            db_url, "SELECT heartbeats FROM geste_instances WHERE instance_id = $1", handle.instance_id
        )
        assert json.loads(rows[0]["heartbeats"]) == {"1.1": {"done": 1000}}
        await raw_query(  # a mark: a renewal that wrote the column again would overwrite it
            db_url, "UPDATE geste_instances SET heartbeats = '{\"mark\":1}' WHERE instance_id = $1",
            handle.instance_id,
        )  # fmt: skip
        await worker.renew()  # no new details since: the column is left as it is
        rows = await raw_query(
            db_url, "SELECT heartbeats FROM geste_instances WHERE instance_id = $1", handle.instance_id
        )
        assert json.loads(rows[0]["heartbeats"]) == {"mark": 1}
        renewed.set()
        assert await handle.result(timeout=30) == 1000


# -- across processes: the details survive the worker ------------------------------------------------
async def test_the_details_survive_a_worker_killed_mid_activity(db_url: str, tmp_path: Path) -> None:
    with WorkerProcesses(tmp_path, db_url, "heartbeat_app") as workers:
        proc = await workers.spawn("doomed", stop_at=3)
        markers = workers.markers
        starter = build_app(db_url, worker_id="starter", markers=markers)
        starter.run_worker = False
        async with starter:
            handle = await starter.workflows["crunching"].start(5)
        await wait_until(lambda: (markers / "stuck-doomed").exists(), "the activity to hang after 3 items")

        async def written() -> bool:  # the dead-to-be worker's renewal (every lock_timeout / 3) wrote them
            rows = await raw_query(
                db_url, "SELECT heartbeats FROM geste_instances WHERE instance_id = $1", handle.instance_id
            )
            return rows[0]["heartbeats"] is not None and json.loads(rows[0]["heartbeats"])["1.1"]["done"] == 3

        await wait_until(written, "the details in the database")
        proc.kill()
        proc.wait()
        survivor = build_app(db_url, worker_id="survivor", markers=markers)
        async with survivor:  # takes the dead worker's lease over once it expires, runs the activity again
            result = await survivor.get_handle(handle.instance_id).result(timeout=30)
    assert result == {"resumed_from": {"done": 3, "worker": "doomed"}, "worker": "survivor", "attempt": 1}


async def test_a_renewal_with_a_lease_lost_writes_no_details(make_app: Callable[..., geste.App]) -> None:
    """The details are fenced as the renewal is: by ``(instance_id, lease_id)``."""
    app = make_app(run_worker=False)

    @app.workflow
    async def idle(ctx: geste.WorkflowContext) -> None:
        return None

    async with app:
        await idle.start_with_id("fenced")
        now = app.clock()
        (claim,) = await app.storage.claim("w1", now, now + 60, 1, workflows=["idle"])
        stale = Lease("fenced", "not-the-lease")
        kept = await app.storage.renew([stale], now + 60, now=now, heartbeats={"fenced": '{"1.1":1}'})
        assert kept == set()
        assert await app.storage.heartbeat_details("fenced") is None
        kept = await app.storage.renew([claim.lease], now + 60, now=now, heartbeats={"fenced": '{"1.1":2}'})
        assert kept == {"fenced"}
        assert await app.storage.heartbeat_details("fenced") == '{"1.1":2}'


def test_a_beat_after_its_attempt_ended_puts_nothing_back() -> None:
    """A ``def`` activity's thread can heartbeat just as its attempt ends: the buffer checks the attempt
    is live under its lock, so the entry the step's end dropped is never put back (a leak, and a stale
    write of details at a later renewal)."""
    from geste.engine.activities import HeartbeatBuffer, _Beat

    buffer = HeartbeatBuffer()
    beat = _Beat(buffer, "i", "1.3", None, 1000, "details")
    beat.beat({"done": 1})
    assert buffer.take() == {"i": '{"1.3":{"done":1}}'}
    beat.live = False  # the attempt ended
    buffer.drop("i", "1.3")
    buffer.put(beat, '{"done":2}')  # the thread's late beat, past its check outside the lock
    assert buffer.get("i", "1.3") is None and buffer.take() == {}
