"""A worker process for the tests of cancels reaching running activities and of workflow deadlines.

Run from the repository root::

    python -m tests.apps.cancel_app DATABASE_URL --worker-id W --log LOG --markers DIR [--lock-timeout S]
        [--listen-notify 0|1]

It writes ``DIR/ready-W`` once its App is open and runs until SIGTERM/SIGINT. Activities append JSON lines
to ``LOG`` (``tests.apps.crash_app.append_line``): ``hang`` notes its start and, when a cancel reaches
it, ``cancelled`` with what it saw (``ctx.cancelled``); ``undo`` (the compensation) notes its run. The
worker's log lines (stderr) say how each cancel reached it (``worker.cancel_running``'s ``via``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import geste

from .crash_app import append_line


def build_app(url: str, *, log: str | None = None, worker_id: str | None = None, **options: Any) -> geste.App:
    """The App with its workflows; ``log`` is only needed where activities run."""
    app = geste.App(url, worker_id=worker_id, **options)

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

    @app.activity(retry=geste.RetryPolicy(max_attempts=3, initial_interval=0.01))
    async def hang(ctx: geste.ActivityContext) -> str:
        """Blocks on an event nobody sets: only a cancel (or a deadline) ends it."""
        note(ctx, "start")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            note(ctx, "cancelled", flag=ctx.cancelled)
            raise
        return "never"

    @app.activity
    async def undo(ctx: geste.ActivityContext, what: str) -> None:
        note(ctx, "undo", what=what)

    @app.workflow
    async def saga(ctx: geste.WorkflowContext) -> str:
        ctx.on_failure(undo, "saga")
        await hang(ctx)
        return "not cancelled"

    @app.workflow
    async def sleepy(ctx: geste.WorkflowContext, seconds: float) -> str:
        ctx.on_failure(undo, "sleepy")
        await ctx.sleep(seconds)
        return "slept"

    return app


app = build_app("sqlite:///cancel-app.db")
"""For ``geste start --app tests.apps.cancel_app:app --database-url ...`` (its workflows only)."""


async def _serve(args: argparse.Namespace) -> None:
    app = build_app(
        args.url if "://" in args.url else f"sqlite:///{args.url}",
        log=args.log,
        worker_id=args.worker_id,
        lock_timeout=args.lock_timeout,
        poll_interval=0.05,
        shutdown_grace=1.0,
        listen_notify=bool(args.listen_notify) if args.url.startswith("postgres") else None,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, app.shutdown)
    await app.open()
    (Path(args.markers) / f"ready-{args.worker_id}").write_text(str(os.getpid()))
    await app.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.cancel_app")
    parser.add_argument("url", help="a database URL (a bare path is a SQLite file)")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--markers", required=True)
    parser.add_argument("--lock-timeout", type=float, default=1.0)
    parser.add_argument("--listen-notify", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {args.worker_id} %(name)s %(message)s"
    )
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
