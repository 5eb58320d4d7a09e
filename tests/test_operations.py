"""Operator actions, on both backends: ``app.retry`` (a failed instance runs again from its failed step),
``app.resume`` (a stuck instance runs now), and what they refuse.

Every wait is for a condition, with a deadline. Worker subprocesses run ``tests/apps/operations_app.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import geste
from geste.errors import InstanceLeasedError, InstanceNotFoundError, InstanceStateError
from geste.storage.base import HistoryRow, WorkerRow, retry_cut

from .processes import start_process, wait_ready
from .support import raw_query, wait_status, wait_until

MakeApp = Callable[..., geste.App]


class Switch:
    """What the tests' activities look at: whether the cause of a failure is fixed, and who ran what."""

    def __init__(self) -> None:
        self.broken = True
        self.runs: list[str] = []


def build(make_app: MakeApp, switch: Switch, **options: Any) -> geste.App:
    app = make_app(**options)
    once = geste.RetryPolicy(max_attempts=2, initial_interval=0.01)

    @app.activity
    async def first(ctx: geste.ActivityContext, x: int) -> int:
        switch.runs.append(f"first:{ctx.instance_id}")
        return x + 1

    @app.activity(retry=once)
    async def second(ctx: geste.ActivityContext, y: int) -> int:
        switch.runs.append(f"second:{ctx.instance_id}:{ctx.attempt}")
        if switch.broken:
            raise ConnectionError("the service is down")
        return y * 10

    @app.activity
    async def undo(ctx: geste.ActivityContext) -> None:
        switch.runs.append(f"undo:{ctx.instance_id}")

    @app.workflow
    async def pipeline(ctx: geste.WorkflowContext, x: int) -> int:
        return await second(ctx, await first(ctx, x))

    @app.workflow
    async def strict(ctx: geste.WorkflowContext, x: int) -> int:
        """Fails by its own exception after its activity, while the cause is not fixed."""
        y = await first(ctx, x)
        if switch.broken:
            raise ValueError(f"{y} is not acceptable yet")
        return y

    @app.workflow
    async def saga(ctx: geste.WorkflowContext, x: int) -> int:
        y = await first(ctx, x)
        ctx.on_failure(undo)
        return await second(ctx, y)

    @app.workflow
    async def napper(ctx: geste.WorkflowContext) -> str:
        await ctx.sleep(3600)
        return "rested"

    @app.workflow
    async def listener(ctx: geste.WorkflowContext) -> str:
        return str((await ctx.wait_event("go")).data)

    return app


async def failed(app: geste.App, workflow: str, *args: Any, instance_id: str) -> geste.InstanceInfo:
    handle = await app.start_workflow(workflow, *args, instance_id=instance_id)
    with pytest.raises(geste.errors.WorkflowFailed):
        await handle.result(timeout=10)
    return await app.get_instance(instance_id)


