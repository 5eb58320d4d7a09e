"""The client: every call that starts, looks at, acts on or sends to instances through the database.

``App``'s public methods delegate here. The client holds no worker: what it asks of this process's
runtime (run a started instance at once on a reserved slot, poke the worker or the relay after a write
that makes work for them) comes through the callables it is built with, which return None when this
process runs no worker (``run_worker=False``, or not open yet).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from . import _operations, _tracing
from ._definitions import Workflow
from ._handle import WorkflowHandle
from ._metrics import Metrics
from ._models import HistoryEntry, InstanceInfo, RunInfo, StateValue, Status, StreamEntry, to_datetime
from ._operations import ResumeResult, RetryRecord
from ._queues import OnDuplicate
from ._registry import Registry
from ._retry import seconds, workflow_deadline
from ._serde import decode, decode_error, encode
from ._state import StateWaits
from ._steps import read_row
from ._streams import Streams
from ._validation import check_channel, check_id, check_name, findable, storable_text
from ._versions import Versioning, runner_key
from .errors import (
    AppNotOpenError,
    ConfigurationError,
    InstanceAlreadyExistsError,
    InstanceNotFoundError,
    QueueDeduplicated,
    ResultTimeout,
    RunNotFoundError,
    StorageError,
    UnknownWorkflowError,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowTimeout,
)
from .runtime.relay import OutboxEntry, OutboxStatus, entry_from_row
from .storage.base import (
    Claim,
    HistoryRow,
    InstanceFilter,
    InstanceRow,
    Lease,
    NewEvent,
    NewInstance,
    NewMessage,
    Storage,
    StreamHead,
)

R = TypeVar("R")

logger = logging.getLogger("geste.app")

COMPLETED_KEPT = 5_000
COMPLETED_KEPT_SIZE = 2_048
"""Results of instances completed in this process kept for ``result()``: the latest 5,000 of at most
2 KiB each (10 MiB at worst); a larger result is read from the database."""

RESULT_WATCH_TTL = 600.0
"""Seconds a ``result()`` call's registration for the end of its instance (``geste_result_waiters``,
PostgreSQL) lasts unless renewed: a call that waits renews it once less than half is left, so only the
registrations of waiters that died expire; the cleanup chore deletes those."""

SETTLE_READ = 0.1
"""Seconds after registering for an end before a ``result()`` call reads the instance once more, then only
every ``poll_interval``. The read at once after the registration sees every end that committed before
the registration did; an end whose statement had read the registrations before that commit and commits
after that read is the one neither sees (docs/design.md, "The race"): this read finds it, unless the end's
statement took longer than this (a lock wait), and then the poll does."""

TIMEOUT_TYPE = f"{WorkflowTimeout.__module__}.{WorkflowTimeout.__qualname__}"
"""The recorded type of the error of an instance cancelled for its deadline."""


def _timed_out(error: str) -> bool:
    """Whether a cancelled instance's stored error says its deadline passed."""
    try:
        recorded = decode(error)
    except Exception:
        return False
    return isinstance(recorded, dict) and recorded.get("type") == TIMEOUT_TYPE


CANCELLABLE = (Status.PENDING, Status.RUNNING, Status.WAITING)
"""What a bulk cancel looks at unless told a status: compensating instances are ending already."""


class LocalWorker(Protocol):
    """This process's worker, as the client uses it (``geste._worker.Worker`` is one)."""

    def reserve(self) -> Lease | None:
        """A slot and a lease id for an instance about to be created and run at once; None when full."""
        ...

    def run_reserved(self, claim: Claim | None, history: Sequence[HistoryRow] = ()) -> None:
        """Run the instance created claimed with the reserved lease (None: give the slot back)."""
        ...

    def made_runnable(self) -> None:
        """A write made an instance runnable: look for work now, unless its notification routes it (to
        one worker, not necessarily this one)."""
        ...

    def cancel_running(self, instance_id: str, via: str = ...) -> None:
        """A cancel was requested for an instance: if it runs here, its running activities are cancelled."""
        ...


class LocalRelay(Protocol):
    """This process's outbox relay, as the client uses it (``geste._outbox.Relay`` is one)."""

    def made_due(self) -> None:
        """A write made an outbox event due: look now, unless its notification routes it to one relay."""
        ...


@dataclass(frozen=True, slots=True)
class SentEvent:
    """What ``Client.send_event`` did: the event's id, and whether it was stored (False: an event of
    that id was stored already, and this one was dropped as a duplicate)."""

    event_id: str
    stored: bool


@dataclass(frozen=True, slots=True)
class Done(Generic[R]):
    """What a read of ``Client.wait_loop`` returns when the wait is over: the value the call returns."""

    value: R


