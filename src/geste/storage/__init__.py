"""Storage backends behind one interface (``Storage``), chosen by the database URL."""

from __future__ import annotations

from ..errors import ConfigurationError
from .base import Storage


def create_storage(url: str, *, notify: bool = False) -> Storage:
    """The backend for ``url``: ``sqlite:///path.db`` or ``postgresql://user@host:port/db``."""
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteStorage

        return SQLiteStorage(url)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStorage

        return PostgresStorage(url, notify=notify)
    scheme = url.partition(":")[0]
    raise ConfigurationError(
        f"unsupported database URL scheme {scheme!r} in {url!r}; use sqlite:///path.db or postgresql://..."
    )


__all__ = ["Storage", "create_storage"]