# -- retry ---------------------------------------------------------------------------------------------
async def test_a_failed_activity_runs_again_and_the_steps_before_it_do_not(
    make_app: MakeApp, db_url: str
) -> None:
    switch = Switch()
    async with build(make_app, switch) as app:
        info = await failed(app, "pipeline", 4, instance_id="p1")
        assert info.error is not None and info.error["message"] == "the service is down"
        assert [e.kind for e in await app.history("p1")] == ["activity", "activity"]
        assert switch.runs == ["first:p1", "second:p1:1", "second:p1:2"]

        switch.broken = False  # the operator fixes the cause
        record = await app.retry("p1")
        assert (record.instance_id, record.retry, record.from_seq) == ("p1", 1, 2)
        assert record.error == info.error and record.failed_at == info.finished_at
        (removed,) = record.removed
        assert (removed.seq, removed.kind, removed.name, removed.is_error) == (2, "activity", "second", True)
        assert removed.payload["attempts"] == 2

        assert await app.get_handle("p1").result(timeout=10) == 50
        assert switch.runs == ["first:p1", "second:p1:1", "second:p1:2", "second:p1:1"]  # not first again
        history = await app.history("p1")
        assert [(e.seq, e.name, e.is_error) for e in history] == [(1, "first", False), (2, "second", False)]
        done = await app.get_instance("p1")
        assert (done.status, done.error, done.steps) == (geste.Status.COMPLETED, None, 2)
        assert await app.retries("p1") == [record]

        # failing again and retried again: a second record, the first kept
        switch.broken = True
        await failed(app, "pipeline", 1, instance_id="p2")
        first_retry = await app.retry("p2")
        with pytest.raises(geste.errors.WorkflowFailed):
            await app.get_handle("p2").result(timeout=10)
        switch.broken = False
        second_retry = await app.retry("p2")
        assert (first_retry.retry, second_retry.retry) == (1, 2)
        assert await app.get_handle("p2").result(timeout=10) == 20
        assert [r.retry for r in await app.retries("p2")] == [1, 2]
        assert switch.runs.count("first:p2") == 1
    rows = await raw_query(db_url, "SELECT instance_id, retry, from_seq FROM geste_retries ORDER BY 1, 2")
    assert [tuple(r.values()) for r in rows] == [("p1", 1, 2), ("p2", 1, 2), ("p2", 2, 2)]


async def test_a_workflow_that_failed_by_its_own_exception_replays_all_its_steps(make_app: MakeApp) -> None:
    switch = Switch()
    async with build(make_app, switch) as app:
        info = await failed(app, "strict", 1, instance_id="s")
        assert info.error is not None and info.error["type"].endswith("ValueError")
        switch.broken = False
        record = await app.retry("s")
        assert (record.from_seq, record.removed) == (2, [])
        assert await app.get_handle("s").result(timeout=10) == 2
        assert switch.runs == ["first:s"]


async def test_a_failed_activity_of_a_gather_runs_again_with_its_siblings(make_app: MakeApp) -> None:
    """In a gather the sibling that succeeded may be recorded after the failed one: both run again."""
    switch = Switch()
    async with build(make_app, switch) as app:
        sibling_done = asyncio.Event()

        @app.activity
        async def sibling(ctx: geste.ActivityContext) -> str:
            switch.runs.append("sibling")
            return "ok"

        @app.activity(retry=geste.RetryPolicy(max_attempts=1))
        async def fragile(ctx: geste.ActivityContext) -> str:
            switch.runs.append("fragile")
            await asyncio.wait_for(sibling_done.wait(), 10)
            if switch.broken:
                raise RuntimeError("fragile broke")
            return "fixed"

        @app.activity
        async def signal(ctx: geste.ActivityContext) -> str:
            result = await sibling.fn(ctx)
            sibling_done.set()
            return result

        @app.workflow
        async def fan(ctx: geste.WorkflowContext) -> list[Any]:
            head = await first(ctx, 1)
            return [head, *await asyncio.gather(fragile(ctx), signal(ctx))]

        first = app.activities["first"]
        await failed(app, "fan", instance_id="fan")
        assert [(e.seq, e.name, e.is_error) for e in await app.history("fan")] == [
            (1, "first", False),
            (2, "fragile", True),
            (3, "signal", False),
        ]
        switch.broken = False
        sibling_done.clear()
        record = await app.retry("fan")
        assert record.from_seq == 2 and [e.name for e in record.removed] == ["fragile", "signal"]
        assert await app.get_handle("fan").result(timeout=10) == [2, "fixed", "ok"]
        assert switch.runs.count("first:fan") == 1 and switch.runs.count("sibling") == 2


async def test_a_failed_activity_the_workflow_handled_is_kept(make_app: MakeApp) -> None:
    """The workflow caught the failure and went on, then failed by itself: its own failure is retried,
    the handled activity is replayed as failed."""
    switch = Switch()
    async with build(make_app, switch) as app:
        second = app.activities["second"]
        first = app.activities["first"]

        @app.workflow
        async def tolerant(ctx: geste.WorkflowContext) -> str:
            try:
                await second(ctx, 1)
            except ConnectionError:
                pass
            value = await first(ctx, 1)
            if switch.broken:
                raise ValueError("not yet")
            return f"went on with {value}"

        await failed(app, "tolerant", instance_id="t")
        switch.broken = False
        record = await app.retry("t")
        assert (record.from_seq, record.removed) == (3, [])
        assert await app.get_handle("t").result(timeout=10) == "went on with 2"
        assert [r for r in switch.runs if r.startswith("second")] == ["second:t:1", "second:t:2"]


