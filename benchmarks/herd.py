"""What one wake-up costs the database with 1, 8 or 16 worker processes, and how long it takes.

    .venv/bin/python benchmarks/herd.py                          # 1, 8 and 16 workers, 3 runs
    .venv/bin/python benchmarks/herd.py --workers 1,4 --runs 1 --wakeups 20

A wake-up here is what issue 15 measured: an event sent to a waiting instance, then a 0.2 s durable sleep,
then the instance waits for its next event. Worker processes (default options, concurrency 100) run
``waiter`` instances that loop on exactly that; a client App (``run_worker=False``) in this process sends
each event (``send_event(..., instance_id=...)``) once the previous wake-up is over (the woken instance
is back to waiting), so the wake-ups run one at a time and each cost is counted alone.

Counted, for each number of workers (the medians over the runs are printed, with the ratio to one worker):

- **server transactions per wake-up**: the change of ``pg_stat_database.xact_commit + xact_rollback`` of
  a database of the measurement's own, over the whole life of its processes (every backend flushes its
  counters when it exits; a listening backend that only hears notifications flushes at exit only), minus
  the same count for a twin run that idles for as long instead of waking (same workers, same instances,
  same start-up and background: heartbeats, polls, listener probes). It includes what no client sends:
  every backend that LISTENs in the database runs a transaction to read the notification queue for each
  notifying commit of the database (PostgreSQL before 19 signals every listener), so it grows with the
  workers whatever geste does with the notification;
- **geste transactions per wake-up**: the transactions the geste processes begin (counted in them: a
  statement outside a transaction, or a BEGIN), minus the twin run's: the server's count without
  PostgreSQL's own (the listeners' reads), and without its noise (the twin's background runs at other
  moments: each listener's probe, every 15 s, is a notifying commit that every listener reads, so with N
  workers N squared transactions land in or out of the window with their phase; use many wake-ups);
- **statements per wake-up**: what the geste processes send (counted in them: every asyncpg call), minus
  the twin run's, and of them the **claim statements** (``claim``, ``claim_names``, ``claim_ids``): one
  per wake-up plus one per timer is the least a wake-up needs; each worker that claims for nothing adds
  one;
- **wake-up latency**: from ``send_event`` returning (the event committed) to the workflow's next line
  after ``ctx.wait_event`` in the worker process (same host, same clock): p50 and p99.

``measure(workers, ...)`` does one measurement and returns a ``HerdResult``: ``benchmarks/scale.py`` may
import it (``sys.path`` must hold this folder).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import geste

SERVER = os.environ.get("GESTE_BENCH_POSTGRES_SERVER", "postgresql://postgres@127.0.0.1:5432")
"""A PostgreSQL server where the user may create databases (without a database name)."""
EVENT = "herd.wake"
SLEEP = 0.2
"""The durable sleep after each wake-up, seconds."""
GAP = 0.05
"""Pause between an instance reaching its wait and the event sent to it (its wait commits meanwhile)."""
CLAIMS = ("claim", "claim_names", "claim_ids")
STEP_TIMEOUT = 60.0
SETTLE = 6.0
"""Seconds between the instances' first waits and the first reading: one heartbeat period and more."""
SCRIPT = os.path.abspath(__file__)


# -- the worker process ------------------------------------------------------------------------------
STATEMENTS: Counter[str] = Counter()
QUERY_NAMES: dict[str, str] = {}
TRANSACTIONS = "(transactions)"
"""The key under which ``STATEMENTS`` counts the transactions the process began (not a statement)."""


def emit(kind: str, **fields: Any) -> None:
    sys.stdout.write(f"@@ {kind} {json.dumps(fields)}\n")
    sys.stdout.flush()


def count_statements() -> None:
    """Count every statement this process sends through asyncpg, by geste's query name when it is one
    (once per process)."""
    from asyncpg.connection import Connection

    if QUERY_NAMES.get("") == "counting":
        return
    QUERY_NAMES[""] = "counting"

    from geste.storage.postgres import PostgresStorage

    init = PostgresStorage.__init__

    def named(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, **kwargs)
        QUERY_NAMES.update({sql: name for name, sql in self._q.items()})

    PostgresStorage.__init__ = named  # type: ignore[method-assign]

    def counting(original):  # type: ignore[no-untyped-def]
        async def counted(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
            text = str(query)
            STATEMENTS[QUERY_NAMES.get(text, " ".join(text.split()[:2]))] += 1
            if text.lstrip().upper().startswith("BEGIN") or not self.is_in_transaction():
                STATEMENTS[TRANSACTIONS] += 1  # a transaction of its own, or the start of one
            return await original(self, query, *args, **kwargs)

        return counted

    for method in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
        setattr(Connection, method, counting(getattr(Connection, method)))


def build_app(url: str, **options: Any) -> geste.App:
    app = geste.App(url, **options)

    @app.workflow
    async def waiter(ctx: geste.WorkflowContext, rounds: int) -> int:
        for r in range(rounds):
            emit("waiting", id=ctx.instance_id, round=r)  # again at each replay: the parent keeps the first
            await ctx.wait_event(EVENT)
            emit("woken", id=ctx.instance_id, round=r, at=time.time())
            await ctx.sleep(SLEEP)
        return rounds

    return app


def serve(url: str, worker_id: str) -> None:
    count_statements()
    app = build_app(url, worker_id=worker_id)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, app.shutdown)
        loop.add_signal_handler(signal.SIGUSR1, lambda: emit("counts", **STATEMENTS))

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


