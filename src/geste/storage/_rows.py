"""The typed rows of ``base`` built from database records, each by one function, read by column name.

Both backends hand their records here: a ``sqlite3.Row`` (the SQLite connection's row factory) and an
asyncpg ``Record`` are both read by name, so a query's columns may come in any order, and each column
is named in its query (``count(*) AS n``). The only positional reads left are of JSON arrays that
geste writes itself in one fixed order (``HISTORY_ARRAY``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar

from .._models import Status
from .._status import is_alive
from .base import (
    ChildState,
    Claim,
    EventWait,
    EventWaitRow,
    HistoryRow,
    InstanceExtras,
    InstanceRow,
    InstanceSummary,
    Lease,
    MessageRow,
    NewEvent,
    NewMessage,
    OutboxClaim,
    OutboxRow,
    QueueState,
    RetryRow,
    RunRow,
    ScheduleRow,
    StateRow,
    StoredEvent,
    StoredMessage,
    SubscriptionRow,
    WorkerRow,
)


class Record(Protocol):
    """A database row read by column name (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str, /) -> Any: ...


_T = TypeVar("_T")
_FIELDS: dict[type, tuple[str, ...]] = {}


def _by_field(cls: type[_T], r: Record, **given: Any) -> _T:
    """A typed row whose fields are the record's columns of the same names (``given`` ones aside)."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    return cls(**{name: given[name] if name in given else r[name] for name in names})


def instance_row(r: Record) -> InstanceRow:
    """An ``InstanceRow`` from a record with the columns of the ``get_instance`` queries."""
    return InstanceRow(
        instance_id=r["instance_id"],
        workflow_name=r["workflow_name"],
        status=Status.stored(r["status"]),
        input=r["input"],
        result=r["result"],
        error=r["error"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        finished_at=r["finished_at"],
        run_at=r["run_at"],
        locked_by=r["locked_by"],
        lock_expires_at=r["lock_expires_at"],
        cancel_requested=bool(r["cancel_requested"]),
        steps=r["steps"],
        run=_column(r, "run", 1),
        last_worker=_column(r, "last_worker", None),
        parent_id=_column(r, "parent_id", None),
        parent_close=_column(r, "parent_close", None),
        deadline=_column(r, "deadline", None),
    )


def _column(r: Record, name: str, default: Any) -> Any:
    """A column some records lack: the replay check reads databases of an older schema (before 15, no
    ``run``) with a query that does not name it. ``sqlite3.Row`` raises IndexError for a name it lacks,
    asyncpg's ``Record`` KeyError."""
    try:
        return r[name]
    except (IndexError, KeyError):
        return default


def history_row(r: Record) -> HistoryRow:
    """A ``HistoryRow`` from a record with the columns of the ``get_history`` queries."""
    return HistoryRow(r["seq"], r["kind"], r["name"], r["payload"], bool(r["is_error"]), r["created_at"])


HISTORY_ARRAY = ("seq", "kind", "name", "payload", "is_error", "created_at")
"""The order of a history row written as a JSON array: the ``removed`` column of ``geste_retries``, and
the history a PostgreSQL claim aggregates (``json_build_array``)."""


def history_from_arrays(items: Iterable[Sequence[Any]]) -> tuple[HistoryRow, ...]:
    """History rows from JSON arrays in the order of ``HISTORY_ARRAY``."""
    return tuple(
        HistoryRow(seq, kind, name, payload, bool(err), at) for seq, kind, name, payload, err, at in items
    )


def history_arrays_json(rows: Sequence[HistoryRow]) -> str:
    """History rows as the JSON arrays ``history_from_arrays`` reads (payloads as JSON text)."""
    return json.dumps([[r.seq, r.kind, r.name, r.payload, bool(r.is_error), r.created_at] for r in rows])


def claim(
    r: Record, history: tuple[HistoryRow, ...], lease_expired_at: float | None, history_after: int = 0
) -> Claim:
    """A ``Claim`` from a record with the columns a claim returns (``instance_id``, ``lease_id``, ...);
    ``history`` holds the rows after ``history_after`` (0: all)."""
    return Claim(
        Lease(r["instance_id"], r["lease_id"]),
        r["workflow_name"],
        r["input"],
        Status.stored(r["status"]),
        r["created_at"],
        bool(r["cancel_requested"]),
        history,
        r["run_at"],
        lease_expired_at,
        history_after,
        r["run"],
        r["deadline"],
        _awaited(r),
        _column(r, "runner", None),
    )


def _awaited(r: Record) -> tuple[str, ChildState] | None:
    """The awaited child's end a claim joined (schema 21: ``a_status``...), if it read one; the claims of
    a queue and SQLite's claims of a name do not join it (the run then reads the child)."""
    try:
        child = ended_child(r)
    except (KeyError, IndexError):
        return None
    return None if child is None else (r["awaits"], child)


def ended_child(r: Record) -> ChildState | None:
    """The awaited child in the ``a_*`` columns (schema 21: a claim's join, the suspension at a child
    wait), if it has ended; None if none was read or it runs still (both read it by its key only)."""
    status = r["a_status"]
    if status is None or not Status.stored(status).is_finished:
        return None
    return ChildState(r["a_workflow"], Status.stored(status), r["a_result"], r["a_error"], r["a_parent"])


def stored_event(r: Record) -> StoredEvent:
    """A ``StoredEvent`` from a record with the columns of ``candidate_events`` (spelt out: every candidate
    event of a wait is read through it)."""
    return StoredEvent(
        r["seq"], r["event_id"], r["event_type"], r["data"], r["source"], r["extensions"], r["created_at"]
    )


def stored_message(r: Record) -> StoredMessage:
    """A ``StoredMessage`` from a record with the message columns of the channel queries."""
    return _by_field(StoredMessage, r)