def test_the_retry_cut() -> None:
    def activity(seq: int, start: float, duration: float, error: bool = False) -> HistoryRow:
        body = {"result": 1, "attempts": 1, "started_at": start, "duration": duration}
        return HistoryRow(seq, "activity", f"a{seq}", json.dumps(body), error, start)

    def row(seq: int, kind: str, at: float) -> HistoryRow:
        return HistoryRow(seq, kind, kind, "1", False, at)

    assert retry_cut([]) == 1
    assert retry_cut([activity(1, 0, 1), activity(2, 1, 1)]) == 3  # nothing failed
    assert retry_cut([activity(1, 0, 1), activity(2, 1, 1, error=True)]) == 2  # the last step failed
    # in a gather: the failed one and the siblings that started before it ended
    gather = [activity(1, 0, 1), activity(2, 1, 5, error=True), activity(3, 1, 1), row(4, "now", 2)]
    assert retry_cut(gather) == 2
    two_failed = [activity(1, 1, 5, error=True), activity(2, 1, 1, error=True), activity(3, 1, 1)]
    assert retry_cut(two_failed) == 1
    # handled: the workflow went on after it ended, or a wait / publication came after it
    assert retry_cut([activity(1, 0, 1, error=True), activity(2, 2, 1)]) == 3
    assert retry_cut([activity(1, 0, 5, error=True), row(2, "publish", 1)]) == 3
    assert retry_cut([activity(1, 0, 5, error=True), row(2, "sleep", 1)]) == 3
    assert retry_cut([activity(1, 0, 1, error=True), activity(2, 2, 1), activity(3, 3, 1, error=True)]) == 3
    unreadable = HistoryRow(1, "activity", "x", "not json", True, 0)
    assert retry_cut([unreadable]) == 2  # kept: the replay reports the corruption
    text_seq = HistoryRow("2", "now", "now", "1", False, 0)  # type: ignore[arg-type]
    assert retry_cut([activity(1, 0, 1, error=True), text_seq]) == 2  # a step number changed by hand: none


async def test_concurrent_retries_one_applies(make_app: MakeApp, db_url: str) -> None:
    switch = Switch()
    async with build(make_app, switch) as app:
        await failed(app, "pipeline", 1, instance_id="c")
        switch.broken = False
        clients = [geste.App(db_url, run_worker=False) for _ in range(4)]
        for client in clients:
            await client.open()
        try:
            outcomes = await asyncio.gather(*(c.retry("c") for c in clients), return_exceptions=True)
        finally:
            for client in clients:
                await client.close()
        records = [o for o in outcomes if isinstance(o, geste.RetryRecord)]
        refused = [o for o in outcomes if isinstance(o, InstanceStateError)]
        assert len(records) == 1 and len(refused) == 3, outcomes
        for error in refused:  # the losers are told of the winner's retry
            assert "(retry 1 at " in str(
                error
            ) and "not failed: only a failed instance can be retried" in str(error)
            assert error.status in ("waiting", "running", "completed")
        assert await app.get_handle("c").result(timeout=10) == 20
        assert len(await app.retries("c")) == 1
        assert [e.name for e in await app.history("c")] == ["first", "second"]


