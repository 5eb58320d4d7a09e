"""A worker process for the chores tests (``tests/test_chores.py``).

Run from the repository root::

    python -m tests.apps.chores_app DATABASE_URL --worker-id W --log LOG --markers DIR \
        [--rewake S] [--cleanup S]

Its App runs a worker (and so the channel chores), with the chores' intervals shortened to ``--rewake``
and ``--cleanup`` seconds. Every round of a chore this process takes appends one JSON line to ``LOG``
(``{"worker", "pid", "chore", "taken_at", "next_at", "event": "taken"}``), and every run of the chore's
statements one more (``"event": "ran"``). It writes ``DIR/ready-W`` once open, and runs until
SIGTERM/SIGINT (a graceful stop: the chores it holds are given back).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import geste
from geste.runtime import chores

from .crash_app import append_line


def build_app(url: str, *, log: str, worker_id: str) -> geste.App:
    app = geste.App(url, worker_id=worker_id, poll_interval=0.2, lock_timeout=5.0)
    storage = app.storage
    take, rewake, cleanup = storage.chore_take, storage.channel_rewake, storage.channel_cleanup

    def note(record: dict[str, Any]) -> None:
        append_line(log, {"worker": worker_id, "pid": os.getpid(), "t": time.time(), **record})

    async def chore_take(chore: str, worker: str, now: float, **kwargs: Any) -> Any:
        turn = await take(chore, worker, now, **kwargs)
        if turn.taken:
            note({"event": "taken", "chore": chore, "taken_at": now, "next_at": turn.next_at})
        return turn

    async def channel_rewake(*args: Any, **kwargs: Any) -> Any:
        note({"event": "ran", "chore": chores.REWAKE})
        return await rewake(*args, **kwargs)

    async def channel_cleanup(*args: Any, **kwargs: Any) -> Any:
        note({"event": "ran", "chore": chores.CLEANUP})
        return await cleanup(*args, **kwargs)

    storage.chore_take = chore_take  # type: ignore[method-assign]
    storage.channel_rewake = channel_rewake  # type: ignore[method-assign]
    storage.channel_cleanup = channel_cleanup  # type: ignore[method-assign]
    return app


async def _serve(args: argparse.Namespace) -> None:
    chores.REWAKE_INTERVAL = args.rewake
    chores.CLEANUP_INTERVAL = args.cleanup
    app = build_app(args.url, log=args.log, worker_id=args.worker_id)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, app.shutdown)
    await app.open()
    (Path(args.markers) / f"ready-{args.worker_id}").write_text(str(os.getpid()))
    await app.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.chores_app")
    parser.add_argument("url")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--markers", required=True)
    parser.add_argument("--rewake", type=float, default=0.3)
    parser.add_argument("--cleanup", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.rewake <= 0 or args.cleanup <= 0:
        sys.exit("intervals must be > 0")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
