"""Cron schedules (issue 19): exactly one run per tick, the missed and overlap policies, DST, pause/resume/
delete, and bad input. On a virtual clock: ``geste.testing.WorkflowEnvironment`` (SQLite), or Apps on each
backend sharing a clock only the test moves, whose schedule rounds the test drives (their loops run too).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

import geste
from geste._schedules import BACKFILL_LIMIT, Schedule, first_after, instance_id, plan, ticks_after
from geste.errors import ConfigurationError, InvalidScheduleError, ScheduleNotFoundError, StorageError
from geste.runtime.schedules import tick_input
from geste.storage import sqlite as sqlite_storage
from geste.storage.base import NewInstance, ScheduleStart
from geste.storage.postgres import PostgresStorage
from geste.testing import WorkflowEnvironment
from tests.support import raw_query

T0 = datetime(2026, 6, 1, 0, 30, tzinfo=UTC)
HOUR = 3600.0


class FrozenClock:
    """A clock that stands still until the test moves it (shared by the Apps of a test)."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now


def ids(name: str, start: datetime, end: datetime, cron: str = "0 * * * *", tz: str = "UTC") -> list[str]:
    """The instance ids of the ticks of ``cron`` in (start, end]."""
    ticks = itertools.takewhile(lambda t: t <= end.timestamp(), ticks_after(cron, tz, start.timestamp()))
    return [instance_id(name, tick) for tick in ticks]


async def scheduled_ids(url: str, name: str) -> list[str]:
    rows = await raw_query(
        url,
        "SELECT instance_id FROM geste_instances WHERE instance_id LIKE $1 ORDER BY instance_id",
        f"sched:{name}:%",
    )
    return [row["instance_id"] for row in rows]


def scheduled_app(make_app: Callable[..., geste.App], clock: FrozenClock, **options: object) -> geste.App:
    """An App whose leases outlive any jump of the frozen clock."""
    return make_app(clock=clock, lock_timeout=1e6, **options)


async def all_finished(app: geste.App, instance_ids: list[str]) -> None:
    for iid in instance_ids:
        await app.get_handle(iid).result(timeout=30)


async def rounds(*apps: geste.App) -> None:
    """One schedule round of each App at once (they race), until nothing is due."""
    loops = [app.runtime.schedules for app in apps]
    assert all(loop is not None for loop in loops)
    await asyncio.gather(*(loop.catch_up() for loop in loops if loop is not None))


# -- exactly one run per tick ---------------------------------------------------------------------------
async def test_24_simulated_hours_start_each_tick_once() -> None:
    app = geste.App("sqlite:///unused.db")

    @app.schedule("0 * * * *")
    @app.workflow
    async def hourly(ctx: geste.WorkflowContext) -> str:
        return "done"

    @app.schedule("30 2 * * *", name="nightly")
    @app.workflow
    async def with_tick(ctx: geste.WorkflowContext, tick: datetime) -> str:
        return tick.isoformat()

    async with WorkflowEnvironment(app, start_at=T0) as env:
        await env.advance(timedelta(hours=24))
        expected = ids("hourly", T0, T0 + timedelta(hours=24))
        assert len(expected) == 24
        assert await scheduled_ids(env.database_url, "hourly") == expected
        for iid in expected:
            assert (await app.get_instance(iid)).status == geste.Status.COMPLETED
        (nightly,) = await scheduled_ids(env.database_url, "nightly")
        assert nightly == "sched:nightly:2026-06-01T02:30:00Z"
        assert await app.get_handle(nightly).result() == "2026-06-01T02:30:00+00:00"
        (info, night) = await app.list_schedules()
        assert (info.name, info.next_tick) == ("hourly", T0 + timedelta(hours=24, minutes=30))
        assert info.last_instance_id == expected[-1]
        assert night.last_tick == datetime(2026, 6, 1, 2, 30, tzinfo=UTC)


