"""Scale (issue 15): each dimension of a deployment, empty (or small) against loaded, with the ratio.

    .venv/bin/python benchmarks/scale.py                  # every part, 5 runs (about 25 minutes on 2 cores)
    .venv/bin/python benchmarks/scale.py --quick          # small sizes, 1 run: a smoke check (a few minutes)
    .venv/bin/python benchmarks/scale.py --parts waiters,channels --runs 3 --json /tmp/scale.json
    .venv/bin/python benchmarks/scale.py --from-json benchmarks/results/scale.json   # the table again

The parts, each on fresh databases of its own (``geste_scale_<random>`` on the PostgreSQL server of
``GESTE_BENCH_POSTGRES_SERVER``, dropped afterwards; SQLite files in a temporary folder):

- **workers** (PostgreSQL): one wake-up (an event, then a 0.2 s durable sleep) with 1, 8 and 16 worker
  processes: ``herd.measure`` (server transactions from ``pg_stat_database``, the transactions and claim
  statements the geste processes send, the wake-up p50; a twin idle run subtracted). The server's count
  includes PostgreSQL's own: every listening backend reads the notification queue in a transaction of its
  own for every notifying commit of the database (PostgreSQL 15), so it grows with the workers whatever
  geste does; the transactions geste begins and its claims are what routing controls.
- **waiters** (PostgreSQL): an untargeted event's wake-up among 0, 10,000 and 100,000 seeded waiters of its
  type, each matching its own key: ``event_matching.event_wakeup``.
- **loaded** (PostgreSQL and SQLite): three-step workflows/s (a client and one worker process) and a claim
  round (the worker's poll; nothing due, then one instance due) on a database holding 1,000,000 finished
  instances and 10,000 held leases against an empty one: ``loaded_claims`` (``seed``,
  ``workflows_per_second``, ``claim_round_ms``). The loaded database is seeded once; the empty one is new
  at each run.
- **channels** (PostgreSQL): a publish (``app.publish``) waking one competing receiver, in a worker
  process, among 0 and 10,000 other competing subscribers of the channel, all waiting (seeded by SQL;
  they have waited less long than the measured receiver, which a publish wakes as the one idle the
  longest): the wake-up p50, from just before ``publish`` to the workflow's code after ``receive`` (one
  host, one clock); then the ``channel_rewake`` chore's round (``ChannelMaintenance.rewake``) on the same
  database.
- **chores** (PostgreSQL and SQLite): each periodic chore's round, as ``geste.runtime.chores`` and the
  relay run it, on a database seeded with 10,000 rows per table (and 100,000 finished instances, 1,000
  held) against one with ten times as much (100,000 rows per table: competing subscribers waiting on a
  channel, its messages, events and their deliveries and keys as ``tests/test_chore_costs.py`` seeds
  them; 100,000 delivered outbox events; 1,000,000 finished instances, 10,000 held), nothing due:
  ``chore_take`` (what every worker runs once per chore interval), ``channel_rewake``, a batch of
  ``channel_cleanup`` (one call of the storage: each walk reads at most 1,000 rows, and a round of the
  chore is at most 10 such calls, while they come back full), and the relay's poll
  (``outbox_next_attempt_at``). The base is not empty: a cleanup batch reads its 1,000 subscriptions
  whenever the table holds as many, so "independent of table size" compares two sizes that both fill it.

Each figure is the median over ``--runs`` runs of that run's figure (a run's p50, or the median of its
rounds); the runs alternate the order of base and loaded. The ratio is loaded / base. The targets are
issue 15's: transactions per wake-up with 8 workers at most 1.2 times one worker's, the wake-up p50 with
100,000 waiters at most 1.2 times with none, workflows/s with 1,000,000 finished instances and 10,000
held leases at least 0.9 times an empty database's, and every periodic chore's cost independent of
table size (taken here as: between 1 / 1.2 and 1.2 times, as a chore much slower on the smaller
database depends on its tables too). It prints a Markdown table; ``--json PATH`` writes the machine, the
sizes, every run's figures and the table (again after each part: a stopped run leaves what it measured);
``--from-json PATH`` prints the table of such a file again.

The PostgreSQL server may be restarted under a measurement (the test suite does so, and the machine may be
shared): a measurement during which ``pg_postmaster_start_time()`` changed, or that failed, is not kept and
is taken again (``"retries"`` in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))  # tests.test_chore_costs: the seed of the chores' tables

import compare  # noqa: E402
import event_matching  # noqa: E402
import herd  # noqa: E402
import loaded_claims  # noqa: E402
from tests.test_chore_costs import SEED_POSTGRES as CHORE_SEED_POSTGRES  # noqa: E402
from tests.test_chore_costs import SEED_SQLITE as CHORE_SEED_SQLITE  # noqa: E402

import geste  # noqa: E402
from geste.runtime.chores import REWAKE, ChannelMaintenance  # noqa: E402

SERVER = herd.SERVER
SCRIPT = str(Path(__file__).resolve())
CHANNEL = "jobs"
SEEDED_WORKFLOW = "seeded_receiver"
"""The seeded subscribers' workflow: registered by nobody, never claimed (they have no run_at)."""
WEEK = 7 * 86400.0


