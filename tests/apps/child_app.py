"""A worker process for the child-workflow tests (tests/test_child_workflows.py) and the benchmark.

Run from the repository root (``tests/apps/worker.py``, ``tests/processes.py``)::

    python -m tests.apps.child_app DATABASE_URL --worker-id W --markers DIR [--crash before|after]

The ``kid`` workflow's ``hold`` activity waits until the file ``DIR/go-<instance id>`` exists and writes
``DIR/ran-<instance id>-<worker id>`` when it returns, so a test can kill a worker mid-wait and see who
ran the child. ``--crash before``: the process exits (``os._exit``) at its first ``start_child``
transaction, before it is sent; ``after``: right after it committed, before the run goes on.
``--die-after-end ID``: it exits right after the end of instance ID committed, before anything else is
written.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

import geste

from .worker import serve


def build_app(
    url: str,
    *,
    markers: str,
    log: str | None = None,
    crash: str | None = None,
    die_after_end: str | None = None,
    **options: Any,
) -> geste.App:
    """The App with its workflows (``log`` is not used: the markers are this app's side effects)."""
    app = geste.App(url, **options)
    folder = Path(markers)
    if crash:
        crash_at_start_child(app, crash)
    if die_after_end:
        exit_after_end(app, die_after_end)

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


def exit_after_end(app: geste.App, instance_id: str) -> None:
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


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crash", choices=["before", "after"], default=None)
    parser.add_argument("--die-after-end", default=None)


def main(argv: list[str] | None = None) -> None:
    serve(
        build_app,
        argv,
        prog="python -m tests.apps.child_app",
        arguments=_arguments,
        lock_timeout=1.0,
        poll_interval=0.05,
    )


if __name__ == "__main__":
    main()
