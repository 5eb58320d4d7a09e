"""Which events a wait's ``match`` accepts, decided by one rule on both backends, and the keys that let
the database find them by index.

**The rule.** A match accepts an event when the event's data is a JSON object that has every top-level key
of the match with an *equal JSON value*; an empty or missing match accepts every event of the type. Two
JSON values are equal when they are of the same JSON type and:

- strings: the same code points;
- numbers: the same value, as Python reads JSON (integers exactly, other numbers as IEEE-754 doubles):
  ``1``, ``1.0`` and ``1e0`` are equal, ``0.1`` and ``0.10000000000000001`` (the same double) too;
- ``true``, ``false``, ``null``: themselves only; ``true`` is not ``1``, ``false`` is not ``0``;
- arrays: the same length, equal elements in order;
- objects: the same keys, equal values (key order does not count).

Python's ``==`` decided before (schema 11 and older), which also made ``true`` equal ``1``. The rule is
written as one function, ``canonical``: two values are equal exactly when their canonical texts are
equal. Everything below is built on it, so a match decided in Python (SQLite, the recheck of a candidate)
and one decided by comparing texts in SQL (PostgreSQL) cannot disagree.

**The keys.** A top-level ``key: value`` pair of an event type has a 64-bit *match key*, a hash of the type
and the pair's canonical text. An event is indexed under the key of each of its top-level pairs
(``geste_event_keys``); a wait under one key only (``geste_event_waits.match_key``): the key of one pair of
its match (``indexed_pair``), or the type's own key when it has no match. An event that a wait's match
accepts has every pair of that match, so it has the pair the wait is indexed by: a send that looks its
waits up by all its keys finds every wait that may accept it, and a wait that looks events up by its one
key finds every event it may accept. A hash collision only adds a candidate, which the exact comparison
of pairs (the canonical texts) then rejects.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_CANONICAL = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), sort_keys=True, allow_nan=False)

WIDE_EVENT_PAIRS = 16
"""An event with more top-level pairs than this takes one exclusive lock per event type on PostgreSQL
instead of a shared lock per pair (``EventKeys.wide``): a bounded number of advisory locks per send (at
most 18), in a lock table the whole cluster shares (``max_locks_per_transaction`` times the connections)."""


def _normal(value: Any) -> Any:
    """``value`` with every integral float made an int (``1.0`` → ``1``), so that equal numbers encode
    alike; booleans stay booleans (``True`` is an int to Python, not to JSON)."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {key: _normal(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_normal(item) for item in value]
    return value


def canonical(value: Any) -> str:
    """The canonical JSON text of a decoded JSON value: two values are equal under the matching rule
    exactly when their canonical texts are equal (sorted keys, no spaces, ASCII escapes, integral numbers
    as integers, other numbers as Python's shortest round-trip form)."""
    return _CANONICAL.encode(_normal(value))


def pair_text(key: str, value: Any) -> str:
    """The canonical text of one top-level pair: the key as a JSON string, a colon, the value's canonical
    text. Unambiguous (a JSON string ends at its closing quote), so equal texts mean equal pairs."""
    return f"{_CANONICAL.encode(key)}:{canonical(value)}"


def _key(tag: bytes, event_type: str, text: str) -> int:
    digest = hashlib.blake2b(digest_size=8, person=b"geste-match")
    digest.update(tag)
    digest.update(_CANONICAL.encode(event_type).encode("ascii"))
    digest.update(b"\x00")
    digest.update(text.encode("ascii"))
    return int.from_bytes(digest.digest(), "big", signed=True)


def pair_key(event_type: str, text: str) -> int:
    """The match key (a signed 64-bit integer: a ``bigint``) of a pair, given by its ``pair_text``."""
    return _key(b"P", event_type, text)


def type_key(event_type: str) -> int:
    """The match key of the waits of ``event_type`` that have no match (they accept every event)."""
    return _key(b"T", event_type, "")


@dataclass(frozen=True, slots=True)
class EventKeys:
    """What an event is found and locked by: its pairs' canonical texts (sorted), their keys (sorted,
    without duplicates: two pairs whose hashes collide share one), and the type's key."""

    pairs: tuple[str, ...]
    keys: tuple[int, ...]
    type_key: int

    @property
    def wide(self) -> bool:
        """Too many pairs for one shared lock each (``WIDE_EVENT_PAIRS``)."""
        return len(self.keys) > WIDE_EVENT_PAIRS

    @property
    def lookup(self) -> list[int]:
        """The keys of the waits that may accept the event: the type's (waits without a match) and each
        pair's."""
        return [self.type_key, *self.keys]


def event_keys(event_type: str, data: Any) -> EventKeys:
    """The keys of an event whose data (decoded) is ``data``: one per top-level pair of an object."""
    pairs = sorted(pair_text(key, value) for key, value in data.items()) if isinstance(data, dict) else []
    keys = sorted({pair_key(event_type, text) for text in pairs})
    return EventKeys(tuple(pairs), tuple(keys), type_key(event_type))


@dataclass(frozen=True, slots=True)
class WaitKey:
    """What a wait is indexed and locked by: one key (``indexed_pair``'s, or the type's), and the
    canonical texts of all its pairs, which an event must all have (sorted; empty: no match)."""

    key: int
    pairs: tuple[str, ...]
    indexed: str | None
    """The pair text the key is of; None: the type's key (no match)."""


def indexed_pair(match: Mapping[str, Any]) -> str:
    """The key of ``match`` whose pair indexes the wait. Any pair would be correct (an accepted event has
    them all); this one decides how many waits of the type share the wait's key, so it prefers a value
    that can tell many instances apart: not ``true``, ``false`` or ``null`` (an order id, say, rather than a
    flag), then the first key in sorted order."""
    return min(match, key=lambda k: (match[k] is None or isinstance(match[k], bool), k))


def wait_key(event_type: str, match: Mapping[str, Any] | None) -> WaitKey:
    """The key and pairs of a wait for ``event_type`` with ``match`` (as recorded: decoded JSON)."""
    if not match:
        return WaitKey(type_key(event_type), (), None)
    pairs = tuple(sorted(pair_text(k, v) for k, v in match.items()))
    chosen = indexed_pair(match)
    text = pair_text(chosen, match[chosen])
    return WaitKey(pair_key(event_type, text), pairs, text)


def matches(match: Mapping[str, Any] | None, data: Any) -> bool:
    """Whether a wait's ``match`` accepts event ``data`` (both decoded JSON), by the rule above."""
    if not match:
        return True
    if not isinstance(data, dict):
        return False
    return all(key in data and canonical(data[key]) == canonical(value) for key, value in match.items())
