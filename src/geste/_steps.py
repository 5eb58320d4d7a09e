"""The history format: what each kind of step writes in the payload of its history row, and reads back.

A history row is ``(seq, kind, name, payload, is_error, created_at)`` (``storage.base.HistoryRow``); its
``payload`` is JSON text whose shape depends on the row's kind (``StepKind``). Each kind has one frozen
dataclass here: ``encode()`` writes its payload (the text geste has always written, byte for byte) and
the classmethods ``decode`` (from the payload text) and ``from_json`` (from the payload already decoded)
read it back, checking it is the shape geste writes. The row's ``name`` (an activity's name, an event's
type, a channel) is not in the payload and stays on the row.

``decode_step`` reads a row as its kind's step and is the one place that turns a row geste cannot read
(an unknown kind, a payload that is not JSON or not its step's shape) into ``HistoryCorruptedError``;
``read_row`` checks only the kind and the JSON (what the operator's view of a history needs) and
``step_or_none`` is the lenient reading of displays (None for a row of the wrong shape).

Payloads by kind (compact JSON; ``…`` stands for a JSON value):

- ``activity``, ``compensation``: ``{"result": …, "attempts": n, "started_at": t, "duration": s,
  "input": {"args": […], "kwargs": {…}}}``, with ``"error": {…}`` instead of ``"result"`` when
  ``is_error`` (``_serde.encode_error``'s form)
- ``sleep``: ``{"seconds": s, "expires_at": t}``
- ``wait_event``: ``{"match": {…} | null, "timeout": s | null, "deadline": t | null}``
- ``event``: ``{"event_id", "type", "source", "time", "extensions": {…} | null, "data": …}``
- ``event_timeout``, ``receive_timeout`` (``is_error``), ``cancelled``: no payload (NULL); a child
  cancelled by its parent's end: ``cancelled`` with ``{"by_parent": id}``
- ``subscribe``: ``{"mode": "broadcast" | "competing"}``, plus ``"implicit": true`` for a first receive's
- ``receive``: ``{"timeout": s | null, "deadline": t | null}``
- ``message``: ``{"message_id", "channel", "sender_instance_id", "published_at", "direct", "data": …}``
- ``publish``, ``send_to``: ``{"message_id": …, "target_instance_id": … | null}`` (``is_error`` with a
  null ``message_id`` when the target instance does not exist)
- ``now``, ``random``: a number; ``uuid``: a string
- ``send_event``: ``{"event_id", "type", "source", "subject"}``
- ``start_child`` (the row's name is the child's workflow): ``{"child_id", "parent_close"}``; ``is_error``
  with an ``"error"`` text when the id belonged to another instance already
- ``child`` (the row's name is the child's id): ``{"workflow", "status", "result": …, "error": {…} | null}``,
  ``is_error`` unless the child completed
- ``continue_as_new``: ``{"input": {"args": […], "kwargs": {…}}}``, the next run's input (the last row of
  a run kept in ``geste_run_history``; never in ``geste_history``)
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol, Self

from ._channels import Message
from ._models import Event, HistoryEntry, StepKind
from ._serde import encode, loads
from ._validation import MODES  # the subscription modes a ``subscribe`` row records
from .errors import ActivityCancelled, HistoryCorruptedError

_new = object.__new__

UNREADABLE = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    OSError,
    RecursionError,
)
"""What reading a payload raises when it is not what its step wrote (JSONDecodeError is a ValueError; a
missing key, a list for an object, a string for a number, a time out of range...)."""


class RawJSON(str):
    """JSON text already encoded (an activity's arguments, an event's or a message's data): a step writes
    it into its payload as it is, neither decoded nor encoded again."""

    __slots__ = ()


class Row(Protocol):
    """What ``decode_step`` reads of a history row (``storage.base.HistoryRow`` has it)."""

    @property
    def seq(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def payload(self) -> str | None: ...
    @property
    def is_error(self) -> bool: ...


# -- checks of the decoded payload ------------------------------------------------------------------------
def _object(body: Any) -> dict[str, Any]:
    if type(body) is not dict:
        raise TypeError(f"the payload {body!r:.80} is not an object")
    return body


_NUMBERS = (float, int)
"""The types of a recorded number (``type(value) in _NUMBERS``: not a bool)."""


def _number(value: Any) -> float:
    """A recorded number, kept as stored (an int stays an int): a bool or anything else is refused."""
    if type(value) is float or type(value) is int:
        return value
    raise TypeError(f"{value!r:.80} is not a number")


def _optional_number(value: Any) -> float | None:
    return None if value is None else _number(value)


def _time(value: Any) -> float:
    """A recorded Unix time: a number that is a moment (``datetime.fromtimestamp`` takes it)."""
    datetime.fromtimestamp(_number(value), UTC)
    return value  # type: ignore[no-any-return]


def _optional_time(value: Any) -> float | None:
    return None if value is None else _time(value)


def _text(value: Any) -> str:
    if type(value) is not str:
        raise TypeError(f"{value!r:.80} is not a string")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _optional_object(value: Any, what: str) -> dict[str, Any] | None:
    if value is not None and type(value) is not dict:
        raise TypeError(f"{what} {value!r:.80} is not an object")
    return value


def _nothing(body: Any) -> None:
    if body is not None:
        raise ValueError(f"the payload {body!r:.80} should be null")


def _json(payload: str | None) -> Any:
    return None if payload is None else loads(payload)


def _with_data(head: dict[str, Any], data: str) -> str:
    """``head`` as compact JSON with a last key ``data`` whose value is JSON text already (not re-encoded)."""
    return json.dumps(head, separators=(",", ":"))[:-1] + ',"data":' + data + "}"


def _raw(value: Any, what: str) -> str:
    return value if type(value) is RawJSON else encode(value, what=what)


class _Payload:
    """What every step has: ``decode`` reads the payload text through the step's ``from_json``."""

    __slots__ = ()

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        """The step whose payload decodes to ``body`` (a row's ``is_error`` says which outcome an
        activity or a send_to records); raises one of ``UNREADABLE`` if it is not that shape."""
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: str | None, *, is_error: bool = False) -> Self:
        """The step whose payload is the text ``payload``; raises one of ``UNREADABLE`` if it is not."""
        return cls.from_json(_json(payload), is_error=is_error)


