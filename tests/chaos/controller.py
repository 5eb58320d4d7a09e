"""The chaos controller: a load of workflows on worker processes, and faults injected while it runs.

It starts the receivers (ledgers, news listeners, competitors), waits until they have subscribed, then
starts the orders and feeds them: a ``chaos.paid`` event per order (some sent twice, the same id),
news from outside (some published twice, the same id), jobs and the competitors' stops. Meanwhile it
SIGKILLs random workers and restarts them (under the same id or a new one), terminates the pool's and
the listener's backends of random workers with ``pg_terminate_backend``, pauses a worker (SIGSTOP) until
its leases were taken over, partitions a worker from PostgreSQL (its own TCP proxy, ``tests/proxy.py``,
stalls or cuts its connections) until the same, and restarts PostgreSQL once.
Its own client calls are retried on ``StorageError`` with the same ids, as a user's would be. With
``skew`` each worker process runs on a clock off by a random offset (``--skew``); with ``outage`` the
outbox destination refuses every delivery for a while, once (the file ``outage`` in the run's folder).
With ``failover`` among the faults (and a ``ReplicatedPair`` to run on), it kills the primary once,
halfway through, and promotes the standby.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

import geste

from ..conftest import die_with_parent
from ..pgbouncer import PgBouncer
from ..proxy import TcpProxy
from ..support import raw_query, restart_postgres, wait_until
from .app import LEDGERS, NEWS_EVERY, build_app

if TYPE_CHECKING:
    from .replica import ReplicatedPair

ROOT = Path(__file__).resolve().parents[2]
ADMIN_RETRIED = (
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)
"""Driver errors of the controller's own queries (``raw_query``) while no server takes writes: a failover's
dead primary and not yet promoted standby (``TargetServerAttributeNotMatched``), retried like a
``StorageError``."""
T = TypeVar("T")
OUTAGE_RAMP = 0.05 + 0.1 + 0.2 + 0.4
"""The chaos workers' outbox back-off until it reaches its cap (0.05 s doubling to 0.5 s, app.py): an
outage must last longer, so that deliveries are retried at the capped interval for a while."""
WORKER_LOCK_TIMEOUT = 1.0
"""The workers' ``lock_timeout`` (``app._serve``): a pause or a partition lasts longer."""
HELD_LIMIT = 8 * WORKER_LOCK_TIMEOUT
"""How long a pause or a partition waits for the worker's leases to be taken over before it ends anyway."""
LEASE_LOST = "lease lost"
"""What a worker logs when it finds an instance's lease taken over (the renewal's or the run's line)."""
RUN_DROPPED = (LEASE_LOST, "storage failed (")
"""What a worker logs when one of its runs stops without recording anything more: the lease found taken
over, or (after a partition left its connection dead) the write that failed, the run abandoned; either
way its results are dropped. A paused worker reports its lost runs with one of them."""


def dropped_lines(output: Path) -> int:
    """The lines of a worker's output that say a run of it was dropped (``RUN_DROPPED``)."""
    lines = output.read_text(errors="replace").splitlines()
    return sum(any(said in line for said in RUN_DROPPED) for line in lines)


FAULT_LOG = "faults.jsonl"
"""The pauses and partitions, one JSON line each, for the checker."""


