"""Which events an instance sees does not depend on clocks.

An instance sees the events sent at or after its start, each at most once, oldest first. "After" is
decided by the database (the events' sequence, drawn when the instance is created), never by comparing
the sender's clock with the starter's. Here three Apps share one database: one starts the instance, one
runs it (the worker), one sends the event; one of them has a clock off by ±0.5 s or ±1 h, and the event
is sent right after the start, while the instance runs an activity, or while it waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

import geste
from geste.storage.base import NewEvent

from .support import database_at_version, raw_query, wait_status, wait_until

MakeApp = Callable[..., geste.App]
HOUR = 3600.0
OFFSETS = [0.5, -0.5, HOUR, -HOUR]


class Clock:
    """Real time plus an offset (the clock of a badly synchronised host)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


@asynccontextmanager
async def three_apps(make_app: MakeApp, skewed: str, offset: float) -> AsyncIterator[dict[str, Any]]:
    """A starter (no worker), a worker and a sender (no worker) on one database; ``skewed`` has the
    clock ``offset`` seconds off."""
    clocks = {role: Clock(offset if role == skewed else 0.0) for role in ("starter", "worker", "sender")}
    entered, opened = asyncio.Event(), asyncio.Event()
    apps = {
        "starter": make_app(clock=clocks["starter"], run_worker=False),
        "worker": make_app(clock=clocks["worker"]),
        "sender": make_app(clock=clocks["sender"], run_worker=False),
    }
    for app in apps.values():

        @app.activity(name="gate")
        async def gate(ctx: geste.ActivityContext, hold: bool) -> None:
            if hold:
                entered.set()
                await opened.wait()

        @app.workflow(name="skewed")
        async def flow(ctx: geste.WorkflowContext, hold: bool) -> Any:
            await gate(ctx, hold)
            event = await ctx.wait_event("skew.ping", timeout=2 * HOUR)
            return event.data

    async with AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app)
        yield {"apps": apps, "clocks": clocks, "entered": entered, "opened": opened}


@pytest.mark.parametrize("when", ["right after the start", "while it runs", "while it waits"])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("skewed", ["sender", "starter", "worker"])
async def test_an_event_sent_after_the_start_is_seen_whatever_the_clocks(
    make_app: MakeApp, skewed: str, offset: float, when: str
) -> None:
    async with three_apps(make_app, skewed, offset) as env:
        apps = env["apps"]
        # A skewed worker starts the instance itself: a worker whose clock runs behind the database's
        # claims what others make runnable that much late (the tolerance docs/design.md gives), which
        # is not what this test is about.
        starter = apps["worker" if skewed == "worker" else "starter"]
        handle = await starter.start_workflow("skewed", when == "while it runs")
        if when == "while it runs":
            await asyncio.wait_for(env["entered"].wait(), 15)
        elif when == "while it waits":
            await wait_status(apps["worker"], handle.instance_id, geste.Status.WAITING)
        await apps["sender"].send_event("skew.ping", {"n": 1})
        env["opened"].set()
        if skewed == "worker" and offset < 0:
            # The one thing left to clocks: the worker runs a woken instance once its clock reaches the
            # wake-up (the earlier of the sender's clock and the database's), which it does not in this
            # test when the instance was already waiting (always "while it waits", sometimes "right after
            # the start"). The event is in the history at once, and the run follows when the worker's
            # clock catches up.
            async def delivered() -> bool:
                history = await handle.history()
                return any(entry.kind == geste.StepKind.EVENT for entry in history)

            await wait_until(delivered, "the event in the instance's history")
            env["clocks"]["worker"].offset = 0.0
        assert await handle.result(timeout=15) == {"n": 1}


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("skewed", ["sender", "starter"])
async def test_an_event_sent_before_the_start_is_not_seen_whatever_the_clocks(
    make_app: MakeApp, skewed: str, offset: float
) -> None:
    """The other half of "at or after its start": an event the database stored before the instance was
    created stays invisible to it, even when the sender's clock says it was sent later."""
    async with three_apps(make_app, skewed, offset) as env:
        apps = env["apps"]
        await apps["sender"].send_event("skew.ping", {"n": "before"})
        handle = await apps["starter"].start_workflow("skewed", False)
        await wait_status(apps["worker"], handle.instance_id, geste.Status.WAITING)
        await apps["sender"].send_event("skew.ping", {"n": "after"})
        assert await handle.result(timeout=15) == {"n": "after"}


