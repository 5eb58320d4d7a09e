"""Schedules onto a queue, and ``overlap="queue"`` (schema 24): a tick whose previous run is unfinished
waits, then runs once that run has ended, each tick once and in order, runs never overlapping. On the
virtual clock of ``geste.testing`` (SQLite), and with Apps on each backend sharing a clock only the test
moves (``tests/test_schedules.py``'s way), the runs held by activities the test lets return.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

import geste
from geste._schedules import instance_id
from geste.errors import StorageError
from geste.runtime.schedules import tick_instance
from geste.storage import sqlite as sqlite_storage
from geste.storage.postgres import PostgresStorage
from geste.testing import WorkflowEnvironment
from tests.support import raw_query, run_cli, wait_until
from tests.test_schedules import HOUR, T0, FrozenClock, all_finished, rounds, scheduled_app, scheduled_ids
from tests.test_viewer import page, serving

MINUTE = 60.0


def hour(h: int, m: int = 0) -> datetime:
    return datetime(2026, 6, 1, h, m, tzinfo=UTC)


async def waiting_ticks(url: str, name: str) -> list[float]:
    rows = await raw_query(url, "SELECT tick FROM geste_schedule_waiting WHERE name = $1 ORDER BY tick", name)
    return [float(row["tick"]) for row in rows]


# -- on the virtual clock --------------------------------------------------------------------------------
@pytest.mark.parametrize("onto", [None, "line"])
async def test_runs_longer_than_the_period_never_overlap_and_every_tick_runs_once(onto: str | None) -> None:
    """Hourly ticks, runs of 90 minutes: each tick's run starts when the previous one ends (01:00, 02:30,
    04:00, ...), none is skipped or started twice; the ticks not started yet wait, in order. Onto a queue
    (``line``), each released tick's instance is queued there and admitted by the worker."""
    app = geste.App("sqlite:///unused.db", queues=[geste.Queue("line", concurrency=5)])

    @app.schedule("0 * * * *", overlap="queue", queue=onto)
    @app.workflow
    async def slow(ctx: geste.WorkflowContext, tick: datetime) -> list[str]:
        started = ctx.now()
        await ctx.sleep(timedelta(minutes=90))
        return [started.isoformat(), ctx.now().isoformat()]

    async with WorkflowEnvironment(app, start_at=T0) as env:
        await env.advance(timedelta(hours=12))  # 00:30 to 12:30: ticks 01:00 ... 12:00
        started = await scheduled_ids(env.database_url, "slow")
        runs = [await app.get_handle(iid).result() for iid in started[:-1]]  # the last one still runs
        assert started == [
            instance_id("slow", (T0 + timedelta(minutes=30 + 60 * n)).timestamp()) for n in range(8)
        ]
        expected = [T0 + timedelta(minutes=30 + 90 * n) for n in range(8)]  # 01:00, 02:30, 04:00, ...
        assert [datetime.fromisoformat(start) for start, _ in runs] == expected[:-1]
        for (_, end), (start, _) in itertools.pairwise(runs):
            assert start >= end  # never two runs at once
        assert (await app.get_instance(started[-1])).status == geste.Status.WAITING
        (info,) = await app.list_schedules()
        assert (info.overlap, info.queue, info.waiting) == ("queue", onto, 4)  # 09:00 ... 12:00 wait
        assert info.last_instance_id == started[-1]
        wait = await waiting_ticks(env.database_url, "slow")
        assert wait == [hour(h).timestamp() for h in range(9, 13)]
        if onto is not None:
            queued = await raw_query(
                env.database_url,
                "SELECT DISTINCT queue FROM geste_instances WHERE instance_id LIKE 'sched:slow:%'",
            )
            assert [row["queue"] for row in queued] == ["line"]


async def test_onto_a_queue_with_a_concurrency_limit() -> None:
    """Ticks run alongside, onto a queue of concurrency 2: every tick's instance is created at its tick
    (queued), and at most 2 run at once; a priority goes with them."""
    app = geste.App("sqlite:///unused.db")
    line = app.queue("reports", concurrency=2)

    @app.schedule("0 * * * *", overlap="alongside", queue=line, priority=-3)
    @app.workflow
    async def report(ctx: geste.WorkflowContext) -> list[str]:
        started = ctx.now()
        await ctx.sleep(timedelta(minutes=150))
        return [started.isoformat(), ctx.now().isoformat()]

    async with WorkflowEnvironment(app, start_at=T0) as env:
        await env.advance(timedelta(hours=6))  # ticks 01:00 ... 06:00
        started = await scheduled_ids(env.database_url, "report")
        assert started == [instance_id("report", hour(h).timestamp()) for h in range(1, 7)]  # all created
        rows = await raw_query(
            env.database_url,
            "SELECT DISTINCT queue, priority FROM geste_instances WHERE instance_id LIKE 'sched:report:%'",
        )
        assert [(row["queue"], row["priority"]) for row in rows] == [("reports", -3)]
        await env.advance(timedelta(hours=12))
        runs = [await app.get_handle(iid).result() for iid in started]
        moments = sorted(
            [(datetime.fromisoformat(start), 1) for start, _ in runs]
            + [(datetime.fromisoformat(end), -1) for _, end in runs]
        )  # an end before a start at one moment: that slot was free
        running = most = 0
        for _, change in moments:
            running += change
            most = max(most, running)
        assert most == 2
        assert [datetime.fromisoformat(start) for start, _ in runs][:4] == [
            hour(1),
            hour(2),
            hour(3, 30),  # 01:00's run ended at 03:30: a slot free
            hour(4, 30),
        ]


