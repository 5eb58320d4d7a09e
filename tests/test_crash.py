"""Crash safety on each backend, with workers in subprocesses killed, restarted and stopped.

Workers run ``tests/apps/crash_app.py`` (the ``cluster`` fixture, ``tests/processes.py``); each activity
logs its start and end to a side-effect file, so a test can count executions (at least once) and compare
them with the history (recorded exactly once).
What geste promises is asserted, no more: an activity recorded in the history never runs again, one that
was not may (a crash, or a lease that ran out on a loaded machine, runs it again). So counts of runs are
exact for the recorded ones, and for the others only where the test rules a lost lease out (a lease far
longer than the test, or the heartbeat under test); elsewhere they are "at least once".
Nothing sleeps and hopes: every wait is for a condition (a file, a log line, a row) with a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import time
from collections import Counter, defaultdict

import pytest

import geste

from .processes import Cluster, workers_client
from .support import raw_query, wait_until

client = workers_client("cluster")
"""An App that only starts, queries and cancels (no worker); it also creates the schema."""


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL


async def assert_recorded_once(app: geste.App, instance_id: str, activities: list[str]) -> None:
    history = await app.history(instance_id)
    seqs = [entry.seq for entry in history]
    assert seqs == sorted(set(seqs)), seqs
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    recorded = [e.name for e in history if e.kind in (geste.StepKind.ACTIVITY, geste.StepKind.COMPENSATION)]
    assert recorded == activities
    raw = await raw_query(
        app.url,
        "SELECT seq, COUNT(*) FROM geste_history WHERE instance_id = $1 GROUP BY seq HAVING COUNT(*) > 1",
        instance_id,
    )
    assert raw == []


async def _kill_in_block_then_take_over(cluster: Cluster, client: geste.App, second_worker: str) -> None:
    first = await cluster.spawn("w1")
    handle = await client.start_workflow("pipeline", 7, instance_id="order-1")
    iid = handle.instance_id
    await wait_until(lambda: cluster.entries(activity="block"), "block to start in w1")
    before_kill = {(e["activity"], e["worker"]) for e in cluster.entries()}
    assert before_kill == {("one", "w1"), ("two", "w1"), ("block", "w1")}
    assert [e.name for e in await client.history(iid)] == ["one", "two"]

    kill(first)
    dead_lease = await cluster.row(iid)
    assert dead_lease["locked_by"] == "w1"
    assert dead_lease["status"] == "running"
    cluster.go(iid)  # the next attempt of `block` returns at once

    await cluster.spawn(second_worker)
    result = await handle.result(timeout=15)
    assert result == ["one:7", "two:7", "block:7", "three:7"]

    starts = Counter(e["activity"] for e in cluster.entries(instance=iid))
    assert (starts["one"], starts["two"]) == (1, 1), starts  # recorded before the kill: replayed, not run
    assert starts["block"] >= 2 and starts["three"] >= 1, starts  # the interrupted one ran again
    retaken = cluster.entries(activity="block")[1]
    assert retaken["pid"] != first.pid and retaken["worker"] == second_worker
    # taken over only once the dead worker's lease had expired, not before
    assert retaken["t"] >= dead_lease["lock_expires_at"]
    await assert_recorded_once(client, iid, ["one", "two", "block", "three"])
    info = await handle.info()
    assert info.status == geste.Status.COMPLETED and info.locked_by is None


async def test_sigkill_mid_activity_another_worker_takes_over(cluster: Cluster, client: geste.App) -> None:
    await _kill_in_block_then_take_over(cluster, client, "w2")


async def test_restart_with_the_same_worker_id_does_not_double_run(
    cluster: Cluster, client: geste.App
) -> None:
    await _kill_in_block_then_take_over(cluster, client, "w1")


async def test_heartbeat_keeps_a_long_activity_from_being_taken_over(
    cluster: Cluster, client: geste.App
) -> None:
    lock_timeout = 1.5  # renewed every 0.5 s; a little slack for a loaded machine
    await cluster.spawn("w1", lock_timeout=lock_timeout)
    await cluster.spawn("w2", lock_timeout=lock_timeout)
    seconds = 3.5 * lock_timeout
    handle = await client.start_workflow("long", seconds)
    started = await wait_until(lambda: cluster.entries(activity="slow"), "the slow activity to start")
    runner = started[0]["worker"]
    assert await handle.result(timeout=15) == "slow+one:0"
    slow = cluster.entries(activity="slow")
    assert len(slow) == 1, slow  # the other worker, polling all along, never took it over
    ended = cluster.entries(activity="slow", event="end")
    assert len(ended) == 1 and ended[0]["t"] - slow[0]["t"] >= seconds
    assert {e["worker"] for e in cluster.entries(instance=handle.instance_id)} == {runner}
    await assert_recorded_once(client, handle.instance_id, ["slow", "one"])


async def test_many_instances_on_several_worker_processes(cluster: Cluster, client: geste.App) -> None:
    """Three workers and 100 instances on a SQLite file; four workers and 300 on PostgreSQL."""
    workers, count = (3, 100) if cluster.url.startswith("sqlite") else (4, 300)
    for n in range(workers):
        await cluster.spawn(f"w{n + 1}", concurrency=20, lock_timeout=2.0)
    handles = await asyncio.gather(*(client.start_workflow("batch", i) for i in range(count)))
    results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
    assert results == [[f"one:{i}", f"two:{i}", f"three:{i}"] for i in range(count)]

    starts = cluster.entries()
    ends = cluster.entries(event="end")
    ran = Counter((e["instance"], e["activity"]) for e in starts)
    expected = {(h.instance_id, a) for h in handles for a in ("one", "two", "three")}
    assert set(ran) == expected  # every activity ran (at least once), nothing else did
    assert {(e["instance"], e["activity"]) for e in ends} == expected  # and each finished at least once
    again = {key: n for key, n in ran.items() if n > 1}  # allowed: a lease that ran out under load
    if again:
        print(f"{len(again)} activities ran more than once (a lease taken over): {sorted(again)[:10]}")

    # one worker at a time runs an instance: its activities never overlap, unless its lease was taken
    # over (which is what re-runs an activity; the old run may still be in one until it tries to write)
    taken_over = {instance for instance, _ in again}
    intervals: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    end_of = {(e["instance"], e["activity"]): e["t"] for e in ends}
    for e in starts:
        if e["instance"] not in taken_over:
            intervals[e["instance"]].append((e["t"], end_of[e["instance"], e["activity"]], e["pid"]))
    for iid, spans in intervals.items():
        spans.sort()
        for (_, end, pid), (start, _, other) in itertools.pairwise(spans):
            assert start >= end, f"{iid}: run by {pid} and {other} at the same time"
    assert len({e["worker"] for e in starts}) > 1, "all the work went to one worker"

    for handle in handles:
        await assert_recorded_once(client, handle.instance_id, ["one", "two", "three"])
    finished = await client.list_instances(status=geste.Status.COMPLETED, limit=1000)
    assert len(finished) == count


async def test_sigterm_releases_the_lease_for_another_worker_at_once(
    cluster: Cluster, client: geste.App
) -> None:
    lock_timeout = 30.0  # far longer than the test: only a released lease can be taken this fast
    first = await cluster.spawn("w1", lock_timeout=lock_timeout, shutdown_grace=0.2)
    handle = await client.start_workflow("pipeline", 1)
    iid = handle.instance_id
    await wait_until(lambda: cluster.entries(activity="block"), "block to start in w1")
    assert (await cluster.row(iid))["locked_by"] == "w1"

    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=10) == 0, cluster.output(first)
    exited = time.time()
    row = await cluster.row(iid)
    assert row["locked_by"] is None and row["lease_id"] is None and row["lock_expires_at"] is None
    assert row["run_at"] is not None and row["run_at"] <= exited  # runnable at once

    cluster.go(iid)
    await cluster.spawn("w2", lock_timeout=lock_timeout)
    assert await handle.result(timeout=10) == ["one:1", "two:1", "block:1", "three:1"]
    retaken = cluster.entries(activity="block", worker="w2")
    assert len(retaken) == 1 and retaken[0]["t"] - exited < lock_timeout / 3
    assert Counter(e["activity"] for e in cluster.entries()) == {"one": 1, "two": 1, "block": 2, "three": 1}
    await assert_recorded_once(client, iid, ["one", "two", "block", "three"])


async def test_sigterm_during_a_claim_hands_back_what_it_claimed(cluster: Cluster, client: geste.App) -> None:
    """SIGTERM while a claim is in flight (committed, its answer not yet back): the worker stops at the
    end of the round and hands those instances back at once, instead of leaving them leased until
    lock_timeout (the loop used to be cancelled in the middle of the claim)."""
    lock_timeout = 30.0  # far longer than the test: only a hand-back frees them this fast
    first = await cluster.spawn(
        "w1", lock_timeout=lock_timeout, shutdown_grace=5, claim_holds_until_shutdown=1
    )
    handles = [await client.start_workflow("batch", n) for n in range(3)]
    claimed = cluster.markers / "claimed-w1"
    await wait_until(claimed.exists, "w1 to claim")
    rows = [await cluster.row(h.instance_id) for h in handles]
    assert any(row["locked_by"] == "w1" for row in rows)  # the claim committed

    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=15) == 0, cluster.output(first)
    exited = time.time()
    for handle in handles:
        row = await cluster.row(handle.instance_id)
        assert row["locked_by"] is None and row["lease_id"] is None, row
        assert row["run_at"] is not None and row["run_at"] <= exited  # runnable at once
    assert "handed back" in cluster.output(first)
    assert not cluster.entries()  # nothing ran in w1

    await cluster.spawn("w2", lock_timeout=lock_timeout)
    for n, handle in enumerate(handles):
        assert await handle.result(timeout=10) == [f"one:{n}", f"two:{n}", f"three:{n}"]


async def test_cancel_from_another_process_runs_compensations(cluster: Cluster, client: geste.App) -> None:
    await cluster.spawn("w1")
    handle = await client.start_workflow("saga", 3)
    iid = handle.instance_id
    await wait_until(lambda: cluster.entries(activity="block"), "block to start")

    info = await client.cancel(iid)
    assert info.cancel_requested and not info.status.is_finished
    # the cancel reaches the running activity (its lease renewal, or a notification): it is cancelled
    with pytest.raises(geste.errors.WorkflowCancelled):
        await handle.result(timeout=15)

    info = await handle.info()
    assert info.status == geste.Status.CANCELLED and info.locked_by is None
    runs = Counter(e["activity"] for e in cluster.entries())
    assert set(runs) == {"one", "block", "undo"} and runs["one"] == 1, runs  # `one`: recorded before block
    assert {e["what"] for e in cluster.entries(activity="undo")} == {"one:3"}
    history = await client.history(iid)
    assert [(e.kind, e.name) for e in history] == [
        (geste.StepKind.ACTIVITY, "one"),
        (geste.StepKind.ACTIVITY, "block"),
        (geste.StepKind.COMPENSATION, "undo"),
    ]
    assert history[1].payload["error"]["type"] == "geste.errors.ActivityCancelled"
    assert cluster.entries(activity="block", event="end") == []
    await assert_recorded_once(client, iid, ["one", "block", "undo"])
