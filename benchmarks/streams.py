"""Durable streams (docs/streams.md): items/s written from one process, and the latency from an item's
write committed in one process to its receipt by a reader in another.

    .venv/bin/python benchmarks/streams.py                        # PostgreSQL and SQLite
    .venv/bin/python benchmarks/streams.py --backends postgres --writers 64 --items 2000 --samples 1000

**Write throughput.** One process runs a worker and ``--writers`` instances of a workflow that writes
``--items`` items (short strings, as LLM tokens are) to a stream of its own with ``await
ctx.write_stream`` one after the other, each awaited: items/s is all items over the time from the first
start to the last result. The writes of the concurrent instances share transactions (one batch in
flight, the next one gathering meanwhile): the table shows items per commit. Nobody reads, so no
notification is sent. One more row: a single instance writing alone (one commit per item).

**Reader latency.** A worker process (this script with ``--serve``) runs one instance that writes
``--samples`` items, one every ``--pace`` seconds (a random part of it, so that writes fall at any phase of
a poll), and takes ``time.time()`` as each ``write_stream`` returns (its commit done); this process, a
client (``run_worker=False``), reads the stream with ``handle.stream_entries`` and takes ``time.time()``
as each item arrives. The latency is the difference, one host, one clock. On PostgreSQL the reader is
registered and woken by ``geste_stream_written`` (sent after the write's commit, batched); on SQLite it
polls (5 ms, doubling up to ``--poll-interval`` while nothing comes, back to 5 ms after an item).

Prints a table and a ``RESULT {json}`` line. Targets (issue 20): >= 20,000 items/s written from one
process and a reader p50 <= 5 ms on PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import geste

POSTGRES = os.environ.get("GESTE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parent.parent
WRITTEN: dict[int, float] = {}
"""The latency writer's commit times, by position (its first, live execution only)."""


def build_app(url: str, **options: Any) -> geste.App:
    app = geste.App(url, **options)

    @app.workflow
    async def tokens(ctx: geste.WorkflowContext, n: int) -> int:
        for i in range(n):
            await ctx.write_stream("tokens", f"token {i}")
        return n

    @app.workflow
    async def paced(ctx: geste.WorkflowContext, n: int, pace: float) -> int:
        for i in range(n):
            await asyncio.sleep(random.uniform(0.2, 1.0) * pace)  # not durable: a benchmark's pacing
            await ctx.write_stream("tokens", i)
            if not ctx.is_replaying:
                WRITTEN[i] = time.time()
        await ctx.close_stream("tokens")
        return n

    return app


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def throughput(url: str, *, writers: int, items: int) -> dict[str, Any]:
    app = build_app(url, concurrency=max(writers, 1) + 8, poll_interval=0.05)
    async with app:
        streams = app.client.streams
        assert streams is not None
        tokens = app.registry.workflows["tokens"]
        warm = await tokens.start(50)
        await warm.result(timeout=60)
        batches, written = streams.commits.batches, streams.commits.items
        began = time.perf_counter()
        handles = [await tokens.start(items) for _ in range(writers)]
        for handle in handles:
            await handle.result(timeout=600)
        elapsed = time.perf_counter() - began
        batches, written = streams.commits.batches - batches, streams.commits.items - written
        began = time.perf_counter()
        alone = await tokens.start(min(items, 2000))
        await alone.result(timeout=600)
        alone_elapsed = time.perf_counter() - began
        notifications = streams.notifications
    return {
        "writers": writers,
        "items": writers * items,
        "items_per_s": round(writers * items / elapsed),
        "items_per_commit": round(written / max(batches, 1), 1),
        "single_writer_items_per_s": round(min(items, 2000) / alone_elapsed),
        "notifications": notifications,
    }


def serve(url: str, instance_id: str, poll_interval: float) -> None:
    """The latency writer: run until the instance ended, then print its commit times."""

    async def run() -> None:
        app = build_app(url, poll_interval=poll_interval)
        async with app:
            print("ready", flush=True)
            while await app.storage.stream_instance_status(instance_id) is None:
                await asyncio.sleep(0.01)  # until the client started it
            await app.get_handle(instance_id).result(timeout=600)
        print(json.dumps(WRITTEN), flush=True)

    asyncio.run(run())


async def latency(url: str, *, samples: int, pace: float, poll_interval: float) -> dict[str, Any]:
    client = build_app(url, run_worker=False, poll_interval=poll_interval)
    instance_id = f"latency-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    async with client:
        worker = subprocess.Popen(
            [sys.executable, __file__, "--serve", url, instance_id, "--poll-interval", str(poll_interval)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert worker.stdout is not None
            assert (await asyncio.to_thread(worker.stdout.readline)).strip() == "ready"
            handle = await client.start_workflow("paced", samples + 20, pace, instance_id=instance_id)
            received: dict[int, float] = {}
            async for entry in handle.stream_entries("tokens"):
                received[entry.position] = time.time()
            out, _ = await asyncio.to_thread(worker.communicate, timeout=600)
        finally:
            if worker.poll() is None:
                worker.kill()
    written = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    lags = [received[i] - written[i] for i in sorted(written) if i in received][20:]  # 20: a warm-up
    return {
        "samples": len(lags),
        "p50_ms": round(1000 * statistics.median(lags), 3),
        "p90_ms": round(1000 * quantile(lags, 0.9), 3),
        "p99_ms": round(1000 * quantile(lags, 0.99), 3),
    }


async def _drop_schema(postgres: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(postgres)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def bench(backend: str, args: argparse.Namespace, folder: str) -> dict[str, Any]:
    def new_url(name: str) -> str:
        if backend == "postgres":
            return f"{args.postgres}{'&' if '?' in args.postgres else '?'}schema={name}"
        return f"sqlite:///{os.path.join(folder, name + '.db')}"

    out: dict[str, Any] = {"backend": backend}
    names = [f"bench_streams_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        out |= await throughput(new_url(names[0]), writers=args.writers, items=args.items)
        out["latency"] = await latency(
            new_url(names[1]), samples=args.samples, pace=args.pace, poll_interval=args.poll_interval
        )
    finally:
        if backend == "postgres":
            for name in names:
                await _drop_schema(args.postgres, name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", nargs=2, metavar=("URL", "INSTANCE"), help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="postgres,sqlite")
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--pace", type=float, default=0.004)
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--postgres", default=POSTGRES)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], args.poll_interval)
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for backend in args.backends.split(","):
            results.append(asyncio.run(bench(backend, args, folder)))
    print(
        f"\n{'backend':9} {'items/s':>9} {'per commit':>10} {'alone/s':>8} "
        f"{'reader p50 ms':>13} {'p90 ms':>7} {'p99 ms':>7}"
    )
    for r in results:
        lat = r["latency"]
        print(
            f"{r['backend']:9} {r['items_per_s']:>9,} {r['items_per_commit']:>10} "
            f"{r['single_writer_items_per_s']:>8,} {lat['p50_ms']:>13.2f} {lat['p90_ms']:>7.2f} "
            f"{lat['p99_ms']:>7.2f}"
        )
    print("RESULT " + json.dumps({"benchmark": "streams", "results": results}))


if __name__ == "__main__":
    main()
