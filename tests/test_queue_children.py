"""Children started onto a queue from a workflow (``ctx.start_child(wf.options(queue=...))``, schema 20),
on each backend: the queue's limit holds for them, the start is a recorded step (a replay in another App,
with nothing in memory, starts nothing again), and a held dedup id is a recorded ``QueueDeduplicated``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import geste
from geste.errors import QueueDeduplicated

from .support import raw_query, wait_until

MakeApp = Callable[..., geste.App]


def declare(app: geste.App, log: list[tuple[str, int]]) -> dict[str, Any]:
    """The workflows of these tests on ``app``; ``log`` gets ("start" | "end", x) of each child's work."""

    @app.activity()
    async def work(ctx: geste.ActivityContext, x: int) -> int:
        log.append(("start", x))
        await asyncio.sleep(0.02)  # room for another child to start meanwhile, were it admitted
        log.append(("end", x))
        return x

    @app.workflow()
    async def child(ctx: geste.WorkflowContext, x: int) -> int:
        return await work(ctx, x)

    @app.workflow()
    async def fan_out(ctx: geste.WorkflowContext, n: int) -> list[int]:
        handles = [await ctx.start_child(child.options(queue="one"), x) for x in range(n)]
        return [await h.result() for h in handles]

    @app.workflow()
    async def starts_then_waits(ctx: geste.WorkflowContext) -> int:
        handle = await ctx.start_child(child.options(queue="one", dedup_id="only"), 7)
        await ctx.wait_event("go")
        return await handle.result() + await ctx.run_child(child.options(queue="one"), 1)

    @app.workflow()
    async def deduplicated(ctx: geste.WorkflowContext) -> list[str]:
        try:
            await ctx.start_child(child.options(queue="one", dedup_id="held"), 9)
        except QueueDeduplicated as exc:
            caught = [exc.queue, exc.dedup_id, exc.instance_id]
        else:
            caught = ["started"]
        await ctx.wait_event("go")
        return caught

    return {"child": child, "fan_out": fan_out, "starts_then_waits": starts_then_waits, "dedup": deduplicated}


def most_at_once(log: list[tuple[str, int]]) -> int:
    running = peak = 0
    for what, _ in log:
        running += 1 if what == "start" else -1
        peak = max(peak, running)
    return peak


async def children_of(url: str, parent: str) -> list[dict[str, Any]]:
    return [
        dict(row)
        for row in await raw_query(
            url, "SELECT instance_id, queue, status FROM geste_instances WHERE parent_id = $1", parent
        )
    ]


async def test_children_started_onto_a_queue_keep_to_its_limit(make_app: MakeApp, db_url: str) -> None:
    log: list[tuple[str, int]] = []
    app = make_app(queues=[geste.Queue("one", concurrency=1)])
    flows = declare(app, log)
    async with app:
        handle = await flows["fan_out"].start(6)
        assert sorted(await handle.result(timeout=60)) == list(range(6))
    assert most_at_once(log) == 1  # one child at a time, as the queue's limit says
    assert [x for what, x in log if what == "start"] == list(range(6))  # first come, first served
    children = await children_of(db_url, handle.instance_id)
    assert len(children) == 6 and {c["queue"] for c in children} == {"one"}


async def test_a_child_start_onto_a_queue_is_recorded_and_never_repeated(
    make_app: MakeApp, db_url: str
) -> None:
    """The parent starts a child onto a queue no worker serves yet, then waits; a new App (nothing in
    memory: the parent replays its history) serves the queue: the child runs once, the replayed start
    starts nothing (its dedup id would refuse a second start too, and the step would fail)."""
    log: list[tuple[str, int]] = []
    first = make_app()  # serves no queue: the child stays queued
    flows = declare(first, log)
    async with first:
        handle = await flows["starts_then_waits"].start()

        async def waits() -> bool:
            return (await first.get_instance(handle.instance_id)).status == geste.Status.WAITING

        await wait_until(waits, "the parent to wait for its event")
        children = await children_of(db_url, handle.instance_id)
        assert [(c["queue"], c["status"]) for c in children] == [("one", "pending")]  # queued, not run
    second = make_app(queues=[geste.Queue("one", concurrency=1)])
    flows = declare(second, log)
    async with second:
        await second.send_event("go", instance_id=handle.instance_id)
        assert await second.get_handle(handle.instance_id).result(timeout=60) == 8
    children = await children_of(db_url, handle.instance_id)
    assert len(children) == 2 and {c["status"] for c in children} == {"completed"}
    assert [x for what, x in log if what == "start"] == [7, 1]


async def test_a_held_dedup_id_is_a_recorded_error_of_the_child_start(make_app: MakeApp, db_url: str) -> None:
    """An unfinished instance of the queue holds the dedup id: the child start raises
    ``QueueDeduplicated`` naming it, recorded; the replay in a new App raises it again, though the holder
    has ended meanwhile (a live start would now succeed)."""
    log: list[tuple[str, int]] = []
    first = make_app()
    flows = declare(first, log)
    async with first:
        holder = await flows["child"].options(queue="one", dedup_id="held").start(0)
        handle = await flows["dedup"].start()

        async def waits() -> bool:
            return (await first.get_instance(handle.instance_id)).status == geste.Status.WAITING

        await wait_until(waits, "the parent to wait for its event")
        await first.cancel(holder.instance_id)  # the dedup id is free now
    second = make_app(queues=[geste.Queue("one", concurrency=1)])
    flows = declare(second, log)
    async with second:
        await second.send_event("go", instance_id=handle.instance_id)
        caught = await second.get_handle(handle.instance_id).result(timeout=60)
    assert caught == ["one", "held", holder.instance_id]
    assert await children_of(db_url, handle.instance_id) == []  # nothing was started
    assert log == []


