"""Storage backends behind one interface (``Storage``), chosen by the database URL."""

from __future__ import annotations

import asyncio

from ..errors import ConfigurationError
from ._read_only import StoredHistory
from .base import Storage


def create_storage(url: str, *, notify: bool = False, lock_timeout: float | None = None) -> Storage:
    """The backend for ``url``: ``sqlite:///path.db`` or ``postgresql://user@host:port/db``.
    ``lock_timeout``: the App's, from which PostgreSQL's default ``command_timeout`` is derived."""
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteStorage

        return SQLiteStorage(url)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStorage

        return PostgresStorage(url, notify=notify, lock_timeout=lock_timeout)
    scheme = url.partition(":")[0]
    raise ConfigurationError(
        f"unsupported database URL scheme {scheme!r} in {url!r}; use sqlite:///path.db or postgresql://..."
    )


async def read_histories(url: str, *, workflow: str | None, limit: int) -> list[StoredHistory]:
    """Up to ``limit`` instances (of ``workflow``, if given) with their histories, read without writing:
    the unfinished ones first, then the finished ones, newest first in each."""
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ConfigurationError(f"limit must be a positive int, not {limit!r}")
    if workflow is not None and not isinstance(workflow, str):
        raise ConfigurationError(f"workflow must be a workflow name, not {workflow!r}")
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import read_histories as read_postgres

        return await read_postgres(url, workflow, limit)
    if url.startswith("sqlite:"):
        from .sqlite import read_histories as read_sqlite

        return await asyncio.to_thread(read_sqlite, url, workflow, limit)
    raise ConfigurationError(f"unsupported database URL (sqlite:/// or postgresql://): {url!r:.200}")


def listen_dsn(url: str) -> tuple[str, str]:
    """The connection string and application name of a LISTEN connection to ``url`` (a ``postgresql://``
    URL, geste's options checked): ``listen_database_url`` is checked with it when the App is built."""
    from .postgres import listen_dsn as postgres_listen_dsn

    return postgres_listen_dsn(url)


def through_transaction_pooler(url: str) -> bool:
    """Whether a ``postgresql://`` URL goes through a pooler in transaction mode (``pooler=transaction``):
    its connections cannot LISTEN."""
    from .postgres import through_transaction_pooler as postgres_pooled

    return postgres_pooled(url)


__all__ = ["Storage", "create_storage", "listen_dsn", "read_histories", "through_transaction_pooler"]
