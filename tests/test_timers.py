"""Durable timers: ``ctx.sleep`` and ``ctx.sleep_until`` release the instance and resume it when due.

Most tests drive the App with a clock the test moves forward, so "not yet due" and "due" are decided by
the test, not by the speed of the machine; one test uses the real clock end to end.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

import geste

from .support import MovableClock, wait_until

MakeApp = Callable[..., geste.App]
HOUR = 3600.0


async def timer_rows(db_url: str, instance_id: str) -> list[tuple[int, float]]:
    """The rows of ``geste_timers`` for one instance, read straight from the database."""
    if db_url.startswith("sqlite:///"):
        with closing(sqlite3.connect(db_url[len("sqlite:///") :])) as conn:
            rows = conn.execute(
                "SELECT seq, expires_at FROM geste_timers WHERE instance_id = ? ORDER BY seq", (instance_id,)
            ).fetchall()
        return [(int(seq), float(expires_at)) for seq, expires_at in rows]
    import asyncpg

    parts = urlsplit(db_url)
    schema = parse_qs(parts.query)["schema"][0]
    conn = await asyncpg.connect(urlunsplit(parts._replace(query="")))
    try:
        records = await conn.fetch(
            f'SELECT seq, expires_at FROM "{schema}".geste_timers WHERE instance_id = $1 ORDER BY seq',
            instance_id,
        )
    finally:
        await conn.close()
    return [(int(r[0]), float(r[1])) for r in records]


async def assert_parked(app: geste.App, instance_id: str, *, alone: bool = True) -> None:
    """Waiting in the database, and no coroutine or task of it left in this process."""

    def run_task_left() -> bool:
        return any(t.get_name() == f"geste-run-{instance_id}" for t in asyncio.all_tasks())

    async def parked() -> bool:
        info = await app.get_instance(instance_id)
        assert app._worker is not None
        # the run leaves the worker's table when its suspension commits; its task ends a turn or two of
        # the event loop later (the last of its hooks): wait for both, a leftover task would never end
        return (
            info.status == geste.Status.WAITING
            and instance_id not in app._worker._running
            and not run_task_left()
        )

    await wait_until(parked)
    if alone:
        assert app._worker is not None and app._worker._running == {}
    info = await app.get_instance(instance_id)
    assert info.locked_by is None and info.lock_expires_at is None


def sleep_entry(history: list[geste.HistoryEntry]) -> geste.HistoryEntry:
    (entry,) = [e for e in history if e.kind == geste.StepKind.SLEEP]
    return entry


@pytest.mark.parametrize("how", ["seconds", "timedelta", "until-aware", "until-naive"])
async def test_a_sleeping_instance_is_parked_with_a_timer_and_resumes_when_due(
    make_app: MakeApp, db_url: str, how: str
) -> None:
    clock = MovableClock()
    app = make_app(clock=clock)
    ran_after: list[float] = []

    @app.workflow
    async def flow(ctx: geste.WorkflowContext, when: datetime) -> str:
        if how == "seconds":
            await ctx.sleep(HOUR)
        elif how == "timedelta":
            await ctx.sleep(timedelta(hours=1))
        else:
            await ctx.sleep_until(when)
        ran_after.append(clock())
        return "woke"

    async with app:
        start = clock()
        when = datetime.fromtimestamp(start + HOUR, UTC)
        if how == "until-naive":
            when = when.replace(tzinfo=None)
        handle = await flow.start_with_id(f"sleeper-{how}", when)
        await assert_parked(app, handle.instance_id)

        entry = sleep_entry(await handle.history())
        expires_at = entry.payload["expires_at"]
        assert expires_at == pytest.approx(start + HOUR, abs=5)
        ((timer_seq, timer_expires_at),) = await timer_rows(db_url, handle.instance_id)
        assert (timer_seq, timer_expires_at) == (entry.seq, pytest.approx(expires_at))

        clock.advance(HOUR + 1)
        assert await handle.result(timeout=10) == "woke"
        info = await handle.info()

    assert len(ran_after) == 1 and ran_after[0] >= expires_at
    assert info.finished_at is not None and info.finished_at.timestamp() >= expires_at
    assert await timer_rows(db_url, handle.instance_id) == []


async def test_a_timer_does_not_fire_before_it_is_due(make_app: MakeApp) -> None:
    clock = MovableClock()
    app = make_app(clock=clock)

    @app.workflow
    async def sleeper(ctx: geste.WorkflowContext, seconds: float) -> float:
        await ctx.sleep(seconds)
        return seconds

    async with app:
        long = await sleeper.start(10 * HOUR)
        short = await sleeper.start(HOUR)
        await assert_parked(app, long.instance_id, alone=False)
        await assert_parked(app, short.instance_id)

        clock.advance(2 * HOUR)  # due for the short one only
        assert await short.result(timeout=10) == HOUR
        assert await long.status() == geste.Status.WAITING
        with pytest.raises(geste.errors.ResultTimeout):
            await long.result(timeout=0.2)

        clock.advance(10 * HOUR)
        assert await long.result(timeout=10) == 10 * HOUR


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_a_sleep_survives_the_app_closing(make_app: MakeApp, db_url: str) -> None:
    clock = MovableClock()
    calls: list[str] = []

    def register(app: geste.App) -> None:
        @app.activity
        async def step(ctx: geste.ActivityContext, name: str) -> str:
            calls.append(name)
            return name

        @app.workflow
        async def flow(ctx: geste.WorkflowContext) -> list[str]:
            before = await step(ctx, "before")
            await ctx.sleep(timedelta(minutes=30))
            after = await step(ctx, "after")
            return [before, after]

    first_app = make_app(clock=clock)
    register(first_app)
    async with first_app:
        await first_app.start_workflow("flow", instance_id="nap-1")
        await assert_parked(first_app, "nap-1")
    assert calls == ["before"]
    assert len(await timer_rows(db_url, "nap-1")) == 1

    clock.advance(31 * 60)
    second_app = make_app(clock=clock)
    register(second_app)
    async with second_app:
        assert await second_app.get_handle("nap-1").result(timeout=10) == ["before", "after"]

    assert calls == ["before", "after"]
    assert await timer_rows(db_url, "nap-1") == []


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_a_short_sleep_resumes_on_the_real_clock(make_app: MakeApp) -> None:
    app = make_app()
    woke_at: list[float] = []

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        await ctx.sleep(0.3)
        woke_at.append(time.time())

    async with app:
        handle = await flow.start()
        await handle.result(timeout=10)
        expires_at = sleep_entry(await handle.history()).payload["expires_at"]

    assert len(woke_at) == 1 and woke_at[0] >= expires_at


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_sleep_until_a_past_moment_does_not_wait(make_app: MakeApp, db_url: str) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext, when: datetime) -> str:
        await ctx.sleep_until(when)
        return "at once"

    async with app:
        handle = await flow.start(datetime(2000, 1, 1, tzinfo=UTC))
        assert await handle.result(timeout=10) == "at once"
        history = await handle.history()

    assert [str(e.kind) for e in history] == ["now", "sleep"]
    assert history[1].payload["seconds"] == 0
    assert await timer_rows(db_url, handle.instance_id) == []


@pytest.mark.parametrize("bad", [-1, float("nan"), "10"])
async def test_an_invalid_sleep_duration_fails_the_workflow(make_app: MakeApp, bad: Any) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        await ctx.sleep(bad)

    async with app:
        with pytest.raises(geste.errors.WorkflowFailed) as failed:
            await (await flow.start()).result(timeout=10)
    assert failed.value.error["type"] == "geste.errors.ConfigurationError"


async def test_a_claim_takes_what_is_due_within_its_horizon_and_nothing_later(make_app: MakeApp) -> None:
    """The worker claims a timer a little before its time (``due_before``) and waits for it in memory;
    the storage takes exactly what is due by the horizon, and judges leases by ``now`` alone."""
    from geste.storage.base import Lease, NewInstance

    app = make_app(run_worker=False)
    async with app:
        storage = app.storage
        for name, run_at in (("soon", 100.02), ("later", 100.5)):
            lease = Lease(name, f"lease-{name}")
            await storage.create_instance(
                NewInstance(name, "w", "{}", 1.0), lease=lease, worker_id="w0", lock_expires_at=99.0
            )
            await storage.release([lease], 99.0, run_at=run_at)
        assert await storage.claim("w1", 100.0, 110.0, 10, workflows=["w"]) == []
        (claim,) = await storage.claim("w1", 100.0, 110.0, 10, due_before=100.05, workflows=["w"])
        assert claim.lease.instance_id == "soon" and claim.run_at == pytest.approx(100.02)
        assert (
            await storage.claim("w2", 100.0, 110.0, 10, due_before=100.05, workflows=["w"]) == []
        )  # held by w1


async def test_a_claim_tells_when_the_next_free_instance_becomes_runnable(make_app: MakeApp) -> None:
    """The worker sleeps on what its claim returns (no second query): the earliest ``run_at`` after the
    horizon among instances nobody holds, not counting the ones the claim just took."""
    from geste.storage.base import Lease, NewInstance

    app = make_app(run_worker=False)
    async with app:
        storage = app.storage
        for name, run_at in (("due", 100.0), ("held", 100.2), ("next", 100.5), ("last", 107.0)):
            lease = Lease(name, f"lease-{name}")
            await storage.create_instance(
                NewInstance(name, "w", "{}", 1.0), lease=lease, worker_id="w0", lock_expires_at=99.0
            )
            await storage.release([lease], 99.0, run_at=run_at)
        held = await storage.claim(
            "w2", 100.2, 200.0, 10, due_before=100.2, workflows=["w"]
        )  # takes "due" and "held"
        assert sorted(c.lease.instance_id for c in held) == ["due", "held"]
        assert held.next_run_at == pytest.approx(100.5)
        assert (await storage.claim("w1", 100.3, 200.0, 10, workflows=["w"])) == [] and (
            await storage.claim("w1", 100.3, 200.0, 10, workflows=["w"])
        ).next_run_at == pytest.approx(100.5)
        (taken,) = await storage.claim("w1", 100.5, 200.0, 10, workflows=["w"])
        assert taken.lease.instance_id == "next"
        last = await storage.claim("w1", 100.6, 200.0, 10, workflows=["w"])
        assert last == [] and last.next_run_at == pytest.approx(107.0)
        (final,) = await storage.claim("w1", 107.0, 200.0, 10, workflows=["w"])
        assert final.lease.instance_id == "last"
        assert (await storage.claim("w1", 107.0, 200.0, 10, workflows=["w"])).next_run_at is None
