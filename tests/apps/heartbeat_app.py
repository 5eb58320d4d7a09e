"""A worker process for the heartbeat crash test (tests/test_heartbeats.py).

    python -m tests.apps.heartbeat_app DATABASE_URL --worker-id W --markers DIR [--stop-at N]

It writes ``DIR/ready-W`` once its App is open. Its ``crunch`` activity heartbeats its progress
(``{"done": i, "worker": W}``) one item at a time from where the last attempt's details left it; with
``--stop-at N`` it hangs after the N-th item (writing ``DIR/stuck-W``), so that the test kills the process
mid-activity and another worker's next attempt resumes from the details the dead one's renewals wrote.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

import geste

LOCK_TIMEOUT = 1.0


def build_app(url: str, *, worker_id: str, markers: Path, stop_at: int | None = None) -> geste.App:
    app = geste.App(url, worker_id=worker_id, lock_timeout=LOCK_TIMEOUT, poll_interval=0.05)

    @app.activity(heartbeat_timeout=60.0)
    async def crunch(ctx: geste.ActivityContext, total: int) -> dict[str, Any]:
        previous = ctx.heartbeat_details
        start = 0 if previous is None else int(previous["done"])
        for i in range(start, total):
            ctx.heartbeat({"done": i + 1, "worker": worker_id})
            if stop_at is not None and i + 1 == stop_at:
                (markers / f"stuck-{worker_id}").touch()
                await asyncio.Event().wait()  # hangs here until the process is killed
        return {"resumed_from": previous, "worker": worker_id, "attempt": ctx.attempt}

    @app.workflow
    async def crunching(ctx: geste.WorkflowContext, total: int) -> dict[str, Any]:
        return await crunch(ctx, total)

    return app


async def _serve(args: argparse.Namespace) -> None:
    markers = Path(args.markers)
    app = build_app(args.url, worker_id=args.worker_id, markers=markers, stop_at=args.stop_at)
    await app.open()
    (markers / f"ready-{args.worker_id}").write_text(str(os.getpid()))
    await app.run()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.heartbeat_app")
    parser.add_argument("url")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--markers", required=True)
    parser.add_argument("--stop-at", type=int, default=None)
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
