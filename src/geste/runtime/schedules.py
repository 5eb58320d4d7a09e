"""The schedule loop of a worker: it starts the instances of the cron schedules' ticks as they come due.

Every process that runs a worker runs the loop. A round reads the due schedules (``schedules_due``: a
range scan of the ``next_tick`` index that reads only those due, at most ``BATCH``), decides for each
which ticks to start (``_schedules.plan``: the ``missed`` policy), and writes each schedule in one
transaction (``schedule_fire``): the conditional move of its next tick from the value the round read,
and the tick's instance, whose id derives from the schedule and the tick. Two workers whose rounds race
both read the tick; the first to commit moves it, the other's move finds it moved and writes nothing; a
worker that crashed mid-round wrote nothing or everything. So a tick starts once, however many workers.

Between rounds the loop sleeps until the earliest next tick (``schedule_next_tick``: the first entry of
that index), at most ``MAX_PAUSE``, so a schedule created or resumed by another process is seen within
that; one created, resumed or declared here wakes it at once. With no schedule due, a worker's loop costs
one index probe per ``MAX_PAUSE`` (or per tick); a round costs one statement plus one transaction per
due schedule, whatever the table holds. A backfill (``missed="all"``) starts at most
``_schedules.BACKFILL_LIMIT`` ticks of a schedule per round, the next round coming at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .._metrics import Metrics
from .._schedules import Schedule, instance_id, missed_ticks, plan, tick_datetime
from .._serde import encode
from ..errors import InvalidScheduleError
from ..storage.base import NewInstance, ScheduleRow, ScheduleStart, Storage
from .loops import Loop

logger = logging.getLogger("geste.schedules")

MAX_PAUSE = 60.0
"""The longest the loop sleeps: a schedule another process created or resumed is seen within it."""
BATCH = 100
"""The most due schedules a round reads; more are read by the next round, at once."""
BROKEN_RETRY = 3600.0
"""A stored schedule that cannot be read (its expression refused by this version): looked at again after
this long, rather than at every round."""


def tick_input(row: ScheduleRow, tick: float) -> str:
    """The stored input of the instance of ``tick``: no argument, or the tick (an aware UTC datetime)."""
    args = [tick_datetime(tick)] if row.pass_tick else []
    return encode({"args": args, "kwargs": {}}, what=f"input of schedule {row.name}")


def _no_version(workflow_name: str) -> tuple[str | None, bool]:
    return None, False


class ScheduleLoop(Loop):
    """Starts the due ticks of the cron schedules (module docstring). ``on_started`` is told when a round
    created instances (the worker looks for runnable work now)."""

    log = logger
    doing = "the schedule loop"

    def __init__(
        self,
        storage: Storage,
        *,
        clock: Callable[[], float],
        on_started: Callable[[], None],
        on_death: Callable[[str], None] | None = None,
        metrics: Metrics | None = None,
        version_of: Callable[[str], tuple[str | None, bool]] = _no_version,
    ) -> None:
        super().__init__(name="geste-schedules", what="the schedule loop", on_death=on_death)
        self.version_of = version_of
        """The version a tick's instance of a workflow records, and whether it is pinned to it (schema 26:
        this process's code, as a start from it would)."""
        self.storage = storage
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.on_started = on_started
        self.started = 0
        """Instances this loop created (ticks started here)."""

    async def round(self) -> float:
        more = await self.fire_due()
        if more:
            return 0.0
        upcoming = await self.storage.schedule_next_tick()
        if upcoming is None:
            return MAX_PAUSE
        return max(0.0, min(upcoming - self.clock(), MAX_PAUSE))

    async def fire_due(self) -> bool:
        """One round: start the due ticks of at most ``BATCH`` schedules. Returns whether some may still be
        due (a full batch read, or a backfill cut at its limit)."""
        now = self.clock()
        due = await self.storage.schedules_due(now, limit=BATCH)
        more = len(due) == BATCH
        for row in due:
            more = await self._fire(row, now) or more
        return more

    async def catch_up(self) -> None:
        """Rounds until nothing is due at the clock's time (``geste.testing`` moves the clock, then calls
        this). Each round moves the next tick of every schedule it reads, so this ends."""
        more = True
        while more:
            more = await self.fire_due()

    async def _fire(self, row: ScheduleRow, now: float) -> bool:
        """Start the ticks of one due schedule; returns whether it is still due (a backfill cut)."""
        try:
            schedule = Schedule(
                row.name, row.workflow_name, row.cron, row.timezone, row.missed, row.overlap, row.pass_tick
            )
            decided = plan(schedule, row.next_tick, now)
        except InvalidScheduleError as exc:
            logger.error(
                "schedule %r cannot be read (%s); looking again in %.0fs", row.name, exc, BROKEN_RETRY
            )
            await self.storage.schedule_fire(
                row.name,
                expected=row.next_tick,
                next_tick=now + BROKEN_RETRY,
                starts=(),
                skip_if_running=False,
                now=now,
            )
            return False
        version, pinned = self.version_of(row.workflow_name)
        starts = [
            ScheduleStart(
                tick,
                NewInstance(
                    instance_id(row.name, tick),
                    row.workflow_name,
                    tick_input(row, tick),
                    now,
                    version=version,
                    pinned=pinned,
                ),
            )
            for tick in decided.fire
        ]
        created = await self.storage.schedule_fire(
            row.name,
            expected=row.next_tick,
            next_tick=decided.next_tick,
            starts=starts,
            skip_if_running=row.overlap == "skip",
            now=now,
        )
        if created is None:  # another worker's round moved it first
            return False
        self._count(row, created, starts, missed_ticks(schedule, row.next_tick, decided.fire, now))
        if created:
            self.started += len(created)
            logger.info("schedule %r started %s", row.name, ", ".join(created))
            self.on_started()
        elif starts:
            logger.info(
                "schedule %r started none of %d tick(s): its previous run is unfinished",
                row.name,
                len(starts),
            )
        return decided.next_tick <= now

    def _count(self, row: ScheduleRow, created: list[str], starts: list[ScheduleStart], missed: int) -> None:
        """The metrics of a round this process won: ticks started (also counted as workflows started, as
        any start is), skipped by the overlap policy, missed (dropped by the ``missed`` policy)."""
        ticks = self.metrics.schedule_ticks.values
        if created:
            ticks[(row.name, "started")] += len(created)
            self.metrics.workflows_started.values[row.workflow_name] += len(created)
        if len(starts) > len(created):
            ticks[(row.name, "skipped")] += len(starts) - len(created)
        if missed:
            ticks[(row.name, "missed")] += missed
