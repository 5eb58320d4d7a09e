"""The App: the registry of workflows and activities, the open database, the worker, the client calls."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar, cast, overload

from ._client import Client
from ._definitions import Activity, Workflow
from ._handle import WorkflowHandle
from ._metrics import Metrics, app_collector
from ._models import HistoryEntry, InstanceInfo, RunInfo, StateValue, Status, to_datetime
from ._operations import ResumeResult, RetryRecord
from ._queues import Queue, QueueInfo
from ._registry import Registry
from ._retry import DEFAULT_RETRY, RetryPolicy, positive_int, seconds
from ._schedules import ScheduleInfo
from ._scheduling import Schedules
from ._status import (
    LEASES_SHOWN,
    SCHEDULES_SHOWN,
    UNSERVED_CAP,
    LeaseInfo,
    ListenerStatus,
    PruneResult,
    SystemStatus,
    WorkerInfo,
    is_alive,
)
from ._streams import Streams
from ._validation import check_id as _check_id
from ._versions import PatchInfo, Versioning, check_version, runner_key, split_runner
from .engine.activities import DEFAULT_ACTIVITY_THREADS
from .engine.context import ActivityContext, WorkflowContext
from .engine.run import Engine
from .errors import AppNotOpenError, ConfigurationError
from .runtime import OpenClose, Runtime, RuntimeOptions
from .runtime.relay import OutboxConfig, OutboxEntry, OutboxHandler, OutboxStatus, Relay
from .runtime.wakeups import NotifyConfig
from .runtime.worker import Worker
from .storage import Storage, create_storage
from .storage.base import PRUNE_START, QueueRow, WorkerRow

if TYPE_CHECKING:
    from .http import GesteASGI

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("geste.app")

DEFAULT_URL = "sqlite:///geste.db"

DEFAULT_WORKFLOW_CACHE_SIZE = 1000
"""Parked runs a worker keeps at most (``workflow_cache_size``), unless ``GESTE_WORKFLOW_CACHE_SIZE`` says
otherwise (0: none, every wake-up replays; what CI runs the whole suite with too)."""


def _cache_size(value: int | None) -> int:
    if value is None:
        env = os.environ.get("GESTE_WORKFLOW_CACHE_SIZE")
        if env is None:
            return DEFAULT_WORKFLOW_CACHE_SIZE
        try:
            value = int(env)
        except ValueError:
            raise ConfigurationError(f"GESTE_WORKFLOW_CACHE_SIZE must be an int >= 0, not {env!r}") from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigurationError(f"workflow_cache_size must be an int >= 0, not {value!r}")
    return value


class ActivityDecorator(Protocol):
    """What ``@app.activity(...)`` with options returns: it registers an ``async def`` or a ``def``
    activity, typed alike (``await my_activity(ctx, ...)`` gives the function's result)."""

    @overload
    def __call__(self, fn: Callable[Concatenate[ActivityContext, P], Awaitable[R]], /) -> Activity[P, R]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[ActivityContext, P], R], /) -> Activity[P, R]: ...


class ScheduleDecorator(Protocol):
    """What ``@app.schedule(...)`` returns: on a workflow it returns the workflow; on an ``async def`` it
    registers it as a workflow first and returns that."""

    @overload
    def __call__(self, target: Workflow[P, R], /) -> Workflow[P, R]: ...

    @overload
    def __call__(
        self, target: Callable[Concatenate[WorkflowContext, P], Awaitable[R]], /
    ) -> Workflow[P, R]: ...


