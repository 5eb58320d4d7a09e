"""The chaos suite's application: workflows that use every kind of step, and their worker process.

Run as a worker from the repository root (the controller does it)::

    python -m tests.chaos.app DATABASE_URL --worker-id W --dir DIR

Every activity appends a JSON line to ``DIR/effects.jsonl`` when it starts and when it ends, with a token
unique to that execution that it also returns; the outbox destination appends each delivery to
``DIR/deliveries.jsonl``; an order appends to ``DIR/acks.jsonl`` the outcome of an activity once it is
past a write that committed it (geste acknowledged the step). All are written with one ``write`` on an
``O_APPEND`` file, so lines from concurrent processes never interleave, and a SIGKILL loses at most the
line being written. Activities and deliveries fail on purpose now and then (first attempts only), so
retries are part of the load.
The worker writes ``DIR/ready-W`` once it runs (and, on PostgreSQL, listens).

Two faults live here, switched by the controller: ``--skew=S`` runs the worker on a clock ``S`` seconds
off the machine's (the App's ``clock`` option: leases, timers, ``ctx.now()``, ``run_at``), and while the
file ``DIR/outage`` exists the outbox destination is down: it refuses every delivery (logged with
``"refused": "outage"``), as an HTTP endpoint answering 503 would.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import hashlib
import io
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import geste
from tests.apps.worker import append_line

LEDGERS = 4
"""Orders send one direct message each to ``ledger-<order % LEDGERS>``."""
NEWS_EVERY = 10
"""Orders whose number is a multiple of this publish one broadcast message on ``chaos.news``."""
RETRY = geste.RetryPolicy(max_attempts=6, initial_interval=0.02, max_interval=0.2)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a log (a worker killed mid-write leaves at most a torn last line)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def flaky(*key: Any) -> bool:
    """Whether the first attempt of this step fails on purpose: about one in eight, decided by its key
    (not by chance) so that a re-run after a crash fails the same way."""
    return hashlib.sha256(repr(key).encode()).digest()[0] < 32


def value_of(step: str, n: int) -> int:
    """The value activity ``step`` computes for ``n``: what the checker expects in results."""
    return {"reserve": n * 10, "charge": n * 10 + 7, "ship": n * 3 + 1}[step]


def build_app(url: str, *, folder: Path, worker_id: str | None = None, **options: Any) -> geste.App:
    effects = folder / "effects.jsonl"
    deliveries = folder / "deliveries.jsonl"
    outage = folder / "outage"
    acks = folder / "acks.jsonl"

    async def deliver(event: geste.OutboxEvent) -> None:
        line = {"event_id": event.event_id, "attempt": event.attempt, "worker": worker_id}
        if outage.exists():
            append_line(deliveries, {**line, "refused": "outage"})
            raise RuntimeError("the destination is down (503)")
        append_line(deliveries, line)
        if event.attempt == 1 and flaky("deliver", event.event_id):
            raise RuntimeError("the destination refused (on purpose)")

    app = geste.App(url, worker_id=worker_id, outbox_handler=deliver, **options)

    async def effect(ctx: geste.ActivityContext, step: str, n: int) -> dict[str, Any]:
        token = uuid.uuid4().hex
        base = {"instance": ctx.instance_id, "key": ctx.idempotency_key, "step": step, "n": n}
        append_line(effects, {**base, "event": "start", "attempt": ctx.attempt, "worker": worker_id})
        await asyncio.sleep(0.001 * (n % 5))
        if ctx.attempt == 1 and flaky(step, ctx.instance_id, n):
            raise RuntimeError(f"{step} failed on purpose")
        append_line(effects, {**base, "event": "end", "run": token, "worker": worker_id})
        return {"value": value_of(step, n) if step in ("reserve", "charge", "ship") else n, "run": token}

    def acknowledged(ctx: geste.WorkflowContext, step: str, outcome: dict[str, Any]) -> None:
        """Log an activity's outcome once the workflow is past a write that committed it: geste has
        acknowledged that step, which must then stay recorded (the checker compares with the history)."""
        append_line(acks, {"instance": ctx.instance_id, "step": step, "run": outcome["run"]})

    @app.activity(name="reserve", retry=RETRY)
    async def reserve(ctx: geste.ActivityContext, n: int) -> dict[str, Any]:
        return await effect(ctx, "reserve", n)

    @app.activity(name="charge", retry=RETRY)
    async def charge(ctx: geste.ActivityContext, n: int) -> dict[str, Any]:
        return await effect(ctx, "charge", n)

    @app.activity(name="ship", retry=RETRY)
    async def ship(ctx: geste.ActivityContext, n: int) -> dict[str, Any]:
        return await effect(ctx, "ship", n)

    @app.activity(name="book", retry=RETRY)
    async def book(ctx: geste.ActivityContext, n: int) -> dict[str, Any]:
        return await effect(ctx, "book", n)

    @app.activity(name="work", retry=RETRY)
    async def work(ctx: geste.ActivityContext, n: int) -> dict[str, Any]:
        return await effect(ctx, "work", n)

    @app.workflow
    async def order(ctx: geste.WorkflowContext, n: int) -> dict[str, Any]:
        """An activity, a durable sleep, an event wait, another activity, a direct message, sometimes a
        broadcast, an outbox event, a last activity."""
        reserved = await reserve(ctx, n)
        await ctx.sleep(0.05 + (n % 7) * 0.2)
        acknowledged(ctx, "reserve", reserved)  # committed with the sleep
        paid = await ctx.wait_event("chaos.paid", match={"order": n})
        charged = await charge(ctx, paid.data["order"])
        await ctx.send_to(f"ledger-{n % LEDGERS}", "ledger", {"order": n})
        if n % NEWS_EVERY == 0:
            await ctx.publish("chaos.news", {"from": f"order-{n}"})
        event_id = await ctx.send_event("chaos.shipped", {"order": n})
        acknowledged(ctx, "charge", charged)  # committed at the latest with the outbox event
        shipped = await ship(ctx, n)
        steps = (reserved, charged, shipped)
        return {
            "order": n,
            "amount": paid.data["amount"],
            "values": [s["value"] for s in steps],
            "runs": [s["run"] for s in steps],
            "event_id": event_id,
        }

    @app.workflow
    async def ledger(ctx: geste.WorkflowContext, k: int, expected: int) -> dict[str, Any]:
        """Take ``expected`` direct messages, booking each with an activity."""
        await ctx.subscribe("ledger")
        orders, runs = [], []
        for _ in range(expected):
            message = await ctx.receive("ledger")
            booked = await book(ctx, message.data["order"])
            orders.append(message.data["order"])
            runs.append(booked["run"])
        return {"orders": orders, "runs": runs}

    @app.workflow
    async def listener(ctx: geste.WorkflowContext, k: int, expected: int) -> list[Any]:
        """Take ``expected`` broadcast messages from ``chaos.news``, in publication order."""
        await ctx.subscribe("chaos.news")
        return [(await ctx.receive("chaos.news")).message_id for _ in range(expected)]

    @app.workflow
    async def competitor(ctx: geste.WorkflowContext, k: int) -> dict[str, Any]:
        """Share ``chaos.jobs`` with the other competitors, working each job, until a ``stop``."""
        await ctx.subscribe("chaos.jobs", "competing")
        jobs, runs = [], []
        while True:
            message = await ctx.receive("chaos.jobs")
            if message.data == "stop":
                return {"jobs": jobs, "runs": runs, "stop": message.message_id}
            worked = await work(ctx, message.data["job"])
            jobs.append(message.data["job"])
            runs.append(worked["run"])

    return app


async def _serve(args: argparse.Namespace) -> None:
    folder = Path(args.dir)
    app = build_app(
        args.url,
        folder=folder,
        worker_id=args.worker_id,
        clock=(lambda: time.time() + args.skew) if args.skew else time.time,
        lock_timeout=args.lock_timeout,
        listen_database_url=args.listen_url,
        poll_interval=0.2,
        shutdown_grace=1.0,
        notify_fallback_interval=1.0,
        notify_reconnect_delay=0.2,
        outbox_initial_backoff=0.05,
        outbox_max_backoff=0.5,
        outbox_max_attempts=1000,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, app.shutdown)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)  # the controller's diagnosis of a stuck worker
    faulthandler.register(signal.SIGUSR2)  # the threads' stacks, even with the event loop blocked
    await app.open()
    while app.notify.enabled and app.listener_status().state != "listening":
        await asyncio.sleep(0.01)
    (folder / f"ready-{args.worker_id}").write_text(str(os.getpid()))
    await app.run()  # already open: runs until shutdown(), then drains and closes


def _dump_tasks() -> None:
    """Log the stack of every asyncio task (SIGUSR1)."""
    for task in asyncio.all_tasks():
        stack = io.StringIO()
        task.print_stack(limit=12, file=stack)
        logging.getLogger("chaos").warning("task %s:\n%s", task.get_name(), stack.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.app")
    parser.add_argument("url")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--skew", type=float, default=0.0, help="seconds this worker's clock is off")
    parser.add_argument("--lock-timeout", type=float, default=1.0)
    parser.add_argument("--listen-url", default=None, help="the listener's direct URL (the url: a pooler)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s {args.worker_id} %(name)s %(message)s"
    )
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
