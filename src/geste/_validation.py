"""Argument and name validation: what every backend stores verbatim, and the names geste accepts.

A core module: it imports nothing of geste but the errors, so any layer may check its arguments with it.
"""

from __future__ import annotations

from typing import TypeGuard

from .errors import ConfigurationError

MAX_NAME_LENGTH = 200
"""Characters in a workflow, activity or event type name, and in a channel name."""
MAX_CHANNEL_LENGTH = MAX_NAME_LENGTH
MAX_EVENT_ATTRIBUTE_LENGTH = 1000
"""Characters in the type, source and subject of an event a workflow sends."""
MAX_EVENT_ID_LENGTH = 200

BROADCAST = "broadcast"
COMPETING = "competing"
MODES = (BROADCAST, COMPETING)
"""The subscription modes of a channel."""


def storable_text(value: str) -> bool:
    """Whether every backend stores ``value`` verbatim: no NUL (PostgreSQL refuses it), valid UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return "\x00" not in value


def _is_name(value: object) -> TypeGuard[str]:
    """A non-empty string, not only spaces, of at most 200 characters, stored verbatim."""
    return (
        isinstance(value, str)
        and bool(value.strip())
        and len(value) <= MAX_NAME_LENGTH
        and storable_text(value)
    )


def check_name(name: object, what: str) -> str:
    if not _is_name(name):
        raise ConfigurationError(
            f"{what} name must be a non-empty string of at most 200 characters (no NUL, valid UTF-8)"
        )
    return name


def check_channel(channel: object) -> str:
    """A channel name: any non-empty string of at most 200 characters that every backend stores verbatim."""
    if (
        not isinstance(channel, str)
        or not channel
        or len(channel) > MAX_CHANNEL_LENGTH
        or not storable_text(channel)
    ):
        raise ConfigurationError(
            f"a channel name must be a non-empty string of at most {MAX_CHANNEL_LENGTH} characters "
            f"(no NUL, valid UTF-8), not {channel!r:.80}"
        )
    return channel


def check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ConfigurationError(f"mode must be 'broadcast' or 'competing', not {mode!r:.80}")
    return str(mode)


_EVENT_TYPES: set[str] = set()
"""Event types accepted already (at most ``_EVENT_TYPES_KEPT``): a replay checks each wait's type again."""
_EVENT_TYPES_KEPT = 1024


def check_event_type(event_type: object) -> str:
    """The type a workflow waits for: what ``app.send_event`` accepts (``check_name``), since a type it
    refuses would be waited for forever."""
    if type(event_type) is str and event_type in _EVENT_TYPES:
        return event_type
    if not _is_name(event_type):
        raise TypeError(
            "event_type must be a non-empty string of at most 200 characters, not only spaces "
            "(no NUL, valid UTF-8)"
        )
    if len(_EVENT_TYPES) < _EVENT_TYPES_KEPT:
        _EVENT_TYPES.add(event_type)
    return event_type


def check_event_attribute(value: object, what: str) -> str:
    """The type, source or subject of an event a workflow sends through the outbox."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_EVENT_ATTRIBUTE_LENGTH
        or not storable_text(value)
    ):
        raise TypeError(f"{what} must be a non-empty string of at most 1000 characters (no NUL)")
    return value


def check_event_id(event_id: object) -> str:
    """The id a workflow gives an event it sends (by default ``<instance id>:<seq>``)."""
    if (
        not isinstance(event_id, str)
        or not event_id
        or len(event_id) > MAX_EVENT_ID_LENGTH
        or not storable_text(event_id)
    ):
        raise TypeError("event_id must be a non-empty string of at most 200 characters (no NUL)")
    return event_id


def check_instance_id(instance_id: object) -> str:
    """The instance a workflow sends a message to."""
    if not isinstance(instance_id, str) or not instance_id or not storable_text(instance_id):
        raise ConfigurationError("instance_id must be a non-empty string (no NUL, valid UTF-8)")
    return instance_id


MAX_ID_LENGTH = 200
"""The longest instance or worker id."""


MAX_STATE_KEY_LENGTH = 200


def check_state_key(key: object) -> str:
    """A state key (``ctx.set_state``, ``get_state``): a non-empty string of at most 200 characters that
    every backend stores verbatim (it goes into a NOTIFY payload too, whose limit is 8,000 bytes)."""
    if not isinstance(key, str) or not key or len(key) > MAX_STATE_KEY_LENGTH or not storable_text(key):
        raise ConfigurationError(
            f"a state key must be a non-empty string of at most {MAX_STATE_KEY_LENGTH} characters "
            f"(no NUL, valid UTF-8), not {key!r:.80}"
        )
    return key


def check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH or not storable_text(value):
        raise ConfigurationError(
            f"{what} must be a non-empty string of at most {MAX_ID_LENGTH} characters (no NUL, valid UTF-8)"
        )
    return value


def findable(value: object, what: str) -> bool:
    """Whether ``value`` can be the id or name of a stored row. A non-string is the caller's mistake; a
    string no backend stores (NUL, a lone surrogate) names nothing, and is not sent to the database,
    where it would fail as a driver error (a StorageError on PostgreSQL, a UnicodeEncodeError from
    sqlite3) rather than find nothing."""
    if not isinstance(value, str):
        raise ConfigurationError(f"{what} must be a string, not {type(value).__name__}")
    return storable_text(value)


def check_stream_key(key: object) -> str:
    """A stream key: a non-empty string of at most 200 characters that every backend stores verbatim."""
    if not isinstance(key, str) or not key or len(key) > MAX_CHANNEL_LENGTH or not storable_text(key):
        raise ConfigurationError(
            f"a stream key must be a non-empty string of at most {MAX_CHANNEL_LENGTH} characters "
            f"(no NUL, valid UTF-8), not {key!r:.80}"
        )
    return key


def check_position(start: object) -> int:
    """A position in a stream to read from: an int >= 0."""
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ConfigurationError(f"start must be a position, an int >= 0, not {start!r:.80}")
    return start
