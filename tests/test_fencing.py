"""Fencing: a worker whose lease was taken over can record nothing, on each backend.

First every write a run makes under its lease, tried with a lease taken over, straight on the storage:
each is refused (``LeaseLost``) and leaves no trace. Then the same with worker processes: one paused with
SIGSTOP past its ``lock_timeout`` in the middle of an activity while another takes the instance over;
resumed, its result is refused and dropped with a log line, and the activity is recorded once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

import geste
from geste.storage import Storage, create_storage
from geste.storage.base import (
    Commit,
    EventWait,
    HistoryRow,
    LeaseLost,
    MessageWait,
    NewEvent,
    NewInstance,
    NewMessage,
    NewOutboxEvent,
)

from .processes import Cluster
from .proxy import TcpProxy
from .support import raw_query, wait_status, wait_until
from .test_crash import assert_recorded_once

INPUT = '{"args":[],"kwargs":{}}'
T = TypeVar("T")


@pytest.fixture
async def two(db_url: str) -> AsyncIterator[tuple[Storage, Storage]]:
    first, second = create_storage(db_url), create_storage(db_url)
    await first.open()
    await second.open()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def row(seq: int, now: float, name: str = "late") -> HistoryRow:
    return HistoryRow(seq, "activity", name, '{"result":null}', False, now)


async def count(url: str, table: str, where: str = "true") -> int:
    return int((await raw_query(url, f"SELECT count(*) AS n FROM {table} WHERE {where}"))[0]["n"])


LATE_STEP = """
CREATE FUNCTION {s}.late_step() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.locked_by = 'B' AND OLD.locked_by IS DISTINCT FROM 'B' THEN
        INSERT INTO {s}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
        VALUES (OLD.instance_id, OLD.steps + 1, 'activity', 'late', '{{"result":null}}', false, 0);
        NEW.steps := OLD.steps + 1;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER late_step BEFORE UPDATE ON {s}.geste_instances FOR EACH ROW EXECUTE FUNCTION {s}.late_step();