async def test_two_workers_racing_on_one_database_start_each_tick_once(
    make_app: Callable[..., geste.App], db_url: str
) -> None:
    clock = FrozenClock(T0)
    apps = [scheduled_app(make_app, clock), scheduled_app(make_app, clock)]
    for app in apps:

        @app.schedule("0 * * * *", name="hourly", overlap="alongside")  # the workers run in real time
        @app.workflow(name="tick")
        async def tick(ctx: geste.WorkflowContext) -> int:
            return 1

        @app.schedule("*/5 * * * *", name="backfilled", missed="all", overlap="alongside")
        @app.workflow(name="five")
        async def five(ctx: geste.WorkflowContext) -> int:
            return 5

    async with apps[0], apps[1]:
        for _ in range(24 * 6):  # 10 minutes a step: two five-minute ticks due at each, one missed
            clock.now += 600
            await rounds(*apps)
        end = T0 + timedelta(hours=24)
        hourly, backfilled = ids("hourly", T0, end), ids("backfilled", T0, end, "*/5 * * * *")
        assert (len(hourly), len(backfilled)) == (24, 288)
        assert await scheduled_ids(db_url, "hourly") == hourly
        assert await scheduled_ids(db_url, "backfilled") == backfilled
        await all_finished(apps[0], hourly + backfilled)


async def test_a_round_that_read_a_tick_another_round_started_writes_nothing(
    make_app: Callable[..., geste.App], db_url: str
) -> None:
    """Both rounds read the tick; the first moves it, the second's conditional move finds it moved and
    creates nothing, not even an instance of another id (say, a later tick its clock saw as latest)."""
    clock = FrozenClock(T0)
    app = scheduled_app(make_app, clock)

    @app.schedule("0 * * * *")
    @app.workflow
    async def job(ctx: geste.WorkflowContext) -> None:
        return None

    async with app:
        loop = app.runtime.schedules
        assert loop is not None
        await loop.stop()
        clock.now += HOUR
        (row,) = await app.storage.schedules_due(clock.now, limit=10)
        (again,) = await app.storage.schedules_due(clock.now, limit=10)  # another worker's round
        other = NewInstance("not-started", "job", tick_input(again, 0), 0)
        assert await loop._fire(row, clock.now) is False
        assert await app.storage.schedule_fire(
            again.name,
            expected=again.next_tick,
            next_tick=again.next_tick + HOUR,
            starts=[ScheduleStart(again.next_tick, other)],
            overlap="alongside",
            now=clock.now,
        ) is None  # fmt: skip
        assert await scheduled_ids(db_url, "job") == ["sched:job:2026-06-01T01:00:00Z"]
        assert (
            await raw_query(db_url, "SELECT 1 FROM geste_instances WHERE instance_id = 'not-started'") == []
        )
        await all_finished(app, ["sched:job:2026-06-01T01:00:00Z"])


