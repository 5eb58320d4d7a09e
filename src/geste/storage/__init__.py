"""Storage backends behind one interface (``Storage``), chosen by the database URL."""

from __future__ import annotations

from ..errors import ConfigurationError
from .base import Storage


def create_storage(url: str) -> Storage:
    """The backend for ``url``: ``sqlite:///path.db`` (PostgreSQL arrives with its backend)."""
    if url.startswith("sqlite://"):
        from .sqlite import SQLiteStorage

        return SQLiteStorage(url)
    scheme = url.partition(":")[0]
    raise ConfigurationError(f"unsupported database URL scheme {scheme!r} in {url!r}; use sqlite:///path.db")


__all__ = ["Storage", "create_storage"]
