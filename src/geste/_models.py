"""The values geste hands to users (instance info, history entries, events) and the stored statuses."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """The status of a workflow instance; the values are what the database stores."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_finished(self) -> bool:
        return self in (Status.COMPLETED, Status.FAILED, Status.CANCELLED)

    @property
    def is_known(self) -> bool:
        """False for a status read from the database that this version does not know (``stored``)."""
        return self._name_ != "UNKNOWN"

    @classmethod
    def stored(cls, value: str) -> Status:
        """A status as read from the database. A value this version does not know (written by a newer
        geste during a rolling upgrade, or by hand) is kept as an unknown status (``is_known`` False,
        neither finished nor runnable: no worker claims it) instead of failing every read of the row,
        so lists, ``geste status`` and the viewer show it. ``Status(value)`` stays strict for input."""
        try:
            return cls(value)
        except ValueError:
            member = str.__new__(cls, str(value))
            member._name_ = "UNKNOWN"
            member._value_ = str(value)
            return member


class StepKind(StrEnum):
    """What one history entry records; the values are what the database stores."""

    ACTIVITY = "activity"
    COMPENSATION = "compensation"
    SLEEP = "sleep"
    WAIT_EVENT = "wait_event"
    EVENT = "event"
    EVENT_TIMEOUT = "event_timeout"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"
    MESSAGE = "message"
    RECEIVE_TIMEOUT = "receive_timeout"
    PUBLISH = "publish"
    SEND_TO = "send_to"
    NOW = "now"
    UUID = "uuid"
    RANDOM = "random"
    CANCELLED = "cancelled"
    SEND_EVENT = "send_event"
    START_CHILD = "start_child"
    """``ctx.start_child``: the child instance it created (or found, created by this step before)."""
    CHILD = "child"
    """The end of a child the workflow awaited (``handle.result()``): its status and result or error."""
    CONTINUE_AS_NEW = "continue_as_new"
    """The last row of a run that ended with ``ctx.continue_as_new`` (found in its kept history only)."""
    SET_STATE = "set_state"
    """``ctx.set_state``: a value published under a key (the row's name); the value is in ``geste_state``."""
    PATCH = "patch"
    """A patch marker (``ctx.patched(id)``, the row's name): this run took the patched code's branch."""


class ParentClose(StrEnum):
    """What a parent's end (completed, failed or cancelled) does to a child it started that still runs
    (``ctx.start_child(..., parent_close=...)``), in the transaction of that end; the values are what
    the database stores."""

    CANCEL = "cancel"
    """Request its cancellation, as ``app.cancel`` would (the default)."""
    ABANDON = "abandon"
    """Leave it running on its own, whatever the parent's end (a cancel of the parent included)."""
    WAIT = "wait"
    """The parent, once its code returned or raised, waits for it before it ends; a cancelled parent
    cancels it instead (a cancel reaches every child but the abandoned ones)."""


@dataclass(frozen=True, slots=True)
class StateValue:
    """A value an instance published under ``key`` with ``ctx.set_state`` (``handle.get_state``,
    ``handle.wait_state``): ``version`` numbers the key's values from 1 (``wait_state(after=version)``
    waits for the next one); ``run`` is the run that set it (``continue_as_new``)."""

    key: str
    value: Any
    version: int
    set_at: datetime
    run: int


def to_datetime(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """What is known of one workflow instance, as read from the database."""

    instance_id: str
    workflow_name: str
    status: Status
    input: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    locked_by: str | None
    lock_expires_at: datetime | None
    cancel_requested: bool
    steps: int
    """Rows in the history of its current run."""
    run: int = 1
    """The number of its current run: 1, then one more at each ``ctx.continue_as_new`` (whose earlier
    runs ``app.runs`` lists)."""
    parent_id: str | None = None
    """The instance that started it as its child (``ctx.start_child``); None for one a client started.
    ``app.children(instance_id)`` lists the children of an instance."""
    deadline: datetime | None = None
    """When the instance is cancelled for its deadline (``timeout=`` or ``deadline=`` at its start;
    ``WorkflowTimeout``); None: it has none."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run of an instance that ended with ``ctx.continue_as_new`` (``app.runs``); its history is
    ``app.history(instance_id, run=run)``, its last entry the ``continue_as_new`` step."""

    instance_id: str
    run: int
    """1 for the instance's first run, then 2, ..."""
    input: dict[str, Any]
    """What it was started or continued with: ``{"args": [...], "kwargs": {...}}``."""
    started_at: datetime
    ended_at: datetime
    steps: int
    ended_as: str
    """``"continued"``: the one way a run ends while its instance goes on."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One recorded step of an instance: its position, kind, name and outcome."""

    seq: int
    kind: StepKind
    name: str
    payload: Any
    is_error: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Event:
    """An event as delivered to ``ctx.wait_event``."""

    event_id: str
    type: str
    data: Any
    source: str | None = None
    time: datetime | None = None
    extensions: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """An item of a durable stream with its position (``handle.stream_entries``): ``start=position + 1``
    resumes after it."""

    position: int
    item: Any
