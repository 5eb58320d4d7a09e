"""The cache of suspended runs (``geste.engine.cache``, issue 16): a wake-up in the worker where a run
parked continues it from its wait, reading the rows after the step it holds only; on any doubt the run is
dropped and its instance replays as without the cache. Both backends; the whole suite also runs with the
cache off (``GESTE_WORKFLOW_CACHE_SIZE=0`` in ``make test``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import geste
from geste.engine.journal import Suspended
from geste.storage.base import Claim, HistoryRow

from .support import wait_until

MakeApp = Callable[..., geste.App]


def build(make_app: MakeApp, **options: Any) -> tuple[geste.App, dict[str, Any]]:
    """An App with ``looper`` (n rounds of: an activity, then a wait for its own ``tick`` event) and what
    the workflows' code saw (``seen``: runs started, ``finally`` blocks run)."""
    options.setdefault("workflow_cache_size", 1000)  # whatever GESTE_WORKFLOW_CACHE_SIZE says
    app = make_app(**options)
    seen: dict[str, Any] = {"starts": 0, "finally": 0, "flip": False}

    @app.activity
    async def add(ctx: geste.ActivityContext, total: int, n: int) -> int:
        return total + n

    @app.workflow
    async def looper(ctx: geste.WorkflowContext, rounds: int) -> int:
        seen["starts"] += 1  # each run of the code from the top: a replay, or the first run
        total = 0
        try:
            for i in range(rounds):
                total = await add(ctx, total, 1)
                event = await ctx.wait_event("tick", match={"id": ctx.instance_id, "i": i})
                total += int(event.data["add"])
        finally:
            seen["finally"] += 1
        return total

    @app.workflow
    async def fickle(ctx: geste.WorkflowContext) -> str:
        await ctx.wait_event("tick", match={"id": ctx.instance_id, "i": 0})
        if seen["flip"]:  # the code changed under a parked run: only a replay can tell
            await ctx.sleep(0)
        await add(ctx, 0, 1)
        await ctx.wait_event("tick", match={"id": ctx.instance_id, "i": 1})
        return "done"

    return app, seen


async def waiting_at(app: geste.App, instance_id: str, steps: int) -> None:
    """Until the instance waits with ``steps`` history rows."""

    async def check() -> bool:
        info = await app.get_handle(instance_id).info()
        return info.status == geste.Status.WAITING and len(await app.history(instance_id)) == steps

    await wait_until(check, f"{instance_id} waiting after {steps} steps")


async def tick(app: geste.App, instance_id: str, i: int, add: int = 0) -> None:
    await app.send_event("tick", {"id": instance_id, "i": i, "add": add})


def cache_value(snapshot: Any, name: str, **labels: str) -> float:
    return float(snapshot.value(name, **labels))


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_a_looping_workflow_continues_from_the_cache_reading_only_the_new_rows(
    make_app: MakeApp,
) -> None:
    """30 rounds, each an activity and a wait: one run of the code, no replay; each claim of a wake-up
    read the rows after the step the run holds (one: the event), never the whole history."""
    app, seen = build(make_app)
    read: list[tuple[int, int]] = []
    async with app:
        storage = app.storage

        def counted(claim: Any) -> Any:  # whole claims (SQLite) and claims by id (routed, PostgreSQL)
            async def counting(*args: Any, **kwargs: Any) -> Any:
                claims = await claim(*args, **kwargs)
                read.extend((c.history_after, len(c.history or ())) for c in claims)
                return claims

            return counting

        storage.claim, storage.claim_ids = counted(storage.claim), counted(storage.claim_ids)  # type: ignore[method-assign]
        handle = await app.start_workflow("looper", 30)
        for i in range(30):
            await waiting_at(app, handle.instance_id, 3 * i + 2)
            await tick(app, handle.instance_id, i, add=10)
        assert await handle.result(timeout=20) == 330
        snap = await app.metrics.snapshot()
    assert seen["starts"] == 1 and seen["finally"] == 1
    assert cache_value(snap, "geste_workflow_cache_hits_total") == 30
    woken = [r for r in read if r[0] > 0]
    assert read and woken == read and all(n == 1 for _, n in woken), read  # one row each: the event


