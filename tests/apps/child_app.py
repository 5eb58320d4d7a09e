"""A worker process for the child-workflow tests (tests/test_child_workflows.py) and the benchmark.

Run from the repository root::

    python -m tests.apps.child_app DATABASE_URL --worker-id W --markers DIR [--crash before|after]

It writes ``DIR/ready-W`` once its App is open and runs until SIGTERM/SIGINT. The ``kid`` workflow's
``hold`` activity waits until the file ``DIR/go-<instance id>`` exists and writes ``DIR/ran-<instance
id>-<worker id>`` when it returns, so a test can kill a worker mid-wait and see who ran the child.
``--crash before``: the process exits (``os._exit``) at its first ``start_child`` transaction, before
it is sent; ``after``: right after it committed, before the run goes on. ``--die-after-end ID``: it exits
right after the end of instance ID committed, before anything else is written.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import geste


def build_app(url: str, *, markers: str, **options: Any) -> geste.App:
    app = geste.App(url, **options)
    folder = Path(markers)

    @app.activity()
    async def hold(ctx: geste.ActivityContext, n: int) -> int:
        while not (folder / f"go-{ctx.instance_id}").exists():
            await asyncio.sleep(0.01)
        (folder / f"ran-{ctx.instance_id}-{app.worker_id}").touch()
        return 2 * n

    @app.workflow()
    async def kid(ctx: geste.WorkflowContext, n: int) -> int:
        return await hold(ctx, n)

    @app.workflow()
    async def quick(ctx: geste.WorkflowContext, n: int) -> int:
        return n + 1

    @app.workflow()
    async def parent(ctx: geste.WorkflowContext, n: int) -> int:
        return await ctx.run_child(kid, n)

    @app.workflow()
    async def quick_parent(ctx: geste.WorkflowContext, n: int) -> int:
        return await ctx.run_child(quick, n)

    @app.workflow()
    async def idle(ctx: geste.WorkflowContext) -> None:
        await ctx.wait_event("never")

    @app.workflow()
    async def closer(ctx: geste.WorkflowContext, policies: list[str], then_wait: bool) -> list[str]:
        """Starts an idle child with each policy, then ends (or waits, for a cancel)."""
        started = [(await ctx.start_child(idle, parent_close=policy)).id for policy in policies]
        if then_wait:
            await ctx.wait_event("never")
        return started

    return app


def die_after_end(app: geste.App, instance_id: str) -> None:
    real = app.storage.finish

    async def finish(commit: Any, **kwargs: Any) -> None:
        await real(commit, **kwargs)
        if commit.lease.instance_id == instance_id:
            os._exit(9)

    app.storage.finish = finish  # type: ignore[method-assign]


def crash_at_start_child(app: geste.App, when: str) -> None:
    real = app.storage.start_child

    async def start_child(*args: Any, **kwargs: Any) -> Any:
        if when == "before":
            os._exit(9)
        found = await real(*args, **kwargs)
        os._exit(9)
        return found  # pragma: no cover

    app.storage.start_child = start_child  # type: ignore[method-assign]


async def _serve(args: argparse.Namespace) -> None:
    app = build_app(
        args.url,
        markers=args.markers,
        worker_id=args.worker_id,
        lock_timeout=args.lock_timeout,
        poll_interval=args.poll_interval,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, app.shutdown)
    await app.open()
    if args.crash:
        crash_at_start_child(app, args.crash)
    if args.die_after_end:
        die_after_end(app, args.die_after_end)
    (Path(args.markers) / f"ready-{args.worker_id}").write_text(str(os.getpid()))
    await app.run()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.child_app")
    parser.add_argument("url")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--markers", required=True)
    parser.add_argument("--lock-timeout", type=float, default=1.0)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    parser.add_argument("--crash", choices=["before", "after"], default=None)
    parser.add_argument("--die-after-end", default=None)
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