class _NoPayload(_Payload):
    """A step that writes no payload (NULL): a timeout, a cancellation."""

    __slots__ = ()

    def encode(self) -> str | None:
        """The payload: none (NULL), the ``payload`` of the row as other steps' ``encode`` give it."""
        return None

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        _nothing(body)
        return cls()


# -- activities ------------------------------------------------------------------------------------------
ACTIVITY_CANCELLED = f"{ActivityCancelled.__module__}.{ActivityCancelled.__qualname__}"
"""The recorded error type of an activity step a cancel cut short (``_serde.encode_error``)."""


@dataclass(frozen=True, slots=True)
class ActivityStep(_Payload):
    """An activity's outcome: its ``result``, or its recorded ``error`` (then the row is ``is_error``),
    after ``attempts`` attempts that began at ``started_at`` and took ``duration`` seconds in all;
    ``input`` is its recorded ``{"args": [...], "kwargs": {...}}`` (a ``RawJSON`` text when written)."""

    kind: ClassVar[StepKind] = StepKind.ACTIVITY
    result: Any
    error: dict[str, Any] | None
    attempts: int
    started_at: float
    duration: float
    input: Any

    @property
    def is_error(self) -> bool:
        return self.error is not None

    @property
    def cancelled(self) -> bool:
        """The outcome of an attempt a cancel of the workflow (or its deadline) cut short: its recorded
        error is ``ActivityCancelled``, which is no failure of the activity (shown as cancelled)."""
        error = self.error
        return error is not None and error.get("type") == ACTIVITY_CANCELLED

    def encode(self, *, what: str = "activity outcome", limit: int | None = None) -> str:
        """The payload; ``what`` and ``limit`` apply to the outcome (the input was checked when encoded)."""
        return activity_payload(
            self.result,
            self.error,
            self.attempts,
            self.started_at,
            self.duration,
            _raw(self.input, "activity input"),
            what=what,
            limit=limit,
        )

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        # the checks of _object and _number inline (the hot path: every activity is read back), the
        # helpers called only to raise
        if type(body) is not dict:
            _object(body)
        if is_error:
            result, error = None, _optional_object(body["error"], "error")
            if error is None:
                raise TypeError("the error of a failed step is null")
        else:
            result, error = body["result"], None
        attempts = body["attempts"]
        if type(attempts) is not int:
            raise TypeError(f"attempts {attempts!r:.80} is not an integer")
        started_at, duration = body["started_at"], body["duration"]
        if type(started_at) not in _NUMBERS or type(duration) not in _NUMBERS:
            _number(started_at), _number(duration)
        # built as __init__ builds it, without its object.__setattr__ per field (twice as fast)
        step = _new(cls)
        _set_result(step, result)
        _set_error(step, error)
        _set_attempts(step, attempts)
        _set_started_at(step, started_at)
        _set_duration(step, duration)
        _set_input(step, body["input"])
        return step