async def test_the_waiting_ticks_are_bounded() -> None:
    app = geste.App("sqlite:///unused.db")

    @app.schedule("0 * * * *", overlap="queue")
    @app.workflow
    async def stuck(ctx: geste.WorkflowContext) -> None:
        await ctx.wait_event("never")

    async with WorkflowEnvironment(app, start_at=T0) as env:
        loop = app.runtime.schedules
        assert loop is not None
        loop.queue_limit = 2
        await env.advance(timedelta(hours=5))  # 01:00 runs; 02:00 and 03:00 wait; 04:00, 05:00 skipped
        assert await scheduled_ids(env.database_url, "stuck") == [instance_id("stuck", hour(1).timestamp())]
        assert await waiting_ticks(env.database_url, "stuck") == [hour(2).timestamp(), hour(3).timestamp()]
        ticks = app.metrics.schedule_ticks.values
        assert (ticks[("stuck", "started")], ticks[("stuck", "queued")], ticks[("stuck", "skipped")]) == (
            1,
            2,
            2,
        )


async def test_pause_holds_the_waiting_ticks_and_delete_drops_them() -> None:
    app = geste.App("sqlite:///unused.db")

    @app.schedule("0 * * * *", overlap="queue")
    @app.workflow
    async def job(ctx: geste.WorkflowContext) -> None:
        await ctx.wait_event("go", match={"tick": ctx.instance_id})

    async with WorkflowEnvironment(app, start_at=T0) as env:
        await env.advance(timedelta(hours=3))  # 01:00 runs; 02:00 and 03:00 wait
        first, second = (instance_id("job", hour(h).timestamp()) for h in (1, 2))
        await app.pause_schedule("job")
        await env.send_event("go", {"tick": first})  # 01:00's run ends while paused: nothing released
        assert await scheduled_ids(env.database_url, "job") == [first]
        await app.resume_schedule("job")
        await env.advance(timedelta(minutes=1))  # the resumed schedule's waiting ticks go on
        assert await scheduled_ids(env.database_url, "job") == [first, second]
        await app.delete_schedule("job")
        assert await waiting_ticks(env.database_url, "job") == []
        await env.send_event("go", {"tick": second})
        assert await scheduled_ids(env.database_url, "job") == [first, second]


# -- on each backend, a clock the test moves -------------------------------------------------------------
held: dict[str, asyncio.Event] = {}
log: list[tuple[str, str]] = []


def gated_app(make_app: Callable[..., geste.App], clock: FrozenClock, **options: object) -> geste.App:
    """An App whose scheduled run (overlap="queue", hourly, onto the queue ``q``) waits in an activity for
    the test to set its event; its start and end are logged."""
    app = scheduled_app(make_app, clock, queues=[geste.Queue("q", concurrency=3)], **options)

    @app.activity
    async def hold(ctx: geste.ActivityContext, iid: str) -> None:
        log.append(("start", iid))
        await held.setdefault(iid, asyncio.Event()).wait()
        log.append(("end", iid))

    @app.schedule("0 * * * *", name="gated", overlap="queue", queue="q", priority=4)
    @app.workflow(name="gated")
    async def gated(ctx: geste.WorkflowContext) -> None:
        await hold(ctx, ctx.instance_id)

    return app


async def release(app: geste.App, iid: str, now: float) -> bool:
    """``schedule_release`` of the tick of ``iid`` straight away (as a round that read it waiting and
    ready would)."""
    (row,) = [row for row in await app.storage.list_schedules(limit=10) if row.name == "gated"]
    tick = datetime.fromisoformat(iid.removeprefix("sched:gated:")).timestamp()
    start = tick_instance(row, tick, now)
    return await app.storage.schedule_release("gated", tick=tick, start=start, now=now)