async def test_a_retry_is_refused_unless_the_instance_failed(make_app: MakeApp, db_url: str) -> None:
    switch = Switch()
    switch.broken = False
    async with build(make_app, switch) as app:
        done = await app.start_workflow("pipeline", 1, instance_id="done")
        await done.result(timeout=10)
        await app.start_workflow("listener", instance_id="waits")
        await wait_status(app, "waits", geste.Status.WAITING)
        await app.start_workflow("listener", instance_id="cancelled")
        await wait_status(app, "cancelled", geste.Status.WAITING)
        await app.cancel("cancelled")
        await wait_status(app, "cancelled", geste.Status.CANCELLED)
        before = await raw_query(db_url, "SELECT * FROM geste_history ORDER BY instance_id, seq")
        for instance_id, status in (("done", "completed"), ("waits", "waiting"), ("cancelled", "cancelled")):
            with pytest.raises(InstanceStateError) as refused:
                await app.retry(instance_id)
            assert (refused.value.instance_id, refused.value.status) == (instance_id, status)
            assert f"is {status}, not failed" in str(refused.value)
        for missing in ("nope", "a\x00b"):
            with pytest.raises(InstanceNotFoundError):
                await app.retry(missing)
            with pytest.raises(InstanceNotFoundError):
                await app.retries(missing)
        with pytest.raises(geste.errors.ConfigurationError):
            await app.retry(42)  # type: ignore[arg-type]
        assert await raw_query(db_url, "SELECT * FROM geste_history ORDER BY instance_id, seq") == before
        assert await raw_query(db_url, "SELECT * FROM geste_retries") == []
        assert (await app.get_instance("waits")).status == geste.Status.WAITING


async def test_an_instance_whose_compensations_ran_is_not_retried(make_app: MakeApp, db_url: str) -> None:
    switch = Switch()
    async with build(make_app, switch) as app:
        await failed(app, "saga", 1, instance_id="g")
        assert "undo:g" in switch.runs
        history = await app.history("g")
        switch.broken = False
        with pytest.raises(InstanceStateError, match="its compensations ran") as refused:
            await app.retry("g")
        assert refused.value.status == "failed"
        assert await app.history("g") == history
        assert (await app.get_instance("g")).status == geste.Status.FAILED
    assert await raw_query(db_url, "SELECT * FROM geste_retries") == []


async def test_a_failed_instance_whose_cancel_was_requested_ends_cancelled_when_retried(
    make_app: MakeApp,
) -> None:
    """The cancel came while its last activity failed: the retry keeps the request, which is delivered
    at the first new step, before the failed activity could run again. The cancel comes from another App
    and the worker neither listens nor renews within the test: it does not reach the running activity
    (which it would cancel, tests/test_cancel_running.py), which fails on its own."""
    switch = Switch()
    async with (
        build(make_app, switch, lock_timeout=60.0, listen_notify=False) as app,
        make_app(run_worker=False) as canceller,
    ):
        entered = asyncio.Event()

        @app.activity(retry=geste.RetryPolicy(max_attempts=1))
        async def slow_failure(ctx: geste.ActivityContext) -> None:
            switch.runs.append("slow_failure")
            entered.set()
            while switch.broken:
                await asyncio.sleep(0.01)
            raise RuntimeError("failed after the cancel")

        @app.workflow
        async def late(ctx: geste.WorkflowContext) -> None:
            await slow_failure(ctx)

        handle = await late.start_with_id("late")
        await asyncio.wait_for(entered.wait(), 10)
        await canceller.cancel("late")
        switch.broken = False
        with pytest.raises(geste.errors.WorkflowFailed):
            await handle.result(timeout=10)
        assert (await app.get_instance("late")).cancel_requested
        await app.retry("late")
        with pytest.raises(geste.errors.WorkflowCancelled):
            await handle.result(timeout=10)
        assert switch.runs == ["slow_failure"]
        assert [e.kind for e in await app.history("late")] == ["cancelled"]


# -- resume --------------------------------------------------------------------------------------------
async def run_at(app: geste.App, instance_id: str) -> float | None:
    row = await app.storage.get_instance(instance_id)
    assert row is not None
    return row.run_at


