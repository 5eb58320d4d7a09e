"""``ctx.continue_as_new``: a run ends and the next starts under the same instance id with new input and an
empty history, in one transaction; the runs before are kept and shown (API, HTTP, viewer, CLI); a crash
right after the continue, or its transaction failing, loses and duplicates nothing; a cancel before it
wins; events and messages the old run did not take are the new run's; a bad argument is the error
``start`` gives; a history past 10,000 steps is warned about once; the replay check and the testing
environment handle it. On both backends; every wait is for a condition, with a deadline."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import geste
from geste.engine import journal as journal_module
from geste.errors import PayloadTooLargeError, RunNotFoundError, SerializationError, StorageError
from geste.storage import sqlite as sqlite_storage
from geste.testing import ReplayStatus, WorkflowEnvironment, check_replay, export_history

from .processes import WorkerProcesses, worker_processes
from .support import database_at_version, raw_query, run_cli, wait_status, wait_until

MakeApp = Callable[..., geste.App]


def looping_app(make_app: MakeApp, **options: Any) -> tuple[geste.App, list[str]]:
    """An App with ``summing``: each run adds its ``n`` (an activity) and continues until ``n`` is 5."""
    app = make_app(**options)
    keys: list[str] = []

    @app.activity
    async def add(ctx: geste.ActivityContext, total: int, n: int) -> int:
        keys.append(ctx.idempotency_key)
        return total + n

    @app.workflow
    async def summing(ctx: geste.WorkflowContext, n: int, total: int = 0) -> dict[str, int]:
        total = await add(ctx, total, n)
        if n < 5:
            try:
                await ctx.continue_as_new(n + 1, total=total)
            except Exception:  # the signal is a BaseException: this never catches it
                return {"total": -1, "run": ctx.run}
        return {"total": total, "run": ctx.run}

    return app, keys


async def counted(url: str, table: str, instance_id: str) -> int:
    found = await raw_query(url, f"SELECT count(*) AS n FROM {table} WHERE instance_id = $1", instance_id)
    return int(found[0]["n"])


# -- the loop ------------------------------------------------------------------------------------------------
@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_a_loop_continues_as_new_and_ends_with_its_runs_kept(make_app: MakeApp, db_url: str) -> None:
    app, keys = looping_app(make_app)
    async with app:
        handle = await app.workflows["summing"].start_with_id("sum-1", 1)
        assert await handle.result(timeout=30) == {"total": 15, "run": 5}  # waits for the last run's end
        info = await handle.info()
        assert (info.status, info.run, info.steps) == (geste.Status.COMPLETED, 5, 1)
        assert info.input == {"args": [5], "kwargs": {"total": 10}}
        runs = await handle.runs()
        assert runs == await app.runs("sum-1")
        assert [r.run for r in runs] == [1, 2, 3, 4]
        assert [r.input for r in runs] == [
            {"args": [1], "kwargs": {}},
            {"args": [2], "kwargs": {"total": 1}},
            {"args": [3], "kwargs": {"total": 3}},
            {"args": [4], "kwargs": {"total": 6}},
        ]
        assert all(r.ended_as == "continued" and r.steps == 2 and r.instance_id == "sum-1" for r in runs)
        assert runs[0].started_at == info.created_at
        for before, after in itertools.pairwise(runs):
            assert before.started_at <= before.ended_at == after.started_at
        for run in runs:
            entries = await handle.history(run=run.run)
            assert [(e.seq, e.kind) for e in entries] == [
                (1, geste.StepKind.ACTIVITY),
                (2, geste.StepKind.CONTINUE_AS_NEW),
            ]
            following = runs[run.run].input if run.run < len(runs) else info.input
            assert entries[1].payload == {"input": following} and entries[1].name == "summing"
        current = await handle.history()
        assert [(e.seq, e.kind) for e in current] == [(1, geste.StepKind.ACTIVITY)]
        assert await handle.history(run=5) == current  # the current run's number reads it too
        with pytest.raises(RunNotFoundError, match="has no kept run 6"):
            await handle.history(run=6)
        with pytest.raises(geste.errors.ConfigurationError):
            await handle.history(run=0)
        snapshot = await app.metrics.snapshot()
        assert snapshot.value("geste_workflows_continued_total", workflow="summing") == 4
        assert snapshot.value("geste_workflows_ended_total", workflow="summing") == 1
    assert keys == ["sum-1:1", "sum-1:2.1", "sum-1:3.1", "sum-1:4.1", "sum-1:5.1"]  # once each, unique
    assert await counted(db_url, "geste_history", "sum-1") == 1
    assert await counted(db_url, "geste_run_history", "sum-1") == 8
    assert await counted(db_url, "geste_runs", "sum-1") == 4


# -- a worker killed right after a continue commits --------------------------------------------------------
workers = worker_processes("continue_app", exits_on_its_own=True, stop_gracefully=True)
"""Workers of ``tests/apps/continue_app.py``; one of them kills itself (``die_after``), the others stop
with SIGTERM at the end."""


async def killed_after_continues(
    workers: WorkerProcesses, client: geste.App, count: int
) -> geste.WorkflowHandle[Any]:
    """Start ``counter`` (4 runs) and let a worker run it until it kills itself right after its
    ``count``-th continue committed: the next run is committed, runnable, and nobody holds it."""
    handle = await client.start_workflow("counter", 1, 4, [], instance_id="c-1")
    doomed = await workers.spawn("doomed", die_after=count)
    await wait_until(lambda: doomed.poll() is not None, "the worker to kill itself after a continue")
    assert doomed.returncode == -signal.SIGKILL
    info = await handle.info()
    assert (info.status, info.run, info.locked_by) == (geste.Status.PENDING, count + 1, None)
    assert info.input == {"args": [count + 1, 4, list(range(1, count + 1))], "kwargs": {}}
    assert [r.run for r in await handle.runs()] == list(range(1, count + 1))
    assert await handle.history() == []
    return handle


async def test_a_worker_killed_right_after_a_continue_commits_loses_and_duplicates_nothing(
    workers: WorkerProcesses, db_url: str
) -> None:
    async with workers.client() as client:
        handle = await killed_after_continues(workers, client, 2)
        await workers.spawn("survivor")  # finds the next run by polling: nobody holds it
        assert await handle.result(timeout=60) == [1, 2, 3, 4]
        runs = await handle.runs()
        assert [r.run for r in runs] == [1, 2, 3] and all(r.steps == 3 for r in runs)
        for run in runs:
            kinds = [e.kind.value for e in await handle.history(run=run.run)]
            assert kinds == ["activity", "send_event", "continue_as_new"]
        emitted = sorted(entry.event_id for entry in await client.outbox(instance_id="c-1"))
    assert emitted == ["c-1:2", "c-1:2.2", "c-1:3.2", "c-1:4.2"]
    ticks = workers.entries()
    assert sorted(t["key"] for t in ticks) == ["c-1:1", "c-1:2.1", "c-1:3.1", "c-1:4.1"]  # each run once
    assert len({t["pid"] for t in ticks}) == 2  # runs 1-2 by the worker killed, 3-4 by the survivor


async def test_a_cancel_between_two_runs_ends_the_instance_at_once(
    workers: WorkerProcesses, db_url: str
) -> None:
    async with workers.client() as client:
        handle = await killed_after_continues(workers, client, 1)
        info = await client.cancel("c-1")  # the next run never ran: nothing of it to compensate
        assert (info.status, info.run) == (geste.Status.CANCELLED, 2)
        with pytest.raises(geste.errors.WorkflowCancelled):
            await handle.result(timeout=10)
        assert [r.run for r in await handle.runs()] == [1]


# -- the continue's transaction failing ----------------------------------------------------------------------
def fail_the_first_continue(app: geste.App, instance_id: str, seen: list[dict[str, Any]]) -> None:
    """The first ``continue_as_new`` fails inside its transaction, after some of its writes ran (SQLite: its
    last statement names no table; PostgreSQL: its statement divides by zero once every part ran); what
    the database holds right after is put in ``seen``. The run is abandoned and tried again."""
    storage = app.storage
    original = storage.continue_as_new
    if isinstance(storage, sqlite_storage.SQLiteStorage):
        queries, name = sqlite_storage.Q, "continue_outbox"
        broken = "UPDATE geste_no_such_table SET x = 1"
    else:
        queries, name = storage._q, "continue_as_new"  # type: ignore[attr-defined]
        broken = queries[name].replace(
            "AS continued,",
            "AND 1 / ((SELECT count(*) FROM moved) - (SELECT count(*) FROM moved)) = 1 AS continued,",
        )
        assert broken != queries[name]

    async def failing(*args: Any, **kwargs: Any) -> Any:
        if seen:
            return await original(*args, **kwargs)
        saved = queries[name]
        queries[name] = broken
        try:
            with pytest.raises(StorageError):
                await original(*args, **kwargs)
        finally:
            queries[name] = saved
        rows = await raw_query(app.url, "SELECT * FROM geste_instances WHERE instance_id = $1", instance_id)
        seen.append(
            {
                "run": rows[0]["run"],
                "steps": rows[0]["steps"],
                "history": await counted(app.url, "geste_history", instance_id),
                "kept": await counted(app.url, "geste_run_history", instance_id),
                "runs": await counted(app.url, "geste_runs", instance_id),
            }
        )
        raise StorageError("the continue's transaction failed")

    storage.continue_as_new = failing  # type: ignore[method-assign]


async def test_a_continue_whose_transaction_fails_writes_nothing_and_is_taken_again(
    make_app: MakeApp, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    keys: list[str] = []

    @app.activity
    async def tick(ctx: geste.ActivityContext, n: int) -> int:
        keys.append(ctx.idempotency_key)
        return n

    @app.workflow
    async def counter(ctx: geste.WorkflowContext, n: int) -> int:
        await tick(ctx, n)
        await ctx.send_event("counted", {"n": n})  # commits the tick with it
        if n < 3:
            await ctx.continue_as_new(n + 1)
        return n

    seen: list[dict[str, Any]] = []
    fail_the_first_continue(app, "f-1", seen)
    async with app:
        handle = await counter.start_with_id("f-1", 1)
        assert await handle.result(timeout=30) == 3
        runs = await handle.runs()
        emitted = sorted(entry.event_id for entry in await app.outbox(instance_id="f-1"))
    assert seen == [{"run": 1, "steps": 2, "history": 2, "kept": 0, "runs": 0}]  # as before the attempt
    assert "storage failed" in caplog.text
    assert [(r.run, r.steps) for r in runs] == [(1, 3), (2, 3)]
    assert keys == ["f-1:1", "f-1:2.1", "f-1:3.1"]  # the ticks were recorded before: none ran again
    assert emitted == ["f-1:2", "f-1:2.2", "f-1:3.2"]


# -- a cancel before the continue ----------------------------------------------------------------------------
async def test_a_cancel_requested_before_a_continue_wins(make_app: MakeApp, db_url: str) -> None:
    app = make_app()
    entered, release = asyncio.Event(), asyncio.Event()
    undone: list[str] = []

    @app.activity
    async def slow(ctx: geste.ActivityContext) -> None:
        entered.set()
        try:
            await release.wait()
        except asyncio.CancelledError:  # the cancel reaches it (issue 18): it finishes its work anyway
            await release.wait()

    @app.activity
    async def undo(ctx: geste.ActivityContext, what: str) -> None:
        undone.append(what)

    @app.workflow
    async def looping(ctx: geste.WorkflowContext, n: int) -> None:
        ctx.on_failure(undo, f"run {n}")
        await slow(ctx)
        await ctx.continue_as_new(n + 1)

    async with app:
        handle = await looping.start_with_id("x-1", 1)
        await asyncio.wait_for(entered.wait(), 10)
        asked = await app.cancel("x-1")  # the run learns of it now, and delivers it at the continue
        assert asked.cancel_requested and asked.status == geste.Status.RUNNING
        release.set()
        with pytest.raises(geste.errors.WorkflowCancelled):
            await handle.result(timeout=30)
        info = await handle.info()
        history = await handle.history()
        assert await handle.runs() == []
    assert (info.status, info.run) == (geste.Status.CANCELLED, 1)
    assert [(e.seq, e.kind.value) for e in history] == [
        (1, "activity"),
        (2, "cancelled"),
        (3, "compensation"),
    ]
    assert undone == ["run 1"]  # cancelled: its compensations ran (a continue alone runs none)


async def test_a_continue_runs_no_compensation(make_app: MakeApp) -> None:
    app = make_app()
    undone: list[int] = []

    @app.activity
    async def undo(ctx: geste.ActivityContext, n: int) -> None:
        undone.append(n)

    @app.workflow
    async def careful(ctx: geste.WorkflowContext, n: int) -> int:
        ctx.on_failure(undo, n)
        if n < 3:
            await ctx.continue_as_new(n + 1)
        raise RuntimeError("the last run fails")

    async with app:
        handle = await careful.start(1)
        with pytest.raises(geste.errors.WorkflowFailed):
            await handle.result(timeout=30)
    assert undone == [3]  # the last run's own: those of the runs before were dropped with them


# -- events and messages not taken ---------------------------------------------------------------------------
@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_events_sent_before_and_after_a_continue_are_taken_once_by_the_runs(
    make_app: MakeApp, db_url: str
) -> None:
    app = make_app()

    @app.workflow
    async def entity(ctx: geste.WorkflowContext, n: int, seen: list[int]) -> list[int]:
        event = await ctx.wait_event("item")
        seen = [*seen, event.data["i"]]
        if n < 4:
            await ctx.continue_as_new(n + 1, seen)
        return seen

    async with app:
        handle = await entity.start_with_id("e-1", 1, [])
        await wait_status(app, "e-1", geste.Status.WAITING)
        for i in (1, 2, 3):  # sent while run 1 waits: it takes one, the others are kept for the next runs
            await app.send_event("item", {"i": i})

        async def fourth_waits() -> bool:
            info = await handle.info()
            return info.run == 4 and info.status == geste.Status.WAITING

        await wait_until(fourth_waits, "run 4 to wait")
        await app.send_event("item", {"i": 4})  # after the continues
        assert await handle.result(timeout=30) == [1, 2, 3, 4]
    assert await counted(db_url, "geste_event_deliveries", "e-1") == 4


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_messages_published_before_a_continue_are_the_next_runs(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def inbox(ctx: geste.WorkflowContext, n: int, got: list[int]) -> list[int]:
        await ctx.subscribe("box")  # the subscription an earlier run made is kept, cursor and all
        message = await ctx.receive("box", timeout=60)
        got = [*got, message.data]
        if n < 3:
            await ctx.continue_as_new(n + 1, got)
        return got

    async with app:
        handle = await inbox.start_with_id("m-1", 1, [])
        await wait_status(app, "m-1", geste.Status.WAITING)
        for i in (1, 2, 3):
            await app.publish("box", i)
        assert await handle.result(timeout=30) == [1, 2, 3]


# -- a bad argument ------------------------------------------------------------------------------------------
async def test_a_bad_argument_raises_the_error_start_raises_before_anything_is_written(
    make_app: MakeApp, db_url: str
) -> None:
    app = make_app(max_payload_bytes=1000)
    caught: list[str] = []

    @app.workflow
    async def typed(ctx: geste.WorkflowContext, n: int) -> None:
        try:
            await ctx.continue_as_new(1, 2, 3)
        except SerializationError as exc:
            caught.append(f"{type(exc).__name__}: {exc}")
        try:
            await ctx.continue_as_new("x" * 2000)
        except PayloadTooLargeError as exc:
            caught.append(f"{type(exc).__name__}: {exc}")
        await ctx.continue_as_new(object())  # not JSON: the instance fails with it

    async with app:
        for args in ((1, 2, 3), ("x" * 2000,)):
            with pytest.raises(SerializationError) as started:
                await typed.start(*args)
            caught.append(f"{type(started.value).__name__}: {started.value}")
        handle = await typed.start_with_id("b-1", 1)
        with pytest.raises(geste.errors.WorkflowFailed) as failed:
            await handle.result(timeout=30)
        info = await handle.info()
        assert await handle.runs() == []
    assert failed.value.error["type"] == "geste.errors.SerializationError"
    assert caught[0] == caught[2] and caught[1] == caught[3], caught  # in the workflow as at start
    assert caught[0].startswith("SerializationError: workflow typed:")
    assert caught[1].startswith("PayloadTooLargeError: input of workflow typed is")
    assert (info.run, info.steps) == (1, 0)
    assert await counted(db_url, "geste_runs", "b-1") == 0


# -- long histories -----------------------------------------------------------------------------------------
async def test_a_history_past_10000_steps_is_warned_about_once(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    suggested: list[bool] = []

    @app.workflow
    async def chatty(ctx: geste.WorkflowContext) -> int:
        for _ in range(10_001):  # buffered: one commit, at the end
            suggested.append(ctx.continue_as_new_suggested)
            ctx.now()
        suggested.append(ctx.continue_as_new_suggested)
        return len(suggested)

    caplog.set_level(logging.WARNING, logger="geste.engine")
    async with app:
        assert await (await chatty.start_with_id("long-1")).result(timeout=60) == 10_002
        snapshot = await app.metrics.snapshot()
    warned = [r for r in caplog.records if "passed 10000 steps" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert "long-1" in warned[0].getMessage() and "continue_as_new" in warned[0].getMessage()
    assert snapshot.value("geste_long_histories_total", workflow="chatty") == 1
    assert suggested.index(True) == 10_001  # its 10,001st step taken: past 10,000


async def test_the_warning_is_once_per_run_and_a_new_run_starts_short(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "LONG_HISTORY_STEPS", 20)
    app = make_app()

    @app.workflow
    async def growing(ctx: geste.WorkflowContext, n: int) -> int:
        for _ in range(30):
            ctx.now()
        await ctx.sleep(0.01)  # a suspension: the resume replays past the threshold, and says nothing
        for _ in range(30):
            ctx.now()
        if ctx.continue_as_new_suggested and n < 2:
            await ctx.continue_as_new(n + 1)
        return n

    caplog.set_level(logging.WARNING, logger="geste.engine")
    async with app:
        assert await (await growing.start_with_id("g-1", 1)).result(timeout=30) == 2
        snapshot = await app.metrics.snapshot()
    warned = [r.getMessage() for r in caplog.records if "passed 20 steps" in r.getMessage()]
    assert [("run 1" in m, "run 2" in m) for m in warned] == [(True, False), (False, True)], warned
    assert snapshot.value("geste_long_histories_total", workflow="growing") == 2


# -- the testing environment --------------------------------------------------------------------------------
async def test_the_testing_environment_runs_a_continue(tmp_path: Path) -> None:
    app = geste.App(f"sqlite:///{tmp_path / 'unused.db'}")

    @app.workflow
    async def ticker(ctx: geste.WorkflowContext, n: int) -> int:
        await ctx.sleep(3600)
        if n < 3:
            await ctx.continue_as_new(n + 1)
        return n

    async with WorkflowEnvironment(app) as env:
        start = env.now
        handle = await env.start(ticker, 1)
        assert (await handle.info()).status == geste.Status.WAITING
        assert await env.result(handle) == 3
        assert (env.now - start).total_seconds() == 3 * 3600
        assert [r.run for r in await app.runs(handle.instance_id)] == [1, 2]
        assert (await handle.info()).run == 3


# -- the replay check ---------------------------------------------------------------------------------------
async def test_the_replay_check_replays_the_current_run_and_a_kept_one(
    make_app: MakeApp, db_url: str, tmp_path: Path
) -> None:
    app, _ = looping_app(make_app)

    @app.workflow
    async def waiter(ctx: geste.WorkflowContext, n: int) -> None:
        await ctx.wait_event("next", match={"n": n})
        await ctx.continue_as_new(n + 1)

    async with app:
        assert (await (await app.workflows["summing"].start_with_id("r-1", 1)).result(timeout=30))["run"] == 5
        await waiter.start_with_id("w-1", 1)
        await app.send_event("next", {"n": 1})

        async def second_waits() -> bool:
            info = await app.get_instance("w-1")
            return info.run == 2 and info.status == geste.Status.WAITING

        await wait_until(second_waits, "run 2 of w-1 to wait")
        kept = tmp_path / "r-1-run-2.json"
        document = await export_history(app, "r-1", kept, run=2)
        with pytest.raises(RunNotFoundError):
            await export_history(app, "r-1", run=5)
    assert document["instance"]["run"] == 2 and document["instance"]["input"] == {
        "args": [2],
        "kwargs": {"total": 1},
    }

    report = await check_replay(app, database_url=db_url)  # each instance's current run, with its input
    assert report.ok and len(report.results) == 2, [r.describe() for r in report.results]
    files = await check_replay(app, files=[kept])
    assert files.ok and files.results[0].message == "replays its 2 steps and ends continued as new"

    changed = geste.App(db_url)  # the loop's code changed: it now ends where it continued

    @changed.activity
    async def add(ctx: geste.ActivityContext, total: int, n: int) -> int:
        return total + n

    @changed.workflow
    async def summing(ctx: geste.WorkflowContext, n: int, total: int = 0) -> int:
        return await add(ctx, total, n)

    diverged = (await check_replay(changed, files=[kept])).results[0]
    assert diverged.status == ReplayStatus.DIVERGED
    assert (diverged.seq, diverged.expected) == (2, "continue_as_new 'summing'")
    assert diverged.found == "the end of the workflow (completed)"


async def test_the_replay_check_reads_a_database_of_the_schema_before_15(db_url: str) -> None:
    """A copy of production is checked before its upgrade: its instances have no run number yet."""
    rows = [
        "INSERT INTO {t}geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, "
        "steps) VALUES ('old-1', 'waiter', 'waiting', '{{\"args\": [1], \"kwargs\": {{}}}}', 1.0, 1.0, 1)",
        "INSERT INTO {t}geste_history (instance_id, seq, kind, name, payload, created_at) "
        "VALUES ('old-1', 1, 'wait_event', 'next', "
        '\'{{"match":{{"n":1}},"timeout":null,"deadline":null}}\', 1.0)',
    ]
    await database_at_version(db_url, 13, rows)
    app = geste.App(db_url)

    @app.workflow
    async def waiter(ctx: geste.WorkflowContext, n: int) -> None:
        await ctx.wait_event("next", match={"n": n})
        await ctx.continue_as_new(n + 1)

    report = await check_replay(app, database_url=db_url)
    assert report.ok and [r.instance_id for r in report.results] == ["old-1"], report.summary()


# -- shown by the API over HTTP, the viewer and the CLI ------------------------------------------------------
async def test_the_runs_are_shown_over_http_in_the_viewer_and_by_the_cli(
    make_app: MakeApp, db_url: str
) -> None:
    app, _ = looping_app(make_app)
    async with app:
        await (await app.workflows["summing"].start_with_id("v-1", 1)).result(timeout=30)
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            assert (await http.get("/instances/v-1")).json()["run"] == 5
            listed = (await http.get("/instances/v-1/runs")).json()
            assert listed["run"] == 5 and [r["run"] for r in listed["runs"]] == [1, 2, 3, 4]
            assert listed["runs"][1]["input"] == {"args": [2], "kwargs": {"total": 1}}
            assert listed["runs"][1]["ended_as"] == "continued"
            kept = (await http.get("/instances/v-1/history", params={"run": "2"})).json()
            assert kept["run"] == 2 and [e["kind"] for e in kept["history"]] == [
                "activity",
                "continue_as_new",
            ]
            assert kept["history"][1]["payload"] == {"input": {"args": [3], "kwargs": {"total": 3}}}
            current = (await http.get("/instances/v-1/history")).json()
            assert [e["kind"] for e in current["history"]] == ["activity"] and "run" not in current
            missing = await http.get("/instances/v-1/history", params={"run": "9"})
            assert missing.status_code == 404 and missing.json()["error"]["type"] == "RunNotFoundError"
            assert (await http.get("/instances/v-1/history", params={"run": "two"})).status_code == 400

            browser = {"accept": "text/html"}
            page = (await http.get("/ui/instances/v-1", headers=browser)).text
            assert (
                "Runs · 5" in page
                and "/ui/instances/v-1?run=2" in page
                and "History · 1 step (run 5)" in page
            )
            kept_page = await http.get("/ui/instances/v-1", params={"run": "2"}, headers=browser)
            assert kept_page.status_code == 200
            assert "continued as new:" in kept_page.text and "summing(3, total=3)" in kept_page.text
            assert "2 of 5" in kept_page.text and "/ui/instances/v-1?run=3" in kept_page.text
            last_kept = (await http.get("/ui/instances/v-1", params={"run": "4"}, headers=browser)).text
            assert 'href="/ui/instances/v-1"' in last_kept  # its next run is the current one
            assert (
                await http.get("/ui/instances/v-1", params={"run": "7"}, headers=browser)
            ).status_code == 404
            assert (
                await http.get("/ui/instances/v-1", params={"run": "x"}, headers=browser)
            ).status_code == 400

    shown = await asyncio.to_thread(run_cli, ["show", "v-1", "--database-url", db_url])
    assert shown.exit_code == 0, shown.output
    assert "runs before:" in shown.output and "continued; input" in shown.output
    assert "run        5 (runs before it: geste show v-1 --run N)" in shown.output
    kept_shown = await asyncio.to_thread(run_cli, ["show", "v-1", "--database-url", db_url, "--run", "2"])
    assert kept_shown.exit_code == 0, kept_shown.output
    assert "run        2 of 5 (4 kept); continued: run 3" in kept_shown.output
    assert 'continued as new with {"args": [3], "kwargs": {"total": 3}}' in kept_shown.output
    as_json = await asyncio.to_thread(
        run_cli, ["show", "v-1", "--database-url", db_url, "--run", "2", "--json"]
    )
    document = json.loads(as_json.output)
    assert document["instance"]["run"] == 2 and document["instance"]["input"]["args"] == [2]
    assert [e["kind"] for e in document["history"]] == ["activity", "continue_as_new"]
    missing = await asyncio.to_thread(run_cli, ["show", "v-1", "--database-url", db_url, "--run", "9"])
    assert missing.exit_code != 0 and "has no kept run 9" in missing.output