# -- sizes ---------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    workers: tuple[int, ...] = (1, 8, 16)
    wakeups: int = 40
    """Wake-ups per herd measurement (one at a time, over ``herd_instances`` waiting instances)."""
    herd_instances: int = 8
    waiters: tuple[int, ...] = (0, 10_000, 100_000)
    samples: int = 100
    """Wake-ups counted per measurement (waiters, channels), after ``warmup`` not counted."""
    warmup: int = 10
    finished: int = 1_000_000
    held: int = 10_000
    instances: int = 1000
    """Three-step workflows per throughput measurement."""
    claim_rounds: int = 200
    subscribers: int = 10_000
    chore_rows: int = 100_000
    """Rows per table of the loaded chores database (the base has a tenth)."""
    chore_rounds: int = 50


QUICK = Sizes(
    workers=(1, 4),
    wakeups=12,
    herd_instances=4,
    waiters=(0, 5_000),
    samples=20,
    warmup=3,
    finished=20_000,
    held=500,
    instances=200,
    claim_rounds=30,
    subscribers=1_000,
    chore_rows=10_000,
    chore_rounds=10,
)


# -- results -------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table: a figure measured on a base and a loaded set-up, once per run."""

    part: str
    figure: str
    base_label: str
    loaded_label: str
    base: list[float] = field(default_factory=list)
    loaded: list[float] = field(default_factory=list)
    target: float | None = None
    """The largest ratio allowed (or, with ``higher_is_better``, the smallest); None: no target."""
    higher_is_better: bool = False
    two_sided: bool = False
    """The ratio must also be at least 1 / ``target``: a cost independent of size neither grows nor
    shrinks (a base much slower than the loaded set-up means the cost depends on the tables too)."""

    @property
    def base_median(self) -> float:
        return statistics.median(self.base)

    @property
    def loaded_median(self) -> float:
        return statistics.median(self.loaded)

    @property
    def ratio(self) -> float:
        base = self.base_median
        return self.loaded_median / base if base else math.nan

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        if self.higher_is_better:
            return self.ratio >= self.target
        return self.ratio <= self.target and (not self.two_sided or self.ratio >= 1 / self.target)

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "base_median": self.base_median,
            "loaded_median": self.loaded_median,
            "ratio": self.ratio,
            "met": self.met,
        }