async def test_without_the_cache_every_wake_up_replays(make_app: MakeApp) -> None:
    app, seen = build(make_app, workflow_cache_size=0)
    async with app:
        handle = await app.start_workflow("looper", 5)
        for i in range(5):
            await waiting_at(app, handle.instance_id, 3 * i + 2)
            await tick(app, handle.instance_id, i)
        assert await handle.result(timeout=20) == 5
        snap = await app.metrics.snapshot()
    assert seen["starts"] == 6  # the first run, then a replay per wake-up
    assert cache_value(snap, "geste_workflow_cache_hits_total") == 0


async def test_the_least_recently_parked_run_is_evicted_and_replays(make_app: MakeApp) -> None:
    """A cache of one run, two instances parked in turn: each wake-up finds the other's run in the cache,
    so the run it needs was evicted (its ``finally`` ran then, at its wait) and its instance replays."""
    app, seen = build(make_app, workflow_cache_size=1)
    async with app:
        a = await app.start_workflow("looper", 3)
        await waiting_at(app, a.instance_id, 2)
        b = await app.start_workflow("looper", 3)
        await waiting_at(app, b.instance_id, 2)  # a's run is evicted: the cache holds one
        assert seen["finally"] == 1
        for i in range(3):
            for handle in (a, b):
                await tick(app, handle.instance_id, i, add=1)
                if i < 2:
                    await waiting_at(app, handle.instance_id, 3 * i + 5)
        assert await a.result(timeout=20) == 6 and await b.result(timeout=20) == 6
        snap = await app.metrics.snapshot()
    # 2 first runs, then 5 replays (the last wake-up of b finds its run cached: a ended without parking)
    assert seen["starts"] == 7 and seen["finally"] == 7
    assert cache_value(snap, "geste_workflow_cache_drops_total", reason="evicted") == 5


async def test_a_run_that_another_worker_took_further_is_dropped_and_replays(make_app: MakeApp) -> None:
    """Worker A parks the run at the first wait; worker B (another App on the database) takes the first
    wake-up, replays and runs it to the second wait. A's next claim reads more than its wait's outcome
    after the step it holds: it drops its run as stale and replays from the database. Polls of a minute
    and no notifications: each worker claims only when its own process pokes it."""
    options = {"poll_interval": 60.0, "listen_notify": False}
    a, seen_a = build(make_app, worker_id="a", **options)
    b, seen_b = build(make_app, worker_id="b", **options)
    async with a, b:
        handle = await a.start_workflow("looper", 2)  # runs in A at once
        iid = handle.instance_id
        await waiting_at(a, iid, 2)
        await tick(b, iid, 0, add=5)  # B's send pokes B
        await waiting_at(a, iid, 5)
        assert seen_b["starts"] == 1
        await tick(a, iid, 1, add=7)  # A's send pokes A
        assert await handle.result(timeout=20) == 14
        snap = await a.metrics.snapshot()
    assert cache_value(snap, "geste_workflow_cache_drops_total", reason="stale") == 1
    assert seen_a["starts"] == 2  # its first run, then a replay


async def test_a_cancel_reaches_a_parked_run_at_its_wait(make_app: MakeApp) -> None:
    app, seen = build(make_app)
    async with app:
        handle = await app.start_workflow("looper", 3)
        await waiting_at(app, handle.instance_id, 2)
        await app.cancel(handle.instance_id)
        with pytest.raises(geste.errors.WorkflowCancelled):
            await handle.result(timeout=20)
        snap = await app.metrics.snapshot()
    assert seen["starts"] == 1 and seen["finally"] == 1
    assert cache_value(snap, "geste_workflow_cache_hits_total") == 1


