"""What both backends decide, decided once: pure functions on typed rows and records.

A backend reads what a decision needs in its own statements and transaction, asks here, and writes what
follows in its own statements again: its round trips and transactions stay its own (that is where its
speed comes from), the rules are shared. ``retry_cut`` (which step a retry runs again) stays in ``base``
with the rows it reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .._matching import WaitKey, matches, wait_key
from .._models import Status
from .._status import QueueStats
from .._steps import event_history_payload, message_history_payload
from . import _rows as rows
from ._rows import Record
from .base import (
    CLEANUP_START,
    PRUNE_START,
    Cleanup,
    CleanupPosition,
    EventWait,
    HistoryRow,
    InstanceFilter,
    InstanceRow,
    InstanceSummary,
    Lease,
    MessageWait,
    NewEvent,
    Pruned,
    ResumeOutcome,
    RetryOutcome,
    RetryRow,
    StoredEvent,
    StoredMessage,
    retry_cut,
)

# -- starting an instance --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewRow:
    """The columns of a new instance's row that depend on who starts it: created already claimed by the
    starting worker (a local start, with ``lease``) or free for any worker."""

    status: Status
    locked_by: str | None
    lease_id: str | None
    lock_expires_at: float | None


def new_row(lease: Lease | None, worker_id: str | None, lock_expires_at: float | None) -> NewRow:
    if lease is None:
        return NewRow(Status.PENDING, None, None, None)
    return NewRow(Status.RUNNING, worker_id, lease.lease_id, lock_expires_at)


# -- leases -------------------------------------------------------------------------------------------------
def takeover_threshold(lock_expires_at: float, now: float | None) -> float:
    """A renewal to ``lock_expires_at`` at ``now`` moves a held instance's take-over time (its ``run_at``,
    schema 11) to the new expiry only when it is less than half a lease ahead, that is before the
    midpoint of ``now`` and the new expiry (always when ``now`` is not given): heartbeats come every third
    of a lease, so the take-over time stays ahead of every claim while the worker lives, and each held row
    changes an indexed column at most every other heartbeat."""
    return lock_expires_at if now is None else (now + lock_expires_at) / 2


# -- operator actions ------------------------------------------------------------------------------------
def retry_refused(row: InstanceRow, last: Record | None) -> RetryOutcome:
    """A retry refused because the instance is not ``failed``; ``last`` is its latest retry
    (``last_retry``), if any: a concurrent retry that came first."""
    return RetryOutcome(row, last_retry=None if last is None else (last["retry"], last["retried_at"]))


def retry_from(row: InstanceRow, history: Sequence[HistoryRow]) -> RetryOutcome | int:
    """What a retry of a failed instance runs again: the first ``seq`` (``retry_cut``), or refused once a
    compensation ran (its undo cannot be taken back)."""
    if any(r.kind == "compensation" for r in history):
        return RetryOutcome(row, compensated=True)
    return retry_cut(history)


def retry_removed(history: Sequence[HistoryRow], from_seq: int) -> tuple[HistoryRow, ...]:
    """The history rows a retry from ``from_seq`` removes (and keeps in ``geste_retries``)."""
    return tuple(r for r in history if type(r.seq) is int and r.seq >= from_seq)


def retried(
    before: InstanceRow,
    after: InstanceRow,
    number: int,
    now: float,
    from_seq: int,
    removed: tuple[HistoryRow, ...],
) -> RetryOutcome:
    """A retry applied: the instance as it is now, and the record of the retry (the error it cleared)."""
    record = RetryRow(before.instance_id, number, now, from_seq, before.error, before.finished_at, removed)
    return RetryOutcome(after, record)


def resumable(before: InstanceRow | None) -> InstanceRow | ResumeOutcome:
    """The instance a resume may go on with, or the resume refused by the instance alone: there is none,
    or it is finished (or of a status this version does not know)."""
    if before is None:
        return ResumeOutcome(None)
    if before.status.is_finished or not before.status.is_known:
        return ResumeOutcome(before)
    return before


def lease_held(row: InstanceRow, now: float) -> bool:
    """Whether someone holds the instance's lease at ``now`` (held and not expired)."""
    return row.locked_by is not None and (row.lock_expires_at or 0.0) > now


