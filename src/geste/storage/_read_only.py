"""The replay check's read of a database by its URL: instances with their histories, read without writing.

No ``Storage`` is opened (that would migrate): each backend reads with a connection of its own that
cannot write (``sqlite.read_histories``: read-only and, without a write-ahead log, immutable;
``postgres.read_histories``: every transaction read-only), in one snapshot, through the backend's own
named queries. What both decide is here: which instances, in what order, and whether the schema is one
this version reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from .._models import Status
from ..errors import NotAGesteDatabaseError, SchemaVersionError
from . import _rows as rows
from ._rows import Record
from .base import HistoryRow, InstanceRow

UNFINISHED = (Status.RUNNING, Status.COMPENSATING, Status.WAITING, Status.PENDING)
FINISHED = (Status.FAILED, Status.CANCELLED, Status.COMPLETED)
"""The statuses read, one ``list_instances`` query each: the unfinished first (those a deploy affects)."""


@dataclass(frozen=True, slots=True)
class StoredHistory:
    """One instance as stored, with its history rows; ``source``: ``<database URL without password>#<id>``."""

    instance: InstanceRow
    rows: tuple[HistoryRow, ...]
    source: str


def check_tables(tables: Iterable[str]) -> None:
    """Refuse a database without geste's tables (before its schema version is read)."""
    if not {"geste_instances", "geste_history", "geste_meta"} <= set(tables):
        raise NotAGesteDatabaseError("the database holds no geste tables (geste_instances, geste_history)")


def check_version(row: Record | None, supported: int) -> None:
    """Refuse a schema version (the ``get_meta`` record of ``schema_version``) newer than ``supported``."""
    if row is None:
        return
    try:
        version = int(row["value"])
    except (TypeError, ValueError):
        raise NotAGesteDatabaseError(f"geste_meta holds the schema version {row['value']!r:.80}") from None
    if version > supported:
        raise SchemaVersionError(version, supported)


def picked(by_status: Iterable[Sequence[Record]], limit: int) -> list[Record]:
    """Of the ``list_instances`` records of each status: the unfinished ones first, then the finished ones,
    newest first in each, ``limit`` in all."""
    unfinished: list[Record] = []
    finished: list[Record] = []
    for found in by_status:
        for row in found:
            (finished if Status.stored(row["status"]).is_finished else unfinished).append(row)
    for group in (unfinished, finished):
        group.sort(key=lambda r: (r["created_at"], r["instance_id"]), reverse=True)
    return [*unfinished, *finished][:limit]


def stored_history(row: Record, history: Iterable[Record], source: str) -> StoredHistory:
    """A ``StoredHistory`` from a ``list_instances`` record and its ``get_history`` records (times as
    floats, whatever a hand-edited row holds)."""
    instance = rows.instance_row(row)
    return StoredHistory(
        dataclasses.replace(instance, created_at=float(instance.created_at)),
        tuple(h._replace(created_at=float(h.created_at)) for h in map(rows.history_row, history)),
        f"{source}#{instance.instance_id}",
    )


def without_password(url: str) -> str:
    """The URL as shown in a source: its password, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
