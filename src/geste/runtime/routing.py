"""Which worker takes a wake-up: one live worker of the cluster, not every worker (issue 15).

PostgreSQL delivers every notification to every listener of the database. Each listener decides, with
the same rule and its own view of the live workers, whether the wake-up is its own; the others do
nothing (no claim statement). The wake-up of an instance goes to:

- the worker the notification names (``worker``: the instance's ``last_worker``, the one that suspended
  it or gave it back; for a timer, the worker that keeps it), when that worker is routable and registers
  the instance's key: a run it may still hold in memory goes back to it;
- otherwise the highest score of a hash of the instance id with each routable worker that registers the
  key (rendezvous hashing), leaving out ``avoid`` (the worker that gave the instance back or handed
  it on). When a worker joins, only the instances whose new highest score is its own move, to it; when
  one leaves, only its own move. Two views that differ by a joining worker therefore agree on everything
  but what moves to it, which both it and the worker it moves from may claim: harmless, a claim is
  ``FOR UPDATE SKIP LOCKED``. Views that differ by a leaving worker may leave an instance to nobody until
  they agree (at most ``ROUTABLE_SLACK`` plus two heartbeat periods): the poll net takes it meanwhile.

The key (the payload's ``workflow_name``) is what a claim matches, ``coalesce(runner, workflow_name)``
(schema 27): the workflow's name, or, for an instance pinned to a version, the name U+001F the version. A
worker registers its claim keys (``geste_workers.workflows``): its workflows' names, and each pinned one's
name with its own version. So a pinned instance's wake-up goes only to a worker of its version (the others
could not claim it), and an unpinned one's as before, by name.

A worker is **routable** while it has heartbeated within two of its heartbeat periods (its
``lock_timeout / 3``; or one of its periods plus one of this worker's, if longer, as this view is only
refreshed at this worker's heartbeat) plus ``ROUTABLE_SLACK``, has not stopped, and its listener was
``listening`` at its last heartbeat (a worker that cannot hear a notification must not be sent one). The
view is what the heartbeat statement reads of the other workers (``Storage.heartbeat``): no query of its
own. This worker is always routable to itself (it is the one listening).

Timers: only the worker that keeps a timer (its suspender) claims when it rings. The others keep a note
(``Wakeups``) and, when it rings, ``takes_over`` decides: nothing while its keeper is routable and has not
restarted since; else the wake-up is routed as if its keeper were gone, and the one worker it goes to
claims it. So the timers of a worker that died fire on time once its death shows in the views.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..storage.base import WorkerRow

RUNNER_SEPARATOR = "\x1f"
"""Between the name and the version in a pinned instance's runner (``_versions.SEPARATOR``, which no
workflow name holds): a key without it is a name."""
ROUTABLE_SLACK = 1.0
"""Seconds of lateness a heartbeat may have (a busy process, a slow statement) before its worker stops
being routable. Too short costs duplicate claims (harmless), too long delays routing around a dead worker."""
PEERS_WINDOW = 600.0
"""The heartbeat reads the workers heard from within this many seconds (or 3 of its ``lock_timeout``s):
the rest are gone, however long their own leases."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Another worker as its last heartbeat described it."""

    worker_id: str
    heartbeat_at: float
    started_at: float
    period: float
    """Its heartbeat period (its ``lock_timeout / 3``)."""
    workflows: frozenset[str] | None
    """What it registers: its claim keys (schema 27: names, and a pinned workflow's name with the worker's
    version; None: a geste older than schema 9, which claimed any workflow)."""
    relay: bool
    listening: bool
    has_room: bool
    """Whether it ran fewer instances than its concurrency at its last heartbeat."""
    queues: frozenset[str] = frozenset()
    """The queues it serves (schema 23; none in a row written before)."""

    @classmethod
    def from_row(cls, row: WorkerRow, default_lock_timeout: float) -> Peer:
        workflows: frozenset[str] | None = None
        if row.workflows is not None:
            try:
                names = json.loads(row.workflows)
                workflows = frozenset(n for n in names if isinstance(n, str))
            except (ValueError, TypeError):
                workflows = frozenset()
        listening = False
        if row.listener is not None:
            try:
                state: Any = json.loads(row.listener)
                listening = isinstance(state, dict) and state.get("state") == "listening"
            except ValueError:
                listening = False
        queues: frozenset[str] = frozenset()
        if row.queues is not None:
            try:
                served = json.loads(row.queues)
                queues = frozenset(q for q in served if isinstance(q, str))
            except (ValueError, TypeError):
                queues = frozenset()
        return cls(
            worker_id=row.worker_id,
            heartbeat_at=row.heartbeat_at,
            started_at=row.started_at,
            period=(row.lock_timeout or default_lock_timeout) / 3,
            workflows=workflows,
            relay=row.relay,
            listening=listening,
            has_room=row.running < row.concurrency,
            queues=queues,
        )

    def serves(self, workflow: str | None) -> bool:
        return self.workflows is None or (workflow is not None and workflow in self.workflows)


