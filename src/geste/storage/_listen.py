"""The connection a worker LISTENs on: ``Storage.listen`` and what it returns, ``Listening``.

Only PostgreSQL has LISTEN/NOTIFY: it listens on one dedicated connection (never from the pool), with TCP
keepalives (a dead peer is noticed by the kernel, not after hours), named ``<application_name>-listener``.
What to do with a notification, when to probe the connection and how to reconnect is the runtime's
(``geste.runtime.wakeups.Listener``): this module only opens the connection, LISTENs and says on which
channels the server has it listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

OnNotification = Callable[[str, str], None]
"""Called with the channel and the payload of each notification heard."""


class Listening(Protocol):
    """An open LISTEN connection (``Storage.listen``)."""

    async def channels(self) -> set[str]:
        """The channels the server has this session listening on (``pg_listening_channels()``): the
        listener's probe. A round trip proves the connection answers (a half-open one does not), the
        answer that it still LISTENs; unlike a NOTIFY to itself, it makes no other listener of the
        database read the notification queue."""
        ...

    async def close(self) -> None:
        """Close the connection (within 2 seconds, else it is dropped)."""
        ...

    def terminate(self) -> None:
        """Drop the connection at once, waiting for nothing."""
        ...


class PostgresListening:
    """A LISTEN connection of asyncpg."""

    def __init__(self, conn: Any) -> None:
        self.connection = conn

    async def channels(self) -> set[str]:
        return {r[0] for r in await self.connection.fetch("SELECT pg_listening_channels()")}

    async def close(self) -> None:
        try:
            async with asyncio.timeout(2):  # not wait_for: on 3.11 it can drop the caller's cancel
                await self.connection.close()
        except Exception:
            self.connection.terminate()

    def terminate(self) -> None:
        self.connection.terminate()


async def listen_postgres(
    dsn: str,
    application_name: str,
    channels: Sequence[str],
    on_notification: OnNotification,
    on_lost: Callable[[], None],
    *,
    connect_timeout: float = 10.0,
) -> PostgresListening:
    """Connect to ``dsn`` (``connect_timeout`` at most per host: ``_hosts.connect``), LISTEN on
    ``channels``; ``on_lost`` is called if the server closes the connection. A failure to connect or to
    LISTEN raises (the connection is dropped)."""
    from ._hosts import connect

    settings = {"application_name": application_name}
    conn = await connect(dsn, timeout=connect_timeout, server_settings=settings)
    listening = PostgresListening(conn)
    try:
        _enable_keepalives(conn)
        conn.add_termination_listener(lambda _conn: on_lost())

        def heard(_conn: Any, _pid: int, channel: str, payload: str) -> None:
            on_notification(channel, payload)

        for channel in channels:
            await conn.add_listener(channel, heard)
    except BaseException:
        listening.terminate()
        raise
    return listening


def _enable_keepalives(conn: Any) -> None:
    """TCP keepalives on the listener's socket: a dead peer is noticed by the kernel, not after hours."""
    transport = getattr(conn, "_transport", None)
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