def markdown(rows: list[Row], runs: int) -> str:
    lines = [
        f"Medians of {runs} run(s); ratio: loaded / base.",
        "",
        "| part | figure | base | loaded | base value | loaded value | ratio | target | met |",
        "|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        if r.target is None:
            target = ""
        elif r.two_sided:
            target = f"{1 / r.target:.2f} to {r.target:g}"
        else:
            target = f"{'≥' if r.higher_is_better else '≤'} {r.target:g}"
        met = {None: "", True: "yes", False: "**no**"}[r.met]
        lines.append(
            f"| {r.part} | {r.figure} | {r.base_label} | {r.loaded_label} | {compare.fmt(r.base_median)}"
            f" | {compare.fmt(r.loaded_median)} | {r.ratio:.2f} | {target} | {met} |"
        )
    return "\n".join(lines)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def count(n: int) -> str:
    return f"{n:,}"


# -- databases -----------------------------------------------------------------------------------------
async def create_database(backend: str, folder: Path) -> str:
    """A new database: a PostgreSQL database of its own on ``SERVER``, or a SQLite file in ``folder``."""
    name = f"geste_scale_{uuid.uuid4().hex[:12]}"
    if backend == "sqlite":
        return f"sqlite:///{folder / f'{name}.db'}"
    await herd._admin(f'CREATE DATABASE "{name}"', SERVER)
    return herd.with_database(SERVER, name)


async def remove_database(url: str) -> None:
    """Drop (or delete) a database of ``create_database``, waiting for the server if it is restarting (the
    test suite restarts it: the machine may be shared); if it cannot, say so and go on."""
    if url.startswith("sqlite"):
        for suffix in ("", "-wal", "-shm"):
            await asyncio.to_thread(Path(f"{sqlite_path(url)}{suffix}").unlink, missing_ok=True)
        return
    name = urlsplit(url).path.lstrip("/")
    for tried in range(30):
        try:
            await herd._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', SERVER)
            return
        except Exception as exc:
            if tried == 29:
                say(f"could not drop the database {name}: {exc!r}")
            await asyncio.sleep(2)


@contextlib.asynccontextmanager
async def fresh_database(backend: str, folder: Path) -> AsyncIterator[str]:
    """A new database (``create_database``), removed afterwards."""
    url = await create_database(backend, folder)
    try:
        yield url
    finally:
        await remove_database(url)


@contextlib.asynccontextmanager
async def seeded_database(
    backend: str, folder: Path, seed: Callable[[str], Awaitable[object]], what: str, raw: dict[str, Any]
) -> AsyncIterator[str]:
    """A new database seeded by ``seed(url)`` (made again if the server restarted meanwhile), removed
    afterwards."""

    async def make() -> str:
        url = await create_database(backend, folder)
        try:
            began = time.monotonic()
            await seed(url)
            say(f"{what}: seeded in {time.monotonic() - began:.0f} s")
        except BaseException:
            await remove_database(url)
            raise
        return url

    url = await attempt(f"{what}: seeding", make, raw, discard=remove_database)
    try:
        yield url
    finally:
        await remove_database(url)


async def pg_connect(url: str) -> Any:
    """An asyncpg connection to the database of a geste URL, in its schema (``?schema=``, or public)."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(url)
    return await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})


T = TypeVar("T")
RETRIES = 3


async def attempt(
    what: str,
    measure: Callable[[], Awaitable[T]],
    raw: dict[str, Any],
    *,
    discard: Callable[[T], Awaitable[object]] | None = None,
) -> T:
    """``measure()``, kept if it succeeded and the PostgreSQL server did not restart meanwhile (the test
    suite restarts it, and a shared machine may run it: a restart fails a measurement or, worse, changes
    its figures); else, once the server answers again, measured again (``discard`` is given a result not
    kept), up to ``RETRIES`` times more. Each measurement not kept is logged and listed in
    ``raw["retries"]``."""
    for tried in range(RETRIES + 1):
        started = await server_started()
        try:
            result = await measure()
        except Exception as exc:
            if tried == RETRIES:
                raise
            error = repr(exc)
        else:
            if await server_started() == started:
                return result
            error = "the server restarted during the measurement"
            if discard is not None:
                await discard(result)
            if tried == RETRIES:
                raise RuntimeError(f"{what}: {error}, {RETRIES + 1} times")
        say(f"{what}: not kept ({error}); measured again")
        raw.setdefault("retries", []).append({"what": what, "error": error, "at": time.time()})
    raise AssertionError("unreachable")


async def server_started(timeout: float = 300.0) -> float:
    """When the PostgreSQL server started (``pg_postmaster_start_time``), once it answers (waiting for it
    at most ``timeout`` seconds)."""
    import asyncpg

    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(herd.with_database(SERVER, "postgres"), timeout=5)
            try:
                return float(await conn.fetchval("SELECT extract(epoch FROM pg_postmaster_start_time())"))
            finally:
                await conn.close()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)


def sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///").split("?", 1)[0]


def alternate(items: list[Any], run: int) -> list[Any]:
    """The order of a run: as given, reversed the next run (a slow minute hits both sides alike)."""
    return items if run % 2 == 0 else items[::-1]


# -- part: worker processes ----------------------------------------------------------------------------
async def part_workers(sizes: Sizes, runs: int, raw: dict[str, Any]) -> list[Row]:
    counts = list(sizes.workers)
    results: dict[int, list[herd.HerdResult]] = {n: [] for n in counts}
    for run in range(runs):
        for n in alternate(counts, run):
            found = await attempt(
                f"workers, {n}",
                partial(
                    herd.measure, n, wakeups=sizes.wakeups, instances=sizes.herd_instances, server=SERVER
                ),
                raw,
            )
            results[n].append(found)
            say(
                f"workers, run {run + 1}/{runs}, {n}: {found.transactions:.2f} server tx,"
                f" {found.sent:.2f} geste tx, {found.claims:.2f} claims per wake-up,"
                f" p50 {found.p50_ms:.2f} ms"
            )
    raw["workers"] = {str(n): [asdict(r) for r in found] for n, found in results.items()}
    one = counts[0]
    rows = []
    figures = (
        ("transactions", "server transactions per wake-up (pg_stat_database)", 1.2),
        ("sent", "transactions geste begins per wake-up", 1.2),
        ("claims", "claim statements per wake-up", None),
        ("p50_ms", "wake-up p50 (ms)", None),
    )
    for key, label, target in figures:
        for n in counts[1:]:
            rows.append(
                Row(
                    "worker processes",
                    label,
                    f"{one} worker",
                    f"{n} workers",
                    [getattr(r, key) for r in results[one]],
                    [getattr(r, key) for r in results[n]],
                    target if n == 8 else None,
                )
            )
    return rows


# -- part: waiters of one event type -------------------------------------------------------------------
async def part_waiters(sizes: Sizes, runs: int, raw: dict[str, Any], folder: Path) -> list[Row]:
    counts = list(sizes.waiters)
    results: dict[int, list[event_matching.Sample]] = {n: [] for n in counts}
    for run in range(runs):
        for n in alternate(counts, run):

            async def one(n: int = n) -> event_matching.Sample:
                async with fresh_database("postgres", folder) as url:
                    return await event_matching.event_wakeup(
                        url, n, samples=sizes.samples, warmup=sizes.warmup
                    )

            sample = await attempt(f"waiters, {n}", one, raw)
            results[n].append(sample)
            say(f"waiters, run {run + 1}/{runs}, {count(n)}: p50 {sample.p50 * 1000:.2f} ms")
    raw["waiters"] = {
        str(n): [{"wakeups": s.wakeups, "sends": s.sends} for s in found] for n, found in results.items()
    }
    base = counts[0]
    return [
        Row(
            "waiters of one event type",
            "event wake-up p50 (ms)",
            f"{count(base)} waiters",
            f"{count(n)} waiters",
            [s.p50 * 1000 for s in results[base]],
            [s.p50 * 1000 for s in results[n]],
            1.2,
        )
        for n in counts[1:]
    ]


# -- part: finished instances and held leases ----------------------------------------------------------
async def part_loaded(sizes: Sizes, runs: int, raw: dict[str, Any], folder: Path, backend: str) -> list[Row]:
    figures: dict[str, dict[str, list[float]]] = {
        k: {"empty": [], "loaded": []} for k in ("workflows_per_s", "claim_nothing_ms", "claim_one_ms")
    }
    seed = partial(loaded_claims.seed, finished=sizes.finished, held=sizes.held)
    async with seeded_database(backend, folder, seed, f"loaded ({backend})", raw) as loaded_url:
        for run in range(runs):
            for which in alternate(["empty", "loaded"], run):

                async def measure(which: str = which) -> tuple[float, float, float]:
                    async with contextlib.AsyncExitStack() as stack:
                        if which == "empty":
                            url = await stack.enter_async_context(fresh_database(backend, folder))
                        else:
                            url = loaded_url
                            await loaded_claims._vacuum(url)  # the last run's dead rows, as autovacuum would
                        nothing, one = await loaded_claims.claim_round_ms(url, rounds=sizes.claim_rounds)
                        if which == "loaded":
                            await loaded_claims._vacuum(url)
                        rate = await loaded_claims.workflows_per_second(url, sizes.instances, 1)
                    return rate, nothing, one

                rate, nothing, one = await attempt(f"loaded ({backend}), {which}", measure, raw)
                figures["workflows_per_s"][which].append(rate)
                figures["claim_nothing_ms"][which].append(nothing)
                figures["claim_one_ms"][which].append(one)
                say(
                    f"loaded ({backend}), run {run + 1}/{runs}, {which}: {rate:.0f} workflows/s;"
                    f" claim round {nothing:.2f} ms (nothing due), {one:.2f} ms (one due)"
                )
    raw[f"loaded_{backend}"] = figures
    loaded = f"{count(sizes.finished)} finished + {count(sizes.held)} held"
    part = f"finished instances, held leases ({backend})"

    def row(key: str, figure: str, target: float, higher_is_better: bool = False) -> Row:
        found = figures[key]
        return Row(part, figure, "empty", loaded, found["empty"], found["loaded"], target, higher_is_better)

    return [
        row("workflows_per_s", "3-step workflows/s", 0.9, True),
        row("claim_nothing_ms", "claim round (the poll), nothing due (ms)", 1.2),
        row("claim_one_ms", "claim round, one instance due (ms)", 1.2),
    ]


# -- part: channel subscribers -------------------------------------------------------------------------
def channel_app(url: str, **options: Any) -> geste.App:
    app = geste.App(url, **options)

    @app.workflow
    async def bench_receiver(ctx: geste.WorkflowContext, rounds: int) -> int:
        await ctx.subscribe(CHANNEL, mode="competing")
        for _ in range(rounds):
            message = await ctx.receive(CHANNEL)
            if not ctx.is_replaying:
                print(f"R {message.data} {time.time():.6f}", flush=True)  # wall time: the measurement
        return rounds

    return app


def serve(url: str) -> None:
    """The worker process of the channels part: ``ready``, then ``S`` at each suspension in ``receive``
    and ``R <i> <time>`` when message i is taken (``event_matching.Worker`` reads them)."""
    from geste.storage.base import Suspension
    from geste.storage.postgres import PostgresStorage

    take = PostgresStorage.channel_take_or_suspend

    async def traced_take(self, commit, wait):  # type: ignore[no-untyped-def]
        outcome = await take(self, commit, wait)
        if outcome is Suspension.SUSPENDED:
            print("S", flush=True)
        return outcome

    PostgresStorage.channel_take_or_suspend = traced_take  # type: ignore[method-assign]
    app = channel_app(url)

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


SEED_SUBSCRIBER_INSTANCES = """
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, steps)
SELECT 'sub-' || g, $2, 'waiting', '{"args": [], "kwargs": {}}', $3::float8, $3::float8, 2
FROM generate_series(1, $1::integer) AS g
"""
SEED_SUBSCRIPTIONS = """
INSERT INTO geste_channel_subscriptions (channel, instance_id, mode, cursor_seq, waiting_since, created_at)
SELECT $2, 'sub-' || g, 'competing', 0, $3::float8 + 86400 + g * 0.001, $3::float8
FROM generate_series(1, $1::integer) AS g
"""


async def seed_subscribers(url: str, subscribers: int) -> None:
    """``subscribers`` instances waiting in ``receive`` as competing subscribers of ``CHANNEL`` (rows as
    ``channel_take_or_suspend`` leaves them), with a ``waiting_since`` after the measured receiver's: a
    publish wakes the one idle the longest, the measured one, and the others are the index it searches."""
    if subscribers == 0:
        return
    now = time.time()
    conn = await pg_connect(url)
    try:
        await conn.execute(SEED_SUBSCRIBER_INSTANCES, subscribers, SEEDED_WORKFLOW, now)
        await conn.execute(SEED_SUBSCRIPTIONS, subscribers, CHANNEL, now)
        await conn.execute("VACUUM ANALYZE geste_instances, geste_channel_subscriptions")
    finally:
        await conn.close()


async def channel_wakeup(
    url: str, subscribers: int, *, samples: int = 100, warmup: int = 10, gap: float = 0.005
) -> event_matching.Sample:
    """One measurement on the (new) PostgreSQL database ``url``: ``subscribers`` seeded waiting competing
    subscribers of ``CHANNEL``, a worker process running one more (``bench_receiver``), ``warmup``
    publishes not counted, then ``samples`` counted: from just before ``app.publish`` to the receiver's
    code after ``receive`` (``wakeups``), and the publish's own time (``sends``)."""
    wakeups: list[float] = []
    sends: list[float] = []
    worker = event_matching.Worker(url, script=SCRIPT)
    try:
        async with channel_app(url, run_worker=False) as client:  # migrates
            await seed_subscribers(url, subscribers)
            await worker.start()
            await client.start_workflow("bench_receiver", warmup + samples)
            for i in range(warmup + samples):
                await worker.expect("S")  # waiting (its suspension committed)
                await asyncio.sleep(gap)
                before = time.time()
                await client.publish(CHANNEL, i)
                sent = time.time()
                words = await worker.expect("R")
                assert int(words[1]) == i, words
                if i >= warmup:
                    wakeups.append(float(words[2]) - before)
                    sends.append(sent - before)
    finally:
        await worker.stop()
    return event_matching.Sample(subscribers, wakeups, sends)


