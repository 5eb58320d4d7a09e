"""Wake-up latency across processes: cause committed -> workflow code running again, and the idle load.

    .venv/bin/python benchmarks/wakeup_latency.py                       # everything, under 5 minutes
    .venv/bin/python benchmarks/wakeup_latency.py --modes notify --sizes 1,1000 --runs 3 --idle-seconds 0

A worker subprocess (default options apart from the mode) runs instances of a workflow that waits for an
event in a loop. This process, a client App (``run_worker=False``), sends each event with
``app.send_event(..., instance_id=...)`` and takes the time just after that call returns: the event and the
wake-up it causes have committed. The workflow takes ``time.time()`` right after ``ctx.wait_event``
returns and writes it to its stdout pipe (no database round trip before the timestamp). Latency is the
difference: same host, same clock. send_event returns a little after its COMMIT is answered (the
pool's release), so the table also counts from the COMMIT's reply, timed in this process.

Modes: LISTEN/NOTIFY (the default options on PostgreSQL) and polling only (``listen_notify=False``, the
default ``poll_interval`` of 1 s). Sizes: 1 waiting instance (woken over and over: a few instances one
after the other, each waiting ``--rounds-per-instance`` times, so its history stays short), and 100 or
1,000 waiting instances woken one at a time (each event targets one instance); then all of them in one
burst (one untargeted event, one commit; LISTEN/NOTIFY only unless ``--burst all``). Before each wake the
previous woken instance is back to waiting (it reported its suspension) and a pause follows: ``--gap``
with LISTEN/NOTIFY, a random time in [0, poll_interval) with polling, so that the send is not in phase
with the poll. Every (run, mode, size) gets a fresh schema and fresh worker processes (stopped with
SIGTERM; they also stop if this process dies); the table shows, for each figure, the median over the runs.

The worker is instrumented by monkeypatching (no database work added): it timestamps the notification's
arrival, the claim, the history read and the event-taking transaction, which gives the per-stage table.

Idle load: ``--idle-waiting`` instances wait and the worker idles for ``--idle-seconds`` (both modes side
by side, each in a temporary database of its own). Two counts: the statements the worker process sends
(counted in it, by kind), and the change of ``pg_stat_database.xact_commit + xact_rollback`` of its
database, read after ``pg_stat_clear_snapshot()``, after a wait that lets the set-up's counters be flushed
(PostgreSQL 15 holds a backend's counters back for up to 10 s) and after the worker exited (exit flushes).
The server count also holds transactions no client sent: an idle backend's catch-up on the shared
invalidation queue (DDL anywhere in the cluster) and the listener's reading of the notification queue
(NOTIFYs anywhere in the cluster), so on a busy shared server it is higher than what the worker sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import geste

POSTGRES = os.environ.get("GESTE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
EVENT = "bench_wake"
NOTIFY, POLL = "notify", "poll"
FOREVER = 1_000_000
"""Rounds of the instances of the 100/1,000 sizes: they wait until the worker is stopped."""
STAGES = ("notified", "claim_start", "claimed", "history", "take_start", "taken")
WAIT_TIMEOUT = 60.0
ATTEMPTS = 3
"""Tries of one (run, mode, size) measurement before giving up."""
SETTLE = 12.0
"""Seconds between the idle set-up and the first reading (see ``idle_load``)."""

Record = Callable[[str, str, float], None]


def build_app(url: str, record: Record | None, **options: object) -> tuple[geste.App, geste.Workflow]:  # type: ignore[type-arg]
    app = geste.App(url, **options)  # type: ignore[arg-type]

    @app.workflow
    async def waiter(ctx: geste.WorkflowContext, rounds: int) -> int:
        for _ in range(rounds):
            event = await ctx.wait_event(EVENT)
            resumed = time.time()  # wall time on purpose: the measurement, not a recorded step
            if record is not None:
                record(ctx.instance_id, event.data["tag"], resumed)
        return rounds

    return app, waiter


def mode_options(mode: str, poll_interval: float) -> dict[str, object]:
    if mode == NOTIFY:
        return {"poll_interval": poll_interval}
    return {"listen_notify": False, "poll_interval": poll_interval}


# -- the worker process ------------------------------------------------------------------------------
TRACE: dict[str, dict[str, float]] = {}
SEEN: set[tuple[str, str]] = set()


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def record_resume(instance_id: str, tag: str, resumed: float) -> None:
    """Report a wake-up once (a later replay of the same instance runs this code again)."""
    if (instance_id, tag) in SEEN:
        return
    SEEN.add((instance_id, tag))
    trace = TRACE.pop(instance_id, {})
    stages = " ".join(f"{trace[s]:.6f}" if s in trace else "-" for s in STAGES)
    emit(f"R {instance_id} {tag} {resumed:.6f} {stages}")


def instrument() -> None:
    """Timestamps along a wake-up, and the suspensions/finishes the client waits for; no database work."""
    from geste.runtime.wakeups import WORKFLOW_RESUMABLE, Listener
    from geste.storage.base import StoredEvent, Suspension
    from geste.storage.postgres import PostgresStorage

    on_notification = Listener._on_notification

    def traced_notification(self, channel, payload):  # type: ignore[no-untyped-def]
        if channel == WORKFLOW_RESUMABLE:
            now = time.time()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                TRACE.setdefault(json.loads(payload)["instance_id"], {}).setdefault("notified", now)
        on_notification(self, channel, payload)

    claim = PostgresStorage.claim

    async def traced_claim(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.time()
        claims = await claim(self, *args, **kwargs)
        end = time.time()
        for c in claims:
            trace = TRACE.setdefault(c.lease.instance_id, {})
            trace["claim_start"], trace["claimed"] = start, end
        return claims

    get_history = PostgresStorage.get_history

    async def traced_history(self, instance_id):  # type: ignore[no-untyped-def]
        rows = await get_history(self, instance_id)
        TRACE.setdefault(instance_id, {})["history"] = time.time()
        return rows

    take = PostgresStorage.take_event_or_suspend

    async def traced_take(self, commit, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.time()
        outcome = await take(self, commit, *args, **kwargs)
        end = time.time()
        instance_id = commit.lease.instance_id
        if isinstance(outcome, StoredEvent):
            trace = TRACE.setdefault(instance_id, {})
            trace["take_start"], trace["taken"] = start, end
        elif outcome is Suspension.SUSPENDED:
            TRACE.pop(instance_id, None)
            emit(f"S {instance_id}")
        return outcome

    finish = PostgresStorage.finish

    async def traced_finish(self, commit, *args, **kwargs):  # type: ignore[no-untyped-def]
        await finish(self, commit, *args, **kwargs)
        emit(f"F {commit.lease.instance_id}")

    Listener._on_notification = traced_notification  # type: ignore[method-assign]
    PostgresStorage.claim = traced_claim  # type: ignore[method-assign]
    PostgresStorage.get_history = traced_history  # type: ignore[method-assign]
    PostgresStorage.take_event_or_suspend = traced_take  # type: ignore[method-assign]
    PostgresStorage.finish = traced_finish  # type: ignore[method-assign]


STATEMENTS: Counter[str] = Counter()
QUERY_NAMES: dict[str, str] = {}
"""geste's queries by their text (as the storage formats them), to name what is counted."""
KINDS = (("pg_advisory_unlock_all", "pool reset"), ("pg_notify($1, '')", "listener probe"))


