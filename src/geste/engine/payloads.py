"""Reading the payloads of recorded steps: what each step wrote, read back on a replay.

Each function takes the decoded payload of a row (``Journal.read`` decodes it and turns what these raise
into a corruption of the history) and returns what the workflow gets. Together they are the shapes the
steps write (``context`` and ``activities`` write them): the place a typed step format replaces.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from .._models import Event
from .._serde import decode_error
from .._validation import MODES


def number(value: Any) -> float:
    """A recorded number (a time, a random value); anything else was not written by geste."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r:.80} is not a number")
    return float(value)


def moment(value: Any) -> datetime:
    """The time a ``now`` row recorded."""
    return datetime.fromtimestamp(number(value), UTC)


def uuid4(value: Any) -> uuid.UUID:
    """The UUID a ``uuid`` row recorded."""
    return uuid.UUID(text(value))


def optional_number(value: Any) -> float | None:
    return None if value is None else number(value)


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r:.80} is not a string")
    return value


def mode(value: Any) -> str:
    if value not in MODES:
        raise ValueError(f"{value!r:.80} is not a subscription mode")
    return str(value)


def expires_at(body: Any) -> float:
    """When a recorded ``sleep`` ends."""
    return number(body["expires_at"])


def deadline(body: Any) -> float | None:
    """The deadline of a recorded ``receive`` (None: none)."""
    return optional_number(body["deadline"])


def wait_body(body: Any) -> tuple[float | None, dict[str, Any] | None]:
    """The deadline and the match of a recorded ``wait_event`` row."""
    match = body["match"]
    if match is not None and not isinstance(match, dict):
        raise TypeError(f"match {match!r:.80} is not an object")
    return optional_number(body["deadline"]), match


def event(body: Any) -> Event:
    """The event an ``event`` row recorded (the outcome of a ``wait_event``)."""
    time = body.get("time")
    return Event(
        event_id=body["event_id"],
        type=body["type"],
        data=body.get("data"),
        source=body.get("source"),
        time=None if time is None else datetime.fromtimestamp(time, UTC),
        extensions=body.get("extensions") or {},
    )


def event_id(body: Any) -> str:
    """The id of the event a ``send_event`` row sent."""
    return text(body["event_id"])


def message_id(body: Any) -> str:
    """The id of the message a ``publish`` or ``send_to`` row sent."""
    return text(body["message_id"])


def target_instance_id(body: Any) -> str:
    """The instance a ``send_to`` row recorded as missing."""
    return text(body["target_instance_id"])


def subscription_mode(body: Any) -> str:
    return mode(body["mode"])


def activity_result(body: Any) -> Any:
    """The (JSON) result an ``activity`` or ``compensation`` row recorded."""
    return body["result"]


def activity_error(body: Any) -> Exception:
    """The final error an ``activity`` or ``compensation`` row recorded, rebuilt."""
    return decode_error(body["error"])
