"""A sample app for the crash, multi-process and cancellation tests.

Run as a worker process from the repository root::

    python -m tests.apps.crash_app DATABASE_URL --worker-id W --log LOG --markers DIR [--lock-timeout S ...]

It writes ``DIR/ready-W`` once its App is open, runs until SIGTERM/SIGINT (``app.shutdown()``), drains and
exits 0. With ``--claim-holds-until-shutdown=1``, a claim that took instances writes ``DIR/claimed-W`` and
answers only once the worker stops (a claim in flight when SIGTERM comes). Every activity appends JSON
lines to the side-effect log ``LOG``: one when it starts, one when it ends, with the instance, activity,
attempt, worker id, pid and time. A ``block`` activity waits until the file ``DIR/go-<instance id>``
exists, so a test can kill or stop a worker in the middle of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import geste

ACTIVITIES = ("one", "two", "three")


def append_line(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line in a single ``write`` on an ``O_APPEND`` file: atomic between processes."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build_app(
    url: str,
    *,
    log: str | None = None,
    markers: str | None = None,
    worker_id: str | None = None,
    **options: Any,
) -> geste.App:
    """The App with its workflows; ``log`` and ``markers`` are only needed where activities run."""
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

    def make_step(name: str) -> geste.Activity[[int], str]:
        async def step(ctx: geste.ActivityContext, x: int) -> str:
            note(ctx, "start")
            await asyncio.sleep(0.005)
            note(ctx, "end")
            return f"{name}:{x}"

        return app.activity(name=name)(step)

    one, two, three = (make_step(name) for name in ACTIVITIES)

    @app.activity
    async def block(ctx: geste.ActivityContext, x: int) -> str:
        """Waits for the marker file ``go-<instance id>``."""
        assert markers is not None
        note(ctx, "start")
        go = Path(markers) / f"go-{ctx.instance_id}"
        while not go.exists():
            await asyncio.sleep(0.02)
        note(ctx, "end")
        return f"block:{x}"

    @app.activity
    async def slow(ctx: geste.ActivityContext, seconds: float) -> str:
        note(ctx, "start")
        await asyncio.sleep(seconds)
        note(ctx, "end")
        return "slow"

    @app.activity
    async def undo(ctx: geste.ActivityContext, what: str) -> None:
        note(ctx, "start", what=what)
        note(ctx, "end")

    @app.workflow
    async def pipeline(ctx: geste.WorkflowContext, x: int) -> list[str]:
        """one, two, block, three."""
        return [await one(ctx, x), await two(ctx, x), await block(ctx, x), await three(ctx, x)]

    @app.workflow
    async def long(ctx: geste.WorkflowContext, seconds: float) -> str:
        return await slow(ctx, seconds) + "+" + await one(ctx, 0)

    @app.workflow
    async def batch(ctx: geste.WorkflowContext, x: int) -> list[str]:
        return [await one(ctx, x), await two(ctx, x), await three(ctx, x)]

    @app.workflow
    async def saga(ctx: geste.WorkflowContext, x: int) -> str:
        first = await one(ctx, x)
        ctx.on_failure(undo, first)
        await block(ctx, x)
        await three(ctx, x)
        return "not cancelled"

    return app


async def _serve(args: argparse.Namespace) -> None:
    app = build_app(
        args.url if "://" in args.url else f"sqlite:///{args.url}",
        log=args.log,
        markers=args.markers,
        worker_id=args.worker_id,
        lock_timeout=args.lock_timeout,
        poll_interval=args.poll_interval,
        shutdown_grace=args.shutdown_grace,
        concurrency=args.concurrency,
    )
    if args.claim_holds_until_shutdown:
        hold_claims_until_shutdown(app, Path(args.markers) / f"claimed-{args.worker_id}")
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, app.shutdown)
    await app.open()
    (Path(args.markers) / f"ready-{args.worker_id}").write_text(str(os.getpid()))
    await app.run()  # already open: runs until shutdown(), then drains and closes


def hold_claims_until_shutdown(app: geste.App, marker: Path) -> None:
    """A claim that took instances (committed) answers only once the worker is stopping: a whole claim
    or a claim by ids (a routed wake-up)."""

    def holding(real: Any) -> Any:
        async def claim(*args: Any, **kwargs: Any) -> Any:
            worker = app._worker
            claims = await real(*args, **kwargs)
            if claims and worker is not None:
                marker.write_text(json.dumps([c.lease.instance_id for c in claims]))  # noqa: ASYNC240
                while not worker.stopping:
                    await asyncio.sleep(0.01)
            return claims

        return claim

    app.storage.claim = holding(app.storage.claim)  # type: ignore[method-assign]
    app.storage.claim_ids = holding(app.storage.claim_ids)  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.crash_app")
    parser.add_argument("url", help="a database URL (a bare path is a SQLite file)")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--markers", required=True)
    parser.add_argument("--lock-timeout", type=float, default=1.0)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    parser.add_argument("--shutdown-grace", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--claim-holds-until-shutdown", type=int, default=0, help="1: see the module doc")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {args.worker_id} %(name)s %(message)s"
    )
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