_set_result, _set_error, _set_attempts, _set_started_at, _set_duration, _set_input = (
    getattr(ActivityStep, field.name).__set__ for field in fields(ActivityStep)
)
"""The slots of ActivityStep (a CompensationStep's too) as ActivityStep.from_json fills them."""


def activity_payload(
    result: Any,
    error: dict[str, Any] | None,
    attempts: int,
    started_at: float,
    duration: float,
    input_json: str,
    *,
    what: str,
    limit: int | None,
) -> str:
    """The payload ``ActivityStep.encode`` writes (of a compensation too), without building the step:
    the engine writes one per activity it runs, ``input_json`` the text of its recorded arguments."""
    if error is None:
        body = {"result": result, "attempts": attempts, "started_at": started_at, "duration": duration}
    else:
        body = {"error": error, "attempts": attempts, "started_at": started_at, "duration": duration}
    return encode(body, what=what, limit=limit)[:-1] + ',"input":' + input_json + "}"


@dataclass(frozen=True, slots=True)
class CompensationStep(ActivityStep):
    """A compensation's outcome: the shape of an activity's."""

    kind: ClassVar[StepKind] = StepKind.COMPENSATION


# -- timers and events -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SleepStep(_Payload):
    """A durable sleep of ``seconds``, due at ``expires_at``."""

    kind: ClassVar[StepKind] = StepKind.SLEEP
    seconds: float
    expires_at: float

    def encode(self) -> str:
        return encode({"seconds": self.seconds, "expires_at": self.expires_at}, what="sleep")

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        body = _object(body)
        return cls(_number(body["seconds"]), _number(body["expires_at"]))


@dataclass(frozen=True, slots=True)
class WaitEventStep(_Payload):
    """The start of a wait for an event (the row's name is its type) whose data has ``match``; it times
    out at ``deadline`` (``timeout`` seconds after it began), or never."""

    kind: ClassVar[StepKind] = StepKind.WAIT_EVENT
    match: dict[str, Any] | None
    timeout: float | None
    deadline: float | None

    def encode(self, *, limit: int | None = None) -> str:
        """The payload; ``limit`` bounds it (the match is the user's)."""
        body = {"match": self.match, "timeout": self.timeout, "deadline": self.deadline}
        return encode(body, what="event match", limit=limit)

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        # the checks inline, the helpers called only to raise (every replayed wait is read here)
        if type(body) is not dict:
            _object(body)
        match, timeout, deadline = body["match"], body.get("timeout"), body["deadline"]
        if match is not None and type(match) is not dict:
            _optional_object(match, "match")
        if timeout is not None and type(timeout) not in _NUMBERS:
            _number(timeout)
        if deadline is not None and type(deadline) not in _NUMBERS:
            _number(deadline)
        step = _new(cls)
        _set_wait_match(step, match)
        _set_wait_timeout(step, timeout)
        _set_wait_deadline(step, deadline)
        return step


