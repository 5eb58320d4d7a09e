"""Recorded histories for the replay check: read from a database without writing to it, or from files.

The file format (``geste-history``, version 1) is one JSON object per instance::

    {"format": "geste-history", "version": 1,
     "instance": {"instance_id", "workflow_name", "status", "input", "result", "error",
                  "created_at", "finished_at"},
     "history": [{"seq", "kind", "name", "is_error", "created_at", "payload"}, ...]}

``input``, ``result``, ``error`` and each ``payload`` are the stored JSON values; times are ISO 8601
strings (numbers of Unix seconds are read too). A run the instance ended with ``continue_as_new``
(``export_history(..., run=n)``) has ``"run": n`` in ``instance``, its own ``input``, its start and end as
``created_at`` and ``finished_at``, and its history ends with its ``continue_as_new`` row; its ``status``
is the instance's, which the replay check does not go by for such a run. A payload that is not JSON (a
row changed by hand) is kept verbatim as ``"payload_text"`` instead, so that the replay check reports it.
``geste show ID --json`` (and ``--run n``) prints the same ``instance`` and ``history`` objects, so its
output is read as well.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from .._models import InstanceInfo, Status
from .._serde import encode
from .._steps import document_payload, payload_from_document
from ..errors import ConfigurationError, RunNotFoundError
from ..storage import read_histories
from ..storage._read_only import StoredHistory
from ..storage.base import HistoryRow, Storage


class HistorySource(Protocol):
    """What ``export_history`` reads an instance from: an open App (or its client)."""

    @property
    def storage(self) -> Storage: ...

    async def get_instance(self, instance_id: str) -> InstanceInfo: ...


FORMAT = "geste-history"
VERSION = 1


@dataclass(frozen=True, slots=True)
class RecordedHistory:
    """One instance as the replay check needs it: its workflow, input, status and history rows."""

    instance_id: str
    workflow_name: str
    status: Status
    input: str
    """The stored JSON text of ``{"args": [...], "kwargs": {...}}``."""
    created_at: float
    rows: tuple[HistoryRow, ...]
    source: str
    """Where it was read: ``<database URL without password>#<instance id>``, or the file's path."""
    error_type: str | None = None
    """The dotted type of the recorded error of a failed instance."""
    run: int | None = None
    """The run this history is, when one kept by ``continue_as_new``; None: the instance's current run."""


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A source that does not hold a history geste can read (not JSON, not the format, a bad field)."""

    source: str
    problem: str
    instance_id: str = "?"
    workflow_name: str = "?"


# -- files -----------------------------------------------------------------------------------------------
def history_document(instance: dict[str, Any], rows: Sequence[HistoryRow]) -> dict[str, Any]:
    """The ``geste-history`` document of an instance (fields as stored) and its raw history rows."""
    history = []
    for row in rows:
        entry: dict[str, Any] = {
            "seq": row.seq,
            "kind": row.kind,
            "name": row.name,
            "is_error": bool(row.is_error),
            "created_at": _iso(row.created_at),
            **document_payload(row.payload),
        }
        history.append(entry)
    return {"format": FORMAT, "version": VERSION, "instance": instance, "history": history}


async def export_history(
    app: HistorySource,
    instance_id: str,
    path: str | os.PathLike[str] | None = None,
    *,
    run: int | None = None,
) -> dict[str, Any]:
    """Export an instance of an open App with its history as a ``geste-history`` document.

    Written to ``path`` (UTF-8 JSON, indented) when given, and returned. Keep such files next to your
    tests and give them to ``geste.testing.check_replay(app, files=[...])`` or ``geste replay-check``:
    they prove that a change of the workflow's code still replays the instances recorded before it.
    Its current run by default; ``run=n``: the run ``n`` it ended with ``continue_as_new`` (kept), which
    the check replays to that ``continue_as_new`` (``geste.errors.RunNotFoundError`` if none is kept).
    """
    info = await app.get_instance(instance_id)
    instance = {
        "instance_id": info.instance_id,
        "workflow_name": info.workflow_name,
        "status": info.status.value,
        "input": info.input,
        "result": info.result,
        "error": info.error,
        "created_at": info.created_at.isoformat(),
        "finished_at": None if info.finished_at is None else info.finished_at.isoformat(),
    }
    if run is None:
        rows = await app.storage.get_history(instance_id)
    else:
        kept = [r for r in await app.storage.list_runs(instance_id) if r.run == run]
        if not kept:
            raise RunNotFoundError(instance_id, run)
        rows = await app.storage.get_run_history(instance_id, run)
        instance.update(
            run=run,
            input=json.loads(kept[0].input),
            result=None,
            error=None,
            created_at=_iso(kept[0].started_at),
            finished_at=_iso(kept[0].ended_at),
        )
    document = history_document(instance, rows)
    if path is not None:
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
        await asyncio.to_thread(Path(path).write_text, text, encoding="utf-8")
    return document


def history_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files named, a folder standing for the ``*.json`` files in it (sorted)."""
    if isinstance(paths, str | os.PathLike):
        raise ConfigurationError("files must be a list of paths, not one path")
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix == ".json" and p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigurationError(f"no such history file or folder: {str(path)!r}")
    return found