# -- events ------------------------------------------------------------------------------------------------
def first_match(wait: EventWait, candidates: Iterable[Record]) -> StoredEvent | None:
    """The first of the ``candidate_events*`` records (oldest first) whose data the wait's match accepts
    (``geste._matching``: the candidates share one pair with it, or a hash of one)."""
    for candidate in candidates:
        event = rows.stored_event(candidate)
        if not wait.match or matches(wait.match, json.loads(event.data)):
            return event
    return None


def waits_matched(waits: Iterable[Record], data: Any) -> list[Record]:
    """The ``waits_for_event*`` records whose match accepts an event's ``data`` (decoded), by the rule of
    ``geste._matching`` (SQLite; PostgreSQL compares the canonical pairs in ``send_event``)."""
    return [w for w in waits if matches(None if w["match"] is None else json.loads(w["match"]), data)]


EVENT_KEYS_MIGRATION = "event_keys"
"""The migration (``NNNN_event_keys.sql``) after which each backend gives the waits it finds without a
match key theirs (``keyed_waits``), in the same transaction: a script cannot compute them."""


def keyed_waits(unkeyed: Iterable[Record]) -> list[tuple[str, WaitKey]]:
    """The match keys of the waits registered before schema 12 (records of ``unkeyed_waits``). A match
    that is not a JSON object (never written by geste: a row changed by hand) is left without, and does
    not stop the migration: such a wait is found by type and woken by every event of its type to look
    for itself (its replay then reads its match from the history)."""
    keyed = []
    for r in unkeyed:
        try:
            match = None if r["match"] is None else json.loads(r["match"])
        except ValueError:
            continue
        if match is None or isinstance(match, dict):
            keyed.append((r["instance_id"], wait_key(r["event_type"], match)))
    return keyed


def stored_event(event: NewEvent, seq: int) -> StoredEvent:
    """A new event as stored under ``seq``."""
    return StoredEvent(
        seq, event.event_id, event.event_type, event.data, event.source, event.extensions, event.now
    )


def timed_out(deadline: float | None, now: float) -> bool:
    """A wait that found nothing is over (no suspension): its deadline has passed."""
    return deadline is not None and deadline <= now


def event_outcome(outcome_seq: int, event: StoredEvent, now: float) -> HistoryRow:
    """The history row of an event taken by a wait (or handed to it by ``send_event``) at ``outcome_seq``."""
    return HistoryRow(outcome_seq, "event", event.event_type, event_history_payload(event), False, now)


def message_outcome(wait: MessageWait, message: StoredMessage, now: float) -> HistoryRow:
    """The history row of a message taken by a receive."""
    return HistoryRow(wait.outcome_seq, "message", wait.channel, message_history_payload(message), False, now)


def claims_message(message: StoredMessage, mode: str) -> bool:
    """Whether taking ``message`` claims it (only one instance may take it): a direct message, or one
    taken by a competing subscriber. A broadcast subscriber only moves its own cursor."""
    return message.target_instance_id is not None or mode == "competing"


# -- status and the viewer ---------------------------------------------------------------------------------
def queue_stats(
    now: float,
    by_status: Iterable[Record],
    runnable: int,
    held: Iterable[Record],
    oldest_waiting: float | None,
    outbox: Record,
) -> QueueStats:
    """``QueueStats`` from the records of ``count_by_status``, ``held_leases`` and ``outbox_stats``."""
    counts = dict.fromkeys(Status, 0)
    for row in by_status:
        counts[Status.stored(row["status"])] = row["n"]
    leases = {row["locked_by"]: row["n"] for row in held}
    oldest_event = outbox["oldest_pending"]
    return QueueStats(
        counts=counts,
        runnable=runnable,
        held_leases=sum(leases.values()),
        leases_by_worker=leases,
        oldest_waiting_age=None if oldest_waiting is None else max(0.0, now - oldest_waiting),
        outbox_pending=outbox["pending"],
        outbox_dead=outbox["dead"],
        outbox_oldest_pending_age=None if oldest_event is None else max(0.0, now - oldest_event),
    )