_set_wait_match, _set_wait_timeout, _set_wait_deadline = (
    getattr(WaitEventStep, field.name).__set__ for field in fields(WaitEventStep)
)


@dataclass(frozen=True, slots=True)
class EventStep(_Payload):
    """The event a wait took (the row's name is its type). ``data`` is a ``RawJSON`` text when written
    from the stored event; ``time`` is when it was sent (Unix seconds)."""

    kind: ClassVar[StepKind] = StepKind.EVENT
    event_id: str
    type: str
    source: str | None
    time: float | None
    extensions: dict[str, Any] | None
    data: Any

    def encode(self) -> str:
        head = {
            "event_id": self.event_id,
            "type": self.type,
            "source": self.source,
            "time": self.time,
            "extensions": self.extensions,
        }
        return _with_data(head, _raw(self.data, "event data"))

    def event(self) -> Event:
        """The ``Event`` that ``ctx.wait_event`` returns (built as ``Event.__init__`` builds it, without its
        ``object.__setattr__`` per field: every replayed event is built here)."""
        event = _new(Event)
        _set_event_id(event, self.event_id)
        _set_event_type(event, self.type)
        _set_event_data(event, self.data)
        _set_event_source(event, self.source)
        _set_event_time(event, None if self.time is None else _fromtimestamp(self.time, UTC))
        _set_event_extensions(event, self.extensions or {})
        return event

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        # the checks of _object, _text, _optional_time and _optional_object inline (every replayed event
        # is read here), the helpers called only to raise; built as ActivityStep.from_json builds it
        if type(body) is not dict:
            _object(body)
        event_id, event_type = body["event_id"], body["type"]
        if type(event_id) is not str or type(event_type) is not str:
            _text(event_id), _text(event_type)
        source, time, extensions = body.get("source"), body.get("time"), body.get("extensions")
        if source is not None and type(source) is not str:
            _text(source)
        if time is not None:
            _time(time)
        if extensions is not None and type(extensions) is not dict:
            _optional_object(extensions, "extensions")
        step = _new(cls)
        _set_step_event_id(step, event_id)
        _set_step_type(step, event_type)
        _set_step_source(step, source)
        _set_step_time(step, time)
        _set_step_extensions(step, extensions)
        _set_step_data(step, body.get("data"))
        return step


_fromtimestamp = datetime.fromtimestamp
_set_step_event_id, _set_step_type, _set_step_source, _set_step_time, _set_step_extensions, _set_step_data = (
    getattr(EventStep, field.name).__set__ for field in fields(EventStep)
)
_set_event_id, _set_event_type, _set_event_data, _set_event_source, _set_event_time, _set_event_extensions = (
    getattr(Event, field.name).__set__ for field in fields(Event)
)
"""The slots of EventStep and of Event, in their fields' order, as EventStep fills them."""


