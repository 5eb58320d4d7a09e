"""The runtime of one process: the worker, its wake-ups, the listener, the outbox relay, the chores and
the schedule loop.

``Runtime`` is built from a storage, its options and the engine's ``Runner`` (it never imports the
engine); ``open`` opens the storage and starts the loops, ``close`` stops them at a boundary and closes the
storage, a cancelled ``close`` ends everything at once. Its hooks (``on_suspended``, ``outbox_recorded``,
``channel_woken``) are the engine's, and ``poke``/``poke_relay``/``reserve``/``run_reserved`` the client's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Protocol, Self

from .._metrics import POLL, Metrics
from .._queues import PRIORITY_LEVELS, QUEUE_COUNT_CAP, QUEUES_SHOWN, QueueInfo, queue_info
from .._status import ListenerState, ListenerStatus, QueueStats
from ..storage.base import Claim, HistoryRow, Lease, QueueRow, Storage
from .chores import ChannelMaintenance
from .relay import OutboxConfig, Relay
from .routing import Router
from .schedules import ScheduleLoop
from .wakeups import (
    FINISHED,
    OUTBOX_PENDING,
    STATE,
    STREAM_WRITTEN,
    TIMER_LOOKAHEAD,
    WORKFLOW_RESUMABLE,
    Listener,
    NotifyConfig,
    Wakeups,
)
from .worker import Runner, Worker

logger = logging.getLogger("geste.runtime")


class OpenClose:
    """``async with`` for what has ``open`` and ``close`` (the runtime, the App, the test environment)."""

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """What the runtime of a process needs of the App's options (checked by the App)."""

    worker_id: str
    run_worker: bool
    concurrency: int
    lock_timeout: float
    poll_interval: float
    shutdown_grace: float
    notify: NotifyConfig
    outbox: OutboxConfig
    message_retention: float
    event_retention: float
    retention: float | None = None
    """Seconds after its end a finished instance is deleted (the retention chore); None: never."""
    lookahead: float = TIMER_LOOKAHEAD
    """Seconds before its time a timer wakes the worker (0 under the frozen clock of ``geste.testing``,
    where waiting in real time for a virtual moment never ends)."""
    queues: tuple[QueueRow, ...] = ()
    """The queues declared on the App (schema 20): their limits are written at open, before the worker
    claims."""
    serve_queues: tuple[str, ...] | None = None
    """Of those, the ones the worker serves (admits from); None: every one."""
    serve_unqueued: bool = True
    """Whether the worker runs instances outside any queue too (else only those of the queues it serves)."""


class ResultWaiters(Protocol):
    """This process's ``result()`` waiters, as the listener tells them of ends elsewhere (the client)."""

    def on_finished(self, instance_id: str) -> None:
        """The instance ended: its waiters read it now."""
        ...

    def on_state(self, instance_id: str, key: str) -> None:
        """A value of ``key`` was published: its ``wait_state`` waiters read it now."""
        ...

    def wake_waiters(self) -> None:
        """Every waiter reads its instance now: the listener (re)connected, and nothing sent while it was
        away is replayed."""
        ...

    async def close_watches(self) -> None:
        """The runtime closes: forget the waiters' registrations while the database is open."""
        ...


class StreamReaders(Protocol):
    """This process's stream readers, as their listener tells them of writes elsewhere (``_streams``)."""

    def notified(self, body: dict[str, Any]) -> None:
        """A ``geste_stream_written`` heard: the readers of the streams it names read now."""
        ...

    def wake_all(self) -> None:
        """Every reader reads now: the listener (re)connected or was lost."""
        ...

    async def close(self) -> None:
        """The runtime closes: wake the readers, finish the notifications and unwatches under way."""
        ...


