"""Queues (schema 20; docs/queues.md, docs/design.md "Queues"): what ``App(queues=[...])`` and
``app.queue(...)`` declare, and the checks of a start onto one.

A queue governs when a started instance may begin: it waits, queued, until a claim of a worker serving
the queue admits it, within the queue's limits; admitted, it holds one of the queue's slots until it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from ._validation import check_id, check_name
from .errors import ConfigurationError

OnDuplicate = Literal["return", "raise"]
"""What a start onto a queue does when an unfinished instance of the queue holds its ``dedup_id``: return
that instance's handle (``created`` False), or raise ``geste.errors.QueueDeduplicated``."""

MAX_PRIORITY = 2**31 - 1
"""Priorities are stored as 32-bit integers (lower first)."""


def _limit(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > MAX_PRIORITY:
        raise ConfigurationError(f"{what} must be a positive integer or None, not {value!r:.80}")
    return value


@dataclass(frozen=True, slots=True)
class Queue:
    """A named queue: ``concurrency``, its admitted and unfinished instances at most across every worker
    of the cluster (exact); ``worker_concurrency``, those one worker process admitted and runs now, at
    most; ``rate_limit``, admissions at most in any window of ``rate_period`` (seconds or a timedelta),
    across the cluster. ``partition_concurrency`` and ``partition_rate_limit``: the same two limits for
    each partition of the queue (the instances started with one ``partition_key``: "one import per
    customer at a time"), under the queue's own. None: no limit. Declared with
    ``App(queues=[Queue(...)])`` or ``app.queue(...)``: the App's worker serves it, and its limits are
    written to the database at open (the last App opened sets them)."""

    name: str
    concurrency: int | None = None
    worker_concurrency: int | None = None
    rate_limit: int | None = None
    rate_period: float | timedelta = 1.0
    partition_concurrency: int | None = None
    partition_rate_limit: int | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "queue")
        _limit(self.concurrency, "concurrency")
        _limit(self.worker_concurrency, "worker_concurrency")
        _limit(self.rate_limit, "rate_limit")
        _limit(self.partition_concurrency, "partition_concurrency")
        _limit(self.partition_rate_limit, "partition_rate_limit")
        period = self.period
        if not period > 0 or period == float("inf"):
            raise ConfigurationError(f"rate_period must be a positive duration, not {self.rate_period!r:.80}")

    @property
    def period(self) -> float:
        """``rate_period`` in seconds."""
        period = self.rate_period
        if isinstance(period, timedelta):
            return period.total_seconds()
        if isinstance(period, bool) or not isinstance(period, int | float):
            raise ConfigurationError(f"rate_period must be seconds or a timedelta, not {period!r:.80}")
        return float(period)


def queue_name(queue: Queue | str | None) -> str | None:
    """The queue a start names (a ``Queue`` or its name), checked."""
    if queue is None or isinstance(queue, Queue):
        return None if queue is None else queue.name
    return check_name(queue, "queue")


def check_queue_start(queue: str | None, priority: object, dedup_id: object) -> tuple[int, str | None]:
    """A start's ``priority`` and ``dedup_id``, checked: both mean something only on a queue."""
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_PRIORITY:
        raise ConfigurationError(f"priority must be an integer (lower runs first), not {priority!r:.80}")
    if queue is None and (priority or dedup_id is not None):
        raise ConfigurationError("priority and dedup_id apply to a start onto a queue: give queue=...")
    return priority, None if dedup_id is None else check_id(dedup_id, "dedup_id")


def check_partition_key(queue: str | None, partition_key: object) -> str:
    """A start's ``partition_key``, checked: it means something only on a queue. None is stored as "",
    the partition of the starts that give no key (a given key is never empty)."""
    if partition_key is None:
        return ""
    if queue is None:
        raise ConfigurationError("partition_key applies to a start onto a queue: give queue=...")
    return check_id(partition_key, "partition_key")


def check_on_duplicate(on_duplicate: object, dedup_id: str | None) -> OnDuplicate:
    """A start's ``on_duplicate``, checked: ``"raise"`` means something only with a ``dedup_id``."""
    if on_duplicate == "return":
        return "return"
    if on_duplicate == "raise":
        if dedup_id is None:
            raise ConfigurationError('on_duplicate="raise" applies to a start with a dedup_id')
        return "raise"
    raise ConfigurationError(f'on_duplicate must be "return" or "raise", not {on_duplicate!r:.80}')


