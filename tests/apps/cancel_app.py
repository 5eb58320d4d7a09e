"""A worker process for the tests of cancels reaching running activities and of workflow deadlines.

Run from the repository root (``tests/apps/worker.py``, ``tests/processes.py``)::

    python -m tests.apps.cancel_app DATABASE_URL --worker-id W --log LOG --markers DIR [--lock-timeout S]
        [--listen-notify 0|1]

Activities append JSON lines to ``LOG``: ``hang`` notes its start and, when a cancel reaches it,
``cancelled`` with what it saw (``ctx.cancelled``); ``undo`` (the compensation) notes its run. The
worker's log lines (stderr) say how each cancel reached it (``worker.cancel_running``'s ``via``).
``--listen-notify`` is taken on PostgreSQL only (SQLite has no listener).
"""

from __future__ import annotations

import asyncio
from typing import Any

import geste

from .worker import activity_log, serve


def build_app(
    url: str,
    *,
    log: str | None = None,
    markers: str | None = None,
    worker_id: str | None = None,
    **options: Any,
) -> geste.App:
    """The App with its workflows; ``log`` is only needed where activities run."""
    if not url.startswith("postgres"):
        options.pop("listen_notify", None)
    app = geste.App(url, worker_id=worker_id, **options)
    note = activity_log(log, worker_id)

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


def main(argv: list[str] | None = None) -> None:
    serve(
        build_app,
        argv,
        prog="python -m tests.apps.cancel_app",
        lock_timeout=1.0,
        poll_interval=0.05,
        shutdown_grace=1.0,
        listen_notify=True,
    )


if __name__ == "__main__":
    main()