async def test_a_round_that_fails_mid_write_leaves_nothing_and_the_tick_starts_once(
    make_app: Callable[..., geste.App], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move of the next tick and the tick's instance are one transaction: a round cut short after the
    insert (a failing statement, as a crash would) leaves neither, and the next round starts the tick."""
    clock = FrozenClock(T0)
    app = scheduled_app(make_app, clock)

    @app.schedule("0 * * * *")
    @app.workflow
    async def job(ctx: geste.WorkflowContext) -> None:
        return None

    async with app:
        loop = app.runtime.schedules
        assert loop is not None
        await loop.stop()  # the test drives the rounds
        storage = app.storage
        queries = storage._q if isinstance(storage, PostgresStorage) else sqlite_storage.Q
        monkeypatch.setitem(queries, "schedule_started", "UPDATE geste_schedules SET no_such_column = 1")
        clock.now += HOUR
        with pytest.raises(StorageError):
            await loop.fire_due()
        assert await scheduled_ids(db_url, "job") == []
        assert [s.next_tick for s in await app.list_schedules()] == [T0 + timedelta(minutes=30)]
        monkeypatch.undo()
        await loop.catch_up()
        await loop.catch_up()
        assert await scheduled_ids(db_url, "job") == ["sched:job:2026-06-01T01:00:00Z"]
        await all_finished(app, ["sched:job:2026-06-01T01:00:00Z"])


# -- missed ticks ----------------------------------------------------------------------------------------
def backfill_app(make_app: Callable[..., geste.App], clock: FrozenClock) -> geste.App:
    app = scheduled_app(make_app, clock)

    @app.workflow
    async def job(ctx: geste.WorkflowContext, tick: datetime) -> str:
        return tick.isoformat()

    for missed in ("latest", "skip", "all"):
        app.schedule("0 * * * *", name=f"bf-{missed}", missed=missed)(job)
    return app


async def test_ticks_missed_for_three_hours_by_each_policy(
    make_app: Callable[..., geste.App], db_url: str
) -> None:
    clock = FrozenClock(T0)  # 00:30: the next tick is 01:00
    async with backfill_app(make_app, clock):
        pass
    clock.now += 3 * HOUR  # 03:30: nobody ran at 01:00, 02:00 and 03:00
    app = backfill_app(make_app, clock)  # the same declarations: the stored next tick is kept
    async with app:
        await rounds(app)
        at = [f"2026-06-01T0{h}:00:00Z" for h in range(1, 5)]
        assert await scheduled_ids(db_url, "bf-latest") == [f"sched:bf-latest:{at[2]}"]
        assert await scheduled_ids(db_url, "bf-skip") == []
        assert await scheduled_ids(db_url, "bf-all") == [f"sched:bf-all:{t}" for t in at[:3]]
        started = [iid for name in ("latest", "all") for iid in await scheduled_ids(db_url, f"bf-{name}")]
        await all_finished(app, started)

        clock.now += 0.5 * HOUR  # 04:00: on time, every policy starts it
        await rounds(app)
        for missed in ("latest", "skip", "all"):
            assert (await scheduled_ids(db_url, f"bf-{missed}"))[-1] == f"sched:bf-{missed}:{at[3]}"


async def test_a_long_backfill_goes_on_over_rounds_each_bounded() -> None:
    app = geste.App("sqlite:///unused.db")

    @app.schedule("* * * * *", missed="all", overlap="alongside")
    @app.workflow
    async def minutely(ctx: geste.WorkflowContext) -> None:
        return None

    async with WorkflowEnvironment(app, start_at=T0) as env:
        schedules = app.runtime.schedules
        assert schedules is not None
        await schedules.stop()  # the test drives the rounds
        env._now += 5 * HOUR  # 300 ticks passed unseen
        assert await schedules.fire_due() is True  # one round: BACKFILL_LIMIT ticks, more due
        assert len(await scheduled_ids(env.database_url, "minutely")) == BACKFILL_LIMIT
        await schedules.catch_up()
        assert len(await scheduled_ids(env.database_url, "minutely")) == 300
        await env.wait_until_idle()


# -- overlap ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", ["skip", "alongside"])
async def test_a_tick_while_the_previous_run_is_unfinished(overlap: str) -> None:
    app = geste.App("sqlite:///unused.db")

    @app.schedule("0 * * * *", overlap=overlap)
    @app.workflow
    async def slow(ctx: geste.WorkflowContext) -> None:
        await ctx.sleep(timedelta(minutes=90))

    async with WorkflowEnvironment(app, start_at=T0) as env:
        await env.advance(timedelta(hours=3))  # 01:00, 02:00 (01:00 sleeps), 03:00 (01:00 ended at 02:30)
        found = [iid[-9:-7] for iid in await scheduled_ids(env.database_url, "slow")]
        assert found == (["01", "03"] if overlap == "skip" else ["01", "02", "03"])


# -- DST -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("start", "expected"),
    [  # Europe/Paris: clocks go forward at 02:00 on 2026-03-29, back at 03:00 on 2026-10-25
        (datetime(2026, 3, 28, 12, tzinfo=UTC), ["2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]),
        (datetime(2026, 10, 24, 12, tzinfo=UTC), ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]),
    ],
)
async def test_a_daily_tick_across_a_dst_transition(start: datetime, expected: list[str]) -> None:
    """cronsim follows Debian cron: 02:30 does not exist on the day clocks go forward (it runs at 03:00
    CEST, as soon as the time exists), and occurs twice on the day they go back (it runs once, at the
    first); an hourly job keeps one tick per real hour through both."""
    app = geste.App("sqlite:///unused.db")

    @app.schedule("30 2 * * *", timezone="Europe/Paris")
    @app.workflow
    async def nightly(ctx: geste.WorkflowContext) -> None:
        return None

    @app.schedule("0 * * * *", timezone="Europe/Paris")
    @app.workflow
    async def hourly(ctx: geste.WorkflowContext) -> None:
        return None

    async with WorkflowEnvironment(app, start_at=start) as env:
        await env.advance(timedelta(days=2))
        assert await scheduled_ids(env.database_url, "nightly") == [f"sched:nightly:{t}" for t in expected]
        hours = await scheduled_ids(env.database_url, "hourly")
        assert hours == ids("hourly", start, start + timedelta(days=2), tz="UTC")  # every real hour
        assert len(hours) == 48


# -- at run time -----------------------------------------------------------------------------------------
async def test_create_pause_resume_delete(make_app: Callable[..., geste.App], db_url: str) -> None:
    clock = FrozenClock(T0)
    app = scheduled_app(make_app, clock)

    @app.workflow
    async def report(ctx: geste.WorkflowContext) -> None:
        return None

    async with app:
        info = await app.create_schedule("reports", report, "0 * * * *", missed="all")
        assert (info.workflow_name, info.paused, info.next_tick) == (
            "report",
            False,
            T0 + timedelta(minutes=30),
        )
        clock.now += HOUR  # 01:30
        await rounds(app)
        assert len(await scheduled_ids(db_url, "reports")) == 1
        await all_finished(app, await scheduled_ids(db_url, "reports"))  # overlap="skip" would skip 04:00

        await app.pause_schedule("reports")
        assert [s.paused for s in await app.list_schedules()] == [True]
        clock.now += 2 * HOUR  # 03:30: 02:00 and 03:00 pass while paused
        await rounds(app)
        assert len(await scheduled_ids(db_url, "reports")) == 1

        await app.resume_schedule("reports")  # from the next tick to come: the paused ones are not started
        (info,) = await app.list_schedules()
        assert (info.paused, info.next_tick) == (False, datetime(2026, 6, 1, 4, tzinfo=UTC))
        clock.now += HOUR  # 04:30
        await rounds(app)
        assert (await scheduled_ids(db_url, "reports"))[-1] == "sched:reports:2026-06-01T04:00:00Z"
        assert len(await scheduled_ids(db_url, "reports")) == 2

        await app.delete_schedule("reports")
        assert await app.list_schedules() == []
        clock.now += HOUR
        await rounds(app)
        assert len(await scheduled_ids(db_url, "reports")) == 2  # its instances stay; no new one
        for call in (app.pause_schedule, app.resume_schedule, app.delete_schedule):
            with pytest.raises(ScheduleNotFoundError):
                await call("reports")
        await all_finished(app, await scheduled_ids(db_url, "reports"))


async def test_a_changed_declaration_moves_the_next_tick(make_app: Callable[..., geste.App]) -> None:
    clock = FrozenClock(T0)
    app = scheduled_app(make_app, clock)

    @app.workflow
    async def job(ctx: geste.WorkflowContext) -> None:
        return None

    async with app:
        await app.create_schedule("job", job, "0 * * * *")
        await app.pause_schedule("job")
        clock.now += 3 * HOUR
        info = await app.create_schedule("job", "job", "15 * * * *")  # updated: paused still, new tick
        assert (info.cron, info.paused, info.next_tick) == (
            "15 * * * *",
            True,
            datetime(2026, 6, 1, 4, 15, tzinfo=UTC),
        )


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"cron": "not a cron"},
        {"cron": "61 * * * *"},
        {"cron": "0 0 30 2 *"},  # never ticks
        {"timezone": "Mars/Olympus"},
        {"timezone": ""},
        {"missed": "sometimes"},
        {"overlap": "sometimes"},
        {"queue": ""},
        {"queue": 3},
        {"priority": 1},  # without a queue
        {"queue": "q", "priority": "high"},
        {"queue": "q", "priority": 2**40},
    ],
)
def test_bad_input_is_refused_at_declaration(options: dict[str, object]) -> None:
    app = geste.App("sqlite:///unused.db")
    arguments = {"cron": "0 * * * *"} | options
    with pytest.raises(InvalidScheduleError) as raised:
        app.schedule(arguments.pop("cron"), **arguments)
    assert isinstance(raised.value, ConfigurationError)


def test_a_workflow_of_more_than_the_tick_is_refused() -> None:
    app = geste.App("sqlite:///unused.db")

    @app.workflow
    async def two(ctx: geste.WorkflowContext, a: int, b: int) -> None:
        return None

    with pytest.raises(InvalidScheduleError, match="takes 2 arguments"):
        app.schedule("0 * * * *")(two)
    app.schedule("0 * * * *", name="none")(_no_args(app))
    with pytest.raises(InvalidScheduleError, match="declared already"):
        app.schedule("0 * * * *", name="none")(_no_args(app, "other"))

    @app.schedule("0 * * * *")
    async def plain(ctx: geste.WorkflowContext) -> None:  # registered as a workflow by the decorator
        return None

    assert app.workflows["plain"] is plain
    assert sorted(app.schedules.declared) == ["none", "plain"]


def _no_args(app: geste.App, name: str = "none") -> geste.Workflow[[], None]:
    async def fn(ctx: geste.WorkflowContext) -> None:
        return None

    return app.workflow(fn, name=name)


async def test_create_schedule_refuses_bad_input(make_app: Callable[..., geste.App]) -> None:
    app = make_app()

    @app.workflow
    async def job(ctx: geste.WorkflowContext) -> None:
        return None

    async with app:
        with pytest.raises(InvalidScheduleError):
            await app.create_schedule("x", job, "0 * * * *", timezone="Nowhere/Atall")
        with pytest.raises(InvalidScheduleError):
            await app.create_schedule("x", job, "* * *")
        with pytest.raises(geste.errors.UnknownWorkflowError):
            await app.create_schedule("x", "nope", "0 * * * *")
        assert await app.list_schedules() == []


@pytest.mark.parametrize("cron", ["*/15 * * * *", "30 2 * * *", "0 * * * *", "59 1 * * *"])
@pytest.mark.parametrize("missed", ["latest", "skip", "all"])
def test_rounds_every_7_minutes_through_both_transitions_start_only_due_ticks(cron: str, missed: str) -> None:
    """``plan`` through the two Paris DST days: it starts only ticks already due, in order, each once, and
    leaves a next tick to come (the backfill aside, cut at its limit)."""
    for day in (datetime(2026, 3, 28, 20, tzinfo=UTC), datetime(2026, 10, 24, 20, tzinfo=UTC)):
        schedule = Schedule("s", "w", cron, "Europe/Paris", missed)
        now = day.timestamp()
        next_tick, started = first_after(cron, "Europe/Paris", now), [now]
        for _ in range(12 * 60 // 7):
            now += 7 * 60
            if next_tick <= now:
                decided = plan(schedule, next_tick, now)
                assert all(started[-1] < tick <= now for tick in decided.fire)
                started.extend(decided.fire)
                assert decided.next_tick > now or len(decided.fire) == BACKFILL_LIMIT
                next_tick = decided.next_tick
