"""A minimal HTTP server answering ``GET /metrics`` only: for worker processes that serve no HTTP app
(``geste worker --metrics-port N``, ``await app.metrics.serve(port=N)``).

One request per connection (``Connection: close``), a bounded request head, no body read. The token rule
is ``app.asgi()``'s: with a token, ``Authorization: Bearer <token>`` is required; without one, only a
``Host`` that is an IP address or ``localhost`` is answered (a DNS name pointed at 127.0.0.1 would let a
web page read the metrics: DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from ._access import bearer_matches, is_address_or_localhost, resolve_token
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._metrics import Metrics

logger = logging.getLogger("geste.metrics")

MAX_HEAD = 16 * 1024
"""The most bytes of request line and headers read; a longer head is refused with 431."""
READ_TIMEOUT = 10.0
"""Seconds a client has to send its request head."""

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


class MetricsServer:
    """``GET /metrics`` on ``host:port``; ``port`` is the bound port once started (0 picks one)."""

    def __init__(self, metrics: Metrics, *, host: str, port: int, token: str | None) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigurationError(f"the metrics port must be an integer in 0..65535, not {port!r}")
        self.metrics = metrics
        self.host = host
        self.port = port
        self._token = resolve_token(token)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD)
        except OSError as exc:
            raise ConfigurationError(f"cannot serve metrics on {self.host}:{self.port}: {exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("metrics served at http://%s:%d/metrics", self.host, self.port)
        if self._token is None and self.host not in ("127.0.0.1", "::1", "localhost"):
            logger.warning(
                "metrics served on %s without a token: only IP-address Hosts are answered", self.host
            )

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                await self._answer(writer, 431, "request head too large\n")
                return
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            try:
                status, body, extra = await self._respond(head)
            except Exception:
                logger.exception("collecting the metrics failed")
                status, body, extra = 500, "collecting the metrics failed\n", []
            await self._answer(writer, status, body, extra)
        except (ConnectionError, OSError):
            pass  # the client went away
        finally:
            with contextlib.suppress(Exception):
                writer.close()
                await writer.wait_closed()

    async def _respond(self, head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, "malformed request line\n", []
        method, target, _ = parts
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                return 400, "malformed header line\n", []
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        if target.split("?", 1)[0] != "/metrics":
            return 404, "only /metrics is served here\n", []
        if method != "GET":
            return 405, "only GET is allowed\n", [("Allow", "GET")]
        if self._token is not None:
            auth = headers.get("authorization", [])
            if not bearer_matches((auth[0] if len(auth) == 1 else "").encode("latin-1"), self._token):
                return (
                    401,
                    "Authorization: Bearer <token> required\n",
                    [("WWW-Authenticate", 'Bearer realm="geste"')],
                )
        else:
            hosts = headers.get("host", [])
            if len(hosts) > 1 or (hosts and hosts[0] and not is_address_or_localhost(hosts[0].lower())):
                return 403, "without a token only IP addresses and localhost are served\n", []
        return 200, await self.metrics.exposition(), [("Content-Type", self.metrics.CONTENT_TYPE)]

    @staticmethod
    async def _answer(
        writer: asyncio.StreamWriter, status: int, body: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        data = body.encode("utf-8", "replace")
        fields = {"Content-Type": "text/plain; charset=utf-8", **dict(headers or [])}
        fields["Content-Length"] = str(len(data))
        fields["Connection"] = "close"
        fields["Cache-Control"] = "no-store"
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in fields.items()) + "\r\n"
        writer.write(head.encode("latin-1") + data)
        await writer.drain()
