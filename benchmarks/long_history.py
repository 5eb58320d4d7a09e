"""Long-lived workflows (issue 16): does the 10,000th wake-up cost what the 10th does, with the cache of
suspended runs on and off, on SQLite and PostgreSQL; and the memory a cached run holds.

    .venv/bin/python benchmarks/long_history.py                  # positions 10, 1,000, 10,000; 3 runs
    .venv/bin/python benchmarks/long_history.py --quick          # a smoke check: small positions, 1 run
    .venv/bin/python benchmarks/long_history.py --full           # and the issue's 2,000 waits
    .venv/bin/python benchmarks/long_history.py --full --waits 500 --runs 1 --memory 0 --positions 10

**Wake-up at a history position.** A worker process of this script (``--serve``, as ``herd.py``'s: default
options, concurrency 100, ``@@``-prefixed JSON lines on its stdout) runs ``long_waiter(first, rounds)``:
``first`` recorded ``ctx.now()`` steps (buffered, committed with the first wait: a cheap way to a long
history), then ``rounds`` times an activity and a wait for its own event (``match`` on its instance id and
the round). A client App in this process (``run_worker=False``) starts it with ``first`` = the position
(10, 1,000, 10,000); for each round it waits until the worker said the wait committed (the engine's
suspension, hooked in the worker), pauses ``--gap`` (10 ms; on SQLite plus a random fraction of a poll
interval), sends the event (``send_event``, untargeted: the wait is found by its match) and takes
``time.time()`` when the call returns, its transaction committed. The wake-up latency is from there to
the workflow's next line after ``wait_event`` in the worker (``time.time()``: one host, one clock). The
r-th wake-up (from 0) finds ``first + 3r + 3`` rows in the history (the ``now`` steps; per round an
activity, the wait, the event). The first ``--warmup`` (2) wake-ups are not counted, then ``--samples``
(20) are. PostgreSQL: LISTEN/NOTIFY on (the default); SQLite has no notifications: the worker polls every
``--sqlite-poll`` seconds (0.01, the default ``poll_interval`` being 1 s), so its latencies include half
a poll on average.

The worker also counts, per wake-up: the **history rows it read** (the rows a claim shipped to the engine,
or that the engine read after a claim without them) and the **runs from the top** of the workflow's code
(1 per wake-up: a replay; 0: continued from the cache). With the cache on, a wake-up reads one row (its
event) and replays nothing; with it off, it reads and replays the whole history.

Each run (``--runs``, 3) measures every backend, cache (on, off) and position, each backend and cache
with a fresh database and a fresh worker process (the positions one after the other, each its own
instance, which ends after its last round), alternating the order from run to run. The table gives the
medians over the runs of each run's p50 and p99 (of 20 samples the p99 is about the largest), and the
ratio of the p50 to the p50 at the smallest position of the same backend and cache.

**The issue's scenario** (``--full``): one instance, no ``now`` steps, ``--waits`` (2,000) rounds as above,
every wake-up measured; the p50 of the first and of the last ``--edge`` (50) wake-ups and their ratio (the
done-when: at most 1.5 with the cache on, 5 with it off), per backend and cache, once each. With the cache
off the last wake-ups replay some 6,000 rows each: it takes minutes.

**Memory per cached run** (``--memory``, 10,000; 0: skipped): a worker process opens its App (cache size
at least N, or 0), reads its RSS (``VmRSS`` of ``/proc/self/status``) after ``gc.collect()``, starts N
instances of ``long_waiter(0, 1)`` itself (100 at a time) and waits until each committed its wait
(parked in the cache, or unwound); then ``gc.collect()``, one more second, and its RSS again. Per
backend, the growth with the cache on minus the growth with it off, divided by the runs in the cache at
the end: what a parked run holds (its coroutine, its journal, its task). The done-when: 10,000 cached
runs within 100 MiB.

``--json FILE`` writes every sample and figure. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from herd import SERVER, Worker, _admin, _percentile, emit, with_database

import geste

EVENT = "long.tick"
SCRIPT = os.path.abspath(__file__)
STEP_TIMEOUT = 300.0
"""At most this long for one step of the benchmark: a first wait after 10,000 steps, a replay of them."""
BACKENDS = ("sqlite", "postgres")


# -- the worker process ------------------------------------------------------------------------------
COUNTS = {"rows": 0, "runs": 0, "suspended": 0}
"""In the worker: history rows read by the engine, runs of ``long_waiter`` from its top, suspensions."""
WAITING: dict[str, int] = {}
"""The round each instance waits at (set by its code before each wait, replays included)."""
SUSPENDED: set[str] = set()
"""The instances whose wait committed at least once."""
ANNOUNCE = [True]
"""Whether each suspension is said on stdout (not in the memory measurement)."""


def build_app(url: str, **options: Any) -> geste.App:
    app = geste.App(url, **options)

    @app.activity
    async def step(ctx: geste.ActivityContext, total: int) -> int:
        return total + 1

    @app.workflow
    async def long_waiter(ctx: geste.WorkflowContext, first: int, rounds: int) -> int:
        COUNTS["runs"] += 1
        for _ in range(first):
            ctx.now()
        total = 0
        for r in range(rounds):
            total = await step(ctx, total)
            WAITING[ctx.instance_id] = r
            await ctx.wait_event(EVENT, match={"id": ctx.instance_id, "round": r})
            at = time.time()
            if not ctx.is_replaying:
                emit("woken", id=ctx.instance_id, round=r, at=at, rows=COUNTS["rows"], runs=COUNTS["runs"])
        return total

    return app


def hook_engine() -> None:
    """Count the history rows the engine reads, and say each committed wait (once per process)."""
    from geste.engine.journal import Journal
    from geste.engine.run import Engine
    from geste.storage.postgres import PostgresStorage
    from geste.storage.sqlite import SQLiteStorage

    run = Engine.run

    async def counted_run(self, claim, history=None):  # type: ignore[no-untyped-def]
        if history is not None:  # what the claim shipped
            COUNTS["rows"] += len(history)
        return await run(self, claim, history)

    Engine.run = counted_run  # type: ignore[method-assign]

    def counted_get(get):  # type: ignore[no-untyped-def]
        async def counted(self, instance_id):  # type: ignore[no-untyped-def]
            rows = await get(self, instance_id)
            COUNTS["rows"] += len(rows)  # read after a claim without the history
            return rows

        return counted

    for storage in (PostgresStorage, SQLiteStorage):
        storage.get_history = counted_get(storage.get_history)  # type: ignore[method-assign]

    suspended_until = Journal._suspended_until

    async def announced(self, run_at, known):  # type: ignore[no-untyped-def]
        # The wait committed; the run unwinds or parks (in the cache) without yielding to the loop first.
        COUNTS["suspended"] += 1
        SUSPENDED.add(self.instance_id)
        if ANNOUNCE[0]:
            emit("suspended", id=self.instance_id, round=WAITING.get(self.instance_id), seq=known)
        await suspended_until(self, run_at, known)

    Journal._suspended_until = announced  # type: ignore[method-assign]


def worker_options(url: str, cache: int, poll: float) -> dict[str, Any]:
    options: dict[str, Any] = {"workflow_cache_size": cache}
    if url.startswith("sqlite"):
        options["poll_interval"] = poll
    return options


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def serve(url: str, cache: int, poll: float) -> None:
    hook_engine()
    app = build_app(url, **worker_options(url, cache, poll))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, app.shutdown)

        def orphaned() -> None:  # the benchmark died without stopping us: stdin closes, we stop
            sys.stdin.read()
            loop.call_soon_threadsafe(app.shutdown)

        threading.Thread(target=orphaned, daemon=True).start()
        await app.open()
        if url.startswith("postgres"):
            async with asyncio.timeout(30):
                while app.listener_status().state != "listening":
                    await asyncio.sleep(0.01)
        emit("ready")
        await app.run()

    asyncio.run(run())


def memory(url: str, cache: int, n: int) -> None:
    """Park ``n`` instances at a wait in this process; say the RSS before and after."""
    hook_engine()
    ANNOUNCE[0] = False
    app = build_app(url, **worker_options(url, cache, 1.0))

    async def run() -> None:
        async with app:
            gc.collect()
            before = rss_kib()
            began = time.monotonic()
            ids = [f"mem-{k}-{uuid.uuid4().hex[:8]}" for k in range(n)]
            for k in range(0, n, 100):
                batch = ids[k : k + 100]
                await asyncio.gather(*(app.start_workflow("long_waiter", 0, 1, instance_id=i) for i in batch))
            complete = True
            try:
                async with asyncio.timeout(STEP_TIMEOUT / 2):
                    while len(SUSPENDED) < n:
                        await asyncio.sleep(0.05)
            except TimeoutError:  # said in the figures, not fatal
                complete = False
            parked = time.monotonic() - began
            await asyncio.sleep(1.0)  # the claims that parked them return; the cache takes the last ones
            gc.collect()
            after = rss_kib()
            snap = await app.metrics.snapshot()
            emit(
                "memory",
                before=before,
                after=after,
                complete=complete,
                suspended=COUNTS["suspended"],
                instances=len(SUSPENDED),
                runs=COUNTS["runs"],
                cached=len(app._parts.engine.cache),
                tasks=len(asyncio.all_tasks()),
                seconds=parked,
                drops={
                    r: snap.value("geste_workflow_cache_drops_total", reason=r) for r in ("evicted", "stale")
                },
            )

    asyncio.run(run())


# -- the benchmark -------------------------------------------------------------------------------------
class LongWorker(Worker):
    """A worker process of this script (``herd.Worker``, started with this script's arguments)."""

    def __init__(self, url: str, cache: int, poll: float, on_line: Any, extra: tuple[str, ...] = ()) -> None:
        super().__init__(url, f"long-{uuid.uuid4().hex[:6]}", on_line)
        self.args = ("--serve", url, "--cache", str(cache), "--sqlite-poll", str(poll), *extra)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, SCRIPT, *self.args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        self.reader = asyncio.create_task(self._read())


class Database:
    """A fresh database: a PostgreSQL database of its own on ``SERVER``, or a SQLite file in a temporary
    folder; dropped (removed) afterwards."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    async def __aenter__(self) -> str:
        if self.backend == "postgres":
            self.name = f"geste_long_{uuid.uuid4().hex[:12]}"
            await _admin(f'CREATE DATABASE "{self.name}"', SERVER)
            url = with_database(SERVER, self.name)
        else:
            self.folder = tempfile.mkdtemp(prefix="geste-long-")
            url = f"sqlite:///{self.folder}/long.db"
        async with build_app(url, run_worker=False):  # migrates it, before any worker starts
            pass
        return url

    async def __aexit__(self, *exc: object) -> None:
        if self.backend == "postgres":
            await _admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)', SERVER)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Wakeup:
    latency: float
    """Seconds from ``send_event`` returning to the code after the wait."""
    rows: int
    """History rows the worker read for this wake-up."""
    runs: int
    """Runs of the workflow's code from its top (a replay) for this wake-up."""


class Session:
    """A worker process on a fresh database, and a client App that wakes its instances one at a time."""

    def __init__(self, backend: str, cache: int, args: argparse.Namespace) -> None:
        self.backend, self.cache, self.args = backend, cache, args
        self.seen: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.polls = backend == "sqlite"
        self.jitter = random.Random(16)
        self.changed = asyncio.Event()

    def on_line(self, kind: str, fields: dict[str, Any]) -> None:
        key = (kind, fields["id"], fields["round"])
        if key not in self.seen:
            self.seen[key] = fields
            self.changed.set()

    async def reached(self, kind: str, iid: str, rnd: int) -> dict[str, Any]:
        async with asyncio.timeout(STEP_TIMEOUT):
            while (kind, iid, rnd) not in self.seen:
                self.changed.clear()
                await self.changed.wait()
        return self.seen[(kind, iid, rnd)]

    async def __aenter__(self) -> Session:
        self.database = Database(self.backend)
        url = await self.database.__aenter__()
        self.worker = LongWorker(url, self.cache, self.args.sqlite_poll, self.on_line)
        try:
            await self.worker.start()
            async with asyncio.timeout(60):
                await self.worker.ready.wait()
            self.client = build_app(url, run_worker=False)
            await self.client.open()
        except BaseException:
            await self.worker.kill()
            await self.database.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.client.close()
        finally:
            await self.worker.kill()
            await self.database.__aexit__()

    async def wakeups(self, first: int, rounds: int) -> list[Wakeup]:
        """Start ``long_waiter(first, rounds)`` and wake it ``rounds`` times, one at a time."""
        iid = f"long-{first}-{uuid.uuid4().hex[:8]}"
        await self.client.start_workflow("long_waiter", first, rounds, instance_id=iid)
        found: list[Wakeup] = []
        previous: dict[str, Any] | None = None
        for r in range(rounds):
            await self.reached("suspended", iid, r)
            # SQLite: a random phase against the worker's poll, else each send would fall at the same point
            await asyncio.sleep(
                self.args.gap + (self.jitter.random() * self.args.sqlite_poll if self.polls else 0)
            )
            await self.client.send_event(EVENT, {"id": iid, "round": r})
            sent = time.time()
            woken = await self.reached("woken", iid, r)
            if previous is not None:
                rows, runs = woken["rows"] - previous["rows"], woken["runs"] - previous["runs"]
                found.append(Wakeup(woken["at"] - sent, rows, runs))
            else:  # the first wake-up's counts include the start: not reported
                found.append(Wakeup(woken["at"] - sent, -1, -1))
            previous = woken
        return found


@dataclass
class Position:
    """One run's wake-ups at one history position."""

    backend: str
    cache: bool
    position: int
    latencies: list[float]
    rows: list[int]
    runs: list[int]

    @property
    def p50(self) -> float:
        return _percentile(self.latencies, 50) * 1000

    @property
    def p99(self) -> float:
        return _percentile(self.latencies, 99) * 1000


def cache_size(on: bool, args: argparse.Namespace) -> int:
    return max(1000, args.memory) if on else 0


async def positions_run(run: int, args: argparse.Namespace) -> list[Position]:
    found: list[Position] = []
    cases = [(b, c) for b in args.backends for c in (True, False)]
    positions = list(args.positions)
    if run % 2:  # alternate: a slow minute of the machine hits every case
        cases.reverse()
        positions.reverse()
    for backend, on in cases:
        async with Session(backend, cache_size(on, args), args) as session:
            for position in positions:
                woken = (await session.wakeups(position, args.warmup + args.samples))[args.warmup :]
                result = Position(
                    backend,
                    on,
                    position,
                    [w.latency for w in woken],
                    [w.rows for w in woken],
                    [w.runs for w in woken],
                )
                found.append(result)
                print(
                    f"run {run + 1}/{args.runs}, {backend}, cache {'on' if on else 'off'}, position"
                    f" {position}: p50 {result.p50:.2f} ms, p99 {result.p99:.2f} ms, rows read per wake-up"
                    f" {statistics.median(result.rows):g}, replays {statistics.median(result.runs):g}",
                    file=sys.stderr,
                )
    return found


def positions_table(results: list[Position], args: argparse.Namespace) -> str:
    lines = [
        "| backend | cache | position | p50 ms | p99 ms | p50 / p50 at "
        f"{min(args.positions):,} | rows read per wake-up | replays per wake-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for backend in args.backends:
        for on in (True, False):
            base: float | None = None
            for position in sorted(args.positions):
                runs = [r for r in results if (r.backend, r.cache, r.position) == (backend, on, position)]
                if not runs:
                    continue
                p50 = statistics.median(r.p50 for r in runs)
                p99 = statistics.median(r.p99 for r in runs)
                rows = statistics.median(x for r in runs for x in r.rows)
                replays = statistics.median(x for r in runs for x in r.runs)
                base = p50 if base is None else base
                lines.append(
                    f"| {NAMES[backend]} | {'on' if on else 'off'} | {position:,} | {p50:.2f} | {p99:.2f} |"
                    f" {p50 / base:.2f} | {rows:,g} | {replays:g} |"
                )
    return "\n".join(lines)


NAMES = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


@dataclass
class Full:
    """The issue's scenario: one instance, ``waits`` wake-ups."""

    backend: str
    cache: bool
    waits: int
    edge: int
    seconds: float
    latencies: list[float] = field(repr=False)
    rows: list[int] = field(repr=False)

    @property
    def first(self) -> float:
        return statistics.median(self.latencies[: self.edge]) * 1000

    @property
    def last(self) -> float:
        return statistics.median(self.latencies[-self.edge :]) * 1000


async def full(args: argparse.Namespace) -> list[Full]:
    found: list[Full] = []
    for backend in args.backends:
        for on in (True, False):
            async with Session(backend, cache_size(on, args), args) as session:
                began = time.monotonic()
                woken = await session.wakeups(0, args.waits)
                result = Full(
                    backend,
                    on,
                    args.waits,
                    args.edge,
                    time.monotonic() - began,
                    [w.latency for w in woken],
                    [w.rows for w in woken],
                )
            found.append(result)
            print(
                f"{args.waits} waits, {backend}, cache {'on' if on else 'off'}: first {args.edge} p50"
                f" {result.first:.2f} ms, last {args.edge} p50 {result.last:.2f} ms"
                f" ({result.last / result.first:.2f}x), {result.seconds:.0f} s",
                file=sys.stderr,
            )
    return found


def full_table(results: list[Full]) -> str:
    lines = [
        "| backend | cache | waits | p50 of the first | p50 of the last | last / first"
        " | rows read, last wake-up | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {NAMES[r.backend]} | {'on' if r.cache else 'off'} | {r.waits:,}"
            f" | {r.first:.2f} ms ({r.edge}) | {r.last:.2f} ms ({r.edge}) | {r.last / r.first:.2f}"
            f" | {r.rows[-1]:,} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


@dataclass
class Memory:
    backend: str
    n: int
    on: dict[str, Any]
    off: dict[str, Any]

    @property
    def per_run_kib(self) -> float:
        """(growth with the cache on - growth with it off) / the runs in the cache at the end."""
        extra = (self.on["after"] - self.on["before"]) - (self.off["after"] - self.off["before"])
        return extra / max(1, self.on["cached"])


async def measure_memory(backend: str, on: bool, args: argparse.Namespace) -> dict[str, Any]:
    got: dict[str, Any] = {}

    def on_line(kind: str, fields: dict[str, Any]) -> None:
        if kind == "memory":
            got.update(fields)

    async with Database(backend) as url:
        worker = LongWorker(
            url, cache_size(on, args), args.sqlite_poll, on_line, ("--memory", str(args.memory))
        )
        try:
            await worker.start()
            async with asyncio.timeout(STEP_TIMEOUT):
                await worker.proc.wait()
                await worker.reader
        finally:
            await worker.kill()
    if not got:
        raise RuntimeError(f"the memory worker ({backend}, cache {on}) said nothing")
    return got


async def memory_all(args: argparse.Namespace) -> list[Memory]:
    found: list[Memory] = []
    for backend in args.memory_backends:
        on = await measure_memory(backend, True, args)
        off = await measure_memory(backend, False, args)
        found.append(Memory(backend, args.memory, on, off))
        m = found[-1]
        grow_on, grow_off = (on["after"] - on["before"]) / 1024, (off["after"] - off["before"]) / 1024
        print(
            f"memory, {backend}, {args.memory} parked: cache on +{grow_on:.1f} MiB"
            f" ({on['cached']} cached), off +{grow_off:.1f} MiB;"
            f" {m.per_run_kib:.2f} KiB per cached run"
            + ("" if on["complete"] and off["complete"] else " (NOT all parked: see the JSON)"),
            file=sys.stderr,
        )
    return found


def memory_table(results: list[Memory]) -> str:
    lines = [
        "| backend | parked runs | RSS growth, cache on | RSS growth, cache off | per cached run |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in results:
        grow_on = (m.on["after"] - m.on["before"]) / 1024
        grow_off = (m.off["after"] - m.off["before"]) / 1024
        lines.append(
            f"| {NAMES[m.backend]} | {m.n:,} ({m.on['cached']:,} in the cache)"
            f"{'' if m.on['complete'] and m.off['complete'] else ', not all parked'} | {grow_on:.1f} MiB |"
            f" {grow_off:.1f} MiB | {m.per_run_kib:.2f} KiB |"
        )
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> None:
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k not in ("serve",)}}
    report["run"] = {
        "began": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cores": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "python": sys.version.split()[0],
        "geste": os.path.dirname(geste.__file__),
    }
    positions: list[Position] = []
    for run in range(args.runs if args.positions else 0):
        positions += await positions_run(run, args)
    fulls = await full(args) if args.full else []
    memories = await memory_all(args) if args.memory else []
    print(f"\ngeste from {os.path.dirname(geste.__file__)}; {os.cpu_count()} cores")
    if positions:
        print(
            f"\nWake-up latency by history position: medians of {args.runs} run(s), {args.samples} wake-ups"
            f" each (after {args.warmup} not counted); SQLite polls every {args.sqlite_poll:g} s,"
            " PostgreSQL: LISTEN/NOTIFY.\n"
        )
        print(positions_table(positions, args))
    if fulls:
        print(f"\nThe issue's scenario: one workflow, {args.waits:,} waits, first / last {args.edge}.\n")
        print(full_table(fulls))
    if memories:
        print(f"\nMemory of {args.memory:,} runs parked at a wait (RSS of the worker process).\n")
        print(memory_table(memories))
    if args.json:
        report["run"]["load_average_after"] = os.getloadavg()
        report["positions"] = [asdict(p) for p in positions]
        report["full"] = [asdict(f) | {"first_ms": f.first, "last_ms": f.last} for f in fulls]
        report["memory"] = [asdict(m) | {"per_run_kib": m.per_run_kib} for m in memories]
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(_rounded(report)) + "\n")


def _rounded(value: Any) -> Any:
    """Floats to 6 decimals (seconds to the microsecond), for a smaller JSON."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="positions 10 and 100, 5 wake-ups, 1 run, 500 parked"
    )
    parser.add_argument("--positions", help="comma-separated history positions (default 10,1000,10000)")
    parser.add_argument("--samples", type=int, help="wake-ups measured at each position (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="wake-ups not counted before them")
    parser.add_argument("--runs", type=int, help="default 3")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--full", action="store_true", help="also the issue's scenario: --waits waits")
    parser.add_argument("--waits", type=int, help="default 2000 (200 with --quick)")
    parser.add_argument("--edge", type=int, help="wake-ups at each end of --full (default 50)")
    parser.add_argument(
        "--memory", type=int, help="runs parked for the memory figure (default 10000; 0: none)"
    )
    parser.add_argument("--memory-backends", help="default: --backends")
    parser.add_argument(
        "--gap", type=float, default=0.01, help="seconds between a committed wait and its event"
    )
    parser.add_argument("--sqlite-poll", type=float, default=0.01, help="poll_interval of the SQLite worker")
    parser.add_argument("--json", help="write every sample and figure to this file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        if args.memory:
            memory(args.serve, args.cache, args.memory)
        else:
            serve(args.serve, args.cache, args.sqlite_poll)
        return
    quick = args.quick
    positions = ("10,100" if quick else "10,1000,10000") if args.positions is None else args.positions
    args.positions = [int(p) for p in positions.split(",") if p]
    args.samples = args.samples or (5 if quick else 20)
    args.warmup = max(1, min(args.warmup, 1) if quick else args.warmup)  # the first has no counts
    args.runs = args.runs or (1 if quick else 3)
    args.waits = args.waits or (200 if quick else 2000)
    args.edge = args.edge or (20 if quick else 50)
    args.memory = (500 if quick else 10000) if args.memory is None else args.memory
    args.backends = [b for b in args.backends.split(",") if b]
    args.memory_backends = [b for b in (args.memory_backends or ",".join(args.backends)).split(",") if b]
    for backend in args.backends + args.memory_backends:
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r}: {', '.join(BACKENDS)}")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
