"""``result()`` across processes: from an instance's end committed in a worker to ``result()`` returning in
another process, woken by the end's notification (schema 14) versus by its poll.

    .venv/bin/python benchmarks/result_latency.py                      # 5 runs of 40 samples per mode
    .venv/bin/python benchmarks/result_latency.py --runs 3 --samples 20 --modes notify

A worker process (this script with ``--serve``) runs instances of a workflow that waits for an event and
returns its data; it takes ``time.time()`` right after each ``finish`` returned (the end's statement
committed, alone or in a group commit) and writes it to its stdout. This process is a client
(``run_worker=False``): for each sample it starts an instance, waits until the worker has it waiting, calls
``result()`` in a task, sends the event after a random pause (``--spread``, so that the end is in phase
with no poll) and takes ``time.time()`` when ``result()`` returns. The latency is the difference: one
host, one clock.

Modes: ``notify`` (the default options: the client registers for the end, which notifies it) and ``poll``
(the same client with its registration turned off: it reads the instance after 10 ms, then twice as long
each time up to ``poll_interval``, 1 s by default, which is how every ``result()`` of an instance ended
elsewhere waited before schema 14; its sends still notify the worker, so only the wait differs). Each run
of each mode has a fresh schema and a fresh worker; modes alternate run by run (a slow minute of the
machine hits both); the table shows the median over the runs of each run's p50, p90 and p99, and the
ratio of the p50s.

``measure(url, ...)`` is the measurement alone, for another script (or a test) to import.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import geste

POSTGRES = os.environ.get("GESTE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
NOTIFY, POLL = "notify", "poll"


def build_app(url: str, **options: Any) -> geste.App:
    app = geste.App(url, **options)

    @app.workflow
    async def gated(ctx: geste.WorkflowContext, event_type: str) -> Any:
        return (await ctx.wait_event(event_type)).data

    return app


@dataclass
class Latencies:
    """One measurement: the samples (seconds, end committed -> result() returned) and its mode."""

    mode: str
    samples: list[float] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        return self.quantile(0.9)

    @property
    def p99(self) -> float:
        return self.quantile(0.99)


class _Worker:
    """The worker process and the end times it reports (instance id -> time.time() after its commit)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ends: dict[str, float] = {}
        self._arrived: dict[str, asyncio.Event] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Worker:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", self.url, stdout=asyncio.subprocess.PIPE
        )
        assert self._proc.stdout is not None
        async with asyncio.timeout(60):
            line = await self._proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"the worker did not start: {line!r}")
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            kind, instance_id, when = line.decode().split()
            if kind == "END":
                self.ends[instance_id] = float(when)
                self._arrived.setdefault(instance_id, asyncio.Event()).set()

    async def end_of(self, instance_id: str) -> float:
        async with asyncio.timeout(60):
            await self._arrived.setdefault(instance_id, asyncio.Event()).wait()
        return self.ends[instance_id]

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await self._proc.wait()
            if self._proc.returncode is None:
                self._proc.kill()
                await self._proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def measure(
    url: str,
    *,
    samples: int = 40,
    mode: str = NOTIFY,
    poll_interval: float = 1.0,
    spread: tuple[float, float] = (0.05, 1.5),
    seed: int | None = None,
) -> Latencies:
    """``samples`` latencies from an end committed in a worker process to ``result()`` returning in a
    client of ``url`` (a PostgreSQL URL whose schema this creates), the client waiting as ``mode`` says.
    One warm-up sample first (the client's listener connects at its first wait) is not counted."""
    chosen = random.Random(seed)
    measured = Latencies(mode)
    async with _Worker(url) as worker:
        client = build_app(url, run_worker=False, poll_interval=poll_interval)
        async with client:
            if mode == POLL:  # no registration for the end: result() reads, as before schema 14
                client.client._listen = lambda start: None
            for n in range(samples + 1):
                event = f"result-latency-{uuid.uuid4().hex}"
                handle = await client.start_workflow("gated", event)
                while (await handle.status()) != geste.Status.WAITING:
                    await asyncio.sleep(0.005)
                waiting = asyncio.create_task(handle.result(timeout=60))
                await asyncio.sleep(chosen.uniform(*spread))
                await client.send_event(event, n)
                await waiting
                returned = time.time()
                ended = await worker.end_of(handle.instance_id)
                if n > 0:
                    measured.samples.append(returned - ended)
    return measured


def serve(url: str) -> None:
    """The worker: print ``ready``, then ``END <instance id> <time>`` after each end's commit."""
    from geste.storage.postgres import PostgresStorage

    original = PostgresStorage.finish

    async def finish(self: PostgresStorage, commit: Any, **kwargs: Any) -> None:
        await original(self, commit, **kwargs)
        print(f"END {commit.lease.instance_id} {time.time()!r}", flush=True)

    PostgresStorage.finish = finish  # type: ignore[method-assign]
    app = build_app(url)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, app.shutdown)
        await app.open()
        while app.listener_status().state != "listening":
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await app.run()

    asyncio.run(run())


async def _drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _one(mode: str, samples: int, poll_interval: float, seed: int) -> Latencies:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        return await measure(
            f"{POSTGRES}?schema={schema}", samples=samples, mode=mode, poll_interval=poll_interval, seed=seed
        )
    finally:
        await _drop_schema(schema)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default=f"{NOTIFY},{POLL}")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    modes = args.modes.split(",")
    results: dict[str, list[Latencies]] = {mode: [] for mode in modes}
    for run in range(args.runs):
        for mode in modes:
            measured = asyncio.run(_one(mode, args.samples, args.poll_interval, seed=run))
            results[mode].append(measured)
            print(
                f"run {run + 1} {mode:6}: p50 {_ms(measured.p50)} ms  p90 {_ms(measured.p90)} ms  "
                f"p99 {_ms(measured.p99)} ms",
                file=sys.stderr,
                flush=True,
            )
    print(f"\nend committed -> result() returned in another process ({args.runs} runs of {args.samples})")
    print(f"{'mode':8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}")
    medians = {}
    for mode in modes:
        p50 = statistics.median(m.p50 for m in results[mode])
        p90 = statistics.median(m.p90 for m in results[mode])
        p99 = statistics.median(m.p99 for m in results[mode])
        medians[mode] = p50
        print(f"{mode:8} {_ms(p50)} {_ms(p90)} {_ms(p99)}")
    if NOTIFY in medians and POLL in medians:
        print(f"p50 notify / poll: {medians[NOTIFY] / medians[POLL]:.4f}")


if __name__ == "__main__":
    main()
