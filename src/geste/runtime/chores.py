"""The background chores of a worker: channel maintenance.

``ChannelMaintenance`` re-wakes competing receivers when a message stays unclaimed (the one woken for it
was cancelled or failed) and deletes what nobody needs any more (old messages, subscriptions, events and
deliveries), after the retention.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..storage.base import Storage
from .loops import Loop, failed

logger = logging.getLogger("geste.channels")

REWAKE_INTERVAL = 5.0
"""Seconds between the sweeps that re-wake competing receivers for a message left unclaimed."""
CLEANUP_INTERVAL = 60.0
"""Seconds between two cleanups of old messages, subscriptions and events."""
CLEANUP_BATCH = 1000
"""Rows deleted per statement; a cleanup runs at most ``CLEANUP_ROUNDS`` statements of each kind."""
CLEANUP_ROUNDS = 10


class ChannelMaintenance(Loop):
    """The background chores of channels, in each process that runs a worker: a re-wake sweep every
    ``REWAKE_INTERVAL`` and a bounded cleanup every ``CLEANUP_INTERVAL`` (the first at start). Each
    round is one short bounded statement or a few: ``stop`` cancels it, leaving nothing half done."""

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
        batch: int = 100,
        on_death: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name="geste-channel-maintenance", what="channel maintenance", on_death=on_death)
        self.storage = storage
        self.clock = clock
        self.message_retention = message_retention
        self.event_retention = event_retention
        self.on_woken = on_woken
        self.batch = batch
        self._next_cleanup = 0.0

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
            )
            deleted += done
            if done < CLEANUP_BATCH:
                break
        if deleted:
            logger.info("cleanup deleted %d old message, subscription, event and delivery row(s)", deleted)
        return deleted

    async def round(self) -> float:
        if self.clock() >= self._next_cleanup:
            self._next_cleanup = self.clock() + CLEANUP_INTERVAL
            await self.cleanup()
        await self.rewake()
        return REWAKE_INTERVAL

    async def recover(self, exc: Exception, failures: int) -> float:
        failed(logger, self.doing, exc, REWAKE_INTERVAL)  # never let a chore die: tried again next round
        return REWAKE_INTERVAL

    async def pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
