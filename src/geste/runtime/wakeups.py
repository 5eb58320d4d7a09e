"""Every way a worker learns there is work: LISTEN/NOTIFY first, local timers, polling as the net.

The ``Listener`` keeps one dedicated connection LISTENing on geste's channels (``Storage.listen`` opens
it: on PostgreSQL, never from the pool) and turns notifications into wake-ups, each for one worker of the
cluster (``routing.Router``): an instance made runnable is routed to the worker that should claim it, by
id; a registered timer becomes a precise local wake-up in the worker that keeps it, and a note in the
others, which claim it only if that worker is gone when it rings. On any (re)connect it LISTENs first and
then asks for one catch-up poll, because nothing sent while it was away is replayed. A periodic
self-NOTIFY proves the connection still delivers (a half-open TCP connection looks alive for hours).

``Wakeups`` is what the worker sees: what was routed to it, its local timers, and how long it may sleep
(the poll interval while the listener is down or disabled, ``notify_fallback_interval`` while it listens,
less when a local timer is due sooner).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .._metrics import LOCAL, NOTIFY, POLL, TIMER, Metrics
from .._models import to_datetime
from .._status import ListenerState, ListenerStatus
from ..storage._listen import Listening, OnNotification
from .loops import Loop
from .routing import Router

logger = logging.getLogger("geste.wakeups")

WORKFLOW_RESUMABLE = "geste_workflow_resumable"
TIMER_EXPIRED = "geste_timer_expired"
CHANNEL_MESSAGE = "geste_channel_message"
OUTBOX_PENDING = "geste_outbox_pending"
CHANNELS = (WORKFLOW_RESUMABLE, TIMER_EXPIRED, CHANNEL_MESSAGE, OUTBOX_PENDING)
STREAM_WRITTEN = "geste_stream_written"
"""Writes to streams that readers of other processes wait for (schema 26): LISTENed by the stream readers'
own listener only (``Runtime.listen_for_streams``), never by a worker's."""
CANCEL = "cancel"
"""The key of a ``geste_workflow_resumable`` notification that a cancel was requested for a held instance
(schema 17): routed to its holder (``worker``), which cancels its running activities; nothing to claim."""
FINISHED = "finished"
"""The payload field of a ``geste_workflow_resumable`` sent by an instance's end (its status), for the
``result()`` waiters of other processes (schema 14): nothing to claim, so no worker claims for it."""
STATE = "state"
"""The payload field of a ``geste_workflow_resumable`` sent by a ``set_state`` (schema 25: the key), for
the ``wait_state`` calls of other processes: nothing to claim, so no worker claims for it. (A worker of a
geste before it takes it for a wake-up of the instance: one claim round that finds nothing.)"""
QUEUE = "queue"
"""The payload field of a ``geste_workflow_resumable`` sent by a start onto a queue (schema 20): while
routing, the one live worker serving that queue that the rendezvous of the instance id picks claims the
queue (schema 23, ``Router.queue_target``); without a router, every worker serving it runs a whole claim
round (which claims its queues); the others nothing."""

