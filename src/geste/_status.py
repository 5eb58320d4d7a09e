"""What ``app.status()`` and ``geste status`` report: the queue, the registered workers, the listener
(value types only: the listener itself is in ``geste.runtime.wakeups``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from ._models import Status
from ._queues import QueueInfo
from ._schedules import ScheduleInfo

STALE_AFTER = 3
"""A worker not heard from for this many ``lock_timeout`` is not alive (it heartbeats every third of one)."""


def is_alive(
    heartbeat_at: float,
    stopped_at: float | None,
    lock_timeout: float | None,
    *,
    now: float,
    reader_lock_timeout: float,
) -> bool:
    """Whether a registered worker is alive: not stopped, and heard from within ``STALE_AFTER`` times
    the longer of its own ``lock_timeout`` (None: not recorded) and the reader's."""
    window = STALE_AFTER * max(reader_lock_timeout, lock_timeout or 0.0)
    return stopped_at is None and now - heartbeat_at <= window


class ListenerState(StrEnum):
    """The state of this process's LISTEN/NOTIFY connection (PostgreSQL): disabled (SQLite, or
    ``listen_notify=False``), connecting, listening, or reconnecting after a loss (polling covers the gap)."""

    DISABLED = "disabled"
    CONNECTING = "connecting"
    LISTENING = "listening"
    RECONNECTING = "reconnecting"


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    """What ``app.listener_status()`` reports about this process's LISTEN/NOTIFY connection."""

    state: ListenerState
    connected_since: datetime | None = None
    reconnects: int = 0
    last_notification_at: datetime | None = None
    notifications: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "connected_since": None if self.connected_since is None else self.connected_since.isoformat(),
            "reconnects": self.reconnects,
            "last_notification_at": (
                None if self.last_notification_at is None else self.last_notification_at.isoformat()
            ),
            "notifications": dict(self.notifications),
            "last_error": self.last_error,
        }


UNSERVED_CAP = 1000
"""Runnable instances counted per workflow that no live worker registers (``SystemStatus.unserved``)."""