async def test_resume_runs_now_an_instance_put_back_with_a_delay(make_app: MakeApp) -> None:
    """An instance offered again only in a minute (a worker put it back after an error in the engine);
    the operator does not wait for that. The worker here registers the workflow only later: until then
    it never claims the instance."""
    switch = Switch()
    async with build(make_app, switch) as app:
        client = geste.App(app.url, run_worker=False)

        @client.workflow
        async def newcomer(ctx: geste.WorkflowContext) -> str:
            return "here"

        async with client:
            await client.start_workflow("newcomer", instance_id="n")
            now = time.time()
            (claim,) = await client.storage.claim("elsewhere", now, now + 600, 1, workflows=["newcomer"])
            await client.storage.release([claim.lease], now, run_at=now + 60)
            app.workflow(newcomer.fn)
            result = await app.resume("n")
            assert (result.instance_id, result.lease_broken_from, result.already_runnable) == (
                "n",
                None,
                False,
            )
            assert result.was_due_at is not None and result.was_due_at.timestamp() == pytest.approx(now + 60)
            assert await app.get_handle("n").result(timeout=10) == "here"


async def test_resume_breaks_the_lease_of_a_dead_worker(make_app: MakeApp) -> None:
    switch = Switch()
    switch.broken = False
    async with build(make_app, switch, run_worker=False) as client:
        for instance_id, worker_id in (("held-by-ghost", "ghost"), ("held-by-stranger", "stranger")):
            await client.start_workflow("pipeline", 1, instance_id=instance_id)
            now = time.time()
            (claim,) = await client.storage.claim(worker_id, now, now + 600, 1, workflows=["pipeline"])
            assert claim.lease.instance_id == instance_id
        # "ghost" registered and went silent an hour ago; "stranger" is not in the registry at all
        await client.storage.upsert_worker(WorkerRow("ghost", "h", 1, now - 3600, now - 3600, 1, 1, None))
        results = [await client.resume(i) for i in ("held-by-ghost", "held-by-stranger")]
        assert [r.lease_broken_from for r in results] == ["ghost", "stranger"]
        for instance_id in ("held-by-ghost", "held-by-stranger"):
            info = await client.get_instance(instance_id)
            assert (info.locked_by, info.lock_expires_at) == (None, None)
        async with build(make_app, switch) as worker:
            assert await worker.get_handle("held-by-ghost").result(timeout=10) == 20
            assert await worker.get_handle("held-by-stranger").result(timeout=10) == 20


async def test_a_worker_with_long_leases_is_alive_between_its_heartbeats(make_app: MakeApp) -> None:
    """Liveness uses the longer of the worker's lock_timeout and the reader's: a worker with 300 s leases
    heartbeats every 100 s, and one heard from 100 s ago is alive for a reader with 2 s leases."""
    switch = Switch()
    async with build(make_app, switch, run_worker=False, lock_timeout=2.0) as client:
        await client.start_workflow("listener", instance_id="long")
        now = time.time()
        assert len(await client.storage.claim("patient", now, now + 300, 1, workflows=["listener"])) == 1
        row = WorkerRow("patient", "h", 1, now - 500, now - 100, 1, 1, None, lock_timeout=300.0)
        await client.storage.upsert_worker(row)
        with pytest.raises(InstanceLeasedError):
            await client.resume("long")
        (worker,) = (await client.status()).workers
        assert (worker.worker_id, worker.state, worker.lock_timeout) == ("patient", "alive", 300.0)
        # without its lock_timeout recorded (a row of an older geste), the reader's own decides
        await client.storage.upsert_worker(dataclasses.replace(row, lock_timeout=None))
        assert (await client.status()).workers[0].state == "stale"
        assert (await client.resume("long")).lease_broken_from == "patient"
    async with build(make_app, switch) as app:  # a worker records its own lock_timeout
        (worker,) = [w for w in (await app.status()).workers if w.worker_id == app.worker_id]
        assert worker.lock_timeout == app.lock_timeout == 2.0