def retry_row(r: Record) -> RetryRow:
    """A ``RetryRow`` from a record with the columns of ``list_retries``."""
    removed = history_from_arrays(json.loads(r["removed"]))
    return RetryRow(
        r["instance_id"], r["retry"], r["retried_at"], r["from_seq"], r["error"], r["failed_at"], removed
    )


def run_row(r: Record) -> RunRow:
    """A ``RunRow`` from a record with the columns of ``list_runs``."""
    return _by_field(RunRow, r)


def worker_row(r: Record) -> WorkerRow:
    """A ``WorkerRow`` from a record with the columns of ``list_workers`` (SQLite's ``relay`` is 0 or 1)."""
    return _by_field(WorkerRow, r, relay=bool(r["relay"]))


def worker_alive(r: Record | None, *, now: float, lock_timeout: float) -> bool:
    """Whether the worker of a ``worker_liveness`` record (None: unknown) is alive (``is_alive``)."""
    if r is None:
        return False
    return is_alive(
        r["heartbeat_at"], r["stopped_at"], r["lock_timeout"], now=now, reader_lock_timeout=lock_timeout
    )


def lease_info(r: Record) -> tuple[str, str, str, float]:
    """``(instance_id, workflow_name, locked_by, lock_expires_at)`` from a record of ``list_leases``."""
    return r["instance_id"], r["workflow_name"], r["locked_by"], r["lock_expires_at"]


def outbox_claim(r: Record, claim_id: str) -> OutboxClaim:
    """An ``OutboxClaim`` from a record returned by the ``outbox_claim`` queries."""
    return _by_field(OutboxClaim, r, claim_id=claim_id)


def outbox_row(r: Record) -> OutboxRow:
    """An ``OutboxRow`` from a record with the columns of ``outbox_list`` and ``extras_outbox``."""
    return _by_field(OutboxRow, r)


def summary(r: Record) -> InstanceSummary:
    """An ``InstanceSummary`` from a record of the ``page_instances_*`` queries."""
    return _by_field(
        InstanceSummary, r, status=Status.stored(r["status"]), cancel_requested=bool(r["cancel_requested"])
    )


def event_wait_row(r: Record) -> EventWaitRow:
    """An ``EventWaitRow`` from a record of ``extras_event_wait``."""
    return _by_field(EventWaitRow, r)


def subscription_row(r: Record) -> SubscriptionRow:
    """A ``SubscriptionRow`` from a record of ``extras_subscriptions``."""
    return _by_field(SubscriptionRow, r)


def message_row(r: Record) -> MessageRow:
    """A ``MessageRow`` from a record of ``extras_messages``."""
    return _by_field(MessageRow, r)


def timer(r: Record) -> tuple[int, float]:
    """``(seq, expires_at)`` from a record of ``extras_timers``."""
    return r["seq"], r["expires_at"]


def instance_extras(
    timers: Iterable[Record],
    wait: Record | None,
    subscriptions: Iterable[Record],
    outbox: Iterable[Record],
    messages: Iterable[Record],
) -> InstanceExtras:
    """``InstanceExtras`` from the records of the five ``extras_*`` queries (read in one snapshot)."""
    return InstanceExtras(
        timers=tuple(timer(r) for r in timers),
        event_wait=None if wait is None else event_wait_row(wait),
        subscriptions=tuple(subscription_row(r) for r in subscriptions),
        outbox=tuple(outbox_row(r) for r in outbox),
        messages=tuple(message_row(r) for r in messages),
    )


def maybe_instance(r: Record | None) -> InstanceRow | None:
    """``instance_row`` of a record that may be missing (no such instance)."""
    return None if r is None else instance_row(r)


# -- the other way: the parameters that write a row, in the order of both backends' queries ---------------
def event_columns(event: NewEvent) -> tuple[Any, ...]:
    """The parameters of ``insert_event``: id, type, source, data, extensions, target, time."""
    return (
        event.event_id,
        event.event_type,
        event.source,
        event.data,
        event.extensions,
        event.target_instance_id,
        event.now,
    )


def event_wait_columns(instance_id: str, wait: EventWait, now: float, match_key: int) -> tuple[Any, ...]:
    """The parameters of ``insert_event_wait``: instance, type, match (JSON), since, deadline, outcome seq,
    match key (``geste._matching.wait_key``; PostgreSQL adds the canonical pairs)."""
    match = None if wait.match is None else json.dumps(wait.match)
    return instance_id, wait.event_type, match, now, wait.deadline, wait.outcome_seq, match_key


def message_columns(message: NewMessage) -> tuple[Any, ...]:
    """The message parameters of a publish: id, channel, data, sender, target, time."""
    return (
        message.message_id,
        message.channel,
        message.data,
        message.sender_instance_id,
        message.target_instance_id,
        message.now,
    )


def schedule_row(r: Record) -> ScheduleRow:
    """A ``ScheduleRow`` from a record with the columns of the ``get_schedule`` queries."""
    return _by_field(ScheduleRow, r, pass_tick=bool(r["pass_tick"]), paused=bool(r["paused"]))


def queue_state(r: Record) -> QueueState:
    """A ``list_queues`` record (the rate window counted only where a rate is set)."""
    return _by_field(QueueState, r, declared=bool(r["declared"]), rate_used=int(r["rate_used"] or 0))


def state(r: Any) -> StateRow:
    """A value of ``geste_state`` (schema 25)."""
    return StateRow(r["key"], r["version"], r["value"], r["run"], r["seq"], r["created_at"])


def instance_state(r: Any) -> tuple[Status, StateRow | None] | None:
    """``get_state``'s row: the instance's status and the value found (None: none); None: no instance."""
    if r is None:
        return None
    return Status(r["status"]), None if r["version"] is None else state(r)
