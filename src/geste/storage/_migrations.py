"""The migration runner of both backends: what a database's schema version says, which numbered scripts
it still needs and in what order, and what is announced and recorded around each.

A backend supplies the rest: the lock that makes processes opening one database together migrate it
once, the transaction every write of an upgrade shares, and how it executes a script and writes a
``geste_meta`` row. It reads the version, then runs the writes ``migrate`` yields, in its own loop (sync
on SQLite's thread, async on PostgreSQL)::

    for write in migrate(found, MIGRATIONS, self._announce):
        if isinstance(write, Migration): ...execute write.script...
        else: ...set_meta with write (key, value)...
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

from ..errors import NotAGesteDatabaseError, SchemaVersionError
from ._sql import load_migrations, migration_names
from .base import MigrationStep


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered script of ``sql/<backend>/``: ``NNNN_name.sql`` is version NNNN, named ``NNNN_name``."""

    version: int
    name: str
    script: str


def load(backend: str, fill: Callable[[str], str] = str) -> list[Migration]:
    """The backend's migrations in order, each script passed through ``fill`` (the schema substituted)."""
    names = migration_names(backend)
    return [Migration(n, names.get(n, f"{n:04}"), fill(script)) for n, script in load_migrations(backend)]


MetaWrite = tuple[str, str]
"""A ``geste_meta`` row to write: ``(key, value)``."""


def migrate(
    found: int, migrations: Sequence[Migration], announce: Callable[[MigrationStep], None]
) -> Iterator[Migration | MetaWrite]:
    """The writes that bring a database at schema version ``found`` (0: new) to the last of
    ``migrations``, in order: each pending migration, then its version in ``geste_meta``, announced
    before and after (the announcement after comes once the caller asks for the next write); a new
    database is then marked as geste's. A database newer than this version is refused before anything."""
    latest = migrations[-1].version if migrations else 0
    if found > latest:
        raise SchemaVersionError(found, latest)
    pending = [m for m in migrations if m.version > found]
    for index, migration in enumerate(pending, 1):
        announce(MigrationStep(migration.version, migration.name, index, len(pending), False))
        yield migration
        yield ("schema_version", str(migration.version))
        announce(MigrationStep(migration.version, migration.name, index, len(pending), True))
    if found == 0:
        yield ("application", "geste")


def is_new(tables: Collection[str], refusal: Callable[[str], str]) -> bool:
    """Whether a database (or schema) holding ``tables`` is new: it holds none. One that holds some but no
    ``geste_meta`` is someone else's: refused with ``refusal`` of the first few names."""
    if not tables:
        return True
    if "geste_meta" not in tables:
        raise NotAGesteDatabaseError(refusal(", ".join(sorted(tables)[:5])))
    return False


def meta_version(application: object, version: object) -> int:
    """The schema version that ``geste_meta`` records (its ``application`` and ``schema_version`` values,
    None where missing); refused unless they describe a geste schema."""
    if application != "geste" or version is None or not str(version).isdigit():
        raise NotAGesteDatabaseError("geste_meta exists but does not describe a geste schema")
    return int(str(version))
