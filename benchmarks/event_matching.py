"""Wake-up latency of an event among many waiters of its type (issue 15, event matching by index).

    .venv/bin/python benchmarks/event_matching.py                        # 0, 10,000, 100,000 waiters, 5 runs
    .venv/bin/python benchmarks/event_matching.py --waiters 0,20000 --runs 3 --samples 50

N instances wait for ``paid`` events, each matching its own order id (``{"order": "seed-<n>"}``): seeded by
SQL in a fresh schema, as ``take_event_or_suspend`` registers them (the instance row ``waiting``, the wait
with its match key; ``--legacy`` seeds them without, for a geste older than schema 12). One more instance
runs in a worker subprocess (default options: LISTEN/NOTIFY on): it waits for ``paid`` with
``{"order": "bench-<i>"}``, i = 0, 1, ..., and prints ``time.time()`` each time its wait returns. This
process (a client App, no worker) waits until it reported its suspension, pauses ``--gap``, takes the time,
and calls ``app.send_event("paid", {"order": "bench-<i>"})``: untargeted, so the send finds the wait by its
match among the N + 1 waits of the type. The wake-up is from just before that call to the workflow's code
running again (one host, one clock): what a user sees, the send's own transaction included; the send
alone (the call's duration) is printed too.

Each (run, N) gets a fresh schema and a fresh worker process; the runs alternate the order of the sizes.
The table gives, per N, the median over the runs of each run's p50 (and p99), and the ratio of the p50 to
the p50 with no other waiter (issue 15's target: at most 1.2 with 100,000).

``event_wakeup`` measures one (N, run) and is what ``benchmarks/scale.py`` imports.
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
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import geste

POSTGRES = os.environ.get("GESTE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
EVENT = "paid"
SEEDED_WORKFLOW = "seeded_waiter"
"""The seeded instances' workflow: registered by nobody, never claimed (they have no run_at anyway)."""
WAIT_TIMEOUT = 60.0


def build_app(url: str, **options: Any) -> geste.App:
    app = geste.App(url, **options)

    @app.workflow
    async def bench_waiter(ctx: geste.WorkflowContext, rounds: int) -> int:
        for i in range(rounds):
            await ctx.wait_event(EVENT, match={"order": f"bench-{i}"})
            if not ctx.is_replaying:
                print(f"R {i} {time.time():.6f}", flush=True)  # wall time on purpose: the measurement
        return rounds

    return app


# -- the worker process --------------------------------------------------------------------------------
def serve(url: str) -> None:
    from geste.storage.base import Suspension
    from geste.storage.postgres import PostgresStorage

    take = PostgresStorage.take_event_or_suspend

    async def traced_take(self, commit, *args, **kwargs):  # type: ignore[no-untyped-def]
        outcome = await take(self, commit, *args, **kwargs)
        if outcome is Suspension.SUSPENDED:
            print("S", flush=True)
        return outcome

    PostgresStorage.take_event_or_suspend = traced_take  # type: ignore[method-assign]
    app = build_app(url)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, app.shutdown)

        def orphaned() -> None:  # the benchmark died without stopping us: stdin closes, we stop
            sys.stdin.read()
            loop.call_soon_threadsafe(app.shutdown)

        threading.Thread(target=orphaned, daemon=True).start()
        await app.open()
        deadline = time.monotonic() + 30
        while app.listener_status().state != "listening":
            if time.monotonic() > deadline:
                raise RuntimeError("the listener did not connect within 30 s")
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await app.run()

    asyncio.run(run())


# -- seeding ----------------------------------------------------------------------------------------------
SEED_INSTANCES = """
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, steps,
                             event_floor)
SELECT 'seed-' || n, $2, 'waiting', '{"args": [], "kwargs": {}}', $3::float8, $3::float8, 1, 0
FROM generate_series(0, $1::integer - 1) AS n
"""
SEED_WAITS = """
INSERT INTO geste_event_waits (instance_id, event_type, match, since, outcome_seq, after_seq)
SELECT 'seed-' || n, $2, json_build_object('order', 'seed-' || n)::text, $3, 2, 0
FROM generate_series(0, $1::integer - 1) AS n
"""
SEED_KEYED_WAITS = """
INSERT INTO geste_event_waits (instance_id, event_type, match, since, outcome_seq, after_seq, match_key,
                               match_pairs)
SELECT 'seed-' || (n - 1), $1, json_build_object('order', 'seed-' || (n - 1))::text, $2, 2, 0, k, ARRAY[p]
FROM unnest($3::bigint[], $4::text[]) WITH ORDINALITY AS u(k, p, n)
"""


async def seed_waiters(conn: Any, count: int, *, legacy: bool = False) -> None:
    """``count`` instances waiting for ``paid`` events, each matching its own order (``seed-<n>``), as
    the storage registers them: with their match keys, unless ``legacy`` or the schema has none (a geste
    older than schema 12). Inserted once each (an update would leave as many dead rows for the first
    sends to step over until autovacuum came)."""
    if count == 0:
        return
    now = time.time()
    await conn.execute(SEED_INSTANCES, count, SEEDED_WORKFLOW, now)
    has_keys = await conn.fetchval(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = 'geste_event_waits' AND column_name = 'match_key'"
    )
    if has_keys and not legacy:
        from geste._matching import wait_key

        keys = [wait_key(EVENT, {"order": f"seed-{n}"}) for n in range(count)]
        await conn.execute(SEED_KEYED_WAITS, EVENT, now, [k.key for k in keys], [k.pairs[0] for k in keys])
    else:
        await conn.execute(SEED_WAITS, count, EVENT, now)
    # the steady state of a table that autovacuum keeps: visibility map set, statistics fresh (and no
    # autovacuum of the seeded rows starting in the middle of the measurement, on a 2-core machine)
    await conn.execute("VACUUM ANALYZE geste_instances, geste_event_waits")


