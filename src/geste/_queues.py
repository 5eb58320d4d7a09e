"""Queues (schema 20; docs/queues.md, docs/design.md "Queues"): what ``App(queues=[...])`` and
``app.queue(...)`` declare, and the checks of a start onto one.

A queue governs when a started instance may begin: it waits, queued, until a claim of a worker serving
the queue admits it, within the queue's limits; admitted, it holds one of the queue's slots until it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._validation import check_id, check_name
from .errors import ConfigurationError

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
    most. None: no limit. Declared with ``App(queues=[Queue(...)])`` or ``app.queue(...)``: the App's
    worker serves it, and its limits are written to the database at open (the last App opened sets them)."""

    name: str
    concurrency: int | None = None
    worker_concurrency: int | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "queue")
        _limit(self.concurrency, "concurrency")
        _limit(self.worker_concurrency, "worker_concurrency")


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
