"""Group commit: concurrent instances' step commits share one statement and one commit on PostgreSQL,
and each caller still gets its own outcome (its lease lost, its cancel flag, its own error)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

import geste
from geste import Status
from geste.errors import StorageError
from geste.storage._group_commit import GroupCommit
from geste.storage.base import Commit, HistoryRow, Lease, LeaseLost, NewInstance
from geste.storage.postgres import PostgresStorage


# -- the batching itself ------------------------------------------------------------------------------
async def test_calls_made_while_a_batch_is_in_flight_leave_together() -> None:
    batches: list[list[int]] = []
    gate = asyncio.Event()

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        batches.append(list(items))
        if len(batches) == 1:
            await gate.wait()
        return [item * 10 for item in items]

    group: GroupCommit[int, int] = GroupCommit(flush, max_in_flight=1, max_batch=100)
    first = asyncio.create_task(group.submit(0))
    await asyncio.sleep(0)  # the first call goes at once, alone
    others = [asyncio.create_task(group.submit(n)) for n in range(1, 6)]
    await asyncio.sleep(0)
    gate.set()
    assert await first == 0 and [await o for o in others] == [10, 20, 30, 40, 50]
    assert batches == [[0], [1, 2, 3, 4, 5]]


async def test_each_caller_gets_its_own_outcome_and_a_failed_batch_fails_its_callers_only() -> None:
    calls = 0

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise StorageError("this batch failed")
        return [ValueError(str(item)) if item < 0 else item for item in items]

    group: GroupCommit[int, int] = GroupCommit(flush, max_in_flight=1, max_batch=100)
    with pytest.raises(ValueError, match="-1"):
        await group.submit(-1)
    with pytest.raises(StorageError):
        await group.submit(1)
    assert await group.submit(2) == 2


async def test_batches_hold_at_most_max_batch_items() -> None:
    sizes: list[int] = []

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        sizes.append(len(items))
        await asyncio.sleep(0)
        return list(items)

    group: GroupCommit[int, int] = GroupCommit(flush, max_in_flight=1, max_batch=3)
    assert await asyncio.gather(*(group.submit(n) for n in range(10))) == list(range(10))
    assert max(sizes) == 3 and sum(sizes) == 10


# -- through a workflow, on each backend -------------------------------------------------------------------
async def test_steps_count_every_row_when_one_instance_commits_twice_in_a_batch(
    make_app: Callable[..., geste.App],
) -> None:
    """A gather of activity chains: each chain's next activity commits the previous one's row, so one
    instance queues several step commits while a batch is in flight, and they leave together. ``steps``
    must still be the number of history rows (on PostgreSQL one ``UPDATE ... FROM`` applied only one of
    an instance's input rows)."""
    app = make_app()

    @app.activity
    async def step(ctx: geste.ActivityContext, chain: int, n: int) -> int:
        return chain * 10 + n

    @app.workflow
    async def fan(ctx: geste.WorkflowContext) -> list[list[int]]:
        async def chain(c: int) -> list[int]:
            return [await step(ctx, c, n) for n in range(4)]

        return list(await asyncio.gather(*(chain(c) for c in range(5))))

    batches: list[list[str]] = []
    async with app:
        records = getattr(app.storage, "_records", None)  # PostgreSQL's group commit of step commits
        if records is not None:
            flush = records._flush

            async def spy(items: Sequence[Any]) -> Any:
                batches.append([item.lease.instance_id for item in items])
                return await flush(items)

            records._flush = spy
        handle = await fan.start()
        assert await handle.result(timeout=20) == [[c * 10 + n for n in range(4)] for c in range(5)]
        history = await handle.history()
        info = await handle.info()

    assert len(history) == 20 and sorted(e.seq for e in history) == list(range(1, 21))
    assert info.steps == len(history)
    if records is not None:  # the case under test did happen: one instance twice in one statement
        assert any(len(batch) > len(set(batch)) for batch in batches), batches


# -- on PostgreSQL -------------------------------------------------------------------------------------------
@pytest.fixture
async def storage(pg_url: str) -> AsyncIterator[PostgresStorage]:
    s = PostgresStorage(pg_url)
    await s.open()
    yield s
    await s.close()


async def _claimed(storage: PostgresStorage, count: int) -> list[Lease]:
    """``count`` instances created already claimed, with their leases."""
    leases = []
    for n in range(count):
        lease = Lease(f"i{n}", uuid.uuid4().hex)
        await storage.create_instance(
            NewInstance(lease.instance_id, "w", "{}", 1.0), lease=lease, worker_id="me", lock_expires_at=1e12
        )
        leases.append(lease)
    return leases


def _row(seq: int) -> tuple[HistoryRow, ...]:
    return (HistoryRow(seq, "activity", "step", '{"result": 1}', False, 1.0),)


async def test_concurrent_step_commits_share_statements_and_keep_their_own_outcomes(
    storage: PostgresStorage,
) -> None:
    leases = await _claimed(storage, 30)
    stolen = leases[7]
    wrong = Lease(stolen.instance_id, "not-the-lease")
    before = storage.step_commits
    results = await asyncio.gather(
        *(
            storage.record(Commit(wrong if lease is stolen else lease, _row(1), 2.0, 1e12))
            for lease in leases
        ),
        return_exceptions=True,
    )
    assert storage.step_commits - before <= 2  # one alone, then the 29 that queued meanwhile, together
    assert isinstance(results[7], LeaseLost)
    assert all(
        not isinstance(r, BaseException) and r.cancel_requested is False
        for i, r in enumerate(results)
        if i != 7
    )
    for n, lease in enumerate(leases):
        history = await storage.get_history(lease.instance_id)
        assert [r.seq for r in history] == ([] if n == 7 else [1])


async def test_a_batch_that_fails_is_split_so_neighbours_still_commit(storage: PostgresStorage) -> None:
    """One instance's rows violate the history's key (its seq 1 is there already): the batch statement
    fails; each step is then committed alone, and only that instance gets the error."""
    leases = await _claimed(storage, 10)
    await storage.record(Commit(leases[3], _row(1), 2.0, 1e12))
    results = await asyncio.gather(
        *(storage.record(Commit(lease, _row(1), 2.0, 1e12)) for lease in leases),
        return_exceptions=True,
    )
    assert isinstance(results[3], StorageError)
    assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 3)
    for lease in leases:
        assert [r.seq for r in await storage.get_history(lease.instance_id)] == [1]


