"""Workflow deadlines (issue 18): ``start(..., timeout=...)`` / ``deadline=...``, stored on the instance
(schema 17). When it passes the instance is cancelled as by ``app.cancel`` (its compensations run; a
running activity is cancelled) and ends ``cancelled`` with ``WorkflowTimeout`` recorded, which
``handle.result()`` raises. A durable timer, not a poll: a suspension's ``run_at`` is capped by the
deadline, and the worker running an instance keeps a local timer for it. A worker killed before the
deadline: another fires it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest

import geste
from geste.errors import ConfigurationError, WorkflowCancelled, WorkflowTimeout
from geste.testing import WorkflowEnvironment, check_replay

from .processes import ROOT, WorkerProcesses, worker_processes, workers_client
from .support import MovableClock, cancelled_outcome, raw_query, wait_status, wait_until

MakeApp = Callable[..., geste.App]
HOUR = 3600.0


async def stored_deadline(app: geste.App, instance_id: str) -> tuple[float | None, float | None]:
    rows = await raw_query(
        app.url, "SELECT deadline, run_at FROM geste_instances WHERE instance_id = $1", instance_id
    )
    return rows[0]["deadline"], rows[0]["run_at"]


async def test_a_deadline_passing_while_an_activity_runs_cancels_it(make_app: MakeApp) -> None:
    """The worker running the instance keeps a local timer for its deadline: the activity (blocked on an
    ``asyncio.Event``) is cancelled there, its outcome ``ActivityCancelled`` (marked as the deadline's),
    the compensation runs, and the end is ``cancelled`` with ``WorkflowTimeout``."""
    app = make_app(lock_timeout=60.0, listen_notify=False)
    seen: list[object] = []

    @app.activity
    async def hang(ctx: geste.ActivityContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append(("CancelledError", ctx.cancelled))
            raise

    @app.activity
    async def undo(ctx: geste.ActivityContext) -> None:
        seen.append("undo")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        ctx.on_failure(undo)
        try:
            await hang(ctx)
        except WorkflowCancelled as exc:  # a deadline is handled as a cancel is
            seen.append(type(exc).__name__)
            raise

    async with app:
        handle = await flow.options(timeout=0.5).start()
        with pytest.raises(WorkflowTimeout):
            await handle.result(timeout=20)
        info = await handle.info()
        history = await handle.history()
        worker = app._worker
        assert worker is not None and worker.renewal_cancels == 0  # nothing asked the database to cancel
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            page = (
                await http.get(f"/ui/instances/{handle.instance_id}", headers={"accept": "text/html"})
            ).text
        step = page[page.index('id="step-1"') - 40 : page.index('id="step-2"')]  # the cancelled activity
        assert (
            '<li class="k-activity cancelled"' in step
            and '<span class="chip cancel">cancelled: deadline' in step
        )
        assert ">failed<" not in step

    assert info.status == geste.Status.CANCELLED and not info.cancel_requested
    assert info.error is not None and info.error["type"] == "geste.errors.WorkflowTimeout"
    assert seen == [("CancelledError", True), "WorkflowTimeout", "undo"]
    assert [(e.kind, e.name) for e in history] == [
        (geste.StepKind.ACTIVITY, "hang"),
        (geste.StepKind.COMPENSATION, "undo"),
    ]
    assert cancelled_outcome(history[0])["deadline"] is True


async def test_a_deadline_wakes_a_sleeping_instance_on_the_test_clock(make_app: MakeApp) -> None:
    """A suspended instance becomes due at its deadline (its run_at, capped by it): the clock moved past
    it, the instance is cancelled at its sleep, compensations run, ``WorkflowTimeout``. Before it, nothing."""
    clock = MovableClock()
    app = make_app(clock=clock)
    undone: list[str] = []

    @app.activity
    async def book(ctx: geste.ActivityContext) -> str:
        return "booked"

    @app.activity
    async def undo(ctx: geste.ActivityContext, what: str) -> None:
        undone.append(what)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        ctx.on_failure(undo, await book(ctx))
        await ctx.sleep(10 * HOUR)
        return "slept"

    async with app:
        start = clock()
        handle = await flow.options(timeout=timedelta(hours=1)).start()
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        deadline, run_at = await stored_deadline(app, handle.instance_id)
        assert deadline == pytest.approx(start + HOUR, abs=5)
        assert run_at == deadline  # not the sleep's end (10 h): the deadline's

        clock.advance(HOUR / 2)  # before the deadline: still waiting
        with pytest.raises(geste.errors.ResultTimeout):
            await handle.result(timeout=0.3)
        clock.advance(HOUR / 2 + 1)
        with pytest.raises(WorkflowTimeout):
            await handle.result(timeout=10)
        history = await handle.history()

    assert undone == ["booked"]
    assert [(e.kind, e.name) for e in history] == [
        (geste.StepKind.ACTIVITY, "book"),
        (geste.StepKind.SLEEP, "sleep"),
        (geste.StepKind.CANCELLED, "deadline"),
        (geste.StepKind.COMPENSATION, "undo"),
    ]
    report = await check_replay(app, database_url=app.url)  # the replay ends as the run did
    assert report.ok and [r.status for r in report.results] == ["ok"], report


async def test_a_deadline_wakes_an_instance_waiting_for_an_event(make_app: MakeApp) -> None:
    """A wait without a timeout (run_at NULL) gets the deadline as its run_at: due then, cancelled there."""
    clock = MovableClock()
    app = make_app(clock=clock)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> object:
        return await ctx.wait_event("never.sent")

    async with app:
        at = datetime.fromtimestamp(clock() + HOUR, UTC)
        handle = await app.start_workflow(flow, deadline=at)
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        deadline, run_at = await stored_deadline(app, handle.instance_id)
        assert deadline == pytest.approx(at.timestamp()) and run_at == deadline
        clock.advance(HOUR + 1)
        with pytest.raises(WorkflowTimeout):
            await handle.result(timeout=10)
        assert (await handle.status()) == geste.Status.CANCELLED


async def test_a_deadline_in_the_workflow_environment() -> None:
    """``geste.testing.WorkflowEnvironment``: ``env.advance`` past the deadline fires it, as a timer."""
    app = geste.App("sqlite:///:memory:")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        await ctx.sleep(timedelta(days=2))
        return "slept"

    async with WorkflowEnvironment(app) as env:
        handle = await flow.options(timeout=timedelta(days=1)).start()
        await env.wait_until_idle()
        assert await handle.status() == geste.Status.WAITING
        await env.advance(timedelta(days=1, seconds=1))
        with pytest.raises(WorkflowTimeout):
            await env.result(handle)


async def test_a_deadline_already_passed_cancels_at_the_first_step(make_app: MakeApp) -> None:
    app = make_app()
    ran: list[str] = []

    @app.activity
    async def act(ctx: geste.ActivityContext) -> None:
        ran.append("act")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        await act(ctx)

    async with app:
        handle = await flow.options(deadline=datetime.now(UTC) - timedelta(seconds=1)).start()
        with pytest.raises(WorkflowTimeout):
            await handle.result(timeout=10)
        history = await handle.history()
    assert ran == []
    assert [(e.kind, e.name) for e in history] == [(geste.StepKind.CANCELLED, "deadline")]


async def test_a_deadline_with_both_options_takes_the_earlier(make_app: MakeApp) -> None:
    app = make_app(run_worker=False)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        pass

    async with app:
        later = datetime.now(UTC) + timedelta(hours=2)
        first = await flow.options(timeout=HOUR, deadline=later).start()
        second = await app.start_workflow("flow", timeout=3 * HOUR, deadline=later)
        plain = await flow.start()
        one, _ = await stored_deadline(app, first.instance_id)
        two, _ = await stored_deadline(app, second.instance_id)
        none, _ = await stored_deadline(app, plain.instance_id)
    assert one is not None and one < later.timestamp() - HOUR / 2
    assert two == pytest.approx(later.timestamp())
    assert none is None


async def test_starting_an_existing_id_keeps_its_deadline(make_app: MakeApp) -> None:
    app = make_app(run_worker=False)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        pass

    async with app:
        first = await flow.options(timeout=HOUR).start_with_id("same")
        again = await flow.options(timeout=10 * HOUR).start_with_id("same")
        assert first.created and not again.created
        kept, _ = await stored_deadline(app, "same")
    assert kept is not None and kept < app.clock() + 2 * HOUR


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"timeout": -1.0}, ">= 0"),
        ({"timeout": 0}, "greater than 0"),
        ({"timeout": timedelta(seconds=-5)}, ">= 0"),
        ({"timeout": float("nan")}, "finite"),
        ({"timeout": "soon"}, "number of seconds"),
        ({"deadline": datetime(2030, 1, 1)}, "aware datetime"),
        ({"deadline": 1_900_000_000.0}, "must be a datetime"),
    ],
)
async def test_bad_deadlines_are_refused_before_anything_is_written(
    make_app: MakeApp, options: dict[str, object], problem: str
) -> None:
    app = make_app(run_worker=False)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        pass

    with pytest.raises(ConfigurationError, match=problem):
        flow.options(**options)  # type: ignore[arg-type]
    async with app:
        with pytest.raises(ConfigurationError, match=problem):
            await app.start_workflow("flow", instance_id="bad", **options)  # type: ignore[arg-type]
        assert await app.list_instances() == []


def test_workflow_timeout_is_a_cancel_in_the_error_tree() -> None:
    assert issubclass(WorkflowTimeout, WorkflowCancelled) and issubclass(WorkflowTimeout, TimeoutError)
    assert "WorkflowTimeout" in geste.errors.__all__


# -- across processes --------------------------------------------------------------------------------


workers = worker_processes("cancel_app")
client = workers_client()


async def test_a_worker_killed_before_the_deadline_another_fires_it(
    workers: WorkerProcesses, client: geste.App
) -> None:
    """w1 runs the instance to its sleep (it keeps the timer) and is killed; w2, started then, never
    heard of it: the instance's run_at (capped by the deadline) makes it due, w2 claims it and cancels it
    (the compensation runs in w2)."""
    w1 = await workers.spawn("w1")
    started = await client.start_workflow("sleepy", HOUR, timeout=3.0)
    iid = started.instance_id
    await wait_status(client, iid, geste.Status.WAITING)
    deadline, run_at = await stored_deadline(client, iid)
    assert deadline is not None and run_at == deadline
    w1.kill()
    w1.wait()
    await workers.spawn("w2")
    with pytest.raises(WorkflowTimeout):
        await started.result(timeout=30)
    undo = workers.entries(instance=iid, event="undo")
    assert [(e["what"], e["worker"]) for e in undo] == [("sleepy", "w2")]
    history = await client.history(iid)
    assert [(e.kind, e.name) for e in history] == [
        (geste.StepKind.SLEEP, "sleep"),
        (geste.StepKind.CANCELLED, "deadline"),
        (geste.StepKind.COMPENSATION, "undo"),
    ]


async def test_a_worker_killed_mid_activity_the_next_one_fires_the_deadline(
    workers: WorkerProcesses, client: geste.App
) -> None:
    """The deadline passes while nobody holds a live lease (w1 killed in the activity): w2 takes the
    instance over at the lease's expiry and cancels it there for its deadline."""
    w1 = await workers.spawn("w1", lock_timeout=1.0)
    started = await client.start_workflow("saga", timeout=2.0)
    iid = started.instance_id
    await wait_until(lambda: workers.entries(instance=iid, event="start"), "the activity to start in w1")
    w1.kill()
    w1.wait()
    await workers.spawn("w2", lock_timeout=1.0)
    with pytest.raises(WorkflowTimeout):
        await started.result(timeout=30)
    undo = workers.entries(instance=iid, event="undo")
    assert [(e["what"], e["worker"]) for e in undo] == [("saga", "w2")]
    assert (await started.info()).status == geste.Status.CANCELLED


async def test_a_deadline_given_over_http(make_app: MakeApp) -> None:
    """``POST /workflows/{name}`` takes ``timeout`` (seconds) and ``deadline`` (ISO 8601 with its offset);
    bad ones are a 400 and write nothing."""
    from .test_http import assert_error, serving

    app = make_app()

    @app.workflow
    async def hold(ctx: geste.WorkflowContext) -> object:
        return await ctx.wait_event("never.sent")

    async with serving(app) as http:
        answer = await http.post("/workflows/hold", json={"instance_id": "t", "timeout": 3600})
        assert answer.status_code == 201
        at = "2030-01-01T00:00:00+00:00"
        answer = await http.post("/workflows/hold", json={"instance_id": "d", "deadline": at})
        assert answer.status_code == 201
        timed, _ = await stored_deadline(app, "t")
        dated, _ = await stored_deadline(app, "d")
        assert timed is not None and timed > app.clock() + HOUR - 60
        assert dated == datetime.fromisoformat(at).timestamp()
        naive = {"instance_id": "x", "deadline": "2030-01-01T00:00:00"}
        assert_error(await http.post("/workflows/hold", json=naive), 400, "ConfigurationError", "aware")
        negative = {"instance_id": "x", "timeout": -1}
        assert_error(await http.post("/workflows/hold", json=negative), 400, "ConfigurationError")
        assert_error(await http.post("/workflows/hold", json={"timeout": "soon"}), 400, "BadRequest")
        assert_error(await http.post("/workflows/hold", json={"deadline": "tomorrow"}), 400, "BadRequest")
        assert_error(await http.post("/workflows/hold", json={"kwargs": {"timeout": 1}}), 400, "BadRequest")
        assert {i.instance_id for i in await app.list_instances()} == {"t", "d"}


def test_a_deadline_given_on_the_command_line(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``geste start NAME --timeout SECONDS``; a bad one is refused and starts nothing."""
    from .support import run_cli

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    app_spec = "tests.apps.cancel_app:app"
    done = run_cli(
        [
            "start",
            "sleepy",
            "[60]",
            "--id",
            "c-1",
            "--timeout",
            "3600",
            "--app",
            app_spec,
            "--database-url",
            db_url,
        ]
    )
    assert done.exit_code == 0, done.output
    assert "started sleepy instance c-1" in done.output
    refused = run_cli(
        [
            "start",
            "sleepy",
            "[60]",
            "--id",
            "c-2",
            "--timeout",
            "-5",
            "--app",
            app_spec,
            "--database-url",
            db_url,
        ]
    )
    assert refused.exit_code != 0 and "workflow timeout" in refused.output

    async def read() -> list[dict[str, object]]:
        return await raw_query(
            db_url, "SELECT instance_id, deadline FROM geste_instances ORDER BY instance_id"
        )

    rows = asyncio.run(read())
    assert [r["instance_id"] for r in rows] == ["c-1"]
    assert isinstance(rows[0]["deadline"], float)


async def test_a_continue_as_new_keeps_the_deadline(make_app: MakeApp) -> None:
    """The deadline is the instance's, not a run's: the third run, asleep, is cancelled at it."""
    clock = MovableClock()
    app = make_app(clock=clock)

    @app.workflow
    async def loop(ctx: geste.WorkflowContext, n: int) -> str:
        if n < 3:
            await ctx.continue_as_new(n + 1)
        await ctx.sleep(10 * HOUR)
        return "slept"

    async with app:
        handle = await loop.options(timeout=HOUR).start(1)

        async def third_run_waits() -> bool:
            info = await handle.info()
            return info.run == 3 and info.status == geste.Status.WAITING

        await wait_until(third_run_waits, "the third run to sleep")
        deadline, run_at = await stored_deadline(app, handle.instance_id)
        assert deadline is not None and run_at == deadline
        clock.advance(HOUR + 1)
        with pytest.raises(WorkflowTimeout):
            await handle.result(timeout=10)


async def test_the_deadline_is_shown_by_info_lists_the_api_geste_show_and_the_viewer(
    make_app: MakeApp, db_url: str
) -> None:
    """``InstanceInfo.deadline`` (an aware datetime; None: none) is read by ``get_instance``,
    ``list_instances`` and the handle; ``GET /instances/{id}`` and ``GET /instances`` carry it (ISO 8601),
    ``geste show`` prints it with how far it is, and the viewer's page has it as a fact."""
    import re

    import httpx

    from .support import run_cli
    from .test_viewer import BROWSER, now_panel, plain

    app = make_app(run_worker=False)  # nothing runs: the passed deadline stays unfired, as shown

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        pass

    later = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    earlier = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    async with app:
        ahead = await flow.options(deadline=later).start_with_id("ahead")
        await flow.options(deadline=earlier).start_with_id("passed")
        await flow.start_with_id("none")
        assert (await ahead.info()).deadline == later
        assert (await app.get_instance("passed")).deadline == earlier
        assert (await app.get_instance("none")).deadline is None
        listed = {info.instance_id: info.deadline for info in await app.list_instances()}
        assert listed == {"ahead": later, "passed": earlier, "none": None}
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            assert (await http.get("/instances/ahead")).json()["deadline"] == later.isoformat()
            assert (await http.get("/instances/none")).json()["deadline"] is None
            everything = (await http.get("/instances")).json()["instances"]
            assert {i["instance_id"]: i["deadline"] for i in everything}["passed"] == earlier.isoformat()
            text = (await http.get("/ui/instances/ahead", headers=BROWSER)).text
            fact = r"Deadline\s+\S+ \S+ UTC \(\s*in (1 h 59 min|2 h)\s*\)"
            assert re.search(fact, plain(text)), plain(text)
            assert re.search(r"Its deadline cancels it in (1 h 59 min|2 h)", now_panel(text))
            text = (await http.get("/ui/instances/passed", headers=BROWSER)).text
            assert re.search(r"Deadline\s+\S+ \S+ UTC \(\s*passed\s+5 min( \d+ s)? ago\s*\)", plain(text))
            passed = r"Its deadline passed 5 min( \d+ s)? ago: it is cancelled when it next runs"
            assert re.search(passed, now_panel(text))
            text = (await http.get("/ui/instances/none", headers=BROWSER)).text
            assert "Deadline" not in plain(text) and "deadline" not in now_panel(text)
    shown = await asyncio.to_thread(run_cli, ["show", "ahead", "--database-url", db_url])
    assert shown.exit_code == 0, shown.output
    stamp = later.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert re.search(rf"^deadline   {stamp} \(in (1h 59m|2h 0m)\)$", shown.output, re.MULTILINE), shown.output
    shown = await asyncio.to_thread(run_cli, ["show", "passed", "--database-url", db_url])
    assert re.search(r"^deadline   \S+ \S+ \(passed\)$", shown.output, re.MULTILINE), shown.output
    shown = await asyncio.to_thread(run_cli, ["show", "none", "--database-url", db_url])
    assert "deadline" not in shown.output
    as_json = json.loads(
        (await asyncio.to_thread(run_cli, ["show", "ahead", "--json", "--database-url", db_url])).output
    )
    assert as_json["instance"]["deadline"] == later.isoformat()
