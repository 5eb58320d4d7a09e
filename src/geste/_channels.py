"""Channels: messages between workflow instances, and from the outside world to them.

A message is published on a named channel (``ctx.publish``, ``app.publish``) or sent to one instance
(``ctx.send_to``, ``app.send_to``) and stored; an instance takes messages with ``ctx.receive``:

- **broadcast** subscribers (``ctx.subscribe(channel)``, or a first ``receive`` on a channel) each take
  every message published on the channel after they subscribed, in publication order;
- **competing** subscribers (``ctx.subscribe(channel, mode="competing")``) share the channel's messages:
  each one published after a competing subscriber subscribed is taken by exactly one of them;
- a **direct** message (``send_to``) is taken by its target only, whenever it receives on that channel
  (also if it was sent before the target subscribed).

The storage makes taking a message and recording it in the history one transaction, and a publish makes
the waiting receivers runnable in its own transaction (every waiting broadcast subscriber, the competing
subscriber idle the longest, or the target). ``ChannelMaintenance`` runs with each worker: it re-wakes
competing receivers when a message stays unclaimed (the one woken for it was cancelled or failed) and
deletes what nobody needs any more, after the retention.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ._loops import cancel_and_wait, failed, watch
from ._serde import decode
from .storage.base import Storage

logger = logging.getLogger("geste.channels")

REWAKE_INTERVAL = 5.0
"""Seconds between the sweeps that re-wake competing receivers for a message left unclaimed."""
CLEANUP_INTERVAL = 60.0
"""Seconds between two cleanups of old messages, subscriptions and events."""
CLEANUP_BATCH = 1000
"""Rows deleted per statement; a cleanup runs at most ``CLEANUP_ROUNDS`` statements of each kind."""
CLEANUP_ROUNDS = 10


@dataclass(frozen=True, slots=True)
class Message:
    """A message as ``ctx.receive`` returns it.

    ``sender_instance_id`` is the publishing instance (``None`` when published from outside a workflow);
    ``direct`` says it was sent to this instance with ``send_to``.
    """

    message_id: str
    channel: str
    data: Any
    sender_instance_id: str | None
    published_at: datetime
    direct: bool = False


def message_from_payload(payload: str | None) -> Message:
    """The ``Message`` a history row of kind ``message`` recorded."""
    return message_from_body(decode(payload))


def message_from_body(body: Any) -> Message:
    """The ``Message`` of a ``message`` row's decoded payload."""
    return Message(
        message_id=body["message_id"],
        channel=body["channel"],
        data=body.get("data"),
        sender_instance_id=body.get("sender_instance_id"),
        published_at=datetime.fromtimestamp(body["published_at"], UTC),
        direct=bool(body.get("direct")),
    )


class ChannelMaintenance:
    """The background chores of channels, in each process that runs a worker: a re-wake sweep every
    ``REWAKE_INTERVAL`` and a bounded cleanup every ``CLEANUP_INTERVAL`` (the first at start)."""

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
        self.storage = storage
        self.on_death = on_death
        """Told why if the chores' loop ends by itself (the App marks its worker unhealthy)."""
        self.clock = clock
        self.message_retention = message_retention
        self.event_retention = event_retention
        self.on_woken = on_woken
        self.batch = batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="geste-channel-maintenance")
        if self.on_death is not None:
            watch(self._task, "channel maintenance", self.on_death, lambda: self._task is None)

    async def stop(self) -> None:
        """Cancel the chores (each is one short bounded statement: nothing is left half done); a
        cancellation of the caller propagates."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    def abort(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

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

    async def _run(self) -> None:
        next_cleanup = 0.0
        while True:
            try:
                if self.clock() >= next_cleanup:
                    next_cleanup = self.clock() + CLEANUP_INTERVAL
                    await self.cleanup()
                await self.rewake()
            except Exception as exc:  # never let a chore die: it is tried again next round
                failed(logger, "channel maintenance", exc, REWAKE_INTERVAL)
            await asyncio.sleep(REWAKE_INTERVAL)
