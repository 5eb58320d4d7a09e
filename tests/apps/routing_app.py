"""A worker process for the routing tests (``tests/test_routing.py``): it reports the claims it ran.

Run from the repository root::

    python -m tests.apps.routing_app DATABASE_URL --worker-id W --ready FILE --report FILE
        [--lock-timeout S --fallback-interval S --concurrency N --start WORKFLOW:INSTANCE_ID:ARG]

It opens its App (a worker), waits until its listener listens, optionally starts workflows itself (they
run here at once), writes ``FILE`` (its pid) and runs until SIGTERM/SIGINT. On SIGUSR1 it appends one
JSON line to the report file: its claim rounds and the runs they started by wake-up cause (its metrics),
the instances they took, the wake-ups it handed on, and the statements it sent by query name and the
transactions it began (counted in the process by ``benchmarks/herd.py``'s ``count_statements``).
With ``GESTE_TEST_HOLD=1`` the ``hold`` activity never returns here.
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
from geste._metrics import WAKE_CAUSES

from .worker import append_line, run_worker

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import herd  # the benchmark's in-process statement counter

EVENT = "routing.go"


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
    async def cycle(ctx: geste.WorkflowContext, rounds: int) -> list[int]:
        """``rounds`` times: wait for an event sent to it, then a durable 0.2 s sleep (issue 15's
        wake-up); the pid of the process of each round."""
        pids = []
        for _ in range(rounds):
            await ctx.wait_event(EVENT)
            await ctx.sleep(0.2)
            pids.append(await whoami(ctx))
        return pids

    @app.workflow
    async def sleeper(ctx: geste.WorkflowContext, seconds: float) -> int:
        await ctx.sleep(seconds)
        return await whoami(ctx)

    @app.workflow
    async def held(ctx: geste.WorkflowContext) -> int:
        return await hold(ctx)

    return app


def report(app: geste.App, path: str) -> None:
    async def write() -> None:
        snap = await app.metrics.snapshot()
        worker = app._worker
        line = {
            "worker": app.worker_id,
            "pid": os.getpid(),
            "t": time.time(),
            "rounds": {cause: snap.value("geste_claim_rounds_total", cause=cause) for cause in WAKE_CAUSES},
            "woken": {
                cause: snap.value("geste_wakeup_latency_seconds_count", cause=cause) for cause in WAKE_CAUSES
            },
            "claimed": snap.value("geste_claimed_instances_total"),
            "handed_on": 0 if worker is None else worker.handed_on,
            "statements": dict(herd.STATEMENTS),
        }
        append_line(path, line)

    task = asyncio.get_running_loop().create_task(write())
    REPORTS.add(task)
    task.add_done_callback(REPORTS.discard)


REPORTS: set[asyncio.Task[None]] = set()


async def _serve(args: argparse.Namespace) -> None:
    herd.count_statements()
    app = build_app(
        args.url,
        worker_id=args.worker_id,
        poll_interval=args.poll_interval,
        lock_timeout=args.lock_timeout,
        notify_fallback_interval=args.fallback_interval,
        shutdown_grace=0.2,
        notify_reconnect_delay=0.2,
        concurrency=args.concurrency,
    )
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, report, app, args.report)

    async def start(app: geste.App) -> None:
        for start in args.start:
            workflow, instance_id, arg = start.split(":", 2)
            params = [] if arg == "" else [float(arg) if workflow == "sleeper" else int(arg)]
            await app.start_workflow(workflow, *params, instance_id=instance_id)

    await run_worker(app, args.ready, listening=True, before_ready=start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.routing_app")
    parser.add_argument("url")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--lock-timeout", type=float, default=3.0)
    parser.add_argument("--fallback-interval", type=float, default=300.0)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--start", action="append", default=[], help="WORKFLOW:INSTANCE_ID:ARG")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