_MASK = (1 << 64) - 1


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=4096)
def _worker_digest(worker_id: str) -> int:
    return _digest(worker_id)


def _mix(x: int) -> int:
    """splitmix64's finaliser: every bit of the input moves every bit of the output."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def score(key: str, worker_id: str) -> int:
    """The rendezvous score of ``worker_id`` for ``key``: the same in every process (no per-process seed).
    A digest of the key (once per decision) mixed with the worker's (cached): routing by hash costs one
    digest and a mix per candidate worker, not a digest per candidate."""
    return _mix(_digest(key) ^ _worker_digest(worker_id))


def _highest(key: str, candidates: Collection[str]) -> str:
    digest = _digest(key)
    return max(candidates, key=lambda w: _mix(digest ^ _worker_digest(w)))


class Router:
    """This worker's view of the live workers, and the rule that picks the one a wake-up goes to."""

    def __init__(
        self,
        worker_id: str,
        *,
        workflows: Callable[[], Collection[str]],
        claim_keys: Callable[[], Collection[str]] | None = None,
        relay: bool,
        lock_timeout: float,
        clock: Callable[[], float],
        schema: str | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.workflows = workflows
        """The workflows this worker registers now, by name (read at each decision: a registration on an
        open App counts at once)."""
        self.claim_keys = claim_keys
        """What it claims (``Runner.claim_keys``: the names, and the pinned ones' runners of its version),
        read only for a pinned instance's key: an unpinned one's key is its name (``workflows``)."""
        self.relay = relay
        self.lock_timeout = lock_timeout
        self.clock = clock
        self.schema = schema
        """The notifications of this schema are this worker's; those of another schema of the database
        (channels are per database) are ignored. None: all."""
        self.peers: dict[str, Peer] = {}

    # -- the view ----------------------------------------------------------------------------------
    def peers_since(self, now: float) -> float:
        """The oldest heartbeat the view reads (``Storage.heartbeat``'s ``peers_since``)."""
        return now - max(PEERS_WINDOW, 3 * self.lock_timeout)

    def update(self, rows: Collection[WorkerRow]) -> None:
        """The other workers, as this worker's heartbeat read them."""
        self.peers = {
            row.worker_id: Peer.from_row(row, self.lock_timeout)
            for row in rows
            if row.worker_id != self.worker_id and row.stopped_at is None
        }

    def routable(self, peer: Peer, now: float) -> bool:
        """Whether ``peer`` may be sent a wake-up: alive by its heartbeat, and listening."""
        stale = max(2 * peer.period, peer.period + self.lock_timeout / 3) + ROUTABLE_SLACK
        return peer.listening and now - peer.heartbeat_at <= stale

    def claims(self, key: str | None) -> bool:
        """Whether this worker claims the instances routed by ``key``: a name it registers (one lookup, as
        before schema 27), or a runner (name U+001F version) among its claim keys: a pinned workflow
        registered by a worker of that version."""
        if key is None:
            return False
        if key in self.workflows():
            return True
        return RUNNER_SEPARATOR in key and self.claim_keys is not None and key in self.claim_keys()

    def _candidates(self, workflow: str | None, avoid: object, now: float) -> list[str]:
        found = [
            p.worker_id
            for p in self.peers.values()
            if p.worker_id != avoid and p.serves(workflow) and self.routable(p, now)
        ]
        if self.worker_id != avoid and self.claims(workflow):
            found.append(self.worker_id)
        return found

    def _chosen(self, key: str, worker: object, workflow: str | None, avoid: object) -> str | None:
        now = self.clock()
        if isinstance(worker, str) and worker != avoid:
            if worker == self.worker_id:
                if self.claims(workflow):
                    return worker
            else:
                peer = self.peers.get(worker)
                if peer is not None and peer.serves(workflow) and self.routable(peer, now):
                    return worker
        candidates = self._candidates(workflow, avoid, now)
        return _highest(key, candidates) if candidates else None

    # -- decisions ---------------------------------------------------------------------------------
    def ours(self, body: Mapping[str, Any]) -> bool:
        """Whether a notification is of this worker's schema (a payload without one: an older geste)."""
        schema = body.get("schema")
        return schema is None or self.schema is None or schema == self.schema

    def target(
        self, instance_id: str, workflow: str | None, worker: object = None, avoid: object = None
    ) -> str | None:
        """The worker the wake-up of ``instance_id`` goes to (None: no routable worker registers it).
        ``workflow`` is the key it is routed by: its name, or a pinned instance's runner."""
        return self._chosen(instance_id, worker, workflow, avoid)

    def mine(
        self, instance_id: str, workflow: str | None, worker: object = None, avoid: object = None
    ) -> bool:
        return self._chosen(instance_id, worker, workflow, avoid) == self.worker_id

    def takes_over(self, instance_id: str, workflow: str | None, keeper: str, heard_at: float) -> bool:
        """A timer kept by ``keeper`` (heard at ``heard_at``) rang: claim it here? Only when its keeper is
        not routable any more, or restarted since (its local timers went with the old process), and the
        wake-up, routed without it, comes here."""
        if keeper == self.worker_id:
            return True
        peer = self.peers.get(keeper)
        if peer is not None and self.routable(peer, self.clock()) and peer.started_at <= heard_at:
            return False
        return self._chosen(instance_id, None, workflow, keeper) == self.worker_id

    def queue_target(self, queue: str, key: str, *, serving: bool, avoid: object = None) -> str | None:
        """The one worker a start onto ``queue`` goes to: the highest rendezvous score of ``key`` (the
        started instance's id: the starts spread over the serving workers) among the routable workers that
        serve the queue, this one included when it does (``serving``), less ``avoid`` (a full worker that
        hands the queue's backlog on). None: no routable worker serves it (the poll net of whichever serves
        it admits the instance)."""
        now = self.clock()
        candidates = [
            p.worker_id
            for p in self.peers.values()
            if queue in p.queues and p.worker_id != avoid and self.routable(p, now)
        ]
        if serving and self.worker_id != avoid:
            candidates.append(self.worker_id)
        return _highest(key, candidates) if candidates else None

    def relay_mine(self, key: str, worker: object = None) -> bool:
        """Whether this process's relay takes an outbox notification: the recording worker's relay when
        it runs one (it was told already), else one relay chosen by ``key``."""
        if not self.relay:
            return False
        if worker == self.worker_id:
            return True
        now = self.clock()
        if isinstance(worker, str):
            peer = self.peers.get(worker)
            if peer is not None and peer.relay and self.routable(peer, now):
                return False
        relays = [p.worker_id for p in self.peers.values() if p.relay and self.routable(p, now)]
        relays.append(self.worker_id)
        return _highest(key, relays) == self.worker_id

    def sole(self) -> bool:
        """Whether no other routable worker registers any workflow this one does: then every instance of
        its workflows is routed here, and the database's next run_at is this worker's to wake for."""
        now = self.clock()
        mine = self.workflows()
        return not any(
            self.routable(p, now) and (p.workflows is None or not p.workflows.isdisjoint(mine))
            for p in self.peers.values()
        )

    def room_elsewhere(self, workflow: str | None) -> bool:
        """Whether another routable worker registers ``workflow`` and had a free slot at its last heartbeat
        (a full worker hands its routed wake-ups on only then)."""
        now = self.clock()
        return any(p.has_room and p.serves(workflow) and self.routable(p, now) for p in self.peers.values())
