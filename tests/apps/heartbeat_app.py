"""A worker process for the heartbeat crash test (tests/test_heartbeats.py).

    python -m tests.apps.heartbeat_app DATABASE_URL --worker-id W --markers DIR [--stop-at N]

Run as ``tests/apps/worker.py`` says. Its ``crunch`` activity heartbeats its progress
(``{"done": i, "worker": W}``) one item at a time from where the last attempt's details left it; with
``--stop-at N`` it hangs after the N-th item (writing ``DIR/stuck-W``), so that the test kills the process
mid-activity and another worker's next attempt resumes from the details the dead one's renewals wrote.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import geste

from .worker import serve

LOCK_TIMEOUT = 1.0


def build_app(
    url: str,
    *,
    worker_id: str,
    markers: str | Path,
    log: str | None = None,
    stop_at: int | None = None,
    **options: Any,
) -> geste.App:
    """The App with its workflow (``log`` is not used: the heartbeat details are what the test reads)."""
    options.setdefault("lock_timeout", LOCK_TIMEOUT)
    options.setdefault("poll_interval", 0.05)
    app = geste.App(url, worker_id=worker_id, **options)
    folder = Path(markers)

    @app.activity(heartbeat_timeout=60.0)
    async def crunch(ctx: geste.ActivityContext, total: int) -> dict[str, Any]:
        previous = ctx.heartbeat_details
        start = 0 if previous is None else int(previous["done"])
        for i in range(start, total):
            ctx.heartbeat({"done": i + 1, "worker": worker_id})
            if stop_at is not None and i + 1 == stop_at:
                (folder / f"stuck-{worker_id}").touch()
                await asyncio.Event().wait()  # hangs here until the process is killed
        return {"resumed_from": previous, "worker": worker_id, "attempt": ctx.attempt}

    @app.workflow
    async def crunching(ctx: geste.WorkflowContext, total: int) -> dict[str, Any]:
        return await crunch(ctx, total)

    return app


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stop-at", type=int, default=None)


def main(argv: list[str] | None = None) -> None:
    serve(
        build_app,
        argv,
        prog="python -m tests.apps.heartbeat_app",
        arguments=_arguments,
        lock_timeout=LOCK_TIMEOUT,
        poll_interval=0.05,
    )


if __name__ == "__main__":
    main()