async def test_events_are_seen_oldest_first_in_the_database_order(make_app: MakeApp) -> None:
    """Two senders whose clocks disagree by two hours: the instance takes their events in the order the
    database stored them, not in the order of their timestamps."""
    worker = make_app()
    ahead = make_app(clock=Clock(HOUR), run_worker=False)
    behind = make_app(clock=Clock(-HOUR), run_worker=False)

    for app in (worker, ahead, behind):

        @app.workflow(name="two")
        async def two(ctx: geste.WorkflowContext) -> list[Any]:
            first = await ctx.wait_event("skew.order")
            second = await ctx.wait_event("skew.order")
            return [first.data, second.data]

    async with worker, ahead, behind:
        handle = await ahead.start_workflow("two")
        await ahead.send_event("skew.order", "sent first, stamped an hour ahead")
        await behind.send_event("skew.order", "sent second, stamped an hour behind")
        assert await handle.result(timeout=15) == [
            "sent first, stamped an hour ahead",
            "sent second, stamped an hour behind",
        ]


async def test_schema_8_gives_the_instances_that_may_still_wait_the_floor_of_the_old_rule(
    db_url: str,
) -> None:
    """An upgraded database: each instance that may still wait gets as its floor the highest seq of the
    events sent before it was created (by the old rule's timestamps), and a registered wait keeps it;
    finished instances are left alone. The waiting instance then takes a new event, not an old one."""
    rows = [
        "INSERT INTO {t}geste_events (event_id, event_type, data, created_at) VALUES ('e1', 'x', '1', 10.0)",
        "INSERT INTO {t}geste_events (event_id, event_type, data, created_at) VALUES ('e2', 'x', '2', 30.0)",
        "INSERT INTO {t}geste_events (event_id, event_type, data, created_at) VALUES ('e3', 'x', '3', 20.0)",
        "INSERT INTO {t}geste_instances (instance_id, workflow_name, status, input, created_at, updated_at) "
        "VALUES ('waiting', 'w', 'waiting', '{{}}', 25.0, 25.0)",
        "INSERT INTO {t}geste_instances (instance_id, workflow_name, status, input, created_at, updated_at) "
        "VALUES ('early', 'w', 'failed', '{{}}', 5.0, 5.0)",
        "INSERT INTO {t}geste_instances (instance_id, workflow_name, status, input, created_at, updated_at) "
        "VALUES ('done', 'w', 'completed', '{{}}', 40.0, 40.0)",
        "INSERT INTO {t}geste_event_waits (instance_id, event_type, since, outcome_seq) "
        "VALUES ('waiting', 'x', 25.0, 2)",
    ]
    await database_at_version(db_url, 7, rows)

    async with geste.App(db_url, run_worker=False) as app:
        floors = await raw_query(db_url, "SELECT instance_id, event_floor FROM geste_instances")
        assert {r["instance_id"]: r["event_floor"] for r in floors} == {
            "waiting": 3,  # e1 (10.0) and e3 (20.0) were sent before it (25.0): e3 has seq 3
            "early": 0,
            "done": None,
        }
        waits = await raw_query(db_url, "SELECT instance_id, after_seq FROM geste_event_waits")
        assert waits == [{"instance_id": "waiting", "after_seq": 3}]
        _, woken = await app.storage.send_event(NewEvent("e4", "x", "4", None, None, None, app.clock()))
        assert woken == ["waiting"]
        history = await app.history("waiting")
        assert [(e.kind, e.payload["event_id"]) for e in history if e.kind == geste.StepKind.EVENT] == [
            (geste.StepKind.EVENT, "e4")
        ]
