"""A worker process for the chores tests (``tests/test_chores.py``).

Run from the repository root (``tests/apps/worker.py``, ``tests/processes.py``)::

    python -m tests.apps.chores_app DATABASE_URL --worker-id W --log LOG --markers DIR \
        [--rewake S] [--cleanup S]

Its App runs a worker (and so the channel chores), with the chores' intervals shortened to ``--rewake``
and ``--cleanup`` seconds. Every round of a chore this process takes appends one JSON line to ``LOG``
(``{"worker", "pid", "chore", "taken_at", "next_at", "event": "taken"}``), and every run of the chore's
statements one more (``"event": "ran"``). SIGTERM/SIGINT stop it gracefully: the chores it holds are
given back.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import geste
from geste.runtime import chores

from .worker import append_line, serve


def build_app(
    url: str,
    *,
    log: str | None,
    worker_id: str,
    markers: str | None = None,
    rewake: float | None = None,
    cleanup: float | None = None,
    **options: Any,
) -> geste.App:
    """The App of a worker whose chores are logged. ``rewake`` and ``cleanup``: the chores' intervals
    (in seconds, > 0), set for the whole process (this app is meant to run alone in it)."""
    for interval in (rewake, cleanup):
        if interval is not None and interval <= 0:
            raise ValueError(f"chore intervals must be > 0, not {interval}")
    if rewake is not None:
        chores.REWAKE_INTERVAL = rewake
    if cleanup is not None:
        chores.CLEANUP_INTERVAL = cleanup
    assert log is not None, "a chores worker logs its rounds"
    app = geste.App(url, worker_id=worker_id, **options)
    storage = app.storage
    real_take, real_rewake, real_cleanup = storage.chore_take, storage.channel_rewake, storage.channel_cleanup

    def note(record: dict[str, Any]) -> None:
        append_line(log, {"worker": worker_id, "pid": os.getpid(), "t": time.time(), **record})

    async def chore_take(chore: str, worker: str, now: float, **kwargs: Any) -> Any:
        turn = await real_take(chore, worker, now, **kwargs)
        if turn.taken:
            note({"event": "taken", "chore": chore, "taken_at": now, "next_at": turn.next_at})
        return turn

    async def channel_rewake(*args: Any, **kwargs: Any) -> Any:
        note({"event": "ran", "chore": chores.REWAKE})
        return await real_rewake(*args, **kwargs)

    async def channel_cleanup(*args: Any, **kwargs: Any) -> Any:
        note({"event": "ran", "chore": chores.CLEANUP})
        return await real_cleanup(*args, **kwargs)

    storage.chore_take = chore_take  # type: ignore[method-assign]
    storage.channel_rewake = channel_rewake  # type: ignore[method-assign]
    storage.channel_cleanup = channel_cleanup  # type: ignore[method-assign]
    return app


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rewake", type=float, default=0.3)
    parser.add_argument("--cleanup", type=float, default=0.5)


def main(argv: list[str] | None = None) -> None:
    serve(
        build_app,
        argv,
        prog="python -m tests.apps.chores_app",
        arguments=_arguments,
        poll_interval=0.2,
        lock_timeout=5.0,
    )


if __name__ == "__main__":
    main()
