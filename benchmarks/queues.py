"""Admissions per second from a queue, and the latency from start to run, with 4 worker processes.

    .venv/bin/python benchmarks/queues.py                      # 4 workers, 5,000 queued, 3 runs
    .venv/bin/python benchmarks/queues.py --runs 1 --backlog 2000 --starts 50

Issue 19's benchmark, on PostgreSQL. Worker processes (default options, ``concurrency`` 100 each) serve
two queues: ``limited`` (a global limit, ``--limit``, 50 by default) and ``free`` (no limit), and run a
trivial workflow (no activity: its code runs once and it completes). For each queue:

- **admissions/s**: a backlog of ``--backlog`` instances is started onto a queue no worker serves
  (``gate``), then moved onto the measured queue in one statement, which also sends the notification a
  start onto it sends (so every instance is queued before the first claim, and the workers start together:
  the figure is the claims' pace, not the starts'). The rate is the backlog divided by the time from that
  commit to the last instance's code running (each worker process notes when the code of each instance
  ran; one host, one clock). Also counted in the workers: the ``queue_claim`` statements, whence the
  claims/s and the instances admitted per claim, and every statement the workers sent per admission.
- **start to run** (capacity free): then ``--starts`` instances started one at a time onto the queue by a
  client App (``run_worker=False``) in this process, each once the one before has run: from the call of
  ``start()`` (its insert's round trip included: the run can begin before the call returns) to the
  instance's code running in a worker, p50 and p90; with the
  ``queue_claim`` statements the workers ran per start (how many workers acted on the start's
  notification: one is herd-free).

Medians over ``--runs`` runs, each on a database of its own (created and dropped). The load average is
printed: the machine may be shared. No figure is asserted. The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from herd import (  # type: ignore[import-not-found]
    SERVER,
    STATEMENTS,
    TRANSACTIONS,
    _admin,
    _percentile,
    count_statements,
    emit,
    with_database,
)

import geste

SCRIPT = os.path.abspath(__file__)
STEP_TIMEOUT = 120.0
GATE = "gate"
CLAIM_US = "(claim time)"
QUEUES = ("limited", "free")
RAN: dict[str, float] = {}
"""In a worker process: when the code of each instance first ran here."""
CLAIM_TIME = [0.0]
"""In a worker process: the seconds spent in ``queue_claim`` calls (round trips included)."""


def build_app(url: str, limit: int, activity: bool = False, **options: Any) -> geste.App:
    app = geste.App(
        url,
        queues=[geste.Queue("limited", concurrency=limit), geste.Queue("free")],
        **options,
    )

    @app.activity
    async def step(ctx: geste.ActivityContext) -> None:
        return None

    @app.workflow
    async def noop(ctx: geste.WorkflowContext, report: bool) -> None:
        if ctx.instance_id not in RAN:
            RAN[ctx.instance_id] = time.time()
            if report:  # the start-to-run samples: at once (the backlog's are read at the end)
                emit("ran", id=ctx.instance_id, at=RAN[ctx.instance_id])
        if activity:
            await step(ctx)

    return app


def time_claims(app: geste.App) -> None:
    """Add the time of each ``queue_claim`` call of this process to ``CLAIM_TIME``."""
    real = app.storage.queue_claim

    async def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return await real(*args, **kwargs)
        finally:
            CLAIM_TIME[0] += time.perf_counter() - began

    app.storage.queue_claim = timed  # type: ignore[method-assign]


def serve(url: str, worker_id: str, limit: int, activity: bool) -> None:
    count_statements()
    app = build_app(url, limit, activity, worker_id=worker_id)
    time_claims(app)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, app.shutdown)

        def report() -> None:
            emit("counts", statements=dict(STATEMENTS), ran=RAN, claim_time=CLAIM_TIME[0])

        loop.add_signal_handler(signal.SIGUSR1, report)

        def orphaned() -> None:  # the benchmark died without stopping us: stdin closes, we stop
            sys.stdin.read()
            loop.call_soon_threadsafe(app.shutdown)

        threading.Thread(target=orphaned, daemon=True).start()
        await app.open()
        while app.listener_status().state != "listening":
            await asyncio.sleep(0.01)
        emit("ready")
        await app.run()

    asyncio.run(run())


class Worker:
    """A worker process of this script."""

    def __init__(
        self,
        url: str,
        worker_id: str,
        args: argparse.Namespace,
        ran: dict[str, float],
        changed: asyncio.Event,
    ):
        self.url, self.worker_id, self.limit, self.activity = url, worker_id, args.limit, args.activity
        self.ran, self.changed = ran, changed
        self.ready = asyncio.Event()
        self.counts: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            SCRIPT,
            "--serve",
            self.url,
            "--worker-id",
            self.worker_id,
            "--limit",
            str(self.limit),
            *(["--activity"] if self.activity else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,
        )
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if not line.startswith("@@ "):
                continue
            kind, _, body = line[3:].partition(" ")
            fields = json.loads(body)
            if kind == "ready":
                self.ready.set()
            elif kind == "counts":
                self.counts.put_nowait(fields)
            elif kind == "ran":
                self.ran.setdefault(fields["id"], fields["at"])
                self.changed.set()

    async def snapshot(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGUSR1)
        async with asyncio.timeout(STEP_TIMEOUT):
            return await self.counts.get()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


async def _snapshot(procs: list[Worker]) -> tuple[Counter[str], dict[str, float]]:
    """Every worker's counts: statements (and, under ``(claim time)``, the microseconds spent in
    ``queue_claim``), and when each instance's code ran."""
    statements: Counter[str] = Counter()
    ran: dict[str, float] = {}
    for proc in procs:
        found = await proc.snapshot()
        statements += Counter(found["statements"])
        statements[CLAIM_US] += int(found["claim_time"] * 1e6)
        for iid, at in found["ran"].items():
            ran[iid] = min(at, ran.get(iid, at))
    return statements, ran


