"""Cron schedules as an operator sees them: ``app.status()`` / ``geste status`` (each schedule's next tick,
whether it is paused, its last instance) and the metrics (ticks started, skipped by overlap, missed, by
schedule; scheduled starts counted as workflows started). On each backend, on a clock only the test moves,
whose schedule rounds the test drives.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime

import geste
from tests.support import run_cli

T0 = datetime(2026, 6, 1, 0, 30, tzinfo=UTC)
HOUR = 3600.0


def at(hour: int, minute: int, second: int = 0) -> float:
    return datetime(2026, 6, 1, hour, minute, second, tzinfo=UTC).timestamp()


class FrozenClock:
    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now


def observed_app(make_app: Callable[..., geste.App], clock: FrozenClock) -> geste.App:
    app = make_app(clock=clock, lock_timeout=1e6)

    @app.schedule("0 * * * *", name="late", missed="latest")
    @app.workflow
    async def quick(ctx: geste.WorkflowContext) -> str:
        return "done"

    @app.schedule("0 * * * *", name="stuck", missed="skip")
    @app.workflow
    async def waits(ctx: geste.WorkflowContext) -> None:
        await ctx.wait_event("never")  # unfinished: the next tick is skipped (overlap="skip")

    @app.schedule("15 * * * *", name="resting")
    @app.workflow
    async def rests(ctx: geste.WorkflowContext) -> None:
        return None

    return app


async def catch_up(app: geste.App) -> None:
    loop = app.runtime.schedules
    assert loop is not None
    await loop.catch_up()


async def drive(*apps: geste.App) -> None:
    """Stop the Apps' own schedule loops: the test drives the rounds."""
    for app in apps:
        loop = app.runtime.schedules
        assert loop is not None
        await loop.stop()


async def test_status_and_metrics_of_schedules(make_app: Callable[..., geste.App], db_url: str) -> None:
    clock = FrozenClock(T0)
    app = observed_app(make_app, clock)
    async with app:
        await drive(app)
        await app.pause_schedule("resting")
        clock.now = at(1, 0, 30)  # on time: late and stuck start 01:00
        await catch_up(app)
        await app.get_handle("sched:late:2026-06-01T01:00:00Z").result(timeout=30)
        await app.get_handle("sched:stuck:2026-06-01T01:00:00Z").info()
        clock.now = at(4, 30)  # 02:00, 03:00 and 04:00 due at once, 04:00 late by 30 minutes
        await catch_up(app)

        snapshot = await app.metrics.snapshot()
        ticks = "geste_schedule_ticks_total"
        assert snapshot.value(ticks, schedule="late", outcome="started") == 2  # 01:00, 04:00
        assert snapshot.value(ticks, schedule="late", outcome="missed") == 2  # 02:00, 03:00
        assert snapshot.value(ticks, schedule="late", outcome="skipped") == 0
        assert snapshot.value(ticks, schedule="stuck", outcome="started") == 1  # 01:00
        assert snapshot.value(ticks, schedule="stuck", outcome="missed") == 3  # skip: each was late
        assert snapshot.value(ticks, schedule="resting") == 0  # paused
        assert snapshot.value("geste_workflows_started_total", workflow="quick") == 2
        assert snapshot.value("geste_workflows_started_total", workflow="waits") == 1
        assert 'geste_schedule_ticks_total{schedule="late",outcome="missed"} 2' in snapshot.text()

        await app.get_handle("sched:late:2026-06-01T04:00:00Z").result(timeout=30)
        clock.now = at(5, 0, 30)  # on time for 05:00
        await catch_up(app)  # stuck's 01:00 still waits: its 05:00 is skipped
        snapshot = await app.metrics.snapshot()
        assert snapshot.value(ticks, schedule="stuck", outcome="skipped") == 1
        assert snapshot.value(ticks, schedule="stuck", outcome="started") == 1
        assert snapshot.value(ticks, schedule="late", outcome="started") == 3

        status = await app.status()
        late, resting, stuck = status.schedules
        assert (late.name, late.paused, late.next_tick) == (
            "late",
            False,
            datetime(2026, 6, 1, 6, tzinfo=UTC),
        )
        assert late.last_instance_id == "sched:late:2026-06-01T05:00:00Z"
        assert (resting.name, resting.paused) == ("resting", True)
        assert (stuck.name, stuck.last_instance_id) == ("stuck", "sched:stuck:2026-06-01T01:00:00Z")
        shown = status.as_dict()["schedules"]
        assert [s["name"] for s in shown] == ["late", "resting", "stuck"]
        assert shown[0]["next_tick"] == "2026-06-01T06:00:00+00:00" and shown[1]["paused"] is True

    as_json = await asyncio.to_thread(run_cli, ["status", "--json", "--database-url", db_url])
    assert as_json.exit_code == 0, as_json.output
    assert [s["last_instance_id"] for s in json.loads(as_json.stdout)["schedules"]] == [
        "sched:late:2026-06-01T05:00:00Z",
        None,
        "sched:stuck:2026-06-01T01:00:00Z",
    ]
    table = await asyncio.to_thread(run_cli, ["status", "--database-url", db_url])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    row = lines.index("schedules (3):")
    assert lines[row + 1].split() == [
        "SCHEDULE", "WORKFLOW", "CRON", "TIMEZONE", "PAUSED", "NEXT", "TICK", "LAST", "INSTANCE", "QUEUE",
        "WAITING",
    ]  # fmt: skip
    assert lines[row + 2].split()[-3:] == ["sched:late:2026-06-01T05:00:00Z", "-", "0"]  # no queue
    assert lines[row + 3].split()[-5:] == ["yes", "-", "-", "-", "0"]  # paused: no next tick; never started


async def test_a_round_another_worker_won_counts_nothing(
    make_app: Callable[..., geste.App], db_url: str
) -> None:
    """Two workers race for the ticks: each tick is counted once, by the worker whose round started it."""
    clock = FrozenClock(T0)
    first, second = observed_app(make_app, clock), observed_app(make_app, clock)
    async with first, second:
        await drive(first, second)
        for hour in (1, 2, 3):
            clock.now += HOUR
            await catch_up(first)
            await catch_up(second)  # finds nothing due: the first moved every tick
            await first.get_handle(f"sched:late:2026-06-01T0{hour}:00:00Z").result(timeout=30)
        counts = [
            (await app.metrics.snapshot()).value(
                "geste_schedule_ticks_total", schedule="late", outcome="started"
            )
            for app in (first, second)
        ]
        assert counts == [3, 0]
        assert (await first.metrics.snapshot()).value(
            "geste_workflows_started_total", workflow="quick"
        ) == 3  # fmt: skip
        assert (await second.metrics.snapshot()).value("geste_workflows_started_total") == 0
