"""The storage contract: what every backend of ``geste.storage.Storage`` must do, stated once at the
interface and run against each backend (a SQLite file, PostgreSQL; a new backend adds its URL to the
``db_url`` fixture and passes this module before anything else).

These are the promises the engine and the runtime build on, each in the terms of the interface, with no
SQL and no knowledge of tables: an instance is created once per id; one lease at a time, taken over only
once it has run out; a commit under a lease appends exactly its rows, in order, and renews the lease; a
suspension is invisible to claims until it is due; an event wakes the instance waiting for it, once, and
is delivered into its history; an end is final and leaves nothing to claim. Finer behaviours (fencing of
every write, queues, channels, outbox, schedules) have modules of their own, also on every backend.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest

from geste import Status
from geste.storage import Storage, create_storage
from geste.storage.base import (
    Claim,
    Commit,
    EventWait,
    HistoryRow,
    LeaseLost,
    NewEvent,
    NewInstance,
    StoredEvent,
    Suspension,
)

INPUT = '{"args":[],"kwargs":{}}'
WORKFLOWS = ["wf"]


@pytest.fixture
async def storage(db_url: str) -> AsyncIterator[Storage]:
    opened = create_storage(db_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def other(db_url: str) -> AsyncIterator[Storage]:
    """A second storage on the same database: another worker process's."""
    opened = create_storage(db_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def step(seq: int, now: float, name: str = "work", result: object = None) -> HistoryRow:
    return HistoryRow(seq, "activity", name, json.dumps({"result": result}), False, now)


async def new(storage: Storage, instance_id: str, now: float) -> None:
    await storage.create_instance(
        NewInstance(instance_id, "wf", INPUT, now), lease=None, worker_id=None, lock_expires_at=None
    )


async def claimed(storage: Storage) -> tuple[float, Claim]:
    """Now, and instance ``a`` created then claimed by worker ``A`` until now + 10."""
    t = time.time()
    await new(storage, "a", t)
    (claim,) = await storage.claim("A", t, t + 10, 10, workflows=WORKFLOWS)
    return t, claim


async def test_an_instance_is_created_once_per_id(storage: Storage) -> None:
    t = time.time()
    row, created = await storage.create_instance(
        NewInstance("a", "wf", INPUT, t), lease=None, worker_id=None, lock_expires_at=None
    )
    assert created and row.instance_id == "a" and row.status == Status.PENDING and row.input == INPUT
    again, created = await storage.create_instance(
        NewInstance("a", "other", '{"args":[1],"kwargs":{}}', t + 1),
        lease=None,
        worker_id=None,
        lock_expires_at=None,
    )
    assert not created and again.workflow_name == "wf" and again.input == INPUT  # the first one, untouched
    assert await storage.get_instance("missing") is None
    assert await storage.get_history("a") == []


async def test_one_lease_at_a_time_taken_over_only_once_it_has_run_out(
    storage: Storage, other: Storage
) -> None:
    t = time.time()
    await new(storage, "a", t)
    (mine,) = await storage.claim("A", t, t + 10, 10, workflows=WORKFLOWS)
    assert mine.lease.instance_id == "a" and mine.workflow_name == "wf" and mine.input == INPUT
    assert list(await other.claim("B", t + 5, t + 15, 10, workflows=WORKFLOWS)) == []  # held
    assert list(await other.claim_ids("B", t + 5, t + 15, ["a"], workflows=WORKFLOWS)) == []
    assert await storage.renew([mine.lease], t + 20, now=t + 5) == {"a"}  # renewed: still held at t + 15
    assert list(await other.claim("B", t + 15, t + 25, 10, workflows=WORKFLOWS)) == []
    (theirs,) = await other.claim("B", t + 21, t + 40, 10, workflows=WORKFLOWS)  # ran out: taken over
    assert theirs.lease != mine.lease and theirs.lease_expired_at is not None
    assert await storage.renew([mine.lease], t + 50, now=t + 22) == set()  # the old lease is gone
    info = await storage.get_instance("a")
    assert info is not None and info.locked_by == "B" and info.lock_expires_at == t + 40


async def test_a_claim_takes_only_its_workflows_and_at_most_its_limit(storage: Storage) -> None:
    t = time.time()
    for n in range(5):
        await new(storage, f"a{n}", t)
    await storage.create_instance(
        NewInstance("z", "elsewhere", INPUT, t), lease=None, worker_id=None, lock_expires_at=None
    )
    first = await storage.claim("A", t, t + 10, 3, workflows=WORKFLOWS)
    rest = await storage.claim("A", t, t + 10, 10, workflows=WORKFLOWS)
    taken = [c.lease.instance_id for c in [*first, *rest]]
    assert len(first) == 3 and sorted(taken) == [f"a{n}" for n in range(5)]  # each once
    assert list(await storage.claim("A", t, t + 10, 10, workflows=WORKFLOWS)) == []
    (z,) = await storage.claim("A", t, t + 10, 10, workflows=["elsewhere"])
    assert z.lease.instance_id == "z"


async def test_a_commit_appends_its_rows_in_order_and_a_claim_returns_them(
    storage: Storage, other: Storage
) -> None:
    t, claim = await claimed(storage)
    await storage.record(Commit(claim.lease, [step(1, t, "one", 1), step(2, t, "two", 2)], t, t + 10))
    await storage.record(Commit(claim.lease, [step(3, t, "three", 3)], t, t + 10))
    history = await storage.get_history("a")
    assert [(r.seq, r.name, json.loads(r.payload)) for r in history] == [
        (1, "one", {"result": 1}),
        (2, "two", {"result": 2}),
        (3, "three", {"result": 3}),
    ]
    info = await storage.get_instance("a")
    assert info is not None and info.steps == 3
    with pytest.raises(Exception):  # noqa: B017 - a seq written twice is refused, whatever the driver's error
        await storage.record(Commit(claim.lease, [step(3, t, "again")], t, t + 10))
    assert [r.name for r in await storage.get_history("a")] == ["one", "two", "three"]
    await storage.release([claim.lease], t)
    (again,) = await other.claim("B", t + 1, t + 10, 10, workflows=WORKFLOWS)  # released: at once
    assert again.history is not None and [r.name for r in again.history] == ["one", "two", "three"]


async def test_a_suspension_is_invisible_to_claims_until_it_is_due(storage: Storage) -> None:
    t, claim = await claimed(storage)
    outcome = await storage.suspend(
        Commit(claim.lease, [step(1, t, "before")], t), run_at=t + 100, timer=(2, t + 100)
    )
    assert outcome is Suspension.SUSPENDED
    info = await storage.get_instance("a")
    assert info is not None and info.status == Status.WAITING and info.locked_by is None
    early = await storage.claim("A", t + 50, t + 60, 10, workflows=WORKFLOWS)
    assert list(early) == [] and early.next_run_at == t + 100  # what to sleep until, in the same read
    (due,) = await storage.claim("A", t + 100, t + 110, 10, workflows=WORKFLOWS)
    assert due.lease.instance_id == "a"


async def test_an_event_wakes_its_waiter_once_and_lands_in_its_history(
    storage: Storage, other: Storage
) -> None:
    t, claim = await claimed(storage)
    waited = await storage.take_event_or_suspend(
        Commit(claim.lease, [], t + 1), EventWait("paid", {"order": "o-1"}, None, 1)
    )
    assert waited is Suspension.SUSPENDED
    assert list(await storage.claim("A", t + 2, t + 10, 10, workflows=WORKFLOWS)) == []  # asleep
    created, woken = await other.send_event(
        NewEvent("e0", "paid", '{"order": "o-2"}', None, None, None, t + 3)
    )
    assert created and woken == []  # another order's: no match
    created, woken = await other.send_event(
        NewEvent("e1", "paid", '{"order": "o-1"}', None, None, None, t + 4)
    )
    assert created and woken == ["a"]
    created, woken = await other.send_event(
        NewEvent("e1", "paid", '{"order": "o-1"}', None, None, None, t + 5)
    )
    assert not created and woken == []  # a duplicate delivery: nothing happens twice
    (resumed,) = await storage.claim("A", t + 6, t + 20, 10, workflows=WORKFLOWS)
    assert resumed.history is not None
    (event_row,) = [r for r in resumed.history if r.seq == 1]
    assert event_row.kind == "event" and json.loads(event_row.payload)["event_id"] == "e1"


async def test_an_event_sent_before_the_wait_is_taken_without_sleeping(
    storage: Storage, other: Storage
) -> None:
    t = time.time()
    await new(storage, "a", t)
    await other.send_event(NewEvent("e1", "paid", '{"order": "o-1"}', None, None, None, t + 1))
    (claim,) = await storage.claim("A", t + 2, t + 10, 10, workflows=WORKFLOWS)
    taken = await storage.take_event_or_suspend(
        Commit(claim.lease, [], t + 2, t + 10), EventWait("paid", {"order": "o-1"}, None, 1)
    )
    assert (
        isinstance(taken, StoredEvent)
        and taken.event_id == "e1"
        and json.loads(taken.data) == {"order": "o-1"}
    )


async def test_an_end_is_final_and_leaves_nothing_to_claim(storage: Storage, other: Storage) -> None:
    t, claim = await claimed(storage)
    await storage.finish(Commit(claim.lease, [step(1, t)], t + 1), status=Status.COMPLETED, result='"done"')
    info = await other.get_instance("a")
    assert info is not None and info.status == Status.COMPLETED and info.result == '"done"'
    assert info.finished_at is not None and info.locked_by is None
    assert list(await other.claim("B", t + 1000, t + 1010, 10, workflows=WORKFLOWS)) == []
    with pytest.raises(LeaseLost):  # the ended lease records nothing more
        await storage.record(Commit(claim.lease, [step(2, t + 2)], t + 2, t + 10))
    created, woken = await other.send_event(NewEvent("e1", "paid", "{}", None, None, None, t + 3))
    assert created and woken == []
    assert [r.seq for r in await other.get_history("a")] == [1]