RECONNECT_CAP = 600.0
"""Longest wait between reconnection attempts (the first is ``notify_reconnect_delay``)."""
MAX_LOCAL_TIMERS = 100_000
"""Local wake-ups kept at most; beyond, later timers are found through the database's next run_at."""
PROBE_INTERVAL = 15.0
"""How often the listener asks the server which channels its session listens on (one round trip): a
half-open connection, or one that no longer listens, is found within a probe."""
PROBE_TIMEOUT = 5.0
"""A probe not answered within this long means the connection is dead: reconnect."""


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """The LISTEN/NOTIFY options of an App, checked once at construction."""

    enabled: bool
    fallback_interval: float
    reconnect_delay: float
    max_workflows_per_batch: int
    max_timers_per_batch: int
    max_messages_per_batch: int
    listen_url: str | None

    @classmethod
    def build(
        cls,
        *,
        url: str,
        listen_notify: bool | None,
        fallback_interval: float,
        reconnect_delay: float,
        max_workflows_per_batch: int,
        max_timers_per_batch: int,
        max_messages_per_batch: int,
        listen_database_url: str | None,
    ) -> NotifyConfig:
        from .._retry import positive_int
        from ..errors import ConfigurationError

        postgres = url.startswith(("postgresql://", "postgres://"))
        if listen_notify is not None and not isinstance(listen_notify, bool):  # 1 == True: not enough
            raise ConfigurationError(f"listen_notify must be None, True or False, not {listen_notify!r}")
        if listen_notify and not postgres:
            raise ConfigurationError("listen_notify=True needs PostgreSQL: SQLite has no LISTEN/NOTIFY")
        if listen_database_url is not None:
            if not postgres:
                raise ConfigurationError("listen_database_url is for PostgreSQL deployments only")
            if not isinstance(listen_database_url, str) or not listen_database_url.startswith(
                ("postgresql://", "postgres://")
            ):
                raise ConfigurationError(
                    f"listen_database_url must be a postgresql:// URL: {listen_database_url!r}"
                )
            from ..storage import listen_dsn

            listen_dsn(listen_database_url)  # its options too, now rather than at open()
        if fallback_interval <= 0 or reconnect_delay <= 0:
            raise ConfigurationError("notify_fallback_interval and notify_reconnect_delay must be > 0")
        enabled = postgres if listen_notify is None else listen_notify
        if enabled:
            from ..storage import through_transaction_pooler

            listener_url = listen_database_url or url
            if through_transaction_pooler(listener_url):
                if listen_notify:
                    raise ConfigurationError(
                        "LISTEN cannot work through a pooler in transaction mode (pooler=transaction in "
                        f"{'listen_database_url' if listen_database_url else 'the URL'}): give the listener "
                        "a direct listen_database_url, or set listen_notify=False"
                    )
                logger.info(
                    "LISTEN/NOTIFY off: the listener's URL goes through a pooler in transaction mode "
                    "(pooler=transaction); give a direct listen_database_url to have it (polling meanwhile)"
                )
                enabled = False
        return cls(
            enabled=enabled,
            fallback_interval=fallback_interval,
            reconnect_delay=reconnect_delay,
            max_workflows_per_batch=positive_int(max_workflows_per_batch, "max_workflows_per_batch"),
            max_timers_per_batch=positive_int(max_timers_per_batch, "max_timers_per_batch"),
            max_messages_per_batch=positive_int(max_messages_per_batch, "max_messages_per_batch"),
            listen_url=listen_database_url,
        )


HAND_ON_AFTER = 1.0
"""Seconds a wake-up waits for a free slot in the full worker it was routed to before that worker hands it
on: a burst fills a worker for milliseconds (slots free up as fast as they fill: handing on would cost a
notification each, heard by every listener, for nothing), long activities for longer."""

TIMER_LOOKAHEAD = 0.025
"""Seconds before its time a due instance may be claimed: the worker holds its lease and waits for the exact
time in memory, so a durable timer fires with the event loop's precision, not after a database round trip
(made under load). A sleeping instance holds nothing for the rest of its sleep."""


@dataclass(frozen=True, slots=True)
class Routed:
    """A wake-up routed to this worker: the instance to claim by id, and why."""

    workflow: str | None
    """What it is routed by: its workflow's name, or, for a pinned instance, its runner (name U+001F
    version: the notifications name ``coalesce(runner, workflow_name)``, schema 27)."""
    cause: str
    forwardable: bool = True
    """Whether a full worker may hand it on (not one handed on already: once is enough)."""
    since: float = 0.0
    """When it was routed here (a full worker hands on only what waited ``HAND_ON_AFTER``)."""


def _ignore_cancel(_instance_id: str) -> None:
    pass


