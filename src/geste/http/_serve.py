"""``geste serve``: an App's ASGI application under uvicorn, stopped cleanly by SIGTERM or SIGINT.

Imported only when uvicorn is installed (``pip install 'geste[http]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn

from .._app import App
from ._endpoints import GesteASGI

logger = logging.getLogger("geste.http")

GRACEFUL_SHUTDOWN = 5
"""Seconds requests in flight (a long ``result?wait=``) may take to finish after a signal."""


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handling: ours stops it, and the process then exits 0
    (uvicorn re-raises a SIGTERM once shut down, which would end the process with -15)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, opened before anything else so a taken port fails first."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(app: App, asgi: GesteASGI, sock: socket.socket) -> None:
    """Open ``app`` (its worker too, if it runs one), serve ``asgi`` on ``sock`` until SIGTERM/SIGINT,
    then let requests in flight finish (up to 5 s) and close the App (draining its worker)."""
    config = uvicorn.Config(
        asgi,
        lifespan="on",
        log_config=None,
        server_header=False,
        ws="none",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if server.should_exit:
            logger.warning("%s again: stopping now", signal.Signals(signum).name)
            server.force_exit = True
        else:
            logger.info("%s received: shutting down", signal.Signals(signum).name)
        server.should_exit = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await app.open()
        host, port = sock.getsockname()[:2]
        logger.info(
            "serving http://%s:%d (%s; workflows: %s)",
            f"[{host}]" if ":" in host else host,
            port,
            "bearer token required" if asgi.token_required else "no token",
            ", ".join(sorted(app.workflows)) or "none",
        )
        logger.info("web viewer: http://%s:%d/ui", f"[{host}]" if ":" in host else host, port)
        if not is_loopback(host) and not asgi.token_required:
            logger.warning(
                "listening on %s without a token: whoever reaches this port can start and cancel workflows",
                host,
            )
        await server.serve(sockets=[sock])
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        sock.close()
        await app.close()
        logger.info("stopped")