LEASES_SHOWN = 100
"""At most this many held leases are listed in a status (``SystemStatus.leases``); all are counted."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The instances table at one moment (read in one snapshot)."""

    counts: dict[Status, int]
    """Instances per status, every status present (0 when none); a status this version does not know
    (``Status.is_known`` False: written by a newer geste, or by hand) is counted under its own value."""
    runnable: int
    """Instances a worker could claim now: ``run_at`` reached, lease free or expired."""
    held_leases: int
    """Leases held and not expired."""
    leases_by_worker: dict[str, int] = field(default_factory=dict)
    """Held leases per ``locked_by`` worker id."""
    oldest_waiting_age: float | None = None
    """Seconds since the longest-waiting ``waiting`` instance last changed (None: nothing waits)."""
    outbox_pending: int = 0
    """Outbox events not delivered yet (``pending``: being retried, or waiting behind an earlier event)."""
    outbox_dead: int = 0
    """Outbox events given up after ``outbox_max_attempts`` (``dead``): each holds back the later events
    of its instance until an operator retries or discards it."""
    outbox_oldest_pending_age: float | None = None
    """Seconds since the oldest pending outbox event was emitted (None: none is pending): how far behind
    the outbox is."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": {str(status): n for status, n in self.counts.items()},
            "runnable": self.runnable,
            "held_leases": self.held_leases,
            "leases_by_worker": dict(self.leases_by_worker),
            "oldest_waiting_age": self.oldest_waiting_age,
            "outbox_pending": self.outbox_pending,
            "outbox_dead": self.outbox_dead,
            "outbox_oldest_pending_age": self.outbox_oldest_pending_age,
        }


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker as registered in the database, as of its last heartbeat."""

    worker_id: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    running: int
    """Instances it was running at its last heartbeat."""
    concurrency: int
    listener: dict[str, Any]
    """Its ``listener_status().as_dict()`` at its last heartbeat (``{}`` if it reported none)."""
    heartbeat_age: float
    """Seconds since its last heartbeat, when the status was read."""
    alive: bool
    """Not stopped, and heard from within 3 x its ``lock_timeout`` (or the reading App's, if longer)."""
    leases: int = 0
    """Leases the database shows it holding now (unexpired)."""
    lock_timeout: float | None = None
    """Its own ``lock_timeout`` (it heartbeats every third of it); None for a row of an older geste."""
    workflows: tuple[str, ...] | None = None
    """The workflows it registers (and claims); None for a row of an older geste (it claimed any)."""
    health: str | None = None
    """None while all its background loops run; else why one ended (it no longer does that work)."""
    version: str | None = None
    """The version of its code (``App(version=...)``; schema 27; None for a row of an older geste)."""
    pinned: tuple[str, ...] = ()
    """The pinned workflows it registers: it claims their instances pinned to its ``version``."""

    @property
    def state(self) -> str:
        """``alive``, ``unhealthy`` (alive, but a background loop of it ended: see ``health``),
        ``stale`` (not heard from: killed, hung or cut off) or ``stopped`` (graceful stop)."""
        if self.stopped_at is not None:
            return "stopped"
        if not self.alive:
            return "stale"
        return "alive" if self.health is None else "unhealthy"

    def as_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "state": self.state,
            "alive": self.alive,
            "started_at": self.started_at.isoformat(),
            "heartbeat_at": self.heartbeat_at.isoformat(),
            "heartbeat_age": self.heartbeat_age,
            "stopped_at": None if self.stopped_at is None else self.stopped_at.isoformat(),
            "running": self.running,
            "concurrency": self.concurrency,
            "leases": self.leases,
            "lock_timeout": self.lock_timeout,
            "listener": dict(self.listener),
            "workflows": None if self.workflows is None else list(self.workflows),
            "health": self.health,
            "version": self.version,
            "pinned": list(self.pinned),
        }


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """An instance a worker holds now (its lease is not expired)."""

    instance_id: str
    workflow_name: str
    worker_id: str
    expires_in: float
    """Seconds until the lease expires unless its worker renews it (every ``lock_timeout / 3``)."""
    worker_state: str
    """The holder's ``WorkerInfo.state`` (``alive``, ``stale``, ``stopped``), or ``unregistered``."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "workflow_name": self.workflow_name,
            "worker_id": self.worker_id,
            "expires_in": self.expires_in,
            "worker_state": self.worker_state,
        }


@dataclass(frozen=True, slots=True)
class SystemStatus:
    """``await app.status()``: the queue, the workers (most recently heard from first), this process's
    listener."""

    checked_at: datetime
    queue: QueueStats
    workers: list[WorkerInfo]
    listener: ListenerStatus
    leases: list[LeaseInfo] = field(default_factory=list)
    """The held leases, soonest to expire first (at most 100; ``queue.held_leases`` counts them all):
    one held by a ``stale`` worker keeps its instance until it expires, or ``app.resume`` breaks it."""
    unserved: dict[str, int] = field(default_factory=dict)
    """Workflows with runnable instances that no live worker registers (none claims them), with how
    many (counted up to ``UNSERVED_CAP``); empty when a live worker of a geste older than schema 9,
    which claimed any workflow, is registered."""
    unserved_versions: dict[str, dict[str, int]] = field(default_factory=dict)
    """Runnable instances pinned to a version (docs/versioning.md) that no live worker of that version
    registers: version -> workflow -> how many (counted up to ``UNSERVED_CAP``). A rolling deploy that
    stopped every worker of an old version too soon leaves its pinned instances here."""
    schedules: list[ScheduleInfo] = field(default_factory=list)
    """The cron schedules, by name: each with its next tick, whether it is paused, its last tick and the
    instance that tick started (at most ``SCHEDULES_SHOWN``)."""
    queues: list[QueueInfo] = field(default_factory=list)
    """The queues (docs/queues.md), by name: declared ones and those instances were started onto; each
    with its limits, its queued and admitted instances (counted up to ``QUEUE_COUNT_CAP``), its rate
    window and the age of its oldest queued instance (at most ``QUEUES_SHOWN``)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (what ``geste status --json`` prints)."""
        return {
            "checked_at": self.checked_at.isoformat(),
            "queue": self.queue.as_dict(),
            "workers": [worker.as_dict() for worker in self.workers],
            "listener": self.listener.as_dict(),
            "leases": [lease.as_dict() for lease in self.leases],
            "unserved": dict(self.unserved),
            "unserved_versions": {v: dict(names) for v, names in self.unserved_versions.items()},
            "schedules": [schedule_dict(schedule) for schedule in self.schedules],
            "queues": [queue.as_dict() for queue in self.queues],
        }


SCHEDULES_SHOWN = 1000
"""At most this many schedules are listed in a status (``SystemStatus.schedules``)."""


def schedule_dict(info: ScheduleInfo) -> dict[str, Any]:
    """A schedule, JSON-ready (``geste status --json``, ``GET /schedules``): times in ISO 8601 UTC."""
    return {
        "name": info.name,
        "workflow_name": info.workflow_name,
        "cron": info.cron,
        "timezone": info.timezone,
        "missed": info.missed,
        "overlap": info.overlap,
        "paused": info.paused,
        "next_tick": info.next_tick.isoformat(),
        "last_tick": None if info.last_tick is None else info.last_tick.isoformat(),
        "last_instance_id": info.last_instance_id,
        "queue": info.queue,
        "priority": info.priority,
        "waiting": info.waiting,
    }


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What ``App.prune`` (``geste prune``) did: the finished instances it deleted (with a dry run: would
    delete), every row it deleted (the instances' own included; 0 with a dry run), the finished instances
    past the age it kept (something still needs them: an unfinished parent or child, an outbox event not
    delivered), and the batches (transactions) it took."""

    instances: int
    rows: int
    kept: int
    batches: int
    dry_run: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "instances": self.instances,
            "rows": self.rows,
            "kept": self.kept,
            "batches": self.batches,
            "dry_run": self.dry_run,
        }
