"""Every way a worker learns there is work: LISTEN/NOTIFY first, local timers, polling as the net.

The ``Listener`` keeps one dedicated connection LISTENing on geste's channels (``Storage.listen`` opens
it: on PostgreSQL, never from the pool) and turns notifications into wake-ups: a resumable instance pokes
the worker's claim loop, a registered timer becomes a precise local wake-up at its ``expires_at``. On any
(re)connect it LISTENs first and then asks for one catch-up poll, because nothing sent while it was away
is replayed. A periodic self-NOTIFY proves the connection still delivers (a half-open TCP connection
looks alive for hours).

``Wakeups`` is what the worker sees: how long it may sleep (the poll interval while the listener is
down or disabled, ``notify_fallback_interval`` while it listens, less when a local timer is due sooner).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .._metrics import LOCAL, NOTIFY, POLL, TIMER, Metrics
from .._models import to_datetime
from .._status import ListenerState, ListenerStatus
from ..storage._listen import Listening, OnNotification
from .loops import Loop

logger = logging.getLogger("geste.wakeups")

WORKFLOW_RESUMABLE = "geste_workflow_resumable"
TIMER_EXPIRED = "geste_timer_expired"
CHANNEL_MESSAGE = "geste_channel_message"
OUTBOX_PENDING = "geste_outbox_pending"
CHANNELS = (WORKFLOW_RESUMABLE, TIMER_EXPIRED, CHANNEL_MESSAGE, OUTBOX_PENDING)

RECONNECT_CAP = 600.0
"""Longest wait between reconnection attempts (the first is ``notify_reconnect_delay``)."""
MAX_LOCAL_TIMERS = 100_000
"""Local wake-ups kept at most; beyond, later timers are found through the database's next run_at."""
PROBE_INTERVAL = 15.0
"""How often the listener NOTIFYs itself to prove the connection still delivers."""
PROBE_TIMEOUT = 5.0
"""A probe not heard back within this long means the connection is dead: reconnect."""


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
        return cls(
            enabled=postgres if listen_notify is None else listen_notify,
            fallback_interval=fallback_interval,
            reconnect_delay=reconnect_delay,
            max_workflows_per_batch=positive_int(max_workflows_per_batch, "max_workflows_per_batch"),
            max_timers_per_batch=positive_int(max_timers_per_batch, "max_timers_per_batch"),
            max_messages_per_batch=positive_int(max_messages_per_batch, "max_messages_per_batch"),
            listen_url=listen_database_url,
        )


TIMER_LOOKAHEAD = 0.025
"""Seconds before its time a due instance may be claimed: the worker holds its lease and waits for the exact
time in memory, so a durable timer fires with the event loop's precision, not after a database round trip
(made under load). A sleeping instance holds nothing for the rest of its sleep."""


class Wakeups:
    """The worker's alarm clock: pokes, local timers, and the poll interval that fits the listener."""

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
        self.event = asyncio.Event()
        self.lookahead = lookahead
        """Seconds before its time a timer wakes the worker and its instance may be claimed (0 under the
        frozen clock of ``geste.testing``, where waiting in real time for a virtual moment never ends)."""
        self.cause = POLL
        """What set ``event`` (the first poke since it was cleared): a wake-up cause of ``_metrics``."""
        self.timer_bound = False
        """Whether the last ``interval()`` was cut short by a local timer (else it is the poll period)."""
        self._timers: list[float] = []
        self._messages = False

    def poke(self, cause: str = LOCAL) -> None:
        if not self.event.is_set():
            self.cause = cause
            self.event.set()

    def wake_at(self, when: float) -> None:
        """Wake the worker for a timer due at ``when`` (``TIMER_LOOKAHEAD`` before it: the claim's round
        trip is done by then), without holding anything else."""
        when -= self.lookahead
        if when <= self.clock():
            self.poke(TIMER)
            return
        if len(self._timers) >= MAX_LOCAL_TIMERS and when > self._timers[0]:
            return  # bounded: after the earliest fires, the database's next run_at finds this one
        heapq.heappush(self._timers, when)
        if self._timers[0] == when:
            self.poke(TIMER)  # the worker may be sleeping past it: let it recompute

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
        while self._timers and self._timers[0] <= now:
            heapq.heappop(self._timers)
        self.timer_bound = bool(self._timers) and self._timers[0] - now < base
        if self._timers:
            return max(0.0, min(base, self._timers[0] - now))
        return base

    def timer_due(self) -> bool:
        """Whether a local timer fired since it was last looked at (consumes the fired ones)."""
        now = self.clock()
        due = False
        while self._timers and self._timers[0] <= now:
            heapq.heappop(self._timers)
            due = True
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
        self._probe_channel = f"geste_probe_{uuid.uuid4().hex[:16]}"
        self._probe_heard = asyncio.Event()
        self._lost = asyncio.Event()
        self._delay = reconnect_delay
        self._conn: Listening | None = None

    # -- life cycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        logger.info("LISTEN/NOTIFY configured: listening on %s", ", ".join(CHANNELS))
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
        self._conn = await self.connect(
            (*CHANNELS, self._probe_channel), self._on_notification, self._lost.set
        )
        self.state = ListenerState.LISTENING
        self.connected_since = time.time()
        self.wakeups.listening = True
        logger.info(
            "LISTEN/NOTIFY connected; polling falls back to every %ss", self.wakeups.fallback_interval
        )
        self.on_caught_up()  # LISTEN first, then rescan: what came while away is found by this poll

    async def _watch(self) -> None:
        """Return when the connection is lost: closed by the server, or silent to a probe."""
        while True:
            try:
                async with asyncio.timeout(self.probe_interval):
                    await self._lost.wait()
                return
            except TimeoutError:
                pass
            self._probe_heard.clear()
            assert self._conn is not None
            async with asyncio.timeout(self.probe_timeout):
                await self._conn.notify(self._probe_channel)
            try:
                async with asyncio.timeout(self.probe_timeout):
                    await self._probe_heard.wait()
            except TimeoutError:
                raise ConnectionError(f"no answer to a probe within {self.probe_timeout}s") from None

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    # -- dispatch ------------------------------------------------------------------------------------
    def _on_notification(self, channel: str, payload: str) -> None:
        if channel == self._probe_channel:
            self._probe_heard.set()
            return
        self.last_notification_at = time.time()
        self.counts[channel] = self.counts.get(channel, 0) + 1
        self.metrics.listener_notifications.values[channel] += 1
        try:
            body = json.loads(payload) if payload else {}
        except ValueError:
            logger.warning("ignoring a malformed %s notification: %.200r", channel, payload)
            return
        if channel == WORKFLOW_RESUMABLE:
            self.wakeups.poke(NOTIFY)
        elif channel == CHANNEL_MESSAGE:
            self.wakeups.message_arrived()
        elif channel == TIMER_EXPIRED:
            expires_at = body.get("expires_at") if isinstance(body, dict) else None
            if isinstance(expires_at, int | float):
                self.wakeups.wake_at(float(expires_at))
            else:
                self.wakeups.poke(NOTIFY)
        handler = self.handlers.get(channel)
        if handler is not None and isinstance(body, dict):
            handler(body)
