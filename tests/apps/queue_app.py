"""A sample app for the queue tests (tests/test_queues.py): worker processes racing on one queue.

Run as a worker process from the repository root::

    python -m tests.apps.queue_app DATABASE_URL --worker-id W --log LOG --markers DIR [--concurrency N]

It declares the queue ``limited`` (global concurrency ``--queue-concurrency``, per partition
``--partition-concurrency``), writes ``DIR/ready-W`` once
its App is open and runs until SIGTERM/SIGINT. Each ``job`` instance runs one activity that appends a
``start`` and an ``end`` JSON line (instance, worker, time) to ``LOG``, with ``--hold`` seconds between
them (so that runs can overlap: the test measures the most that ever did); a ``blocked`` instance's
activity waits for the file ``DIR/go-<instance id>`` (a worker can be killed in the middle of it).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import geste

from .worker import append_line, serve

QUEUE = "limited"


def build_app(
    url: str,
    *,
    log: str | None = None,
    markers: str | None = None,
    worker_id: str | None = None,
    queue_concurrency: int | None = 3,
    rate_limit: int | None = None,
    rate_period: float = 1.0,
    partition_concurrency: int | None = None,
    hold: float = 0.05,
    **options: Any,
) -> geste.App:
    queue = geste.Queue(
        QUEUE,
        concurrency=queue_concurrency or None,
        rate_limit=rate_limit or None,
        rate_period=rate_period,
        partition_concurrency=partition_concurrency or None,
    )
    app = geste.App(url, worker_id=worker_id, queues=[queue], **options)
    if log is not None and worker_id is not None:
        log_admissions(app, log, worker_id)

    def note(ctx: geste.ActivityContext, event: str) -> None:
        assert log is not None, "activities run only in a worker built with log="
        append_line(log, {"instance": ctx.instance_id, "event": event, "worker": worker_id, "t": time.time()})

    @app.activity
    async def work(ctx: geste.ActivityContext, x: int) -> int:
        note(ctx, "start")
        await asyncio.sleep(hold)
        note(ctx, "end")
        return x

    @app.activity
    async def wait_for_go(ctx: geste.ActivityContext, x: int) -> int:
        assert markers is not None
        note(ctx, "start")
        go = Path(markers) / f"go-{ctx.instance_id}"
        while not go.exists():
            await asyncio.sleep(0.02)
        note(ctx, "end")
        return x

    @app.workflow
    async def job(ctx: geste.WorkflowContext, x: int) -> int:
        return await work(ctx, x)

    @app.workflow
    async def blocked(ctx: geste.WorkflowContext, x: int) -> int:
        return await wait_for_go(ctx, x)

    return app


def log_admissions(app: geste.App, log: str, worker_id: str) -> None:
    """Each claim of the queue appends a ``claim`` line (how many it admitted: the claims a start costs
    the cluster are counted from these), and one that admitted instances an ``admit`` line too: the time
    the claim was made at (the one its rate window records) and how many it admitted. Each hand-on of a
    queue's backlog (the worker full) appends a ``hand_on`` line."""
    real = app.storage.queue_claim

    async def queue_claim(worker: str, now: float, *args: Any, **kwargs: Any) -> Any:
        claims = await real(worker, now, *args, **kwargs)
        append_line(log, {"event": "claim", "t": now, "n": len(claims), "worker": worker_id})
        if claims:
            append_line(log, {"event": "admit", "t": now, "n": len(claims), "worker": worker_id})
        return claims

    app.storage.queue_claim = queue_claim  # type: ignore[method-assign]
    real_hand_on = app.storage.hand_on_queue

    async def hand_on_queue(queue: str, key: str, *, avoid: str) -> bool:  # a ``hand_on`` line each
        append_line(log, {"event": "hand_on", "t": time.time(), "queue": queue, "worker": worker_id})
        return await real_hand_on(queue, key, avoid=avoid)

    app.storage.hand_on_queue = hand_on_queue  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    serve(
        build_app,
        argv,
        prog="python -m tests.apps.queue_app",
        queue_concurrency=3,  # 0: no limit
        rate_limit=0,  # 0: no rate
        rate_period=1.0,
        partition_concurrency=0,  # 0: no limit per partition
        hold=0.05,
        lock_timeout=2.0,
        poll_interval=0.05,
        concurrency=100,
        shutdown_grace=1.0,
        notify_fallback_interval=30.0,
    )


if __name__ == "__main__":
    main()