# -- one measurement ----------------------------------------------------------------------------------------
@dataclass
class Sample:
    waiters: int
    wakeups: list[float]
    """Seconds from just before ``send_event`` to the workflow running again, one per wake-up."""
    sends: list[float]
    """Seconds ``send_event`` took."""

    @property
    def p50(self) -> float:
        return percentile(self.wakeups, 50)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Worker:
    """The worker subprocess and what it prints: ``ready``, ``S`` (suspended), ``R <i> <time>``; run as
    ``script --serve URL`` (``scale.py`` runs its channel receiver so)."""

    def __init__(self, url: str, script: str = __file__) -> None:
        self.url, self.script = url, script
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: asyncio.Queue[list[str]] = asyncio.Queue()
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, self.script, "--serve", self.url, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"the worker process did not start (said {line!r})")
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            await self.lines.put(line.decode().split())
        await self.lines.put(["exit"])

    async def expect(self, kind: str) -> list[str]:
        while True:
            words = await asyncio.wait_for(self.lines.get(), WAIT_TIMEOUT)
            if words[0] == "exit":
                raise RuntimeError("the worker process exited")
            if words[0] == kind:
                return words

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def event_wakeup(
    server_url: str = POSTGRES,
    waiters: int = 0,
    *,
    samples: int = 100,
    warmup: int = 10,
    gap: float = 0.005,
    legacy: bool = False,
) -> Sample:
    """One measurement: a fresh schema on ``server_url`` with ``waiters`` seeded waiters of ``paid``, a
    worker process, ``warmup`` wake-ups not counted, then ``samples`` counted; the schema is dropped."""
    import asyncpg

    schema = f"bench_match_{uuid.uuid4().hex[:8]}"
    url = with_query(server_url, schema=schema)
    admin = await asyncpg.connect(server_url)
    worker = Worker(url)
    wakeups: list[float] = []
    sends: list[float] = []
    try:
        client = build_app(url, run_worker=False)
        async with client:  # creates the schema, migrated
            conn = await asyncpg.connect(server_url, server_settings={"search_path": schema})
            try:
                await seed_waiters(conn, waiters, legacy=legacy)
            finally:
                await conn.close()
            await worker.start()
            await client.start_workflow("bench_waiter", warmup + samples)
            for i in range(warmup + samples):
                await worker.expect("S")  # waiting (its suspension committed)
                await asyncio.sleep(gap)
                before = time.time()
                await client.send_event(EVENT, {"order": f"bench-{i}"})
                sent = time.time()
                words = await worker.expect("R")
                assert int(words[1]) == i, words
                if i >= warmup:
                    wakeups.append(float(words[2]) - before)
                    sends.append(sent - before)
    finally:
        await worker.stop()
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()
    return Sample(waiters, wakeups, sends)


# -- the table ------------------------------------------------------------------------------------------
async def bench(args: argparse.Namespace) -> None:
    sizes = [int(x) for x in args.waiters.split(",") if x.strip()]
    results: dict[int, list[Sample]] = {n: [] for n in sizes}
    began = time.monotonic()
    for run in range(args.runs):
        order = sizes if run % 2 == 0 else sizes[::-1]
        for n in order:
            took = time.monotonic()
            sample = await event_wakeup(
                args.url, n, samples=args.samples, warmup=args.warmup, gap=args.gap, legacy=args.legacy
            )
            results[n].append(sample)
            print(
                f"run {run + 1}/{args.runs}: {n:>7} waiters  p50 {sample.p50 * 1000:6.2f} ms"
                f"  ({time.monotonic() - took:.0f} s)",
                file=sys.stderr,
            )
    base = statistics.median(s.p50 for s in results[sizes[0]])
    print(f"\ngeste from {os.path.dirname(geste.__file__)}; load average {os.getloadavg()[0]:.2f}")
    print(f"wake-up of one instance by an untargeted event among N waiters of its type, {args.runs} runs,")
    print(f"{args.samples} wake-ups each; medians over the runs (ms); ratio: p50 / p50 with N = {sizes[0]}")
    print(f"{'waiters':>9} {'p50':>8} {'p99':>8} {'send p50':>9} {'ratio':>7}")
    for n in sizes:
        p50 = statistics.median(s.p50 for s in results[n])
        p99 = statistics.median(percentile(s.wakeups, 99) for s in results[n])
        send = statistics.median(percentile(s.sends, 50) for s in results[n])
        print(f"{n:>9} {p50 * 1000:>8.2f} {p99 * 1000:>8.2f} {send * 1000:>9.2f} {p50 / base:>7.2f}")
    print(f"(total {time.monotonic() - began:.0f} s)")
    if args.json:
        raw = {
            str(n): [{"wakeups": s.wakeups, "sends": s.sends} for s in found] for n, found in results.items()
        }
        print(json.dumps(raw))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=POSTGRES, help="a PostgreSQL server URL (a schema is made per run)")
    parser.add_argument("--waiters", default="0,10000,100000", help="comma-separated numbers of waiters")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=100, help="wake-ups counted per run")
    parser.add_argument("--warmup", type=int, default=10, help="wake-ups not counted, first")
    parser.add_argument("--gap", type=float, default=0.005, help="pause before each send, s")
    parser.add_argument("--legacy", action="store_true", help="seed the waits without match keys")
    parser.add_argument("--json", action="store_true", help="also print every sample as JSON")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
