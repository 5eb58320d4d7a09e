"""What the worker-process apps share: their side-effect log and the ``main`` that runs one as a worker.

Each app module (``crash_app``, ``cancel_app``, ...) differs only by its workflows and activities: it
defines ``build_app(url, *, log=None, markers=None, worker_id=None, **options)`` and calls ``serve`` from its
``main``. Every such worker is started the same way (``tests/processes.py``)::

    python -m tests.apps.<app> DATABASE_URL --worker-id W --markers DIR [--log LOG] [--name VALUE ...]

It writes ``DIR/ready-W`` (its pid) once its App is open, and runs until SIGTERM/SIGINT
(``app.shutdown()``: it drains, releases its leases and exits 0). Its log lines (INFO, stderr) name the
worker. Activities append JSON lines to ``LOG``, one ``write`` each, atomic between processes.

The apps with command lines of their own (``--ready FILE``: notify, routing, channels, operations, outbox)
share the rest: ``run_worker``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import geste


def append_line(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line in a single ``write`` on an ``O_APPEND`` file: atomic between processes."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Every line of a side-effect log (none while nothing was written)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def activity_log(log: str | None, worker_id: str | None) -> Callable[..., None]:
    """``note(ctx, event, **extra)``: one line for an activity's ``event`` in ``log``, with the instance,
    activity, attempt, worker id, pid and time (``log`` is needed only where activities run)."""

    def note(ctx: geste.ActivityContext, event: str, **extra: Any) -> None:
        assert log is not None, "activities run only in a worker built with log="
        append_line(
            log,
            {
                "instance": ctx.instance_id,
                "activity": ctx.activity_name,
                "attempt": ctx.attempt,
                "event": event,
                "worker": worker_id,
                "pid": os.getpid(),
                "t": time.time(),
                **extra,
            },
        )

    return note


BuildApp = Callable[..., geste.App]


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"0 or 1, not {text!r}")
    return text == "1"


def serve(
    build_app: BuildApp,
    argv: list[str] | None = None,
    *,
    prog: str,
    arguments: Callable[[argparse.ArgumentParser], object] | None = None,
    **defaults: Any,
) -> None:
    """Parse the worker's command line and run ``build_app``'s App as a worker until SIGTERM/SIGINT.

    ``defaults``: the App's options this app takes on its command line (``--lock-timeout`` for
    ``lock_timeout``), with their defaults (a bool is given as 0 or 1). ``arguments`` adds the app's own;
    every option parsed but the url, worker id, markers and log is passed to ``build_app``."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("url", help="a database URL (a bare path is a SQLite file)")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--markers", required=True)
    parser.add_argument("--log", default=None)
    for name, default in defaults.items():
        kind = _flag if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    if arguments is not None:
        arguments(parser)
    options = vars(parser.parse_args(argv))
    url, worker_id, markers = options.pop("url"), options.pop("worker_id"), options.pop("markers")
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {worker_id} %(name)s %(message)s"
    )
    app = build_app(
        url if "://" in url else f"sqlite:///{url}", markers=markers, worker_id=worker_id, **options
    )
    asyncio.run(run_worker(app, Path(markers) / f"ready-{worker_id}"))


async def run_worker(
    app: geste.App,
    ready: str | Path,
    *,
    listening: bool = False,
    before_ready: Callable[[geste.App], Awaitable[object]] | None = None,
) -> None:
    """Open ``app``, write its pid to ``ready`` and run its worker until SIGTERM/SIGINT (``app.shutdown()``:
    it drains and closes). ``listening``: ``ready`` only once its listener listens (where it has one);
    ``before_ready`` runs on the open App first (to start instances)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, app.shutdown)
    await app.open()
    while listening and app.notify.enabled and app.listener_status().state != "listening":
        await asyncio.sleep(0.01)
    if before_ready is not None:
        await before_ready(app)
    await asyncio.to_thread(Path(ready).write_text, str(os.getpid()))
    await app.run()  # already open: runs until shutdown(), then drains and closes