def _served_name(queue: object) -> str:
    if isinstance(queue, Queue):
        return queue.name
    if isinstance(queue, str):
        return queue
    raise ConfigurationError(f"serve_queues takes geste.Queue objects or queue names, not {queue!r:.80}")


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
        retention: float | timedelta | None = None,
        workflow_cache_size: int | None = None,
        activity_threads: int = DEFAULT_ACTIVITY_THREADS,
        queues: Iterable[Queue] = (),
        serve_queues: Iterable[Queue | str] | None = None,
        serve_unqueued: bool = True,
        version: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        url = url or os.environ.get("GESTE_DATABASE_URL") or DEFAULT_URL
        self.notify = NotifyConfig.build(
            url=url,
            listen_notify=listen_notify,
            fallback_interval=seconds(notify_fallback_interval, what="notify_fallback_interval"),
            reconnect_delay=seconds(notify_reconnect_delay, what="notify_reconnect_delay"),
            max_workflows_per_batch=max_workflows_per_batch,
            max_timers_per_batch=max_timers_per_batch,
            max_messages_per_batch=max_messages_per_batch,
            listen_database_url=listen_database_url,
        )
        self.worker_id = _check_id(
            worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}", "worker_id"
        )
        self.run_worker = run_worker
        self.concurrency = positive_int(concurrency, "concurrency")
        self.lock_timeout = seconds(lock_timeout, what="lock_timeout", allow_zero=False)
        self.poll_interval = seconds(poll_interval, what="poll_interval", allow_zero=False)
        self.shutdown_grace = seconds(shutdown_grace, what="shutdown_grace")
        self.max_payload_bytes = positive_int(max_payload_bytes, "max_payload_bytes")
        self.workflow_cache_size = _cache_size(workflow_cache_size)
        self.activity_threads = positive_int(activity_threads, "activity_threads")
        """The threads that run ``def`` activities at most at once (docs/activities.md)."""
        self.message_retention = seconds(message_retention, what="message_retention")
        self.event_retention = seconds(event_retention, what="event_retention")
        self.retention = None if retention is None else seconds(retention, what="retention", allow_zero=False)
        """Seconds after its end a finished instance is deleted with its rows by the workers' retention
        chore (docs/retention.md); None (the default): finished instances are kept."""
        self.outbox_config = OutboxConfig.build(
            endpoint=outbox_endpoint,
            handler=outbox_handler,
            headers=outbox_headers,
            max_attempts=outbox_max_attempts,
            initial_backoff=outbox_initial_backoff,
            max_backoff=outbox_max_backoff,
            timeout=outbox_timeout,
        )
        self._open = False
        self._stop: asyncio.Event | None = None
        self.queues: dict[str, Queue] = {}
        """The queues declared here (``queues=``, ``app.queue``): served by this App's worker, their limits
        written at open (docs/queues.md)."""
        for queue in queues:
            self._declare_queue(queue)
        self.serve_queues: frozenset[str] | None = (
            None if serve_queues is None else frozenset(_served_name(q) for q in serve_queues)
        )
        """The declared queues this App's worker serves (None: every one; ``geste worker --queues`` sets
        it). A queue it does not serve, it never admits from; its limits are written at open all the
        same. Each name must be a declared queue's (checked at open)."""
        if not isinstance(serve_unqueued, bool):
            raise ConfigurationError(f"serve_unqueued must be True or False, not {serve_unqueued!r:.80}")
        self.serve_unqueued = serve_unqueued
        """Whether this App's worker also runs the instances outside any queue (default). False: it runs
        the instances of the queues it serves only (``geste worker --queues ... --no-unqueued``)."""
        self._stop_requested = False
        # -- the registry, then the parts it runs on (a client, an engine and a runtime on one storage)
        self.default_retry = default_retry
        self.registry = Registry(self, default_retry=default_retry)
        self.registry.version = None if version is None else check_version(version)
        """The registered workflows and activities (``app.workflows`` and ``app.activities`` copy them)."""
        self.schedules = Schedules(self)
        """The schedules declared with ``@app.schedule`` and the calls on the stored ones."""
        self._parts = self._assemble(
            url,
            create_storage(url, notify=self.notify.enabled, lock_timeout=self.lock_timeout),
            clock=clock,
            metrics=Metrics(),
        )

    def _runtime_options(self, overrides: Mapping[str, Any]) -> RuntimeOptions:
        """The runtime's options: this App's settings (read again by ``open``: a worker command sets
        ``run_worker`` and ``concurrency`` on the App it loads), then ``overrides``."""
        settings: dict[str, Any] = {
            "worker_id": self.worker_id,
            "run_worker": self.run_worker,
            "concurrency": self.concurrency,
            "lock_timeout": self.lock_timeout,
            "poll_interval": self.poll_interval,
            "shutdown_grace": self.shutdown_grace,
            "notify": self.notify,
            "outbox": self.outbox_config,
            "message_retention": self.message_retention,
            "event_retention": self.event_retention,
            "retention": self.retention,
            "queues": tuple(
                QueueRow(
                    q.name,
                    q.concurrency,
                    q.worker_concurrency,
                    q.rate_limit,
                    None if q.rate_limit is None and q.partition_rate_limit is None else q.period,
                    q.partition_concurrency,
                    q.partition_rate_limit,
                )
                for q in self.queues.values()
            ),
            "serve_queues": tuple(
                name for name in self.queues if self.serve_queues is None or name in self.serve_queues
            ),
            "serve_unqueued": self.serve_unqueued,
        }
        return RuntimeOptions(**(settings | dict(overrides)))

    def _assemble(
        self,
        url: str,
        storage: Storage,
        *,
        clock: Callable[[], float],
        metrics: Metrics,
        retry_wait: Callable[[str, float], Awaitable[None]] | None = None,
        workflow_cache_size: int | None = None,
        **overrides: Any,
    ) -> _Parts:
        """The parts that run this App's registry on ``storage``: its client, the engine and the
        runtime, each built with what it needs (``overrides`` replace runtime options, ``retry_wait``
        the engine's real-time back-off). ``geste.testing`` assembles its own and swaps them in."""
        options = self._runtime_options(overrides)
        runtime: Runtime
        metrics.add_collector(lambda: app_collector(runtime)())
        storage.observe_group_commits(metrics.group_commit_batch_size.observe)
        client = Client(
            storage,
            registry=self.registry,
            metrics=metrics,
            clock=clock,
            max_payload_bytes=self.max_payload_bytes,
            lock_timeout=options.lock_timeout,
            poll_interval=options.poll_interval,
            worker_id=options.worker_id,
            is_open=lambda: self._open,
            worker=lambda: runtime.worker,
            relay=lambda: runtime.relay,
            listen=lambda start: runtime.listen_for_results(start),
        )

        def on_suspended(instance_id: str, run_at: float | None) -> None:
            runtime.on_suspended(instance_id, run_at)
            client.on_released(instance_id)  # it may end elsewhere now: a result() here registers

        engine = Engine(
            storage=storage,
            workflows=self.registry.workflows,
            version=self.registry.code_version,
            clock=clock,
            lock_timeout=options.lock_timeout,
            max_payload_bytes=self.max_payload_bytes,
            on_suspended=on_suspended,
            on_finished=client.on_finished,
            on_completed=client.on_completed,
            on_outbox=lambda event_id: runtime.outbox_recorded(event_id),
            on_state=client.on_state,
            on_channel_woken=lambda: runtime.channel_woken(),
            metrics=metrics,
            workflow_cache_size=(
                self.workflow_cache_size if workflow_cache_size is None else workflow_cache_size
            ),
            activity_threads=self.activity_threads,
            **({} if retry_wait is None else {"retry_wait": retry_wait}),
        )
        runtime = Runtime(storage, options, runner=engine, clock=clock, metrics=metrics, results=client)
        streams = Streams(
            storage,
            clock=clock,
            process=options.worker_id,
            poll_interval=options.poll_interval,
            fallback_interval=options.notify.fallback_interval,
            max_payload_bytes=self.max_payload_bytes,
            is_open=lambda: self._open,
            listen=runtime.listen_for_streams,
            wait_end=lambda instance_id: client.result(instance_id, None),
        )
        runtime.streams = client.streams = engine.streams = streams
        storage.made_runnable = runtime.poke  # a child's end woke its parent here (SQLite)
        return _Parts(url, storage, clock, metrics, client, engine, runtime, dict(overrides))

    def _swap(self, parts: _Parts) -> _Parts:
        """Run on ``parts`` from now on and return the parts run on until now (``geste.testing``: a
        database and clock of its own, then the App's own again). The App must be closed."""
        if self._open:
            raise ConfigurationError("the App is open: close it before swapping what it runs on")
        previous, self._parts = self._parts, parts
        return previous

    # -- what the App runs on (one object, swapped whole) ----------------------------------------
    @property
    def version(self) -> str:
        """The version of this App's code (docs/versioning.md): ``App(version=...)``, else derived from
        the source of the workflows it registers (``src-`` and 12 hex digits). Its starts record it, its
        worker registers it and claims the instances pinned to it."""
        return self.registry.code_version()

    @property
    def url(self) -> str:
        """The database URL."""
        return self._parts.url

    @property
    def storage(self) -> Storage:
        """The open database's backend (read by the CLI, the HTTP layer and the viewer)."""
        return self._parts.storage

    @property
    def clock(self) -> Callable[[], float]:
        """The clock every part reads (``time.time`` unless the App was given another)."""
        return self._parts.clock

    @property
    def metrics(self) -> Metrics:
        """This App's metrics (docs/metrics.md): ``await app.metrics.snapshot()``; ``GET /metrics``."""
        return self._parts.metrics

    @property
    def client(self) -> Client:
        """Starts, looks at, sends to and cancels instances (the App's calls delegate to it)."""
        return self._parts.client

    @property
    def runtime(self) -> Runtime:
        """This process's worker, wake-ups, relay and chores."""
        return self._parts.runtime

    @property
    def _engine(self) -> Engine:
        return self._parts.engine

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
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        versioning: Versioning | str = Versioning.UPGRADING,
    ) -> Callable[[Callable[Concatenate[WorkflowContext, P], Awaitable[R]]], Workflow[P, R]]: ...

    def workflow(
        self,
        fn: Any = None,
        /,
        *,
        name: str | None = None,
        versioning: Versioning | str = Versioning.UPGRADING,
    ) -> Any:
        """Register an ``async def`` workflow taking a ``WorkflowContext`` first.

        ``versioning`` (docs/versioning.md): ``"upgrading"`` (default), any worker runs its instances,
        whatever its version (change their steps with ``ctx.patched``); ``"pinned"``, only workers of the
        version each instance started on (``App(version=...)``)."""
        return self.registry.workflow(fn, name=name, versioning=versioning)

    @overload
    def activity(  # an async def matches the first: its result is R
        self, fn: Callable[Concatenate[ActivityContext, P], Awaitable[R]], /
    ) -> Activity[P, R]: ...

    @overload
    def activity(self, fn: Callable[Concatenate[ActivityContext, P], R], /) -> Activity[P, R]: ...

    @overload
    def activity(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        heartbeat_timeout: float | timedelta | None = None,
    ) -> ActivityDecorator: ...

    def activity(
        self,
        fn: Any = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        heartbeat_timeout: float | timedelta | None = None,
    ) -> Any:
        """Register an activity taking an ``ActivityContext`` first: an ``async def`` one runs on the event
        loop, a plain ``def`` one in the App's thread pool (``activity_threads``).

        ``retry`` defaults to the App's ``default_retry``; ``timeout`` (per attempt) overrides the
        policy's. ``heartbeat_timeout``: an attempt that goes that long without ``ctx.heartbeat()`` is
        failed with ``ActivityHeartbeatTimeout`` and retried by the policy (docs/activities.md).
        """
        return self.registry.activity(
            fn, name=name, retry=retry, timeout=timeout, heartbeat_timeout=heartbeat_timeout
        )

    def schedule(
        self,
        cron: str,
        *,
        timezone: str = "UTC",
        name: str | None = None,
        missed: str = "latest",
        overlap: str = "skip",
        queue: Queue | str | None = None,
        priority: int = 0,
    ) -> ScheduleDecorator:
        """``@app.schedule("0 2 * * *", timezone="Europe/Paris")`` on a workflow: start it at each tick of
        the cron expression, read in ``timezone``, once across every worker (docs/schedules.md). The
        workflow takes no argument, or one: the tick (an aware UTC datetime). ``name`` defaults to the
        workflow's. ``missed``: the ticks that passed while no worker ran: ``"latest"`` (start the most
        recent), ``"skip"`` or ``"all"`` (each, a backfill). ``overlap``: a tick while the previous run is
        unfinished: ``"skip"`` it, run ``"alongside"``, or ``"queue"`` it (it starts once that run has
        ended, each waiting tick in turn). ``queue`` (a ``geste.Queue`` or its name) and ``priority``:
        each tick's instance is started onto that queue. Written to the database at each open. Bad input
        raises ``geste.errors.InvalidScheduleError`` here."""
        declare = self.schedules.decorator(
            cron,
            timezone=timezone,
            name=name,
            missed=missed,
            overlap=overlap,
            queue=queue,
            priority=priority,
        )
        return cast(ScheduleDecorator, declare)

    async def create_schedule(
        self,
        name: str,
        workflow: str | Workflow[Any, Any],
        cron: str,
        *,
        timezone: str = "UTC",
        missed: str = "latest",
        overlap: str = "skip",
        queue: Queue | str | None = None,
        priority: int = 0,
    ) -> ScheduleInfo:
        """Create (or update: same name) a schedule of a registered workflow at run time; options as
        ``schedule``. Its first tick is the first after now; a definition whose expression and time zone
        are unchanged keeps its next tick."""
        self._require_open()
        return await self.schedules.create(
            name,
            workflow,
            cron,
            timezone=timezone,
            missed=missed,
            overlap=overlap,
            queue=queue,
            priority=priority,
        )

    async def pause_schedule(self, name: str) -> None:
        """Stop starting the schedule's ticks (``ScheduleNotFoundError`` if there is none of that name)."""
        self._require_open()
        await self.schedules.pause(name)

    async def resume_schedule(self, name: str) -> None:
        """Start its ticks again from the first to come: those that passed while paused are not started."""
        self._require_open()
        await self.schedules.resume(name)

    async def delete_schedule(self, name: str) -> None:
        """Delete the schedule (the instances it started stay). A schedule declared in code comes back at
        the App's next open, unless its declaration is removed."""
        self._require_open()
        await self.schedules.delete(name)

    async def get_schedule(self, name: str) -> ScheduleInfo:
        """The stored schedule of that name (``ScheduleNotFoundError`` if there is none)."""
        self._require_open()
        return await self.schedules.get(name)

    async def list_schedules(self) -> list[ScheduleInfo]:
        """Every stored schedule, by name."""
        self._require_open()
        return await self.schedules.list()

    @property
    def workflows(self) -> dict[str, Workflow[Any, Any]]:
        return dict(self.registry.workflows)

    @property
    def activities(self) -> dict[str, Activity[Any, Any]]:
        return dict(self.registry.activities)

    # -- queues (schema 20) ------------------------------------------------------------------------
    def queue(
        self,
        name: str,
        *,
        concurrency: int | None = None,
        worker_concurrency: int | None = None,
        rate_limit: int | None = None,
        rate_period: float | timedelta = 1.0,
        partition_concurrency: int | None = None,
        partition_rate_limit: int | None = None,
    ) -> Queue:
        """Declare a queue (before ``open``): ``concurrency``, its instances admitted and unfinished at
        most across the cluster; ``worker_concurrency``, at most per worker process; ``rate_limit``,
        admissions at most in any window of ``rate_period``; ``partition_concurrency`` and
        ``partition_rate_limit``, the same per partition key. This App's worker serves it. Start onto it
        with ``workflow.options(queue=..., partition_key=...)`` (docs/queues.md)."""
        return self._declare_queue(
            Queue(
                name,
                concurrency,
                worker_concurrency,
                rate_limit,
                rate_period,
                partition_concurrency,
                partition_rate_limit,
            )
        )

    async def list_queues(self) -> list[QueueInfo]:
        """The queues by name (at most ``QUEUES_SHOWN``): those declared by an App (the last opened set
        their limits) and those instances were started onto by name; each with its limits, its queued
        and admitted instances (counted up to ``QUEUE_COUNT_CAP``), the admissions of its current rate
        window and the age of its oldest queued instance. One statement, whose cost grows with the
        queues, never with the instances (docs/design.md, "Queues")."""
        self._require_open()
        return await self.runtime.queues() or []

    def _declare_queue(self, queue: Queue) -> Queue:
        if not isinstance(queue, Queue):
            raise ConfigurationError(f"queues take geste.Queue objects, not {queue!r:.80}")
        if self._open:
            raise ConfigurationError("queues are declared before the App opens")
        if queue.name in self.queues and self.queues[queue.name] != queue:
            raise ConfigurationError(f"queue {queue.name!r} is declared twice, with different limits")
        self.queues[queue.name] = queue
        return queue

    def check_served_queues(self) -> None:
        """Raise ``ConfigurationError`` when ``serve_queues`` names a queue this App does not declare
        (a typo would leave a queue unserved, silently), or when this App's worker, serving no instance
        outside a queue, would serve nothing at all."""
        unknown = sorted((self.serve_queues or frozenset()) - set(self.queues))
        if unknown:
            declared = ", ".join(sorted(self.queues)) or "none"
            raise ConfigurationError(
                f"queue(s) {', '.join(map(repr, unknown))} to serve are not declared on this App "
                f"(declared: {declared}); declare them with App(queues=[...]) or app.queue(...)"
            )
        served = set(self.queues) if self.serve_queues is None else self.serve_queues
        if not self.serve_unqueued and not served and self.run_worker:
            raise ConfigurationError(
                "serve_unqueued=False and no queue to serve: this worker would run nothing"
            )

    # -- life cycle --------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open (and migrate) the database; start the worker unless ``run_worker=False``."""
        if self._open:
            return
        self.check_served_queues()
        self.runtime.options = self._runtime_options(self._parts.overrides)
        await self.runtime.open()
        try:
            await self.schedules.declare_all()
        except BaseException:
            await self.runtime.close()
            raise
        self._open = True

    def listener_status(self) -> ListenerStatus:
        """State of this process's LISTEN/NOTIFY connection (``disabled`` when it has none)."""
        return self.runtime.listener_status()

    async def patches(self, *, limit: int = 1000) -> list[PatchInfo]:
        """The patch ids (``ctx.patched``) the histories hold, by workflow, each with its old runs: the
        unfinished instances started before its first marker whose history lacks it (docs/versioning.md).
        An explicit read, not part of ``status``: it reads every marker of the current runs and, per
        patch, the unfinished instances of its workflow started before it (docs/design.md "Versions")."""
        self._require_open()
        rows = await self.storage.patches(limit=positive_int(limit, "limit"))
        return [
            PatchInfo(r.workflow_name, r.patch_id, to_datetime(r.first_at), r.marked, r.old_runs)  # type: ignore[arg-type]
            for r in rows
        ]

    async def prune(
        self, older_than: float | timedelta, *, batch: int = 1000, dry_run: bool = False
    ) -> PruneResult:
        """Delete the finished instances (completed, failed, cancelled) that ended more than
        ``older_than`` ago, each with every row of its own (docs/retention.md), as the retention chore
        does: in batches of ``batch`` instances, one transaction each, until the end. Kept whatever
        their age: an instance whose parent or one of whose children is unfinished, or whose outbox
        holds an event not delivered yet (pending or dead). ``dry_run``: nothing is deleted; the result
        counts the instances that would be."""
        self._require_open()
        age = seconds(older_than, what="older_than")
        size = positive_int(batch, "batch")
        before = self.clock() - age
        position = PRUNE_START
        examined = instances = deleted = batches = 0
        while True:
            done = await self.storage.prune_instances(
                before, limit=size, position=position, apply=not dry_run
            )
            batches += 1
            examined += done.examined
            instances += done.free if dry_run else done.instances
            deleted += done.deleted
            if not done.full:
                return PruneResult(instances, deleted, examined - instances, batches, dry_run)
            position = done.position

    async def status(self) -> SystemStatus:
        """The queue, the registered workers, the held leases, this process's listener, the cron
        schedules and the queues (what ``geste status`` shows).

        A worker is ``alive`` unless it stopped or has not been heard from within 3 x this App's
        ``lock_timeout`` (workers heartbeat every ``lock_timeout / 3``).
        """
        self._require_open()
        now = self.clock()
        queue = await self.storage.queue_stats(now)
        rows = await self.storage.list_workers()
        lock_timeout = self.runtime.options.lock_timeout
        workers = [_worker_info(row, now, lock_timeout, queue.leases_by_worker) for row in rows]
        states = {worker.worker_id: worker.state for worker in workers}
        leases = [
            LeaseInfo(iid, name, holder, max(0.0, expires - now), states.get(holder, "unregistered"))
            for iid, name, holder, expires in await self.storage.list_leases(now, LEASES_SHOWN)
        ]
        live = [worker for worker in workers if worker.alive]
        unserved: dict[str, int] = {}
        unserved_versions: dict[str, dict[str, int]] = {}
        if all(worker.workflows is not None for worker in live):  # an older worker claims any workflow
            served = {name for worker in live for name in worker.workflows or ()}
            served |= {runner_key(n, w.version, True) for w in live for n in w.pinned}
            runnable = await self.storage.runnable_workflows(now, cap=UNSERVED_CAP, limit=1000)
            for runner, n in runnable:  # by runner (schema 27): a pinned one names its version
                if runner not in served:
                    name, version = split_runner(runner)
                    if version is None:
                        unserved[name] = n
                    else:
                        unserved_versions.setdefault(version, {})[name] = n
        schedules = await self.schedules.list(SCHEDULES_SHOWN)
        queues = await self.runtime.queues()
        return SystemStatus(
            checked_at=to_datetime(now),  # type: ignore[arg-type]
            queue=queue,
            workers=workers,
            listener=self.listener_status(),
            leases=leases,
            unserved=unserved,
            unserved_versions=unserved_versions,
            schedules=schedules,
            queues=queues or [],
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
            await self._parts.engine.close()
        finally:
            self._closed()

    def _closed(self) -> None:
        self.client.release_waiters()  # wake result() waiters: they see the App closed
        if self.client.streams is not None:
            self.client.streams.wake_all()  # and stream readers
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

    @property
    def is_open(self) -> bool:
        """Whether the App is open (``open()`` ran, ``close()`` did not): its calls are served."""
        return self._open

    # -- starting and looking: delegated to the client -------------------------------------------
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
        ``timeout`` (a duration) / ``deadline`` (an aware datetime): when it passes, the instance is
        cancelled as by ``cancel`` and ends with ``geste.errors.WorkflowTimeout`` (``Workflow.options``)."""
        return await self.client.start_workflow(
            workflow, *args, instance_id=instance_id, timeout=timeout, deadline=deadline, **kwargs
        )

    def get_handle(self, instance_id: str) -> WorkflowHandle[Any]:
        return self.client.get_handle(instance_id)

    async def get_instance(self, instance_id: str) -> InstanceInfo:
        return await self.client.get_instance(instance_id)

    async def get_state(self, instance_id: str, key: str, *, version: int | None = None) -> StateValue | None:
        """``app.get_handle(instance_id).get_state(key, version=...)``: the latest value (or value
        ``version``) the instance published under ``key``, None when there is none (docs/state.md)."""
        return await self.client.get_state(instance_id, key, version=version)

    async def wait_state(
        self, instance_id: str, key: str, *, after: int = 0, timeout: float | timedelta | None = None
    ) -> StateValue:
        """``app.get_handle(instance_id).wait_state(key, after=..., timeout=...)`` (docs/state.md)."""
        return await self.client.wait_state(instance_id, key, after=after, timeout=timeout)

    async def list_state(self, instance_id: str, *, limit: int = 1000) -> list[StateValue]:
        """The latest value of each key the instance published, by key (at most ``limit`` keys)."""
        return await self.client.list_state(instance_id, limit=limit)

    async def list_instances(
        self,
        *,
        workflow: str | None = None,
        status: Status | str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[InstanceInfo]:
        """Instances, newest first, optionally of one workflow name and/or status."""
        return await self.client.list_instances(workflow=workflow, status=status, limit=limit, offset=offset)

    async def history(self, instance_id: str, *, run: int | None = None) -> list[HistoryEntry]:
        """The recorded steps of an instance, in order: those of its current run, or with ``run=n`` of its
        run ``n``, ended with ``ctx.continue_as_new`` and kept (its last step is the ``continue_as_new``).

        Raises ``geste.errors.HistoryCorruptedError`` for a row geste cannot read (changed by hand),
        ``geste.errors.RunNotFoundError`` for a run it has not kept.
        """
        return await self.client.history(instance_id, run=run)

    async def children(self, instance_id: str, *, limit: int = 1000) -> list[InstanceInfo]:
        """The child workflows an instance started (``ctx.start_child``), oldest first; each one's
        ``parent_id`` is ``instance_id``. One range of an index on the parent's id."""
        return await self.client.children(instance_id, limit=limit)

    async def runs(self, instance_id: str) -> list[RunInfo]:
        """The runs of an instance that ended with ``ctx.continue_as_new``, oldest first: each one's
        number, input, start, end and step count (``history(instance_id, run=n)`` has its steps). Its
        current run (``get_instance``: ``run``, ``input``) is not among them."""
        return await self.client.runs(instance_id)

    async def cancel(self, instance_id: str) -> InstanceInfo:
        """Cancel an instance: at once if it never ran, else at its next step, after its compensations.
        A running ``async`` activity of it is cancelled too (``asyncio`` cancellation of its task, its
        outcome recorded as ``ActivityCancelled``), as soon as its worker learns of the cancel: at once on
        PostgreSQL (a notification to the holder), else at its next lease renewal (``lock_timeout / 3``)."""
        return await self.client.cancel(instance_id)

    async def retry(self, instance_id: str) -> RetryRecord:
        """Run a failed instance again from its failed step; return what the retry removed.

        The activity whose last attempt failed at the end of its history runs again (with fresh
        attempts, and with the activities of its ``gather``); every step before it is replayed as
        recorded, not run again. A workflow that failed by its own exception replays all its steps.
        Its error is cleared and a worker takes it at once. The removed rows and the error are kept
        (``app.retries``). Raises ``geste.errors.InstanceStateError`` unless it is ``failed`` and none
        of its compensations ran (nothing is written then): of two concurrent retries, one applies.
        """
        return await self.client.retry(instance_id)

    async def retries(self, instance_id: str) -> list[RetryRecord]:
        """The retries of an instance, oldest first: what each removed from its history and cleared."""
        return await self.client.retries(instance_id)

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
        return await self.client.resume(instance_id, force=force)

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
    ) -> str:
        """Send an event to the workflows waiting (now or later) for ``event_type``.

        It is kept for every instance started before it that waits for it with a matching ``match``;
        with ``instance_id`` it goes to that instance only. An ``event_id`` sent twice is stored once
        (duplicate deliveries are harmless). Returns the event id.

        ``connection`` (PostgreSQL: an asyncpg connection inside a transaction of yours): the event is
        written in that transaction, so it exists, and wakes its waiters, exactly when your transaction
        commits (docs/transactions.md); ``geste.errors.TransactionUnusableError`` otherwise.
        """
        sent = await self.client.send_event(
            event_type,
            data,
            source=source,
            event_id=event_id,
            instance_id=instance_id,
            extensions=extensions,
            connection=connection,
        )
        return sent.event_id

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
        return await self.client.outbox(status=status, instance_id=instance_id, limit=limit)

    async def retry_outbox_event(self, event_id: str) -> bool:
        """Re-queue a dead outbox event (pending again, attempts from zero); False when no dead event
        has that id. It goes out before the later events of its instance, which waited behind it."""
        return await self.client.retry_outbox_event(event_id)

    async def discard_outbox_event(self, event_id: str) -> bool:
        """Give up a pending or dead outbox event: ``discarded``, never sent again (kept, with its last
        error), and the later events of its instance, which waited behind it, go out. False when no
        pending or dead event has that id. An attempt running at that moment may still deliver it."""
        return await self.client.discard_outbox_event(event_id)

    # -- channels ----------------------------------------------------------------------------------
    async def publish(
        self, channel: str, data: Any = None, *, message_id: str | None = None, connection: object = None
    ) -> str:
        """Publish ``data`` (JSON-serialisable) on ``channel`` from outside a workflow; return its id.

        Every broadcast subscriber of the channel gets it, one of its competing subscribers takes it
        (docs/guide.md, "Channels"); the waiting ones are woken. A ``message_id`` published twice is
        stored once.
        ``connection``: written in your transaction, as ``send_event`` (docs/transactions.md).
        """
        return await self.client.publish(channel, data, message_id=message_id, connection=connection)

    async def send_to(
        self,
        instance_id: str,
        channel: str,
        data: Any = None,
        *,
        message_id: str | None = None,
        connection: object = None,
    ) -> str:
        """Send ``data`` on ``channel`` to instance ``instance_id`` only; return the message id.

        The instance takes it with ``ctx.receive(channel)`` whenever it does; it is kept until then.
        Raises ``geste.errors.InstanceNotFoundError`` when no instance has that id (an instance started
        in the same transaction counts). ``connection``: written in your transaction, as ``send_event``.
        """
        return await self.client.send_to(
            instance_id, channel, data, message_id=message_id, connection=connection
        )

    def asgi(self, *, token: str | None = None, max_body_bytes: int | None = None) -> GesteASGI:
        """This App as an ASGI application: CloudEvents at ``POST /events``, and endpoints to start,
        look at and cancel instances (docs/http.md, "HTTP: CloudEvents and the API"); ``geste serve`` runs it.

        ``token`` (default ``$GESTE_HTTP_TOKEN``) makes every endpoint but ``/health`` require
        ``Authorization: Bearer <token>``; bodies over ``max_body_bytes`` (default ``max_payload_bytes``
        plus 64 KiB) are refused with 413.
        """
        from .http import GesteASGI

        return GesteASGI(self, token=token, max_body_bytes=max_body_bytes)


@dataclass(frozen=True, slots=True)
class _Parts:
    """What an App runs on, held in one object so that it is swapped whole (``App._swap``)."""

    url: str
    storage: Storage
    clock: Callable[[], float]
    metrics: Metrics
    client: Client
    engine: Engine
    runtime: Runtime
    overrides: Mapping[str, Any]
    """Runtime options that replace the App's settings (``geste.testing``: its lease, no listener...)."""


def _worker_info(row: WorkerRow, now: float, lock_timeout: float, leases: dict[str, int]) -> WorkerInfo:
    keys = _names(row.workflows)  # its claim keys (schema 27): names, and names with its version
    runners = [split_runner(key) for key in keys or ()]
    names = None if keys is None else tuple(sorted({name for name, _ in runners}))
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
        workflows=names,
        health=row.health,
        version=row.version,
        pinned=tuple(sorted(name for name, version in runners if version is not None)),
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
