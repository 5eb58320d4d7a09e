"""Cron schedules (issue 19): what a schedule is, how its expression is read, and which ticks a round fires.

A schedule starts its workflow at each tick of a cron expression read in a time zone. The expression is
parsed and iterated by cronsim (a small, dependency-free library that reads zoneinfo time zones natively
and follows Debian cron, DST transitions included: a daily job whose local time does not exist on the day
clocks go forward runs as soon as it does, one whose time occurs twice on the day they go back runs once;
jobs of an hour or less follow the wall clock). Ticks are kept as Unix seconds.

This module decides; it never touches a database: ``plan`` says, for a schedule whose next tick is due,
which ticks a round starts and which tick is due next, by its ``missed`` and ``overlap`` policies. Each
started tick is an instance whose id derives from the schedule's name and the tick (``instance_id``), so
two workers, or a worker that crashed after the write, can never start a tick twice (runtime/schedules.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ._queues import check_queue_start
from ._validation import check_name
from .errors import InvalidScheduleError

MISSED = ("latest", "skip", "all")
"""What a round does with the ticks that passed while no worker ran: start only the most recent of them,
none (the schedule goes on at its next tick to come), or each of them (a backfill, ``BACKFILL_LIMIT`` a
round)."""
OVERLAP = ("skip", "alongside", "queue")
"""What a tick does while the schedule's previous run has not finished: nothing, start all the same, or
wait for it to end (then start, each waiting tick in turn: at most ``QUEUE_LIMIT`` wait)."""
QUEUE_LIMIT = 1000
"""``overlap="queue"``: the most ticks of one schedule that wait for its previous run at once; a tick
beyond them is skipped (its runs never keep up: a backlog growing without end helps no one)."""

MISSED_GRACE = 60.0
"""A due tick is *missed* once it is this many seconds old when a round sees it (or a later tick is due
too); a round that comes within the grace starts it as on time, whatever the ``missed`` policy."""
BACKFILL_LIMIT = 100
"""The most ticks a round starts for one schedule (``missed="all"``); the next round goes on from there."""
ITERATION_LIMIT = 100_000
"""The most ticks read when looking for one: beyond it an expression is refused (it never ticks)."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule's definition: what ``@app.schedule`` declares and ``app.create_schedule`` writes."""

    name: str
    workflow_name: str
    cron: str
    timezone: str = "UTC"
    missed: str = "latest"
    overlap: str = "skip"
    pass_tick: bool = False
    """Whether the workflow takes the tick (an aware UTC datetime) as its one argument."""
    queue: str | None = None
    """The queue each tick's instance is started onto (None: none)."""
    priority: int = 0
    """Its place in that queue's line (lower first)."""

    def __post_init__(self) -> None:
        try:
            check_name(self.name, "schedule")
            if self.queue is not None:
                check_name(self.queue, "queue")
            check_queue_start(self.queue, self.priority, None)
        except ValueError as exc:
            raise InvalidScheduleError(str(exc)) from None
        if self.missed not in MISSED:
            raise InvalidScheduleError(f"missed must be one of {', '.join(MISSED)}, not {self.missed!r:.80}")
        if self.overlap not in OVERLAP:
            raise InvalidScheduleError(
                f"overlap must be one of {', '.join(OVERLAP)}, not {self.overlap!r:.80}"
            )
        first_after(self.cron, self.timezone, 0.0)  # refuses a bad expression or time zone now

    def same_ticks(self, other: Schedule) -> bool:
        """Whether ``other`` ticks at the same moments (so a stored next tick still holds)."""
        return (self.cron, self.timezone) == (other.cron, other.timezone)


def zone(timezone: str) -> ZoneInfo:
    """The time zone named ``timezone`` (IANA name: ``Europe/Paris``, ``UTC``)."""
    if not isinstance(timezone, str) or not timezone:
        raise InvalidScheduleError(f"timezone must be an IANA time zone name, not {timezone!r:.80}")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidScheduleError(f"unknown time zone {timezone!r:.80}") from exc


def ticks_after(cron: str, timezone: str, after: float) -> Iterator[float]:
    """The ticks of ``cron`` in ``timezone`` strictly after ``after`` (Unix seconds), in order."""
    if not isinstance(cron, str):
        raise InvalidScheduleError(f"a cron expression must be a string, not {cron!r:.80}")
    tz = zone(timezone)
    try:
        it = CronSim(cron, datetime.fromtimestamp(after, tz))
    except CronSimError as exc:
        raise InvalidScheduleError(f"bad cron expression {cron!r:.80}: {exc}") from None
    last = after
    for _ in range(ITERATION_LIMIT):
        try:
            tick = next(it).timestamp()
        except StopIteration:
            return
        except CronSimError as exc:  # raised lazily by some expressions
            raise InvalidScheduleError(f"bad cron expression {cron!r:.80}: {exc}") from None
        if tick > last:  # the wall clock going back never gives a tick twice
            last = tick
            yield tick