@dataclass(frozen=True)
class ChaosConfig:
    """The size of a run and how hard the faults hit."""

    orders: int = 200
    workers: int = 3
    listeners: int = 3
    competitors: int = 3
    jobs: int = 40
    client_news: int = 10
    duration: float = 20.0
    """Seconds over which the orders are started (the faults go on until everything finished)."""
    fault_interval: float = 0.7
    """Seconds between two faults (randomised ±50%)."""
    restart_postgres: bool = True
    faults: tuple[str, ...] = ("kill", "terminate")
    """The recurring faults drawn from, each equally likely (those that apply to the backend:
    ``Controller.FAULTS``); the server restart is apart (``restart_postgres``)."""
    timeout: float = 240.0
    seed: int | None = None
    skew: float = 0.0
    """Clock skew: each worker process runs on a clock off the machine's by a random offset in
    ``±skew`` seconds, fixed for its life (a restarted worker draws another). 0: no skew."""
    lock_timeout: float = 1.0
    """The workers' ``lock_timeout``."""
    outage: float = 0.0
    """A destination outage: once per run, the outbox destination refuses every delivery for this many
    seconds (longer than the relay's whole back-off ramp, ``OUTAGE_RAMP``). 0: no outage."""

    @classmethod
    def short(cls, **overrides: Any) -> ChaosConfig:
        return cls(**overrides)

    @classmethod
    def long(cls, **overrides: Any) -> ChaosConfig:
        values: dict[str, Any] = {
            "orders": 600,
            "workers": 4,
            "listeners": 4,
            "competitors": 4,
            "jobs": 120,
            "client_news": 30,
            "fault_interval": 0.5,
            "duration": 60.0,
            "timeout": 600.0,
            "faults": (*cls.faults, "pause", "partition"),
        }
        return cls(**{**values, **overrides})

    @property
    def news(self) -> int:
        """Broadcast messages every listener must receive: from orders and from outside."""
        return len(range(0, self.orders, NEWS_EVERY)) + self.client_news


@dataclass
class Journal:
    """What the controller did, for the report."""

    started: float = field(default_factory=time.monotonic)
    counts: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)
    remarks: list[str] = field(default_factory=list)
    """Lines worth a place in the report (a failover's timings)."""

    def note(self, what: str, detail: str = "") -> None:
        self.counts[what] += 1
        self.lines.append(f"{time.monotonic() - self.started:7.2f}s  {what}{': ' + detail if detail else ''}")


