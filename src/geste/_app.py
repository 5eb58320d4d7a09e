"""The App: the registry of workflows and activities, the open database, the worker, the client calls."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, overload

from . import _operations
from ._definitions import Activity, Workflow
from ._handle import WorkflowHandle
from ._metrics import Metrics, app_collector
from ._models import HistoryEntry, InstanceInfo, Status, to_datetime
from ._operations import ResumeResult, RetryRecord
from ._retry import DEFAULT_RETRY, RetryPolicy, positive_int, seconds
from ._serde import decode, decode_error, encode
from ._status import LEASES_SHOWN, UNSERVED_CAP, LeaseInfo, ListenerStatus, SystemStatus, WorkerInfo, is_alive
from ._steps import read_row
from ._validation import check_channel, check_name, storable_text
from .engine.context import ActivityContext, WorkflowContext
from .engine.run import Engine
from .errors import (
    AppNotOpenError,
    ConfigurationError,
    InstanceAlreadyExistsError,
    InstanceNotFoundError,
    ResultTimeout,
    StorageError,
    UnknownWorkflowError,
    WorkflowCancelled,
    WorkflowFailed,
)
from .runtime import OpenClose, Runtime, RuntimeOptions
from .runtime.relay import OutboxConfig, OutboxEntry, OutboxHandler, OutboxStatus, Relay, entry_from_row
from .runtime.wakeups import NotifyConfig
from .runtime.worker import Worker
from .storage import Storage, create_storage
from .storage.base import Claim, InstanceRow, Lease, NewEvent, NewInstance, NewMessage, WorkerRow

if TYPE_CHECKING:
    from .http import GesteASGI

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("geste.app")

DEFAULT_URL = "sqlite:///geste.db"
MAX_ID_LENGTH = 200
COMPLETED_KEPT = 5_000
COMPLETED_KEPT_SIZE = 2_048
"""Results of instances completed in this process kept for ``result()``: the latest 5,000 of at most
2 KiB each (10 MiB at worst); a larger result is read from the database."""


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH or not storable_text(value):
        raise ConfigurationError(
            f"{what} must be a non-empty string of at most {MAX_ID_LENGTH} characters (no NUL, valid UTF-8)"
        )
    return value


def _findable(value: object, what: str) -> bool:
    """Whether ``value`` can be the id or name of a stored row. A non-string is the caller's mistake; a
    string no backend stores (NUL, a lone surrogate) names nothing, and is not sent to the database,
    where it would fail as a driver error (a StorageError on PostgreSQL, a UnicodeEncodeError from
    sqlite3) rather than find nothing."""
    if not isinstance(value, str):
        raise ConfigurationError(f"{what} must be a string, not {type(value).__name__}")
    return storable_text(value)


class App(OpenClose):
    """A geste application: where workflows and activities are registered and run.

    ``App()`` stores in ``./geste.db`` (SQLite) unless ``url`` or ``GESTE_DATABASE_URL`` says otherwise.
    ``async with app:`` opens the database (migrating it) and, unless ``run_worker=False``, starts a
    worker in this process that runs instances, this process's and others'.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        worker_id: str | None = None,
        run_worker: bool = True,
        concurrency: int = 100,
        lock_timeout: float | timedelta = 15.0,
        poll_interval: float | timedelta = 1.0,
        shutdown_grace: float | timedelta = 10.0,
        max_payload_bytes: int = 1024 * 1024,
        default_retry: RetryPolicy = DEFAULT_RETRY,
        listen_notify: bool | None = None,
        notify_fallback_interval: float | timedelta = 30.0,
        notify_reconnect_delay: float | timedelta = 60.0,
        max_workflows_per_batch: int = 100,
        max_timers_per_batch: int = 100,
        max_messages_per_batch: int = 100,
        listen_database_url: str | None = None,
        outbox_endpoint: str | None = None,
        outbox_handler: OutboxHandler | None = None,
        outbox_headers: Mapping[str, str] | None = None,
        outbox_max_attempts: int | None = None,
        outbox_initial_backoff: float | timedelta = 1.0,
        outbox_max_backoff: float | timedelta = 300.0,
        outbox_timeout: float | timedelta = 10.0,
        message_retention: float | timedelta = timedelta(days=7),
        event_retention: float | timedelta = timedelta(days=7),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url or os.environ.get("GESTE_DATABASE_URL") or DEFAULT_URL
        self.notify = NotifyConfig.build(
            url=self.url,
            listen_notify=listen_notify,
            fallback_interval=seconds(notify_fallback_interval, what="notify_fallback_interval"),
            reconnect_delay=seconds(notify_reconnect_delay, what="notify_reconnect_delay"),
            max_workflows_per_batch=max_workflows_per_batch,
            max_timers_per_batch=max_timers_per_batch,
            max_messages_per_batch=max_messages_per_batch,
            listen_database_url=listen_database_url,
        )
        self.storage: Storage = create_storage(self.url, notify=self.notify.enabled)
        self.worker_id = _check_id(
            worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}", "worker_id"
        )
        self.run_worker = run_worker
        self.concurrency = positive_int(concurrency, "concurrency")
        self.lock_timeout = seconds(lock_timeout, what="lock_timeout", allow_zero=False)
        self.poll_interval = seconds(poll_interval, what="poll_interval", allow_zero=False)
        self.shutdown_grace = seconds(shutdown_grace, what="shutdown_grace")
        self.max_payload_bytes = positive_int(max_payload_bytes, "max_payload_bytes")
        if not isinstance(default_retry, RetryPolicy):
            raise ConfigurationError("default_retry must be a geste.RetryPolicy")
        self.default_retry = default_retry
        self.clock = clock
        self.message_retention = seconds(message_retention, what="message_retention")
        self.event_retention = seconds(event_retention, what="event_retention")
        self.outbox_config = OutboxConfig.build(
            endpoint=outbox_endpoint,
            handler=outbox_handler,
            headers=outbox_headers,
            max_attempts=outbox_max_attempts,
            initial_backoff=outbox_initial_backoff,
            max_backoff=outbox_max_backoff,
            timeout=outbox_timeout,
        )
        self._workflows: dict[str, Workflow[Any, Any]] = {}
        self._activities: dict[str, Activity[Any, Any]] = {}
        self._open = False
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._completed: dict[str, tuple[str, str]] = {}
        """Workflow name and stored result of instances this process completed lately (a completion is
        final): ``result()`` of one of them needs no read. Oldest dropped past ``COMPLETED_KEPT``."""
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        self.metrics = Metrics()
        """This App's metrics (README, "Metrics"): ``await app.metrics.snapshot()``; ``GET /metrics``."""
        self._engine, self.runtime = self._wire(
            self.storage, self.clock, self.metrics, self._runtime_options()
        )

    def _runtime_options(self, **extra: Any) -> RuntimeOptions:
        """The runtime's options, from this App's (read again by ``open``: a worker command sets
        ``run_worker`` and ``concurrency`` on the App it loads)."""
        return RuntimeOptions(
            worker_id=self.worker_id,
            run_worker=self.run_worker,
            concurrency=self.concurrency,
            lock_timeout=self.lock_timeout,
            poll_interval=self.poll_interval,
            shutdown_grace=self.shutdown_grace,
            notify=self.notify,
            outbox=self.outbox_config,
            message_retention=self.message_retention,
            event_retention=self.event_retention,
            **extra,
        )

    def _wire(
        self, storage: Storage, clock: Callable[[], float], metrics: Metrics, options: RuntimeOptions
    ) -> tuple[Engine, Runtime]:
        """The engine running this App's workflows on ``storage``, and the runtime running it."""
        metrics.add_collector(lambda: app_collector(self.runtime)())
        storage.observe_group_commits(metrics.group_commit_batch_size.observe)
        engine = Engine(
            storage=storage,
            workflows=self._workflows,
            clock=clock,
            lock_timeout=options.lock_timeout,
            max_payload_bytes=self.max_payload_bytes,
            on_suspended=self._on_suspended,
            on_finished=self._on_finished,
            metrics=metrics,
        )
        runtime = Runtime(storage, options, runner=engine, clock=clock, metrics=metrics)
        engine.on_completed = self._on_completed
        engine.on_outbox = runtime.outbox_recorded
        engine.on_channel_woken = runtime.channel_woken
        return engine, runtime

    @property
    def _worker(self) -> Worker | None:
        """This process's worker while open (None: closed, or ``run_worker=False``)."""
        return self.runtime.worker

    @property
    def _relay(self) -> Relay | None:
        """This process's outbox relay while open (None: closed, or none runs here)."""
        return self.runtime.relay

    # -- registration ------------------------------------------------------------------------------
    @overload
    def workflow(self, fn: Callable[Concatenate[WorkflowContext, P], Awaitable[R]], /) -> Workflow[P, R]: ...

    @overload
    def workflow(
        self, fn: None = None, /, *, name: str | None = None
    ) -> Callable[[Callable[Concatenate[WorkflowContext, P], Awaitable[R]]], Workflow[P, R]]: ...

    def workflow(self, fn: Any = None, /, *, name: str | None = None) -> Any:
        """Register an ``async def`` workflow taking a ``WorkflowContext`` first."""

        def register(f: Callable[Concatenate[WorkflowContext, P], Awaitable[R]]) -> Workflow[P, R]:
            wf = Workflow(self, f, name=name or f.__name__)
            if wf.name in self._workflows:
                raise ConfigurationError(f"a workflow named {wf.name!r} is registered already")
            self._workflows[wf.name] = wf
            return wf

        return register if fn is None else register(fn)

    @overload
    def activity(self, fn: Callable[Concatenate[ActivityContext, P], Awaitable[R]], /) -> Activity[P, R]: ...

    @overload
    def activity(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
    ) -> Callable[[Callable[Concatenate[ActivityContext, P], Awaitable[R]]], Activity[P, R]]: ...

    def activity(
        self,
        fn: Any = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
    ) -> Any:
        """Register an ``async def`` activity taking an ``ActivityContext`` first.

        ``retry`` defaults to the App's ``default_retry``; ``timeout`` (per attempt) overrides the
        policy's.
        """
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError("retry must be a geste.RetryPolicy")
        policy = retry or self.default_retry
        if timeout is not None:
            seconds(timeout, what="timeout", allow_zero=False)
            policy = RetryPolicy(
                max_attempts=policy.max_attempts,
                initial_interval=policy.initial_interval,
                backoff=policy.backoff,
                max_interval=policy.max_interval,
                timeout=timeout,
                non_retryable=policy.non_retryable,
            )

        def register(f: Callable[Concatenate[ActivityContext, P], Awaitable[R]]) -> Activity[P, R]:
            act = Activity(f, name=name or f.__name__, retry=policy)
            if act.name in self._activities:
                raise ConfigurationError(f"an activity named {act.name!r} is registered already")
            self._activities[act.name] = act
            return act

        return register if fn is None else register(fn)

    @property
    def workflows(self) -> dict[str, Workflow[Any, Any]]:
        return dict(self._workflows)

    @property
    def activities(self) -> dict[str, Activity[Any, Any]]:
        return dict(self._activities)

    # -- life cycle --------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open (and migrate) the database; start the worker unless ``run_worker=False``."""
        if self._open:
            return
        self.runtime.options = self._runtime_options(lookahead=self.runtime.options.lookahead)
        await self.runtime.open()
        self._open = True

    def listener_status(self) -> ListenerStatus:
        """State of this process's LISTEN/NOTIFY connection (``disabled`` when it has none)."""
        return self.runtime.listener_status()

    async def status(self) -> SystemStatus:
        """The queue, the registered workers, the held leases and this process's listener (what
        ``geste status`` shows).

        A worker is ``alive`` unless it stopped or has not been heard from within 3 x this App's
        ``lock_timeout`` (workers heartbeat every ``lock_timeout / 3``).
        """
        self._require_open()
        now = self.clock()
        queue = await self.storage.queue_stats(now)
        rows = await self.storage.list_workers()
        workers = [_worker_info(row, now, self.lock_timeout, queue.leases_by_worker) for row in rows]
        states = {worker.worker_id: worker.state for worker in workers}
        leases = [
            LeaseInfo(iid, name, holder, max(0.0, expires - now), states.get(holder, "unregistered"))
            for iid, name, holder, expires in await self.storage.list_leases(now, LEASES_SHOWN)
        ]
        live = [worker for worker in workers if worker.alive]
        unserved: dict[str, int] = {}
        if all(worker.workflows is not None for worker in live):  # an older worker claims any workflow
            served = {name for worker in live for name in worker.workflows or ()}
            runnable = await self.storage.runnable_workflows(now, cap=UNSERVED_CAP, limit=1000)
            unserved = {name: n for name, n in runnable if name not in served}
        return SystemStatus(
            checked_at=to_datetime(now),  # type: ignore[arg-type]
            queue=queue,
            workers=workers,
            listener=self.listener_status(),
            leases=leases,
            unserved=unserved,
        )

    async def close(self) -> None:
        """Drain the worker (finish or release what it runs) and close the database.

        Cancelling it (``asyncio.timeout``, a second Ctrl-C) is honoured: the drain stops where it is,
        everything left is ended at once without waiting (runs cut short keep their leases until they
        expire, as after a crash) and the cancellation propagates.
        """
        if not self._open:
            return
        try:
            await self.runtime.close()
        finally:
            self._closed()

    def _closed(self) -> None:
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)  # wake result() waiters: they see the App closed
        self._waiters.clear()
        self._open = False

    async def run(self) -> None:
        """Open the App and run its worker until ``shutdown()`` is called; then drain and close."""
        self._stop = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        await self.open()
        try:
            await self._stop.wait()
        finally:
            self._stop, self._stop_requested = None, False
            await self.close()

    def shutdown(self) -> None:
        """Ask ``run()`` to stop (also if asked before it started): no new claims, running instances
        finish or are released."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    def _require_open(self) -> None:
        if not self._open:
            raise AppNotOpenError("the App is not open: use `async with app:` or `await app.open()` first")

    # -- starting and looking ----------------------------------------------------------------------
    async def start_workflow(
        self, workflow: str | Workflow[Any, Any], /, *args: Any, instance_id: str | None = None, **kwargs: Any
    ) -> WorkflowHandle[Any]:
        """Start ``workflow`` (an object or a registered name); an existing ``instance_id`` is returned."""
        if isinstance(workflow, str):
            found = self._workflows.get(workflow)
            if found is None:
                raise UnknownWorkflowError(workflow)
            workflow = found
        elif not isinstance(workflow, Workflow):
            raise TypeError(f"start_workflow takes a workflow or its registered name, not {workflow!r:.80}")
        return await self._start(workflow, args, kwargs, instance_id=instance_id)

    async def _start(
        self,
        workflow: Workflow[Any, R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        instance_id: str | None,
    ) -> WorkflowHandle[R]:
        self._require_open()
        if self._workflows.get(workflow.name) is not workflow:
            raise UnknownWorkflowError(workflow.name)
        workflow.signature.bind(args, kwargs, what=f"workflow {workflow.name}")
        stored = encode(
            {"args": args, "kwargs": kwargs},
            what=f"input of workflow {workflow.name}",
            limit=self.max_payload_bytes,
        )
        iid = uuid.uuid4().hex if instance_id is None else _check_id(instance_id, "instance_id")
        now = self.clock()
        reserved = self._worker.reserve() if self._worker is not None else None
        lease = None if reserved is None else Lease(iid, reserved.lease_id)
        try:
            row, created = await self.storage.create_instance(
                NewInstance(iid, workflow.name, stored, now),
                lease=lease,
                worker_id=self.worker_id,
                lock_expires_at=now + self.lock_timeout,
            )
        except BaseException:
            if self._worker is not None and lease is not None:
                self._worker.run_reserved(None)
            raise
        if created:
            self.metrics.workflows_started.values[workflow.name] += 1
        if self._worker is not None:
            if lease is not None:
                claim = Claim(lease, workflow.name, stored, Status.RUNNING, now, False) if created else None
                self._worker.run_reserved(claim, ())
            elif created:
                self._worker.poke()
        if not created and row.workflow_name != workflow.name:
            raise InstanceAlreadyExistsError(
                f"instance {iid!r} exists already as a {row.workflow_name!r} workflow, not {workflow.name!r}"
            )
        return WorkflowHandle(self, iid, created=created)

    def get_handle(self, instance_id: str) -> WorkflowHandle[Any]:
        return WorkflowHandle(self, instance_id, created=False)

    async def get_instance(self, instance_id: str) -> InstanceInfo:
        self._require_open()
        if not _findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        row = await self.storage.get_instance(instance_id)
        if row is None:
            raise InstanceNotFoundError(instance_id)
        return _info(row)

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
        if workflow is not None and not _findable(workflow, "workflow"):
            return []
        rows = await self.storage.list_instances(
            workflow_name=workflow, status=wanted, limit=limit, offset=offset
        )
        return [_info(row) for row in rows]

    async def history(self, instance_id: str) -> list[HistoryEntry]:
        """The recorded steps of an instance, in order.

        Raises ``geste.errors.HistoryCorruptedError`` for a row geste cannot read (changed by hand).
        """
        self._require_open()
        if not _findable(instance_id, "instance_id") or await self.storage.get_instance(instance_id) is None:
            raise InstanceNotFoundError(instance_id)
        entries = []
        for row in await self.storage.get_history(instance_id):
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

    async def cancel(self, instance_id: str) -> InstanceInfo:
        """Cancel an instance: at once if it never ran, else at its next step, after its compensations."""
        self._require_open()
        if not _findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        row = await self.storage.request_cancel(instance_id, self.clock())
        if row is None:
            raise InstanceNotFoundError(instance_id)
        if row.status.is_finished:
            self._on_finished(instance_id)
        elif self._worker is not None:
            self._worker.poke()
        return _info(row)

    async def retry(self, instance_id: str) -> RetryRecord:
        """Run a failed instance again from its failed step; return what the retry removed.

        The activity whose last attempt failed at the end of its history runs again (with fresh
        attempts, and with the activities of its ``gather``); every step before it is replayed as
        recorded, not run again. A workflow that failed by its own exception replays all its steps.
        Its error is cleared and a worker takes it at once. The removed rows and the error are kept
        (``app.retries``). Raises ``geste.errors.InstanceStateError`` unless it is ``failed`` and none
        of its compensations ran (nothing is written then): of two concurrent retries, one applies.
        """
        self._require_open()
        if not _findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        record = await _operations.retry(self.storage, instance_id, self.clock())
        if self._worker is not None:
            self._worker.poke()
        return record

    async def retries(self, instance_id: str) -> list[RetryRecord]:
        """The retries of an instance, oldest first: what each removed from its history and cleared."""
        self._require_open()
        if not _findable(instance_id, "instance_id") or await self.storage.get_instance(instance_id) is None:
            raise InstanceNotFoundError(instance_id)
        return [_operations.retry_record(row) for row in await self.storage.list_retries(instance_id)]

    async def resume(self, instance_id: str, *, force: bool = False) -> ResumeResult:
        """Make an unfinished instance runnable now: a worker takes it at once.

        For an instance put back with a delay (an engine or database error, a workflow its worker did
        not know), one whose lease a dead worker holds (stopped, or not heard from within 3 x
        ``lock_timeout``: the lease is broken), or a waiting one that should look at its wait again.
        It never changes the history: a sleep or a wait's timeout is not cut short (the instance
        replays and waits again). A lease held by a live worker is broken only with ``force=True``
        (else ``geste.errors.InstanceLeasedError``); its run then stops at its next write, without
        writing. A finished instance raises ``geste.errors.InstanceStateError``.
        """
        self._require_open()
        if not isinstance(force, bool):  # force=1 or "yes" must not quietly mean no, nor break a lease
            raise ConfigurationError(f"force must be True or False, not {force!r}")
        if not _findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        result = await _operations.resume(
            self.storage, instance_id, self.clock(), lock_timeout=self.lock_timeout, force=force
        )
        if self._worker is not None:
            self._worker.poke()
        return result

    async def send_event(
        self,
        event_type: str,
        data: Any = None,
        *,
        source: str | None = None,
        event_id: str | None = None,
        instance_id: str | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> str:
        """Send an event to the workflows waiting (now or later) for ``event_type``.

        It is kept for every instance started before it that waits for it with a matching ``match``;
        with ``instance_id`` it goes to that instance only. An ``event_id`` sent twice is stored once
        (duplicate deliveries are harmless). Returns the event id.
        """
        eid, _ = await self._send_event(
            event_type, data, source=source, event_id=event_id, instance_id=instance_id, extensions=extensions
        )
        return eid

    async def _send_event(
        self,
        event_type: str,
        data: Any,
        *,
        source: str | None,
        event_id: str | None,
        instance_id: str | None,
        extensions: dict[str, Any] | None,
    ) -> tuple[str, bool]:
        """``send_event``, also saying whether the event was stored (False: its id was there already)."""
        self._require_open()
        check_name(event_type, "event type")
        eid = uuid.uuid4().hex if event_id is None else _check_id(event_id, "event_id")
        if source is not None and (not isinstance(source, str) or not storable_text(source)):
            raise ConfigurationError("source must be a string (no NUL, valid UTF-8)")
        body = encode(data, what=f"data of event {event_type}", limit=self.max_payload_bytes)
        ext = (
            None
            if extensions is None
            else encode(extensions, what="event extensions", limit=self.max_payload_bytes)
        )
        if instance_id is not None and (
            not _findable(instance_id, "instance_id") or await self.storage.get_instance(instance_id) is None
        ):
            raise InstanceNotFoundError(instance_id)
        stored, woken = await self.storage.send_event(
            NewEvent(eid, event_type, body, source, instance_id, ext, self.clock())
        )
        if woken and self._worker is not None:
            self._worker.poke()
        return eid, stored

    # -- the transactional outbox ------------------------------------------------------------------
    async def outbox(
        self,
        *,
        status: OutboxStatus | str | None = None,
        instance_id: str | None = None,
        limit: int = 100,
    ) -> list[OutboxEntry]:
        """Events emitted with ``ctx.send_event``, newest first: their status (``pending``,
        ``delivered``, ``dead``, ``discarded``), attempts and last error; optionally of one status and/or
        instance."""
        self._require_open()
        try:
            wanted = None if status is None else OutboxStatus(status)
        except ValueError:
            raise ConfigurationError(
                f"unknown outbox status {status!r}; one of {', '.join(s.value for s in OutboxStatus)}"
            ) from None
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= 10_000:
            raise ConfigurationError("limit must be in 1..10000")
        if instance_id is not None and not _findable(instance_id, "instance_id"):
            return []
        rows = await self.storage.outbox_list(
            status=None if wanted is None else wanted.value, instance_id=instance_id, limit=limit
        )
        return [entry_from_row(row) for row in rows]

    async def retry_outbox_event(self, event_id: str) -> bool:
        """Re-queue a dead outbox event (pending again, attempts from zero); False when no dead event
        has that id. It goes out before the later events of its instance, which waited behind it."""
        self._require_open()
        if not _findable(event_id, "event_id"):
            return False
        found = await self.storage.outbox_retry(event_id, self.clock())
        if found and self._relay is not None:
            self._relay.poke()
        return found

    async def discard_outbox_event(self, event_id: str) -> bool:
        """Give up a pending or dead outbox event: ``discarded``, never sent again (kept, with its last
        error), and the later events of its instance, which waited behind it, go out. False when no
        pending or dead event has that id. An attempt running at that moment may still deliver it."""
        self._require_open()
        if not _findable(event_id, "event_id"):
            return False
        found = await self.storage.outbox_discard(event_id, self.clock())
        if found and self._relay is not None:
            self._relay.poke()
        return found

    # -- channels ----------------------------------------------------------------------------------
    async def publish(self, channel: str, data: Any = None, *, message_id: str | None = None) -> str:
        """Publish ``data`` (JSON-serialisable) on ``channel`` from outside a workflow; return its id.

        Every broadcast subscriber of the channel gets it, one of its competing subscribers takes it
        (README, "Channels"); the waiting ones are woken. A ``message_id`` published twice is stored once.
        """
        return await self._publish(channel, data, target=None, message_id=message_id)

    async def send_to(
        self, instance_id: str, channel: str, data: Any = None, *, message_id: str | None = None
    ) -> str:
        """Send ``data`` on ``channel`` to instance ``instance_id`` only; return the message id.

        The instance takes it with ``ctx.receive(channel)`` whenever it does; it is kept until then.
        Raises ``geste.errors.InstanceNotFoundError`` when no instance has that id.
        """
        target = _check_id(instance_id, "instance_id")
        return await self._publish(channel, data, target=target, message_id=message_id)

    async def _publish(self, channel: str, data: Any, *, target: str | None, message_id: str | None) -> str:
        self._require_open()
        check_channel(channel)
        mid = uuid.uuid4().hex if message_id is None else _check_id(message_id, "message_id")
        body = encode(data, what=f"data of a message on channel {channel}", limit=self.max_payload_bytes)
        message = NewMessage(mid, channel, body, None, target, self.clock())
        result = await self.storage.channel_publish(message)
        if result.target_missing:
            raise InstanceNotFoundError(str(target))
        if result.woken and self._worker is not None:
            self._worker.poke()
        return mid

    def asgi(self, *, token: str | None = None, max_body_bytes: int | None = None) -> GesteASGI:
        """This App as an ASGI application: CloudEvents at ``POST /events``, and endpoints to start,
        look at and cancel instances (README, "HTTP: CloudEvents and the API"); ``geste serve`` runs it.

        ``token`` (default ``$GESTE_HTTP_TOKEN``) makes every endpoint but ``/health`` require
        ``Authorization: Bearer <token>``; bodies over ``max_body_bytes`` (default ``max_payload_bytes``
        plus 64 KiB) are refused with 413.
        """
        from .http import GesteASGI

        return GesteASGI(self, token=token, max_body_bytes=max_body_bytes)

    # -- results -----------------------------------------------------------------------------------
    async def _result(self, instance_id: str, timeout: float | timedelta | None) -> Any:
        self._require_open()
        if not _findable(instance_id, "instance_id"):  # else PostgreSQL's refusal looks like an outage
            raise InstanceNotFoundError(instance_id)
        limit = None if timeout is None else seconds(timeout, what="timeout")
        deadline = None if limit is None else time.monotonic() + limit
        delay = 0.01
        loop = asyncio.get_running_loop()
        while True:
            self._require_open()
            completed = self._completed.get(instance_id)
            if completed is not None:  # completed here: the committed result, without a read
                return self._completed_value(*completed)
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(instance_id, []).append(future)
            try:
                try:
                    row = await self.storage.get_instance(instance_id)
                except StorageError as exc:  # the database went away: keep waiting, it may come back
                    logger.warning("waiting for %s: %s; trying again", instance_id, exc)
                    row = None
                else:
                    if row is None:
                        raise InstanceNotFoundError(instance_id)
                    if row.status.is_finished:
                        return self._outcome(row)
                wait = delay if deadline is None else min(delay, deadline - time.monotonic())
                if wait <= 0:
                    raise ResultTimeout(f"instance {instance_id} did not finish within {limit}s")
                try:
                    async with asyncio.timeout(wait):
                        await asyncio.shield(future)
                except TimeoutError:
                    delay = min(delay * 2, self.poll_interval)
            finally:
                waiters = self._waiters.get(instance_id)
                if waiters is not None and future in waiters:
                    waiters.remove(future)
                    if not waiters:
                        del self._waiters[instance_id]

    def _completed_value(self, workflow_name: str, result: str | None) -> Any:
        workflow = self._workflows.get(workflow_name)
        value = decode(result)
        return value if workflow is None else workflow.signature.load_result(value)

    def _outcome(self, row: InstanceRow) -> Any:
        if row.status == Status.COMPLETED:
            return self._completed_value(row.workflow_name, row.result)
        error = decode(row.error) or {}
        if row.status == Status.CANCELLED:
            raise WorkflowCancelled(f"workflow instance {row.instance_id} was cancelled")
        failure = WorkflowFailed(row.instance_id, error)
        raise failure from decode_error(error)

    # -- engine hooks ------------------------------------------------------------------------------
    def _on_suspended(self, instance_id: str, run_at: float | None) -> None:
        self.runtime.on_suspended(instance_id, run_at)

    def _on_completed(self, instance_id: str, workflow_name: str, result: str) -> None:
        if len(result) > COMPLETED_KEPT_SIZE:
            return
        if len(self._completed) >= COMPLETED_KEPT:
            del self._completed[next(iter(self._completed))]
        self._completed[instance_id] = (workflow_name, result)

    def _on_finished(self, instance_id: str) -> None:
        for future in self._waiters.get(instance_id, ()):
            if not future.done():
                future.set_result(None)


def _info(row: InstanceRow) -> InstanceInfo:
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
    )


def _worker_info(row: WorkerRow, now: float, lock_timeout: float, leases: dict[str, int]) -> WorkerInfo:
    try:
        listener = json.loads(row.listener) if row.listener else {}
    except ValueError:
        listener = {}
    return WorkerInfo(
        worker_id=row.worker_id,
        host=row.host,
        pid=row.pid,
        started_at=to_datetime(row.started_at),  # type: ignore[arg-type]
        heartbeat_at=to_datetime(row.heartbeat_at),  # type: ignore[arg-type]
        stopped_at=to_datetime(row.stopped_at),
        running=row.running,
        concurrency=row.concurrency,
        listener=listener if isinstance(listener, dict) else {},
        heartbeat_age=max(0.0, now - row.heartbeat_at),
        alive=is_alive(
            row.heartbeat_at, row.stopped_at, row.lock_timeout, now=now, reader_lock_timeout=lock_timeout
        ),
        leases=leases.get(row.worker_id, 0),
        lock_timeout=row.lock_timeout,
        workflows=_names(row.workflows),
        health=row.health,
    )


def _names(stored: str | None) -> tuple[str, ...] | None:
    """The workflow names of a registry row (a JSON array); None when absent or unreadable."""
    try:
        names = json.loads(stored) if stored else None
    except ValueError:
        return None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return None
    return tuple(names)