async def test_closing_the_worker_unwinds_its_parked_runs_and_another_replays_them(make_app: MakeApp) -> None:
    app, seen = build(make_app)
    async with app:
        handle = await app.start_workflow("looper", 2)
        await waiting_at(app, handle.instance_id, 2)
    assert seen["finally"] == 1  # unwound at its wait when the App closed, nothing written
    app, seen = build(make_app)
    async with app:
        assert len(await app.history(handle.instance_id)) == 2
        await tick(app, handle.instance_id, 0)
        await waiting_at(app, handle.instance_id, 5)
        await tick(app, handle.instance_id, 1)
        assert await app.get_handle(handle.instance_id).result(timeout=20) == 2
    assert seen["starts"] == 1  # the replay at the first wake-up, then the cache


async def test_the_cache_hides_no_divergence_from_a_replay(make_app: MakeApp) -> None:
    """The workflow's code changes (``flip``) after a cached run took a decision it depends on. Once the
    run is evicted, the replay meets the change and the instance fails with the divergence, as it would
    without the cache."""
    app, seen = build(make_app, workflow_cache_size=1)
    async with app:
        first = await app.start_workflow("fickle")
        await waiting_at(app, first.instance_id, 1)
        await tick(app, first.instance_id, 0)  # continued from the cache: no sleep, the activity, a wait
        await waiting_at(app, first.instance_id, 4)
        seen["flip"] = True
        other = await app.start_workflow("looper", 1)  # parks too: the first run is evicted
        await waiting_at(app, other.instance_id, 2)
        await tick(app, first.instance_id, 1)  # replays with the new code: a sleep where an activity was
        with pytest.raises(geste.errors.WorkflowFailed) as failed:
            await first.result(timeout=20)
    assert failed.value.error["type"] == "geste.errors.NonDeterminismError"
    assert "step 3" in failed.value.error["message"]


async def test_new_rows_accepts_only_the_wait_outcome_after_the_step_held() -> None:
    """``CachedRun.new_rows``: the rows after ``known`` must be at most one, at the step the run waits
    at; a claim that read from a later step than ``known`` cannot continue it."""
    from geste.engine.cache import CachedRun
    from geste.storage.base import Lease

    def row(seq: int, kind: str = "event") -> HistoryRow:
        return HistoryRow(seq, kind, "tick", "{}", False, 0.0)

    def claim(after: int, run: int = 1) -> Claim:
        return Claim(
            Lease("i", "l"), "w", "[]", geste.Status.RUNNING, 0.0, False, history_after=after, run=run
        )

    journal: Any = type("J", (), {"seq": 3, "run": 1, "forget_replayed": lambda self: None})()
    run = CachedRun(journal)
    run.task = asyncio.get_running_loop().create_task(run.park(journal, 2))
    await asyncio.sleep(0)
    cases: list[tuple[int, Sequence[HistoryRow], bool]] = [
        (2, [], True),  # a spurious wake-up, a timer: nothing new
        (2, [row(3)], True),  # the wait's outcome
        (0, [row(1, "activity"), row(2, "wait_event"), row(3)], True),  # a whole history, same
        (2, [row(3), row(4, "activity")], False),  # run further elsewhere
        (2, [row(4)], False),  # not at the step it waits at
        (3, [], False),  # read from a later step than the run holds
    ]
    for after, rows, fits in cases:
        assert (run.new_rows(claim(after), rows) is not None) is fits, (after, rows)
    assert run.new_rows(claim(2, run=2), []) is None  # the instance continued as new meanwhile
    run.drop()
    with pytest.raises(Suspended):
        await run.task


