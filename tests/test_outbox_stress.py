"""A stress test of the outbox relay on PostgreSQL: several relays (Apps) deliver the events of many
instances to a handler that fails at random, sometimes slowly (past ``outbox_timeout``), while an operator
re-queues and discards events, and one relay dies with deliveries in flight (its claims expire and are
taken over). Checked: one sender at a time per event, per-instance order, at-least-once, and that every
event ends delivered or discarded, none left held with nothing before it.

``GESTE_OUTBOX_STRESS=N`` multiplies the load (instances and duration)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest

import geste
from tests.support import raw_query, wait_until
from tests.test_outbox import register_waiting

SCALE = int(os.environ.get("GESTE_OUTBOX_STRESS", "1"))

WATCH = """
SELECT (SELECT array_agg(o.event_id) FROM {t} o
        WHERE o.status = 'pending' AND o.next_attempt_at IS NULL
          AND NOT EXISTS (SELECT 1 FROM {t} e
                          WHERE e.instance_id = o.instance_id AND e.step_seq < o.step_seq
                            AND e.status IN ('pending', 'dead'))) AS orphans,
       (SELECT count(*) FROM {t} WHERE status = 'pending' AND next_attempt_at IS NULL) AS held
"""
"""One snapshot: the events held (next_attempt_at NULL) with no earlier event of their instance left to
wait for (nobody would make them due: stuck), and how many are held."""


@dataclass
class Call:
    event_id: str
    instance_id: str
    i: int
    relay: int
    start: float
    end: float | None = None
    ok: bool = False


@dataclass
class Load:
    seed: int
    failing: float = 0.25
    calls: list[Call] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    overlaps: list[str] = field(default_factory=list)
    discarded_at: dict[str, float] = field(default_factory=dict)
    """Event id -> when the discard that succeeded was asked (before it committed)."""
    retried: int = 0
    hung: set[int] = field(default_factory=set)

    def handler(self, relay: int) -> Any:
        rng = random.Random(self.seed * 100 + relay)

        async def deliver(event: geste.OutboxEvent) -> None:
            call = Call(event.event_id, event.instance_id, event.data["i"], relay, time.monotonic())
            self.calls.append(call)
            self.in_flight[event.event_id] += 1
            if self.in_flight[event.event_id] > 1:
                self.overlaps.append(event.event_id)
            try:
                if relay in self.hung:  # this relay is about to die: its deliveries never end
                    await asyncio.Event().wait()
                roll = rng.random()
                if roll < 0.02:
                    await asyncio.sleep(0.7)  # past outbox_timeout: cancelled, a failed attempt
                elif roll < 0.12:
                    await asyncio.sleep(rng.uniform(0.02, 0.15))
                else:
                    await asyncio.sleep(rng.uniform(0, 0.02))
                if rng.random() < self.failing:
                    raise ConnectionError("refused at random")
                call.ok = True
            finally:
                call.end = time.monotonic()
                self.in_flight[event.event_id] -= 1

        return deliver


@pytest.mark.parametrize("window, slots", [(1000, 100), (16, 4)], ids=["defaults", "narrow"])
async def test_many_relays_failures_retries_discards_and_a_dead_relay(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, window: int, slots: int
) -> None:
    """``narrow``: a claim round reads 16 due events and a relay sends 4 at once, so that rounds often
    find the window full (of events being sent, or waiting) and relays full."""
    import geste.runtime.relay

    monkeypatch.setattr(geste.runtime.relay, "CLAIM_WINDOW", window)
    monkeypatch.setattr(geste.runtime.relay, "MAX_IN_FLIGHT", slots)
    seed = int(os.environ.get("GESTE_OUTBOX_STRESS_SEED", str(random.randrange(1 << 30))))
    print(f"seed {seed}")
    rng = random.Random(seed)
    load = Load(seed)
    relays, instances, doomed = 4, 100 * SCALE, 3
    apps = [
        geste.App(
            pg_url,
            worker_id=f"relay-{n}",
            outbox_handler=load.handler(n),
            outbox_max_attempts=2,  # dead events, re-queued or discarded by the operator below
            outbox_initial_backoff=0.02,
            outbox_max_backoff=0.1,
            outbox_timeout=0.5,
            lock_timeout=1.0,  # a dead relay's claims expire after 1.5 s
            poll_interval=0.05,
            shutdown_grace=1.0,
        )
        for n in range(relays)
    ]
    emits = [register_waiting(app) for app in apps]
    table = f"{pg_url.split('schema=')[1]}.geste_outbox"
    orphans_seen: list[list[str]] = []
    held: list[int] = []
    stop_operator = asyncio.Event()

    async def operator() -> None:
        app = apps[0]
        while not stop_operator.is_set():
            for entry in await app.outbox(status="dead", limit=10_000):
                if rng.random() < 0.75:
                    load.retried += await app.retry_outbox_event(entry.event_id)
                else:
                    asked = time.monotonic()
                    if await app.discard_outbox_event(entry.event_id):
                        load.discarded_at[entry.event_id] = asked
            if rng.random() < 0.3:  # now and then a pending one, maybe being sent at that moment
                pending = await app.outbox(status="pending", limit=10_000)
                if pending:
                    victim = rng.choice(pending)
                    asked = time.monotonic()
                    if await app.discard_outbox_event(victim.event_id):
                        load.discarded_at[victim.event_id] = asked
            [row] = await raw_query(pg_url, WATCH.format(t=table))
            if row["orphans"]:
                orphans_seen.append(row["orphans"])
            held.append(row["held"])
            await asyncio.sleep(rng.uniform(0.005, 0.05))

    async with apps[0], apps[1], apps[2], apps[3]:
        watcher = asyncio.create_task(operator())
        handles = [await emits[n % relays].start_with_id(f"s-{n}", 6, n % 2 == 0) for n in range(instances)]
        await wait_until(lambda: sum(c.ok for c in load.calls) > instances, "a part delivered", timeout=30)
        load.hung.add(doomed)  # relay 3's deliveries hang from now on, then it dies with them in flight
        await wait_until(lambda: len(apps[doomed]._relay._inflight) >= 3, "deliveries hanging", timeout=30)
        in_flight_at_death = len(apps[doomed]._relay._inflight)
        apps[doomed]._relay.abort()
        await apps[0].send_event("more")  # half of the instances emit 6 more events
        ids = [eid for h in handles for eid in await h.result(timeout=60)]
        await asyncio.sleep(1.0 * SCALE)
        load.failing = 0.0  # the destination heals; the operator re-queues what is still dead

        async def done() -> bool:
            entries = await apps[0].outbox(limit=10_000)
            return len(entries) == len(ids) and all(
                e.status in (geste.OutboxStatus.DELIVERED, geste.OutboxStatus.DISCARDED) for e in entries
            )

        try:
            await wait_until(done, "every event delivered or discarded", timeout=60)
        finally:
            stop_operator.set()
            await watcher
            entries = {e.event_id: e for e in await apps[0].outbox(limit=10_000)}
            left = [e for e in entries.values() if e.status not in ("delivered", "discarded")]
            print(
                f"{len(ids)} events, {len(load.calls)} calls, {sum(c.ok for c in load.calls)} ok, "
                f"{len(load.discarded_at)} discarded, {load.retried} re-queued, "
                f"{in_flight_at_death} in flight at the relay's death; left: "
                + ", ".join(f"{e.event_id} {e.status} {e.next_attempt_at} {e.claimed_by}" for e in left[:20])
            )

    assert not orphans_seen, orphans_seen[:5]  # never a held event with nothing before it
    assert not load.overlaps, load.overlaps[:10]  # one sender at a time
    assert in_flight_at_death > 0
    statuses = Counter(e.status for e in entries.values())
    assert set(statuses) <= {"delivered", "discarded"}, statuses
    ok_calls: dict[str, list[Call]] = defaultdict(list)
    for call in load.calls:
        if call.ok:
            ok_calls[call.event_id].append(call)
    for event_id, entry in entries.items():  # at least once
        if entry.status == "delivered":
            assert ok_calls[event_id], f"{event_id} delivered without a successful call"
        else:
            assert event_id in load.discarded_at
    # order: each call of an event starts after every earlier event of its instance was delivered (a
    # successful call had ended) or its discard had been asked
    by_instance: dict[str, dict[int, str]] = defaultdict(dict)
    for entry in entries.values():
        by_instance[entry.instance_id][entry.seq] = entry.event_id
    index = {e.event_id: sorted(by_instance[e.instance_id]).index(e.seq) for e in entries.values()}
    for call in load.calls:
        entry = entries[call.event_id]
        before = [by_instance[entry.instance_id][s] for s in sorted(by_instance[entry.instance_id])]
        for earlier in before[: index[call.event_id]]:
            delivered = any(c.end is not None and c.end <= call.start for c in ok_calls[earlier])
            discarded = load.discarded_at.get(earlier, float("inf")) <= call.start
            assert delivered or discarded, f"{call.event_id} sent before {earlier} was done"
    # among the delivered events of an instance, the first deliveries are in the emitted order
    for events in by_instance.values():
        firsts = [
            min(c.end for c in ok_calls[eid])
            for _, eid in sorted(events.items())
            if entries[eid].status == "delivered"
        ]
        assert firsts == sorted(firsts)
    duplicates = sum(len(ok_calls[eid]) - 1 for eid, e in entries.items() if e.status == "delivered")
    twice = {
        eid: [c.relay for c in ok_calls[eid]]
        for eid, e in entries.items()
        if e.status == "delivered" and len(ok_calls[eid]) > 1
    }
    print(
        f"statuses {dict(statuses)}, delivered more than once: {duplicates} {twice}, "
        f"attempts by relay: {dict(Counter(c.relay for c in load.calls))}, held at most {max(held)}"
    )
