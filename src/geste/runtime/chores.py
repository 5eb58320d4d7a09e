"""The background chores of a worker: channel maintenance, each chore run by one worker of the cluster.

``ChannelMaintenance`` re-wakes competing receivers when a message stays unclaimed (the one woken for it
was cancelled or failed) and deletes what nobody needs any more (old messages, subscriptions, events and
deliveries, after the retention; the expired registrations of ``result()`` calls whose process died);
with ``App(retention=...)``, it also deletes the finished instances past that age (``prune``).

Every worker process runs the loop, but each round of each chore is taken by one worker of the cluster
(``Storage.chore_take``: a conditional upsert of the chore's row in ``geste_chores``, by key): the worker
that took the last round (the holder) takes the next when it is due. The others look once a round, a
tenth of a round after the holder's time: they find it taken (and look again after the next), or given
back by a holder that stopped (they take it), or not taken (the holder died or stalls: they take it once
it is a whole round late, ``grace``). So a chore costs the cluster one run per interval, plus one
single-row statement per worker per interval, however many workers there are; a stopped holder is
replaced within a tenth of a round, a killed one within a round. On SQLite the row is shared by every
process on the file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import StorageError
from ..storage.base import CLEANUP_START, PRUNE_START, Storage
from .loops import Loop, failed

logger = logging.getLogger("geste.channels")

REWAKE_INTERVAL = 5.0
"""Seconds between the sweeps that re-wake competing receivers for a message left unclaimed."""
CLEANUP_INTERVAL = 60.0
"""Seconds between two cleanups of old messages, subscriptions and events."""
CLEANUP_BATCH = 1000
"""Rows read per statement; a cleanup runs at most ``CLEANUP_ROUNDS`` statements of each kind."""
CLEANUP_ROUNDS = 10

PRUNE_INTERVAL = 60.0
"""Seconds between two rounds of the retention of finished instances (``App(retention=...)``)."""
PRUNE_BATCH = 100
"""Finished instances read per batch (one transaction, which deletes them with all their rows: their
histories can be long, so fewer than the cleanup's rows); a round runs at most ``PRUNE_ROUNDS`` batches."""
PRUNE_ROUNDS = 10

REWAKE = "channel_rewake"
CLEANUP = "channel_cleanup"
PRUNE = "instance_retention"


@dataclass
class Chore:
    """A periodic chore: its name (its row in ``geste_chores``), its interval (read at each turn: the
    module's constants, which tests change) and what a round does."""

    name: str
    interval: Callable[[], float]
    run: Callable[[], Awaitable[object]]
    next_try: float = 0.0
    """When this worker looks next (its clock): the round's time if it holds the chore, a round later
    if another does."""
    held: bool = False
    """Whether this worker took the last round."""
    rounds: int = 0
    """Rounds this worker took."""


class ChannelMaintenance(Loop):
    """The background chores of channels, in each process that runs a worker: a re-wake sweep every
    ``REWAKE_INTERVAL`` and a bounded cleanup every ``CLEANUP_INTERVAL``, each round taken by one worker of
    the cluster (the first looks at once). Each round is one short bounded statement or a few: ``stop``
    cancels it, leaving nothing half done, then gives the chores this worker holds back."""

    log = logger
    doing = "channel maintenance"

    def __init__(
        self,
        storage: Storage,
        *,
        clock: Callable[[], float],
        message_retention: float,
        event_retention: float,
        on_woken: Callable[[], None],
        worker_id: str = "",
        batch: int = 100,
        on_death: Callable[[str], None] | None = None,
        retention: float | None = None,
    ) -> None:
        super().__init__(name="geste-channel-maintenance", what="channel maintenance", on_death=on_death)
        self.storage = storage
        self.clock = clock
        self.message_retention = message_retention
        self.event_retention = event_retention
        self.on_woken = on_woken
        self.worker_id = worker_id
        self.batch = batch
        self.position = CLEANUP_START
        """Where the cleanup's walks of the subscriptions and the old messages stopped (kept by the
        holder; a new holder starts from the first)."""
        self.chores = [
            Chore(CLEANUP, lambda: CLEANUP_INTERVAL, self.cleanup),
            Chore(REWAKE, lambda: REWAKE_INTERVAL, self.rewake),
        ]
        self.retention = retention
        self.prune_position = PRUNE_START
        """Where the retention's walk of the finished instances stopped (kept by the holder)."""
        if retention is not None:
            self.chores.append(Chore(PRUNE, lambda: PRUNE_INTERVAL, self.prune))

    async def rewake(self) -> list[str]:
        """Re-wake idle competing receivers of messages unclaimed for longer than the sweep interval."""
        now = self.clock()
        woken = await self.storage.channel_rewake(
            now, published_before=now - REWAKE_INTERVAL, limit=self.batch
        )
        if woken:
            logger.info("re-woke %d competing receiver(s) of unclaimed messages", len(woken))
            self.on_woken()
        return woken

    async def cleanup(self) -> int:
        """Delete, in bounded batches, what no instance needs: returns the number of rows deleted."""
        now = self.clock()
        deleted = 0
        for _ in range(CLEANUP_ROUNDS):
            done = await self.storage.channel_cleanup(
                messages_before=now - self.message_retention,
                events_before=now - self.event_retention,
                limit=CLEANUP_BATCH,
                position=self.position,
            )
            self.position = done.position
            deleted += done.deleted
            if not done.full:
                break
        if deleted:
            logger.info("cleanup deleted %d old message, subscription, event and delivery row(s)", deleted)
        expired = 0
        for _ in range(CLEANUP_ROUNDS):  # result() registrations of waiters that died (PostgreSQL)
            done_now = await self.storage.result_waiters_cleanup(now, limit=CLEANUP_BATCH)
            expired += done_now
            if done_now < CLEANUP_BATCH:
                break
        for _ in range(CLEANUP_ROUNDS):  # stream readers that died (PostgreSQL, schema 26)
            done_now = await self.storage.stream_readers_cleanup(now, limit=CLEANUP_BATCH)
            expired += done_now
            if done_now < CLEANUP_BATCH:
                break
        if expired:
            logger.info("cleanup deleted %d expired result() or stream reader registration(s)", expired)
        return deleted + expired

    async def prune(self) -> int:
        """Delete the finished instances that ended more than ``retention`` ago and nothing needs, with
        their rows, in at most ``PRUNE_ROUNDS`` bounded batches: returns the instances deleted. The walk
        goes on where the last round stopped (instances kept for an unfinished parent or child are
        stepped over), from the first again once it reaches the end."""
        assert self.retention is not None
        before = self.clock() - self.retention
        instances = rows = 0
        for _ in range(PRUNE_ROUNDS):
            done = await self.storage.prune_instances(before, limit=PRUNE_BATCH, position=self.prune_position)
            self.prune_position = done.position
            instances += done.instances
            rows += done.deleted
            if not done.full:
                break
        if instances:
            logger.info("retention deleted %d finished instance(s), %d row(s) in all", instances, rows)
        return instances

    async def round(self) -> float:
        for chore in self.chores:
            if self.clock() >= chore.next_try:
                await self._turn(chore)
        return max(0.0, min(chore.next_try for chore in self.chores) - self.clock())

    async def _turn(self, chore: Chore) -> None:
        """Take the chore's round if it is this worker's, run it; set when to look next."""
        interval = chore.interval()
        now = self.clock()
        turn = await self.storage.chore_take(
            chore.name, self.worker_id, now, interval=interval, grace=interval
        )
        if not turn.taken:
            if chore.held and chore.name == CLEANUP:  # another worker took it over: its walks start afresh
                self.position = CLEANUP_START
            if chore.held and chore.name == PRUNE:
                self.prune_position = PRUNE_START
            chore.held = False
            soon = interval / 10
            if turn.holder is None or turn.holder == self.worker_id:
                chore.next_try = turn.next_at  # its round is this worker's or anyone's
            elif turn.next_at > now:  # the holder took its round: look just after its next one (taken
                chore.next_try = turn.next_at + soon  # again, or given back at its stop: then take it)
            else:  # the holder's round is due and not taken: take it once the holder is a round late
                chore.next_try = turn.next_at + interval
            # never sooner than a tenth of a round (a row a concurrent take held while this one waited
            # for it is read as it was before)
            chore.next_try = max(chore.next_try, now + soon)
            return
        chore.held = True
        chore.rounds += 1
        chore.next_try = turn.next_at
        try:
            await chore.run()
        except Exception as exc:  # one chore failing never keeps the other from its rounds
            failed(logger, f"{self.doing}: {chore.name}", exc, chore.next_try - self.clock())

    async def recover(self, exc: Exception, failures: int) -> float:
        failed(logger, self.doing, exc, REWAKE_INTERVAL)  # never let a chore die: tried again next round
        return REWAKE_INTERVAL

    async def pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def stop(self, grace: float | None = None) -> None:
        """Stop the loop, then give back the chores this worker holds, so that another worker takes
        each at its next round rather than a round later."""
        await super().stop(grace)
        if any(chore.held for chore in self.chores):
            for chore in self.chores:
                chore.held = False
            try:
                await self.storage.chore_release(self.worker_id)
            except StorageError as exc:
                logger.warning(
                    "could not give the chores back (%s); another worker takes them when late", exc
                )
