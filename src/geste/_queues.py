"""Queues (schema 20; docs/queues.md, docs/design.md "Queues"): what ``App(queues=[...])`` and
``app.queue(...)`` declare, and the checks of a start onto one.

A queue governs when a started instance may begin: it waits, queued, until a claim of a worker serving
the queue admits it, within the queue's limits; admitted, it holds one of the queue's slots until it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

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
