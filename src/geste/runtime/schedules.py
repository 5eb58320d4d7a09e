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

``overlap="queue"`` (schema 24): a tick whose schedule's last run is unfinished (or behind which ticks
wait already) is put to wait in the round's transaction (``geste_schedule_waiting``). Each round then
reads the schedules with ticks waiting (``schedules_waiting``: a scan of the ``waiting`` index) and, for
each whose last run has ended, releases its oldest tick (``schedule_release``: under the schedule's row
lock, the tick's waiting row deleted and its instance created in one transaction, so a tick is released
once). The end of a scheduled run in this process wakes the loop (``run_ended``); an end elsewhere is
seen within ``WAITING_PAUSE`` while ticks wait (the loop sleeps no longer then).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .._metrics import Metrics
from .._schedules import QUEUE_LIMIT, Schedule, instance_id, missed_ticks, plan, tick_datetime
from .._serde import encode
from ..errors import InvalidScheduleError
from ..storage.base import Fired, NewInstance, ScheduleRow, ScheduleStart, Storage
from .loops import Loop

logger = logging.getLogger("geste.schedules")

MAX_PAUSE = 60.0
"""The longest the loop sleeps: a schedule another process created or resumed is seen within it."""
BATCH = 100
"""The most due schedules a round reads; more are read by the next round, at once."""
WAITING_PAUSE = 5.0
"""While ticks wait (``overlap="queue"``): the longest the loop sleeps, so that the end of a last run in
another process (one without a worker: a cancel through the API) releases the next tick within it."""
SCHEDULED = "sched:"
"""The prefix of the instance ids a schedule starts (``_schedules.instance_id``)."""
BROKEN_RETRY = 3600.0
"""A stored schedule that cannot be read (its expression refused by this version): looked at again after
this long, rather than at every round."""


def tick_input(row: ScheduleRow, tick: float) -> str:
    """The stored input of the instance of ``tick``: no argument, or the tick (an aware UTC datetime)."""
    args = [tick_datetime(tick)] if row.pass_tick else []
    return encode({"args": args, "kwargs": {}}, what=f"input of schedule {row.name}")


def _no_version(workflow_name: str) -> tuple[str | None, bool]:
    return None, False