async def _release(url: str, queue: str) -> float:
    """Move the gate's backlog onto ``queue``, with the notification of a start onto it, in one commit."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("UPDATE geste_instances SET queue = $1 WHERE queue = $2", queue, GATE)
            payload = json.dumps({"queue": queue, "schema": "public"})
            await conn.execute("SELECT pg_notify('geste_workflow_resumable', $1)", payload)
        return time.time()
    finally:
        await conn.close()


async def _one(args: argparse.Namespace) -> dict[str, Any]:
    """One life of a fresh database: for each queue, the backlog released then the starts one by one."""
    name = f"geste_queues_{uuid.uuid4().hex[:12]}"
    url = with_database(SERVER, name)
    await _admin(f'CREATE DATABASE "{name}"', SERVER)
    ran: dict[str, float] = {}
    changed = asyncio.Event()
    procs = [Worker(url, f"queues-{n}", args, ran, changed) for n in range(args.workers)]
    found: dict[str, Any] = {}
    try:
        # the client App migrates the database and declares the queues
        async with build_app(url, args.limit, args.activity, run_worker=False) as client:
            for proc in procs:
                await proc.start()
            async with asyncio.timeout(STEP_TIMEOUT):
                await asyncio.gather(*(proc.ready.wait() for proc in procs))
            await asyncio.sleep(args.settle)  # the heartbeats read each other: the views settle
            noop = client.workflows["noop"]
            for queue in QUEUES:
                gated = noop.options(queue=GATE)
                for first in range(0, args.backlog, 100):
                    await asyncio.gather(
                        *(gated.start(False) for _ in range(first, min(first + 100, args.backlog)))
                    )
                before, seen = await _snapshot(procs)
                released = await _release(url, queue)
                async with asyncio.timeout(STEP_TIMEOUT):
                    while True:
                        await asyncio.sleep(0.05)
                        rows = await client.storage._pool.fetchval(  # type: ignore[attr-defined]
                            "SELECT count(*) FROM geste_instances WHERE queue = $1 AND status = 'completed'",
                            queue,
                        )
                        if rows >= args.backlog:
                            break
                after, now_ran = await _snapshot(procs)
                fresh = [at for iid, at in now_ran.items() if iid not in seen]
                spent = max(fresh) - released
                stmts = after - before
                claims = stmts["queue_claim"]
                claim_us = stmts.pop(CLAIM_US, 0)
                stmts.pop(TRANSACTIONS, 0)
                backlog = {
                    "admitted": len(fresh),
                    "seconds": spent,
                    "admissions_per_s": len(fresh) / spent,
                    "queue_claims_per_s": claims / spent,
                    "admitted_per_claim": len(fresh) / claims if claims else 0.0,
                    "claim_ms": claim_us / 1000 / claims if claims else 0.0,
                    "statements_per_admission": stmts.total() / len(fresh),
                    "statements": dict(stmts),
                }
                # start to run, capacity free: one start at a time
                before, _ = await _snapshot(procs)
                latencies: list[float] = []
                onto = noop.options(queue=queue)
                for _ in range(args.starts):
                    await asyncio.sleep(args.gap)
                    started = time.time()  # before the call: the run can begin before start() returns
                    handle = await onto.start(True)
                    async with asyncio.timeout(STEP_TIMEOUT):
                        while handle.instance_id not in ran:
                            changed.clear()
                            await changed.wait()
                    latencies.append(ran[handle.instance_id] - started)
                await asyncio.sleep(0.2)  # the last run's end, and any late claim, counted
                after, _ = await _snapshot(procs)
                stmts = after - before
                stmts.pop(TRANSACTIONS, 0)
                stmts.pop(CLAIM_US, 0)
                found[queue] = {
                    **backlog,
                    "p50_ms": _percentile(latencies, 50) * 1000,
                    "p90_ms": _percentile(latencies, 90) * 1000,
                    "queue_claims_per_start": stmts["queue_claim"] / args.starts,
                    "claims_per_start": (stmts["queue_claim"] + stmts["claim"]) / args.starts,
                    "statements_per_start": stmts.total() / args.starts,
                }
        return found
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                await proc.kill()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', SERVER)


FIGURES = (
    ("admissions_per_s", "admit/s", 8, ".0f"),
    ("queue_claims_per_s", "claims/s", 8, ".0f"),
    ("admitted_per_claim", "per claim", 9, ".1f"),
    ("claim_ms", "claim ms", 8, ".2f"),
    ("statements_per_admission", "stmts/adm", 9, ".2f"),
    ("p50_ms", "p50 ms", 7, ".2f"),
    ("p90_ms", "p90 ms", 7, ".2f"),
    ("queue_claims_per_start", "q-claims/start", 14, ".2f"),
    ("statements_per_start", "stmts/start", 11, ".1f"),
)


def table(results: dict[str, list[dict[str, Any]]], limit: int) -> str:
    lines = [f"{'queue':<16} {'runs':>4} " + " ".join(f"{title:>{w}}" for _, title, w, _ in FIGURES)]
    for queue, runs in results.items():
        label = f"{queue} ({limit})" if queue == "limited" else f"{queue} (none)"
        cells = " ".join(f"{statistics.median(r[key] for r in runs):>{w}{fmt}}" for key, _, w, fmt in FIGURES)
        lines.append(f"{label:<16} {len(runs):>4} {cells}")
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> None:
    count_statements()
    results: dict[str, list[dict[str, Any]]] = {q: [] for q in QUEUES}
    loads = [os.getloadavg()[0]]
    for run in range(args.runs):
        found = await _one(args)
        loads.append(os.getloadavg()[0])
        for queue, figures in found.items():
            results[queue].append(figures)
            print(
                f"run {run + 1}/{args.runs}, {queue}: {figures['admissions_per_s']:.0f} admissions/s "
                f"({figures['queue_claims_per_s']:.0f} claims/s), start to run p50 "
                f"{figures['p50_ms']:.2f} ms, {figures['queue_claims_per_start']:.2f} queue claims/start",
                file=sys.stderr,
            )
    print(
        f"\ngeste from {os.path.dirname(geste.__file__)}; {os.cpu_count()} cores; load average (1 min) "
        f"{min(loads):.2f} to {max(loads):.2f}"
    )
    print(
        f"{args.workers} worker processes; a workflow of {'one activity' if args.activity else 'no step'}; "
        f"a backlog of {args.backlog} per queue released at once; then "
        f"{args.starts} starts one at a time (capacity free). Medians of {args.runs} run(s)."
    )
    print(table(results, args.limit))
    medians = {
        queue: {key: statistics.median(r[key] for r in runs) for key, _, _, _ in FIGURES}
        for queue, runs in results.items()
    }
    summary = {
        "workers": args.workers,
        "backlog": args.backlog,
        "limit": args.limit,
        "starts": args.starts,
        "activity": args.activity,
        "runs": args.runs,
        "load_average": [min(loads), max(loads)],
        "medians": medians,
    }
    print("RESULT " + json.dumps(summary))
    if args.json:
        raw = {**summary, "every_run": results}
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(raw, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--limit", type=int, default=50, help="the global limit of the queue 'limited'")
    parser.add_argument("--backlog", type=int, default=5000, help="instances queued, per queue and run")
    parser.add_argument("--starts", type=int, default=100, help="start-to-run samples, per queue and run")
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between two starts")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds for the workers' views to settle")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--activity", action="store_true", help="the workflow runs one (empty) activity")
    parser.add_argument("--json", help="write every run's figures to this file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.worker_id, args.limit, args.activity)
        return
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
