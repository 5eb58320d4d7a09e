"""A sample app for the outbox tests: a worker process whose relay posts to a test HTTP server.

Run from the repository root::

    python -m tests.apps.outbox_app DATABASE_URL --endpoint URL --ready FILE [--worker-id W ...]

It opens its App (a worker and a relay delivering to ``--endpoint``), writes ``FILE`` (its pid) and runs
until SIGTERM/SIGINT (``app.shutdown()``), drains and exits 0. A test kills it with SIGKILL while the HTTP
server holds one of its deliveries, to show the event is sent again by another relay.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import geste

from .worker import run_worker


def build_app(url: str, **options: Any) -> geste.App:
    app = geste.App(url, **options)

    @app.workflow
    async def emit(ctx: geste.WorkflowContext, count: int) -> list[str]:
        """Emit ``count`` events ``test.emitted`` with data ``{"i": i}``, in order."""
        return [await ctx.send_event("test.emitted", {"i": i}) for i in range(count)]

    return app


async def _serve(args: argparse.Namespace) -> None:
    app = build_app(
        args.url,
        worker_id=args.worker_id,
        outbox_endpoint=args.endpoint,
        outbox_timeout=args.outbox_timeout,
        outbox_initial_backoff=0.1,
        lock_timeout=args.lock_timeout,
        poll_interval=args.poll_interval,
        shutdown_grace=1.0,
    )
    await run_worker(app, args.ready)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.outbox_app")
    parser.add_argument("url")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--worker-id", default="outbox-worker")
    parser.add_argument("--lock-timeout", type=float, default=1.0)
    parser.add_argument("--outbox-timeout", type=float, default=1.0)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {args.worker_id} %(name)s %(message)s"
    )
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
