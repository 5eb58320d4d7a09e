"""A sample app for the crash, multi-process and cancellation tests.

Run as a worker process (``tests/apps/worker.py``, ``tests/processes.py``) from the repository root::

    python -m tests.apps.crash_app DATABASE_URL --worker-id W --log LOG --markers DIR [--lock-timeout S ...]

With ``--claim-holds-until-shutdown=1``, a claim that took instances writes ``DIR/claimed-W`` and answers
only once the worker stops (a claim in flight when SIGTERM comes). Every activity appends JSON lines to the
side-effect log ``LOG``: one when it starts, one when it ends, with the instance, activity, attempt, worker
id, pid and time. A ``block`` activity waits until the file ``DIR/go-<instance id>`` exists, so a test can
kill or stop a worker in the middle of it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import geste

from .worker import activity_log, serve

ACTIVITIES = ("one", "two", "three")


def build_app(
    url: str,
    *,
    log: str | None = None,
    markers: str | None = None,
    worker_id: str | None = None,
    claim_holds_until_shutdown: bool = False,
    **options: Any,
) -> geste.App:
    """The App with its workflows; ``log`` and ``markers`` are only needed where activities run."""
    app = geste.App(url, worker_id=worker_id, **options)
    note = activity_log(log, worker_id)
    if claim_holds_until_shutdown:
        assert markers is not None
        hold_claims_until_shutdown(app, Path(markers) / f"claimed-{worker_id}")

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
    serve(
        build_app,
        argv,
        prog="python -m tests.apps.crash_app",
        lock_timeout=1.0,
        poll_interval=0.05,
        shutdown_grace=2.0,
        concurrency=100,
        claim_holds_until_shutdown=False,
    )


if __name__ == "__main__":
    main()
