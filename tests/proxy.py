"""A TCP proxy the tests control, to put a network partition between one client and PostgreSQL.

``TcpProxy`` listens on a port of 127.0.0.1 and forwards each connection to the server. The test can
``stall()`` it: no byte is forwarded any more in either direction, every socket stays open (a half-open
connection as a dead switch or a silent firewall leaves it: neither side hears a FIN or a RST), and new
connections are accepted but never answered; ``cut()`` it: every connection is closed and new ones are
refused; and ``heal()`` it: new connections are forwarded again. The stalled ones stay black-holed for good
(the hardest case: the other end's state is gone, only the client can notice and drop them). It runs on
the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit


class _Link:
    """One client connection and its upstream one: forwarded while ``live``, black-holed once not."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.live = True
        self.writers = [client]

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()


class TcpProxy:
    """One proxy to ``host:port`` (``start`` opens it; ``port`` is its own)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.mode = "open"
        """``open`` (forwarding), ``stalled`` or ``cut``."""
        self.connections = 0
        """Connections accepted, in all."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: set[_Link] = set()

    @classmethod
    async def to_url(cls, url: str) -> TcpProxy:
        """A started proxy to the server of a ``postgresql://`` URL."""
        parts = urlsplit(url)
        proxy = cls(parts.hostname or "127.0.0.1", parts.port or 5432)
        await proxy.start()
        return proxy

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by this proxy's."""
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user + '@' if user else ''}127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def open_links(self) -> int:
        """Client connections open now (forwarded or black-holed)."""
        return len(self._links)

    def stall(self) -> None:
        """Forward nothing more on any connection, new or old, and close none: each side's bytes are
        read and dropped (a black hole: no FIN, no RST, no answer). The connections stalled stay so for
        good, even after ``heal``, until their client closes them."""
        self.mode = "stalled"
        for link in self._links:
            link.live = False

    def cut(self) -> None:
        """Close every connection; refuse new ones until ``heal``."""
        self.mode = "cut"
        for link in list(self._links):
            link.abort()

    def heal(self) -> None:
        """Forward new connections again (the stalled ones stay black-holed)."""
        self.mode = "open"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        link = _Link(writer)
        try:
            if self.mode == "cut":
                return
            self._links.add(link)
            if self.mode == "stalled":
                link.live = False
                await self._pipe(link, reader, None)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return
            link.writers.append(up_writer)
            pipes = [
                asyncio.create_task(self._pipe(link, reader, up_writer)),
                asyncio.create_task(self._pipe(link, up_reader, writer)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            link.abort()
            self._links.discard(link)
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                if writer is None or not link.live:
                    continue  # black-holed: read (to see the peer close) and drop
                writer.write(data)
                await writer.drain()