def maintenance(app: geste.App) -> ChannelMaintenance:
    """The channel chores as a worker runs them (default retentions), on ``app``'s storage."""
    return ChannelMaintenance(
        app.storage, clock=time.time, message_retention=WEEK, event_retention=WEEK, on_woken=lambda: None
    )


async def timed(call: Callable[[], Awaitable[object]], rounds: int) -> float:
    """Median milliseconds of ``rounds`` awaits of ``call()``, one after the other."""
    took = []
    for _ in range(rounds):
        began = time.perf_counter()
        await call()
        took.append(time.perf_counter() - began)
    return statistics.median(took) * 1000


async def part_channels(sizes: Sizes, runs: int, raw: dict[str, Any], folder: Path) -> list[Row]:
    counts = [0, sizes.subscribers]
    wakeups: dict[int, list[event_matching.Sample]] = {n: [] for n in counts}
    rewakes: dict[int, list[float]] = {n: [] for n in counts}
    for run in range(runs):
        for n in alternate(counts, run):

            async def one(n: int = n) -> tuple[event_matching.Sample, float]:
                async with fresh_database("postgres", folder) as url:
                    sample = await channel_wakeup(url, n, samples=sizes.samples, warmup=sizes.warmup)
                    async with geste.App(url, run_worker=False) as app:
                        return sample, await timed(maintenance(app).rewake, sizes.chore_rounds)

            sample, rewake = await attempt(f"channels, {n}", one, raw)
            wakeups[n].append(sample)
            rewakes[n].append(rewake)
            say(
                f"channels, run {run + 1}/{runs}, {count(n)} subscribers: p50 {sample.p50 * 1000:.2f} ms,"
                f" rewake round {rewake:.2f} ms"
            )
    raw["channels"] = {
        str(n): [
            {"wakeups": s.wakeups, "sends": s.sends, "rewake_ms": r}
            for s, r in zip(wakeups[n], rewakes[n], strict=True)
        ]
        for n in counts
    }
    none, many = counts
    base, loaded = f"{count(none)} other subscribers", f"{count(many)} other subscribers"
    part = "channel subscribers"
    p50s = {n: [s.p50 * 1000 for s in wakeups[n]] for n in counts}
    return [
        Row(part, "publish → competing receiver wake-up p50 (ms)", base, loaded, p50s[none], p50s[many], 1.2),
        Row(part, "channel_rewake round (ms)", base, loaded, rewakes[none], rewakes[many], 1.2),
    ]