class Runtime(OpenClose):
    """Opens the storage and runs this process's background work while open."""

    def __init__(
        self,
        storage: Storage,
        options: RuntimeOptions,
        *,
        runner: Runner,
        clock: Callable[[], float],
        metrics: Metrics,
        results: ResultWaiters | None = None,
    ) -> None:
        self.storage = storage
        self.options = options
        self.runner = runner
        self.clock = clock
        self.metrics = metrics
        self.results = results
        """Told of the ends the listener hears (``finished`` notifications) and of its catch-ups."""
        self._results_listener_dead = False
        """The listener started for ``result()`` in a process without a worker ended by itself: poll."""
        self.streams: StreamReaders | None = None
        """Told of the stream writes its own listener hears (set by the App)."""
        self.stream_listener: Listener | None = None
        """LISTENs on ``geste_stream_written`` once a stream reader of this process waits (schema 26)."""
        self._stream_listener_dead = False
        self.is_open = False
        self.worker: Worker | None = None
        self.listener: Listener | None = None
        self.relay: Relay | None = None
        self.maintenance: ChannelMaintenance | None = None
        self.schedules: ScheduleLoop | None = None
        """Starts the cron schedules' ticks (None: closed, or no worker runs here)."""
        self._relay_hook: Relay | None = None
        """The relay that ``outbox_recorded`` pokes (unhooked just before it stops)."""
        self._chores_hook: Worker | None = None
        """The worker that ``channel_woken`` pokes (unhooked just before the chores stop)."""

    # -- life cycle --------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open (and migrate) the storage; start the worker, listener, relay and chores if it runs one."""
        await self.storage.open()
        self.is_open = True
        self._results_listener_dead = False
        self._stream_listener_dead = False
        try:  # the limits before any claim: a claim of a queue with no row would admit without one
            for queue in self.options.queues:
                await self.storage.queue_upsert(queue, self.clock())
        except BaseException:
            self.is_open = False
            self.storage.terminate()
            raise
        if self.options.run_worker:
            try:
                await self._start()
            except BaseException:
                self._abort()
                self.is_open = False
                self.storage.terminate()
                raise

    async def _start(self) -> None:
        options = self.options
        wakeups = Wakeups(
            poll_interval=options.poll_interval,
            fallback_interval=min(options.notify.fallback_interval, options.lock_timeout),
            clock=self.clock,
            lookahead=options.lookahead,
        )
        if options.notify.enabled:  # wake-ups routed to one worker while the listener listens
            unqueued = options.serve_unqueued  # serving no instance outside a queue: routed none
            wakeups.router = Router(
                options.worker_id,
                workflows=lambda: self.runner.workflows if unqueued else (),
                claim_keys=lambda: self.runner.claim_keys() if unqueued else (),
                relay=options.outbox.enabled,
                lock_timeout=options.lock_timeout,
                clock=self.clock,
                schema=getattr(self.storage, "schema", None),
            )
        worker = self.worker = Worker(
            runner=self.runner,
            storage=self.storage,
            wakeups=wakeups,
            worker_id=options.worker_id,
            clock=self.clock,
            concurrency=options.concurrency,
            lock_timeout=options.lock_timeout,
            shutdown_grace=options.shutdown_grace,
            max_workflows_per_batch=options.notify.max_workflows_per_batch,
            max_timers_per_batch=options.notify.max_timers_per_batch,
            max_messages_per_batch=options.notify.max_messages_per_batch,
            listener_status=lambda: self.listener_status().as_dict(),
            metrics=self.metrics,
            relay=options.outbox.enabled,
            queues={
                queue.name: queue.worker_concurrency
                for queue in options.queues
                if options.serve_queues is None or queue.name in options.serve_queues
            },
            serve_unqueued=options.serve_unqueued,
        )
        relay = None
        if options.outbox.enabled:
            relay = Relay(
                storage=self.storage,
                config=options.outbox,
                relay_id=options.worker_id,
                clock=self.clock,
                wakeups=wakeups,
                lock_timeout=options.lock_timeout,
                shutdown_grace=options.shutdown_grace,
                metrics=self.metrics,
                on_death=worker.mark_unhealthy,
            )
        if options.notify.enabled:  # before the worker registers, so it shows `connecting`, not `disabled`
            handlers: dict[str, Callable[[dict[str, Any]], None]] = {WORKFLOW_RESUMABLE: self._resumable}
            if relay is not None:
                handlers[OUTBOX_PENDING] = relay.notified
            self.listener = Listener(
                partial(self.storage.listen, url=options.notify.listen_url),
                wakeups=wakeups,
                reconnect_delay=options.notify.reconnect_delay,
                on_caught_up=partial(self._caught_up, wakeups, relay, worker),
                handlers=handlers,
                on_lost=self._results_caught_up,
                metrics=self.metrics,
                on_death=worker.mark_unhealthy,
            )
            self.listener.start()
        await worker.start()
        self.maintenance = ChannelMaintenance(
            self.storage,
            clock=self.clock,
            message_retention=options.message_retention,
            event_retention=options.event_retention,
            retention=options.retention,
            on_woken=worker.poke,
            worker_id=options.worker_id,
            batch=options.notify.max_messages_per_batch,
            on_death=worker.mark_unhealthy,
        )
        self._chores_hook = worker
        self.maintenance.start()
        self.schedules = ScheduleLoop(
            self.storage,
            clock=self.clock,
            on_started=worker.made_runnable,
            on_death=worker.mark_unhealthy,
            metrics=self.metrics,
            version_of=self.runner.start_version,
        )
        worker.on_run_ended = self.schedules.run_ended
        self.schedules.start()
        if relay is not None:
            self.relay = self._relay_hook = relay
            relay.start()

    def _caught_up(self, wakeups: Wakeups, relay: Relay | None, worker: Worker) -> None:
        """After a (re)connect of the listener: one catch-up round of the worker (and of the relay), and
        a read by every ``result()`` waiter, for what was sent while it was away; and a heartbeat, so that
        the other workers learn it listens."""
        wakeups.poke(POLL)
        if relay is not None:
            relay.poke()
        worker.announce()
        self._results_caught_up()

    # -- results awaited here, ended elsewhere (schema 14) -----------------------------------------
    def listen_for_results(self, start: bool = True) -> bool | None:
        """Whether an end elsewhere can notify this process's ``result()`` waiters: True while the
        listener LISTENs; False while it does not (yet: it connects or reconnects, and its catch-up makes
        the waiters read once it listens; they poll meanwhile); None when no notification can come
        (SQLite, ``listen_notify`` off, closed, or the listener ended by itself): they poll.

        A process that runs a worker has its listener already. One that runs none (``run_worker=False``)
        starts one here when ``start`` says a wait needs it (``result()`` of an instance that has not
        ended) and keeps it, shared by every wait, until it closes. Not at open: a listening connection is
        a server process, and every notifying commit of the cluster signals every listening backend
        (pitfall 2), so a client that never awaits a result elsewhere (an HTTP front end, the CLI) opens
        none. It LISTENs on ``geste_workflow_resumable`` only."""
        options = self.options
        if not (self.is_open and options.notify.enabled) or self._results_listener_dead:
            return None
        listener = self.listener
        if listener is None:
            if options.run_worker or not start:  # a worker's runtime builds its listener in _start
                return None if options.run_worker else False
            listener = self.listener = Listener(
                partial(self.storage.listen, url=options.notify.listen_url),
                wakeups=Wakeups(  # nothing claims here: the listener keeps its state in it
                    poll_interval=options.poll_interval,
                    fallback_interval=options.notify.fallback_interval,
                    clock=self.clock,
                ),
                reconnect_delay=options.notify.reconnect_delay,
                on_caught_up=self._results_caught_up,
                handlers={WORKFLOW_RESUMABLE: self._resumable},
                channels=(WORKFLOW_RESUMABLE,),
                on_lost=self._results_caught_up,
                metrics=self.metrics,
                on_death=self._results_listener_died,
            )
            listener.start()
        return listener.state == ListenerState.LISTENING

    # -- stream readers (schema 26) -----------------------------------------------------------------
    def listen_for_streams(self) -> bool | None:
        """Whether a write elsewhere can notify this process's stream readers: True while listening,
        False while not (yet), None never (SQLite, ``listen_notify`` off, closed, the listener ended by
        itself): they poll. Its listener, on ``geste_stream_written`` alone, starts on the first reader's
        wait and is kept until close: a process that reads no stream LISTENs to no write, and the
        workers' listeners never hear them (docs/design.md "Streams")."""
        options = self.options
        streams = self.streams
        if not (self.is_open and options.notify.enabled) or self._stream_listener_dead or streams is None:
            return None
        listener = self.stream_listener
        if listener is None:

            def died(_reason: str) -> None:
                self._stream_listener_dead = True
                streams.wake_all()

            listener = self.stream_listener = Listener(
                partial(self.storage.listen, url=options.notify.listen_url),
                wakeups=Wakeups(
                    poll_interval=options.poll_interval,
                    fallback_interval=options.notify.fallback_interval,
                    clock=self.clock,
                ),
                reconnect_delay=options.notify.reconnect_delay,
                on_caught_up=streams.wake_all,
                handlers={STREAM_WRITTEN: streams.notified},
                channels=(STREAM_WRITTEN,),
                on_lost=streams.wake_all,
                metrics=self.metrics,
                on_death=died,
            )
            listener.start()
        return listener.state == ListenerState.LISTENING

    def _resumable(self, body: dict[str, Any]) -> None:
        """A ``geste_workflow_resumable`` heard: an end (``finished``) of this schema wakes this process's
        ``result()`` and ``wait_state()`` waiters of the instance, a value (``state``, 27) its
        ``wait_state()`` waiters of the key (a worker's listener checked the schema already; a client's
        has no router, so it checks here)."""
        if (FINISHED not in body and STATE not in body) or self.results is None:
            return
        instance_id, schema = body.get("instance_id"), body.get("schema")
        if not isinstance(instance_id, str):
            return
        if schema is not None and schema != getattr(self.storage, "schema", schema):
            return  # another schema's: channels are per database
        try:
            key = body.get(STATE)
            if FINISHED in body:
                self.results.on_finished(instance_id)
            elif isinstance(key, str):  # a set_state (25), for the wait_state() calls of its key
                self.results.on_state(instance_id, key)
        except Exception:  # the listener's dispatch must survive anything
            logger.exception("waking the result() waiters of %s failed", instance_id)

    def _results_caught_up(self) -> None:
        """The listener (re)connected, or lost its connection: every ``result()`` call reads its instance
        now, and waits for a notification or polls as the listener's state then says."""
        if self.results is not None:
            try:
                self.results.wake_waiters()
            except Exception:
                logger.exception("waking the result() waiters after a reconnect failed")

    def _results_listener_died(self, reason: str) -> None:
        self._results_listener_dead = True
        self._results_caught_up()  # their next round finds no listener: they poll

    async def close(self) -> None:
        """Stop the listener and the chores, drain the worker (finish or release what it runs), stop the
        relay (in-flight deliveries end or are given back), close the storage.

        A cancellation (``asyncio.timeout``, a second Ctrl-C) is honoured: the drain stops where it is,
        everything left is ended at once without waiting (runs cut short keep their leases until they
        expire, as after a crash) and the cancellation propagates."""
        if not self.is_open:
            return
        worker, self.worker = self.worker, None
        listener, self.listener = self.listener, None
        stream_listener, self.stream_listener = self.stream_listener, None
        maintenance, self.maintenance = self.maintenance, None
        schedules, self.schedules = self.schedules, None
        relay, self.relay = self.relay, None
        try:
            if listener is not None:
                await listener.stop()
            if stream_listener is not None:
                await stream_listener.stop()
            if self.streams is not None:
                await self.streams.close()
            if schedules is not None:
                await schedules.stop()
            if maintenance is not None:
                self._chores_hook = None
                await maintenance.stop()
            if worker is not None:
                await worker.stop()
            if relay is not None:
                self._relay_hook = None
                await relay.stop()
            if self.results is not None:
                await self.results.close_watches()
        except asyncio.CancelledError:
            for part in (listener, stream_listener, schedules, maintenance, worker, relay):
                if part is not None:
                    part.abort()
            self._relay_hook = self._chores_hook = None
            self.is_open = False
            self.storage.terminate()
            raise
        self.is_open = False
        await self.storage.close()

    def _abort(self) -> None:
        for part in (
            self.listener,
            self.stream_listener,
            self.schedules,
            self.maintenance,
            self.worker,
            self.relay,
        ):
            if part is not None:
                part.abort()
        self.stream_listener = None
        self.worker = self.listener = self.maintenance = self.schedules = self.relay = None
        self._relay_hook = self._chores_hook = None

    # -- what the engine calls ---------------------------------------------------------------------
    def on_suspended(self, instance_id: str, run_at: float | None) -> None:
        """An instance suspended until ``run_at``: a local wake-up at that time (this worker keeps the
        timer: the others are routed none)."""
        if self.worker is not None:
            self.worker.suspended(instance_id, run_at)

    def outbox_recorded(self, event_id: str) -> None:
        """A step recorded an outbox event: this process's relay looks now."""
        if self._relay_hook is not None:
            self._relay_hook.recorded(event_id)

    def channel_woken(self) -> None:
        """A step published a message that made receivers runnable: claim them (unless the publish's
        notifications route them, each to one worker)."""
        if self._chores_hook is not None:
            self._chores_hook.made_runnable()

    # -- what the client calls ---------------------------------------------------------------------
    def poke(self) -> None:
        """Look for runnable instances now rather than at the next poll (work was made runnable here)."""
        if self.worker is not None:
            self.worker.poke()

    def schedules_changed(self) -> None:
        """A schedule was declared, created or resumed here: the schedule loop looks now."""
        if self.schedules is not None:
            self.schedules.wake()

    def poke_relay(self) -> None:
        """Look for due outbox events now (one was re-queued or discarded here)."""
        if self.relay is not None:
            self.relay.poke()

    def reserve(self) -> Lease | None:
        """A slot and a lease id for an instance about to be created and run here at once (None: none)."""
        return None if self.worker is None else self.worker.reserve()

    def run_reserved(self, claim: Claim | None, history: Sequence[HistoryRow] = ()) -> None:
        """Run an instance created already claimed (or give the reserved slot back)."""
        if self.worker is not None:
            self.worker.run_reserved(claim, history)

    # -- what it reports ---------------------------------------------------------------------------
    def listener_status(self) -> ListenerStatus:
        """State of this process's LISTEN/NOTIFY connection (``disabled`` when it has none)."""
        if self.listener is None:
            return ListenerStatus(state=ListenerState.DISABLED)
        return self.listener.status()

    def worker_slots(self) -> tuple[int, int] | None:
        """Instances running here now and slots free (None: no worker runs here)."""
        worker = self.worker
        return None if worker is None else (len(worker._running), worker._free())

    def listener_connected(self) -> bool:
        return self.listener_status().state == ListenerState.LISTENING

    async def queue_stats(self) -> QueueStats | None:
        """The queue now (``storage.queue_stats``: one snapshot read); None while closed."""
        return await self.storage.queue_stats(self.clock()) if self.is_open else None

    async def queues(self, limit: int = QUEUES_SHOWN) -> list[QueueInfo] | None:
        """The queues by name, at most ``limit`` (``storage.list_queues``: one statement, each count
        stopped at ``QUEUE_COUNT_CAP``); None while closed."""
        if not self.is_open:
            return None
        now = self.clock()
        found = await self.storage.list_queues(
            now, cap=QUEUE_COUNT_CAP + 1, limit=limit, levels=PRIORITY_LEVELS
        )
        return [queue_info(stored, now, cap=QUEUE_COUNT_CAP) for stored in found]