async def test_concurrent_ends_share_statements_and_keep_their_own_outcomes(storage: PostgresStorage) -> None:
    leases = await _claimed(storage, 20)
    await storage.suspend(Commit(leases[2], (), 2.0), run_at=50.0, timer=(1, 50.0))  # leaves a timer, then
    leases[2] = (await storage.claim("me", 60.0, 1e12, 1, workflows=["w"]))[
        0
    ].lease  # claimed back under a new lease
    wrong = Lease(leases[5].instance_id, "not-the-lease")
    before = storage.step_commits
    results = await asyncio.gather(
        *(
            storage.finish(
                Commit(wrong if n == 5 else lease, _row(9), 3.0), status=Status.COMPLETED, result=f'"{n}"'
            )
            for n, lease in enumerate(leases)
        ),
        return_exceptions=True,
    )
    assert storage.step_commits - before <= 2
    assert isinstance(results[5], LeaseLost)
    assert all(r is None for n, r in enumerate(results) if n != 5)
    for n, lease in enumerate(leases):
        row = await storage.get_instance(lease.instance_id)
        assert row is not None
        if n == 5:
            assert row.status == Status.RUNNING and list(await storage.get_history(lease.instance_id)) == []
        else:
            assert (row.status, row.result, row.locked_by) == (Status.COMPLETED, f'"{n}"', None)
            assert [r.seq for r in await storage.get_history(lease.instance_id)][-1] == 9
    assert await storage.next_run_at() is None  # the ended instance's timer went with it


async def test_one_instance_twice_in_a_batch_adds_up_its_steps(storage: PostgresStorage) -> None:
    """Several step commits of one instance queued behind a batch leave in one statement: every row is
    counted in ``steps``, the lease ends renewed to the latest expiry, the compensating status sticks."""
    (lease, other) = await _claimed(storage, 2)
    first = asyncio.create_task(storage.record(Commit(other, _row(1), 2.0, 100.0)))
    await asyncio.sleep(0)  # it goes alone; what follows queues behind it, then leaves together
    before = storage.step_commits
    rows = [HistoryRow(seq, "activity", "step", "{}", False, 2.0) for seq in range(1, 6)]
    results = await asyncio.gather(
        storage.record(Commit(lease, rows[0:2], 2.0, 200.0)),
        storage.record(Commit(lease, rows[2:3], 3.0, 300.0), status=Status.COMPENSATING),
        storage.record(Commit(lease, rows[3:5], 2.5, 250.0)),
        storage.record(Commit(other, _row(2), 2.0, 100.0)),
    )
    await first
    assert storage.step_commits - before == 2  # the first alone, then the four in one statement
    assert all(r.cancel_requested is False for r in results)
    row = await storage.get_instance(lease.instance_id)
    assert row is not None
    assert (row.steps, row.lock_expires_at, row.updated_at, row.status) == (
        5,
        300.0,
        3.0,
        Status.COMPENSATING,
    )
    assert [r.seq for r in await storage.get_history(lease.instance_id)] == [1, 2, 3, 4, 5]
    other_row = await storage.get_instance(other.instance_id)
    assert other_row is not None and other_row.steps == 2


async def test_a_stale_lease_beside_the_live_one_in_a_batch_is_lost_and_writes_nothing(
    storage: PostgresStorage,
) -> None:
    """Two runs of one instance, one under a lease that is gone, commit in one statement: only the live
    lease's rows and values are written, and the stale caller learns its lease is lost."""
    (lease, other) = await _claimed(storage, 2)
    stale = Lease(lease.instance_id, "gone")
    first = asyncio.create_task(storage.record(Commit(other, _row(1), 2.0, 100.0)))
    await asyncio.sleep(0)
    results = await asyncio.gather(
        storage.record(Commit(stale, (HistoryRow(7, "activity", "stale", "{}", False, 2.0),), 9.0, 900.0)),
        storage.record(Commit(lease, _row(1), 2.0, 200.0)),
        return_exceptions=True,
    )
    await first
    assert isinstance(results[0], LeaseLost) and not isinstance(results[1], BaseException)
    row = await storage.get_instance(lease.instance_id)
    assert row is not None and (row.steps, row.lock_expires_at) == (1, 200.0)
    assert [r.seq for r in await storage.get_history(lease.instance_id)] == [1]

    first = asyncio.create_task(storage.finish(Commit(other, (), 3.0), status=Status.COMPLETED, result='"o"'))
    await asyncio.sleep(0)
    ends = await asyncio.gather(
        storage.finish(Commit(stale, _row(8), 3.0), status=Status.FAILED, error='"stale"'),
        storage.finish(Commit(lease, _row(2), 3.0), status=Status.COMPLETED, result='"live"'),
        return_exceptions=True,
    )
    await first
    assert isinstance(ends[0], LeaseLost) and ends[1] is None
    row = await storage.get_instance(lease.instance_id)
    assert row is not None and (row.status, row.result, row.steps) == (Status.COMPLETED, '"live"', 2)
    assert [r.seq for r in await storage.get_history(lease.instance_id)] == [1, 2]
