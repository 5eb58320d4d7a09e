"""The contexts user code receives: ``WorkflowContext`` (replay-aware steps) and ``ActivityContext``.

A ``WorkflowContext`` numbers every step the workflow takes. A step whose number is in the recorded
history returns its recorded outcome; the first step past the history runs and its outcome is committed
before the workflow goes on. Outcomes that need no durability of their own (``now``, ``uuid4``,
``random``, the start of a wait) are buffered and written in the same transaction as the next commit.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import uuid
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import quote

from .._channels import Message, message_from_body
from .._models import Event, Status, StepKind
from .._retry import seconds
from .._serde import decode, decode_error, encode, encode_error
from .._validation import (
    BROADCAST,
    MODES,
    check_channel,
    check_event_attribute,
    check_event_id,
    check_event_type,
    check_instance_id,
    check_mode,
)
from ..errors import (
    ActivityTimeout,
    ConfigurationError,
    EventTimeout,
    HistoryCorruptedError,
    InstanceNotFoundError,
    NonDeterminismError,
    ReceiveTimeout,
    SerializationError,
    StorageError,
    WorkflowCancelled,
)
from ..storage.base import (
    EventWait,
    HistoryRow,
    Lease,
    LeaseLost,
    MessageWait,
    NewMessage,
    NewOutboxEvent,
    StoredEvent,
    StoredMessage,
    Suspension,
    event_history_payload,
    message_history_payload,
)

if TYPE_CHECKING:
    from .._definitions import Activity
    from .run import Engine

logger = logging.getLogger("geste.workflow")

T = TypeVar("T")

_KINDS = frozenset(kind.value for kind in StepKind)
_WAIT_KINDS = frozenset(
    kind.value
    for kind in (
        StepKind.SLEEP,
        StepKind.WAIT_EVENT,
        StepKind.EVENT,
        StepKind.EVENT_TIMEOUT,
        StepKind.RECEIVE,
        StepKind.MESSAGE,
        StepKind.RECEIVE_TIMEOUT,
    )
)
"""Rows of waits: a wait is never inside a gather, so everything before one was recorded before it."""
_UNREADABLE = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    OSError,
    RecursionError,
)
"""What reading a recorded row raises when the row is not what its step wrote (JSONDecodeError is a
ValueError; a missing key, a list for a dict, a string for a number...)."""


class _Unwind(BaseException):
    """Base of the engine's own signals: ``BaseException`` so a user's ``except Exception`` lets them by."""


class Suspended(_Unwind):
    """The wait was committed and the instance released; unwind the coroutine, keep nothing."""


class Abandon(_Unwind):
    """The lease is lost or the database failed: stop this run without writing anything more."""


@dataclass(frozen=True, slots=True)
class ActivityContext:
    """What an activity knows about the call it serves.

    ``idempotency_key`` is the same for every attempt and every replay of this step of this instance:
    hand it to external systems so a retried call is not applied twice.
    """

    instance_id: str
    workflow_name: str
    activity_name: str
    seq: int
    attempt: int
    max_attempts: int
    is_compensation: bool = False

    @property
    def idempotency_key(self) -> str:
        return f"{self.instance_id}:{self.seq}"


class _ReplayQuietLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that says nothing while the workflow replays steps it already took."""

    def __init__(self, ctx: WorkflowContext) -> None:
        super().__init__(logger, {"instance_id": ctx.instance_id})
        self._ctx = ctx

    def isEnabledFor(self, level: int) -> bool:
        return not self._ctx.is_replaying and super().isEnabledFor(level)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{self._ctx.workflow_name} {self._ctx.instance_id}] {msg}", kwargs


