"""The worker: claims runnable instances, runs them under renewed leases, drains on shutdown.

It sleeps until the earliest of: a poke (work started here, an event sent, a slot freed, a notification
from another process), a local timer, the next instance the database says becomes runnable, or the poll
interval that ``Wakeups`` gives (the safety net that finds work of other processes and expired leases).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from .._metrics import BACKLOG, POLL, START, TIMER, Metrics
from ..errors import StorageError
from ..storage.base import Claim, HistoryRow, Lease, Storage, WorkerRow
from .loops import Loop, failed
from .wakeups import Wakeups

logger = logging.getLogger("geste.worker")

ENGINE_ERROR_BACKOFF_CAP = 300.0
"""The longest an instance that keeps failing in the engine (a bug, not the workflow's own error) waits
before it is offered again: it neither spins nor floods the log."""
MAX_TRACKED_FAILURES = 10_000

WORKER_RETENTION = 7 * 24 * 3600.0
"""Registered workers not heard from for this long are forgotten when a worker starts."""


class Runner(Protocol):
    """What the worker runs claims with (the engine): the runtime never imports the engine."""

    @property
    def workflows(self) -> Mapping[str, object]:
        """The workflows it can run, by name: the worker claims instances of these only."""
        ...

    async def run(self, claim: Claim, history: Sequence[HistoryRow] | None = None) -> None:
        """Run one claimed instance until it suspends, finishes, or cannot go on."""
        ...


class Worker(Loop):
    """Claims runnable instances and runs them (its claim loop is this ``Loop``; the heartbeat and the
    lease renewals are a second one, ``Heartbeat``)."""

    log = logger

    def __init__(
        self,
        *,
        runner: Runner,
        storage: Storage,
        worker_id: str,
        clock: Callable[[], float],
        concurrency: int,
        wakeups: Wakeups,
        lock_timeout: float,
        shutdown_grace: float,
        max_workflows_per_batch: int = 100,
        max_timers_per_batch: int = 100,
        max_messages_per_batch: int = 100,
        listener_status: Callable[[], dict[str, Any]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(name=f"geste-claim-{worker_id}", what=f"worker {worker_id}: the claim loop")
        self.on_death = self.mark_unhealthy
        self.doing = f"worker {worker_id}: claiming"
        self.retry_base = wakeups.poll_interval
        self.runner = runner
        self.metrics = metrics or Metrics()
        self.storage = storage
        self.worker_id = worker_id
        self.clock = clock
        self.concurrency = concurrency
        self.wakeups = wakeups
        self.max_workflows_per_batch = max_workflows_per_batch
        self.max_timers_per_batch = max_timers_per_batch
        self.max_messages_per_batch = max_messages_per_batch
        self.lock_timeout = lock_timeout
        self.shutdown_grace = shutdown_grace
        self.listener_status = listener_status
        """What the registry shows of this process's listener (the App's ``listener_status().as_dict()``)."""
        self._started_at = 0.0
        self._running: dict[str, tuple[Lease, asyncio.Task[None]]] = {}
        self._reserved = 0
        self._backlog = False
        """The last claim round was cut short by this worker's free slots: a slot that frees up is a
        reason to claim again. Without a backlog, a finishing run claims nothing (no empty round trip)."""
        self._failures: dict[str, int] = {}
        """Unexpected engine errors in a row, per instance: each waits twice as long to be offered again."""
        self.claim_rounds = 0
        """Claim statements run, and instances they took (an empty round is a wasted round trip)."""
        self.claimed = 0
        self._sleep_cause = POLL
        """The wake-up cause of the next claim round if the sleep before it runs out (poll or timer)."""
        self._cause = POLL
        """The wake-up cause of the next claim round (the first looks for whatever is runnable)."""
        self._heartbeat = Heartbeat(self)
        self._reports: set[asyncio.Task[None]] = set()
        self.health: str | None = None
        """None while every loop of this process runs; else why one ended (shown in the registry)."""

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self) -> None:  # type: ignore[override]
        """Register this worker, then start the claim loop and the heartbeat."""
        self._started_at = self.clock()
        try:
            await self.storage.prune_workers(self._started_at - WORKER_RETENTION)
            await self.beat()
        except StorageError as exc:  # the heartbeat tries again: running instances matters more
            logger.warning("worker %s: registering failed (%s)", self.worker_id, exc)
        self._cause = POLL
        super().start()
        self._heartbeat.start()
        logger.info("worker %s started (concurrency %d)", self.worker_id, self.concurrency)

    def mark_unhealthy(self, reason: str) -> None:
        """A loop of this process ended for good: say so in the registry (``geste status``), at once and
        at every heartbeat, so that operators do not take a worker that no longer claims for a live one."""
        if self.stopping:
            return
        self.health = reason if self.health is None else f"{self.health}; {reason}"
        task = asyncio.get_running_loop().create_task(
            self._report_health(), name=f"geste-health-{self.worker_id}"
        )
        self._reports.add(task)  # held until done: the loop keeps only a weak reference to a task
        task.add_done_callback(self._reports.discard)

    async def _report_health(self) -> None:
        try:
            await self.beat()
        except Exception as exc:
            logger.error("worker %s could not record that it is unhealthy (%s)", self.worker_id, exc)

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming at a boundary (a claim round in flight ends, and what it took is handed back at
        once), let running instances finish for ``shutdown_grace`` (their leases still renewed), release
        the rest. A cancellation of the caller propagates; ``abort`` then ends what is left."""
        await super().stop(self.shutdown_grace if grace is None else grace)
        running = [task for _, task in self._running.values()]
        if running:
            logger.info("worker %s draining %d running instance(s)", self.worker_id, len(running))
            await asyncio.wait(running, timeout=self.shutdown_grace)
        await self._heartbeat.stop()
        leftover = list(self._running.values())
        for _, task in leftover:
            task.cancel()
        await asyncio.gather(*(task for _, task in leftover), return_exceptions=True)
        if leftover:
            try:
                await self.storage.release([lease for lease, _ in leftover], self.clock())
                logger.info("worker %s released %d lease(s)", self.worker_id, len(leftover))
            except StorageError as exc:
                logger.warning(
                    "worker %s could not release its leases (%s); they expire", self.worker_id, exc
                )
        try:
            await self.storage.mark_worker_stopped(self.worker_id, self.clock())
        except StorageError as exc:
            logger.warning("worker %s could not record its stop (%s)", self.worker_id, exc)
        logger.info("worker %s stopped", self.worker_id)

    def abort(self) -> None:
        """End everything at once, waiting for nothing (a cancelled ``App.close``): the leases of the runs
        cut short expire by themselves after ``lock_timeout``."""
        super().abort()
        self._heartbeat.abort()
        for _, task in self._running.values():
            task.cancel()

    # -- wake-ups ----------------------------------------------------------------------------------
    def wake(self) -> None:
        self.wakeups.poke()

    def poke(self) -> None:
        """Look for work now rather than at the next poll."""
        self.wakeups.poke()

    def reserve(self) -> Lease | None:
        """A slot and a lease id for an instance this process is about to create and run at once."""
        if self.stopping or len(self._running) + self._reserved >= self.concurrency:
            return None
        self._reserved += 1
        return Lease("", uuid.uuid4().hex)

    def run_reserved(self, claim: Claim | None, history: Sequence[HistoryRow] = ()) -> None:
        """Run an instance created already claimed (or just give the reserved slot back)."""
        self._reserved -= 1
        if claim is not None:
            self._spawn(claim, history, START)

    # -- internals ---------------------------------------------------------------------------------
    def _free(self) -> int:
        return self.concurrency - len(self._running) - self._reserved

    def _spawn(self, claim: Claim, history: Sequence[HistoryRow] | None, cause: str) -> None:
        instance_id = claim.lease.instance_id
        task = asyncio.create_task(self._run(claim, history, cause), name=f"geste-run-{instance_id}")
        self._running[instance_id] = (claim.lease, task)

    async def _run(self, claim: Claim, history: Sequence[HistoryRow] | None, cause: str) -> None:
        instance_id = claim.lease.instance_id
        try:
            early = 0.0 if claim.run_at is None else claim.run_at - self.clock()
            if early > 0:  # claimed just before its time (a timer): run it at the time, not before
                await asyncio.sleep(early)
            # Wake-up latency: from when the instance became runnable (its run_at: the event or message
            # committed, the timer due, the release; its start; or when a dead worker's lease ran out)
            # to now, as its run starts.
            since = claim.created_at if claim.run_at is None else claim.run_at
            if claim.lease_expired_at is not None and claim.lease_expired_at > since:
                since = claim.lease_expired_at
            self.metrics.wakeup_latency.observe(cause, max(0.0, self.clock() - since))
            await self.runner.run(claim, history)
            self._failures.pop(instance_id, None)
        except asyncio.CancelledError:
            raise
        except Exception:
            if len(self._failures) >= MAX_TRACKED_FAILURES:
                self._failures.clear()
            failures = self._failures[instance_id] = self._failures.get(instance_id, 0) + 1
            delay = min(self.wakeups.poll_interval * 2 ** (failures - 1), ENGINE_ERROR_BACKOFF_CAP)
            logger.exception(
                "instance %s: unexpected error in the engine (%d in a row here); offered again in %.3gs",
                instance_id,
                failures,
                delay,
            )
            with contextlib.suppress(Exception):  # else the lease expires by itself
                await self.storage.release([claim.lease], self.clock(), run_at=self.clock() + delay)
        finally:
            current = self._running.get(instance_id)
            if current is not None and current[0] == claim.lease:
                del self._running[instance_id]
            if self._backlog:
                self.wakeups.poke(BACKLOG)

    async def round(self) -> float:
        return await self._claim_round(self._cause)

    async def recover(self, exc: Exception, failures: int) -> float:
        self._sleep_cause = POLL
        return await super().recover(exc, failures)

    async def pause(self, seconds: float) -> None:
        """Sleep until a poke (its cause is the next round's) or the time is up (poll or timer)."""
        self._cause = self._sleep_cause
        if seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    await self.wakeups.event.wait()
                self._cause = self.wakeups.cause
            except TimeoutError:
                pass
        self.wakeups.event.clear()

    async def _claim_round(self, cause: str = POLL) -> float:
        """Claim what is runnable; return how long to sleep before looking again."""
        free = self._free()
        if free <= 0:
            self._backlog = True  # a finishing run pokes
            self._sleep_cause = POLL
            return self.wakeups.interval()
        if not self.runner.workflows:  # a client App: nothing it could run, nothing to claim
            self._sleep_cause = POLL
            return self.wakeups.interval()
        limit = self.max_timers_per_batch if self.wakeups.timer_due() else self.max_workflows_per_batch
        if self.wakeups.messages_due():  # woken by geste_channel_message: its own batch size
            limit = self.max_messages_per_batch
        batch = min(free, limit)
        now = self.clock()
        claims = await self.storage.claim(
            self.worker_id,
            now,
            now + self.lock_timeout,
            batch,
            due_before=now + self.wakeups.lookahead,
            workflows=list(self.runner.workflows),
        )
        if self.stopping:  # stopped while the claim ran: hand its instances back at once, unrun
            if claims:
                await self.storage.release([claim.lease for claim in claims], self.clock())
                logger.info(
                    "worker %s handed back %d instance(s) claimed as it stopped", self.worker_id, len(claims)
                )
            return 0.0
        self._backlog = len(claims) == batch
        self.claim_rounds += 1
        self.claimed += len(claims)
        metrics = self.metrics
        metrics.claim_rounds.values[cause] += 1
        if claims:
            metrics.claimed.values[cause] += len(claims)
        else:
            metrics.claim_rounds_empty.values[cause] += 1
        for claim in claims:
            stale = self._running.get(claim.lease.instance_id)
            if stale is not None:  # our own expired lease, taken back: the old run must not go on
                stale[1].cancel()
            if claim.lease_expired_at is not None:
                metrics.lease_takeovers.values[claim.workflow_name] += 1
            self._spawn(claim, claim.history, cause)
        if len(claims) == batch:
            self._sleep_cause = BACKLOG
            return 0.0
        interval = self.wakeups.interval()
        self._sleep_cause = TIMER if self.wakeups.timer_bound else POLL
        next_run = claims.next_run_at
        if next_run is None:
            return interval
        until = next_run - self.wakeups.lookahead - self.clock()
        if until < interval:
            self._sleep_cause = TIMER  # the next instance due, known from the database
        return max(0.0, min(interval, until))

    async def beat(self) -> None:
        """Register this worker or refresh its row: one statement."""
        listener = None if self.listener_status is None else json.dumps(self.listener_status())
        await self.storage.upsert_worker(
            WorkerRow(
                worker_id=self.worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                started_at=self._started_at,
                heartbeat_at=self.clock(),
                running=len(self._running),
                concurrency=self.concurrency,
                listener=listener,
                lock_timeout=self.lock_timeout,
                workflows=json.dumps(sorted(self.runner.workflows)),
                health=self.health,
            )
        )

    async def renew(self) -> None:
        """Extend every lease this worker holds; stop the runs whose lease was lost."""
        leases = [lease for lease, _ in self._running.values()]
        if leases:
            now = self.clock()
            kept = await self.storage.renew(leases, now + self.lock_timeout, now=now)
            for lease in leases:
                if lease.instance_id not in kept:
                    current = self._running.get(lease.instance_id)
                    if current is not None and current[0] == lease:
                        logger.warning("instance %s: lease lost; stopping its run here", lease.instance_id)
                        current[1].cancel()


class Heartbeat(Loop):
    """Every third of ``lock_timeout``: the registry's heartbeat, then the renewal of every lease held;
    each survives any error (the registry failing must never stop the renewals)."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(
            name=f"geste-heartbeat-{worker.worker_id}",
            what=f"worker {worker.worker_id}: the heartbeat loop",
            on_death=worker.mark_unhealthy,
        )
        self.worker = worker

    async def round(self) -> float:
        worker = self.worker
        interval = worker.lock_timeout / 3
        await asyncio.sleep(interval)
        try:
            await worker.beat()
        except Exception as exc:
            failed(logger, f"worker {worker.worker_id}: heartbeat", exc, interval)
        try:
            await worker.renew()
        except Exception as exc:
            failed(logger, f"worker {worker.worker_id}: renewing leases", exc, interval)
        return 0.0