def count_statements() -> None:
    """Count every statement this process sends, by kind (idle runs only: it costs a little per call)."""
    from asyncpg.connection import Connection

    from geste.storage.postgres import PostgresStorage

    init = PostgresStorage.__init__

    def named(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, **kwargs)
        QUERY_NAMES.update({sql: name for name, sql in self._q.items()})

    PostgresStorage.__init__ = named  # type: ignore[method-assign]

    def kind(query: str) -> str:
        if query in QUERY_NAMES:
            return QUERY_NAMES[query]
        for needle, name in KINDS:
            if needle in query:
                return name
        return " ".join(query.split()[:2])

    def counting(original):  # type: ignore[no-untyped-def]
        async def counted(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
            STATEMENTS[kind(str(query))] += 1
            return await original(self, query, *args, **kwargs)

        return counted

    for method in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
        setattr(Connection, method, counting(getattr(Connection, method)))


def serve(url: str, mode: str, poll_interval: float, statements: bool) -> None:
    instrument()
    if statements:
        count_statements()
    app, _ = build_app(url, record_resume, **mode_options(mode, poll_interval))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, app.shutdown)
        loop.add_signal_handler(signal.SIGUSR1, lambda: emit(f"C {json.dumps(STATEMENTS)}"))

        def orphaned() -> None:  # the benchmark died without stopping us: stdin closes, we stop
            sys.stdin.read()
            loop.call_soon_threadsafe(app.shutdown)

        threading.Thread(target=orphaned, daemon=True).start()
        await app.open()
        deadline = time.monotonic() + 30
        while mode == NOTIFY and app.listener_status().state != "listening":
            if time.monotonic() > deadline:
                raise RuntimeError("the listener did not connect within 30 s")
            await asyncio.sleep(0.01)
        emit("ready")
        await app.run()
        emit(f"C {json.dumps(STATEMENTS)}")  # the final count, after the shutdown

    asyncio.run(run())