def read_history_file(path: Path) -> RecordedHistory | Unreadable:
    """Read one exported history; whatever is wrong with it comes back as ``Unreadable``."""
    source = str(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read {source!r}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON
        return Unreadable(source, f"not a JSON file ({type(exc).__name__}: {exc!s:.200})")
    try:
        return _from_document(document, source)
    except _Bad as exc:
        instance = document.get("instance") if isinstance(document, dict) else None
        ids = {}
        if isinstance(instance, dict):
            ids = {k: v for k in ("instance_id", "workflow_name") if isinstance(v := instance.get(k), str)}
        return Unreadable(source, str(exc), **ids)


class _Bad(ValueError):
    pass


def _from_document(document: Any, source: str) -> RecordedHistory:
    if not isinstance(document, dict) or not isinstance(document.get("instance"), dict):
        raise _Bad('not a geste history: no "instance" object')
    marker, version = document.get("format"), document.get("version")
    if marker is not None and (marker != FORMAT or version != VERSION):
        raise _Bad(f"format {marker!r} version {version!r}; this geste reads {FORMAT!r} version {VERSION}")
    instance, history = document["instance"], document.get("history")
    if not isinstance(history, list):
        raise _Bad('not a geste history: no "history" list')
    instance_id = _field(instance, "instance_id", str)
    workflow_name = _field(instance, "workflow_name", str)
    try:
        status = Status(_field(instance, "status", str))
    except ValueError:
        raise _Bad(f"unknown instance status {instance.get('status')!r:.80}") from None
    error = instance.get("error")
    error_type = error.get("type") if isinstance(error, dict) else None
    run = instance.get("run")
    if run is not None and (not isinstance(run, int) or isinstance(run, bool) or run < 1):
        raise _Bad(f"instance: run is {run!r:.80}, not a run number")
    rows = []
    for position, entry in enumerate(history, 1):
        if not isinstance(entry, dict):
            raise _Bad(f"history entry {position} is not an object")
        if "payload_text" in entry:
            payload = entry["payload_text"]
            if payload is not None and not isinstance(payload, str):
                raise _Bad(f"history entry {position}: payload_text is not a string")
        elif "payload" in entry:
            payload = payload_from_document(entry["payload"])
        else:
            raise _Bad(f"history entry {position} has no payload")
        seq = entry.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise _Bad(f"history entry {position} has the step number {seq!r:.80}")
        rows.append(
            HistoryRow(
                seq,
                _field(entry, "kind", str, position),
                _field(entry, "name", str, position),
                payload,
                _field(entry, "is_error", bool, position),
                _seconds(entry.get("created_at"), f"history entry {position}: created_at"),
            )
        )
    return RecordedHistory(
        instance_id=instance_id,
        workflow_name=workflow_name,
        status=status,
        input=encode(instance.get("input"), what="input"),
        created_at=_seconds(instance.get("created_at"), "created_at"),
        rows=tuple(rows),
        source=source,
        error_type=error_type if isinstance(error_type, str) else None,
        run=run,
    )


def _field(obj: dict[str, Any], key: str, kind: type, position: int | None = None) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind):
        where = "instance" if position is None else f"history entry {position}"
        raise _Bad(f"{where}: {key} is {value!r:.80}, not a {kind.__name__}")
    return value


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    raise _Bad(f"{what} is {value!r:.80}, not a time")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


# -- databases, read-only ----------------------------------------------------------------------------------
async def read_database(url: str, *, workflow: str | None, limit: int) -> list[RecordedHistory]:
    """Up to ``limit`` instances (of ``workflow``, if given) with their histories, read without writing
    (``storage._read_only``): the unfinished ones first (those a deploy affects), then the finished ones,
    newest first in each."""
    return [_recorded(found) for found in await read_histories(url, workflow=workflow, limit=limit)]


def _recorded(found: StoredHistory) -> RecordedHistory:
    instance = found.instance
    try:
        error = json.loads(instance.error) if instance.error else None
    except (ValueError, RecursionError):
        error = None
    error_type = error.get("type") if isinstance(error, dict) else None
    return RecordedHistory(
        instance_id=instance.instance_id,
        workflow_name=instance.workflow_name,
        status=instance.status,
        input=instance.input,
        created_at=instance.created_at,
        rows=found.rows,
        source=found.source,
        error_type=error_type if isinstance(error_type, str) else None,
    )