class WorkflowContext:
    """Passed to every workflow as its first argument; every durable operation goes through it."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease: Lease,
        workflow_name: str,
        history: Sequence[HistoryRow],
        cancel_requested: bool,
    ) -> None:
        self._engine = engine
        self._lease = lease
        self.instance_id = lease.instance_id
        self.workflow_name = workflow_name
        self._history = {row.seq: row for row in history}
        numbered = [row for row in history if type(row.seq) is int]  # SQLite keeps what an UPDATE puts
        self._last_recorded = max((row.seq for row in numbered), default=0)
        self._last_wait = max((row.seq for row in numbered if row.kind in _WAIT_KINDS), default=0)
        self._seq = 0
        self._pending: list[HistoryRow] = []
        self._cancel_requested = cancel_requested
        self._cancel_delivered = any(row.kind == StepKind.CANCELLED for row in history)
        self._compensations: list[tuple[Activity[Any, Any], tuple[Any, ...], dict[str, Any]]] = []
        self._compensating = False
        self._suspended = False
        self._divergence: NonDeterminismError | None = None
        self._subscriptions: dict[str, str] = {}
        """channel -> mode of this instance's subscriptions, rebuilt by the replay of its steps."""
        self.logger = _ReplayQuietLogger(self)
        if len(numbered) < len(history):  # fail the run like a divergence, not the engine at every claim
            position, row = next((i, r) for i, r in enumerate(history, 1) if type(r.seq) is not int)
            self._corrupted(position, f"the row in position {position} has the step number {row.seq!r:.80}")

    # -- introspection ---------------------------------------------------------------------------
    @property
    def is_replaying(self) -> bool:
        """True while the workflow re-runs steps it took before (side effects outside steps repeat)."""
        return self._seq < self._last_recorded

    # -- deterministic helpers ---------------------------------------------------------------------
    def now(self) -> datetime:
        """The current time (UTC), recorded so that a replay sees the same value."""
        return self._helper(
            StepKind.NOW, self._engine.clock, lambda value: datetime.fromtimestamp(_number(value), UTC)
        )

    def uuid4(self) -> uuid.UUID:
        """A random UUID, recorded so that a replay sees the same value."""
        return self._helper(StepKind.UUID, lambda: str(uuid.uuid4()), lambda value: uuid.UUID(_text(value)))

    def random(self) -> float:
        """A random float in [0, 1), recorded so that a replay sees the same value."""
        return self._helper(StepKind.RANDOM, _random.random, _number)

    def _helper(self, kind: StepKind, make: Callable[[], Any], read: Callable[[Any], T]) -> T:
        """A recorded value: ``make`` it and record it, or read it back (``read`` turns both into what
        the workflow gets)."""
        seq = self._next()
        row = self._replay(seq, kind, kind.value)
        if row is not None:
            return self._read(row, read)
        if self._suspended:
            raise Suspended()
        self._live(seq)
        value = make()
        self._pending.append(
            HistoryRow(seq, kind, kind.value, encode(value, what=kind.value), False, self._engine.clock())
        )
        return read(value)

    # -- activities --------------------------------------------------------------------------------
    def on_failure(self, activity: Activity[Any, Any], /, *args: Any, **kwargs: Any) -> None:
        """Register a compensation: run (newest first) if the workflow fails or is cancelled."""
        from .._definitions import Activity

        if not isinstance(activity, Activity):
            raise TypeError(f"on_failure takes an activity (decorated with @app.activity), not {activity!r}")
        activity.signature.bind(args, kwargs, what=f"compensation {activity.name}")
        encode(
            {"args": args, "kwargs": kwargs},
            what=f"arguments of compensation {activity.name}",
            limit=self._engine.max_payload_bytes,
        )
        self._compensations.append((activity, args, kwargs))

    async def _activity(
        self,
        activity: Activity[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        kind: StepKind = StepKind.ACTIVITY,
    ) -> Any:
        seq = self._next()
        row = self._replay(seq, kind, activity.name)
        if row is None:
            self._begin(seq)
            activity.signature.bind(args, kwargs, what=f"activity {activity.name}")
            encoded_args = encode(
                {"args": args, "kwargs": kwargs},
                what=f"arguments of activity {activity.name}",
                limit=self._engine.max_payload_bytes,
            )
            # the activity gets its arguments as recorded (JSON, typed by its hints), never the
            # workflow's own objects: what it mutates cannot leak into the workflow
            loaded_args, loaded_kwargs = activity.signature.load_args(decode(encoded_args))
            self._live(seq, ordered=False)
            if self._pending:  # what the workflow saw (now, uuid4, random, a timeout) may be in the
                await self._flush()  # arguments: a rerun of the activity after a crash must see it too
                if self._cancel_pending():  # the flush is where a cancel requested meanwhile shows
                    self._deliver_cancel(seq)
            row = await self._execute(activity, seq, kind, tuple(loaded_args), loaded_kwargs, encoded_args)
        if row.is_error:
            raise self._read(row, lambda body: decode_error(body["error"]))
        return activity.signature.load_result(self._read(row, lambda body: body["result"]))

    async def _execute(
        self,
        activity: Activity[Any, Any],
        seq: int,
        kind: StepKind,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        encoded_args: str,
    ) -> HistoryRow:
        policy = activity.retry
        timeout = policy.timeout_seconds
        started = self._engine.clock()
        metrics = self._engine.metrics
        attempt = 0
        while True:
            attempt += 1
            metrics.activity_attempts.values[activity.name] += 1
            actx = ActivityContext(
                instance_id=self.instance_id,
                workflow_name=self.workflow_name,
                activity_name=activity.name,
                seq=seq,
                attempt=attempt,
                max_attempts=policy.max_attempts,
                is_compensation=kind == StepKind.COMPENSATION,
            )
            error: BaseException | None = None
            try:
                if timeout is None:
                    result = await activity.fn(actx, *args, **kwargs)
                else:
                    scope = asyncio.timeout(timeout)
                    try:
                        async with scope:
                            result = await activity.fn(actx, *args, **kwargs)
                    except TimeoutError as exc:
                        if not scope.expired():
                            raise
                        raise ActivityTimeout(
                            f"attempt {attempt} of activity {activity.name} ran past {timeout}s"
                        ) from exc
            except Exception as exc:
                error = exc
            if error is None:
                try:
                    body = encode_body(
                        {"result": result},
                        started,
                        self._engine.clock(),
                        attempt,
                        encoded_args,
                        what=f"result of activity {activity.name}",
                        limit=self._engine.max_payload_bytes,
                    )
                except SerializationError as exc:  # deterministic: retrying would fail the same way
                    error, attempt_final = exc, True
                else:
                    return self._settled(HistoryRow(seq, kind, activity.name, body, False, started))
            else:
                attempt_final = attempt >= policy.max_attempts or not policy.is_retryable(error)
            metrics.activity_attempt_failures.values[activity.name] += 1
            if attempt_final:
                metrics.activity_failures.values[activity.name] += 1
                body = encode_body(
                    {"error": encode_error(error)},
                    started,
                    self._engine.clock(),
                    attempt,
                    encoded_args,
                    what="error",
                    limit=None,
                )
                return self._settled(HistoryRow(seq, kind, activity.name, body, True, started))
            delay = policy.delay(attempt)
            metrics.activity_retries.values[activity.name] += 1
            logger.warning(
                "activity %s of %s attempt %d/%d failed (%s: %s); retrying in %.3gs",
                activity.name,
                self.instance_id,
                attempt,
                policy.max_attempts,
                type(error).__name__,
                error,
                delay,
            )
            await self._engine.retry_wait(self.instance_id, delay)

    # -- durable timers ----------------------------------------------------------------------------
    async def sleep(self, duration: float | timedelta) -> None:
        """Wait durably: the instance is released and resumed (on any worker) once the time is up."""
        secs = seconds(duration, what="sleep duration")
        seq = self._next()
        row = self._replay(seq, StepKind.SLEEP, "sleep")
        now = self._engine.clock()
        if row is None:
            self._begin(seq)
            self._live(seq)
            expires_at = now + secs
            self._pending.append(
                HistoryRow(
                    seq,
                    StepKind.SLEEP,
                    "sleep",
                    encode({"seconds": secs, "expires_at": expires_at}, what="sleep"),
                    False,
                    now,
                )
            )
        else:
            expires_at = self._read(row, lambda body: _number(body["expires_at"]))
            if self._last_recorded > seq:
                self._cancelled_here()
                return
        if now >= expires_at:
            return
        if self._cancel_pending():
            self._deliver_cancel(self._next())
        await self._suspend(run_at=expires_at, timer=(seq, expires_at))

    async def sleep_until(self, when: datetime) -> None:
        """Wait durably until ``when`` (an aware datetime; a naive one is taken as UTC)."""
        if not isinstance(when, datetime):
            raise TypeError(f"sleep_until takes a datetime, not {when!r}")
        moment = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        seq_time = self.now().timestamp()
        await self.sleep(max(0.0, moment.timestamp() - seq_time))

    # -- events --------------------------------------------------------------------------------------
    async def wait_event(
        self,
        event_type: str,
        *,
        match: Mapping[str, Any] | None = None,
        timeout: float | timedelta | None = None,
    ) -> Event:
        """Wait durably for an event of ``event_type`` whose data has every key/value of ``match``.

        Events sent with ``app.send_event`` at or after this instance was started are kept until it takes
        them, so an event that arrives before the workflow waits is not lost. Raises
        ``geste.errors.EventTimeout`` after ``timeout``.
        """
        check_event_type(event_type)
        match_dict = dict(match) if match is not None else None
        secs = None if timeout is None else seconds(timeout, what="timeout")
        seq = self._next()
        row = self._replay(seq, StepKind.WAIT_EVENT, event_type)
        if row is None:
            self._begin(seq)
            now = self._engine.clock()
            deadline = None if secs is None else now + secs
            body = encode(
                {"match": match_dict, "timeout": secs, "deadline": deadline},
                what="event match",
                limit=self._engine.max_payload_bytes,
            )
            self._live(seq)
            self._pending.append(HistoryRow(seq, StepKind.WAIT_EVENT, event_type, body, False, now))
            # matched as recorded (JSON), like the events it is compared with, whether it finds one
            # now or app.send_event brings one later: a tuple, a date or an int key match the same
            match_dict = decode(body)["match"]
        else:
            deadline, match_dict = self._read(row, _wait_body)
        out_seq = self._next()
        out = self._row(out_seq)
        if out is not None:
            if out.kind == StepKind.CANCELLED:
                raise WorkflowCancelled(f"workflow instance {self.instance_id} was cancelled")
            if out.kind == StepKind.EVENT and out.name == event_type:
                return self._read(out, _event)
            if out.kind == StepKind.EVENT_TIMEOUT and out.name == event_type:
                raise EventTimeout(f"no {event_type!r} event arrived within {secs}s")
            raise self._diverged(
                NonDeterminismError(out_seq, f"{out.kind} {out.name!r}", f"event {event_type!r}")
            )
        self._live(out_seq)
        if self._cancel_pending():
            self._deliver_cancel(out_seq)
        now = self._engine.clock()
        wait = EventWait(event_type, match_dict, deadline, out_seq)
        try:
            outcome = await self._engine.storage.take_event_or_suspend(
                self._lease, self._pending, wait, now=now, lock_expires_at=now + self._engine.lock_timeout
            )
        except (LeaseLost, StorageError) as exc:
            raise Abandon(exc) from exc
        if isinstance(outcome, StoredEvent):
            self._engine.metrics.recorded(self._pending)
            self._engine.metrics.steps.values[StepKind.EVENT] += 1
            self._pending = []
            return _event(decode(event_history_payload(outcome)))
        if outcome is None:
            self._pending.append(HistoryRow(out_seq, StepKind.EVENT_TIMEOUT, event_type, None, True, now))
            raise EventTimeout(f"no {event_type!r} event arrived within {secs}s")
        self._waited(outcome, out_seq, deadline)

    # -- the transactional outbox ------------------------------------------------------------------
    async def send_event(
        self,
        event_type: str,
        data: Any = None,
        *,
        source: str | None = None,
        subject: str | None = None,
        event_id: str | None = None,
    ) -> str:
        """Emit an event to the outside world through the transactional outbox; return its id.

        A step of its own: its history row and the outbox row commit in one transaction (with the
        buffered rows before it), so the event exists exactly when the step is recorded, and a replay
        returns the recorded id without emitting it again. The relay delivers it at least once, after
        this instance's earlier events (README, "The transactional outbox"). ``event_id`` defaults to
        ``"<instance id>:<seq>"``, the same on every replay; an id already in the outbox is not stored
        again. ``source`` defaults to ``/geste/<workflow name>``.
        """
        check_event_attribute(event_type, "event_type")
        if source is not None:
            check_event_attribute(source, "source")
        if subject is not None:
            check_event_attribute(subject, "subject")
        if event_id is not None:
            check_event_id(event_id)
        seq = self._next()
        row = self._replay(seq, StepKind.SEND_EVENT, event_type)
        if row is not None:
            return self._read(row, lambda body: _text(body["event_id"]))
        self._begin(seq)
        encoded = (
            None
            if data is None
            else encode(data, what=f"data of event {event_type}", limit=self._engine.max_payload_bytes)
        )
        self._live(seq, ordered=False)
        eid = f"{self.instance_id}:{seq}" if event_id is None else event_id
        src = f"/geste/{quote(self.workflow_name, safe='')}" if source is None else source
        now = self._engine.clock()
        body = encode({"event_id": eid, "type": event_type, "source": src, "subject": subject}, what="event")
        self._pending.append(HistoryRow(seq, StepKind.SEND_EVENT, event_type, body, False, now))
        records, self._pending = self._pending, []
        try:
            outcome = await self._engine.storage.outbox_record(
                self._lease,
                records,
                NewOutboxEvent(eid, seq, event_type, src, subject, encoded),
                now=now,
                lock_expires_at=now + self._engine.lock_timeout,
                status=Status.COMPENSATING if self._compensating else None,
            )
        except (LeaseLost, StorageError) as exc:
            raise Abandon(exc) from exc
        self._engine.metrics.recorded(records)
        if outcome.cancel_requested:
            self._cancel_requested = True
        self._engine.on_outbox(eid)
        return eid

    # -- channels ------------------------------------------------------------------------------------
    async def subscribe(self, channel: str, mode: str = "broadcast") -> None:
        """Subscribe this instance to ``channel``: it receives the messages published from now on.

        ``"broadcast"``: every message, in publication order. ``"competing"``: the channel's competing
        subscribers share its messages, each taken by exactly one of them. A step of its own (one
        commit). Subscribing again in the same mode does nothing; in the other mode raises
        ``geste.errors.ConfigurationError``. A first ``receive`` on a channel subscribes in broadcast mode.
        """
        check_channel(channel)
        check_mode(mode)
        if self._subscribed(channel, mode):
            return
        seq = self._next()
        row = self._replay(seq, StepKind.SUBSCRIBE, channel)
        if row is not None:
            self._replayed_subscription(seq, row, channel, mode)
            return
        self._begin(seq)
        self._live(seq, ordered=False)
        now = self._engine.clock()
        body = encode({"mode": mode}, what="subscription")
        self._pending.append(HistoryRow(seq, StepKind.SUBSCRIBE, channel, body, False, now))
        records, self._pending = self._pending, []
        try:
            outcome = await self._engine.storage.channel_subscribe(
                self._lease,
                records,
                channel=channel,
                mode=mode,
                now=now,
                lock_expires_at=now + self._engine.lock_timeout,
            )
        except (LeaseLost, StorageError) as exc:
            raise Abandon(exc) from exc
        self._engine.metrics.recorded(records)
        self._subscriptions[channel] = mode
        if outcome.cancel_requested:
            self._cancel_requested = True

    async def receive(self, channel: str, timeout: float | timedelta | None = None) -> Message:
        """Wait durably for this instance's next message on ``channel`` and return it.

        Subscribed in broadcast mode: the next message published after the subscription, in order;
        in competing mode: the oldest one no other competing subscriber took. A message sent to this
        instance with ``send_to`` comes in publication order with them. A message published while the
        instance is not waiting (running, suspended, crashed) is kept until it receives. Never
        subscribed to ``channel``: this receive subscribes it in broadcast mode, from now on. Raises
        ``geste.errors.ReceiveTimeout`` after ``timeout``.
        """
        check_channel(channel)
        secs = None if timeout is None else seconds(timeout, what="timeout")
        mode = self._subscriptions.get(channel)
        if mode is None:  # an implicit subscription: its row is written with the receive's transaction
            mode = BROADCAST
            seq = self._next()
            row = self._replay(seq, StepKind.SUBSCRIBE, channel)
            if row is not None:
                self._replayed_subscription(seq, row, channel, mode)
            else:
                self._begin(seq)
                self._live(seq)
                body = encode({"mode": mode, "implicit": True}, what="subscription")
                self._pending.append(
                    HistoryRow(seq, StepKind.SUBSCRIBE, channel, body, False, self._engine.clock())
                )
                self._subscriptions[channel] = mode
        seq = self._next()
        row = self._replay(seq, StepKind.RECEIVE, channel)
        if row is None:
            self._begin(seq)
            self._live(seq)
            now = self._engine.clock()
            deadline = None if secs is None else now + secs
            body = encode({"timeout": secs, "deadline": deadline}, what="receive")
            self._pending.append(HistoryRow(seq, StepKind.RECEIVE, channel, body, False, now))
        else:
            deadline = self._read(row, lambda body: _optional_number(body["deadline"]))
        out_seq = self._next()
        out = self._row(out_seq)
        if out is not None:
            if out.kind == StepKind.CANCELLED:
                raise WorkflowCancelled(f"workflow instance {self.instance_id} was cancelled")
            if out.kind == StepKind.MESSAGE and out.name == channel:
                return self._read(out, message_from_body)
            if out.kind == StepKind.RECEIVE_TIMEOUT and out.name == channel:
                raise ReceiveTimeout(f"no message on channel {channel!r} within {secs}s")
            raise self._diverged(
                NonDeterminismError(out_seq, f"{out.kind} {out.name!r}", f"message on channel {channel!r}")
            )
        self._live(out_seq)
        if self._cancel_pending():
            self._deliver_cancel(out_seq)
        now = self._engine.clock()
        wait = MessageWait(channel, mode, deadline, out_seq)
        try:
            outcome = await self._engine.storage.channel_take_or_suspend(
                self._lease, self._pending, wait, now=now, lock_expires_at=now + self._engine.lock_timeout
            )
        except (LeaseLost, StorageError) as exc:
            raise Abandon(exc) from exc
        if isinstance(outcome, StoredMessage):
            self._engine.metrics.recorded(self._pending)
            self._engine.metrics.steps.values[StepKind.MESSAGE] += 1
            self._pending = []
            return message_from_body(decode(message_history_payload(outcome)))
        if outcome is None:
            self._pending.append(HistoryRow(out_seq, StepKind.RECEIVE_TIMEOUT, channel, None, True, now))
            raise ReceiveTimeout(f"no message on channel {channel!r} within {secs}s")
        self._waited(outcome, out_seq, deadline)

    async def publish(self, channel: str, data: Any = None) -> str:
        """Publish ``data`` (JSON-serialisable) on ``channel``; return the message id.

        A step of its own: the message and its history row commit in one transaction (with the rows
        buffered before it), so a replay returns the recorded id and never publishes again. The
        subscribers waiting on the channel are made runnable in that transaction.
        """
        return await self._publish(StepKind.PUBLISH, channel, data, None)

    async def send_to(self, instance_id: str, channel: str, data: Any = None) -> str:
        """Send ``data`` to instance ``instance_id`` only, on ``channel``; return the message id.

        It takes it with ``receive(channel)``, whenever it does (the message is kept until then). A step
        like ``publish``; an instance id that does not exist raises ``geste.errors.InstanceNotFoundError``
        (recorded: a replay raises it again).
        """
        check_instance_id(instance_id)
        return await self._publish(StepKind.SEND_TO, channel, data, instance_id)

    async def _publish(self, kind: StepKind, channel: str, data: Any, target: str | None) -> str:
        check_channel(channel)
        seq = self._next()
        row = self._replay(seq, kind, channel)
        if row is not None:
            if row.is_error:
                raise InstanceNotFoundError(self._read(row, lambda body: _text(body["target_instance_id"])))
            return self._read(row, lambda body: _text(body["message_id"]))
        self._begin(seq)
        encoded = encode(
            data, what=f"data of a message on channel {channel}", limit=self._engine.max_payload_bytes
        )
        self._live(seq, ordered=False)
        message_id = uuid.uuid4().hex
        now = self._engine.clock()
        body = encode({"message_id": message_id, "target_instance_id": target}, what="message")
        records = [*self._pending, HistoryRow(seq, kind, channel, body, False, now)]
        try:
            result = await self._engine.storage.channel_publish(
                NewMessage(message_id, channel, encoded, self.instance_id, target, now),
                lease=self._lease,
                records=records,
                lock_expires_at=now + self._engine.lock_timeout,
            )
        except (LeaseLost, StorageError) as exc:
            raise Abandon(exc) from exc
        if result.target_missing:  # nothing was written: record the outcome, so a replay raises it too
            missing = encode({"message_id": None, "target_instance_id": target}, what="message")
            await self._commit(HistoryRow(seq, kind, channel, missing, True, now))
            raise InstanceNotFoundError(str(target))
        self._engine.metrics.recorded(records)
        self._pending = []
        if result.cancel_requested:
            self._cancel_requested = True
        if result.woken:
            self._engine.on_channel_woken()
        return message_id

    def _subscribed(self, channel: str, mode: str) -> bool:
        current = self._subscriptions.get(channel)
        if current is None:
            return False
        if current != mode:
            raise ConfigurationError(
                f"instance {self.instance_id} is subscribed to channel {channel!r} in {current} mode "
                f"already; it cannot subscribe in {mode} mode too"
            )
        return True

    def _replayed_subscription(self, seq: int, row: HistoryRow, channel: str, mode: str) -> None:
        recorded = self._read(row, lambda body: _mode(body["mode"]))
        if recorded != mode:
            raise self._diverged(
                NonDeterminismError(
                    seq, f"subscribe {channel!r} ({recorded})", f"subscribe {channel!r} ({mode})"
                )
            )
        self._subscriptions[channel] = mode

    # -- internals -----------------------------------------------------------------------------------
    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _diverged(self, error: NonDeterminismError) -> NonDeterminismError:
        """Remember the divergence: user code that swallows it still cannot take another step."""
        self._divergence = error
        return error

    def _corrupted(self, seq: int, problem: str) -> HistoryCorruptedError:
        error = HistoryCorruptedError(self.instance_id, seq, problem)
        self._diverged(error)
        return error

    def _row(self, seq: int) -> HistoryRow | None:
        """The recorded row at ``seq``, if any; one of a kind geste never writes is corruption."""
        row = self._history.get(seq)
        if row is not None and row.kind not in _KINDS:
            raise self._corrupted(seq, f"unknown step kind {row.kind!r:.80}")
        return row

    def _read(self, row: HistoryRow, read: Callable[[Any], T]) -> T:
        """What a recorded row says, through ``read`` (given the decoded payload). A row that cannot say
        it (not JSON, not the shape its step writes) was not written by geste: it fails the instance
        like a divergence, even if the workflow catches the error, and is left as it is."""
        try:
            return read(decode(row.payload))
        except _UNREADABLE as exc:
            raise self._corrupted(
                row.seq, f"{row.kind} {row.name!r:.80} row unreadable ({type(exc).__name__}: {exc!s:.200})"
            ) from exc

    def _live(self, seq: int, *, ordered: bool = True) -> None:
        """Before a step at ``seq`` is taken live: below later recorded steps it fills a hole, a row
        removed by hand. Rows are written in order, except for steps that commit on their own
        (activities, publish, send_event, subscribe), which a gather may commit out of order (a crash
        can then lose the earlier one): those may fill a hole, unless a wait, which is never in a
        gather, was recorded after it. (A step that fails before it is recorded leaves a hole too; a
        replay fails there again, before this check.)"""
        if seq < (self._last_recorded if ordered else self._last_wait):
            raise self._corrupted(seq, "no row at this step, but later steps are recorded")

    def _replay(self, seq: int, kind: StepKind, name: str) -> HistoryRow | None:
        if self._divergence is not None:
            raise self._divergence
        row = self._row(seq)
        if row is None:
            return None
        if row.kind == StepKind.CANCELLED:
            raise WorkflowCancelled(f"workflow instance {self.instance_id} was cancelled")
        if row.kind != kind or row.name != name:
            raise self._diverged(
                NonDeterminismError(seq, f"{row.kind} {row.name!r}", f"{kind.value} {name!r}")
            )
        return row

    def _begin(self, seq: int) -> None:
        """Checks before a new step: nothing runs after a suspension; a pending cancel is delivered."""
        if self._suspended:
            raise Suspended()
        if self._cancel_pending():
            self._deliver_cancel(seq)

    def _cancel_pending(self) -> bool:
        return self._cancel_requested and not self._cancel_delivered and not self._compensating

    def _deliver_cancel(self, seq: int) -> None:
        self._cancel_delivered = True
        self._pending.append(
            HistoryRow(seq, StepKind.CANCELLED, "cancelled", None, False, self._engine.clock())
        )
        raise WorkflowCancelled(f"workflow instance {self.instance_id} was cancelled")

    def _cancelled_here(self) -> None:
        """A wait recorded as interrupted by cancellation raises at the wait, as it did live."""
        after = self._history.get(self._seq + 1)
        if after is not None and after.kind == StepKind.CANCELLED:
            self._seq += 1
            raise WorkflowCancelled(f"workflow instance {self.instance_id} was cancelled")

    def _settled(self, row: HistoryRow) -> HistoryRow:
        """An activity's outcome joins the buffered rows and commits with the workflow's next write:
        before the next activity starts, or with the suspension, publication or end that follows. That
        saves a transaction per activity, and the last activity commits with the instance's end. No side
        effect can happen in between (workflow code is deterministic), so a crash before that commit only
        re-runs this activity, as a crash during it would: at least once, recorded once."""
        self._pending.append(row)
        return row

    async def _commit(self, row: HistoryRow) -> HistoryRow:
        self._pending.append(row)
        await self._flush()
        return row

    async def _flush(self) -> None:
        """Commit the buffered rows in one transaction that also renews the lease."""
        records, self._pending = self._pending, []
        status = Status.COMPENSATING if self._compensating else None
        now = self._engine.clock()
        try:
            outcome = await self._engine.storage.record(
                self._lease, records, now=now, lock_expires_at=now + self._engine.lock_timeout, status=status
            )
        except (LeaseLost, StorageError) as exc:
            raise Abandon(exc) from exc
        self._engine.metrics.recorded(records)
        if outcome.cancel_requested:
            self._cancel_requested = True

    def _waited(self, outcome: Suspension, out_seq: int, deadline: float | None) -> NoReturn:
        """After a wait's take-or-suspend transaction found nothing: deliver a pending cancel at the
        wait's outcome position, or unwind the suspended workflow."""
        if outcome is Suspension.CANCEL_REQUESTED:
            self._cancel_requested = True
            self._deliver_cancel(out_seq)
        self._engine.metrics.recorded(self._pending)
        self._pending = []
        self._suspended = True
        self._engine.on_suspended(self.instance_id, deadline)
        raise Suspended()

    async def _suspend(self, *, run_at: float, timer: tuple[int, float]) -> None:
        try:
            outcome = await self._engine.storage.suspend(
                self._lease, self._pending, now=self._engine.clock(), run_at=run_at, timer=timer
            )
        except (LeaseLost, StorageError) as exc:
            raise Abandon(exc) from exc
        if outcome is Suspension.CANCEL_REQUESTED:
            self._cancel_requested = True
            self._deliver_cancel(self._next())
        self._engine.metrics.recorded(self._pending)
        self._pending = []
        self._suspended = True
        self._engine.on_suspended(self.instance_id, run_at)
        raise Suspended()

    async def _run_compensations(self) -> list[dict[str, Any]]:
        """Run the registered compensations newest first; collect (not raise) their final errors."""
        self._compensating = True
        await self._flush()  # the status says "compensating" from the first compensation on
        errors = []
        for activity, args, kwargs in reversed(self._compensations):
            try:
                await self._activity(activity, args, kwargs, kind=StepKind.COMPENSATION)
            except Exception as exc:
                if isinstance(exc, NonDeterminismError):
                    raise
                errors.append({"activity": activity.name, **encode_error(exc)})
        return errors


def encode_body(
    outcome: dict[str, Any],
    started: float,
    finished: float,
    attempts: int,
    encoded_args: str,
    *,
    what: str,
    limit: int | None,
) -> str:
    """The history payload of an activity: its outcome, timing, attempts and (already encoded) input."""
    text = encode(
        {**outcome, "attempts": attempts, "started_at": started, "duration": finished - started},
        what=what,
        limit=limit,
    )
    return text[:-1] + ',"input":' + encoded_args + "}"


def _number(value: Any) -> float:
    """A recorded number (a time, a random value); anything else was not written by geste."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r:.80} is not a number")
    return float(value)


def _optional_number(value: Any) -> float | None:
    return None if value is None else _number(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r:.80} is not a string")
    return value


def _mode(value: Any) -> str:
    if value not in MODES:
        raise ValueError(f"{value!r:.80} is not a subscription mode")
    return str(value)


def _wait_body(body: Any) -> tuple[float | None, dict[str, Any] | None]:
    """The deadline and the match of a recorded ``wait_event`` row."""
    match = body["match"]
    if match is not None and not isinstance(match, dict):
        raise TypeError(f"match {match!r:.80} is not an object")
    return _optional_number(body["deadline"]), match


def _event(body: Any) -> Event:
    time = body.get("time")
    return Event(
        event_id=body["event_id"],
        type=body["type"],
        data=body.get("data"),
        source=body.get("source"),
        time=None if time is None else datetime.fromtimestamp(time, UTC),
        extensions=body.get("extensions") or {},
    )