def created_range(which: InstanceFilter) -> tuple[float, float]:
    """The ``created_at`` range of a filter, ``[lo, hi)``, infinite where open."""
    lo = -math.inf if which.created_from is None else which.created_from
    hi = math.inf if which.created_to is None else which.created_to
    return lo, hi


def counts_by_status(found: Iterable[Record]) -> dict[Status, int]:
    """The records of ``count_instances_*`` as counts by status."""
    return {Status(r["status"]): r["n"] for r in found}


def runnable_by_name(found: Iterable[Record]) -> list[tuple[str, int]]:
    """The records of ``runnable_workflows``: the names with runnable instances, and how many."""
    return [(r["workflow_name"], r["runnable"]) for r in found if r["runnable"]]


@dataclass(frozen=True, slots=True)
class PagePlan:
    """How a backend reads one page of ``page_instances``: which named query, with which bounds."""

    query: str
    """``page_instances_<all|workflow|status|workflow_status>_<older|newer>``."""
    newer: bool
    """The query reads upwards from ``key``: the page comes oldest first and is to be reversed."""
    key: tuple[float, str]
    bound: float
    """The other end of the created_at range: ``created_at >= bound`` (older), ``< bound`` (newer)."""
    filters: tuple[str, ...]
    """The workflow name and/or the status the query compares, in that order."""

    def page(self, found: Iterable[Record]) -> list[InstanceSummary]:
        """The records the query returned as the page, newest first."""
        page = [rows.summary(r) for r in found]
        return page[::-1] if self.newer else page


def plan_page(
    which: InstanceFilter, before: tuple[float, str] | None, after: tuple[float, str] | None
) -> PagePlan:
    """The query and bounds of a keyset page. The created_at range's near end is folded into the key:
    ``created_at < to`` is ``(created_at, instance_id) < (to, "")``, and an instance id is never empty,
    so ``created_at >= from`` is ``(created_at, instance_id) > (from, "")``."""
    if before is not None and after is not None:
        raise ValueError("a page is read before a key or after one, not both")
    lo, hi = created_range(which)
    combo = "_".join(
        name
        for name, value in (("workflow", which.workflow_name), ("status", which.status))
        if value is not None
    )
    filters = tuple(str(value) for value in (which.workflow_name, which.status) if value is not None)
    if after is not None:
        key = max(after, (lo, ""))
        return PagePlan(f"page_instances_{combo or 'all'}_newer", True, key, hi, filters)
    key = (hi, "") if before is None else min(before, (hi, ""))
    return PagePlan(f"page_instances_{combo or 'all'}_older", False, key, lo, filters)


# -- retention --------------------------------------------------------------------------------------------
def cleanup(
    limit: int,
    subscriptions_deleted: int,
    subscriptions_read: int,
    last_subscription: tuple[str, str],
    messages_deleted: int,
    messages_read: int,
    last_message: tuple[float, int],
    events_deleted: int,
    rows_deleted: int,
) -> Cleanup:
    """A round of ``channel_cleanup`` from what its statements report: each walk (subscriptions in key
    order, old messages in age order) goes on after the last row it read, or from the start once it read
    fewer than ``limit`` (it reached the end); the round was full when a statement read ``limit`` rows
    (or deleted ``limit`` events): more may be due at once. ``rows_deleted``: the events' and their
    deliveries'."""
    start = CLEANUP_START
    return Cleanup(
        subscriptions_deleted + messages_deleted + rows_deleted,
        subscriptions_read >= limit or messages_read >= limit or events_deleted >= limit,
        CleanupPosition(
            last_subscription if subscriptions_read >= limit else start.subscription,
            last_message if messages_read >= limit else start.message,
        ),
    )


def pruned(
    limit: int, examined: int, free: int, instances: int, deleted: int, last: tuple[float | None, str | None]
) -> Pruned:
    """A batch of ``prune_instances`` from what its statements report: the next goes on after the last
    instance read, or from the start once this one read fewer than ``limit`` (it reached the end)."""
    at, instance_id = last
    if examined >= limit and at is not None and instance_id is not None:
        return Pruned(examined, free, instances, deleted, (at, instance_id))
    return Pruned(examined, free, instances, deleted, PRUNE_START)