# -- part: chores ----------------------------------------------------------------------------------------
SEED_OUTBOX_POSTGRES = """
INSERT INTO geste_outbox (event_id, instance_id, step_seq, event_type, source, data, status, attempts,
                          created_at, updated_at, delivered_at)
SELECT 'ob-' || g, 'done-' || g, 2, 'bench.sent', 'geste', '{}', 'delivered', 1, $1 - 3600, $1 - 3600,
       $1 - 3600
FROM generate_series(1, $2::integer) AS g
"""
SEED_OUTBOX_SQLITE = """
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows)
INSERT INTO geste_outbox (event_id, instance_id, step_seq, event_type, source, data, status, attempts,
                          created_at, updated_at, delivered_at)
SELECT 'ob-' || n, 'done-' || n, 2, 'bench.sent', 'geste', '{}', 'delivered', 1, :now - 3600, :now - 3600,
       :now - 3600
FROM g
"""


async def seed_chores(url: str, *, rows: int, finished: int, held: int) -> None:
    """``loaded_claims.seed`` (``finished`` completed instances, ``held`` held leases), then ``rows`` rows
    in each table a chore reads, as ``tests/test_chore_costs.py`` seeds them (waiting competing
    subscribers of a channel, its messages, all taken, events with their deliveries and keys, an hour
    old: nothing due), and ``rows`` delivered outbox events; vacuumed and analysed."""
    await loaded_claims.seed(url, finished=finished, held=held)
    now = time.time()
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(sqlite_path(url), timeout=60)
        try:
            with conn:
                for statement in [*CHORE_SEED_SQLITE, SEED_OUTBOX_SQLITE]:
                    conn.execute(statement, {"rows": rows, "now": now})
            conn.execute("ANALYZE")
        finally:
            conn.close()
        return
    conn = await pg_connect(url)
    try:
        for statement in CHORE_SEED_POSTGRES:
            await conn.execute(statement, now, rows)
        await conn.execute(SEED_OUTBOX_POSTGRES, now, rows)
        await conn.execute(f"VACUUM ANALYZE {', '.join(SEEDED)}")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