async def test_a_queued_child_is_cancelled_by_its_parents_end(make_app: MakeApp, db_url: str) -> None:
    """The parent ends while its child still waits in a queue that no worker serves: the parent-close
    policy (cancel) ends the child, cancelled, without it ever running."""
    log: list[tuple[str, int]] = []
    app = make_app()
    flows = declare(app, log)

    @app.workflow()
    async def leaves(ctx: geste.WorkflowContext) -> str:
        return (await ctx.start_child(flows["child"].options(queue="one"), 3)).id

    async with app:
        child_id = await (await leaves.start()).result(timeout=30)

        async def cancelled() -> bool:
            return (await app.get_instance(child_id)).status == geste.Status.CANCELLED

        await wait_until(cancelled, "the queued child to be cancelled")
    assert log == []


async def test_the_storage_creates_a_queued_child_once_and_names_a_dedup_holder(db_url: str) -> None:
    """``Storage.start_child`` onto a queue: a lost lease writes no step (PostgreSQL keeps the child,
    which the next holder finds its own; SQLite writes nothing); the start again leaves one queued child;
    another parent's child with the same dedup id is refused, nothing written, the holder named."""
    import time

    from geste.storage.base import ChildState, Commit, DedupHeld, Lease, LeaseLost, NewInstance, StepResult

    app = geste.App(db_url, run_worker=False)
    async with app:
        storage: Any = app.storage
        now = time.time()
        parents = [Lease("p", "lease-p"), Lease("p2", "lease-p2")]
        for lease in parents:
            await storage.create_instance(
                NewInstance(lease.instance_id, "w", '{"args":[],"kwargs":{}}', now),
                lease=lease,
                worker_id="me",
                lock_expires_at=now + 60,
            )
        child = NewInstance("p:1", "c", '{"args":[],"kwargs":{}}', now, None, "q", 3, "d")
        with pytest.raises(LeaseLost):
            await storage.start_child(Commit(Lease("p", "stale"), [], now), child, parent_close="cancel")
        again = await storage.start_child(Commit(parents[0], [], now), child, parent_close="cancel")
        assert isinstance(again, StepResult | ChildState)
        if isinstance(again, ChildState):  # PostgreSQL: the child of the lost step, its own
            assert again.parent_id == "p" and again.workflow_name == "c"
        rows = await raw_query(
            db_url,
            "SELECT instance_id, queue, priority, dedup_id, run_at, queued_at, parent_id "
            "FROM geste_instances WHERE instance_id LIKE 'p%:%'",
        )
        assert len(rows) == 1
        (found,) = rows
        assert (found["queue"], found["priority"], found["dedup_id"], found["parent_id"]) == (
            "q",
            3,
            "d",
            "p",
        )
        assert found["run_at"] is None and found["queued_at"] is not None  # queued: no claim takes it
        other = NewInstance("p2:1", "c", '{"args":[],"kwargs":{}}', now, None, "q", 0, "d")
        refused = await storage.start_child(Commit(parents[1], [], now), other, parent_close="cancel")
        assert refused == DedupHeld("p:1")
        assert await raw_query(db_url, "SELECT 1 FROM geste_instances WHERE instance_id = 'p2:1'") == []


async def test_children_started_onto_a_partitioned_queue_keep_to_each_partitions_limit(
    make_app: MakeApp, db_url: str
) -> None:
    """``partition_key`` reaches a child's row (schema 22) like a client's start: one child per key at
    once, whatever the other key runs."""
    log: list[tuple[str, str]] = []
    app = make_app(queues=[geste.Queue("parts", partition_concurrency=1)])

    @app.activity()
    async def load(ctx: geste.ActivityContext, key: str) -> str:
        log.append(("start", key))
        await asyncio.sleep(0.02)  # room for another child of the key to start meanwhile, were it admitted
        log.append(("end", key))
        return key

    @app.workflow()
    async def kid(ctx: geste.WorkflowContext, key: str) -> str:
        return await load(ctx, key)

    @app.workflow()
    async def per_key(ctx: geste.WorkflowContext, n: int) -> list[str]:
        keys = [f"k{x % 2}" for x in range(n)]
        handles = [await ctx.start_child(kid.options(queue="parts", partition_key=k), k) for k in keys]
        return [await h.result() for h in handles]

    async with app:
        handle = await per_key.start(6)
        assert await handle.result(timeout=60) == ["k0", "k1"] * 3
    for key in ("k0", "k1"):
        assert most_at_once([(what, 0) for what, k in log if k == key]) == 1
    rows = await raw_query(
        db_url, "SELECT partition_key FROM geste_instances WHERE parent_id = $1", handle.instance_id
    )
    assert sorted(r["partition_key"] for r in rows) == ["k0", "k0", "k0", "k1", "k1", "k1"]
