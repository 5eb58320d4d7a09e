"""A sample app for the continue-as-new crash test: a loop that continues as new from run to run.

Run as a worker process from the repository root (``tests/apps/worker.py``, ``tests/processes.py``)::

    python -m tests.apps.continue_app DATABASE_URL --worker-id W --log LOG --markers DIR [--die-after N]

Each run of ``counter`` calls the activity ``tick`` (which appends a JSON line to ``LOG``: the instance,
its run, the step's idempotency key, the worker), emits an outbox event, and continues as new until its
``n`` reaches ``limit``. With ``--die-after N`` the process kills itself (SIGKILL, nothing flushed or
released) right after the N-th continue it commits, before the run unwinds: the next run is committed,
and nobody holds it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Any

import geste

from .worker import append_line, serve


def build_app(
    url: str,
    *,
    log: str | None = None,
    markers: str | None = None,
    worker_id: str | None = None,
    die_after: int = 0,
    **options: Any,
) -> geste.App:
    """The App with its workflow; ``log`` is only needed where ``tick`` runs. ``die_after``: see
    ``kill_after_continues``."""
    app = geste.App(url, worker_id=worker_id, **options)
    if die_after:
        kill_after_continues(app, die_after)

    @app.activity
    async def tick(ctx: geste.ActivityContext, n: int) -> int:
        assert log is not None
        append_line(
            log, {"instance": ctx.instance_id, "n": n, "key": ctx.idempotency_key, "pid": os.getpid()}
        )
        return n

    @app.workflow
    async def counter(ctx: geste.WorkflowContext, n: int, limit: int, seen: list[int]) -> list[int]:
        got = await tick(ctx, n)
        await ctx.send_event("counted", {"n": got})  # commits the tick's row with it
        if n >= limit:
            return [*seen, got]
        await ctx.continue_as_new(n + 1, limit, [*seen, got])

    return app


def kill_after_continues(app: geste.App, count: int) -> None:
    """Kill this process right after the ``count``-th continue it commits. From the moment that continue
    starts, this worker's claims hang, so that nothing it does between the commit and the kill (an await
    gives other tasks their turn) can take the next run: the next run is left committed, nobody holding it.
    """
    storage = app.storage
    original = storage.continue_as_new
    dying = False
    done = 0

    async def continue_then_die(*args: Any, **kwargs: Any) -> Any:
        nonlocal done, dying
        dying = done + 1 >= count
        outcome = await original(*args, **kwargs)
        done += 1
        if dying:
            os.kill(os.getpid(), signal.SIGKILL)
        return outcome

    def frozen_when_dying(real: Any) -> Any:
        async def claim(*args: Any, **kwargs: Any) -> Any:
            if dying:
                await asyncio.Event().wait()  # never set: the kill comes first
            return await real(*args, **kwargs)

        return claim

    storage.continue_as_new = continue_then_die  # type: ignore[method-assign]
    storage.claim = frozen_when_dying(storage.claim)  # type: ignore[method-assign]
    storage.claim_ids = frozen_when_dying(storage.claim_ids)  # type: ignore[method-assign]


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--die-after", type=int, default=0)


def main(argv: list[str] | None = None) -> None:
    serve(
        build_app,
        argv,
        prog="python -m tests.apps.continue_app",
        arguments=_arguments,
        poll_interval=0.05,
        lock_timeout=2.0,
        listen_notify=False,  # the survivor finds the next run by polling, as any worker would
    )


if __name__ == "__main__":
    main()
