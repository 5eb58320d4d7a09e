"""A sample app for the continue-as-new crash test: a loop that continues as new from run to run.

Run as a worker process from the repository root::

    python -m tests.apps.continue_app DATABASE_URL --worker-id W --log LOG --markers DIR [--die-after N]

It writes ``DIR/ready-W`` once its App is open and runs until SIGTERM/SIGINT. Each run of ``counter``
calls the activity ``tick`` (which appends a JSON line to ``LOG``: the instance, its run, the step's
idempotency key, the worker), emits an outbox event, and continues as new until its ``n`` reaches
``limit``. With ``--die-after N`` the process kills itself (SIGKILL, nothing flushed or released) right
after the N-th continue it commits, before the run unwinds: the next run is committed, and nobody holds it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import geste

from .crash_app import append_line


def build_app(url: str, *, log: str | None = None, worker_id: str | None = None, **options: Any) -> geste.App:
    app = geste.App(url, worker_id=worker_id, **options)

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


def die_after(app: geste.App, count: int) -> None:
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


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--markers", required=True)
    parser.add_argument("--die-after", type=int, default=0)
    args = parser.parse_args(argv)
    app = build_app(
        args.url,
        log=args.log,
        worker_id=args.worker_id,
        poll_interval=0.05,
        lock_timeout=2.0,
        listen_notify=False,  # the survivor finds the next run by polling, as any worker would
    )
    if args.die_after:
        die_after(app, args.die_after)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.shutdown)
    await app.open()
    (Path(args.markers) / f"ready-{args.worker_id}").write_text(str(os.getpid()))
    await app.run()  # already open: runs until shutdown(), then drains and closes


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