QUEUE_COUNT_CAP = 1_000
"""A queue's queued and admitted instances are counted up to this many (``QueueInfo.queued_capped``):
each count reads at most this many entries of its partial index, so a queue a million deep costs
``geste status``, a metrics scrape or the viewer what one a thousand deep does (the viewer's own cap)."""

QUEUES_SHOWN = 1_000
"""At most this many queues are listed (by name): ``app.list_queues``, ``geste status``, the metrics."""

PRIORITY_LEVELS = 100
"""The oldest queued instance is looked for among the first this many priorities of the line (one index
probe each): exact for any queue using fewer distinct priorities, a lower bound of the age beyond."""


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """A queue as the database shows it (``await app.list_queues()``, ``geste queues``): its limits as
    declared (the last App opened wrote them), its instances waiting and holding slots, its rate window,
    and how long the oldest one has waited. A queue that instances were started onto by name but that no
    App declared is listed too (``declared`` False, no limits)."""

    name: str
    declared: bool
    """Whether an App declared it (its limits are stored); False: only instances name it."""
    concurrency: int | None
    """The most instances admitted and unfinished at once, across the cluster (None: no limit)."""
    worker_concurrency: int | None
    """The most one worker process admitted and runs now (None: no limit)."""
    rate_limit: int | None
    """The most admissions in any window of ``rate_period`` seconds (None: no rate)."""
    rate_period: float | None
    queued: int
    """Instances waiting to be admitted, counted up to ``QUEUE_COUNT_CAP`` (``queued_capped``: more)."""
    admitted: int
    """Instances admitted and not ended, the slots in use: running now, sleeping durably or waiting for an
    event (what ``concurrency`` limits), counted up to ``QUEUE_COUNT_CAP`` (``admitted_capped``: more)."""
    rate_used: int | None
    """Admissions within the current window of ``rate_period`` (None without a ``rate_limit``)."""
    oldest_queued_at: datetime | None
    """When the longest-waiting queued instance was started (None: nothing is queued)."""
    oldest_age: float | None
    """Seconds it has waited, when read (None: nothing is queued)."""
    queued_capped: bool = False
    """More than ``QUEUE_COUNT_CAP`` are queued: ``queued`` is the cap."""
    admitted_capped: bool = False
    """More than ``QUEUE_COUNT_CAP`` are admitted: ``admitted`` is the cap."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (``geste queues --json``, ``GET /queues``, ``geste status --json``)."""
        return {
            "name": self.name,
            "declared": self.declared,
            "concurrency": self.concurrency,
            "worker_concurrency": self.worker_concurrency,
            "rate_limit": self.rate_limit,
            "rate_period": self.rate_period,
            "queued": self.queued,
            "queued_capped": self.queued_capped,
            "admitted": self.admitted,
            "admitted_capped": self.admitted_capped,
            "rate_used": self.rate_used,
            "oldest_queued_at": None if self.oldest_queued_at is None else self.oldest_queued_at.isoformat(),
            "oldest_age": self.oldest_age,
        }


class StoredQueue(Protocol):
    """A queue as the storage reads it (``storage.base.QueueState``)."""

    @property
    def name(self) -> str: ...
    @property
    def declared(self) -> bool: ...
    @property
    def concurrency(self) -> int | None: ...
    @property
    def worker_concurrency(self) -> int | None: ...
    @property
    def rate_limit(self) -> int | None: ...
    @property
    def rate_period(self) -> float | None: ...
    @property
    def queued(self) -> int: ...
    @property
    def admitted(self) -> int: ...
    @property
    def rate_used(self) -> int: ...
    @property
    def oldest_queued_at(self) -> float | None: ...


def queue_info(stored: StoredQueue, now: float, *, cap: int = QUEUE_COUNT_CAP) -> QueueInfo:
    """A stored queue whose counts were read up to ``cap + 1`` (so that "more than ``cap``" shows), as
    reported at ``now``."""
    oldest = stored.oldest_queued_at
    return QueueInfo(
        name=stored.name,
        declared=stored.declared,
        concurrency=stored.concurrency,
        worker_concurrency=stored.worker_concurrency,
        rate_limit=stored.rate_limit,
        rate_period=stored.rate_period,
        queued=min(stored.queued, cap),
        admitted=min(stored.admitted, cap),
        rate_used=None if stored.rate_limit is None else stored.rate_used,
        oldest_queued_at=None if oldest is None else datetime.fromtimestamp(oldest, UTC),
        oldest_age=None if oldest is None else max(0.0, now - oldest),
        queued_capped=stored.queued > cap,
        admitted_capped=stored.admitted > cap,
    )
