"""Operator actions, used by the client (``_client.py``): retry a failed instance from its failed step,
resume a stuck one (the bulk cancel behind ``geste cancel``'s filters is ``Client.cancellable`` and
``Client.cancel_each``).

Retry and resume are each one storage transaction that re-reads the instance under its lock (``BEGIN
IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE`` on PostgreSQL), so two operators acting at once are
serialised: one applies, the other gets a typed error saying why. What each may and may not do:
docs/design.md, "Operator actions".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ._models import HistoryEntry, Status, to_datetime
from ._serde import decode
from ._steps import STEPS, ActivityStep
from .errors import InstanceLeasedError, InstanceNotFoundError, InstanceStateError
from .storage.base import HistoryRow, RetryRow, Storage

logger = logging.getLogger("geste.operations")


@dataclass(frozen=True, slots=True)
class RetryRecord:
    """One retry of a failed instance (``app.retry``, ``app.retries``): what it removed and cleared.

    The history rows from ``from_seq`` on (the activity whose last attempt had failed at the end of the
    history, with those of its ``gather``) were removed so that those steps run again; everything
    before is replayed as recorded. None when the workflow failed by its own exception.
    """

    instance_id: str
    retry: int
    """1 for the instance's first retry, then 2, ..."""
    retried_at: datetime
    from_seq: int
    """The first step run again."""
    error: dict[str, Any] | None
    """The error the instance had failed with."""
    failed_at: datetime | None
    removed: list[HistoryEntry]
    """The removed history rows, as they were (the failed attempts' errors, their count and timing)."""


@dataclass(frozen=True, slots=True)
class ResumeResult:
    """What ``app.resume`` did to an unfinished instance."""

    instance_id: str
    status: Status
    was_due_at: datetime | None
    """When it was to run before (None: it waited for an event or a message with no deadline)."""
    lease_broken_from: str | None
    """The worker whose lease was broken (dead, or alive and ``force=True``); None: no lease was held."""
    already_runnable: bool
    """Nothing held it back: it was due and no lease was held (a worker takes it at its next claim)."""


async def retry(storage: Storage, instance_id: str, now: float) -> RetryRecord:
    """``app.retry`` after its checks of the id: one transaction (``Storage.retry_instance``)."""
    outcome = await storage.retry_instance(instance_id, now)
    if outcome.instance is None:
        raise InstanceNotFoundError(instance_id)
    if outcome.record is None:
        status = outcome.instance.status
        if outcome.compensated:
            message = (
                f"workflow instance {instance_id!r} cannot be retried: its compensations ran, so the "
                "effects of its recorded steps were undone and replaying them as done would be wrong; "
                "start a new instance instead"
            )
        else:
            retried = ""
            if outcome.last_retry is not None:
                number, at = outcome.last_retry
                retried = f" (retry {number} at {to_datetime(at):%Y-%m-%d %H:%M:%S} UTC)"
            message = (
                f"workflow instance {instance_id!r} is {status.value}{retried}, not failed: "
                "only a failed instance can be retried"
            )
        raise InstanceStateError(instance_id, status.value, message)
    record = retry_record(outcome.record)
    logger.info(
        "instance %s retried (retry %d): runs again from step %d, %d failed step row(s) archived",
        instance_id,
        record.retry,
        record.from_seq,
        len(record.removed),
    )
    return record


async def resume(
    storage: Storage, instance_id: str, now: float, *, lock_timeout: float, force: bool
) -> ResumeResult:
    """``app.resume`` after its checks of the id: one transaction (``Storage.resume_instance``)."""
    outcome = await storage.resume_instance(instance_id, now, lock_timeout=lock_timeout, force=force)
    before = outcome.before
    if before is None:
        raise InstanceNotFoundError(instance_id)
    if outcome.after is None:
        if outcome.holder_alive:
            raise InstanceLeasedError(instance_id, before.status.value, str(before.locked_by))
        hint = ""
        if before.status == Status.FAILED:
            hint = "; retry it (geste retry) to run it again from its failed step"
        elif not before.status.is_known:
            hint = " (a status this version of geste does not know: a newer version wrote it?)"
        raise InstanceStateError(
            instance_id,
            before.status.value,
            f"workflow instance {instance_id!r} is {before.status.value}: only an unfinished instance can "
            f"be resumed{hint}",
        )
    broken = before.locked_by if outcome.lease_broken else None
    if broken is not None:
        logger.warning(
            "instance %s resumed: the lease of worker %s (%s) was broken",
            instance_id,
            broken,
            "alive, forced" if outcome.holder_alive else "not alive",
        )
    return ResumeResult(
        instance_id=instance_id,
        status=outcome.after.status,
        was_due_at=to_datetime(before.run_at),
        lease_broken_from=broken,
        already_runnable=broken is None and before.run_at is not None and before.run_at <= now,
    )


def retry_record(row: RetryRow) -> RetryRecord:
    return RetryRecord(
        instance_id=row.instance_id,
        retry=row.retry,
        retried_at=to_datetime(row.retried_at),  # type: ignore[arg-type]
        from_seq=row.from_seq,
        error=_decoded(row.error),
        failed_at=to_datetime(row.failed_at),
        removed=[_entry(r) for r in row.removed],
    )


def _entry(row: HistoryRow) -> HistoryEntry:
    return HistoryEntry(
        seq=row.seq,
        kind=STEPS.get(row.kind, ActivityStep).kind,  # only failed activity rows are ever archived
        name=row.name,
        payload=_decoded(row.payload),
        is_error=row.is_error,
        created_at=to_datetime(row.created_at),  # type: ignore[arg-type]
    )


def _decoded(text: str | None) -> Any:
    """A stored JSON text, or the text itself if it is not JSON (an archive is shown, never refused)."""
    try:
        return decode(text)
    except (ValueError, RecursionError):
        return text