async def test_two_workers_racing_release_each_waiting_tick_once_in_order(
    make_app: Callable[..., geste.App], db_url: str
) -> None:
    clock = FrozenClock(T0)
    log.clear()
    held.clear()
    apps = [gated_app(make_app, clock), gated_app(make_app, clock)]
    async with apps[0], apps[1]:
        ticks = [instance_id("gated", hour(h).timestamp()) for h in range(1, 6)]
        for _ in range(5):  # 01:00 ... 05:00: the first runs, the others wait
            clock.now += HOUR
            await rounds(*apps)
        assert await scheduled_ids(db_url, "gated") == ticks[:1]
        assert len(await waiting_ticks(db_url, "gated")) == 4
        for n, iid in enumerate(ticks):
            await wait_until(lambda iid=iid: ("start", iid) in log, f"{iid} to run")
            await rounds(*apps)  # racing releases while it runs: nothing
            await rounds(*apps)
            assert await scheduled_ids(db_url, "gated") == ticks[: n + 1]
            if n + 1 < len(ticks):  # a release that read the schedule before this run started: refused
                assert not await release(apps[0], ticks[n + 1], clock.now)
            held.setdefault(iid, asyncio.Event()).set()
            await apps[n % 2].get_handle(iid).result(timeout=30)
            await rounds(*apps)  # both release at once (their loops may too): one wins
            if n + 1 < len(ticks):  # a release that read the tick before it was released: refused
                assert not await release(apps[1], ticks[n + 1], clock.now)
        assert log == [(event, iid) for iid in ticks for event in ("start", "end")]  # never two at once
        assert await waiting_ticks(db_url, "gated") == []
        (info,) = await apps[0].list_schedules()
        assert (info.waiting, info.last_instance_id) == (0, ticks[-1])
        rows = await raw_query(db_url, "SELECT DISTINCT queue, priority FROM geste_instances")
        assert [(row["queue"], row["priority"]) for row in rows] == [("q", 4)]
        started = sum(app.metrics.schedule_ticks.values[("gated", "started")] for app in apps)
        queued = sum(app.metrics.schedule_ticks.values[("gated", "queued")] for app in apps)
        assert (started, queued) == (5, 4)


async def test_the_settings_and_the_waiting_ticks_outlive_a_restart(
    make_app: Callable[..., geste.App], db_url: str
) -> None:
    clock = FrozenClock(T0)
    log.clear()
    held.clear()
    first, second, third = (instance_id("gated", hour(h).timestamp()) for h in (1, 2, 3))
    async with gated_app(make_app, clock, shutdown_grace=0.1) as app:  # its close cuts the first run
        for _ in range(3):
            clock.now += HOUR
            await rounds(app)
        await wait_until(lambda: ("start", first) in log, "the first run")
    client = make_app(clock=clock, run_worker=False)  # no declaration: what is stored
    async with serving(client) as http:
        (info,) = await client.list_schedules()
        assert (info.overlap, info.queue, info.priority, info.waiting) == ("queue", "q", 4, 2)
        assert info.last_instance_id == first
        (shown,) = (await client.status()).as_dict()["schedules"]
        assert {k: shown[k] for k in ("overlap", "queue", "priority", "waiting")} == {
            "overlap": "queue",
            "queue": "q",
            "priority": 4,
            "waiting": 2,
        }
        row = (await page(http, "/ui/schedules")).split("<tbody>")[1]
        assert "<td>queue (2 waiting)</td>" in row and "q (priority 4)</td>" in row
    table = await asyncio.to_thread(run_cli, ["status", "--database-url", db_url])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[lines.index("schedules (1):") + 2].split()[-2:] == ["q", "2"]
    held[first].set()
    async with gated_app(make_app, clock) as app:  # the first run, handed back at the close, runs again
        await app.get_handle(first).result(timeout=30)
        await rounds(app)
        assert await scheduled_ids(db_url, "gated") == [first, second]
        held.setdefault(second, asyncio.Event()).set()
        held.setdefault(third, asyncio.Event()).set()
        await all_finished(app, [second])
        await rounds(app)
        await all_finished(app, [second, third])
        assert await waiting_ticks(db_url, "gated") == []


async def test_a_release_that_fails_mid_write_leaves_the_tick_waiting_and_it_starts_once(
    make_app: Callable[..., geste.App], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiting row's delete and the tick's instance are one transaction: a release cut short at its
    last statement (as a crash would) leaves the tick waiting and no instance; the next one starts it."""
    clock = FrozenClock(T0)
    log.clear()
    held.clear()
    first, second = (instance_id("gated", hour(h).timestamp()) for h in (1, 2))
    async with gated_app(make_app, clock) as app:
        loop = app.runtime.schedules
        assert loop is not None
        await loop.stop()  # the test drives the rounds
        for _ in range(2):
            clock.now += HOUR
            await loop.catch_up()
        held.setdefault(first, asyncio.Event()).set()
        await app.get_handle(first).result(timeout=30)
        storage = app.storage
        queries = storage._q if isinstance(storage, PostgresStorage) else sqlite_storage.Q
        monkeypatch.setitem(queries, "insert_queued", "UPDATE geste_schedules SET no_such_column = 1")
        with pytest.raises(StorageError):
            await loop.release_waiting()
        assert await scheduled_ids(db_url, "gated") == [first]
        assert await waiting_ticks(db_url, "gated") == [hour(2).timestamp()]
        (info,) = await app.list_schedules()
        assert (info.waiting, info.last_instance_id) == (1, first)
        monkeypatch.undo()
        await loop.catch_up()
        await loop.catch_up()
        assert await scheduled_ids(db_url, "gated") == [first, second]
        assert await waiting_ticks(db_url, "gated") == []
        held.setdefault(second, asyncio.Event()).set()
        await all_finished(app, [second])
