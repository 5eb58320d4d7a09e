"""Throughput of a 3-activity workflow: workflows/s, activities/s, transactions and client CPU per workflow.

    .venv/bin/python benchmarks/throughput.py                      # SQLite and PostgreSQL, 0/1/4 workers
    .venv/bin/python benchmarks/throughput.py --backend postgres --processes 1,4 --instances 1000 --runs 5

`processes` 0 means one process that starts the instances and runs them; N > 0 means N worker processes
and a separate client that starts the instances. Every run gets a fresh database (a new SQLite file or a
new PostgreSQL schema); configurations alternate run by run; the table shows medians and the range.
Write transactions (each one commit) are counted in the in-process configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import geste
from geste.storage.postgres import PostgresStorage
from geste.storage.sqlite import SQLiteStorage

POSTGRES = os.environ.get("GESTE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def build_app(url: str, **options: object) -> tuple[geste.App, geste.Workflow[[int], int]]:
    app = geste.App(url, **options)  # type: ignore[arg-type]

    @app.activity
    async def step(ctx: geste.ActivityContext, value: int) -> int:
        return value + 1

    @app.workflow
    async def three_steps(ctx: geste.WorkflowContext, value: int) -> int:
        value = await step(ctx, value)
        value = await step(ctx, value)
        return await step(ctx, value)

    return app, three_steps


@dataclass
class Sample:
    seconds: float
    transactions: float
    cpu_ms: float | None


WRITES = (
    "create_instance",
    "claim",
    "renew",
    "release",
    "record",
    "suspend",
    "take_event_or_suspend",
    "finish",
    "send_event",
    "request_cancel",
)


class Counter:
    """Counts the write transactions this process makes, whatever the backend (each is one commit)."""

    def __init__(self) -> None:
        self.writes = 0
        self.records = 0
        self._saved: list[tuple[type, str, object]] = []

    def __enter__(self) -> Counter:
        for cls in (SQLiteStorage, PostgresStorage):
            for name in WRITES:
                original = getattr(cls, name)
                self._saved.append((cls, name, original))
                setattr(cls, name, self._counting(original, name))
        return self

    def _counting(self, original, name):  # type: ignore[no-untyped-def]
        async def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.writes += 1
            self.records += name == "record"
            return await original(*args, **kwargs)

        return counting

    def __exit__(self, *exc: object) -> None:
        for cls, name, original in self._saved:
            setattr(cls, name, original)


async def _drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def in_process(url: str, instances: int) -> Sample:
    app, workflow = build_app(url, concurrency=200)
    with Counter() as counter:
        async with app:
            counter.writes = 0
            shared = getattr(app.storage, "step_commits", None)  # PostgreSQL's group commit
            records_before = counter.records
            cpu, started = time.process_time(), time.perf_counter()
            handles = [await workflow.start(i) for i in range(instances)]
            for i, handle in enumerate(handles):
                assert await handle.result(timeout=300) == i + 3
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            made = counter.writes
            if shared is not None:  # step commits that shared one statement count as one transaction
                made += app.storage.step_commits - shared - (counter.records - records_before)  # type: ignore[attr-defined]
    return Sample(elapsed, made / instances, cpu / instances * 1000)


async def with_workers(url: str, instances: int, processes: int) -> Sample:
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--serve", url],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        app, workflow = build_app(url, run_worker=False)
        async with app:
            started = time.perf_counter()
            for i in range(instances):
                await workflow.start(i)
            while len(await app.list_instances(status="completed", limit=10_000)) < instances:
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - started
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=30)
    return Sample(elapsed, float("nan"), None)  # the writes happen in the workers: counted in-process only


def serve(url: str) -> None:
    app, _ = build_app(url, concurrency=200, poll_interval=0.2)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, app.shutdown)
        await app.open()
        print("ready", flush=True)
        worker = app._worker
        await app.run()
        if os.environ.get("GESTE_BENCH_VERBOSE") and worker is not None:
            print(f"worker: {worker.claim_rounds} claim rounds took {worker.claimed}", file=sys.stderr)

    asyncio.run(run())


def fresh_url(backend: str, folder: Path) -> tuple[str, str | None]:
    if backend == "sqlite":
        return f"sqlite:///{folder / f'bench-{uuid.uuid4().hex[:8]}.db'}", None
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    return f"{POSTGRES}?schema={schema}", schema


async def one(backend: str, processes: int, instances: int, folder: Path) -> Sample:
    url, schema = fresh_url(backend, folder)
    try:
        if processes == 0:
            return await in_process(url, instances)
        return await with_workers(url, instances, processes)
    finally:
        if schema is not None:
            await _drop_schema(schema)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--processes", default="0,1,4", help="comma-separated worker process counts")
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    configs = [(b, int(p)) for b in backends for p in args.processes.split(",")]
    samples: dict[tuple[str, int], list[Sample]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            for backend, processes in configs:
                samples[(backend, processes)].append(
                    asyncio.run(one(backend, processes, args.instances, Path(tmp)))
                )
    print(f"\n3-activity workflow, {args.instances} instances, median of {args.runs} runs (min-max)")
    header = f"{'backend':<10}{'workers':<16}{'workflows/s':>22}{'activities/s':>14}{'tx/workflow':>13}"
    print(header + f"{'client CPU ms/wf':>18}")
    for (backend, processes), runs in samples.items():
        rates = [args.instances / s.seconds for s in runs]
        where = "in-process" if processes == 0 else f"{processes} process(es)"
        tx = statistics.median(s.transactions for s in runs)
        cpus = [s.cpu_ms for s in runs if s.cpu_ms is not None]
        cpu = f"{statistics.median(cpus):.2f}" if cpus else "-"
        spread = f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})"
        tx_text = "-" if tx != tx else f"{tx:.1f}"
        print(
            f"{backend:<10}{where:<16}{spread:>22}{statistics.median(rates) * 3:>14.0f}{tx_text:>13}{cpu:>18}"
        )


if __name__ == "__main__":
    main()