class Controller:
    """One chaos run on one database: worker processes, the load, the faults."""

    def __init__(
        self,
        url: str,
        folder: Path,
        config: ChaosConfig,
        *,
        pooler: PgBouncer | None = None,
        replicas: ReplicatedPair | None = None,
    ) -> None:
        self.url = url
        self.pooler = pooler
        """A PgBouncer in transaction mode in front of the database: the workers' and the client's pools
        go through it (``pooler=transaction``), their listeners straight to the server."""
        self.replicas = replicas
        """The primary and standby ``url`` names (a multi-host URL), for the ``failover`` fault."""
        self.folder = folder
        self.config = config
        self.postgres = url.startswith("postgres")
        self.tag = f"chaos{uuid.uuid4().hex[:6]}"
        self.seed = config.seed if config.seed is not None else random.randrange(1_000_000)
        self.rng = random.Random(self.seed)
        self.listener_reconnects = 0
        self.journal = Journal()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.outputs: list[Path] = []
        self._next_worker = 0
        self._done = asyncio.Event()
        self.client: geste.App | None = None
        self.skews: list[float] = []
        """The clock offset of each worker process started, in order."""
        self.proxies: dict[str, TcpProxy] = {}
        """Each worker's own TCP proxy to PostgreSQL, when partitions are among the faults."""
        self.output_of: dict[str, Path] = {}
        self.spawned_at: dict[str, float] = {}
        """When each worker id's current process was started (``time.time()``)."""
        self.skew_of: dict[str, float] = {}
        """How far each worker id's current process's clock is off: it writes lease times by it."""
        self._settling: list[asyncio.Task[None]] = []

    # -- worker processes ----------------------------------------------------------------------------
    def _worker_url(self, worker_id: str, *, direct: bool = False) -> str:
        if not self.postgres:
            return self.url
        base = self.url if direct or self.pooler is None else self.pooler.through(self.url)
        proxy = self.proxies.get(worker_id)
        url = base if proxy is None else proxy.url(base)
        sep = "&" if "?" in url else "?"
        return f"{url}{sep}application_name={self.tag}-{worker_id}"

    def _listen_url(self, worker_id: str) -> str | None:
        """Through a pooler, the listener's direct URL (named like the pool, for ``terminate_backends``)."""
        return self._worker_url(worker_id, direct=True) if self.pooler is not None else None

    async def spawn(self, worker_id: str | None = None) -> str:
        if worker_id is None:
            self._next_worker += 1
            worker_id = f"w{self._next_worker}"
        ready = self.folder / f"ready-{worker_id}"
        ready.unlink(missing_ok=True)
        output = self.folder / f"worker-{worker_id}-{len(self.outputs)}.out"
        self.outputs.append(output)
        self.output_of[worker_id] = output
        self.spawned_at[worker_id] = time.time()
        if self.postgres and "partition" in self.config.faults and worker_id not in self.proxies:
            self.proxies[worker_id] = await TcpProxy.to_url(self.url)
        cmd = [sys.executable, "-m", "tests.chaos.app", self._worker_url(worker_id)]
        cmd += [f"--worker-id={worker_id}", f"--dir={self.folder}"]
        cmd += [f"--lock-timeout={self.config.lock_timeout}"]
        if self.config.skew:
            self.skews.append(self.rng.uniform(-self.config.skew, self.config.skew))
            cmd += [f"--skew={self.skews[-1]}"]
        self.skew_of[worker_id] = self.skews[-1] if self.config.skew else 0.0
        if self._listen_url(worker_id):
            cmd.append(f"--listen-url={self._listen_url(worker_id)}")
        with output.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )
        self.procs[worker_id] = proc

        def started() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"worker {worker_id} exited with {proc.returncode}:\n{output.read_text()}"
                )
            return ready.exists()

        await wait_until(started, f"worker {worker_id} to be ready", timeout=60)
        return worker_id

    def stop_all(self, *, kill: bool = False) -> list[int]:
        """Stop every worker (SIGTERM: drain; or SIGKILL) and return their exit codes."""
        codes = []
        for worker_id, proc in self.procs.items():
            if proc.poll() is None:
                self._log_end(worker_id)
                if kill:
                    proc.kill()
                else:
                    proc.terminate()
        for proc in self.procs.values():
            try:
                codes.append(proc.wait(timeout=30))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        return codes

    # -- faults ----------------------------------------------------------------------------------------
    async def kill_and_restart(self) -> None:
        live = [w for w, p in self.procs.items() if p.poll() is None]
        victim = self.rng.choice(live)
        self._log_end(victim)
        self.procs[victim].kill()
        self.procs[victim].wait()
        same = self.rng.random() < 0.5
        del self.procs[victim]
        new = await self.spawn(victim if same else None)
        self.journal.note("worker SIGKILLed and restarted", f"{victim} -> {new}")

    async def terminate_backends(self) -> None:
        victim = self.rng.choice(sorted(self.procs))
        which = self.rng.choice(["pool", "listener", "both"])
        name = f"{self.tag}-{victim}"
        names = {"pool": [name], "listener": [f"{name}-listener"], "both": [name, f"{name}-listener"]}[which]
        rows = await self._admin(
            "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity "
            "WHERE application_name = ANY($1::text[])",
            names,
        )
        self.journal.note(f"backends terminated ({which})", f"{victim}: {len(rows)} connection(s)")

    async def restart_server(self) -> None:
        began = time.monotonic()
        await restart_postgres(self.url)
        self.journal.note("PostgreSQL restarted", f"{time.monotonic() - began:.1f}s")

    async def outage(self, after: float) -> None:
        """Take the outbox destination down for ``config.outage`` seconds, ``after`` seconds from now."""
        assert self.config.outage > OUTAGE_RAMP, "an outage shorter than the back-off ramp proves little"
        flag = self.folder / "outage"
        await asyncio.sleep(after)
        flag.write_text("down")
        began = time.monotonic()
        try:
            await asyncio.sleep(self.config.outage)
        finally:
            flag.unlink()
        self.journal.note("outbox destination down", f"{time.monotonic() - began:.1f}s")

    def lost_leases(self) -> int:
        """Leases that live workers lost to another worker, as their logs tell ("lease lost")."""
        return sum(path.read_text(errors="replace").count("lease lost") for path in self.outputs)

    async def crash_pgbouncer(self) -> None:
        """PgBouncer SIGKILLed and started again on its port: every pool connection of every worker
        breaks at once (the listeners, direct, stay)."""
        assert self.pooler is not None, "the pgbouncer fault needs a PgBouncer (run_chaos(pooler=...))"
        began = time.monotonic()
        await asyncio.to_thread(self.pooler.crash_and_restart)
        self.journal.note("PgBouncer crashed and restarted", f"{time.monotonic() - began:.2f}s")

    async def fail_over(self) -> None:
        """SIGKILL the primary (postmaster and backends: a lost machine), leave no server for 0 to 3 s
        (an operator's or a tool's reaction: the leases of 1 s held at the kill expire in most runs),
        then promote the standby. The workers and the client reconnect through the URL's other host."""
        if self.replicas is None:
            raise ValueError("the failover fault needs a replicated pair (run_chaos(..., replicas=pair))")
        outage = self.rng.uniform(0.0, 3.0)
        leased = await self._admin("SELECT count(*) AS n FROM geste_instances WHERE locked_by IS NOT NULL")
        began = time.monotonic()
        killed = await asyncio.to_thread(self.replicas.kill_primary)
        self.journal.note("primary SIGKILLed", f"{killed} processes")
        await asyncio.sleep(max(0.0, began + outage - time.monotonic()))
        await asyncio.to_thread(self.replicas.promote)
        promoted = time.monotonic() - began
        self.journal.note("standby promoted", f"{promoted:.2f}s after the kill")
        self.journal.remarks.append(
            f"failover: the standby promoted {promoted:.2f}s after the primary's kill; "
            f"{leased[0]['n']} instances leased just before the kill"
        )

    async def _admin(self, query: str, *args: Any) -> list[dict[str, Any]]:
        return await self.retried(lambda: raw_query(self.url, query, *args))

    async def _leases_of(self, worker_id: str) -> dict[str, str]:
        """The live leases ``worker_id``'s current process holds: lease id by instance id. Not those that
        ran out (a worker recovering from a partition or a restart of the server), nor those a killed
        process of the same worker id left (taken since its current process started: its runs). The
        worker writes those times by its own clock, so they are read through its skew."""
        skew = self.skew_of.get(worker_id, 0.0)
        rows = await self._admin(
            "SELECT instance_id, lease_id FROM geste_instances WHERE locked_by = $1 AND lease_id IS NOT NULL"
            " AND lock_expires_at > $2 AND updated_at >= $3",
            worker_id,
            time.time() + skew,
            self.spawned_at.get(worker_id, 0.0) + skew,
        )
        return {r["instance_id"]: r["lease_id"] for r in rows}

    async def _taken_by_others(self, worker_id: str, leases: dict[str, str]) -> int:
        """How many of the instances of ``leases`` another worker holds or last ran (taken over), rather
        than ``worker_id`` itself (ended by its own statements, received before it stopped)."""
        rows = await self._admin(
            "SELECT count(*) AS n FROM geste_instances WHERE instance_id = ANY($1::text[]) "
            "AND coalesce(locked_by, last_worker) IS DISTINCT FROM $2",
            list(leases),
            worker_id,
        )
        return int(rows[0]["n"])

    async def _busiest(self, workers: list[str]) -> tuple[str, dict[str, str]]:
        """The worker that holds the most leases, and its leases: a pause or a partition then catches
        runs in flight. Runs are short (a few milliseconds between a claim and a suspension), so this
        looks again for up to two seconds while no worker holds any; then any worker."""
        deadline = time.monotonic() + 2.0
        while True:
            held = {w: await self._leases_of(w) for w in workers}
            most = max(len(leases) for leases in held.values())
            if most or time.monotonic() > deadline or self._done.is_set():
                break
            await asyncio.sleep(0.02)
        victim = self.rng.choice(sorted(w for w, leases in held.items() if len(leases) == most))
        return victim, held[victim]

    async def _until_taken_over(self, leases: dict[str, str], what: str) -> int:
        """Wait until none of ``leases`` is held any more (taken over by another worker, which may have
        ended the instance since), or ``HELD_LIMIT`` seconds; with none, for a little more than a lease.
        Returns how many are still held then: the rows of a claim whose answer the stopped worker was
        reading when it stopped stay locked by its session (the server waits to send the rest of the
        answer, its transaction open, and nothing ends that but the worker reading again or its
        connection closing), so those instances wait for it."""
        if not leases:
            await asyncio.sleep(WORKER_LOCK_TIMEOUT * 1.5)
            return 0

        async def held() -> int:
            rows = await self._admin(
                "SELECT count(*) AS n FROM geste_instances WHERE lease_id = ANY($1::text[])",
                list(leases.values()),
            )
            return int(rows[0]["n"])

        deadline = time.monotonic() + HELD_LIMIT
        while (left := await held()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if left:
            self.journal.note(f"leases of {what} still held after {HELD_LIMIT:g}s", str(left))
        return left

    async def _diagnosed(self, proc: subprocess.Popen[bytes], wait: Awaitable[T]) -> T:
        """``wait``; if it fails, the worker ``proc`` dumps its tasks' and threads' stacks to its output
        first (tests/chaos/app.py: SIGUSR1, SIGUSR2)."""
        try:
            return await wait
        except AssertionError:
            if proc.poll() is None:
                proc.send_signal(signal.SIGUSR1)
                proc.send_signal(signal.SIGUSR2)
                await asyncio.sleep(1)
            raise

    def _lost_lines(self, output: Path) -> int:
        return dropped_lines(output)

    def _log_end(self, worker_id: str) -> None:
        """When a worker process is told to end (killed, or stopped at the run's end): the checker excuses
        a pause its worker had no time to report before it."""
        output = self.output_of.get(worker_id)
        if output is not None:
            self._log_fault(fault="end", output=output.name, at=time.time())

    def _log_fault(self, **fields: Any) -> None:
        with (self.folder / FAULT_LOG).open("a") as log:
            log.write(json.dumps(fields) + "\n")

    async def pause_worker(self) -> None:
        """SIGSTOP the worker holding the most leases until none of them is its own any more (past its
        lock_timeout: taken over by others, or ended by its own statements the server had received),
        then SIGCONT it. For each instance another worker took over it must find out and say so ("lease
        lost"): its writes are refused, its results dropped (the checker proves from the database that
        nothing was recorded twice, and counts the lines). The wait for a line ends when it has renewed
        its leases twice since it resumed."""
        victim, leases = await self._busiest([w for w, p in self.procs.items() if p.poll() is None])
        proc, output = self.procs[victim], self.output_of[victim]
        before = self._lost_lines(output)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGSTOP)
        try:
            held = await self._until_taken_over(leases, f"paused {victim}")
        finally:
            proc.send_signal(signal.SIGCONT)
        resumed, seconds = time.time(), time.monotonic() - stopped
        taken = await self._taken_by_others(victim, leases)
        skew = self.skew_of.get(victim, 0.0)

        async def found_out() -> bool:
            if proc.poll() is not None or self._lost_lines(output) > before:
                return True
            rows = await self._admin("SELECT heartbeat_at FROM geste_workers WHERE worker_id = $1", victim)
            # the worker writes its heartbeat by its own clock: one ahead would seem to have renewed twice
            # at its first renewal, before it could find out
            return bool(rows) and rows[0]["heartbeat_at"] - skew > resumed + WORKER_LOCK_TIMEOUT

        if taken:
            await self._diagnosed(proc, wait_until(found_out, f"resumed {victim} to renew", timeout=60))
        logged = self._lost_lines(output) > before
        if taken and not logged and proc.poll() is None:  # the checker fails the run: the stacks tell why
            proc.send_signal(signal.SIGUSR1)
            proc.send_signal(signal.SIGUSR2)
        self._log_fault(
            fault="pause",
            worker=victim,
            output=output.name,
            leases=len(leases),
            taken=taken,
            seconds=round(seconds, 2),
            logged=logged,
            instances=sorted(leases),
            resumed=resumed,
            held=held,
        )
        self.journal.note(
            "worker paused (SIGSTOP) past its lease",
            f"{victim}: {taken} of its {len(leases)} lease(s) taken over",
        )
        if logged:
            self.journal.counts["paused worker logged its lost leases"] += 1

    async def partition_worker(self) -> None:
        """Partition a worker from PostgreSQL (its proxy stalls: half-open connections; or cuts them)
        until the others took over every lease it held, then heal; in the background, wait until it
        heartbeats again through new connections (``settle``)."""
        live = [w for w, p in self.procs.items() if p.poll() is None and w in self.proxies]
        victim, leases = await self._busiest(live)
        proxy, proc = self.proxies[victim], self.procs[victim]
        how = self.rng.choice(["stall", "cut"])
        getattr(proxy, how)()
        try:
            held = await self._until_taken_over(leases, f"partitioned {victim}")
        finally:
            proxy.heal()
        healed = time.time()
        skew = self.skew_of.get(victim, 0.0)
        self._log_fault(fault="partition", how=how, worker=victim, leases=len(leases), held=held)
        self.journal.note(f"worker partitioned from PostgreSQL ({how})", f"{victim}: {len(leases)} lease(s)")

        async def resumed() -> None:
            async def beats() -> bool:
                if proc.poll() is not None or self.procs.get(victim) is not proc:
                    return True  # killed meanwhile: its successor is another process
                rows = await self._admin(
                    "SELECT heartbeat_at FROM geste_workers WHERE worker_id = $1", victim
                )
                return bool(rows) and rows[0]["heartbeat_at"] - skew > healed  # by the worker's clock

            await self._diagnosed(
                proc, wait_until(beats, f"{victim} to work again after a partition", timeout=90, interval=0.2)
            )
            self.journal.note("partitioned worker heartbeats again", victim)

        self._settling.append(asyncio.create_task(resumed()))

    async def settle(self) -> None:
        """Wait for what the faults left to verify: partitioned workers working again."""
        await asyncio.gather(*self._settling)

    FAULTS: dict[str, tuple[str, bool]] = {
        "kill": ("kill_and_restart", False),
        "terminate": ("terminate_backends", True),
        "pgbouncer": ("crash_pgbouncer", True),
        "failover": ("fail_over", True),
        # PostgreSQL only: on SQLite a worker stopped inside a write transaction holds the file's lock,
        # and nobody can take its leases over until it resumes (tests/test_fencing.py pauses a SQLite
        # worker mid-activity, outside any transaction)
        "pause": ("pause_worker", True),
        "partition": ("partition_worker", True),
    }
    """The recurring faults by name: the method that injects one, and whether it needs PostgreSQL."""
    ONCE: dict[str, float] = {"failover": 0.5}
    """Faults of ``FAULTS`` done once per run, when this fraction of the instances has finished, not drawn
    again and again: there is one standby to promote."""

    def recurring(self) -> list[Callable[[], Awaitable[None]]]:
        """The injectors of ``config.faults`` that apply to this backend."""
        unknown = set(self.config.faults) - set(self.FAULTS)
        if unknown:
            raise ValueError(f"unknown chaos faults {sorted(unknown)}; known: {sorted(self.FAULTS)}")
        return [
            getattr(self, method)
            for name, (method, needs_postgres) in self.FAULTS.items()
            if name in self.config.faults and (self.postgres or not needs_postgres) and name not in self.ONCE
        ]

    def once(self) -> list[tuple[float, Callable[[], Awaitable[None]]]]:
        """The faults of ``config.faults`` done once (``ONCE``) that apply to this backend, with when."""
        chosen = [
            (self.ONCE[name], getattr(self, method))
            for name, (method, needs_postgres) in self.FAULTS.items()
            if name in self.config.faults and name in self.ONCE and (self.postgres or not needs_postgres)
        ]
        if chosen and self.config.restart_postgres:
            raise ValueError("a failover and restart_postgres do not go together: set restart_postgres=False")
        if chosen and self.replicas is None:
            raise ValueError("the failover fault needs a replicated pair (run_chaos(..., replicas=pair))")
        return sorted(chosen, key=lambda pair: pair[0])

    async def faults(self, progress: Callable[[], Awaitable[float]]) -> None:
        """Inject faults until the load is done, each recurring one in turn (in a random order each
        round: a short run still has them all); restart PostgreSQL once, when a third has completed."""
        restarted = not (self.postgres and self.config.restart_postgres)
        injectors = self.recurring()
        once = self.once()
        deck: list[Callable[[], Awaitable[None]]] = []  # each fault once per round, in a random order
        while not self._done.is_set():
            pause = self.config.fault_interval * self.rng.uniform(0.5, 1.5)
            try:
                await asyncio.wait_for(self._done.wait(), pause)
                return
            except TimeoutError:
                pass
            if not restarted and await progress() >= 0.33:
                restarted = True
                await self.restart_server()
            elif once and await progress() >= once[0][0]:
                await once.pop(0)[1]()
            elif injectors:
                if not deck:
                    deck = self.rng.sample(injectors, len(injectors))
                await deck.pop()()

    # -- the client's calls ------------------------------------------------------------------------------
    async def retried(self, call: Callable[[], Awaitable[T]]) -> T:
        """A client call retried on ``StorageError`` (the server restarting), as a user would."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return await call()
            except (geste.errors.StorageError, OSError, *ADMIN_RETRIED) as exc:
                if time.monotonic() > deadline:
                    raise
                self.journal.note("client call retried", type(exc).__name__)
                await asyncio.sleep(0.2)

    async def load(self, client: geste.App) -> None:
        config = self.config
        receivers = []
        for k in range(LEDGERS):
            expected = len(range(k, config.orders, LEDGERS))
            receivers.append(("ledger", f"ledger-{k}", (k, expected)))
        receivers += [("listener", f"listener-{k}", (k, config.news)) for k in range(config.listeners)]
        receivers += [("competitor", f"competitor-{k}", (k,)) for k in range(config.competitors)]
        for name, instance_id, args in receivers:
            await self.retried(
                lambda n=name, i=instance_id, a=args: client.start_workflow(n, *a, instance_id=i)
            )

        async def subscribed() -> bool:
            rows = await self._admin("SELECT count(*) AS n FROM geste_channel_subscriptions")
            return bool(rows[0]["n"] == len(receivers))

        await wait_until(subscribed, "every receiver to subscribe", timeout=60, interval=0.05)
        self.journal.note("receivers subscribed", str(len(receivers)))

        numbers = list(range(config.orders))
        self.rng.shuffle(numbers)
        news = [f"client-news-{i}" for i in range(config.client_news)]
        jobs = list(range(config.jobs))
        began = time.monotonic()
        orders = []
        for index, n in enumerate(numbers):
            # paced over the duration, so that faults hit every phase of the orders' lives
            await asyncio.sleep(max(0.0, began + config.duration * index / config.orders - time.monotonic()))
            await self.retried(lambda n=n: client.start_workflow("order", n, instance_id=f"order-{n}"))
            orders.append(asyncio.create_task(self.pay(client, n, after=self.rng.uniform(0, 2))))
            if news and self.rng.random() < 2 * config.client_news / config.orders:
                await self.publish_news(client, news.pop())
            if jobs and self.rng.random() < 2 * config.jobs / config.orders:
                await self.publish_job(client, jobs.pop())
        await asyncio.gather(*orders)
        for message_id in news:
            await self.publish_news(client, message_id)
        for job in jobs:
            await self.publish_job(client, job)
        for k in range(config.competitors):
            await self.retried(lambda k=k: client.publish("chaos.jobs", "stop", message_id=f"stop-{k}"))
        self.journal.note(
            "load sent", f"{config.orders} orders, {config.jobs} jobs, {len(receivers)} receivers"
        )

    async def pay(self, client: geste.App, n: int, *, after: float) -> None:
        """The order's ``chaos.paid`` event, ``after`` seconds (before or after the order waits for it);
        one in five is sent twice (a duplicate delivery)."""
        await asyncio.sleep(after)
        times = 2 if self.rng.random() < 0.2 else 1
        for _ in range(times):
            await self.retried(
                lambda: client.send_event("chaos.paid", {"order": n, "amount": n * 2}, event_id=f"paid-{n}")
            )
        if times == 2:
            self.journal.counts["duplicate events sent"] += 1

    async def publish_news(self, client: geste.App, message_id: str) -> None:
        times = 2 if self.rng.random() < 0.3 else 1
        for _ in range(times):
            await self.retried(
                lambda: client.publish("chaos.news", {"from": message_id}, message_id=message_id)
            )
        if times == 2:
            self.journal.counts["duplicate messages published"] += 1

    async def publish_job(self, client: geste.App, job: int) -> None:
        await self.retried(lambda: client.publish("chaos.jobs", {"job": job}, message_id=f"job-{job}"))

    # -- the run ---------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Start the workers, send the load with faults, wait until everything finished and drained."""
        config = self.config
        client_url = self._worker_url("client")
        self.client = client = build_app(
            client_url, folder=self.folder, run_worker=False, listen_database_url=self._listen_url("client")
        )
        await client.open()
        try:
            for _ in range(config.workers):
                await self.spawn()
            total = config.orders + LEDGERS + config.listeners + config.competitors

            async def finished() -> int:
                rows = await self._admin(
                    "SELECT count(*) AS n FROM geste_instances "
                    "WHERE status IN ('completed', 'failed', 'cancelled')"
                )
                return int(rows[0]["n"])

            async def progress() -> float:
                return await finished() / total

            fault_task = asyncio.create_task(self.faults(progress))
            outage = asyncio.create_task(self.outage(0.3 * config.duration)) if config.outage else None
            try:
                await self.load(client)
                if outage is not None:
                    await outage

                async def all_done() -> bool:
                    if fault_task.done():
                        fault_task.result()  # a failing fault injector fails the run
                    return await finished() == total

                await wait_until(all_done, "every instance to finish", timeout=config.timeout, interval=0.1)

                async def outbox_drained() -> bool:
                    rows = await self._admin(
                        "SELECT count(*) AS n FROM geste_outbox WHERE status <> 'delivered'"
                    )
                    return rows[0]["n"] == 0

                await wait_until(outbox_drained, "the outbox to drain", timeout=60, interval=0.1)
            finally:
                self._done.set()
                if outage is not None:
                    outage.cancel()  # done already, unless the load failed
                await fault_task
                await self.settle()
            codes = self.stop_all()
            self.journal.note("workers stopped (SIGTERM)", f"exit codes {sorted(set(codes))}")
            assert set(codes) == {0}, f"workers did not drain and exit cleanly: exit codes {codes}"
            if self.postgres:
                rows = await self._admin("SELECT listener FROM geste_workers WHERE listener IS NOT NULL")
                self.listener_reconnects = sum(json.loads(r["listener"])["reconnects"] for r in rows)
        finally:
            self.stop_all(kill=True)
            await client.close()
            for task in self._settling:
                task.cancel()
            for proxy in self.proxies.values():
                await proxy.close()
