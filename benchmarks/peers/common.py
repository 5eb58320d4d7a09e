"""What the three systems' scenario scripts share: arguments, timing, child processes, the result line.

Standard library only (plus asyncpg where a database is read directly), because the scripts run in two
virtual environments: geste's in the project's `.venv`, DBOS's and Edda's in `benchmarks/.peers-venv`.

Every scenario script is run as ``python <system>_scenarios.py SCENARIO --db URL [options]`` and prints
its result as one line ``RESULT {json}`` on stdout (anything else it prints is ignored by compare.py).
Child processes (workers) talk to their parent with lines starting with ``@@``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

SCENARIOS = ("setup", "throughput", "throughput_workers", "wakeup", "sleep", "idle", "replay")
EVENT = "bench.wake"
"""The event type (geste, Edda) or message topic (DBOS) a waiting workflow waits for."""


def parser(system: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"{system}: one benchmark scenario, one RESULT line")
    p.add_argument("scenario", choices=[*SCENARIOS, "worker"])
    p.add_argument("--db", required=True, help="postgresql://... or sqlite:///path")
    p.add_argument("--instances", type=int, default=1000, help="throughput: workflows")
    p.add_argument("--workers", type=int, default=4, help="throughput_workers: worker processes")
    p.add_argument("--concurrency", type=int, default=100, help="workflows run at once per process")
    p.add_argument("--samples", type=int, default=40, help="wakeup: wake-ups")
    p.add_argument("--wake-budget", type=float, default=90.0, help="wakeup: stop sampling after this, s")
    p.add_argument("--sleepers", type=int, default=100, help="sleep: concurrent workflows")
    p.add_argument("--sleep", type=float, default=0.1, help="sleep: the durable sleep, s")
    p.add_argument("--waiting", type=int, default=10_000, help="idle: waiting workflows")
    p.add_argument("--idle-seconds", type=float, default=30.0, help="idle: the window")
    p.add_argument("--settle", type=float, default=12.0, help="idle: wait before the first reading, s")
    p.add_argument("--steps", type=int, default=100, help="replay: recorded steps before the wait")
    p.add_argument("--variant", default="", help="a system's configuration variant (dbos: threads)")
    p.add_argument("--role", default="", help=argparse.SUPPRESS)
    p.add_argument("--ids", default="", help=argparse.SUPPRESS)
    return p


def emit(kind: str, **fields: Any) -> None:
    """A line for the parent process (``@@ kind {json}``)."""
    sys.stdout.write(f"@@ {kind} {json.dumps(fields)}\n")
    sys.stdout.flush()


def result(system: str, scenario: str, **fields: Any) -> None:
    line = {"system": system, "scenario": scenario, **fields}
    sys.stdout.write("RESULT " + json.dumps(line) + "\n")
    sys.stdout.flush()


def is_postgres(url: str) -> bool:
    return url.startswith("postgres")


def cpu_seconds() -> float:
    """CPU time of this process (all its threads)."""
    return time.process_time()


def children_cpu_seconds() -> float:
    """CPU time of the children this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int | None = None) -> float:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def quantiles_ms(seconds: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(seconds, 50) * 1000,
        "p99_ms": percentile(seconds, 99) * 1000,
        "max_ms": max(seconds) * 1000 if seconds else float("nan"),
        "n": len(seconds),
    }


class Child:
    """A child process running this script in some role; its ``@@`` lines arrive on a queue."""

    def __init__(self, script: str, args: argparse.Namespace, role: str, **extra: Any) -> None:
        self.command = [sys.executable, script, "worker", "--db", args.db, "--role", role]
        for name in ("concurrency", "steps", "variant", "instances", "samples"):
            self.command += [f"--{name}", str(getattr(args, name))]
        for name, value in extra.items():
            self.command += [f"--{name.replace('_', '-')}", str(value)]
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Event()
        self._taken: dict[str, int] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=2**20
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace")
            if text.startswith("@@ "):
                kind, _, payload = text[3:].partition(" ")
                self.lines.append((kind, json.loads(payload)))
                self._changed.set()
        self.lines.append(("exit", {"code": await self.proc.wait()}))
        self._changed.set()

    async def first(
        self, match: Callable[[str, dict[str, Any]], bool], timeout: float, start: int = 0
    ) -> tuple[int, dict[str, Any]]:
        """The first line from index ``start`` on that ``match`` accepts (waiting for it to come)."""
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.lines):
                kind, fields = self.lines[index]
                if match(kind, fields):
                    return index, fields
                if kind == "exit":
                    raise RuntimeError(f"{self.command[1]} exited: {fields}")
                index += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.command[1]}: the expected line did not come in {timeout:.0f} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def expect(self, kind: str, timeout: float = 120.0) -> dict[str, Any]:
        """The next line of that kind (each is returned once); fails if the child exits first."""
        index, fields = await self.first(lambda k, _: k == kind, timeout, self._taken.get(kind, 0))
        self._taken[kind] = index + 1
        return fields

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # a worker also stops when its stdin closes
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