SEEDED = (
    "geste_instances",
    "geste_channel_subscriptions",
    "geste_channel_messages",
    "geste_events",
    "geste_event_deliveries",
    "geste_event_keys",
    "geste_outbox",
)
CHORES = ("chore_take", "channel_rewake", "channel_cleanup batch", "relay poll")


async def chore_rounds(url: str, rounds: int) -> dict[str, float]:
    """Median milliseconds of ``rounds`` rounds of each chore on the database at ``url`` (nothing due)."""
    async with geste.App(url, run_worker=False) as app:
        storage = app.storage
        chores = maintenance(app)
        position = chores.position

        async def take() -> None:
            await storage.chore_take(REWAKE, "scale", time.time(), interval=5.0, grace=5.0)

        async def cleanup_batch() -> None:  # one call, going on where the last stopped, as a round does
            nonlocal position
            now = time.time()
            done = await storage.channel_cleanup(
                messages_before=now - WEEK, events_before=now - WEEK, limit=1000, position=position
            )
            position = done.position

        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "chore_take": take,
            "channel_rewake": chores.rewake,
            "channel_cleanup batch": cleanup_batch,
            "relay poll": storage.outbox_next_attempt_at,
        }
        return {name: await timed(calls[name], rounds) for name in CHORES}


async def part_chores(sizes: Sizes, runs: int, raw: dict[str, Any], folder: Path, backend: str) -> list[Row]:
    found: dict[str, dict[str, list[float]]] = {name: {"base": [], "loaded": []} for name in CHORES}
    urls: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        for which, n in (("base", 10), ("loaded", 1)):
            seed = partial(
                seed_chores, rows=sizes.chore_rows // n, finished=sizes.finished // n, held=sizes.held // n
            )
            what = f"chores ({backend}), {which}"
            urls[which] = await stack.enter_async_context(seeded_database(backend, folder, seed, what, raw))
        for run in range(runs):
            for which in alternate(["base", "loaded"], run):
                medians = await attempt(
                    f"chores ({backend}), {which}",
                    partial(chore_rounds, urls[which], sizes.chore_rounds),
                    raw,
                )
                for name, ms in medians.items():
                    found[name][which].append(ms)
                shown = ", ".join(f"{name} {ms:.2f}" for name, ms in medians.items())
                say(f"chores ({backend}), run {run + 1}/{runs}, {which}: {shown} ms")
    raw[f"chores_{backend}"] = found
    base = f"{count(sizes.chore_rows // 10)} rows per table"
    loaded = f"{count(sizes.chore_rows)} rows per table"
    part = f"chores ({backend})"
    return [
        Row(
            part,
            f"{name} (ms)",
            base,
            loaded,
            found[name]["base"],
            found[name]["loaded"],
            1.2,
            two_sided=True,
        )
        for name in CHORES
    ]