def first_after(cron: str, timezone: str, after: float) -> float:
    """The first tick after ``after``; an expression that never ticks (``0 0 30 2 *``) is refused."""
    for tick in ticks_after(cron, timezone, after):
        return tick
    raise InvalidScheduleError(f"cron expression {cron!r:.80} never ticks")


def latest_at_or_before(cron: str, timezone: str, at: float) -> float | None:
    """The last tick at or before ``at`` (None: none in the 50 years cronsim looks back)."""
    moment = datetime.fromtimestamp(at, zone(timezone))
    if moment.microsecond == 0:  # cronsim's reverse walk starts strictly before a whole second
        moment += timedelta(microseconds=1)
    try:
        return next(CronSim(cron, moment, reverse=True)).timestamp()
    except StopIteration:
        return None
    except CronSimError as exc:
        raise InvalidScheduleError(f"bad cron expression {cron!r:.80}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Plan:
    """What one round does for a due schedule: the ticks it starts, and the next tick it leaves due."""

    fire: list[float]
    next_tick: float


def plan(schedule: Schedule, next_tick: float, now: float) -> Plan:
    """The ticks to start for ``schedule``, whose stored next tick ``next_tick`` is due at ``now``.

    The due ticks are ``next_tick`` and those after it up to ``now``. The most recent is on time if it is
    less than ``MISSED_GRACE`` old, the others are missed. ``latest`` starts the most recent, ``skip`` only
    an on-time one, ``all`` each of them (at most ``BACKFILL_LIMIT``: the next tick then stays due, and
    the next round goes on). The overlap policy is applied by the writer, which sees the previous run."""
    if schedule.missed == "all":
        fire = [next_tick]
        for tick in ticks_after(schedule.cron, schedule.timezone, next_tick):
            if tick > now or len(fire) == BACKFILL_LIMIT:
                return Plan(fire, tick)
            fire.append(tick)
        return Plan(fire, _far_future(now))
    latest = latest_at_or_before(schedule.cron, schedule.timezone, now)
    if latest is None or not next_tick <= latest <= now:  # (a DST fix-up may step past ``now``)
        latest = next_tick
    upcoming = next(iter(ticks_after(schedule.cron, schedule.timezone, now)), None)
    following = _far_future(now) if upcoming is None else upcoming
    if schedule.missed == "skip" and now - latest >= MISSED_GRACE:
        return Plan([], following)
    return Plan([latest], following)


MISSED_COUNT_LIMIT = 10_000
"""The most missed ticks ``missed_ticks`` counts for one round (the metrics' count stops there)."""


def missed_ticks(schedule: Schedule, next_tick: float, fired: list[float], now: float) -> int:
    """How many due ticks (``next_tick`` and those after it up to ``now``) a round's plan does not start:
    the ticks the ``missed`` policy drops (none with ``all``, whose backfill starts each). Counted up to
    ``MISSED_COUNT_LIMIT``; a round on time walks one tick."""
    if schedule.missed == "all" or next_tick > now:
        return 0
    started = set(fired)
    count = 0 if next_tick in started else 1
    for tick in ticks_after(schedule.cron, schedule.timezone, next_tick):
        if tick > now or count >= MISSED_COUNT_LIMIT:
            break
        if tick not in started:
            count += 1
    return min(count, MISSED_COUNT_LIMIT)


def _far_future(now: float) -> float:
    """The next tick of a schedule with none to come (its expression's last tick passed): never due."""
    return now + 100 * 365 * 86400.0


def instance_id(name: str, tick: float) -> str:
    """The id of the instance that tick ``tick`` of schedule ``name`` starts: ``sched:<name>:<tick ISO
    UTC>``; the same for every worker, so a tick started twice is the same instance."""
    return f"sched:{name}:{datetime.fromtimestamp(tick, UTC).isoformat().replace('+00:00', 'Z')}"


def tick_datetime(tick: float) -> datetime:
    return datetime.fromtimestamp(tick, UTC)


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A schedule as stored (``app.list_schedules()``): its definition, whether it is paused, its next
    tick (an aware UTC datetime) and the last tick it started, with that tick's instance."""

    name: str
    workflow_name: str
    cron: str
    timezone: str
    missed: str
    overlap: str
    paused: bool
    next_tick: datetime
    last_tick: datetime | None
    last_instance_id: str | None
    queue: str | None = None
    """The queue each tick's instance is started onto (None: none), and its ``priority`` there."""
    priority: int = 0
    waiting: int = 0
    """``overlap="queue"``: the ticks that wait for the last run to end, each to start in turn."""
