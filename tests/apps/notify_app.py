"""A sample app for the LISTEN/NOTIFY tests: a worker process that only a notification can wake quickly.

Run from the repository root::

    python -m tests.apps.notify_app DATABASE_URL --ready FILE [--poll-interval S --lock-timeout S ...]
        [--start WORKFLOW:INSTANCE_ID:ARG]

It opens its App (a worker), waits until its listener is ``listening``, optionally starts a workflow
itself (so it runs here at once, without any notification), then writes ``FILE`` (its pid) and runs
until SIGTERM/SIGINT (``app.shutdown()``), drains and exits 0. With the environment variable
``GESTE_TEST_HOLD=1`` the ``hold`` activity never returns in this process (a test stops the worker in it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

import geste

from .worker import run_worker


def build_app(url: str, **options: Any) -> geste.App:
    app = geste.App(url, **options)

    @app.activity
    async def whoami(ctx: geste.ActivityContext) -> int:
        """The pid of the process that ran this step."""
        return os.getpid()

    @app.activity
    async def hold(ctx: geste.ActivityContext) -> int:
        while os.environ.get("GESTE_TEST_HOLD") == "1":
            await asyncio.sleep(0.05)
        return os.getpid()

    @app.workflow
    async def waiter(ctx: geste.WorkflowContext, event_type: str) -> Any:
        event = await ctx.wait_event(event_type)
        return {"data": event.data, "pid": await whoami(ctx)}

    @app.workflow
    async def sleeper(ctx: geste.WorkflowContext, seconds: float) -> int:
        await ctx.sleep(seconds)
        return await whoami(ctx)

    @app.workflow
    async def held(ctx: geste.WorkflowContext) -> int:
        return await hold(ctx)

    return app


async def _serve(args: argparse.Namespace) -> None:
    app = build_app(
        args.url,
        worker_id=args.worker_id,
        poll_interval=args.poll_interval,
        lock_timeout=args.lock_timeout,
        notify_fallback_interval=args.fallback_interval,
        shutdown_grace=args.shutdown_grace,
        notify_reconnect_delay=args.reconnect_delay,
    )

    async def start(app: geste.App) -> None:
        for start in args.start:
            workflow, instance_id, arg = start.split(":", 2)
            params = [] if arg == "" else [float(arg) if workflow == "sleeper" else arg]
            await app.start_workflow(workflow, *params, instance_id=instance_id)

    await run_worker(app, args.ready, listening=True, before_ready=start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.notify_app")
    parser.add_argument("url")
    parser.add_argument("--ready", required=True, help="file written once the listener listens")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--poll-interval", type=float, default=300.0)
    parser.add_argument("--lock-timeout", type=float, default=300.0)
    parser.add_argument("--fallback-interval", type=float, default=300.0)
    parser.add_argument("--shutdown-grace", type=float, default=0.2)
    parser.add_argument("--reconnect-delay", type=float, default=0.2)
    parser.add_argument("--start", action="append", default=[], help="WORKFLOW:INSTANCE_ID:ARG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