# -- the benchmark -------------------------------------------------------------------------------------
@dataclass
class HerdResult:
    """One measurement: ``workers`` processes, ``wakeups`` wake-ups one at a time."""

    workers: int
    wakeups: int
    p50_ms: float
    p99_ms: float
    transactions: float
    """Server transactions per wake-up (the twin idle run's subtracted)."""
    sent: float
    """Transactions the geste processes began per wake-up (counted in them; the twin's subtracted)."""
    statements: float
    """Statements the geste processes sent per wake-up (the twin's subtracted)."""
    claims: float
    """Claim statements per wake-up (the twin's subtracted)."""
    raw: dict[str, Any] = field(default_factory=dict)


class Worker:
    """A worker process of this script; its ``@@`` lines are parsed as they come."""

    def __init__(self, url: str, worker_id: str, on_line: Any) -> None:
        self.url, self.worker_id, self.on_line = url, worker_id, on_line
        self.ready = asyncio.Event()
        self.counts: asyncio.Queue[Counter[str]] = asyncio.Queue()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            SCRIPT,
            "--serve",
            self.url,
            "--worker-id",
            self.worker_id,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
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
                self.counts.put_nowait(Counter(fields))
            else:
                self.on_line(kind, fields)

    async def snapshot(self) -> Counter[str]:
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


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _admin(sql: str, server: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(with_database(server, "postgres"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _transactions(name: str, server: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(with_database(server, "postgres"))
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        value = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", name
        )
        return int(value)
    finally:
        await conn.close()


@dataclass
class _Run:
    transactions: int
    statements: Counter[str]
    seconds: float
    latencies: list[float]


async def _one(workers: int, wakeups: int, instances: int, server: str, idle_for: float | None) -> _Run:
    """One life of a fresh database: workers and instances started, then ``wakeups`` wake-ups (or, with
    ``idle_for``, that long idle), the processes killed, the database's transactions read once all of
    them exited (their counters flushed)."""
    name = f"geste_herd_{uuid.uuid4().hex[:12]}"
    url = with_database(server, name)
    await _admin(f'CREATE DATABASE "{name}"', server)
    procs: list[Worker] = []
    seen: dict[tuple[str, str, int], float] = {}
    changed = asyncio.Event()

    def on_line(kind: str, fields: dict[str, Any]) -> None:
        key = (kind, fields["id"], fields["round"])
        if key not in seen:  # the first: later ones are replays
            seen[key] = fields.get("at", time.time())
            changed.set()

    async def reached(kind: str, iid: str, rnd: int) -> float:
        async with asyncio.timeout(STEP_TIMEOUT):
            while (kind, iid, rnd) not in seen:
                changed.clear()
                await changed.wait()
        return seen[(kind, iid, rnd)]

    try:
        async with build_app(url, run_worker=False) as setup:  # migrates the database
            conn = await setup.storage._pool.acquire()  # type: ignore[attr-defined]
            try:  # autovacuum's transactions count in the database: none in these short runs
                for (table,) in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 'geste%'"
                ):
                    await conn.execute(f'ALTER TABLE "{table}" SET (autovacuum_enabled = false)')
            finally:
                await setup.storage._pool.release(conn)  # type: ignore[attr-defined]
        procs = [Worker(url, f"herd-{n}", on_line) for n in range(workers)]
        for proc in procs:
            await proc.start()
        async with asyncio.timeout(STEP_TIMEOUT):
            await asyncio.gather(*(proc.ready.wait() for proc in procs))
        latencies: list[float] = []
        async with build_app(url, run_worker=False) as client:
            rounds = wakeups // instances + 2
            ids = [f"herd-{uuid.uuid4().hex[:12]}" for _ in range(instances)]
            for iid in ids:
                await client.start_workflow("waiter", rounds, instance_id=iid)
            for iid in ids:
                await reached("waiting", iid, 0)
            # The workers' views of each other settle: each heartbeat (every lock_timeout / 3, 5 s by
            # default) reads the others; the start-up's stragglers (claims that found nothing) end.
            await asyncio.sleep(SETTLE)
            before = Counter(STATEMENTS)  # this process's own: the client's send_event
            for proc in procs:
                before += await proc.snapshot()
            began = time.monotonic()
            if idle_for is not None:
                await asyncio.sleep(idle_for)
            else:
                for n in range(wakeups):
                    iid, rnd = ids[n % instances], n // instances
                    if n:  # the previous wake-up is over: its instance slept and waits again
                        await reached("waiting", ids[(n - 1) % instances], (n - 1) // instances + 1)
                    await reached("waiting", iid, rnd)
                    await asyncio.sleep(GAP)
                    await client.send_event(EVENT, {"n": n}, instance_id=iid)
                    sent = time.time()
                    latencies.append(await reached("woken", iid, rnd) - sent)
                await reached("waiting", ids[(wakeups - 1) % instances], (wakeups - 1) // instances + 1)
            seconds = time.monotonic() - began
            after = Counter(STATEMENTS)
            for proc in procs:
                after += await proc.snapshot()
        for proc in procs:
            await proc.kill()
        procs = []
        await asyncio.sleep(1.5)  # the exits' counters reach the statistics
        transactions = await _transactions(name, server)
        return _Run(transactions, after - before, seconds, latencies)
    finally:
        for proc in procs:
            await proc.kill()
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', server)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def measure(workers: int, *, wakeups: int = 40, instances: int = 8, server: str = SERVER) -> HerdResult:
    """Wake-ups with ``workers`` worker processes, then the twin run idling as long; the differences per
    wake-up."""
    count_statements()  # the client's statements (send_event) count too
    woke = await _one(workers, wakeups, instances, server, None)
    idle = await _one(workers, wakeups, instances, server, woke.seconds)
    began = woke.statements.pop(TRANSACTIONS, 0) - idle.statements.pop(TRANSACTIONS, 0)
    sent = woke.statements.total() - idle.statements.total()
    claims = sum(woke.statements[k] for k in CLAIMS) - sum(idle.statements[k] for k in CLAIMS)
    return HerdResult(
        workers=workers,
        wakeups=wakeups,
        p50_ms=_percentile(woke.latencies, 50) * 1000,
        p99_ms=_percentile(woke.latencies, 99) * 1000,
        transactions=(woke.transactions - idle.transactions) / wakeups,
        sent=began / wakeups,
        statements=sent / wakeups,
        claims=claims / wakeups,
        raw={
            "transactions": woke.transactions,
            "idle_transactions": idle.transactions,
            "seconds": woke.seconds,
            "statements": dict(woke.statements),
            "idle_statements": dict(idle.statements),
        },
    )


def table(results: dict[int, list[HerdResult]]) -> str:
    """The medians per number of workers, with the ratio to the fewest workers measured."""
    lines = [
        f"{'workers':>7} {'runs':>4} {'server tx':>10} {'ratio':>6} {'geste tx':>9} {'ratio':>6}"
        f" {'statements':>11} {'ratio':>6} {'claims':>7} {'ratio':>6} {'p50 ms':>8} {'p99 ms':>8}"
    ]
    base: list[float] | None = None
    for workers in sorted(results):
        runs = results[workers]
        figures = [
            statistics.median(getattr(r, k) for r in runs)
            for k in ("transactions", "sent", "statements", "claims")
        ]
        p50 = statistics.median(r.p50_ms for r in runs)
        p99 = statistics.median(r.p99_ms for r in runs)
        if base is None:
            base = figures
        cells = " ".join(
            f"{f:>{w}.2f} {f / b if b else float('nan'):>6.2f}"
            for f, b, w in zip(figures, base, (10, 9, 11, 7), strict=True)
        )
        lines.append(f"{workers:>7} {len(runs):>4} {cells} {p50:>8.2f} {p99:>8.2f}")
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> None:
    counts = [int(x) for x in args.workers.split(",")]
    results: dict[int, list[HerdResult]] = {n: [] for n in counts}
    for run in range(args.runs):
        order = counts if run % 2 == 0 else list(reversed(counts))  # alternate: a slow minute hits all
        for workers in order:
            found = await measure(workers, wakeups=args.wakeups, instances=args.instances)
            results[workers].append(found)
            print(
                f"run {run + 1}/{args.runs}, {workers} worker(s): {found.transactions:.2f} server tx,"
                f" {found.sent:.2f} geste tx, {found.statements:.2f} statements, {found.claims:.2f} claims"
                " per wake-up;"
                f" p50 {found.p50_ms:.2f} ms, p99 {found.p99_ms:.2f} ms",
                file=sys.stderr,
            )
    print(f"\ngeste from {os.path.dirname(geste.__file__)}; {os.cpu_count()} cores")
    print(
        f"One wake-up: an event to a waiting instance, a {SLEEP:g} s durable sleep, the next wait; "
        f"{args.wakeups} one at a time over {args.instances} instances. Medians of {args.runs} run(s)."
    )
    print(table(results))
    if args.json:
        found = {n: [r.__dict__ for r in runs] for n, runs in results.items()}
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(found, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,8,16", help="comma-separated numbers of worker processes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--wakeups", type=int, default=40)
    parser.add_argument("--instances", type=int, default=8, help="waiting instances the wake-ups go round")
    parser.add_argument("--json", help="write every run's result to this file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--worker-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.worker_id)
        return
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