# -- the benchmark process ---------------------------------------------------------------------------
@dataclass
class Resume:
    at: float
    stages: dict[str, float]


class Workers:
    """Worker subprocesses and what they report on their stdout: resumes, suspensions, finishes."""

    def __init__(
        self, url: str, mode: str, count: int, poll_interval: float, *, statements: bool = False
    ) -> None:
        self.command = [
            sys.executable,
            __file__,
            "--serve",
            url,
            "--mode",
            mode,
            "--poll-interval",
            str(poll_interval),
            *(["--count-statements"] if statements else []),
        ]
        self.count = count
        self.procs: list[asyncio.subprocess.Process] = []
        self.readers: list[asyncio.Task[None]] = []
        self.resumed: dict[tuple[str, str], Resume] = {}
        self.marks: Counter[tuple[str, str]] = Counter()
        self.statement_counts: list[Counter[str]] = []
        self._resume_waiters: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._mark_waiters: dict[tuple[str, str], list[tuple[int, asyncio.Future[None]]]] = {}
        self._stopping = False

    async def start(self) -> None:
        for _ in range(self.count):
            proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            self.procs.append(proc)
        for proc in self.procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise RuntimeError(f"a worker process did not start (said {line!r})")
            self.readers.append(asyncio.create_task(self._read(proc)))

    async def stop(self) -> None:
        self._stopping = True
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
        await asyncio.gather(*self.readers, return_exceptions=True)

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            self._line(line.decode().split())
        if not self._stopping:
            error = RuntimeError(f"a worker process exited (code {await proc.wait()})")
            for future in self._resume_waiters.values():
                if not future.done():
                    future.set_exception(error)
            for waiters in self._mark_waiters.values():
                for _, future in waiters:
                    if not future.done():
                        future.set_exception(error)

    def _line(self, words: list[str]) -> None:
        if words[0] == "R":
            key = (words[1], words[2])
            if key in self.resumed:  # another worker replayed it (first report wins)
                return
            stages = {s: float(v) for s, v in zip(STAGES, words[4:], strict=True) if v != "-"}
            self.resumed[key] = Resume(float(words[3]), stages)
            future = self._resume_waiters.pop(key, None)
            if future is not None and not future.done():
                future.set_result(None)
        elif words[0] == "C":
            self.statement_counts.append(Counter(json.loads(" ".join(words[1:]))))
            key = ("C", "")
            self.marks[key] += 1
            for _, future in self._mark_waiters.pop(key, []):
                if not future.done():
                    future.set_result(None)
        elif words[0] in ("S", "F"):
            key = (words[0], words[1])
            self.marks[key] += 1
            waiters = self._mark_waiters.get(key)
            if waiters:
                for count, future in waiters:
                    if count <= self.marks[key] and not future.done():
                        future.set_result(None)
                waiters[:] = [w for w in waiters if not w[1].done()]

    async def resume_of(self, instance_id: str, tag: str, timeout: float = WAIT_TIMEOUT) -> Resume:
        key = (instance_id, tag)
        if key not in self.resumed:
            future = self._resume_waiters.get(key)
            if future is None:
                future = self._resume_waiters[key] = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(future), timeout)
            except TimeoutError:
                raise RuntimeError(f"instance {instance_id} did not resume for {tag} in {timeout}s") from None
        return self.resumed[key]

    async def statements(self) -> Counter[str]:
        """The statements sent so far by all the worker processes (started with ``statements=True``)."""
        seen = len(self.statement_counts)
        for proc in self.procs:
            proc.send_signal(signal.SIGUSR1)
        while len(self.statement_counts) < seen + len(self.procs):
            await self.mark("C", "", len(self.statement_counts) + 1)
        return sum(self.statement_counts[seen:], Counter())

    def final_statements(self) -> Counter[str]:
        """After ``stop()``: what the worker processes said they sent in all, last thing before exiting."""
        return sum(self.statement_counts[-len(self.procs) :], Counter())

    async def mark(self, kind: str, instance_id: str, count: int = 1, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait until the instance reported its ``count``-th suspension ("S") or finish ("F")."""
        key = (kind, instance_id)
        if self.marks[key] >= count:
            return
        future = asyncio.get_running_loop().create_future()
        self._mark_waiters.setdefault(key, []).append((count, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise RuntimeError(f"instance {instance_id}: no {kind} #{count} within {timeout}s") from None


@dataclass
class RunResult:
    """Latencies in seconds, from send_event's return and from the COMMIT's reply in the client."""

    one: list[float] = field(default_factory=list)
    one_commit: list[float] = field(default_factory=list)
    burst: list[float] = field(default_factory=list)
    burst_commit: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    burst_stages: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Idle:
    mode: str
    transactions: int
    statements: Counter[str]
    seconds: float
    isolated: bool


LAST_COMMIT = [0.0]
"""When this process last saw a transaction's COMMIT answered (send_event's transaction, here)."""


def hook_commits() -> None:
    """In the client: note when a COMMIT is answered; send_event returns a little later."""
    from asyncpg.transaction import Transaction

    original = Transaction.__aexit__

    async def timed(self, *exc):  # type: ignore[no-untyped-def]
        try:
            return await original(self, *exc)
        finally:
            LAST_COMMIT[0] = time.time()

    Transaction.__aexit__ = timed  # type: ignore[method-assign]


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def connect(url: str = POSTGRES) -> Any:
    """A plain connection; waits a while if the server is full (tests may be running alongside)."""
    import asyncpg

    for attempt in range(30):
        try:
            return await asyncpg.connect(url)
        except asyncpg.TooManyConnectionsError:
            if attempt == 29:
                raise
            await asyncio.sleep(1)


async def admin_execute(sql: str) -> None:
    conn = await connect()
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def cleanup(sql: str) -> None:
    try:
        await admin_execute(sql)
    except Exception as exc:  # do not hide the error that brought us here
        print(f"cleanup failed ({sql}): {type(exc).__name__}: {exc}", file=sys.stderr)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    async def pause(self, mode: str) -> None:
        if mode == NOTIFY:
            await asyncio.sleep(self.args.gap)
        else:
            await asyncio.sleep(random.uniform(0, self.args.poll_interval))

    async def wake(
        self, app: geste.App, workers: Workers, instance_id: str, tag: str, result: RunResult
    ) -> None:
        await app.send_event(EVENT, {"tag": tag}, instance_id=instance_id)
        returned, committed = time.time(), LAST_COMMIT[0]
        resume = await workers.resume_of(instance_id, tag)
        result.one.append(resume.at - returned)
        result.one_commit.append(resume.at - committed)
        result.stages.append(
            {"committed": committed, "returned": returned, "resumed": resume.at, **resume.stages}
        )

    async def measure(self, mode: str, size: int) -> RunResult:
        args = self.args
        schema = f"bench_wake_{uuid.uuid4().hex[:8]}"
        url = with_query(POSTGRES, schema=schema)
        workers = Workers(url, mode, args.workers, args.poll_interval)
        result = RunResult()
        try:
            await workers.start()
            app, waiter = build_app(url, None, run_worker=False, **mode_options(mode, args.poll_interval))
            async with app:
                samples = args.samples if mode == NOTIFY else args.poll_samples
                if size == 1:
                    await self.single(app, waiter, workers, mode, samples, result)
                else:
                    await self.many(app, waiter, workers, mode, size, samples, result)
        finally:
            await workers.stop()
            await cleanup(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        return result

    async def single(
        self,
        app: geste.App,
        waiter: geste.Workflow,  # type: ignore[type-arg]
        workers: Workers,
        mode: str,
        samples: int,
        result: RunResult,
    ) -> None:
        """One waiting instance at a time, woken ``samples`` times (a new instance every few rounds)."""
        done = 0
        while done < samples:
            rounds = min(self.args.rounds_per_instance, samples - done)
            handle = await waiter.start(rounds)
            iid = handle.instance_id
            await workers.mark("S", iid, 1)
            for r in range(rounds):
                await self.pause(mode)
                await self.wake(app, workers, iid, f"w{r}", result)
                if r < rounds - 1:
                    await workers.mark("S", iid, r + 2)  # waiting again before the next wake
                else:
                    await workers.mark("F", iid)
            done += rounds

    async def many(
        self,
        app: geste.App,
        waiter: geste.Workflow,  # type: ignore[type-arg]
        workers: Workers,
        mode: str,
        size: int,
        samples: int,
        result: RunResult,
    ) -> None:
        """``size`` waiting instances: ``samples`` woken one at a time, then all of them in one burst."""
        ids = [f"w{size}-{uuid.uuid4().hex[:12]}" for _ in range(size)]
        for iid in ids:
            await waiter.start_with_id(iid, FOREVER)
        for iid in ids:
            await workers.mark("S", iid, 1)
        woken: Counter[str] = Counter()
        order: list[str] = []
        while len(order) < samples:
            order.extend(random.sample(ids, min(size, samples - len(order))))
        for n, iid in enumerate(order):
            await self.pause(mode)
            await self.wake(app, workers, iid, f"w{n}", result)
            woken[iid] += 1
            await workers.mark("S", iid, woken[iid] + 1)
        if self.args.burst == "all" or self.args.burst == mode:
            await self.pause(mode)
            await app.send_event(EVENT, {"tag": "burst"})  # untargeted: every waiting instance takes it
            returned, committed = time.time(), LAST_COMMIT[0]
            for iid in ids:
                resume = await workers.resume_of(iid, "burst", timeout=WAIT_TIMEOUT + size * 0.1)
                result.burst.append(resume.at - returned)
                result.burst_commit.append(resume.at - committed)
                result.burst_stages.append(
                    {"committed": committed, "returned": returned, "resumed": resume.at, **resume.stages}
                )

    async def idle_load(self, mode: str, waiting: int, seconds: float) -> Idle:
        """Statements and transactions while ``waiting`` instances wait and the worker idles."""
        import asyncpg

        args = self.args
        name = f"geste_bench_idle_{uuid.uuid4().hex[:8]}"
        schema = "public"
        isolated = True
        try:
            await admin_execute(f'CREATE DATABASE "{name}"')
            url = with_database(POSTGRES, name)
        except asyncpg.PostgresError as exc:
            print(f"(cannot create a database: {exc}; counting in the shared one, other work included)")
            isolated = False
            name = urlsplit(POSTGRES).path.lstrip("/")
            schema = f"bench_idle_{uuid.uuid4().hex[:8]}"
            url = with_query(POSTGRES, schema=schema)
        monitor = await connect(POSTGRES if isolated else with_database(POSTGRES, "postgres"))

        async def transactions() -> int:
            await monitor.execute("SELECT pg_stat_clear_snapshot()")
            value = await monitor.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", name
            )
            return int(value)

        workers = Workers(url, mode, args.workers, args.poll_interval, statements=True)
        try:
            await workers.start()
            app, waiter = build_app(url, None, run_worker=False, **mode_options(mode, args.poll_interval))
            async with app:
                ids = [(await waiter.start(FOREVER)).instance_id for _ in range(waiting)]
                for iid in ids:
                    await workers.mark("S", iid, 1)
            # Reset autovacuum's counters (if it runs): an autoanalyze of geste's fresh tables would count.
            conn = await connect(with_database(POSTGRES, name))
            try:
                tables = await conn.fetch(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = $1 AND table_name LIKE 'geste%'",
                    schema,
                )
                names = ", ".join(f'"{schema}"."{t[0]}"' for t in tables)
                await conn.execute(f"VACUUM ANALYZE {names}")
            finally:
                await conn.close()
            # PostgreSQL 15 keeps a backend's counters pending for up to 10 s when it flushed less than
            # 1 s before: after the set-up's burst, wait that out, so none of it lands in the window.
            await asyncio.sleep(SETTLE)
            before = await transactions()
            sent = await workers.statements()
            started = time.monotonic()
            await asyncio.sleep(seconds)
            await workers.stop()  # on exit its backends flush their counters
            elapsed = time.monotonic() - started
            sent = workers.final_statements() - sent
            await asyncio.sleep(1.5)
            after = await transactions()
        finally:
            await workers.stop()
            await monitor.close()
            if isolated:
                await cleanup(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            else:
                await cleanup(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        return Idle(mode, after - before, sent, elapsed, isolated)


# -- the report --------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def quantiles(values: list[float]) -> tuple[float, float]:
    return percentile(values, 50), percentile(values, 99)


def label(mode: str, poll_interval: float) -> str:
    return "LISTEN/NOTIFY" if mode == NOTIFY else f"polling {poll_interval:g}s"


def latency_rows(
    results: dict[tuple[str, int], list[RunResult]], poll_interval: float
) -> list[tuple[str, int, str, int, list[float]]]:
    rows = []
    for (mode, size), runs in results.items():
        for wake, pick in (("one at a time", "one"), ("burst", "burst")):
            per_run = [(getattr(r, pick), getattr(r, pick + "_commit")) for r in runs if getattr(r, pick)]
            if not per_run:
                continue
            stats = [
                (percentile(v, 50), percentile(v, 99), max(v), statistics.fmean(v), *quantiles(c))
                for v, c in per_run
            ]
            medians = [statistics.median(s[i] for s in stats) * 1000 for i in range(6)]
            rows.append((label(mode, poll_interval), size, wake, len(per_run[0][0]), medians))
    return rows


def print_latency(results: dict[tuple[str, int], list[RunResult]], args: argparse.Namespace) -> None:
    print(
        "\nWake-up latency, ms: from the client's send_event returning (the event committed) to the"
        " workflow's code running\nagain in the worker process; the last two columns count from the"
        " COMMIT's reply instead (send_event returns once\nits connection is back in the pool)."
        f" {args.workers} worker process(es), concurrency 100. Each figure is the median\nover"
        f" {args.runs} run(s) of that run's figure; n = wake-ups per run (with a small n, p99 ~ max)."
    )
    print(
        f"{'mode':<15}{'waiting':>8}  {'wake':<14}{'n/run':>6}{'p50':>9}{'p99':>9}{'max':>9}{'mean':>9}"
        f"  {'p50 commit':>11}{'p99 commit':>11}"
    )
    for name, size, wake, n, (p50, p99, top, mean, c50, c99) in latency_rows(results, args.poll_interval):
        print(
            f"{name:<15}{size:>8}  {wake:<14}{n:>6}{p50:>9.2f}{p99:>9.2f}{top:>9.2f}{mean:>9.2f}"
            f"  {c50:>11.2f}{c99:>11.2f}"
        )


def print_stages(results: dict[tuple[str, int], list[RunResult]], args: argparse.Namespace) -> None:
    print(
        "\nWhere the time goes: ms, median of each stage over all runs' wake-ups (medians do not add up"
        " exactly).\n  return: COMMIT reply -> send_event returned (client); notified: COMMIT reply -> NOTIFY"
        " in the worker's listener;\n  claim wait: from it (polling: from the COMMIT reply) to the claim"
        " call's start; claim: the claim call (one statement that\n  also returns the history);"
        " replay+code: to the workflow's next line (send_event wrote the event into the history,\n  so"
        " there is no event-taking transaction; an instance held by a worker takes it itself: counted in"
        " replay+code); total: COMMIT reply -> code"
    )
    columns = ("return", "notified", "claim wait", "claim", "replay+code", "total")
    print(f"{'mode':<15}{'waiting':>8}  {'wake':<6}" + "".join(f"{c:>11}" for c in columns))
    for (mode, size), runs in results.items():
        for wake, pick in (("one", "stages"), ("burst", "burst_stages")):
            parts: dict[str, list[float]] = {c: [] for c in columns}
            for s in (s for r in runs for s in getattr(r, pick)):
                if not {"claim_start", "claimed"} <= s.keys():
                    continue
                origin = s.get("notified", s["committed"])
                parts["return"].append(s["returned"] - s["committed"])
                if "notified" in s:
                    parts["notified"].append(s["notified"] - s["committed"])
                parts["claim wait"].append(s["claim_start"] - origin)
                parts["claim"].append(s["claimed"] - s["claim_start"])
                parts["replay+code"].append(s["resumed"] - s["claimed"])
                parts["total"].append(s["resumed"] - s["committed"])
            if not parts["total"]:
                continue
            cells = "".join(
                f"{statistics.median(v) * 1000:>11.2f}" if v else f"{'-':>11}" for v in parts.values()
            )
            print(f"{label(mode, args.poll_interval):<15}{size:>8}  {wake:<6}" + cells)


def print_idle(loads: list[Idle], waiting: int, autovacuum: str, args: argparse.Namespace) -> None:
    print(
        f"\nDatabase load while idle, per minute: {waiting} waiting instance(s), {args.workers} worker"
        f" process(es) idle for {args.idle_seconds:g} s\n(the modes side by side, each in a database of its"
        " own; the worker's shutdown is in the window).\n  sent: the statements the worker process sent,"
        " counted in it, by kind (pool reset: asyncpg's reset query, sent each\n  time a connection goes"
        " back to the pool). server: the change of pg_stat_database.xact_commit + xact_rollback,\n  read"
        " after the worker exited. The server also counts transactions no client sent: idle backends"
        " catching up\n  with DDL, and listeners reading the notification queue, which DDL and NOTIFYs in"
        " other databases of the\n  cluster cause too: on a busy shared server, server >> sent."
        f" Autovacuum is {autovacuum} on this server."
    )
    print(f"{'mode':<15}{'sent':>8}{'server':>9}  sent by kind")
    for idle in loads:
        minute = 60 / idle.seconds
        kinds = ", ".join(f"{k} {v * minute:.1f}" for k, v in idle.statements.most_common())
        where = "" if idle.isolated else "  (server: the shared database, other work counted)"
        print(
            f"{label(idle.mode, args.poll_interval):<15}{idle.statements.total() * minute:>8.1f}"
            f"{idle.transactions * minute:>9.1f}  {kinds}{where}"
        )


async def reference(samples: int = 200) -> tuple[float, float]:
    """This machine right now: p50 of a SELECT 1 round trip, and of a NOTIFY reaching a LISTEN (ms)."""
    sender, listener = await connect(), await connect()
    heard: asyncio.Queue[float] = asyncio.Queue()
    try:
        await listener.add_listener("geste_bench_reference", lambda *_: heard.put_nowait(time.time()))
        trips, notes = [], []
        for _ in range(samples):
            start = time.time()
            await sender.fetchval("SELECT 1")
            trips.append(time.time() - start)
            start = time.time()
            await sender.execute("NOTIFY geste_bench_reference")
            notes.append(await asyncio.wait_for(heard.get(), 10) - start)
    finally:
        await sender.close()
        await listener.close()
    return percentile(trips, 50) * 1000, percentile(notes, 50) * 1000


def parse_list(text: str, allowed: set[str] | None = None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if allowed is not None and not set(items) <= allowed:
        raise SystemExit(f"choose among {', '.join(sorted(allowed))}: {text!r}")
    return items


async def bench(args: argparse.Namespace) -> None:
    modes = parse_list(args.modes, {NOTIFY, POLL})
    sizes = [int(x) for x in parse_list(args.sizes)]
    hook_commits()
    runner = Bench(args)
    results: dict[tuple[str, int], list[RunResult]] = {(m, s): [] for m in modes for s in sizes}
    began = time.monotonic()
    failures = 0
    load = os.getloadavg()[0]
    trip, notify = await reference()
    for run in range(args.runs):
        configs = list(results)
        if run % 2:
            configs.reverse()  # alternate the order run by run
        for mode, size in configs:
            for attempt in range(1, ATTEMPTS + 1):
                took = time.monotonic()
                try:
                    results[(mode, size)].append(await runner.measure(mode, size))
                    break
                except Exception as exc:  # a shared server: someone may kill our connections, restart it
                    if attempt == ATTEMPTS:
                        raise
                    print(f"run {run + 1}: {mode} {size} failed ({exc}); measuring again", file=sys.stderr)
                    failures += 1
            took = time.monotonic() - took
            print(f"run {run + 1}/{args.runs}: {mode} {size} waiting, {took:.1f} s", file=sys.stderr)
    trip_after, notify_after = await reference()
    print(
        f"\ngeste from {os.path.dirname(geste.__file__)}"
        f"\nThis machine: {os.cpu_count()} cores, load average {load:.2f} before, {os.getloadavg()[0]:.2f}"
        f" after; p50 of a SELECT 1 round trip {trip:.3f} ms before / {trip_after:.3f} ms after, of a raw"
        f"\nNOTIFY reaching a LISTEN (both in this process) {notify:.3f} / {notify_after:.3f} ms"
    )
    print_latency(results, args)
    print_stages(results, args)
    if args.idle_seconds > 0:
        waiting = args.idle_waiting if args.idle_waiting is not None else max(sizes)
        for attempt in range(1, ATTEMPTS + 1):
            tasks = [asyncio.create_task(runner.idle_load(m, waiting, args.idle_seconds)) for m in modes]
            try:
                loads = await asyncio.gather(*tasks)
                break
            except Exception as exc:
                for task in tasks:
                    task.cancel()  # and let its clean-up run before trying again
                await asyncio.gather(*tasks, return_exceptions=True)
                if attempt == ATTEMPTS:
                    raise
                print(f"idle load failed ({exc}); measuring again", file=sys.stderr)
                failures += 1
        conn = await connect()
        try:
            autovacuum = await conn.fetchval("SHOW autovacuum")
        finally:
            await conn.close()
        print_idle(loads, waiting, autovacuum, args)
    again = f"; {failures} measurement(s) failed and were made again" if failures else ""
    print(f"\n(total {time.monotonic() - began:.0f} s{again})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default="notify,poll", help="comma-separated: notify, poll")
    parser.add_argument("--sizes", default="1,100,1000", help="comma-separated numbers of waiting instances")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=200, help="wake-ups one at a time per run (notify)")
    parser.add_argument(
        "--poll-samples", type=int, default=6, help="wake-ups one at a time per run (polling, ~1 s each)"
    )
    parser.add_argument("--rounds-per-instance", type=int, default=20, help="wake-ups per instance, size 1")
    parser.add_argument("--gap", type=float, default=0.005, help="pause before each send (notify), s")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="the App's poll_interval, s")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--burst",
        choices=["notify", "all", "none"],
        default="notify",
        help="which modes also wake all waiting instances at once (default: LISTEN/NOTIFY only)",
    )
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle window per mode; 0: skip")
    parser.add_argument("--idle-waiting", type=int, help="waiting instances while idle (default: max size)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=NOTIFY, help=argparse.SUPPRESS)
    parser.add_argument("--count-statements", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.mode, args.poll_interval, args.count_statements)
        return
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