async def test_a_long_replay_gives_the_event_loop_turns(make_app: MakeApp) -> None:
    """Without the cache, a wake-up replays the whole history. 2,048 recorded activity steps replay with a
    turn of the event loop every 256 (the process's other instances, its heartbeat and group commits run
    meanwhile), where they were one piece of work before: a task that counts the loop's turns sees them.
    Counted, not timed."""
    app = make_app(workflow_cache_size=0)
    turns = 0
    seen: dict[str, int] = {}

    @app.activity
    async def one(ctx: geste.ActivityContext, n: int) -> int:
        return n

    @app.workflow
    async def long(ctx: geste.WorkflowContext) -> int:
        before = turns
        total = 0
        for n in range(2048):
            total += await one(ctx, n)
        if ctx.is_replaying:
            seen["turns"] = turns - before  # during the replay of the 2,048 steps
        await ctx.wait_event("tick", match={"id": ctx.instance_id})
        return total

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    async with app:
        handle = await app.start_workflow("long")
        await waiting_at(app, handle.instance_id, 2049)
        counter = asyncio.create_task(count_turns())
        try:
            await app.send_event("tick", {"id": handle.instance_id})
            assert await handle.result(timeout=60) == sum(range(2048))
        finally:
            counter.cancel()
    assert seen["turns"] >= 2048 // 256 - 1, seen


async def test_a_long_claimed_history_is_built_in_turns_of_the_event_loop(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL claims ship the history as an array per column: its rows are built ``ROWS_PER_TURN``
    at a time, the event loop given a turn in between (lowered here so that a short history is long),
    in seq order even if the arrays were not."""
    import geste.storage.postgres as postgres

    monkeypatch.setattr(postgres, "ROWS_PER_TURN", 100)
    n = 1000
    seqs = list(range(1, n + 1))
    shuffled = seqs[n // 2 :] + seqs[: n // 2]
    record: dict[str, Any] = {
        "h_seq": shuffled,
        "h_kind": ["now"] * n,
        "h_name": ["now"] * n,
        "h_payload": [str(s) for s in shuffled],
        "h_error": [False] * n,
        "h_at": [float(s) for s in shuffled],
    }
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)
    try:
        long, empty = await postgres._histories([record, dict.fromkeys(record)])
    finally:
        counter.cancel()
    assert [(r.seq, r.payload, r.created_at) for r in long] == [(s, str(s), float(s)) for s in seqs]
    assert empty == () and turns >= n // 100 - 1, turns
    # and a real claim's arrays, in order, through the same reader
    app, _ = build(lambda **o: geste.App(pg_url, poll_interval=0.05, **o), workflow_cache_size=0)
    monkeypatch.setattr(postgres, "ROWS_PER_TURN", 2)
    async with app:
        handle = await app.start_workflow("looper", 2)
        await waiting_at(app, handle.instance_id, 2)
        await tick(app, handle.instance_id, 0)
        await waiting_at(app, handle.instance_id, 5)
        await tick(app, handle.instance_id, 1)
        assert await handle.result(timeout=20) == 2
        assert [e.seq for e in await handle.history()] == list(range(1, 7))


async def test_a_suspension_leaves_the_renewed_leases_at_once(make_app: MakeApp) -> None:
    """The suspension released the lease: the worker stops renewing it at once, not when the claim's task
    ends. With the cache that task ends a loop turn after the run parks, and a renewal in between took
    the released lease for a lost one, cancelled the claim and the parked run with it (0 to 16 of
    10,000 runs parked in a burst, in benchmarks/long_history.py)."""
    app, _ = build(make_app)
    renewed_after: list[bool] = []
    async with app:
        worker = app._worker
        assert worker is not None
        suspended = worker.suspended

        def watched(instance_id: str, run_at: float | None) -> None:
            suspended(instance_id, run_at)
            renewed_after.append(instance_id in worker._running)

        worker.suspended = watched  # type: ignore[method-assign]
        handle = await app.start_workflow("looper", 2)
        for i in range(2):
            await waiting_at(app, handle.instance_id, 3 * i + 2)
            await tick(app, handle.instance_id, i)
        assert await handle.result(timeout=20) == 2
        snap = await app.metrics.snapshot()
    assert renewed_after == [False, False]
    assert cache_value(snap, "geste_workflow_cache_hits_total") == 2