"""


@pytest.mark.parametrize("by_id", [False, True], ids=["claim", "claim_ids"])
async def test_a_claim_reads_the_steps_of_a_commit_it_waited_for(pg_url: str, by_id: bool) -> None:
    """A claim's lock can wait for a commit that appended steps (the holder of a lease the claimer, its
    clock ahead, saw run out): the claim then updates the row as that commit left it, but its statement
    read the history in an earlier snapshot. Found by the chaos suite (a stale replay redid a recorded
    step, refused by the history's key). A trigger plays that commit inside the claim's own UPDATE,
    where the claim's reading of the history cannot see it either; the claim must return the row."""
    a, b = create_storage(pg_url), create_storage(pg_url)
    await a.open()
    await b.open()
    try:
        await _claim_after_a_late_step(pg_url, a, b, by_id)
    finally:
        await a.close()
        await b.close()


async def _claim_after_a_late_step(pg_url: str, a: Storage, b: Storage, by_id: bool) -> None:
    t = time.time()
    await a.create_instance(
        NewInstance("x", "wf", INPUT, t), lease=None, worker_id=None, lock_expires_at=None
    )
    (first,) = await a.claim("A", t, t + 1, 10, workflows=["wf"])
    await a.record(Commit(first.lease, [row(1, t, "first")], t, t + 1))
    schema = pg_url.rsplit("schema=", 1)[1].split("&")[0]
    for statement in LATE_STEP.format(s=f'"{schema}"').split(";\nCREATE TRIGGER"):
        sql = statement if statement.startswith("\nCREATE FUNCTION") else "CREATE TRIGGER" + statement
        await raw_query(pg_url, sql)
    if by_id:
        claims = await b.claim_ids("B", t + 2, t + 60, ["x"], workflows=["wf"])
    else:
        claims = await b.claim("B", t + 2, t + 60, 10, workflows=["wf"])
    (second,) = claims
    assert [(r.seq, r.name) for r in second.history] == [(1, "first"), (2, "late")]


async def test_a_lease_taken_over_can_record_nothing(db_url: str, two: tuple[Storage, Storage]) -> None:
    a, b = two
    t = time.time()
    await a.create_instance(
        NewInstance("x", "wf", INPUT, t), lease=None, worker_id=None, lock_expires_at=None
    )
    (first,) = await a.claim("A", t, t + 1, 10, workflows=["wf"])
    (second,) = await b.claim("B", t + 2, t + 60, 10, workflows=["wf"])  # A's lease ran out: taken over
    assert second.lease != first.lease
    # B subscribes to `news`; a message and an event are there for the taking
    await b.channel_subscribe(
        Commit(second.lease, [row(1, t + 2, "sub")], t + 2, t + 60), channel="news", mode="broadcast"
    )
    await b.channel_publish(NewMessage("m1", "news", '"hi"', None, None, t + 2))
    await b.send_event(NewEvent("e1", "paid", '{"n": 1}', None, None, None, t + 2))

    now = t + 3
    stale = Commit(first.lease, [row(2, now)], now, now + 10)
    ending = Commit(first.lease, [row(2, now)], now)
    refused = {
        "record": a.record(stale),
        "suspend": a.suspend(ending, run_at=now + 5, timer=(3, now + 5)),
        "continue_as_new": a.continue_as_new(ending, input=INPUT, last_seq=2),
        "finish": a.finish(ending, status=geste.Status.COMPLETED, result="1"),
        "outbox_record": a.outbox_record(stale, NewOutboxEvent("x:2", 2, "shipped", "geste", None, None)),
        "channel_subscribe": a.channel_subscribe(stale, channel="other", mode="broadcast"),
        "channel_publish": a.channel_publish(
            NewMessage("m2", "news", '"late"', "x", None, now), commit=stale
        ),
        "take an event": a.take_event_or_suspend(stale, EventWait("paid", None, None, 3)),
        "wait for an event": a.take_event_or_suspend(stale, EventWait("none", None, now + 5, 3)),
        "take a message": a.channel_take_or_suspend(stale, MessageWait("news", "broadcast", None, 3)),
        "wait for a message": a.channel_take_or_suspend(stale, MessageWait("quiet", "broadcast", now + 5, 3)),
        "time out a message wait": a.channel_take_or_suspend(
            stale, MessageWait("quiet", "broadcast", now, 3)
        ),
    }
    for what, call in refused.items():
        with pytest.raises(LeaseLost):
            await call
            pytest.fail(f"{what} with a lease taken over was not refused")
    assert await a.renew([first.lease], now + 20, now=now) == set()
    await a.release([first.lease], now)  # a stale release changes nothing

    info = await b.get_instance("x")
    assert info is not None and info.locked_by == "B" and info.lock_expires_at == t + 60
    assert info.status == geste.Status.RUNNING and info.run == 1 and info.result is None
    assert [r.name for r in await b.get_history("x")] == ["sub"]
    assert await count(db_url, "geste_outbox") == 0
    assert await count(db_url, "geste_channel_messages") == 1
    assert await count(db_url, "geste_timers") == 0
    assert await count(db_url, "geste_event_waits") == 0
    assert await count(db_url, "geste_channel_subscriptions") == 1  # B's; none of A's channels
    assert await count(db_url, "geste_channel_subscriptions", "waiting_since IS NOT NULL") == 0
    assert await count(db_url, "geste_channel_messages", "claimed_by IS NOT NULL") == 0
    # the holder writes on as before
    await b.record(Commit(second.lease, [row(2, now, "on time")], now, t + 60))
    assert [r.name for r in await b.get_history("x")] == ["sub", "on time"]


# -- worker processes --------------------------------------------------------------------------------------
async def test_a_worker_paused_past_its_lease_records_nothing_when_resumed(
    cluster: Cluster, db_url: str
) -> None:
    async with cluster.client() as client:
        first = await cluster.spawn("w1")
        handle = await client.start_workflow("pipeline", 7, instance_id="order-1")
        await wait_until(lambda: cluster.entries(activity="block"), "block to start in w1")
        first.send_signal(signal.SIGSTOP)  # mid-activity: its lease runs out, unrenewed
        try:
            paused = await cluster.row("order-1")
            assert paused["locked_by"] == "w1"
            second = await cluster.spawn("w2")
            cluster.go("order-1")  # every attempt of `block` returns now: w2's, and w1's once resumed
            assert await handle.result(timeout=30) == ["one:7", "two:7", "block:7", "three:7"]
        finally:
            first.send_signal(signal.SIGCONT)

        def lost() -> bool:
            return "instance order-1: lease lost" in cluster.output(first)

        await wait_until(lost, "w1 to find its lease taken over", timeout=30)
        await assert_recorded_once(client, "order-1", ["one", "two", "block", "three"])
        blocks = cluster.entries(activity="block", instance="order-1")
        assert [e["worker"] for e in blocks] == ["w1", "w2"]  # w1's attempt ran; only w2's was recorded
        assert (await cluster.row("order-1"))["locked_by"] is None
        assert "Traceback" not in cluster.output(first)

        # resumed, w1 works on: it runs the next instance if w2 is gone
        second.send_signal(signal.SIGKILL)
        second.wait()
        again = await client.start_workflow("batch", 8, instance_id="order-2")
        assert await again.result(timeout=30) == ["one:8", "two:8", "three:8"]
        assert {e["worker"] for e in cluster.entries(instance="order-2")} == {"w1"}


# -- a full worker whose database says an instance is due --------------------------------------------------
async def test_a_full_routing_worker_with_an_instance_due_keeps_its_event_loop_turning(pg_url: str) -> None:
    """Found by the chaos suite's pauses: a routing worker that believes itself the only one (its view
    of the others went stale while it was stopped; or it is alone), with every slot busy and the
    database's next run_at passed, returned a pause of 0 from every round without awaiting anything:
    its event loop never turned again, so no run could end to free a slot, nor its heartbeat refresh
    its view. Here: concurrency 1, one run holding the slot, another instance's sleep coming due."""
    app = geste.App(pg_url, concurrency=1, poll_interval=0.05, lock_timeout=5.0)
    release = asyncio.Event()
    holding = asyncio.Event()

    @app.activity
    async def hold(ctx: geste.ActivityContext) -> int:
        holding.set()
        await release.wait()
        return 1

    @app.workflow
    async def busy(ctx: geste.WorkflowContext) -> int:
        return await hold(ctx)

    @app.workflow
    async def sleeper(ctx: geste.WorkflowContext) -> int:
        await ctx.sleep(0.3)
        return 2

    async with app:
        asleep = await app.start_workflow("sleeper", instance_id="sleeper")
        await wait_status(app, "sleeper", geste.Status.WAITING)
        full = await app.start_workflow("busy", instance_id="busy")
        await wait_until(holding.is_set, "the busy run to hold the only slot")
        (row,) = await raw_query(pg_url, "SELECT run_at FROM geste_instances WHERE instance_id = 'sleeper'")
        due = row["run_at"]
        assert due is not None
        # the sleeper comes due while the slot is held: this coroutine must go on running meanwhile
        await wait_until(lambda: time.time() > due + 0.5, "the sleeper to be due for a while", timeout=10)
        release.set()
        assert await full.result(timeout=10) == 1
        assert await asleep.result(timeout=10) == 2


# -- a network partition between a worker and PostgreSQL ---------------------------------------------------
async def retried(call: Callable[[], Awaitable[T]]) -> T:
    """A call retried on ``StorageError`` (a dead pooled connection found after the partition healed:
    ``StorageTimeout``: one per stalled connection of its pool at most), as a user would."""
    for _ in range(12):
        try:
            return await call()
        except geste.errors.StorageError:
            continue
    return await call()


@pytest.mark.parametrize("how", ["stall", "cut"])
async def test_a_partitioned_worker_loses_its_lease_records_nothing_and_works_again_once_healed(
    pg_url: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker A reaches PostgreSQL through a proxy that stalls (half-open connections: nothing
    forwarded, nothing closed) or cuts its connections in the middle of an activity. B takes the
    instance over and ends it. A's activity then returns: its commit gets no answer within
    ``command_timeout`` (``StorageTimeout``, the connection dropped) or fails at once; nothing is
    recorded twice. Healed, A works again through new connections."""
    proxy = await TcpProxy.to_url(pg_url)
    runs: list[str] = []
    gates = {"A": asyncio.Event(), "B": asyncio.Event()}

    def build(url: str, worker: str) -> geste.App:
        app = geste.App(
            url, worker_id=worker, lock_timeout=1.0, poll_interval=0.05, notify_reconnect_delay=0.2
        )

        @app.activity
        async def step(ctx: geste.ActivityContext, n: int) -> str:
            runs.append(f"{worker}:{ctx.instance_id}")
            await gates[worker].wait()
            return f"{worker} did {n}"

        @app.workflow
        async def job(ctx: geste.WorkflowContext, n: int) -> str:
            return await step(ctx, n)

        return app

    a, b = build(proxy.url(pg_url), "A"), build(pg_url, "B")
    caplog.set_level(logging.INFO, logger="geste")
    try:
        await a.open()
        await a.start_workflow("job", 1, instance_id="x")
        await wait_until(lambda: runs == ["A:x"], "A to run the activity")
        getattr(proxy, how)()
        async with b:
            await wait_until(lambda: "B:x" in runs, "B to take x over", timeout=30)
            gates["B"].set()
            assert await b.get_handle("x").result(timeout=30) == "B did 1"
            gates["A"].set()  # A's activity returns: its result must be refused or never arrive

            def a_gave_up() -> bool:
                return any(
                    r.message.startswith("instance x: ")
                    and ("storage failed" in r.message or "lease lost" in r.message)
                    for r in caplog.records
                )

            await wait_until(a_gave_up, "A to give its run of x up", timeout=30)
            proxy.heal()
        # B is gone: A alone must take the next instance, through new connections
        again = await retried(lambda: a.start_workflow("job", 2, instance_id="y"))
        assert await retried(lambda: again.result(timeout=60)) == "A did 2"
    finally:
        await a.close()
        await proxy.close()
    history = await raw_query(
        pg_url, "SELECT instance_id, seq, kind FROM geste_history ORDER BY instance_id, seq"
    )
    assert [(r["instance_id"], r["seq"], r["kind"]) for r in history] == [
        ("x", 1, "activity"),
        ("y", 1, "activity"),
    ]
    (x,) = await raw_query(pg_url, "SELECT result, last_worker FROM geste_instances WHERE instance_id = 'x'")
    assert x["last_worker"] == "B" and "B did 1" in x["result"]
    assert runs == ["A:x", "B:x", "A:y"]


async def test_a_lease_of_months_still_opens_the_pool_on_postgres(pg_url: str) -> None:
    """The pool's ``idle_in_transaction_session_timeout`` (half the command timeout, itself twice the
    lease) is capped at PostgreSQL's largest value: with a lease past about 50 days the server refused
    every connection ("is outside the valid range")."""
    app = geste.App(pg_url, lock_timeout=90 * 86400.0, run_worker=False)
    async with app:
        assert await app.list_instances(limit=1) is not None
        rows = await app.storage._pool.fetch("SHOW idle_in_transaction_session_timeout")  # type: ignore[attr-defined]
    assert rows[0][0] != "0"