def tick_instance(
    row: ScheduleRow, tick: float, now: float, *, version: str | None = None, pinned: bool = False
) -> NewInstance:
    """The instance of ``tick`` of the schedule ``row``: its derived id, onto the schedule's queue."""
    return NewInstance(
        instance_id(row.name, tick),
        row.workflow_name,
        tick_input(row, tick),
        now,
        queue=row.queue,
        priority=row.priority,
        version=version,
        pinned=pinned,
    )


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
        """The version a tick's instance of a workflow records, and whether it is pinned to it (schema 27:
        this process's code, as a start from it would)."""
        self.storage = storage
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.on_started = on_started
        self.started = 0
        """Instances this loop created (ticks started here, or released after their wait)."""
        self.waiting = False
        """The last round saw ticks waiting for a run to end (``overlap="queue"``)."""
        self.queue_limit = QUEUE_LIMIT
        """The most ticks of one schedule that wait at once (``_schedules.QUEUE_LIMIT``)."""

    async def round(self) -> float:
        more = await self.fire_due()
        more = await self.release_waiting() or more
        if more:
            return 0.0
        upcoming = await self.storage.schedule_next_tick()
        pause = MAX_PAUSE if upcoming is None else max(0.0, min(upcoming - self.clock(), MAX_PAUSE))
        return min(pause, WAITING_PAUSE) if self.waiting else pause

    def run_ended(self, instance_id: str) -> None:
        """A run of ``instance_id`` ended here (or suspended): if a schedule started it, a tick may wait
        for it (``overlap="queue"``): look now."""
        if instance_id.startswith(SCHEDULED):
            self.wake()

    async def fire_due(self) -> bool:
        """One round: start the due ticks of at most ``BATCH`` schedules. Returns whether some may still be
        due (a full batch read, or a backfill cut at its limit)."""
        now = self.clock()
        due = await self.storage.schedules_due(now, limit=BATCH)
        more = len(due) == BATCH
        for row in due:
            more = await self._fire(row, now) or more
        return more

    async def catch_up(self) -> int:
        """Rounds until nothing is due at the clock's time and no waiting tick can be released
        (``geste.testing`` moves the clock, then calls this, and again once the runs are idle: an ended
        run may release a tick). Each round moves the next tick of every schedule it reads, and a
        release makes the schedule's last run unfinished, so this ends. Returns the instances created."""
        before = self.started
        more = True
        while more:
            more = await self.fire_due()
            more = await self.release_waiting() or more
        return self.started - before

    async def release_waiting(self) -> bool:
        """Release the oldest waiting tick of each schedule whose last run has ended (``overlap="queue"``),
        at most ``BATCH`` schedules. Returns whether more may be ready (a full batch, all ready)."""
        found = await self.storage.schedules_waiting(limit=BATCH)
        self.waiting = bool(found)
        now = self.clock()
        for waiting in found:
            if not waiting.ready:
                break  # (those ready come first)
            row, tick = waiting.schedule, waiting.tick
            start = self._instance(row, tick, now)
            if await self.storage.schedule_release(row.name, tick=tick, start=start, now=now):
                self.started += 1
                self.metrics.schedule_ticks.values[(row.name, "started")] += 1
                self.metrics.workflows_started.values[row.workflow_name] += 1
                logger.info(
                    "schedule %r started %s, after its previous run ended", row.name, start.instance_id
                )
                self.on_started()
        return len(found) == BATCH and found[-1].ready

    def _instance(self, row: ScheduleRow, tick: float, now: float) -> NewInstance:
        """The instance of ``tick`` of the schedule ``row`` (``tick_instance``), with the version of this
        worker's code (and its pin, for a pinned workflow: docs/versioning.md)."""
        version, pinned = self.version_of(row.workflow_name)
        return tick_instance(row, tick, now, version=version, pinned=pinned)

    async def _fire(self, row: ScheduleRow, now: float) -> bool:
        """Start the ticks of one due schedule; returns whether it is still due (a backfill cut)."""
        try:
            schedule = Schedule(
                row.name,
                row.workflow_name,
                row.cron,
                row.timezone,
                row.missed,
                row.overlap,
                row.pass_tick,
                row.queue,
                row.priority,
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
                overlap="alongside",
                now=now,
            )
            return False
        starts = [ScheduleStart(tick, self._instance(row, tick, now)) for tick in decided.fire]
        fired = await self.storage.schedule_fire(
            row.name,
            expected=row.next_tick,
            next_tick=decided.next_tick,
            starts=starts,
            overlap=row.overlap,
            now=now,
            queue_limit=self.queue_limit,
        )
        if fired is None:  # another worker's round moved it first
            return False
        created = fired.created
        self._count(row, fired, starts, missed_ticks(schedule, row.next_tick, decided.fire, now))
        if created:
            self.started += len(created)
            logger.info("schedule %r started %s", row.name, ", ".join(created))
            self.on_started()
        if fired.waiting:
            self.waiting = True
            logger.info(
                "schedule %r: %d tick(s) wait for its previous run to end", row.name, len(fired.waiting)
            )
        skipped = len(starts) - len(created) - len(fired.waiting)
        if skipped > 0:
            logger.info(
                "schedule %r started none of %d tick(s): its previous run is unfinished%s",
                row.name,
                skipped,
                " and the ticks waiting for it are at their limit" if row.overlap == "queue" else "",
            )
        return decided.next_tick <= now

    def _count(self, row: ScheduleRow, fired: Fired, starts: list[ScheduleStart], missed: int) -> None:
        """The metrics of a round this process won: ticks started (also counted as workflows started, as
        any start is), put to wait (``overlap="queue"``: counted as started once released), skipped by
        the overlap policy, missed (dropped by the ``missed`` policy)."""
        ticks = self.metrics.schedule_ticks.values
        created = len(fired.created)
        if created:
            ticks[(row.name, "started")] += created
            self.metrics.workflows_started.values[row.workflow_name] += created
        if fired.waiting:
            ticks[(row.name, "queued")] += len(fired.waiting)
        if len(starts) > created + len(fired.waiting):
            ticks[(row.name, "skipped")] += len(starts) - created - len(fired.waiting)
        if missed:
            ticks[(row.name, "missed")] += missed
