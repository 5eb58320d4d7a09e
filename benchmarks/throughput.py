"""Throughput of a 3-activity workflow on SQLite: workflows/s, activities/s and commits per workflow.

    .venv/bin/python benchmarks/throughput.py [--instances 1000] [--runs 5]

Each run uses a fresh database file; the table shows the median of the runs and the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import geste
from geste.storage.sqlite import SQLiteStorage


def build_app(url: str) -> tuple[geste.App, geste.Workflow[[int], int]]:
    app = geste.App(url, concurrency=200, poll_interval=0.5)

    @app.activity
    async def step(ctx: geste.ActivityContext, value: int) -> int:
        return value + 1

    @app.workflow
    async def three_steps(ctx: geste.WorkflowContext, value: int) -> int:
        value = await step(ctx, value)
        value = await step(ctx, value)
        return await step(ctx, value)

    return app, three_steps


async def one_run(instances: int, folder: Path, index: int) -> tuple[float, int]:
    app, workflow = build_app(f"sqlite:///{folder / f'bench-{index}.db'}")
    commits = 0
    original = SQLiteStorage._write

    async def counting_write(self: SQLiteStorage, fn):  # type: ignore[no-untyped-def]
        nonlocal commits
        commits += 1
        return await original(self, fn)

    SQLiteStorage._write = counting_write  # type: ignore[method-assign]
    try:
        async with app:
            commits = 0
            started = time.perf_counter()
            handles = [await workflow.start(i) for i in range(instances)]
            for i, handle in enumerate(handles):
                assert await handle.result(timeout=120) == i + 3
            elapsed = time.perf_counter() - started
            made = commits
    finally:
        SQLiteStorage._write = original  # type: ignore[method-assign]
    return elapsed, made


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [asyncio.run(one_run(args.instances, Path(tmp), i)) for i in range(args.runs)]
    rates = [args.instances / elapsed for elapsed, _ in results]
    commits = [made / args.instances for _, made in results]
    print(f"\n3-activity workflow, SQLite, one process, {args.instances} instances, {args.runs} runs")
    print(f"{'metric':<28}{'median':>12}{'min':>12}{'max':>12}")
    for name, values in (
        ("workflows/s", rates),
        ("activities/s", [r * 3 for r in rates]),
        ("write transactions/workflow", commits),
    ):
        print(f"{name:<28}{statistics.median(values):>12.1f}{min(values):>12.1f}{max(values):>12.1f}")


if __name__ == "__main__":
    main()