async def test_a_live_workers_lease_is_broken_only_when_forced_and_its_result_is_recorded_once(
    make_app: MakeApp,
) -> None:
    """Worker A runs an activity; the operator forces a resume; worker B runs the instance again. A's
    activity then returns, but A's write names the broken lease: only B's outcome is recorded."""
    release = asyncio.Event()
    executions: list[str] = []

    def build_holder(worker_id: str) -> geste.App:
        # concurrency 1: A, whose slot the held run fills, cannot take the instance back itself
        app = make_app(worker_id=worker_id, lock_timeout=30.0, concurrency=1)

        @app.activity
        async def hold(ctx: geste.ActivityContext) -> str:
            executions.append(worker_id)
            await release.wait()
            return worker_id

        @app.workflow
        async def held(ctx: geste.WorkflowContext) -> str:
            return await hold(ctx)

        return app

    async with build_holder("worker-a") as a:
        await a.start_workflow("held", instance_id="h")  # created already claimed by A
        await wait_until(lambda: executions == ["worker-a"], "A to run the activity")
        with pytest.raises(InstanceLeasedError) as refused:
            await a.resume("h")
        assert (refused.value.worker_id, refused.value.status) == ("worker-a", "running")
        assert "--force" in str(refused.value)
        assert (await a.get_instance("h")).locked_by == "worker-a"
        with pytest.raises(geste.errors.ConfigurationError, match="force must be True or False"):
            await a.resume("h", force=1)  # type: ignore[arg-type]
        assert (await a.get_instance("h")).locked_by == "worker-a"

        forced = await a.resume("h", force=True)
        assert forced.lease_broken_from == "worker-a"
        async with build_holder("worker-b") as b:
            await wait_until(lambda: "worker-b" in executions, "B to run the activity")
            release.set()  # both runs' activities return; A's write names the broken lease
            assert await b.get_handle("h").result(timeout=10) == "worker-b"
            history = await b.history("h")
    assert executions == ["worker-a", "worker-b"]  # at least once ...
    (row,) = history  # ... recorded once
    assert (row.kind, row.payload["result"], row.is_error) == ("activity", "worker-b", False)


async def test_resume_refuses_finished_instances_and_never_cuts_a_sleep_short(make_app: MakeApp) -> None:
    switch = Switch()
    async with build(make_app, switch) as app:
        await failed(app, "pipeline", 1, instance_id="f")
        with pytest.raises(InstanceStateError, match="is failed: only an unfinished instance") as refused:
            await app.resume("f")
        assert "geste retry" in str(refused.value)
        switch.broken = False
        await (await app.start_workflow("pipeline", 1, instance_id="ok")).result(timeout=10)
        with pytest.raises(InstanceStateError, match="is completed"):
            await app.resume("ok")
        with pytest.raises(InstanceNotFoundError):
            await app.resume("nope")

        await app.start_workflow("napper", instance_id="z")
        await wait_status(app, "z", geste.Status.WAITING)
        due = await run_at(app, "z")
        assert due is not None and due > time.time() + 3000
        worker = app._worker
        assert worker is not None
        claimed = worker.claimed
        result = await app.resume("z")
        assert (result.already_runnable, result.lease_broken_from) == (False, None)
        assert result.was_due_at is not None and result.was_due_at.timestamp() == pytest.approx(due)
        await wait_until(lambda: worker.claimed > claimed, "a worker to take the resumed instance")
        await wait_status(app, "z", geste.Status.WAITING)
        assert await run_at(app, "z") == pytest.approx(due)  # it replayed and sleeps on
        assert [e.kind for e in await app.history("z")] == ["sleep"]


# -- across processes ----------------------------------------------------------------------------------
@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


