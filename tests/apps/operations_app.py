"""A sample app for the operator-action tests: a worker process running a workflow that fails until fixed.

Run from the repository root::

    python -m tests.apps.operations_app DATABASE_URL --ready FILE --markers DIR [--poll-interval S ...]

It opens its App (a worker), waits until its listener listens (PostgreSQL), writes ``FILE`` (its pid)
and runs until SIGTERM/SIGINT. Its activities leave traces in ``DIR`` (``$GESTE_TEST_MARKERS``): ``first``
appends a line to ``first-<instance>`` each time it runs; ``second`` fails until the file ``fixed``
exists there (the operator's fix). ``waiter`` waits for a ``go`` event.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import geste

from .worker import run_worker


def build_app(url: str, **options: Any) -> geste.App:
    app = geste.App(url, **options)

    def markers() -> Path:
        return Path(os.environ["GESTE_TEST_MARKERS"])

    @app.activity
    async def first(ctx: geste.ActivityContext, x: int) -> int:
        def append() -> None:
            with (markers() / f"first-{ctx.instance_id}").open("a") as out:
                out.write(f"{os.getpid()}\n")

        await asyncio.to_thread(append)
        return x + 1

    @app.activity(retry=geste.RetryPolicy(max_attempts=2, initial_interval=0.01))
    async def second(ctx: geste.ActivityContext, y: int) -> dict[str, int]:
        if not await asyncio.to_thread((markers() / "fixed").exists):
            raise ConnectionError("the service is down")
        return {"value": y * 10, "pid": os.getpid()}

    @app.workflow
    async def pipeline(ctx: geste.WorkflowContext, x: int) -> dict[str, int]:
        return await second(ctx, await first(ctx, x))

    @app.workflow
    async def waiter(ctx: geste.WorkflowContext) -> Any:
        """Waits for a ``go`` event with no deadline."""
        return (await ctx.wait_event("go")).data

    return app


async def _serve(args: argparse.Namespace) -> None:
    os.environ["GESTE_TEST_MARKERS"] = args.markers
    app = build_app(
        args.url,
        poll_interval=args.poll_interval,
        lock_timeout=args.lock_timeout,
        notify_fallback_interval=args.fallback_interval,
        shutdown_grace=0.2,
    )
    await run_worker(app, args.ready, listening=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.operations_app")
    parser.add_argument("url")
    parser.add_argument("--ready", required=True, help="file written once the worker runs (and listens)")
    parser.add_argument("--markers", required=True, help="folder of the activities' traces")
    parser.add_argument("--poll-interval", type=float, default=0.05)
    parser.add_argument("--lock-timeout", type=float, default=2.0)
    parser.add_argument("--fallback-interval", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