# -- the run ---------------------------------------------------------------------------------------------
PARTS = ("chores", "loaded", "channels", "waiters", "workers")
"""Run in this order: the worker part last, as it counts the statements of this process too (``herd``)."""
SHOWN = ("workers", "waiters", "loaded", "channels", "chores")
"""Shown in this order: issue 15's."""


def in_order(found: dict[str, list[Row]]) -> list[Row]:
    return [row for part in SHOWN for row in found.get(part, [])]


def write_json(path: Path, document: dict[str, Any], rows: list[Row]) -> None:
    document["rows"] = [r.summary() for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


async def bench(args: argparse.Namespace, info: dict[str, Any]) -> list[Row]:
    sizes = QUICK if args.quick else Sizes()
    parts = [p for p in PARTS if p in args.parts.split(",")]
    backends = args.backends.split(",")
    found: dict[str, list[Row]] = {}
    raw: dict[str, Any] = {}
    document: dict[str, Any] = {
        "generated": None,
        "quick": args.quick,
        "runs": args.runs,
        "parts": parts,
        "backends": backends,
        "sizes": asdict(sizes),
        "machine": info,
        "raw": raw,
    }
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for part in parts:
            took = time.monotonic()
            rows = found.setdefault(part, [])
            if part == "workers":
                rows += await part_workers(sizes, args.runs, raw)
            elif part == "waiters":
                rows += await part_waiters(sizes, args.runs, raw, folder)
            elif part == "channels":
                rows += await part_channels(sizes, args.runs, raw, folder)
            else:
                for backend in backends:
                    if part == "loaded":
                        rows += await part_loaded(sizes, args.runs, raw, folder, backend)
                    else:
                        rows += await part_chores(sizes, args.runs, raw, folder, backend)
            say(f"{part}: {time.monotonic() - took:.0f} s")
            if args.json:
                info["load_average_after"] = os.getloadavg()[0]
                info["total_seconds"] = round(time.monotonic() - began)
                document["generated"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
                document["parts_done"] = parts[: parts.index(part) + 1]
                write_json(Path(args.json), document, in_order(found))
    say(f"total {time.monotonic() - began:.0f} s")
    return in_order(found)


def again(path: Path) -> None:
    """Print the table of an earlier run from its JSON (the runs' figures, judged by this version)."""
    document = json.loads(path.read_text())
    names = {f.name for f in fields(Row)}
    rows = [Row(**{k: v for k, v in row.items() if k in names}) for row in document["rows"]]
    info = document["machine"]
    print(f"{document['generated']}: geste at {info['geste_commit']}; {info['cpus']} cores")
    print(markdown(rows, document["runs"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and 1 run (unless --runs)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 5; 1 with --quick)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--backends", default="postgres,sqlite", help="for the loaded and chores parts")
    parser.add_argument("--json", help="write the machine, the sizes, every run's figures and the table here")
    parser.add_argument(
        "--from-json", help="measure nothing: print the table of an earlier run's --json file"
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.from_json:
        again(Path(args.from_json))
        return
    if args.runs is None:
        args.runs = 1 if args.quick else 5
    info = compare.machine()
    info.pop("peers_venv", None)
    rows = asyncio.run(bench(args, info))
    print(f"\ngeste from {os.path.dirname(geste.__file__)} at {info['geste_commit']}; {os.cpu_count()} cores")
    print(markdown(rows, args.runs))


if __name__ == "__main__":
    main()