def stop_on_sigterm(stop: Callable[[], None]) -> None:
    """In a worker: SIGTERM, or the parent going away (stdin closing), calls ``stop`` in the loop."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop)

    def orphaned() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stop)

    threading.Thread(target=orphaned, daemon=True).start()  # a daemon: it does not hold the exit


def _admin_url(db_url: str) -> str:
    return db_url.rsplit("/", 1)[0] + "/postgres"


def _db_name(db_url: str) -> str:
    return db_url.rsplit("/", 1)[1].split("?", 1)[0]


async def database_transactions(db_url: str) -> int | None:
    """xact_commit + xact_rollback of the database in ``db_url`` (None for SQLite)."""
    if not is_postgres(db_url):
        return None
    import asyncpg

    conn = await asyncpg.connect(_admin_url(db_url))
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        value = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", _db_name(db_url)
        )
        return int(value)
    finally:
        await conn.close()


class CountedTransactions:
    """Transactions of a database over a window, and of a control: an idle LISTENing connection.

    A backend that LISTENs runs a transaction to read the notification queue whenever a NOTIFY is sent
    anywhere in the cluster, in its own database's counters: on a shared server each system's listener
    adds other people's NOTIFY traffic. The control connection, alone in a database of its own, counts
    that traffic; ``net`` subtracts it once (each system here keeps one listening connection). A
    listening backend that only hears notifications flushes its counters at exit only, so the control
    connection is opened with the system's processes and closed with them.
    Read the end only after the processes using the database exited (a backend flushes its counters on
    exit; PostgreSQL 15 may otherwise hold them for up to 10 s).
    """

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.control = f"{_db_name(db_url)}_ctl"
        self.conn: Any = None
        self.before = self.control_before = 0
        self.total = self.control_total = 0

    async def __aenter__(self) -> CountedTransactions:
        import asyncpg

        admin = await asyncpg.connect(_admin_url(self.db_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.control}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{self.control}"')
        finally:
            await admin.close()
        control_url = self.db_url.rsplit("/", 1)[0] + "/" + self.control
        self.conn = await asyncpg.connect(control_url)
        await self.conn.add_listener("geste_bench_control", lambda *_: None)
        await self.mark()
        return self

    async def mark(self) -> None:
        """Start counting from now (the control started earlier, with the system's processes)."""
        self.before = await database_transactions(self.db_url) or 0
        control_url = self.db_url.rsplit("/", 1)[0] + "/" + self.control
        self.control_before = await database_transactions(control_url) or 0

    async def finish(self) -> None:
        """Close the control connection, let the counters flush, read both."""
        import asyncpg

        await self.conn.close()
        await asyncio.sleep(1.5)
        self.total = (await database_transactions(self.db_url) or 0) - self.before
        control_url = self.db_url.rsplit("/", 1)[0] + "/" + self.control
        self.control_total = (await database_transactions(control_url) or 0) - self.control_before
        admin = await asyncpg.connect(_admin_url(self.db_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.control}" WITH (FORCE)')
        finally:
            await admin.close()

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None and not self.conn.is_closed():
            await self.conn.close()
            import asyncpg

            admin = await asyncpg.connect(_admin_url(self.db_url))  # finish() was not reached
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{self.control}" WITH (FORCE)')
            finally:
                await admin.close()

    @property
    def net(self) -> int:
        return self.total - self.control_total


async def count_rows(db_url: str, sql: str) -> int:
    """One count on PostgreSQL or SQLite (a completion check done outside the system under test)."""
    if is_postgres(db_url):
        import asyncpg

        conn = await asyncpg.connect(db_url)
        try:
            return int(await conn.fetchval(sql))
        finally:
            await conn.close()
    import sqlite3

    path = db_url.split(":///", 1)[1].split("?", 1)[0]
    with sqlite3.connect(path, timeout=30) as conn:
        return int(conn.execute(sql).fetchone()[0])


async def wait_count(db_url: str, sql: str, target: int, timeout: float, every: float = 0.02) -> float:
    """Poll ``sql`` until it counts ``target``; returns the time.perf_counter() when it did."""
    if is_postgres(db_url):
        import asyncpg

        conn = await asyncpg.connect(db_url)
        try:
            deadline = time.monotonic() + timeout
            while int(await conn.fetchval(sql)) < target:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{sql!r} did not reach {target} in {timeout:.0f} s")
                await asyncio.sleep(every)
            return time.perf_counter()
        finally:
            await conn.close()
    deadline = time.monotonic() + timeout
    while await count_rows(db_url, sql) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sql!r} did not reach {target} in {timeout:.0f} s")
        await asyncio.sleep(every)
    return time.perf_counter()


def quiet_logs() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in ("dbos", "edda", "geste", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


# -- the scenarios, the same for every system ----------------------------------------------------------
class NotSupported(Exception):
    """A scenario the system cannot run; the message says why (shown as n/a in the table)."""


async def scenario_setup(system: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Create the system's tables (migrations), then stop: the throughput run that follows is counted."""
    await system.open(worker=True)
    await system.close()
    return {}


async def scenario_throughput(system: Any, args: argparse.Namespace) -> dict[str, Any]:
    await system.open(worker=True)
    try:
        cpu, started = cpu_seconds(), time.perf_counter()
        await system.run_throughput(args.instances)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    finally:
        await system.close()
    return {
        "workflows_per_s": args.instances / elapsed,
        "seconds": elapsed,
        "cpu_ms_per_workflow": cpu / args.instances * 1000,
        "instances": args.instances,
    }


async def scenario_throughput_workers(system: Any, args: argparse.Namespace, script: str) -> dict[str, Any]:
    if not hasattr(system, "enqueue"):
        raise NotSupported(system.workers_unsupported)
    workers = [Child(script, args, "throughput") for _ in range(args.workers)]
    try:
        for w in workers:
            await w.start()
        for w in workers:
            await w.expect("ready")
        await system.open(worker=False)
        pids = [w.proc.pid for w in workers if w.proc is not None]
        workers_before = sum(process_cpu_seconds(pid) for pid in pids)
        cpu, started = cpu_seconds(), time.perf_counter()
        await system.enqueue(args.instances)
        done = await wait_count(args.db, system.completed_sql, args.instances, timeout=600)
        client_cpu = cpu_seconds() - cpu
        workers_window = sum(process_cpu_seconds(pid) for pid in pids) - workers_before
        await system.close()
    finally:
        for w in workers:
            await w.stop()
    elapsed = done - started
    worker_cpu = children_cpu_seconds()  # includes their start-up and shutdown
    return {
        "workflows_per_s": args.instances / elapsed,
        "seconds": elapsed,
        "cpu_ms_per_workflow": (worker_cpu + client_cpu) / args.instances * 1000,
        "cpu_ms_per_workflow_window": (workers_window + client_cpu) / args.instances * 1000,
        "instances": args.instances,
        "workers": args.workers,
    }


async def scenario_wakeup(system: Any, args: argparse.Namespace, script: str) -> dict[str, Any]:
    """A worker process runs waiting workflows; this process wakes them one at a time."""
    rounds = 10
    count = max(1, -(-args.samples // rounds))
    worker = Child(script, args, "waiter", waiters=count, rounds=rounds)
    latencies: list[float] = []
    timeouts = 0

    def line_of(kind: str, iid: str, r: int) -> Callable[[str, dict[str, Any]], bool]:
        return lambda k, f: k == kind and f.get("id") == iid and f.get("round") == r

    try:
        await worker.start()
        ids = (await worker.expect("ready", timeout=300))["ids"]
        await system.open(worker=False)
        began = time.monotonic()
        try:
            for r in range(rounds):
                for iid in ids:
                    over = time.monotonic() - began > args.wake_budget
                    if over or len(latencies) + timeouts >= args.samples:
                        break
                    await worker.first(line_of("waiting", iid, r), 120)
                    await asyncio.sleep(0.05)  # let the wait's suspension commit
                    await system.send(iid, r)
                    sent = time.time()
                    try:  # the first one: later ones are replays
                        _, fields = await worker.first(line_of("resumed", iid, r), 40)
                    except TimeoutError:
                        timeouts += 1
                        break  # this instance is stuck; the budget decides whether others go on
                    latencies.append(fields["at"] - sent)
        finally:
            await system.close()
    finally:
        await worker.stop()
    out = quantiles_ms(latencies)
    out["timeouts_40s"] = timeouts
    return out


async def scenario_sleep(system: Any, args: argparse.Namespace) -> dict[str, Any]:
    await system.open(worker=True)
    try:
        lateness = await system.run_sleepers(args.sleepers, args.sleep)
    finally:
        await system.close()
    return quantiles_ms(lateness)


async def scenario_idle(system: Any, args: argparse.Namespace, script: str) -> dict[str, Any]:
    """A worker process holds ``--waiting`` waiting workflows; its RSS and the database's transactions."""
    worker = Child(script, args, "idle", waiting=args.waiting)
    counted = CountedTransactions(args.db) if is_postgres(args.db) else None
    try:
        if counted is not None:
            await counted.__aenter__()  # the control lives as long as the worker (see its docstring)
        await worker.start()
        started = time.perf_counter()
        await worker.expect("ready", timeout=1800)
        setup_s = time.perf_counter() - started
        await asyncio.sleep(args.settle)  # PostgreSQL 15 may hold a backend's counters for up to 10 s
        assert worker.proc is not None
        if counted is not None:
            await counted.mark()
        t0 = time.monotonic()
        await asyncio.sleep(args.idle_seconds)
        rss = rss_mib(worker.proc.pid)
        await worker.stop(signal.SIGKILL)  # no shutdown work in the window; the backends flush on exit
        window = time.monotonic() - t0
        if counted is not None:
            await counted.finish()
    finally:
        await worker.stop(signal.SIGKILL)
        if counted is not None:
            await counted.__aexit__()
    minute = 60 / window
    return {
        "rss_mib": rss,
        "transactions_per_min": None if counted is None else counted.net * minute,
        "transactions_per_min_raw": None if counted is None else counted.total * minute,
        "control_per_min": None if counted is None else counted.control_total * minute,
        "waiting": args.waiting,
        "setup_s": setup_s,
    }


async def scenario_replay(system: Any, args: argparse.Namespace, script: str) -> dict[str, Any]:
    """An instance records ``--steps`` steps and waits; its process is killed; a new one resumes it."""
    first = Child(script, args, "replay_a")
    try:
        await first.start()
        iid = (await first.expect("waiting", timeout=1800))["id"]
        await asyncio.sleep(1.0)  # the suspension commits
    finally:
        await first.stop(signal.SIGKILL)
    second = Child(script, args, "replay_b")
    try:
        await second.start()
        ready = await second.expect("ready", timeout=120)
        await system.open(worker=False)
        try:
            await system.send(iid, 0)
            sent = time.time()
            done = await second.expect("done", timeout=300)
        finally:
            await system.close()
    finally:
        await second.stop()
    return {
        "steps": args.steps,
        "from_start_ms": (done["at"] - ready["opening"]) * 1000,
        "from_event_ms": (done["at"] - sent) * 1000,
    }


async def worker(system: Any, args: argparse.Namespace) -> None:
    stopping = asyncio.Event()
    stop_on_sigterm(stopping.set)
    opening = time.time()
    await system.open(worker=True)
    try:
        if args.role == "waiter":
            ids = await system.start_waiters(args.waiters, args.rounds)
            emit("ready", ids=ids)
        elif args.role == "idle":
            await system.start_idle(args.waiting)
            emit("ready")
        elif args.role == "replay_a":
            await system.start_replay(args.steps)
        elif args.role == "replay_b":
            emit("ready", opening=opening)
        else:
            emit("ready")
        await stopping.wait()
    finally:
        await system.close()


def main(make_system: Callable[[argparse.Namespace], Any], script: str, system_name: str) -> None:
    p = parser(system_name)
    p.add_argument("--waiters", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=10, help=argparse.SUPPRESS)
    args = p.parse_args()
    quiet_logs()
    system = make_system(args)

    async def run() -> None:
        if args.scenario == "worker":
            await worker(system, args)
            return
        try:
            if args.scenario == "setup":
                fields = await scenario_setup(system, args)
            elif args.scenario == "throughput":
                fields = await scenario_throughput(system, args)
            elif args.scenario == "throughput_workers":
                fields = await scenario_throughput_workers(system, args, script)
            elif args.scenario == "wakeup":
                fields = await scenario_wakeup(system, args, script)
            elif args.scenario == "sleep":
                fields = await scenario_sleep(system, args)
            elif args.scenario == "idle":
                fields = await scenario_idle(system, args, script)
            else:
                fields = await scenario_replay(system, args, script)
        except NotSupported as exc:
            result(system_name, args.scenario, na=str(exc))
            return
        result(system_name, args.scenario, variant=args.variant, **fields)

    system.run(run())