class Wakeups:
    """The worker's alarm clock: pokes, local timers, routed wake-ups, and the poll interval that fits
    the listener.

    Two modes. While the listener listens and a ``Router`` is set (``routing``), a notification or a timer
    names an instance this worker alone should claim: it is kept in ``routed`` and claimed by id
    (``Storage.claim_ids``); only a poke, the poll net and the catch-up after a reconnect make the worker
    run a whole claim. Otherwise (SQLite, ``listen_notify=False``, the listener down) every wake-up makes
    the worker claim whatever is runnable, as before routing existed."""

    def __init__(
        self,
        *,
        poll_interval: float,
        fallback_interval: float,
        clock: Callable[[], float],
        lookahead: float = TIMER_LOOKAHEAD,
    ) -> None:
        self.poll_interval = poll_interval
        self.fallback_interval = fallback_interval
        self.clock = clock
        self.listening = False
        self.router: Router | None = None
        """Set by the runtime when notifications are on: who a wake-up goes to."""
        self.event = asyncio.Event()
        self.lookahead = lookahead
        """Seconds before its time a timer wakes the worker and its instance may be claimed (0 under the
        frozen clock of ``geste.testing``, where waiting in real time for a virtual moment never ends)."""
        self.cause = POLL
        """What set ``event`` (the first poke since it was cleared): a wake-up cause of ``_metrics``."""
        self.timer_bound = False
        """Whether the last ``interval()`` was cut short by a local timer (else it is the poll period)."""
        self.routed: dict[str, Routed] = {}
        """Instances routed to this worker and not claimed yet, in arrival order."""
        self.queues: frozenset[str] = frozenset()
        """The queues this process's worker serves: a start onto one of them (its notification names the
        queue) is routed here, or makes a whole claim round without routing (schema 20)."""
        self.queued: dict[str, str] = {}
        """While routing: the queues to claim at the next round (routed starts, a backlog, a slot freed
        here), with the wake-up cause of each; a claim of the queue ends it."""
        self._timers: list[tuple[float, int, str | None, str | None, str | None, float]] = []
        """A heap of ``(moment, seq, instance id, workflow, keeper, heard at)``; keeper None: this
        worker's own timer; another worker's id: a timer it keeps, watched here (``Router.takes_over``)."""
        self._timer_of: dict[str, int] = {}
        """The live entry (its seq) of each instance's timer: a newer one replaces it, a claim ends it."""
        self._seq = 0
        self._messages = False
        self._generic = False
        self.on_cancel: Callable[[str], None] = _ignore_cancel
        """Called with the instance id of a notification that a cancel was requested for an instance this
        worker holds (schema 17): set by the worker, which cancels its running activities."""

    @property
    def routing(self) -> bool:
        """Whether wake-ups are routed (listening, with a router) rather than each making a whole claim."""
        return self.listening and self.router is not None

    def _set(self, cause: str) -> None:
        if not self.event.is_set():
            self.cause = cause
            self.event.set()

    def poke(self, cause: str = LOCAL) -> None:
        """Claim whatever is runnable now (a whole claim round)."""
        self._generic = True
        self._set(cause)

    def route(
        self, instance_id: str, workflow: str | None, cause: str = NOTIFY, *, forwardable: bool = True
    ) -> None:
        """Claim this instance by id at the next round (many before it runs make one claim)."""
        self.routed[instance_id] = Routed(workflow, cause, forwardable, self.clock())
        self._set(cause)

    def route_queue(self, queue: str, cause: str = NOTIFY) -> None:
        """Claim this queue at the next round (a routed round claims it alone, not the whole claim)."""
        self.queued.setdefault(queue, cause)
        self._set(cause)

    def wake_at(
        self,
        when: float,
        instance_id: str | None = None,
        workflow: str | None = None,
        *,
        keeper: str | None = None,
    ) -> None:
        """Wake the worker for a timer due at ``when`` (``TIMER_LOOKAHEAD`` before it: the claim's round
        trip is done by then), without holding anything else. With ``instance_id`` and routing, the ring
        claims that instance by id; ``keeper``: another worker keeps the timer, this one watches it."""
        when -= self.lookahead
        if when <= self.clock() and keeper is None:
            if instance_id is not None and self.routing:
                self.route(instance_id, workflow, TIMER)
            else:
                self.poke(TIMER)
            return
        if len(self._timers) >= MAX_LOCAL_TIMERS and when > self._timers[0][0]:
            return  # bounded: after the earliest fires, the database's next run_at finds this one
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, instance_id, workflow, keeper, self.clock()))
        if instance_id is not None:
            self._timer_of[instance_id] = self._seq
        if self._timers[0][1] == self._seq:
            if self.routing:
                self._set(TIMER)  # the worker may be sleeping past it: let it recompute, claiming nothing
            else:
                self.poke(TIMER)

    def forget(self, instance_ids: Iterable[str]) -> None:
        """These instances were claimed here: their pending wake-ups and local timers are over."""
        for instance_id in instance_ids:
            self.routed.pop(instance_id, None)
            self._timer_of.pop(instance_id, None)

    def _live(self, entry: tuple[float, int, str | None, str | None, str | None, float]) -> bool:
        return entry[2] is None or self._timer_of.get(entry[2]) == entry[1]

    def ring(self) -> None:
        """Turn the local timers due now into wake-ups: routed ones (this worker's, or a watched one whose
        keeper is gone, if it comes here) while routing, else a whole claim round."""
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            entry = heapq.heappop(self._timers)
            if not self._live(entry):
                continue
            _, _, instance_id, workflow, keeper, heard = entry
            if instance_id is not None:
                del self._timer_of[instance_id]
            if keeper is not None:
                router = self.router
                if instance_id is None or router is None or not self.routing:
                    continue  # not routing: whole claims find it (the poll net)
                if router.takes_over(instance_id, workflow, keeper, heard):
                    self.route(instance_id, workflow, TIMER)
            elif instance_id is not None and self.routing:
                self.route(instance_id, workflow, TIMER)
            else:
                self._generic = True

    def take(self, limit: int) -> dict[str, Routed]:
        """Up to ``limit`` routed wake-ups, oldest first, removed from ``routed``."""
        taken: dict[str, Routed] = {}
        for instance_id in list(self.routed)[:limit]:
            taken[instance_id] = self.routed.pop(instance_id)
        return taken

    def take_generic(self) -> bool:
        """Whether a whole claim round was asked for since it was last looked at (consumes it)."""
        generic, self._generic = self._generic, False
        return generic

    def next_timer(self) -> float | None:
        """The moment the earliest local timer rings (None: none)."""
        while self._timers and not self._live(self._timers[0]):
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def message_arrived(self) -> None:
        """A message was published for receivers that another process made runnable: claim them."""
        self._messages = True
        self.poke(NOTIFY)

    def messages_due(self) -> bool:
        """Whether a message arrived since it was last looked at (consumes it)."""
        due, self._messages = self._messages, False
        return due

    def interval(self) -> float:
        """How long the worker may sleep without a poke: the net's period, or until a local timer."""
        base = self.fallback_interval if self.listening else self.poll_interval
        now = self.clock()
        self.ring() if self.routing else self._drop_due(now)
        moment = self.next_timer()
        self.timer_bound = moment is not None and moment - now < base
        if moment is not None:
            return max(0.0, min(base, moment - now))
        return base

    def _drop_due(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            entry = heapq.heappop(self._timers)
            if entry[2] is not None and self._live(entry):
                del self._timer_of[entry[2]]

    def timer_due(self) -> bool:
        """Whether a local timer fired since it was last looked at (consumes the fired ones)."""
        now = self.clock()
        due = False
        while self._timers and self._timers[0][0] <= now:
            entry = heapq.heappop(self._timers)
            if self._live(entry):
                due = True
                if entry[2] is not None:
                    del self._timer_of[entry[2]]
        return due


Connect = Callable[[tuple[str, ...], OnNotification, Callable[[], None]], Awaitable[Listening]]
"""Opens a LISTEN connection on the channels given (``Storage.listen``, its ``url`` bound)."""


class Listener(Loop):
    """LISTEN on geste's channels over one dedicated connection; reconnect with backoff; probe it."""

    log = logger

    def __init__(
        self,
        connect: Connect,
        *,
        wakeups: Wakeups,
        reconnect_delay: float,
        on_caught_up: Callable[[], None],
        handlers: dict[str, Callable[[dict[str, Any]], None]] | None = None,
        channels: tuple[str, ...] = CHANNELS,
        on_lost: Callable[[], None] | None = None,
        probe_interval: float = PROBE_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
        metrics: Metrics | None = None,
        on_death: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name="geste-listener", what="the LISTEN/NOTIFY listener", on_death=on_death)
        self.connect = connect
        self.metrics = metrics or Metrics()
        self.wakeups = wakeups
        self.reconnect_delay = reconnect_delay
        self.on_caught_up = on_caught_up
        """Called once LISTENing after each (re)connect: the catch-up poll (what came while away)."""
        self.handlers = handlers or {}
        self.channels = channels
        """What it LISTENs on: the four channels (a worker's), or ``geste_workflow_resumable`` alone (a
        process that runs no worker and listens for the ends of the results it awaits)."""
        self.on_lost = on_lost
        """Called when the connection is lost (or cannot be made): what waits for notifications polls."""
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.state = ListenerState.CONNECTING
        self.connected_since: float | None = None
        self.reconnects = 0
        self.last_notification_at: float | None = None
        self.counts: dict[str, int] = dict.fromkeys(CHANNELS, 0)
        for channel in CHANNELS:  # every channel's series exists from the start, at 0
            self.metrics.listener_notifications.values[channel] += 0
        self.last_error: str | None = None
        self._lost = asyncio.Event()
        self._delay = reconnect_delay
        self._conn: Listening | None = None

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        logger.info("LISTEN/NOTIFY configured: listening on %s", ", ".join(self.channels))
        super().start()

    def abort(self) -> None:
        """End at once, waiting for nothing (a cancelled ``App.close``)."""
        super().abort()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
        self.wakeups.listening = False

    async def stop(self, grace: float | None = None) -> None:
        """End the listener (a cancellation of the caller propagates) and close its connection."""
        await super().stop()
        await self._close()
        self.wakeups.listening = False

    def status(self) -> ListenerStatus:
        return ListenerStatus(
            state=self.state,
            connected_since=to_datetime(self.connected_since),
            reconnects=self.reconnects,
            last_notification_at=to_datetime(self.last_notification_at),
            notifications=dict(self.counts),
            last_error=self.last_error,
        )

    # -- the connection ------------------------------------------------------------------------------
    async def round(self) -> float:
        """Connect, LISTEN, and watch the connection until it is lost (this round never returns)."""
        await self._connect()
        self._delay = self.reconnect_delay  # connected: the next loss starts the backoff afresh
        await self._watch()
        raise ConnectionError("connection closed")

    async def recover(self, exc: Exception, failures: int) -> float:
        """The connection is lost (or could not be made): the pollers take over; reconnect later."""
        self.wakeups.listening = False
        self.wakeups.poke(POLL)  # the pollers take over at their normal pace at once
        if self.on_lost is not None:
            self.on_lost()
        await self._close()
        self.state = ListenerState.RECONNECTING
        self.connected_since = None
        self.last_error = f"{type(exc).__name__}: {exc}"
        wait = self._delay * random.uniform(0.8, 1.2)
        logger.warning(
            "LISTEN/NOTIFY connection lost (%s); polling every %ss, reconnecting in %.1fs",
            self.last_error,
            self.wakeups.poll_interval,
            wait,
        )
        self._delay = min(self._delay * 2, max(RECONNECT_CAP, self.reconnect_delay))
        return wait

    async def pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.reconnects += 1
        self.metrics.listener_reconnects.values[()] += 1

    async def _connect(self) -> None:
        self._lost.clear()
        self._conn = await self.connect(tuple(self.channels), self._on_notification, self._lost.set)
        self.state = ListenerState.LISTENING
        self.connected_since = time.time()
        self.wakeups.listening = True
        logger.info(
            "LISTEN/NOTIFY connected; polling falls back to every %ss", self.wakeups.fallback_interval
        )
        self.on_caught_up()  # LISTEN first, then rescan: what came while away is found by this poll

    async def _watch(self) -> None:
        """Return when the connection is lost: closed by the server, silent to a probe, or no longer
        listening on every channel."""
        while True:
            try:
                async with asyncio.timeout(self.probe_interval):
                    await self._lost.wait()
                return
            except TimeoutError:
                pass
            assert self._conn is not None
            try:
                async with asyncio.timeout(self.probe_timeout):
                    heard = await self._conn.channels()
            except TimeoutError:
                raise ConnectionError(f"no answer to a probe within {self.probe_timeout}s") from None
            missing = sorted(set(self.channels) - heard)
            if missing:
                raise ConnectionError(f"the probe found no LISTEN on {', '.join(missing)}")

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    # -- dispatch ------------------------------------------------------------------------------------
    def _on_notification(self, channel: str, payload: str) -> None:
        self.last_notification_at = time.time()
        self.counts[channel] = self.counts.get(channel, 0) + 1
        self.metrics.listener_notifications.values[channel] += 1
        try:
            body = json.loads(payload) if payload else {}
        except ValueError:
            logger.warning("ignoring a malformed %s notification: %.200r", channel, payload)
            return
        handler = self.handlers.get(channel) if isinstance(body, dict) else None
        if not isinstance(body, dict):
            body = {}
        router = self.wakeups.router
        if router is not None and not router.ours(body):
            return  # another schema's: channels are per database
        try:
            if channel == WORKFLOW_RESUMABLE:
                if CANCEL in body:  # a cancel of a held instance: for its holder, nothing to claim
                    self._cancel(body, router)
                elif QUEUE in body:  # a start onto a queue: for one worker that serves it
                    self._queue(body, router)
                elif FINISHED not in body and STATE not in body:  # an end or a value: nothing to claim
                    self._resumable(body, router)
            elif channel == CHANNEL_MESSAGE:
                self._message(body, router)
            elif channel == TIMER_EXPIRED:
                self._timer(body, router)
        except Exception:  # the dispatch must survive anything: a whole claim round finds the work
            logger.exception("routing a %s notification failed: %.200r", channel, payload)
            self.wakeups.poke(NOTIFY)
        if handler is not None:
            handler(body)

    @staticmethod
    def _names(body: dict[str, Any]) -> tuple[str | None, str | None]:
        """The instance id and the key a payload routes by (None: a payload without them, of an older
        geste, which every worker acts on as it did). The key is the payload's ``workflow_name``, which
        holds ``coalesce(runner, workflow_name)`` (schema 27): the name, or, for a pinned instance, the
        name and its version, which only the workers of that version register (``Router``)."""
        instance_id, workflow = body.get("instance_id"), body.get("workflow_name")
        if isinstance(instance_id, str) and isinstance(workflow, str):
            return instance_id, workflow
        return None, None

    def _resumable(self, body: dict[str, Any], router: Router | None) -> None:
        instance_id, workflow = self._names(body)
        if router is None or instance_id is None:
            self.wakeups.poke(NOTIFY)
        elif router.mine(instance_id, workflow, body.get("worker"), body.get("avoid")):
            self.wakeups.route(instance_id, workflow, NOTIFY, forwardable=not body.get("forwarded"))

    def _queue(self, body: dict[str, Any], router: Router | None) -> None:
        """A start onto a queue: routed, one claim of the queue by the one live worker serving it that the
        rendezvous of the instance id picks (the others do nothing); unrouted, a whole claim round in each
        worker serving it. A start whose target died, or whose views disagree for a heartbeat, is admitted
        by the poll net (every serving worker's whole round claims its queues)."""
        queue = body[QUEUE]
        if not isinstance(queue, str):
            return
        serving = queue in self.wakeups.queues
        if router is None or not self.wakeups.routing:
            if serving:
                self.wakeups.poke(NOTIFY)
            return
        key = body.get("instance_id")
        target = router.queue_target(
            queue, key if isinstance(key, str) else queue, serving=serving, avoid=body.get("avoid")
        )
        if serving and target == router.worker_id:
            self.wakeups.route_queue(queue, NOTIFY)

    def _cancel(self, body: dict[str, Any], router: Router | None) -> None:
        """A cancel requested for a held instance: its holder (``worker``) cancels what runs of it now (a
        process without a router acts on every such notice: the worker ignores those it does not hold)."""
        instance_id = body.get("instance_id")
        if isinstance(instance_id, str) and (router is None or body.get("worker") == router.worker_id):
            self.wakeups.on_cancel(instance_id)

    def _message(self, body: dict[str, Any], router: Router | None) -> None:
        instance_id, workflow = self._names(body)
        if router is None or instance_id is None:
            self.wakeups.message_arrived()
        elif router.mine(instance_id, workflow, body.get("worker")):
            self.wakeups.route(instance_id, workflow, NOTIFY)

    def _timer(self, body: dict[str, Any], router: Router | None) -> None:
        expires_at = body.get("expires_at")
        if not isinstance(expires_at, int | float):
            self.wakeups.poke(NOTIFY)
            return
        instance_id, workflow = self._names(body)
        if router is None:
            self.wakeups.wake_at(float(expires_at))
            return
        if instance_id is None:
            return  # an older geste's: its worker keeps it, the poll net is the net (a claim in each: a herd)
        keeper = body.get("worker")
        if keeper == router.worker_id:
            return  # this worker's own suspension or release: it set its local timer then
        if router.mine(instance_id, workflow, keeper):
            self.wakeups.wake_at(float(expires_at), instance_id, workflow)
        elif isinstance(keeper, str):  # watched: claimed here only if its keeper is gone when it rings
            self.wakeups.wake_at(float(expires_at), instance_id, workflow, keeper=keeper)