async def test_a_worker_in_another_process_takes_the_retried_instance(
    db_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    from tests.apps.operations_app import build_app

    markers = tmp_path / "markers"
    markers.mkdir()
    ready, output = tmp_path / "ready", tmp_path / "worker.out"
    # On PostgreSQL the worker polls every 120 s: only the retry's NOTIFY can wake it within the test's wait.
    timings = ["--poll-interval=120", "--lock-timeout=120", "--fallback-interval=300"]
    command = ["tests.apps.operations_app", db_url, f"--ready={ready}"]
    command += [f"--markers={markers}", *(timings if db_url.startswith("postgres") else [])]
    proc = start_process(command, output=output)
    procs.append(proc)
    await wait_ready(proc, ready, output=output, what="the worker process", timeout=20)
    async with build_app(db_url, run_worker=False) as client:
        handle = await client.start_workflow("pipeline", 4, instance_id="remote")
        with pytest.raises(geste.errors.WorkflowFailed, match="the service is down"):
            await handle.result(timeout=10)
        (markers / "fixed").touch()
        record = await client.retry("remote")
        assert [e.name for e in record.removed] == ["second"]
        assert await handle.result(timeout=10) == {"value": 50, "pid": proc.pid}
    assert (markers / "first-remote").read_text().splitlines() == [str(proc.pid)]  # ran once
    proc.terminate()
    assert proc.wait(timeout=15) == 0, output.read_text()


# -- over HTTP -----------------------------------------------------------------------------------------
async def test_retry_and_resume_over_http(make_app: MakeApp, db_url: str) -> None:
    import httpx

    switch = Switch()
    async with build(make_app, switch) as app:
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            await failed(app, "pipeline", 2, instance_id="a/b")
            switch.broken = False
            answer = await http.post("/instances/a%2Fb/retry")
            assert answer.status_code == 202, answer.text
            body = answer.json()
            assert (body["instance_id"], body["retry"], body["from_seq"]) == ("a/b", 1, 2)
            assert body["error"]["message"] == "the service is down" and "traceback" not in body["error"]
            (removed,) = body["removed"]
            assert (removed["name"], removed["is_error"]) == ("second", True)
            assert "traceback" not in removed["payload"]["error"]
            assert (await http.get("/instances/a%2Fb/result", params={"wait": 10})).json()["result"] == 30

            answer = await http.post("/instances/a%2Fb/retry")
            assert answer.status_code == 409
            assert answer.json()["error"]["type"] == "InstanceStateError"
            assert "is completed (retry 1 at " in answer.json()["error"]["message"]
            assert (await http.post("/instances/nope/retry")).status_code == 404
            assert (await http.post("/instances/a%2Fb/retry?x=1")).status_code == 400

            await app.start_workflow("listener", instance_id="w")
            await wait_status(app, "w", geste.Status.WAITING)
            answer = await http.post("/instances/w/resume")
            assert answer.status_code == 202, answer.text
            assert answer.json() == {
                "instance_id": "w",
                "status": "waiting",
                "was_due_at": None,
                "lease_broken_from": None,
                "already_runnable": False,
            }
            assert (await http.post("/instances/w/resume?force=true")).status_code == 202
            assert (await http.post("/instances/w/resume?force=maybe")).status_code == 400
            answer = await http.post("/instances/a%2Fb/resume")
            assert (answer.status_code, answer.json()["error"]["type"]) == (409, "InstanceStateError")
            assert (await http.post("/instances/nope/resume")).status_code == 404
            assert (await http.get("/instances/w/resume")).status_code == 405


async def test_a_bulk_cancel_lists_every_match_once_across_keyset_pages(make_app: MakeApp) -> None:
    """The listing pages by creation key (the viewer's indexes): pages smaller than the matches still
    find each instance once; a status or a name nothing has finds none, a name no database holds too."""
    from geste._client import CANCELLABLE

    app = make_app(run_worker=False)

    @app.workflow
    async def idle(ctx: geste.WorkflowContext) -> None:
        await ctx.wait_event("never")

    async with app:
        ids = [(await idle.start_with_id(f"i{n:02}")).instance_id for n in range(12)]
        await app.cancel("i03")  # asked already: not listed again
        listing, every = app.client.cancellable, CANCELLABLE
        found = await listing(workflow="idle", statuses=every, page=5)
        assert sorted(found) == sorted(set(ids) - {"i03"})
        assert await listing(workflow=None, statuses=[geste.Status.WAITING], page=5) == []  # pending
        assert await listing(workflow="other", statuses=every) == []
        assert await listing(workflow="a\x00b", statuses=every) == []
