"""The transactional outbox: events a workflow emits (``ctx.send_event``) and the relay that delivers them.

``ctx.send_event`` is a step of its own: its history row and its ``geste_outbox`` row commit in one
transaction, so an event exists exactly when the step that emits it is recorded, and a replay never emits
it again. The ``Relay`` (one per process whose App runs a worker and has a destination) delivers pending
events **at least once**:

- it claims due events with a lease (``claim_id``, ``claim_expires_at``: ``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so several relays never send one event at the same time;
  the claim of a relay that died expires after ``outbox_timeout + lock_timeout`` and is taken over;
- only the first event of an instance that is not done (delivered or discarded) can be claimed, so an
  instance's events go out in the order it emitted them: a later one waits while an earlier one is
  pending (retried, however long) or ``dead``. An operator re-queues a dead event
  (``app.retry_outbox_event``: it goes out first, then the later ones in order) or gives an event up
  (``app.discard_outbox_event``: ``discarded``, never sent; the later ones go);
- a claim round reads at most ``CLAIM_WINDOW`` due events; one that waits behind an earlier event of its
  instance leaves the due range (held: ``next_attempt_at`` None) until that event is done, so a backlog
  behind a failing event is read once, not by every round (docs/design.md, "The transactional outbox");
- a failed attempt (a non-2xx answer, a connection error, a timeout, an exception of the handler) is
  retried after ``outbox_initial_backoff * 2 ** (attempts - 1)`` (capped at ``outbox_max_backoff``, 300 s
  by default), **until it is delivered**: an outage of any length loses nothing and changes no order.
  Only with an explicit ``outbox_max_attempts`` does an event become ``dead`` after that many attempts:
  kept, with its last error, holding the later events of its instance back, until an operator acts;
- a relay killed after sending but before marking the event delivered leaves it pending: it is sent
  again. Receivers deduplicate with the event id (stable across attempts and relays).

Destinations: an HTTP endpoint receiving CloudEvents 1.0 in **structured mode** (one JSON object, content
type ``application/cloudevents+json``: every attribute survives, whatever characters it holds), or an
async callable receiving an ``OutboxEvent``.

Wake-ups: the step that records an event pokes this process's relay directly; on PostgreSQL it also
sends ``geste_outbox_pending`` (``{"event_id"}``) for the relays of other processes. Otherwise the relay
polls (``poll_interval``, or ``notify_fallback_interval`` while the listener listens), and wakes at the
earliest time a retry is due.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from .._metrics import Metrics
from .._retry import positive_int, seconds
from .._serde import decode
from ..errors import ConfigurationError, StorageError
from ..storage.base import OutboxClaim, OutboxRow, Storage
from .loops import Loop
from .wakeups import Wakeups

logger = logging.getLogger("geste.outbox")

MAX_IN_FLIGHT = 100
"""Deliveries one relay runs at once (one per instance at most: the per-instance order)."""
CLAIM_WINDOW = 1000
"""Due events one claim round reads at most (soonest first): it claims the first of their instances and
takes the others out of the due range (held behind the earlier event), so a backlog is read once."""
MIN_IDLE_WAIT = 0.01
"""Shortest sleep after a round that claimed nothing (a due event another relay just locked)."""
MAX_ERROR_LENGTH = 1000
MAX_LOCAL_IDS = 10_000
"""Ids of events recorded in this process whose notification has not come back yet, kept at most."""
CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"

OutboxHandler = Callable[["OutboxEvent"], Awaitable[Any]]


class OutboxStatus(StrEnum):
    """The state of an outbox event; the values are what the database stores."""

    PENDING = "pending"
    """To deliver: ``next_attempt_at`` says when, or is None while it waits behind an earlier event of its
    instance that is not done."""
    DELIVERED = "delivered"
    DEAD = "dead"
    """Failed ``outbox_max_attempts`` times (only with that option set): kept, and holding the later
    events of its instance back, until an operator retries or discards it."""
    DISCARDED = "discarded"
    """Given up by an operator (``app.discard_outbox_event``): never sent again."""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event as a destination receives it (the callable destination gets this object)."""

    event_id: str
    type: str
    source: str
    subject: str | None
    data: Any
    time: datetime
    instance_id: str
    attempt: int

    def to_cloudevent(self) -> dict[str, Any]:
        """The event in the CloudEvents 1.0 JSON format (what the HTTP destination receives)."""
        body: dict[str, Any] = json.loads(
            _structured(self.event_id, self.type, self.source, self.subject, self.time, self.instance_id)
        )
        if self.data is not None:
            body["data"] = self.data
        return body


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One outbox event as the operator sees it (``app.outbox()``)."""

    event_id: str
    instance_id: str
    seq: int
    type: str
    source: str
    subject: str | None
    data: Any
    status: OutboxStatus
    attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    claimed_by: str | None


def entry_from_row(row: OutboxRow) -> OutboxEntry:
    return OutboxEntry(
        event_id=row.event_id,
        instance_id=row.instance_id,
        seq=row.step_seq,
        type=row.event_type,
        source=row.source,
        subject=row.subject,
        data=decode(row.data),
        status=OutboxStatus(row.status),
        attempts=row.attempts,
        last_error=row.last_error,
        created_at=_dt(row.created_at),
        updated_at=_dt(row.updated_at),
        next_attempt_at=None if row.next_attempt_at is None else _dt(row.next_attempt_at),
        delivered_at=None if row.delivered_at is None else _dt(row.delivered_at),
        claimed_by=row.claimed_by,
    )


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    """The outbox options of an App, checked once at construction."""

    endpoint: str | None = None
    handler: OutboxHandler | None = None
    headers: dict[str, str] = field(default_factory=dict)
    max_attempts: int | None = None
    """Failed attempts after which an event is ``dead``; None (the default): it is tried until delivered."""
    initial_backoff: float = 1.0
    max_backoff: float = 300.0
    timeout: float = 10.0

    @property
    def enabled(self) -> bool:
        """Whether a destination is configured (the relay runs where the App also runs a worker)."""
        return self.endpoint is not None or self.handler is not None

    @classmethod
    def build(
        cls,
        *,
        endpoint: str | None,
        handler: OutboxHandler | None,
        headers: Mapping[str, str] | None,
        max_attempts: int | None,
        initial_backoff: float | timedelta,
        max_backoff: float | timedelta,
        timeout: float | timedelta,
    ) -> OutboxConfig:
        if endpoint is not None and handler is not None:
            raise ConfigurationError("outbox_endpoint and outbox_handler are exclusive: give one destination")
        if endpoint is not None:
            _check_endpoint(endpoint)
        if handler is not None and not (
            inspect.iscoroutinefunction(handler)
            or inspect.iscoroutinefunction(getattr(handler, "__call__", None))  # noqa: B004
        ):
            raise ConfigurationError(
                f"outbox_handler must be an async callable taking a geste.OutboxEvent, not {handler!r}"
            )
        checked_headers = _check_headers(headers)
        if checked_headers and endpoint is None:
            raise ConfigurationError("outbox_headers are sent to outbox_endpoint, which is not set")
        initial = seconds(initial_backoff, what="outbox_initial_backoff", allow_zero=False)
        maximum = seconds(max_backoff, what="outbox_max_backoff", allow_zero=False)
        if maximum < initial:
            raise ConfigurationError("outbox_max_backoff must not be less than outbox_initial_backoff")
        return cls(
            endpoint=endpoint,
            handler=handler,
            headers=checked_headers,
            max_attempts=None
            if max_attempts is None
            else positive_int(max_attempts, "outbox_max_attempts (or None: retried until delivered)"),
            initial_backoff=initial,
            max_backoff=maximum,
            timeout=seconds(timeout, what="outbox_timeout", allow_zero=False),
        )

    def backoff(self, attempts: int) -> float:
        """The delay after the ``attempts``-th failed attempt."""
        return float(min(self.max_backoff, self.initial_backoff * 2 ** min(attempts - 1, 60)))


def _check_endpoint(endpoint: object) -> None:
    try:
        import httpx
    except ImportError:  # pragma: no cover - depends on the installation
        raise ConfigurationError(
            "outbox_endpoint needs httpx: pip install 'geste[http]' (or pass outbox_handler instead)"
        ) from None
    if not isinstance(endpoint, str):
        raise ConfigurationError(f"outbox_endpoint must be an http(s):// URL string, not {endpoint!r}")
    try:
        url = httpx.URL(endpoint)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ConfigurationError(f"outbox_endpoint is not a valid URL: {endpoint!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(
            f"outbox_endpoint must be an http:// or https:// URL with a host: {endpoint!r}"
        )


def _check_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ConfigurationError(
            f"outbox_headers must be a mapping of header names to values, not {headers!r}"
        )
    checked = {}
    for name, value in headers.items():
        if (
            not isinstance(name, str)
            or not isinstance(value, str)
            or not name
            or any(c in name for c in ":\r\n\x00 ")
            or any(c in value for c in "\r\n\x00")
            or not (name + value).isascii()
        ):
            raise ConfigurationError(
                f"outbox_headers: {name!r}: {value!r} is not a valid header (ASCII strings, no line breaks)"
            )
        if name.lower() == "content-type":
            raise ConfigurationError(
                "outbox_headers cannot set Content-Type: the outbox sends CloudEvents JSON"
            )
        checked[name] = value
    return checked


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _structured(
    event_id: str, event_type: str, source: str, subject: str | None, time: datetime, instance_id: str
) -> str:
    """The CloudEvents attributes as a JSON object (``data`` is appended by the caller)."""
    attributes: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": event_type,
        "time": _rfc3339(time),
        "datacontenttype": "application/json",
        "gesteinstanceid": instance_id,
    }
    if subject is not None:
        attributes["subject"] = subject
    return json.dumps(attributes, separators=(",", ":"), ensure_ascii=False)


def cloudevent_body(claim: OutboxClaim) -> bytes:
    """The structured-mode body of a claimed event; its stored JSON data is inlined, not re-encoded."""
    head = _structured(
        claim.event_id,
        claim.event_type,
        claim.source,
        claim.subject,
        _dt(claim.created_at),
        claim.instance_id,
    )
    text = head if claim.data is None else head[:-1] + ',"data":' + claim.data + "}"
    return text.encode("utf-8")


class Relay(Loop):
    """Delivers pending outbox events of every instance, at least once, in order per instance."""

    log = logger

    def __init__(
        self,
        *,
        storage: Storage,
        config: OutboxConfig,
        relay_id: str,
        clock: Callable[[], float],
        wakeups: Wakeups,
        lock_timeout: float,
        shutdown_grace: float,
        metrics: Metrics | None = None,
        on_death: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name=f"geste-outbox-{relay_id}", what=f"outbox relay {relay_id}", on_death=on_death)
        self.doing = f"outbox relay {relay_id}: claiming"
        self.retry_base = wakeups.poll_interval
        self.storage = storage
        self.config = config
        self.metrics = metrics or Metrics()
        self.relay_id = relay_id
        self.clock = clock
        self.wakeups = wakeups
        self.lease = config.timeout + lock_timeout
        """How long a claim holds: longer than a delivery may take (``outbox_timeout``), so a live
        relay's claim never expires under it, and short enough that a dead relay's is taken over soon."""
        self.shutdown_grace = shutdown_grace
        self._inflight: dict[str, tuple[OutboxClaim, asyncio.Task[None]]] = {}
        self._client: Any = None
        self._poked = True
        """Whether the next round was poked (else its pause ran out: a poll); at start: look at once."""
        self._local: set[str] = set()
        self._full = False
        """A round found no free slot: the next delivery to end pokes, whatever its mark says."""

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self.config.endpoint is not None:
            import httpx

            self._client = httpx.AsyncClient(timeout=self.config.timeout, follow_redirects=False)
        self._poked = True
        super().start()
        destination = self.config.endpoint or getattr(self.config.handler, "__qualname__", "a handler")
        logger.info("outbox relay %s started, delivering to %s", self.relay_id, destination)

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming at a boundary (a claim in flight ends, and what it took is given back at once);
        let deliveries in flight end within ``shutdown_grace``; give back the rest. A cancellation of the
        caller propagates; ``abort`` then ends what is left."""
        await super().stop(self.shutdown_grace if grace is None else grace)
        running = [t for _, t in self._inflight.values()]
        if running:
            await asyncio.wait(running, timeout=self.shutdown_grace)
        leftover = list(self._inflight.values())
        for _, t in leftover:
            t.cancel()
        await asyncio.gather(*(t for _, t in leftover), return_exceptions=True)
        if leftover:
            try:
                await self.storage.outbox_release(
                    [(claim.event_id, claim.claim_id) for claim, _ in leftover], self.clock()
                )
            except StorageError as exc:
                logger.warning(
                    "outbox relay %s could not give back its claims (%s); they expire", self.relay_id, exc
                )
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        logger.info("outbox relay %s stopped", self.relay_id)

    def abort(self) -> None:
        """End everything at once, waiting for nothing (a cancelled ``App.close``): the claims of the
        deliveries cut short expire by themselves."""
        super().abort()
        for _, task in self._inflight.values():
            task.cancel()

    def poke(self) -> None:
        """Look for due events now."""
        self.wake()

    def made_due(self) -> None:
        """A write of this process made an event due (a retry, a discard): look now, unless its
        notification routes it to one relay (maybe another one)."""
        if not self.wakeups.routing:
            self.wake()

    def recorded(self, event_id: str) -> None:
        """A step of this process recorded an event: look now, and ignore its own notification."""
        if len(self._local) >= MAX_LOCAL_IDS:  # notifications are off or lost: forget, do not grow
            self._local.clear()
        self._local.add(event_id)
        self.poke()

    def notified(self, body: dict[str, Any]) -> None:
        """``geste_outbox_pending`` arrived: an event recorded elsewhere (this process's own are known).
        While routing, one relay looks: the recording worker's if it runs one (it was told directly),
        else one chosen by the event id (``Router.relay_mine``)."""
        event_id = body.get("event_id")
        if isinstance(event_id, str) and event_id in self._local:
            self._local.discard(event_id)
            return
        router = self.wakeups.router
        routed = router is not None and isinstance(event_id, str) and "worker" in body
        if routed and not router.relay_mine(event_id, body.get("worker")):  # type: ignore[union-attr,arg-type]
            return  # another relay's
        self.poke()

    # -- the loop ----------------------------------------------------------------------------------
    def _interval(self) -> float:
        return self.wakeups.fallback_interval if self.wakeups.listening else self.wakeups.poll_interval

    async def round(self) -> float:
        return await self._round(self._poked)

    async def pause(self, seconds: float) -> None:
        self._poked = True
        if seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    await self._wake.wait()
            except TimeoutError:
                self._poked = False
        self._wake.clear()

    async def _round(self, poked: bool) -> float:
        """Claim what is due and start delivering it; return how long to sleep before looking again."""
        interval = self._interval()
        free = MAX_IN_FLIGHT - len(self._inflight)
        if free <= 0:
            self._full = True  # the next delivery to end pokes
            return interval
        if not poked:  # a poll: one read tells whether anything is due, before taking a write lock
            due = await self.storage.outbox_next_attempt_at()
            if due is None or due > self.clock():
                return interval if due is None else min(interval, due - self.clock())
        now = self.clock()
        claims = await self.storage.outbox_claim(
            self.relay_id, uuid.uuid4().hex, now, now + self.lease, free, CLAIM_WINDOW
        )
        if self.stopping:  # stopped while the claim ran: give its events back at once, unsent
            if claims:
                await self.storage.outbox_release([(c.event_id, c.claim_id) for c in claims], self.clock())
            return 0.0
        for claim in claims:
            task = asyncio.create_task(self._deliver(claim), name=f"geste-outbox-send-{claim.event_id}")
            self._inflight[claim.event_id] = (claim, task)
        if len(claims) == free:
            return 0.0
        due = await self.storage.outbox_next_attempt_at()
        if due is None:
            return interval
        return min(interval, max(due - self.clock(), 0.0 if claims else MIN_IDLE_WAIT))

    # -- one delivery ------------------------------------------------------------------------------
    async def _deliver(self, claim: OutboxClaim) -> None:
        look_again = True  # unless the mark says nothing of this instance waits behind the event
        try:
            error = await self._send(claim)
            now = self.clock()
            if error is None:
                self.metrics.outbox_deliveries.values[()] += 1
                kept, later = await self.storage.outbox_mark_delivered(claim.event_id, claim.claim_id, now)
                look_again = later
                logger.debug("outbox event %s delivered (attempt %d)", claim.event_id, claim.attempts)
            else:
                limit = self.config.max_attempts
                dead = limit is not None and claim.attempts >= limit
                self.metrics.outbox_failures.values["dead" if dead else "retry"] += 1
                next_at = None if dead else now + self.config.backoff(claim.attempts)
                kept, later = await self.storage.outbox_mark_failed(
                    claim.event_id, claim.claim_id, now, error[:MAX_ERROR_LENGTH], next_at
                )
                look_again = later or not dead  # a retry: the loop's next wake-up is that time
                if dead:
                    logger.error(
                        "outbox event %s (%s of instance %s) is dead after %d attempts: %s",
                        claim.event_id,
                        claim.event_type,
                        claim.instance_id,
                        claim.attempts,
                        error,
                    )
                else:
                    logger.warning(
                        "outbox event %s: attempt %d%s failed (%s); retrying in %.3gs",
                        claim.event_id,
                        claim.attempts,
                        "" if limit is None else f"/{limit}",
                        error,
                        next_at - now if next_at is not None else 0.0,
                    )
            if not kept:
                look_again = True
                logger.warning(
                    "outbox event %s: the outcome was not recorded, the event changed meanwhile: its claim "
                    "expired and another relay owns it now (it may be sent again), or it was discarded",
                    claim.event_id,
                )
        except StorageError as exc:
            logger.warning(
                "outbox event %s: recording the outcome failed (%s); it is sent again once the claim expires",
                claim.event_id,
                exc,
            )
        finally:
            current = self._inflight.get(claim.event_id)
            if current is not None and current[0] is claim:
                del self._inflight[claim.event_id]
            if look_again or self._full:
                # the instance's next event may be claimable now, or a retry is due sooner; or the relay
                # was full and skipped a round: due events of other instances wait for this free slot
                self._full = False
                self.poke()

    async def _send(self, claim: OutboxClaim) -> str | None:
        """One attempt; None when delivered, else what went wrong."""
        scope = asyncio.timeout(self.config.timeout)
        try:
            async with scope:
                if self.config.handler is None:
                    return await self._post(claim)
                await self.config.handler(
                    OutboxEvent(
                        event_id=claim.event_id,
                        type=claim.event_type,
                        source=claim.source,
                        subject=claim.subject,
                        data=decode(claim.data),
                        time=_dt(claim.created_at),
                        instance_id=claim.instance_id,
                        attempt=claim.attempts,
                    )
                )
                return None
        except Exception as exc:
            if isinstance(exc, TimeoutError) and scope.expired():
                return f"no answer within outbox_timeout ({self.config.timeout:g}s)"
            return f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)

    async def _post(self, claim: OutboxClaim) -> str | None:
        assert self.config.endpoint is not None and self._client is not None
        headers = {**self.config.headers, "Content-Type": CLOUDEVENTS_CONTENT_TYPE}
        response = await self._client.post(
            self.config.endpoint, content=cloudevent_body(claim), headers=headers
        )
        if 200 <= response.status_code < 300:
            return None
        text = response.text.strip().replace("\n", " ")
        return f"HTTP {response.status_code}" + (f": {text[:200]}" if text else "")
