"""Loading of a backend's SQL: its named queries and its numbered migrations, kept in ``sql/<backend>/``."""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _folder(backend: str) -> resources.abc.Traversable:
    return resources.files("geste.storage").joinpath("sql", backend)


DB_CLOCK = {
    "postgres": "extract(epoch FROM statement_timestamp())::double precision",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}
"""``{db_clock}`` in a query: the database's own time in Unix seconds. A process that makes an instance
runnable "now" (a start, an event, a message, a cancel) sets its ``run_at`` to the earlier of its clock and
this one, so a process whose clock runs ahead cannot push the work of others into the future."""


def load_queries(backend: str) -> dict[str, str]:
    """The ``-- name: x`` blocks of ``sql/<backend>/queries.sql``, by name (``{db_clock}`` filled in)."""
    text = _folder(backend).joinpath("queries.sql").read_text(encoding="utf-8")
    text = text.replace("{db_clock}", DB_CLOCK[backend])
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


def load_migrations(backend: str) -> list[tuple[int, str]]:
    """``(version, script)`` for each ``NNNN_name.sql`` of the backend, in order."""
    found = []
    for entry in _folder(backend).iterdir():
        match = re.fullmatch(r"(\d{4})_\w+\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations of {backend} are not numbered 1..n: {versions}")
    return found


def migration_names(backend: str) -> dict[int, str]:
    """The name of each migration of the backend (its file name without ``.sql``), by version."""
    names = {}
    for entry in _folder(backend).iterdir():
        match = re.fullmatch(r"(\d{4})_\w+\.sql", entry.name)
        if match:
            names[int(match.group(1))] = entry.name.removesuffix(".sql")
    return names
