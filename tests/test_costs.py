"""The commits a workflow costs, pinned: a change that adds a transaction to the hot path fails here.

Counted by wrapping the storage's write operations (each one transaction), on each backend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import geste
from geste.storage.postgres import PostgresStorage
from geste.storage.sqlite import SQLiteStorage

from .support import count_storage_calls, wait_until

WRITES = ("create_instance", "claim", "renew", "release", "record", "suspend", "finish")


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    return count_storage_calls(monkeypatch, WRITES)


def _three_steps(app: geste.App) -> geste.Workflow[[int], int]:
    @app.activity
    async def step(ctx: geste.ActivityContext, value: int) -> int:
        return value + 1

    @app.workflow
    async def three_steps(ctx: geste.WorkflowContext, value: int) -> int:
        value = await step(ctx, value)
        value = await step(ctx, value)
        return await step(ctx, value)

    return three_steps


async def test_a_three_activity_workflow_started_here_costs_four_commits(
    make_app: Callable[..., geste.App], writes: Counter[str]
) -> None:
    """Start (created already claimed), the first two activities (each committed as the next starts),
    the third with the end; finishing runs claim nothing when nothing waits for a slot."""
    app = make_app(lock_timeout=30.0, poll_interval=30.0)
    workflow = _three_steps(app)
    async with app:
        writes.clear()  # registering and the first claim round of the worker are not the workflow's
        handles = [await workflow.start(i) for i in range(20)]
        assert [await h.result(timeout=30) for h in handles] == [i + 3 for i in range(20)]
        counted = dict(writes)
    # the worker's first claim round, and on PostgreSQL the listener's catch-up once it listens, may fall
    # after the clear: at most 2 claims, whatever the number of instances (not one per finishing run)
    assert counted.pop("claim", 0) <= 2
    assert counted == {"create_instance": 20, "record": 40, "finish": 20}


async def test_a_finishing_run_claims_again_when_work_waits_for_a_slot(
    make_app: Callable[..., geste.App], writes: Counter[str]
) -> None:
    """With one slot, the second instance waits in the database; the first one's end claims it at once
    (a long poll interval: no poll could have found it within the test's deadline)."""
    app = make_app(concurrency=1, poll_interval=60.0)
    workflow = _three_steps(app)
    async with app:
        first, second = await workflow.start(1), await workflow.start(10)
        assert await first.result(timeout=10) == 4
        assert await second.result(timeout=10) == 13
    assert writes["claim"] >= 1


async def test_a_claim_round_is_one_round_trip(
    make_app: Callable[..., geste.App], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that takes less than it asked for says when to look again: the worker never runs a
    second query for the next run_at (it did, one more round trip per claim round)."""
    asked: list[str] = []
    for cls in (SQLiteStorage, PostgresStorage):

        async def next_run_at(self: Any) -> float | None:
            asked.append("next_run_at")
            return None

        monkeypatch.setattr(cls, "next_run_at", next_run_at)
    app = make_app(run_worker=False)
    workflow = _three_steps(app)
    async with app:
        handles = [await workflow.start(i) for i in range(3)]  # created unclaimed: the worker claims them
    worker = make_app(concurrency=10)
    _three_steps(worker)
    async with worker:
        for i, handle in enumerate(handles):
            assert await worker.get_handle(handle.instance_id).result(timeout=10) == i + 3
        assert worker._worker is not None and worker._worker.claim_rounds >= 1
    assert asked == []


async def test_awaiting_a_result_completed_here_reads_nothing(
    make_app: Callable[..., geste.App], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine hands a completion's committed result to the App: ``result()`` of an instance this
    process completed needs no read. Large results, and the oldest past the bound, are read again."""
    import geste._client

    reads: list[str] = []
    for cls in (SQLiteStorage, PostgresStorage):
        original = cls.get_instance

        async def get_instance(self: Any, instance_id: str, original: Any = original) -> Any:
            reads.append(instance_id)
            return await original(self, instance_id)

        monkeypatch.setattr(cls, "get_instance", get_instance)
    monkeypatch.setattr(geste._client, "COMPLETED_KEPT", 3)
    app = make_app()

    @app.workflow
    async def echo(ctx: geste.WorkflowContext, value: str) -> dict[str, str]:
        return {"echo": value}

    async with app:
        small = []
        for i in range(4):  # one after the other: completed in this order
            small.append(await echo.start(str(i)))
            await _wait_ended(app, small[-1].instance_id)
        big = await echo.start("x" * 3000)
        await _wait_ended(app, big.instance_id)
        reads.clear()
        assert [await h.result(timeout=10) for h in small[1:]] == [{"echo": str(i)} for i in range(1, 4)]
        assert reads == []  # the latest three, kept
        assert await small[0].result(timeout=10) == {"echo": "0"}  # dropped from the bound: read
        assert await big.result(timeout=10) == {"echo": "x" * 3000}  # too large to keep: read
        assert reads == [small[0].instance_id, big.instance_id]


async def _wait_ended(app: geste.App, instance_id: str) -> None:
    """Until the instance ended (seen through the listing, which is not ``get_instance``)."""

    async def ended() -> bool:
        rows = await app.storage.list_instances(limit=10_000)
        return any(r.instance_id == instance_id and r.status.is_finished for r in rows)

    await wait_until(ended, f"{instance_id} ended")
