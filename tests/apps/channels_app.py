"""A sample app for the channel tests: a worker process that receives messages.

Run from the repository root::

    python -m tests.apps.channels_app DATABASE_URL --ready FILE [--poll-interval S --lock-timeout S ...]

It opens its App (a worker), waits until its listener listens (PostgreSQL), writes ``FILE`` (its pid)
and runs until SIGTERM/SIGINT. In this process the ``hold`` activity writes a marker file
``hold-<instance>-<index>`` into ``$GESTE_TEST_MARKERS`` (when set) and, with ``GESTE_TEST_HOLD=1``,
never returns: a test kills the worker there.
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

    @app.activity
    async def hold(ctx: geste.ActivityContext, index: int) -> int:
        """The pid of the process that ran this step (after holding it, in a held worker)."""
        markers = os.environ.get("GESTE_TEST_MARKERS")
        if markers:
            marker = Path(markers, f"hold-{ctx.instance_id}-{index}")
            await asyncio.to_thread(marker.write_text, str(os.getpid()))
        while os.environ.get("GESTE_TEST_HOLD") == "1":
            await asyncio.sleep(0.05)
        return os.getpid()

    @app.workflow
    async def receiver(ctx: geste.WorkflowContext, channel: str, count: int) -> dict[str, Any]:
        """Subscribe to ``channel``, then take ``count`` messages, running ``hold`` after each."""
        await ctx.subscribe(channel)
        data, pids = [], []
        for index in range(count):
            message = await ctx.receive(channel)
            data.append(message.data)
            pids.append(await hold(ctx, index))
        return {"data": data, "pids": pids}

    return app


async def _serve(args: argparse.Namespace) -> None:
    app = build_app(
        args.url,
        worker_id=args.worker_id,
        poll_interval=args.poll_interval,
        lock_timeout=args.lock_timeout,
        notify_fallback_interval=args.fallback_interval,
        shutdown_grace=0.2,
        notify_reconnect_delay=0.2,
    )
    await run_worker(app, args.ready, listening=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.channels_app")
    parser.add_argument("url")
    parser.add_argument("--ready", required=True, help="file written once the worker runs (and listens)")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    parser.add_argument("--lock-timeout", type=float, default=1.0)
    parser.add_argument("--fallback-interval", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