class Register(Protocol):
    """A call's registration with the database (``Storage.watch_result`` or ``watch_state``, the
    instance and the key bound): written only while the instance has not ended; whether it was."""

    def __call__(self, *, waiter: str, process: str, expires_at: float) -> Awaitable[bool]: ...


class Client:
    """Starts, looks at, acts on and sends to instances through ``storage``.

    ``is_open`` says whether calls are served (else ``AppNotOpenError``); ``worker`` and ``relay`` return
    this process's worker and outbox relay, or None when it runs none; ``listen(start)`` whether an end
    elsewhere can notify this process (``Runtime.listen_for_results``: True listening, False not yet,
    None never; ``start``: a wait needs the listener, open it). ``on_completed``, ``on_finished`` and
    ``on_released`` are the engine's hooks, ``on_finished`` and ``wake_waiters`` the listener's: they
    feed ``result()`` without a read or a poll.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        registry: Registry,
        metrics: Metrics,
        clock: Callable[[], float],
        max_payload_bytes: int,
        lock_timeout: float,
        poll_interval: float,
        worker_id: str,
        is_open: Callable[[], bool],
        worker: Callable[[], LocalWorker | None],
        relay: Callable[[], LocalRelay | None],
        listen: Callable[[bool], bool | None] = lambda start: None,
    ) -> None:
        self.storage = storage
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.max_payload_bytes = max_payload_bytes
        self.lock_timeout = lock_timeout
        self.poll_interval = poll_interval
        self.worker_id = worker_id
        self._is_open = is_open
        self._worker = worker
        self._relay = relay
        self._listen = listen
        self._waiters: dict[str, list[asyncio.Future[bool]]] = {}
        """The ``result()`` calls waiting, by instance: each future is set when something may have changed
        (True: the instance ended, and its end forgot the registrations it saw)."""
        self._watches: dict[str, str] = {}
        """The registrations for an end (``geste_result_waiters``) this process's waiting calls hold:
        instance id by waiter id."""
        self._unwatching: set[asyncio.Task[None]] = set()
        self.states = StateWaits(self)
        """The ``wait_state`` calls waiting, and the reads of published state (``geste._state``)."""
        self.streams: Streams | None = None
        """The App's streams (set when it is assembled): ``stream_entries`` reads through them."""
        self._completed: dict[str, tuple[str, str]] = {}
        """Workflow name and stored result of instances this process completed lately (a completion is
        final): ``result()`` of one of them needs no read. Oldest dropped past ``COMPLETED_KEPT``."""

    def _require_open(self) -> None:
        if not self._is_open():
            raise AppNotOpenError("the App is not open: use `async with app:` or `await app.open()` first")

    def _poke_worker(self) -> None:
        worker = self._worker()
        if worker is not None:
            worker.made_runnable()

    # -- starting and looking ----------------------------------------------------------------------
    async def start_workflow(
        self,
        workflow: str | Workflow[Any, Any],
        /,
        *args: Any,
        instance_id: str | None = None,
        timeout: float | timedelta | None = None,
        deadline: datetime | None = None,
        **kwargs: Any,
    ) -> WorkflowHandle[Any]:
        """Start ``workflow`` (an object or a registered name); an existing ``instance_id`` is returned.
        ``timeout`` / ``deadline``: as ``Workflow.options``."""
        if isinstance(workflow, str):
            found = self.registry.workflows.get(workflow)
            if found is None:
                raise UnknownWorkflowError(workflow)
            workflow = found
        elif not isinstance(workflow, Workflow):
            raise TypeError(f"start_workflow takes a workflow or its registered name, not {workflow!r:.80}")
        return await self.start_instance(
            workflow, args, kwargs, instance_id=instance_id, timeout=timeout, deadline=deadline
        )

    async def start_instance(
        self,
        workflow: Workflow[Any, R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        instance_id: str | None,
        timeout: float | timedelta | None = None,
        deadline: datetime | None = None,
        queue: str | None = None,
        priority: int = 0,
        dedup_id: str | None = None,
        partition_key: str = "",
        on_duplicate: OnDuplicate = "return",
        connection: object = None,
    ) -> WorkflowHandle[R]:
        """Start an instance of ``workflow`` with these arguments (``Workflow.start`` comes here), with
        the deadline that ``timeout`` / ``deadline`` give (``Workflow.options``). Onto a ``queue``, it
        waits, queued, until a worker serving the queue admits it (never created already claimed here);
        with a ``dedup_id`` held by another unfinished instance of the queue, that instance's handle
        comes back (``created`` False), or, ``on_duplicate="raise"``, ``QueueDeduplicated`` names it.
        With a ``connection`` (the caller's, inside the caller's transaction) the instance is written
        there, unclaimed: it exists, and its notification goes out, when that transaction commits."""
        self._require_open()
        writes = None if connection is None else self.storage.in_transaction(connection)
        if not self.registry.registered(workflow):
            raise UnknownWorkflowError(workflow.name)
        workflow.signature.bind(args, kwargs, what=f"workflow {workflow.name}")
        stored = encode(
            {"args": args, "kwargs": kwargs},
            what=f"input of workflow {workflow.name}",
            limit=self.max_payload_bytes,
        )
        iid = uuid.uuid4().hex if instance_id is None else check_id(instance_id, "instance_id")
        now = self.clock()
        due = workflow_deadline(timeout, deadline, now)
        tracer = _tracing.tracer()
        span = None
        if tracer is not None:  # the start span, under the caller's: its context is recorded with the row
            attrs = _tracing.attributes(iid, workflow.name, queue=queue)
            span = _tracing.start_span(tracer, f"geste.start {workflow.name}", attrs, current=True)
        new = NewInstance(
            iid,
            workflow.name,
            stored,
            now,
            due,
            queue,
            priority,
            dedup_id,
            partition_key,
            self.registry.code_version(),
            workflow.versioning is Versioning.PINNED,
            None if span is None else _tracing.dump(span),
        )
        # In the caller's transaction: no local run at once, no poke (nothing is there before the commit).
        worker = self._worker() if writes is None else None
        reserved = worker.reserve() if worker is not None and queue is None else None
        lease = None if reserved is None else Lease(iid, reserved.lease_id)
        try:
            if writes is not None:
                row, created = await writes.create_instance(new)
            else:
                row, created = await self.storage.create_instance(
                    new, lease=lease, worker_id=self.worker_id, lock_expires_at=now + self.lock_timeout
                )
        except BaseException as exc:
            if span is not None:
                _tracing.end(span, exc if isinstance(exc, Exception) else None)
            worker = self._worker()  # read again after the write: the App may have closed meanwhile
            if worker is not None and lease is not None:
                worker.run_reserved(None)
            raise
        if span is not None:
            span.set_attribute("geste.created", created)
            _tracing.end(span)
        if writes is not None:
            return self._started(workflow, iid, row, created, queue, dedup_id, on_duplicate)
        if created:
            self.metrics.workflows_started.values[workflow.name] += 1
        worker = self._worker()
        if worker is not None:
            if lease is not None:
                claim = (
                    Claim(
                        lease,
                        workflow.name,
                        stored,
                        Status.RUNNING,
                        now,
                        False,
                        deadline=due,
                        runner=runner_key(workflow.name, new.version, True) if new.pinned else None,
                    )
                    if created
                    else None
                )
                worker.run_reserved(claim, ())
            elif created:
                worker.made_runnable()
        return self._started(workflow, iid, row, created, queue, dedup_id, on_duplicate)

    def _started(
        self,
        workflow: Workflow[Any, R],
        iid: str,
        row: InstanceRow,
        created: bool,
        queue: str | None,
        dedup_id: str | None,
        on_duplicate: OnDuplicate,
    ) -> WorkflowHandle[R]:
        """The handle of a start that wrote ``row`` (``created``), or the error a start found instead."""
        if not created and row.instance_id != iid and queue is not None and dedup_id is not None:
            if on_duplicate == "raise":  # another instance holds the dedup id (not a start of this id again)
                raise QueueDeduplicated(queue, dedup_id, row.instance_id)
        elif not created and row.workflow_name != workflow.name:
            raise InstanceAlreadyExistsError(
                f"instance {iid!r} exists already as a {row.workflow_name!r} workflow, not {workflow.name!r}"
            )
        return WorkflowHandle(self, row.instance_id, created=created)

    def get_handle(self, instance_id: str) -> WorkflowHandle[Any]:
        return WorkflowHandle(self, instance_id, created=False)

    async def children(self, instance_id: str, *, limit: int = 1000) -> list[InstanceInfo]:
        self._require_open()
        if not findable(instance_id, "instance_id"):
            return []
        return [instance_info(row) for row in await self.storage.list_children(instance_id, limit=limit)]

    async def get_instance(self, instance_id: str) -> InstanceInfo:
        self._require_open()
        if not findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        row = await self.storage.get_instance(instance_id)
        if row is None:
            raise InstanceNotFoundError(instance_id)
        return instance_info(row)

    async def list_instances(
        self,
        *,
        workflow: str | None = None,
        status: Status | str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[InstanceInfo]:
        """Instances, newest first, optionally of one workflow name and/or status."""
        self._require_open()
        try:
            wanted = None if status is None else Status(status)
        except ValueError:
            raise ConfigurationError(
                f"unknown status {status!r}; one of {', '.join(s.value for s in Status)}"
            ) from None
        if not isinstance(limit, int) or not 0 < limit <= 10_000 or not isinstance(offset, int) or offset < 0:
            raise ConfigurationError("limit must be in 1..10000 and offset >= 0")
        if workflow is not None and not findable(workflow, "workflow"):
            return []
        rows = await self.storage.list_instances(
            workflow_name=workflow, status=wanted, limit=limit, offset=offset
        )
        return [instance_info(row) for row in rows]

    async def history(self, instance_id: str, *, run: int | None = None) -> list[HistoryEntry]:
        """The recorded steps of an instance's current run (or of its kept run ``run``), in order.

        Raises ``geste.errors.HistoryCorruptedError`` for a row geste cannot read (changed by hand),
        ``RunNotFoundError`` for a run number it has not kept.
        """
        self._require_open()
        if run is not None and (isinstance(run, bool) or not isinstance(run, int) or run < 1):
            raise ConfigurationError(f"run must be a run number (1, 2, ...), not {run!r:.80}")
        if not findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        instance = await self.storage.get_instance(instance_id)
        if instance is None:
            raise InstanceNotFoundError(instance_id)
        if run is None or run == instance.run:
            rows = await self.storage.get_history(instance_id)
        else:
            rows = await self.storage.get_run_history(instance_id, run)
            if not rows:  # a kept run has one row at least: its continue_as_new
                raise RunNotFoundError(instance_id, run)
        entries = []
        for row in rows:
            kind, payload = read_row(row, instance_id=instance_id)  # an unknown kind, not JSON: corrupted
            entries.append(
                HistoryEntry(
                    seq=row.seq,
                    kind=kind,
                    name=row.name,
                    payload=payload,
                    is_error=row.is_error,
                    created_at=to_datetime(row.created_at) or to_datetime(0.0),  # type: ignore[arg-type]
                )
            )
        return entries

    async def runs(self, instance_id: str) -> list[RunInfo]:
        """The runs of an instance that ended with ``ctx.continue_as_new``, oldest first (its current run,
        ``get_instance`` and ``history``, is not among them)."""
        self._require_open()
        if not findable(instance_id, "instance_id") or await self.storage.get_instance(instance_id) is None:
            raise InstanceNotFoundError(instance_id)
        return [
            RunInfo(
                instance_id=r.instance_id,
                run=r.run,
                input=decode(r.input),
                started_at=to_datetime(r.started_at),  # type: ignore[arg-type]
                ended_at=to_datetime(r.ended_at),  # type: ignore[arg-type]
                steps=r.steps,
                ended_as=r.ended_as,
            )
            for r in await self.storage.list_runs(instance_id)
        ]

    # -- operator actions --------------------------------------------------------------------------
    async def cancel(self, instance_id: str) -> InstanceInfo:
        """Cancel an instance: at once if it never ran, else at its next step, after its compensations."""
        self._require_open()
        if not findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        row = await self.storage.request_cancel(instance_id, self.clock())
        if row is None:
            raise InstanceNotFoundError(instance_id)
        if row.status.is_finished:
            self.on_finished(instance_id)
        else:
            self._poke_worker()
            worker = self._worker()
            if worker is not None:  # run here: its activities are cancelled now, no notice needed
                worker.cancel_running(instance_id, "local")
        return instance_info(row)

    async def cancellable(
        self, *, workflow: str | None, statuses: Sequence[Status], page: int = 1000
    ) -> list[str]:
        """Ids of the instances of ``workflow`` (any when None) in ``statuses`` not yet asked to cancel.

        Keyset pages (newest first, by creation key, through the indexes the viewer uses): one index range
        scan per page however deep, and an instance whose status changes meanwhile is neither skipped nor
        listed twice within its status. Instances started after the listing began are not included.
        """
        if workflow is not None and not storable_text(workflow):
            return []  # a name no database could hold (NUL, a lone surrogate): no instance has it
        found: dict[str, None] = {}
        for status in statuses:
            which = InstanceFilter(workflow_name=workflow, status=status)
            before: tuple[float, str] | None = None
            while True:
                rows = await self.storage.page_instances(which, before=before, limit=page)
                for row in rows:
                    if not row.cancel_requested:
                        found[row.instance_id] = None
                if len(rows) < page:
                    break
                before = (rows[-1].created_at, rows[-1].instance_id)
        return list(found)

    async def cancel_each(
        self, instance_ids: Sequence[str], *, on_done: Callable[[InstanceInfo], None], concurrency: int = 8
    ) -> None:
        """``cancel`` each instance, ``concurrency`` at a time; ``on_done`` gets each answer."""
        pending = iter(instance_ids)

        async def work() -> None:
            for instance_id in pending:  # shared by the tasks: each id is taken once
                on_done(await self.cancel(instance_id))

        await asyncio.gather(*(work() for _ in range(min(concurrency, len(instance_ids)))))

    async def retry(self, instance_id: str) -> RetryRecord:
        """``App.retry``: run a failed instance again from its failed step; return what it removed."""
        self._require_open()
        if not findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        record = await _operations.retry(self.storage, instance_id, self.clock())
        self._poke_worker()
        return record

    async def retries(self, instance_id: str) -> list[RetryRecord]:
        """The retries of an instance, oldest first: what each removed from its history and cleared."""
        self._require_open()
        if not findable(instance_id, "instance_id") or await self.storage.get_instance(instance_id) is None:
            raise InstanceNotFoundError(instance_id)
        return [_operations.retry_record(row) for row in await self.storage.list_retries(instance_id)]

    async def resume(self, instance_id: str, *, force: bool = False) -> ResumeResult:
        """``App.resume``: make an unfinished instance runnable now."""
        self._require_open()
        if not isinstance(force, bool):  # force=1 or "yes" must not quietly mean no, nor break a lease
            raise ConfigurationError(f"force must be True or False, not {force!r}")
        if not findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        result = await _operations.resume(
            self.storage, instance_id, self.clock(), lock_timeout=self.lock_timeout, force=force
        )
        self._poke_worker()
        return result

    # -- events ------------------------------------------------------------------------------------
    async def send_event(
        self,
        event_type: str,
        data: Any = None,
        *,
        source: str | None = None,
        event_id: str | None = None,
        instance_id: str | None = None,
        extensions: dict[str, Any] | None = None,
        connection: object = None,
    ) -> SentEvent:
        """``App.send_event``, also saying whether the event was stored (False: its id was there already).
        With a ``connection``: written in the caller's transaction (``start_instance``)."""
        self._require_open()
        writes = None if connection is None else self.storage.in_transaction(connection)
        check_name(event_type, "event type")
        eid = uuid.uuid4().hex if event_id is None else check_id(event_id, "event_id")
        if source is not None and (not isinstance(source, str) or not storable_text(source)):
            raise ConfigurationError("source must be a string (no NUL, valid UTF-8)")
        body = encode(data, what=f"data of event {event_type}", limit=self.max_payload_bytes)
        ext = (
            None
            if extensions is None
            else encode(extensions, what="event extensions", limit=self.max_payload_bytes)
        )
        reader = self.storage if writes is None else writes  # an instance the transaction started is seen
        if instance_id is not None and (
            not findable(instance_id, "instance_id") or await reader.get_instance(instance_id) is None
        ):
            raise InstanceNotFoundError(instance_id)
        event = NewEvent(eid, event_type, body, source, instance_id, ext, self.clock())
        if writes is not None:  # the woken are claimable once it commits: its notifications tell them
            stored, _ = await writes.send_event(event)
            return SentEvent(eid, stored)
        stored, woken = await self.storage.send_event(event)
        if woken:
            self._poke_worker()
        return SentEvent(eid, stored)

    # -- the transactional outbox ------------------------------------------------------------------
    async def outbox(
        self,
        *,
        status: OutboxStatus | str | None = None,
        instance_id: str | None = None,
        limit: int = 100,
    ) -> list[OutboxEntry]:
        """``App.outbox``: events emitted with ``ctx.send_event``, newest first."""
        self._require_open()
        try:
            wanted = None if status is None else OutboxStatus(status)
        except ValueError:
            raise ConfigurationError(
                f"unknown outbox status {status!r}; one of {', '.join(s.value for s in OutboxStatus)}"
            ) from None
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= 10_000:
            raise ConfigurationError("limit must be in 1..10000")
        if instance_id is not None and not findable(instance_id, "instance_id"):
            return []
        rows = await self.storage.outbox_list(
            status=None if wanted is None else wanted.value, instance_id=instance_id, limit=limit
        )
        return [entry_from_row(row) for row in rows]

    async def retry_outbox_event(self, event_id: str) -> bool:
        """``App.retry_outbox_event``: re-queue a dead outbox event; False when no dead event has that id."""
        self._require_open()
        if not findable(event_id, "event_id"):
            return False
        found = await self.storage.outbox_retry(event_id, self.clock())
        if found:
            self._poke_relay()
        return found

    async def discard_outbox_event(self, event_id: str) -> bool:
        """``App.discard_outbox_event``: give up a pending or dead outbox event; False when none had that
        id."""
        self._require_open()
        if not findable(event_id, "event_id"):
            return False
        found = await self.storage.outbox_discard(event_id, self.clock())
        if found:
            self._poke_relay()
        return found

    def _poke_relay(self) -> None:
        relay = self._relay()
        if relay is not None:
            relay.made_due()

    # -- channels ----------------------------------------------------------------------------------
    async def publish(
        self, channel: str, data: Any = None, *, message_id: str | None = None, connection: object = None
    ) -> str:
        """``App.publish``: publish ``data`` on ``channel`` from outside a workflow; return its id."""
        return await self._publish(channel, data, target=None, message_id=message_id, connection=connection)

    async def send_to(
        self,
        instance_id: str,
        channel: str,
        data: Any = None,
        *,
        message_id: str | None = None,
        connection: object = None,
    ) -> str:
        """``App.send_to``: send ``data`` on ``channel`` to instance ``instance_id`` only; return its id."""
        target = check_id(instance_id, "instance_id")
        return await self._publish(channel, data, target=target, message_id=message_id, connection=connection)

    async def _publish(
        self, channel: str, data: Any, *, target: str | None, message_id: str | None, connection: object
    ) -> str:
        """With a ``connection``: written in the caller's transaction (``start_instance``)."""
        self._require_open()
        writes = None if connection is None else self.storage.in_transaction(connection)
        check_channel(channel)
        mid = uuid.uuid4().hex if message_id is None else check_id(message_id, "message_id")
        body = encode(data, what=f"data of a message on channel {channel}", limit=self.max_payload_bytes)
        message = NewMessage(mid, channel, body, None, target, self.clock())
        if writes is None:
            result = await self.storage.channel_publish(message)
        else:
            result = await writes.channel_publish(message)
        if result.target_missing:
            raise InstanceNotFoundError(str(target))
        if result.woken and writes is None:
            self._poke_worker()
        return mid

    # -- published state (geste._state) ----------------------------------------------------------------
    async def get_state(self, instance_id: str, key: str, *, version: int | None = None) -> StateValue | None:
        return await self.states.get(instance_id, key, version=version)

    async def wait_state(
        self, instance_id: str, key: str, *, after: int = 0, timeout: float | timedelta | None = None
    ) -> StateValue:
        return await self.states.wait(instance_id, key, after=after, timeout=timeout)

    async def list_state(self, instance_id: str, *, limit: int = 1000) -> list[StateValue]:
        return await self.states.list(instance_id, limit=limit)

    # -- streams -----------------------------------------------------------------------------------
    async def stream_entries(self, instance_id: str, key: str, start: int = 0) -> AsyncIterator[StreamEntry]:
        """The items of the instance's stream ``key`` from position ``start`` on, with their positions,
        until the stream is closed or the instance ended (``WorkflowHandle.stream_entries``)."""
        self._require_open()
        if not findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        assert self.streams is not None, "the App assembles its streams with its client"
        async for entry in self.streams.entries(instance_id, key, start):
            yield entry

    async def stream_list(self, instance_id: str, *, limit: int = 100) -> list[StreamHead]:
        """The streams of an instance, by key: how many positions each used, whether it is closed."""
        self._require_open()
        if not findable(instance_id, "instance_id"):
            return []
        return await self.storage.stream_list(instance_id, limit=limit)

    # -- results -----------------------------------------------------------------------------------
    async def result(self, instance_id: str, timeout: float | timedelta | None) -> Any:
        """Wait for the instance to finish and return its result (``WorkflowHandle.result``).

        An end in this process wakes the call without a read (the engine's ``on_finished``). On PostgreSQL
        an end elsewhere is notified: once the instance is read unfinished and not held here, the call
        registers for its end (``Storage.watch_result``) and reads it again at once (an end that committed
        before the registration is seen by that read, one after is notified); then it waits for the
        notification, reading again ``SETTLE_READ`` after registering and every ``poll_interval`` (the net
        for a lost notification), and deletes its registration when it stops waiting. Otherwise,
        and while the listener is not listening, it reads the instance after 10 ms, then twice as long each
        time up to ``poll_interval`` (``wait_loop``).
        """
        self._require_open()
        if not findable(instance_id, "instance_id"):  # else PostgreSQL's refusal looks like an outage
            raise InstanceNotFoundError(instance_id)
        limit = None if timeout is None else seconds(timeout, what="timeout")

        async def read() -> Done[Any] | bool:
            completed = self._completed.get(instance_id)
            if completed is not None:  # completed here: the committed result, without a read
                return Done(self._completed_value(*completed))
            row = await self.storage.get_instance(instance_id)
            if row is None:
                raise InstanceNotFoundError(instance_id)
            if row.status.is_finished:
                return Done(self._outcome(row))
            return row.locked_by != self.worker_id  # else its end here wakes this call in memory

        def add(future: asyncio.Future[bool]) -> None:
            self._waiters.setdefault(instance_id, []).append(future)

        def drop(future: asyncio.Future[bool]) -> None:
            waiters = self._waiters.get(instance_id)
            if waiters is not None and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._waiters[instance_id]

        def timed_out() -> ResultTimeout:
            return ResultTimeout(f"instance {instance_id} did not finish within {limit}s")

        return await self.wait_loop(
            instance_id,
            what=instance_id,
            read=read,
            register=partial(self.storage.watch_result, instance_id),
            add=add,
            drop=drop,
            deadline=None if limit is None else time.monotonic() + limit,
            timed_out=timed_out,
        )

    async def wait_loop(
        self,
        instance_id: str,
        *,
        what: str,
        read: Callable[[], Awaitable[Done[R] | bool]],
        register: Register,
        add: Callable[[asyncio.Future[bool]], None],
        drop: Callable[[asyncio.Future[bool]], None],
        deadline: float | None,
        timed_out: Callable[[], Exception],
    ) -> R:
        """The wait of ``result()`` and of ``wait_state`` (``StateWaits.wait``), round by round, until
        ``read`` returns ``Done``; its value is returned.

        Each round adds a future (``add``: where the wake-ups of this call set it) before it reads (a
        change committed after the read wakes it), and drops it (``drop``) at the round's end. ``read``
        returns ``Done``, raises, or says whether the call may register with the database (``register``,
        ``Storage.watch_result`` or ``watch_state`` of the instance; False: a wake-up in memory will
        come). Once the listener listens and the call may, it registers, reads again at once, again
        ``SETTLE_READ`` later, then every ``poll_interval``, renewing every ``RESULT_WATCH_TTL / 2``;
        otherwise it reads after 10 ms, then twice as long each time up to ``poll_interval``. Past
        ``deadline`` (monotonic) it raises ``timed_out()``; a ``StorageError`` is logged (``what`` is
        waited for) and the call keeps waiting. It deletes its registration when it stops waiting."""
        delay = 0.01
        loop = asyncio.get_running_loop()
        waiter: str | None = None  # this call's registration, once written
        renew_at = 0.0  # when it renews it (the App's clock)
        settle_at: float | None = None  # a read is due then (monotonic), SETTLE_READ after registering
        ended = False  # woken by the end, which forgot the registrations it saw
        try:
            while True:
                self._require_open()
                future: asyncio.Future[bool] = loop.create_future()
                add(future)  # before the read: no change unseen
                try:
                    listening = self._listen(False)
                    notified = False  # a change elsewhere notifies this call: it waits for that
                    read_at = time.monotonic()
                    if settle_at is not None and read_at >= settle_at - 0.001:  # (timers fire a hair early)
                        settle_at = None  # this is the read after the registration settled
                    try:
                        found = await read()
                        if isinstance(found, Done):
                            return found.value
                        if listening is False:  # a wait is needed: a process without a worker listens
                            listening = self._listen(True)
                        if listening is not None and found:
                            if waiter is None or self.clock() >= renew_at:
                                first = waiter is None
                                waiter = await self._watch(instance_id, waiter, register)
                                renew_at = self.clock() + RESULT_WATCH_TTL / 2
                                if first:
                                    settle_at = time.monotonic() + SETTLE_READ
                                if first or waiter is None:
                                    continue  # read again now: a change committed meanwhile is seen
                            notified = bool(listening)
                    except StorageError as exc:  # the database went away: keep waiting, it may come back
                        logger.warning("waiting for %s: %s; trying again", what, exc)
                    if notified:
                        wait = min(self.poll_interval, max(0.0, renew_at - self.clock()))
                        if settle_at is not None:
                            wait = min(wait, max(0.0, settle_at - time.monotonic()))
                    else:
                        wait = delay
                    if deadline is not None:  # (a wait of 0, a read due now, is no timeout)
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise timed_out()
                        wait = min(wait, left)
                    try:
                        async with asyncio.timeout(wait):
                            await asyncio.shield(future)
                    except TimeoutError:
                        if not notified:
                            delay = min(delay * 2, self.poll_interval)
                finally:
                    if future.done() and future.result():
                        ended = True
                    drop(future)
        finally:
            if waiter is not None:
                self._forget_watch(waiter, deleted=ended)

    async def _watch(self, instance_id: str, waiter: str | None, register: Register) -> str | None:
        """Register this call with the database (``waiter``: renew its registration); return its waiter
        id, or None when nothing was written (the instance had ended)."""
        waiter = waiter or uuid.uuid4().hex
        written = await register(
            waiter=waiter, process=self.worker_id, expires_at=self.clock() + RESULT_WATCH_TTL
        )
        if not written:
            self._watches.pop(waiter, None)
            return None
        self._watches[waiter] = instance_id
        return waiter

    def _forget_watch(self, waiter: str, *, deleted: bool) -> None:
        """A call stopped waiting: its registration is deleted, in the background (the result is not
        delayed by it), unless the end that woke it did so already (``deleted``)."""
        instance_id = self._watches.pop(waiter, None)
        if instance_id is None or deleted or not self._is_open():
            return  # gone, or App.close forgets every registration at once
        task = asyncio.get_running_loop().create_task(self._unwatch([(instance_id, waiter)]))
        self._unwatching.add(task)
        task.add_done_callback(self._unwatching.discard)

    async def _unwatch(self, waits: list[tuple[str, str]]) -> None:
        try:
            await self.storage.unwatch_results(waits)
        except StorageError as exc:  # it expires: the cleanup chore deletes it then
            logger.info("could not forget %d result() registration(s): %s", len(waits), exc)

    async def close_watches(self) -> None:
        """The App closes: forget every registration of this process's waiting calls, in one statement,
        before the database closes (the calls themselves wake and see the App closed)."""
        if self._unwatching:
            await asyncio.gather(*self._unwatching, return_exceptions=True)
        waits = [(instance_id, waiter) for waiter, instance_id in self._watches.items()]
        self._watches.clear()
        if waits:
            await self._unwatch(waits)

    def _completed_value(self, workflow_name: str, result: str | None) -> Any:
        return self.registry.load_result(workflow_name, decode(result))

    def _outcome(self, row: InstanceRow) -> Any:
        if row.status == Status.COMPLETED:
            return self._completed_value(row.workflow_name, row.result)
        error = decode(row.error) or {}
        if row.status == Status.CANCELLED:
            if row.error is not None and _timed_out(row.error):
                raise WorkflowTimeout(f"workflow instance {row.instance_id} ran past its deadline")
            raise WorkflowCancelled(f"workflow instance {row.instance_id} was cancelled")
        failure = WorkflowFailed(row.instance_id, error)
        raise failure from decode_error(error)

    # -- the engine's hooks ------------------------------------------------------------------------
    def on_completed(self, instance_id: str, workflow_name: str, result: str) -> None:
        """A completion committed in this process: its result is kept for ``result()`` (if small)."""
        if len(result) > COMPLETED_KEPT_SIZE:
            return
        if len(self._completed) >= COMPLETED_KEPT:
            del self._completed[next(iter(self._completed))]
        self._completed[instance_id] = (workflow_name, result)

    def on_finished(self, instance_id: str) -> None:
        """An instance ended (in this process, or elsewhere and notified): its ``result()`` waiters look
        at it now. The end forgot their registrations for it."""
        self._wake(self._waiters.get(instance_id, ()), ended=True)
        self.states.on_instance(instance_id, ended=True)

    def on_state(self, instance_id: str, key: str) -> None:
        """A value of ``key`` was published (in this process, or elsewhere and notified): its
        ``wait_state`` calls read it now."""
        self.states.on_state(instance_id, key)

    def on_released(self, instance_id: str) -> None:
        """An instance this process ran suspended: it may end in another process now, so its ``result()``
        waiters here look at it again (and register for that end)."""
        self._wake(self._waiters.get(instance_id, ()))
        self.states.on_instance(instance_id)

    def wake_waiters(self) -> None:
        """Every ``result()`` waiter reads its instance now (the listener connected or reconnected: an end
        notified while it was away is not replayed)."""
        for futures in self._waiters.values():
            self._wake(futures)
        self.states.wake_all()

    def release_waiters(self) -> None:
        """The App closed: every ``result()`` waiter wakes, and sees it closed."""
        self.wake_waiters()
        self._waiters.clear()

    @staticmethod
    def _wake(futures: Sequence[asyncio.Future[bool]], *, ended: bool = False) -> None:
        for future in futures:
            if not future.done():
                future.set_result(ended)


def instance_info(row: InstanceRow) -> InstanceInfo:
    return InstanceInfo(
        instance_id=row.instance_id,
        workflow_name=row.workflow_name,
        status=row.status,
        input=decode(row.input),
        result=decode(row.result),
        error=decode(row.error),
        created_at=to_datetime(row.created_at),  # type: ignore[arg-type]
        updated_at=to_datetime(row.updated_at),  # type: ignore[arg-type]
        finished_at=to_datetime(row.finished_at),
        locked_by=row.locked_by,
        lock_expires_at=to_datetime(row.lock_expires_at),
        cancel_requested=row.cancel_requested,
        steps=row.steps,
        run=row.run,
        parent_id=row.parent_id,
        deadline=to_datetime(row.deadline),
    )