class StoredEventFields(Protocol):
    """What ``event_history_payload`` reads of a stored event (``storage.base.StoredEvent`` has it)."""

    @property
    def event_id(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def source(self) -> str | None: ...
    @property
    def created_at(self) -> float: ...
    @property
    def extensions(self) -> str | None: ...
    @property
    def data(self) -> str: ...


def event_history_payload(event: StoredEventFields) -> str:
    """The ``event`` payload of a stored event (what ``EventStep.encode`` writes for it), without
    building the step: its ``data`` is JSON text already and is inlined as such."""
    head = {
        "event_id": event.event_id,
        "type": event.event_type,
        "source": event.source,
        "time": event.created_at,
        "extensions": None if event.extensions is None else json.loads(event.extensions),
    }
    return _with_data(head, event.data)


@dataclass(frozen=True, slots=True)
class EventTimeoutStep(_NoPayload):
    """A wait for an event that timed out (the row is ``is_error``; no payload)."""

    kind: ClassVar[StepKind] = StepKind.EVENT_TIMEOUT


@dataclass(frozen=True, slots=True)
class PatchStep(_NoPayload):
    """A patch marker (``ctx.patched``): the run took the patched branch of the id (the row's name)."""

    kind: ClassVar[StepKind] = StepKind.PATCH


# -- channels --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SubscribeStep(_Payload):
    """A subscription to a channel (the row's name) in ``mode``; ``implicit`` when a first ``receive``
    made it."""

    kind: ClassVar[StepKind] = StepKind.SUBSCRIBE
    mode: str
    implicit: bool = False

    def encode(self) -> str:
        body = {"mode": self.mode, "implicit": True} if self.implicit else {"mode": self.mode}
        return encode(body, what="subscription")

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        body = _object(body)
        mode = body["mode"]
        if mode not in MODES:
            raise ValueError(f"{mode!r:.80} is not a subscription mode")
        implicit = body.get("implicit", False)
        if type(implicit) is not bool:
            raise TypeError(f"implicit {implicit!r:.80} is not a boolean")
        return cls(mode, implicit)


@dataclass(frozen=True, slots=True)
class ReceiveStep(_Payload):
    """The start of a wait for a message on a channel (the row's name); it times out at ``deadline``
    (``timeout`` seconds after it began), or never."""

    kind: ClassVar[StepKind] = StepKind.RECEIVE
    timeout: float | None
    deadline: float | None

    def encode(self) -> str:
        return encode({"timeout": self.timeout, "deadline": self.deadline}, what="receive")

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        body = _object(body)
        return cls(_optional_number(body.get("timeout")), _optional_number(body["deadline"]))


@dataclass(frozen=True, slots=True)
class MessageStep(_Payload):
    """The message a receive took on a channel (the row's name): published at ``published_at`` by
    ``sender_instance_id`` (None from outside a workflow), ``direct`` when sent to this instance only.
    ``data`` is a ``RawJSON`` text when written from the stored message."""

    kind: ClassVar[StepKind] = StepKind.MESSAGE
    message_id: str
    channel: str
    sender_instance_id: str | None
    published_at: float
    direct: bool
    data: Any

    def encode(self) -> str:
        head = {
            "message_id": self.message_id,
            "channel": self.channel,
            "sender_instance_id": self.sender_instance_id,
            "published_at": self.published_at,
            "direct": self.direct,
        }
        return _with_data(head, _raw(self.data, "message data"))

    def message(self) -> Message:
        """The ``Message`` that ``ctx.receive`` returns."""
        return Message(
            self.message_id,
            self.channel,
            self.data,
            self.sender_instance_id,
            datetime.fromtimestamp(self.published_at, UTC),
            self.direct,
        )

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        body = _object(body)
        return cls(
            _text(body["message_id"]),
            _text(body["channel"]),
            _optional_text(body.get("sender_instance_id")),
            _time(body["published_at"]),
            bool(body.get("direct")),
            body.get("data"),
        )


class StoredMessageFields(Protocol):
    """What ``message_history_payload`` reads of a stored message (``storage.base.StoredMessage``)."""

    @property
    def message_id(self) -> str: ...
    @property
    def channel(self) -> str: ...
    @property
    def sender_instance_id(self) -> str | None: ...
    @property
    def target_instance_id(self) -> str | None: ...
    @property
    def created_at(self) -> float: ...
    @property
    def data(self) -> str: ...


def message_history_payload(message: StoredMessageFields) -> str:
    """The ``message`` payload of a stored message (what ``MessageStep.encode`` writes for it), without
    building the step: its ``data`` is JSON text already and is inlined as such."""
    head = {
        "message_id": message.message_id,
        "channel": message.channel,
        "sender_instance_id": message.sender_instance_id,
        "published_at": message.created_at,
        "direct": message.target_instance_id is not None,
    }
    return _with_data(head, message.data)


@dataclass(frozen=True, slots=True)
class ReceiveTimeoutStep(_NoPayload):
    """A wait for a message that timed out (the row is ``is_error``; no payload)."""

    kind: ClassVar[StepKind] = StepKind.RECEIVE_TIMEOUT


@dataclass(frozen=True, slots=True)
class PublishStep(_Payload):
    """A message published on a channel (the row's name): its ``message_id``, and the instance it was
    sent to (``send_to``). A ``send_to`` whose target does not exist records a null ``message_id`` in
    a row that ``is_error``."""

    kind: ClassVar[StepKind] = StepKind.PUBLISH
    message_id: str | None
    target_instance_id: str | None

    @property
    def is_error(self) -> bool:
        return self.message_id is None

    def encode(self) -> str:
        body = {"message_id": self.message_id, "target_instance_id": self.target_instance_id}
        return encode(body, what="message")

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        body = _object(body)
        if is_error:
            return cls(_optional_text(body.get("message_id")), _text(body["target_instance_id"]))
        return cls(_text(body["message_id"]), _optional_text(body.get("target_instance_id")))


@dataclass(frozen=True, slots=True)
class SendToStep(PublishStep):
    """A message sent to one instance: the shape of a publication's."""

    kind: ClassVar[StepKind] = StepKind.SEND_TO


# -- recorded values -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NowStep(_Payload):
    """``ctx.now()``: the time it returned (Unix seconds)."""

    kind: ClassVar[StepKind] = StepKind.NOW
    value: float

    def encode(self) -> str:
        return encode(self.value, what="now")

    def moment(self) -> datetime:
        return datetime.fromtimestamp(self.value, UTC)

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        return cls(_time(body))


@dataclass(frozen=True, slots=True)
class SetStateStep(_Payload):
    """``ctx.set_state``: a value published under a key (the row's name). The value itself is stored
    with its version in ``geste_state`` by the same transaction; the row keeps its encoded size."""

    kind: ClassVar[StepKind] = StepKind.SET_STATE
    size: int

    def encode(self) -> str:
        return encode({"size": self.size}, what="set_state")

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        size = _object(body)["size"]
        if type(size) is not int:
            raise TypeError(f"size {size!r:.80} is not an integer")
        return cls(size)


@dataclass(frozen=True, slots=True)
class UuidStep(_Payload):
    """``ctx.uuid4()``: the UUID it returned."""

    kind: ClassVar[StepKind] = StepKind.UUID
    value: uuid.UUID

    def encode(self) -> str:
        return encode(str(self.value), what="uuid")

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        return cls(uuid.UUID(_text(body)))


@dataclass(frozen=True, slots=True)
class RandomStep(_Payload):
    """``ctx.random()``: the number it returned."""

    kind: ClassVar[StepKind] = StepKind.RANDOM
    value: float

    def encode(self) -> str:
        return encode(self.value, what="random")

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        return cls(_number(body))


@dataclass(frozen=True, slots=True)
class CancelledStep(_Payload):
    """Where the cancellation was delivered: no payload (NULL), or ``{"by_parent": id}`` for a child
    workflow cancelled by its parent's end (``ParentClose.CANCEL``)."""

    kind: ClassVar[StepKind] = StepKind.CANCELLED
    by_parent: str | None = None

    def encode(self) -> str | None:
        return None if self.by_parent is None else encode({"by_parent": self.by_parent}, what="cancelled")

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        if body is None:
            return cls()
        return cls(_text(_object(body)["by_parent"]))


@dataclass(frozen=True, slots=True)
class SendEventStep(_Payload):
    """An event emitted through the outbox (the row's name is its type): its id, source and subject."""

    kind: ClassVar[StepKind] = StepKind.SEND_EVENT
    event_id: str
    type: str
    source: str
    subject: str | None

    def encode(self) -> str:
        body = {"event_id": self.event_id, "type": self.type, "source": self.source, "subject": self.subject}
        return encode(body, what="event")

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        body = _object(body)
        return cls(
            _text(body["event_id"]),
            _text(body["type"]),
            _text(body["source"]),
            _optional_text(body.get("subject")),
        )


@dataclass(frozen=True, slots=True)
class ContinueAsNewStep(_Payload):
    """The end of a run by ``ctx.continue_as_new`` (the row's name is the workflow's): the next run's
    ``input``, ``{"args": [...], "kwargs": {...}}`` (a ``RawJSON`` text when written)."""

    kind: ClassVar[StepKind] = StepKind.CONTINUE_AS_NEW
    input: Any

    def encode(self) -> str:
        return '{"input":' + _raw(self.input, "input") + "}"

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        body = _object(body)
        recorded = _object(body["input"])
        if type(recorded.get("args", [])) is not list or type(recorded.get("kwargs", {})) is not dict:
            raise TypeError(f"the input {recorded!r:.80} is not {{'args': [...], 'kwargs': {{...}}}}")
        return cls(recorded)


# -- child workflows -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StartChildStep(_Payload):
    """``ctx.start_child``: the id of the child it created (the row's name is the child's workflow) and
    what the parent's end does to it; ``error`` (an ``is_error`` row) when that id was another's, or, with
    ``dedup`` (``[queue, dedup_id, holder]``, schema 20), when its queue's dedup id was held."""

    kind: ClassVar[StepKind] = StepKind.START_CHILD
    child_id: str
    parent_close: str
    error: str | None = None
    dedup: tuple[str, str, str] | None = None

    def encode(self) -> str:
        body: dict[str, Any] = {"child_id": self.child_id, "parent_close": self.parent_close}
        if self.error is not None:
            body["error"] = self.error
        if self.dedup is not None:
            body["dedup"] = list(self.dedup)
        return encode(body, what="child")

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        body = _object(body)
        error = _text(body["error"]) if is_error else None
        dedup = None
        if is_error and body.get("dedup") is not None:
            found = body["dedup"]
            if not isinstance(found, list) or len(found) != 3:
                raise TypeError(f"a start_child row's dedup is [queue, dedup_id, holder], not {found!r:.80}")
            dedup = (_text(found[0]), _text(found[1]), _text(found[2]))
        return cls(_text(body["child_id"]), _text(body["parent_close"]), error, dedup)


@dataclass(frozen=True, slots=True)
class ChildStep(_Payload):
    """The end of an awaited child (the row's name is its id): its workflow, final status, and its result
    (``RawJSON`` when written from the stored one) or error."""

    kind: ClassVar[StepKind] = StepKind.CHILD
    workflow: str
    status: str
    result: Any
    error: dict[str, Any] | None

    @property
    def is_error(self) -> bool:
        return self.status != "completed"

    def encode(self) -> str:
        head = json.dumps(
            {"workflow": self.workflow, "status": self.status, "error": self.error}, separators=(",", ":")
        )
        return head[:-1] + ',"result":' + _raw(self.result, "child result") + "}"

    @classmethod
    def from_json(cls, body: Any, *, is_error: bool = False) -> Self:
        body = _object(body)
        return cls(
            _text(body["workflow"]),
            _text(body["status"]),
            body.get("result"),
            _optional_object(body.get("error"), "error"),
        )


# -- rows ------------------------------------------------------------------------------------------------
Step = (
    ActivityStep
    | CompensationStep
    | SleepStep
    | WaitEventStep
    | EventStep
    | EventTimeoutStep
    | SubscribeStep
    | ReceiveStep
    | MessageStep
    | ReceiveTimeoutStep
    | PublishStep
    | SendToStep
    | NowStep
    | UuidStep
    | RandomStep
    | CancelledStep
    | SendEventStep
    | ContinueAsNewStep
    | StartChildStep
    | ChildStep
    | SetStateStep
    | PatchStep
)
"""The typed payload of a history row, one class per ``StepKind``."""

STEPS: dict[str, type[Step]] = {
    cls.kind.value: cls
    for cls in (
        ActivityStep,
        CompensationStep,
        SleepStep,
        WaitEventStep,
        EventStep,
        EventTimeoutStep,
        SubscribeStep,
        ReceiveStep,
        MessageStep,
        ReceiveTimeoutStep,
        PublishStep,
        SendToStep,
        NowStep,
        UuidStep,
        RandomStep,
        CancelledStep,
        SendEventStep,
        ContinueAsNewStep,
        StartChildStep,
        ChildStep,
        SetStateStep,
        PatchStep,
    )
}
"""The step class of each kind (by its stored value)."""


def _unreadable(row: Row, instance_id: str, exc: BaseException) -> HistoryCorruptedError:
    problem = f"{row.kind} {row.name!r:.80} row unreadable ({type(exc).__name__}: {exc!s:.200})"
    return HistoryCorruptedError(instance_id, row.seq, problem)


def _step_class(row: Row, instance_id: str) -> type[Step]:
    cls = STEPS.get(row.kind)
    if cls is None:
        raise HistoryCorruptedError(instance_id, row.seq, f"unknown step kind {row.kind!r:.80}")
    return cls


def decode_step(row: Row, *, instance_id: str) -> Step:
    """The step a history row of ``instance_id`` records. A row that is not what geste writes (an
    unknown kind, a payload that is not JSON or not its step's shape) raises ``HistoryCorruptedError``
    naming the row's position and what is wrong with it."""
    cls = STEPS.get(row.kind)  # _step_class and _json inline: every replayed step is read here
    if cls is None:
        raise HistoryCorruptedError(instance_id, row.seq, f"unknown step kind {row.kind!r:.80}")
    payload = row.payload
    try:
        return cls.from_json(None if payload is None else loads(payload), is_error=row.is_error)
    except UNREADABLE as exc:
        raise _unreadable(row, instance_id, exc) from exc


def read_row(row: Row, *, instance_id: str) -> tuple[StepKind, Any]:
    """A row's kind and decoded payload, its shape unchecked; an unknown kind or a payload that is not
    JSON raises ``HistoryCorruptedError`` as ``decode_step`` does (the operator's view of a history)."""
    cls = _step_class(row, instance_id)
    try:
        return cls.kind, _json(row.payload)
    except (ValueError, RecursionError) as exc:
        raise _unreadable(row, instance_id, exc) from exc


def step_or_none(kind: str, body: Any, *, is_error: bool) -> Step | None:
    """The step of a row of ``kind`` whose payload decodes to ``body``; None for an unknown kind or a
    payload of another shape (for displays, which show such a row as it is rather than fail)."""
    cls = STEPS.get(kind)
    if cls is None:
        return None
    try:
        return cls.from_json(body, is_error=is_error)
    except UNREADABLE:
        return None


def entry_step(entry: HistoryEntry) -> Step | None:
    """The typed step of a ``HistoryEntry`` (``App.history()``), or None if its payload is not its
    kind's shape (a row changed by hand)."""
    return step_or_none(entry.kind, entry.payload, is_error=entry.is_error)


# -- history documents -----------------------------------------------------------------------------------
def document_payload(payload: str | None) -> dict[str, Any]:
    """A payload in a history document (``_histories``): ``{"payload": <its JSON value>}``, or
    ``{"payload_text": <the text>}`` when it is not JSON (a row changed by hand, kept for the replay
    check to report)."""
    try:
        return {"payload": _json(payload)}
    except (ValueError, RecursionError):
        return {"payload_text": payload}


def payload_from_document(value: Any) -> str | None:
    """The payload text of a document's ``"payload"`` value (compact JSON, as geste writes it)."""
    return None if value is None else json.dumps(value, separators=(",", ":"))
