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

from dataclasses import dataclass
from datetime import datetime
from typing import Any


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
