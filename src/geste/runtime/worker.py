"""The worker: claims runnable instances, runs them under renewed leases, drains on shutdown.

It sleeps until the earliest of: a poke (work started here, an event sent, a slot freed, a notification
from another process), a local timer, the next instance the database says becomes runnable, or the poll
interval that ``Wakeups`` gives (the safety net that finds work of other processes and expired leases).

While wake-ups are routed (``Wakeups.routing``: listening, with a ``Router``), a round claims by id what
was routed here (``Storage.claim_ids``) and runs a whole claim only for a poke, the poll net (every
``notify_fallback_interval``, however many routed rounds ran) or the catch-up after a reconnect; it wakes
for the database's next run_at only while no other live worker registers its workflows (the others' timers
ring where they are kept). A full worker hands what is routed to it on, once, when another had room.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from .._metrics import BACKLOG, POLL, START, TIMER, Metrics
from ..errors import StorageError
from ..storage.base import Claim, Claims, HistoryRow, Lease, Storage, WorkerRow
from .loops import Loop, failed
from .routing import Router
from .wakeups import HAND_ON_AFTER, Routed, Wakeups

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

    def claim_keys(self) -> list[str]:
        """What the worker claims (schema 27): the workflows' names, and for the pinned ones, the names
        with the version of its code (``_versions.claim_keys``)."""
        ...

    def code_version(self) -> str | None:
        """The version of the code it runs (registered with the worker)."""
        ...

    def start_version(self, workflow_name: str) -> tuple[str | None, bool]:
        """What an instance of ``workflow_name`` started here records: this code's version, and whether
        the workflow is pinned to it (a schedule's tick)."""
        ...

    async def run(self, claim: Claim, history: Sequence[HistoryRow] | None = None) -> None:
        """Run one claimed instance until it suspends, finishes, or cannot go on."""
        ...

    def cached(self, instance_ids: Collection[str] | None = None) -> dict[str, int]:
        """The runs it keeps parked in memory (of ``instance_ids``), with the last step each holds: a
        claim of one of them reads the rows after that step only."""
        ...

    def take_heartbeats(self) -> dict[str, str]:
        """The activity heartbeat details given since the last call, by instance: the renewal writes them."""
        ...

    def restore_heartbeats(self, instance_ids: Collection[str]) -> None:
        """The renewal that carried these details failed: give them to the next one."""
        ...

    def cancel(self, instance_id: str) -> bool:
        """A cancel of an instance it runs now reached this worker: its running activities are cancelled
        and the run delivers it at its next step. True when that is news to a run in progress here."""
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
        relay: bool = False,
        queues: Mapping[str, int | None] | None = None,
        serve_unqueued: bool = True,
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
        self.relay = relay
        """Whether this process runs an outbox relay (shown in the registry: outbox wake-ups go to one)."""
        self._names: dict[str, str] = {}
        """What each instance running here is routed by (``Claim.route_key``: its workflow's name, or its
        runner when pinned): its timer, if it suspends, is routed with it (handed on, if ever, by it)."""
        self._poll_at = 0.0
        """While routing: when the next whole claim round (the poll net) is due."""
        self._db_next: float | None = None
        """The database's next run_at, from the last whole claim (routing: woken for only if sole)."""
        self.handed_on = 0
        """Routed wake-ups (and queue backlogs, schema 23) this worker handed on to others (full, or
        stopping)."""
        self.clock_offset: float | None = None
        """This worker's clock minus the database's, measured at start (``check_clock``)."""
        self.cancels_delivered = 0
        self.renewal_cancels = 0
        """Of which the renewal told of (a cancel requested for a held instance: seen at each renewal)."""
        """Cancels of running instances this worker passed to its runs (a renewal or a notification)."""
        wakeups.on_cancel = self.cancel_running
        self.queues: dict[str, int | None] = dict(queues or {})
        """The queues this worker serves (schema 20), each with its per-worker limit (None: none)."""
        wakeups.queues = frozenset(self.queues)
        self.serve_unqueued = serve_unqueued
        """Whether this worker runs instances outside any queue (``App(serve_unqueued=...)``). Without,
        it runs the instances of the queues it serves only: admitted here, or resumed and taken over
        (``Storage.queue_runnable``, then ``claim_ids``), and registers no workflow for routed wake-ups
        (none of another instance is sent here; its own are found by its claims)."""
        self._rate_wakes: dict[str, float] = {}
        """Per queue whose rate's window was full, the moment this worker set a timer for."""
        self._admitted: dict[str, str] = {}
        """The instances running here that this worker admitted from a queue, with the queue: its
        per-worker limit counts them, and the end of one frees a slot (a claim of the queue is due)."""
        self.on_run_ended: Callable[[str], None] | None = None
        """Told the instance id when a run here ends or suspends (the schedule loop: a tick may wait
        for that run, ``overlap="queue"``)."""

    @property
    def router(self) -> Router | None:
        return self.wakeups.router

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self) -> None:  # type: ignore[override]
        """Register this worker, then start the claim loop and the heartbeat."""
        self._started_at = self.clock()
        try:
            await self.storage.prune_workers(self._started_at - WORKER_RETENTION)
            await self.beat()
        except StorageError as exc:  # the heartbeat tries again: running instances matters more
            logger.warning("worker %s: registering failed (%s)", self.worker_id, exc)
        await self.check_clock()
        self._cause = POLL
        super().start()
        self._heartbeat.start()
        logger.info("worker %s started (concurrency %d)", self.worker_id, self.concurrency)

    async def check_clock(self) -> float | None:
        """Compare this worker's clock with the database's, once at start; warn when it is off by more than
        ``lock_timeout / 3`` (more than the round trip can explain). Leases tolerate a skew between two
        workers of less than ``2 * lock_timeout / 3`` (a lease renewed every third of ``lock_timeout``
        has two thirds left at worst): a worker whose clock runs ahead by more takes over the leases of
        live workers early (safe: the lease id fences their writes, but their runs stop and start again
        there). Timers and ``run_at`` move by the skew. Returns the offset measured (None: unknown)."""
        try:
            before = self.clock()
            database = await self.storage.database_clock()
            after = self.clock()
        except Exception as exc:  # a check only: the worker starts whatever happens here
            logger.debug("worker %s: the database's clock could not be read (%r)", self.worker_id, exc)
            return None
        if database is None:
            return None
        self.clock_offset = offset = (before + after) / 2 - database
        if abs(offset) - (after - before) / 2 > self.lock_timeout / 3:
            logger.warning(
                "worker %s: its clock is %+.3fs off the database's; leases tolerate a skew between "
                "workers below 2/3 of lock_timeout (%.3gs): sync the clocks (NTP) or raise lock_timeout",
                self.worker_id,
                offset,
                self.lock_timeout,
            )
        return offset

    def mark_unhealthy(self, reason: str) -> None:
        """A loop of this process ended for good: say so in the registry (``geste status``), at once and
        at every heartbeat, so that operators do not take a worker that no longer claims for a live one."""
        if self.stopping:
            return
        self.health = reason if self.health is None else f"{self.health}; {reason}"
        self.track(self._report_health(), f"geste-health-{self.worker_id}")

    async def _report_health(self) -> None:
        try:
            await self.beat()
        except Exception as exc:
            logger.error("worker %s could not record that it is unhealthy (%s)", self.worker_id, exc)

    def announce(self) -> None:
        """The listener (re)connected: heartbeat now rather than at the next period, so that the registry
        says it listens (the other workers route wake-ups here from their next heartbeat on) and this
        worker's view of them is fresh."""
        if self.stopping or not self._started_at:
            return
        self.track(self._announce(), f"geste-announce-{self.worker_id}")

    def track(self, beat: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a beat in a task of its own, which ``stop`` waits for before it marks the worker stopped: a
        beat's statement, once sent, runs whatever becomes of its caller (a cancel does not undo it), and
        one landing after the stop mark would say the worker is alive."""
        task = asyncio.get_running_loop().create_task(beat, name=name)
        self._reports.add(task)  # held until done: the loop keeps only a weak reference to a task
        task.add_done_callback(self._reports.discard)
        return task

    async def _announce(self) -> None:
        try:
            await self.beat()
        except Exception as exc:  # the next heartbeat tries again
            logger.warning(
                "worker %s: heartbeat after the listener connected failed (%s)", self.worker_id, exc
            )

    async def stop(self, grace: float | None = None) -> None:
        """Stop claiming at a boundary (a claim round in flight ends, and what it took is handed back at
        once), let running instances finish for ``shutdown_grace`` (their leases still renewed), release
        the rest. A cancellation of the caller propagates; ``abort`` then ends what is left."""
        await super().stop(self.shutdown_grace if grace is None else grace)
        if self.wakeups.routed:  # routed here, never to be claimed here: to another worker, at once
            try:
                await self._hand_on(list(self.wakeups.routed.items()))
            except StorageError as exc:
                logger.warning("worker %s could not hand its wake-ups on (%s)", self.worker_id, exc)
        if self.wakeups.queued and self.wakeups.routing:  # queues routed here and not claimed: the same
            await self._hand_on_queues(list(self.wakeups.queued))
            self.wakeups.queued.clear()
        running = [task for _, task in self._running.values()]
        if running:
            logger.info("worker %s draining %d running instance(s)", self.worker_id, len(running))
            await asyncio.wait(running, timeout=self.shutdown_grace)
        await self._heartbeat.stop()  # cancelled; a beat of its in flight goes on, in its own task
        if self._reports:  # a beat (the heartbeat's, an announce, a health report) still in flight: it
            await asyncio.gather(*self._reports, return_exceptions=True)  # must land before the stop mark
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
        for task in self._reports:
            task.cancel()
        for _, task in self._running.values():
            task.cancel()

    # -- wake-ups ----------------------------------------------------------------------------------
    def wake(self) -> None:
        self.wakeups.poke()

    def poke(self) -> None:
        """Look for work now rather than at the next poll."""
        self.wakeups.poke()

    def made_runnable(self) -> None:
        """This process made work runnable (a cancel, an event, a message, a retry): look now, unless a
        notification routes it (to one worker, maybe another: a claim here would be one too many)."""
        if not self.wakeups.routing:
            self.wakeups.poke()

    def suspended(self, instance_id: str, run_at: float | None) -> None:
        """An instance running here suspended until ``run_at``: this worker keeps its timer. The
        suspension released its lease: it leaves the leases renewed at once, before its claim's task
        ends (a loop turn later when the cache keeps the run: a renewal in between took the released
        lease for a lost one and cancelled the claim, and with it the parked run)."""
        if run_at is not None:
            self.wakeups.wake_at(run_at, instance_id, self._names.get(instance_id))
        self._running.pop(instance_id, None)

    def rate_moments(self) -> list[float]:
        """When the queues whose rate's window was full at this worker's last claim of them have room
        again (``geste.testing`` moves its clock to them, as to any timer)."""
        return list(self._rate_wakes.values())

    def reserve(self) -> Lease | None:
        """A slot and a lease id for an instance this process is about to create and run at once (one
        outside any queue: None when this worker serves none of those)."""
        if (
            self.stopping
            or not self.serve_unqueued
            or len(self._running) + self._reserved >= self.concurrency
        ):
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
        self._names[instance_id] = claim.route_key

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
                run_at = self.clock() + delay
                await self.storage.release([claim.lease], self.clock(), run_at=run_at)
                self.wakeups.wake_at(run_at, instance_id, claim.route_key)  # this worker's timer
        finally:
            current = self._running.get(instance_id)
            if current is not None and current[0] == claim.lease:
                del self._running[instance_id]
            if instance_id not in self._running:  # (a claim of it since runs it here again)
                self._names.pop(instance_id, None)
                queue = self._admitted.pop(instance_id, None)
                if queue is not None:  # a queue's slot (here, at least) is free: claim the queue
                    self._slot_freed(queue)
            if self._backlog:
                self.wakeups.poke(BACKLOG)
            if self.on_run_ended is not None:
                self.on_run_ended(instance_id)

    async def round(self) -> float:
        if self.wakeups.routing:
            return await self._routed_round(self._cause)
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
        else:
            await asyncio.sleep(0)  # no round may keep the event loop: the runs and the heartbeat go on
        self.wakeups.event.clear()

    async def _claim_round(self, cause: str = POLL) -> float:
        """Claim what is runnable; return how long to sleep before looking again."""
        free = self._free()
        routing = self.wakeups.routing
        self._poll_at = self.clock() + self.wakeups.fallback_interval  # whatever this round finds
        if free <= 0:
            self._backlog = True  # a finishing run pokes
            self._sleep_cause = POLL
            if routing:
                await self._hand_on_if_full()
                return self._routed_sleep()
            return self.wakeups.interval()
        if not self.runner.workflows:  # a client App: nothing it could run, nothing to claim
            self._sleep_cause = POLL
            self.wakeups.routed.clear()
            return self._routed_sleep() if routing else self.wakeups.interval()
        routed_before = list(self.wakeups.routed)
        limit = self.max_timers_per_batch if self.wakeups.timer_due() else self.max_workflows_per_batch
        if self.wakeups.messages_due():  # woken by geste_channel_message: its own batch size
            limit = self.max_messages_per_batch
        batch = min(free, limit)
        now = self.clock()
        if self.serve_unqueued:
            claims = await self.storage.claim(
                self.worker_id,
                now,
                now + self.lock_timeout,
                batch,
                due_before=now + self.wakeups.lookahead,
                workflows=self.runner.claim_keys(),
                known=self.runner.cached(),
            )
        else:
            claims = await self._claim_queued_runs(now, batch)
        if self.stopping:  # stopped while the claim ran: hand its instances back at once, unrun
            if claims:
                await self.storage.release([claim.lease for claim in claims], self.clock())
                logger.info(
                    "worker %s handed back %d instance(s) claimed as it stopped", self.worker_id, len(claims)
                )
            return 0.0
        self._backlog = len(claims) == batch
        self._count(claims, cause)
        self._spawn_all(claims, {}, cause)
        self._db_next = claims.next_run_at
        if self.queues:
            self._more_queued(await self._claim_queues(cause))
        if self.stopping:
            return 0.0
        if len(claims) == batch:
            self._sleep_cause = BACKLOG
            return 0.0
        # Not full: whatever was routed here before the claim was due and of these workflows, so it took
        # it, unless another worker did (or it is not due yet by this clock: the poll net finds it).
        self.wakeups.forget(routed_before)
        if routing:
            return self._routed_sleep()
        interval = self.wakeups.interval()
        self._sleep_cause = TIMER if self.wakeups.timer_bound else POLL
        next_run = claims.next_run_at
        if next_run is None:
            return interval
        until = next_run - self.wakeups.lookahead - self.clock()
        if until < interval:
            self._sleep_cause = TIMER  # the next instance due, known from the database
        return max(0.0, min(interval, until))

    async def _claim_queued_runs(self, now: float, batch: int) -> Claims:
        """``serve_unqueued=False``: in place of the claim of every runnable instance of its workflows,
        the admitted instances of the queues it serves that are runnable (woken, due, or whose lease ran
        out), by id; ``next_run_at`` is the earliest of the others."""
        workflows = self.runner.claim_keys()
        due = now + self.wakeups.lookahead
        ids, next_run_at = await self.storage.queue_runnable(
            list(self.queues), now, batch, due_before=due, workflows=workflows
        )
        claims = Claims(next_run_at=next_run_at)
        if ids:
            taken = await self.storage.claim_ids(
                self.worker_id,
                now,
                now + self.lock_timeout,
                ids,
                due_before=due,
                workflows=workflows,
                known=self.runner.cached(ids),
            )
            claims.extend(taken)
        return claims

    def _slot_freed(self, queue: str) -> None:
        """A run this worker admitted from ``queue`` ended here: a claim of the queue is due (routing: of
        that queue alone; else a whole round, which claims every queue)."""
        if self.wakeups.routing:
            self.wakeups.route_queue(queue, BACKLOG)
        else:
            self.wakeups.poke(BACKLOG)

    def _more_queued(self, more: Collection[str]) -> None:
        """The claims of these queues took all they asked for: more may wait (a backlog), claim them again
        (routing: those queues alone; else a whole round)."""
        if not more:
            return
        if self.wakeups.routing:
            for name in more:
                self.wakeups.route_queue(name, BACKLOG)
            if self._free() <= 0:  # full: another worker serving these queues takes the rest meanwhile
                self.track(self._hand_on_queues(list(more)), f"geste-hand-on-{self.worker_id}")
        else:
            self._backlog = True
            self.wakeups.poke(BACKLOG)

    async def _hand_on_queues(self, names: list[str]) -> None:
        """This worker is full and these queues have more waiting: one notification each, routed to
        another live worker serving the queue (a worker claims all it can take at once, so a backlog
        spreads over the cluster one fill-up at a time, not one notification per instance)."""
        for name in names:
            try:
                if await self.storage.hand_on_queue(name, uuid.uuid4().hex, avoid=self.worker_id):
                    self.handed_on += 1
            except StorageError as exc:  # the others' poll nets find the backlog
                logger.warning("worker %s could not hand queue %s on (%s)", self.worker_id, name, exc)

    async def _claim_queues(self, cause: str, names: Collection[str] | None = None) -> list[str]:
        """One claim of each queue this worker serves (of ``names`` only, if given), within its free slots
        and each queue's per-worker limit (the global limit is the database's: ``Storage.queue_claim``).
        Returns the queues whose claim took all it asked for: more may wait (a backlog). A queue this
        round leaves unclaimed, for want of a free slot, stays routed here (``Wakeups.queued``)."""
        more: list[str] = []
        for name, per_worker in self.queues.items():
            if names is not None and name not in names:
                continue
            if self._free() <= 0:
                self._backlog = True  # a finishing run pokes
                break
            asked = self.wakeups.queued.pop(name, None)  # claimed now: whatever asked for it is served
            room = min(self._free(), self.max_workflows_per_batch)
            if per_worker is not None:  # a run of the queue ending here pokes
                room = min(room, per_worker - sum(1 for q in self._admitted.values() if q == name))
            if room <= 0:
                continue
            now = self.clock()
            try:
                claims = await self.storage.queue_claim(
                    self.worker_id, now, now + self.lock_timeout, room, queue=name
                )
            except BaseException:
                if asked is not None:  # not served: the next round claims it (after the loop's back-off)
                    self.wakeups.queued.setdefault(name, asked)
                raise
            if self.stopping:
                await self._hand_back(claims)
                return []
            for claim in claims:
                self._admitted[claim.lease.instance_id] = name
            moment = claims.next_run_at  # its rate's window is full: when it has room again
            if moment is not None and self._rate_wakes.get(name) != moment:  # one timer per moment (a
                self._rate_wakes[name] = moment  # timer set pokes: a claim again that finds the same one)
                self.wakeups.wake_at(moment + self.wakeups.lookahead)
            self._count(claims, cause)
            self._spawn_all(claims, {}, cause)
            if len(claims) == room and moment is None:
                more.append(name)
        return more

    # -- routed rounds -----------------------------------------------------------------------------
    async def _routed_round(self, cause: str) -> float:
        """While routing: claim by id what was routed here; a whole claim only for a poke, the poll net, or
        the database's next run_at when no other worker registers these workflows."""
        wakeups = self.wakeups
        wakeups.ring()
        now = self.clock()
        router = self.router
        db_due = self._db_next is not None and now >= self._db_next - wakeups.lookahead
        if (
            wakeups.take_generic()
            or now >= self._poll_at
            or (db_due and router is not None and router.sole())
        ):
            return await self._claim_round(cause)
        if wakeups.queued:  # starts onto a queue routed here, a backlog, a slot freed: claim those queues
            if self._free() <= 0:
                self._backlog = True  # a finishing run pokes a whole round, which claims them
            else:
                queued = dict(wakeups.queued)
                more = await self._claim_queues(next(iter(queued.values())), queued)
                if self.stopping:
                    return 0.0
                self._more_queued(more)
        if not wakeups.routed:
            return 0.0 if wakeups.queued and self._free() > 0 else self._routed_sleep()
        free = self._free()
        if free <= 0:
            self._backlog = True  # a finishing run pokes: a whole claim takes what waits then
            await self._hand_on_if_full()
            return self._routed_sleep()
        workflows = self.runner.claim_keys()
        if not workflows:
            wakeups.routed.clear()
            return self._routed_sleep()
        taken = wakeups.take(min(free, self.max_workflows_per_batch))
        claims = await self.storage.claim_ids(
            self.worker_id,
            now,
            now + self.lock_timeout,
            list(taken),
            due_before=now + wakeups.lookahead,
            workflows=workflows,
            known=self.runner.cached(taken),
        )
        if self.stopping:
            await self._hand_back(claims)
            return 0.0
        self._count(claims, next(iter(taken.values())).cause)
        self._spawn_all(claims, taken, TIMER)
        for instance_id, run_at in claims.later.items():  # not due yet by this clock: when it is
            wakeups.wake_at(run_at, instance_id, taken[instance_id].workflow)
        return 0.0 if wakeups.routed or wakeups.queued else self._routed_sleep()

    def _routed_sleep(self) -> float:
        """How long a routing worker may sleep: until the poll net, its earliest local timer, or the
        database's next run_at if no other worker registers its workflows."""
        wakeups = self.wakeups
        wakeups.ring()
        now = self.clock()
        until, self._sleep_cause = self._poll_at - now, POLL
        moment = wakeups.next_timer()
        if moment is not None and moment - now < until:
            until, self._sleep_cause = moment - now, TIMER
        router = self.router
        # Full, the database's next run_at is no reason to wake (a finishing run pokes): a moment passed
        # made every round a pause of 0, which never let a run end (the event loop never turned).
        if self._db_next is not None and router is not None and self._free() > 0 and router.sole():
            due = self._db_next - wakeups.lookahead - now
            if due < until:
                until, self._sleep_cause = due, TIMER
        if self._free() <= 0:  # full: look again when the next routed wake-up may be handed on
            moments = [r.since + HAND_ON_AFTER for r in wakeups.routed.values() if r.forwardable]
            later = [m for m in moments if m > now]  # the others had nowhere to go: they wait for a slot
            if later:
                until = min(until, min(later) - now)
        return max(0.0, until)

    async def _hand_on_if_full(self) -> None:
        """Full: hand the routed wake-ups that waited ``HAND_ON_AFTER`` for a slot here, and may be handed
        on, to another worker, if one had room at its last heartbeat; the rest wait for a free slot here
        (a finishing run pokes; or another worker's poll net takes them)."""
        router = self.router
        if router is None:
            return
        waited = self.clock() - HAND_ON_AFTER
        movable = [
            (instance_id, routed)
            for instance_id, routed in self.wakeups.routed.items()
            if routed.forwardable
            and routed.since <= waited
            and routed.workflow is not None
            and router.room_elsewhere(routed.workflow)
        ]
        if movable:
            await self._hand_on(movable)

    async def _hand_on(self, wakeups: list[tuple[str, Routed]]) -> None:
        """One statement: a notification per wake-up, naming this worker as the one to avoid."""
        movable = [(instance_id, r.workflow) for instance_id, r in wakeups if r.workflow is not None]
        if not movable:
            return
        sent = await self.storage.route_wakeups(movable, avoid=self.worker_id)
        if sent:
            self.handed_on += sent
            self.wakeups.forget(instance_id for instance_id, _ in movable)

    async def _hand_back(self, claims: Claims) -> None:
        """Stopped while a claim ran: its instances go back at once, unrun."""
        if claims:
            await self.storage.release([claim.lease for claim in claims], self.clock())
            logger.info(
                "worker %s handed back %d instance(s) claimed as it stopped", self.worker_id, len(claims)
            )

    def _count(self, claims: Claims, cause: str) -> None:
        self.claim_rounds += 1
        self.claimed += len(claims)
        metrics = self.metrics
        metrics.claim_rounds.values[cause] += 1
        if claims:
            metrics.claimed.values[cause] += len(claims)
        else:
            metrics.claim_rounds_empty.values[cause] += 1

    def _spawn_all(self, claims: Claims, routed: dict[str, Routed], cause: str) -> None:
        """Run what a claim took, each with the cause of its wake-up (its routed one, else ``cause``)."""
        self.wakeups.forget(claim.lease.instance_id for claim in claims)
        for claim in claims:
            stale = self._running.get(claim.lease.instance_id)
            if stale is not None:  # our own expired lease, taken back: the old run must not go on
                stale[1].cancel()
            if claim.lease_expired_at is not None:
                self.metrics.lease_takeovers.values[claim.workflow_name] += 1
            why = routed.get(claim.lease.instance_id)
            self._spawn(claim, claim.history, cause if why is None else why.cause)

    async def beat(self) -> None:
        """Register this worker or refresh its row: one statement (which, while wake-ups may be routed,
        also reads the other workers: the router's view)."""
        listener = None if self.listener_status is None else json.dumps(self.listener_status())
        now = self.clock()
        row = WorkerRow(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self._started_at,
            heartbeat_at=now,
            running=len(self._running),
            concurrency=self.concurrency,
            listener=listener,
            lock_timeout=self.lock_timeout,
            # serving no instance outside a queue, it is routed no instance's wake-up: it registers none
            workflows=json.dumps(self.runner.claim_keys() if self.serve_unqueued else []),
            health=self.health,
            relay=self.relay,
            queues=json.dumps(sorted(self.queues)),
            version=self.runner.code_version(),
        )
        router = self.router
        if router is None:
            await self.storage.upsert_worker(row)
        else:
            router.update(await self.storage.heartbeat(row, peers_since=router.peers_since(now)))

    def cancel_running(self, instance_id: str, via: str = "notification") -> None:
        """A cancel was requested for an instance this worker may run now (``via``: a notification routed
        to its holder, the renewal, or ``local``: requested in this process): its run gets it at once (its
        running activities are cancelled)."""
        if instance_id in self._running and self.runner.cancel(instance_id):
            self.cancels_delivered += 1
            logger.info("instance %s: a cancel reached its run here (via %s)", instance_id, via)

    async def renew(self) -> None:
        """Extend every lease this worker holds; stop the runs whose lease was lost; pass the cancels
        requested for held instances to their runs (the same statement says which: no extra round trip)."""
        leases = [lease for lease, _ in self._running.values()]
        if leases:
            now = self.clock()
            beats = self.runner.take_heartbeats()  # new activity heartbeat details: in the same statement
            try:
                kept = await self.storage.renew(
                    leases, now + self.lock_timeout, now=now, heartbeats=beats or None
                )
            except BaseException:
                if beats:
                    self.runner.restore_heartbeats(beats)
                raise
            for instance_id in kept.cancel_requested:
                self.renewal_cancels += 1
                self.cancel_running(instance_id, "renewal")
            for lease in leases:
                if lease.instance_id not in kept:
                    current = self._running.get(lease.instance_id)
                    if current is not None and current[0] == lease and await self._taken(lease):
                        logger.warning("instance %s: lease lost; stopping its run here", lease.instance_id)
                        current[1].cancel()

    async def _taken(self, lease: Lease) -> bool:
        """Whether a lease the renewal did not find was taken by another claim (held by it now, or given
        back by another worker since), rather than given back by its own run: an end or a suspension
        whose commit came before the renewal, while the run's task has not yet resumed to leave the leases
        renewed (seen under load: a false "lease lost", and the cancel cut the run's last hooks). A lease
        given back needs no cancel: the run is ending, and any later write of it is refused anyway (the
        lease id fences it). A lease taken over and given back by the taker, the run still in flight here
        (a worker paused past its lease), is lost: without the cancel the run would go on until its next
        write, or stay silent if it never made one."""
        if self._running.get(lease.instance_id, (None,))[0] != lease:
            return False  # the run left meanwhile
        row = await self.storage.get_instance(lease.instance_id)
        current = self._running.get(lease.instance_id)
        if row is None or current is None or current[0] != lease:
            return False
        return row.locked_by is not None or row.last_worker not in (None, self.worker_id)


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
            await asyncio.shield(worker.track(worker.beat(), f"geste-beat-{worker.worker_id}"))
        except Exception as exc:
            failed(logger, f"worker {worker.worker_id}: heartbeat", exc, interval)
        try:
            await worker.renew()
        except Exception as exc:
            failed(logger, f"worker {worker.worker_id}: renewing leases", exc, interval)
        return 0.0
