"""Connecting to one of the hosts of a multi-host PostgreSQL URL (a primary and its standbys).

The driver tries the hosts of ``postgresql://user@h1:5432,h2:5432/db`` in order under one timeout for
them all: a host that takes the TCP connection and then never answers (a machine hung, or gone while
its address still routes) uses up the whole timeout, and the next host is never tried. After a
failover every new connection of the pool and every reconnect of the listener would time out on the
old primary. ``connect`` tries the hosts one at a time, each within its own ``connect_timeout`` (as
libpq does), and first the host that took the last connection of this process: the dead host is waited
for once, not once per connection.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

_LAST_GOOD: dict[str, int] = {}
"""For each multi-host connection string, the index of the host that took this process's last
connection (every pool and listener of the process on that URL shares it)."""


def split_hosts(dsn: str) -> list[str]:
    """One connection string per host of ``dsn``, in its order (just ``[dsn]`` for one host, and for
    hosts and ports given as ``?host=...&port=...``, which the driver pairs itself)."""
    parts = urlsplit(dsn)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if "," not in hosts or any(k in ("host", "port") for k, _ in parse_qsl(parts.query)):
        return [dsn]
    return [urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}")) for host in hosts.split(",")]


async def connect(dsn: str, *, timeout: float, **kwargs: Any) -> Any:
    """An asyncpg connection to the first host of ``dsn`` that takes one (and suits its
    ``target_session_attrs``), each tried within ``timeout`` seconds, the last good one first. Raises
    the last host's error when none does."""
    import asyncpg

    dsns = split_hosts(dsn)
    if len(dsns) == 1:
        return await asyncpg.connect(dsn, timeout=timeout, **kwargs)
    first = _LAST_GOOD.get(dsn, 0)
    error: BaseException | None = None
    for index in [*range(first, len(dsns)), *range(first)]:
        try:
            conn = await asyncpg.connect(dsns[index], timeout=timeout, **kwargs)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
            error = exc  # refused, timed out, a standby, starting up: the next host
            continue
        _LAST_GOOD[dsn] = index
        return conn
    assert error is not None
    raise error
