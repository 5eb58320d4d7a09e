"""The replay check: recorded histories (a database read-only, exported files, the golden files of
``tests/golden``) replayed against the current code, with the exact step where a changed workflow
diverges; activities never run, and the database is never written.

The versions of the ``order`` workflow are in ``tests/apps/replay_app.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import geste
from geste.testing import ReplayReport, ReplayStatus, WorkflowEnvironment, check_replay, export_history

from .apps import replay_app
from .support import MovableClock, raw_query, run_cli, wait_status

GOLDEN = Path(__file__).resolve().parent / "golden"
IDS = ("done", "failed", "waiting")
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def verdicts(report: ReplayReport) -> dict[str, tuple[str, int | None, str | None, str | None]]:
    return {r.instance_id: (r.status.value, r.seq, r.expected, r.found) for r in report.results}


OK = ("ok", None, None, None)
EXPECTED: dict[str, dict[str, tuple[str, int | None, str | None, str | None]]] = {
    "v1": dict.fromkeys(IDS, OK),
    "renamed": dict.fromkeys(IDS, ("diverged", 1, "activity 'reserve'", "activity 'reserve_stock'")),
    "removed": dict.fromkeys(IDS, ("diverged", 2, "activity 'pay'", "wait_event 'shipped'")),
    "added": dict.fromkeys(IDS, ("diverged", 1, "activity 'reserve'", "activity 'check_fraud'")),
    "reordered": dict.fromkeys(IDS, ("diverged", 1, "activity 'reserve'", "activity 'pay'")),
    "extended": {
        "done": ("diverged", 6, "the end of the workflow (completed)", "activity 'notify'"),
        "failed": OK,  # it fails before the new step, as it did
        "waiting": OK,  # its history ends before it
    },
}


async def record_v1(app: geste.App, advance: Callable[[float], Any]) -> None:
    """The three instances of the golden histories: completed, failed (compensated), waiting."""
    order = app.workflows["order"]
    done = await order.start_with_id("done", "book")
    failed = await order.start_with_id("failed", "cup")
    for instance_id in ("done", "failed"):
        await wait_status(app, instance_id, geste.Status.WAITING)
    await app.send_event("shipped", {"item": "book"}, event_id="shipped-book")
    assert await done.result(timeout=10) == "p-r-book"
    await advance(3 * 24 * 3600.0)  # past the wait's deadline of 2 days
    with pytest.raises(geste.errors.WorkflowFailed):
        await failed.result(timeout=10)
    await order.start_with_id("waiting", "pen")
    await wait_status(app, "waiting", geste.Status.WAITING)


@pytest.fixture
async def recorded(db_url: str) -> str:
    """A database (each backend) holding the three instances, recorded by a real App with a real worker."""
    clock = MovableClock()
    app = replay_app.build("v1", db_url, clock=clock, poll_interval=0.05, lock_timeout=2.0)

    async def advance(seconds: float) -> None:
        clock.advance(seconds)
        assert app._worker is not None
        app._worker.poke()

    async with app:
        await record_v1(app, advance)
    return db_url


def sqlite_files(path: Path) -> dict[str, Any]:
    """The files of the database's folder, and the database file's digest."""
    return {
        "files": sorted(p.name for p in path.parent.iterdir()),
        "bytes": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


async def snapshot(url: str) -> dict[str, Any]:
    """Every row of every table of the database, in a stable order (and the SQLite file's bytes)."""
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        with closing(sqlite3.connect(path)) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        found: dict[str, Any] = sqlite_files(path)
    else:
        schema = url.rpartition("schema=")[2].split("&")[0]
        rows = await raw_query(
            url, "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
        tables = [r["table_name"] for r in rows]
        found = {}
    for table in sorted(tables):
        rows = await raw_query(url, f"SELECT * FROM {table}")
        found[table] = sorted(json.dumps(row, sort_keys=True, default=str) for row in rows)
    assert found.get("geste_history"), "the snapshot must see the histories"
    return found


@pytest.mark.parametrize("version", list(EXPECTED))
async def test_histories_from_a_database_replay_or_diverge_at_the_exact_step(
    recorded: str, version: str
) -> None:
    before = await snapshot(recorded)
    replay_app.CALLS.clear()
    report = await check_replay(
        getattr(replay_app, "app" if version == "v1" else version), database_url=recorded
    )
    assert verdicts(report) == EXPECTED[version]
    assert report.ok == (version == "v1")
    assert replay_app.CALLS == []  # no activity ran, not even past the end of a history
    assert await snapshot(recorded) == before  # nothing written, not even a -wal or -shm file
    assert [r.instance_id for r in report.results] == ["waiting", "failed", "done"]  # unfinished first
    if version == "renamed":
        line = report.failures[0].describe()
        assert line.startswith("DIVERGED") and "at step 1: history has activity 'reserve'" in line


async def test_a_changed_signature_and_filters(recorded: str) -> None:
    report = await check_replay(replay_app.retyped, database_url=recorded, workflow="order", limit=2)
    assert [r.instance_id for r in report.results] == ["waiting", "failed"]
    assert {r.status for r in report.results} == {ReplayStatus.DIVERGED}
    assert "does not accept it" in (report.results[0].found or "")
    assert (await check_replay(replay_app.app, database_url=recorded, workflow="other")).results == ()

    unknown = geste.App("sqlite:///never-opened.db")  # registers no workflow at all
    report = await check_replay(unknown, database_url=recorded)
    assert {r.instance_id: r.status for r in report.results} == {
        "waiting": ReplayStatus.UNKNOWN_WORKFLOW,  # nothing could resume it: a failure
        "failed": ReplayStatus.SKIPPED,  # finished: nothing will run it again
        "done": ReplayStatus.SKIPPED,
    }
    assert not report.ok
    assert report.summary() == "3 histories replayed: 1 unknown_workflow, 2 skipped"


async def test_a_corrupted_history_is_reported_and_the_others_still_checked(recorded: str) -> None:
    payload = "not json" if recorded.startswith("sqlite") else "{broken"
    await raw_query(
        recorded, "UPDATE geste_history SET payload = $1 WHERE instance_id = $2 AND seq = 2", payload, "done"
    )
    await raw_query(
        recorded, "UPDATE geste_history SET kind = $1 WHERE instance_id = $2 AND seq = 1", "?", "failed"
    )
    report = await check_replay(replay_app.app, database_url=recorded)
    found = {r.instance_id: (r.status, r.seq) for r in report.results}
    assert found == {
        "done": (ReplayStatus.CORRUPTED, 2),
        "failed": (ReplayStatus.CORRUPTED, 1),
        "waiting": (ReplayStatus.OK, None),
    }
    assert "row unreadable" in (report.results[2].message)
    assert "unknown step kind" in report.results[1].message


async def test_database_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(geste.errors.StorageError, match="no SQLite database"):
        await check_replay(replay_app.app, database_url=f"sqlite:///{tmp_path / 'missing.db'}")
    foreign = tmp_path / "foreign.db"
    with closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER)")
    with pytest.raises(geste.errors.NotAGesteDatabaseError):
        await check_replay(replay_app.app, database_url=f"sqlite:///{foreign}")
    (tmp_path / "text.db").write_text("hello, not a database")
    with pytest.raises(geste.errors.NotAGesteDatabaseError):
        await check_replay(replay_app.app, database_url=f"sqlite:///{tmp_path / 'text.db'}")
    with pytest.raises(geste.errors.ConfigurationError, match="either database_url or files"):
        await check_replay(replay_app.app)
    with pytest.raises(geste.errors.ConfigurationError, match="unsupported database URL"):
        await check_replay(replay_app.app, database_url="mysql://x")
    with pytest.raises(geste.errors.ConfigurationError, match="no such history file"):
        await check_replay(replay_app.app, files=[tmp_path / "nothing.json"])


async def record_golden(folder: Path) -> None:
    """(Re)write the golden histories of ``tests/golden`` (run this module's ``__main__``)."""
    app = replay_app.build("v1")
    async with WorkflowEnvironment(app, start_at=T0) as env:
        await record_v1(app, env.advance)
        for instance_id in IDS:
            await export_history(app, instance_id, folder / f"order-{instance_id}.json")


@pytest.mark.parametrize("version", list(EXPECTED))
async def test_golden_histories_in_the_repository(version: str) -> None:
    replay_app.CALLS.clear()
    report = await check_replay(getattr(replay_app, "app" if version == "v1" else version), files=[GOLDEN])
    assert verdicts(report) == EXPECTED[version]
    assert [r.source for r in report.results] == [str(GOLDEN / f"order-{i}.json") for i in IDS]
    assert replay_app.CALLS == []


async def test_exported_files_match_what_the_database_holds(recorded: str, tmp_path: Path) -> None:
    async with replay_app.build("v1", recorded, run_worker=False) as app:
        for instance_id in IDS:
            document = await export_history(app, instance_id, tmp_path / f"{instance_id}.json")
            assert document["format"] == "geste-history" and document["version"] == 1
    assert json.loads((tmp_path / "done.json").read_text())["instance"]["status"] == "completed"
    for version, expected in EXPECTED.items():
        report = await check_replay(
            getattr(replay_app, "app" if version == "v1" else version),
            files=[tmp_path / f"{i}.json" for i in IDS],
        )
        assert verdicts(report) == expected, version


async def test_geste_show_json_output_is_read_too(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from geste.cli import main

    url = f"sqlite:///{tmp_path / 'shop.db'}"
    async with replay_app.build("v1", url) as app:
        await app.workflows["order"].start_with_id("waiting", "pen")
        await wait_status(app, "waiting", geste.Status.WAITING)
    shown = await asyncio.to_thread(
        CliRunner().invoke, main, ["show", "waiting", "--database-url", url, "--json"]
    )
    assert shown.exit_code == 0, shown.output
    (tmp_path / "shown.json").write_text(shown.stdout)
    assert verdicts(await check_replay(replay_app.app, files=[tmp_path / "shown.json"])) == {"waiting": OK}
    report = await check_replay(replay_app.reordered, files=[tmp_path / "shown.json"])
    assert verdicts(report)["waiting"][:2] == ("diverged", 1)


async def test_damaged_files_are_reported_not_crashed_on(tmp_path: Path) -> None:
    good = json.loads((GOLDEN / "order-done.json").read_text())
    (tmp_path / "a-not-json.json").write_text("{ nope")
    (tmp_path / "b-no-kind.json").write_text(
        json.dumps({**good, "history": [{"seq": 1, "name": "x", "payload": 1}]})
    )
    (tmp_path / "c-future.json").write_text(json.dumps({**good, "version": 99}))
    damaged = json.loads(json.dumps(good))
    damaged["history"][1]["payload_text"] = "not json"
    del damaged["history"][1]["payload"]
    (tmp_path / "d-payload.json").write_text(json.dumps(damaged))
    holed = json.loads(json.dumps(good))
    del holed["history"][1]
    (tmp_path / "e-hole.json").write_text(json.dumps(holed))
    (tmp_path / "f-list.json").write_text("[1, 2]")
    (tmp_path / "notes.txt").write_text("not a history: ignored in a folder")

    report = await check_replay(replay_app.app, files=[tmp_path])
    found = [(Path(r.source).name, r.status.value, r.seq) for r in report.results]
    assert found == [
        ("a-not-json.json", "corrupted", None),
        ("b-no-kind.json", "corrupted", None),
        ("c-future.json", "corrupted", None),
        ("d-payload.json", "corrupted", 2),
        ("e-hole.json", "corrupted", 2),  # step 2 missing below later ones: a row removed
        ("f-list.json", "corrupted", None),
    ]
    messages = [r.message for r in report.results]
    assert "not a JSON file" in messages[0]
    assert "history entry 1: kind is None, not a str" in messages[1]
    assert "version 99" in messages[2]
    assert report.results[1].instance_id == "done"  # named even when the rest is damaged


if __name__ == "__main__":  # python -m tests.test_replay_check: rewrite tests/golden
    asyncio.run(record_golden(GOLDEN))


ROOT = Path(__file__).resolve().parent.parent


def replay_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # the CLI puts the current directory on it
    return run_cli(["replay-check", *args])


def test_cli_passes_on_the_golden_histories_and_fails_on_a_breaking_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = replay_cli(monkeypatch, "tests.apps.replay_app:app", "tests/golden")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "3 histories replayed: 3 ok"

    result = replay_cli(monkeypatch, "tests.apps.replay_app:extended", "tests/golden", "-v")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert (
        "DIVERGED         done (order): at step 6: history has the end of the workflow (completed), "
        "the code now does activity 'notify'"
    ) in lines
    assert any(line.startswith("OK               waiting (order)") for line in lines)
    assert lines[-1] == "3 histories replayed: 2 ok, 1 diverged"

    result = replay_cli(
        monkeypatch, "tests.apps.replay_app:renamed", "tests/golden/order-done.json", "--json"
    )
    assert result.exit_code == 1
    printed = json.loads(result.stdout)
    assert printed["ok"] is False
    assert printed["results"][0] | {"source": None} == {
        "instance_id": "done",
        "workflow_name": "order",
        "status": "diverged",
        "source": None,
        "instance_status": "completed",
        "steps": 5,
        "seq": 1,
        "expected": "activity 'reserve'",
        "found": "activity 'reserve_stock'",
        "message": "at step 1: history has activity 'reserve', the code now does activity 'reserve_stock'",
    }


def test_cli_reads_a_database_and_checks_its_arguments(
    monkeypatch: pytest.MonkeyPatch, recorded_sqlite: str
) -> None:
    result = replay_cli(monkeypatch, "tests.apps.replay_app:app", "--database-url", recorded_sqlite)
    assert result.exit_code == 0, result.output
    result = replay_cli(
        monkeypatch, "tests.apps.replay_app:removed", "--database-url", recorded_sqlite, "--limit", "1"
    )
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "DIVERGED         waiting (order): at step 2: history has activity 'pay', the code now does "
        "wait_event 'shipped'",
        "replaying: 1/1",  # progress: plain lines when not on a terminal
        "1 history replayed: 1 diverged",
    ]
    both = replay_cli(
        monkeypatch, "tests.apps.replay_app:app", "tests/golden", "--database-url", recorded_sqlite
    )
    neither = replay_cli(monkeypatch, "tests.apps.replay_app:app")
    for result in (both, neither):
        assert result.exit_code == 2 and "either --database-url URL or history FILES" in result.output
    missing = replay_cli(monkeypatch, "tests.apps.replay_app:app", "--database-url", "sqlite:///nowhere/x.db")
    assert missing.exit_code == 1 and "no SQLite database" in missing.output


@pytest.fixture
def recorded_sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'recorded.db'}"
    clock = MovableClock()

    async def record() -> None:
        app = replay_app.build("v1", url, clock=clock, poll_interval=0.05)

        async def advance(seconds: float) -> None:
            clock.advance(seconds)
            assert app._worker is not None
            app._worker.poke()

        async with app:
            await record_v1(app, advance)

    asyncio.run(record())
    return url


async def test_every_kind_of_step_replays_from_a_live_database_at_each_wait(tmp_path: Path) -> None:
    """Histories stopped at a sleep, at a receive, and finished, through every kind of step, read from
    the database of a running environment (its write-ahead log in use): all ok, nothing run."""
    app = geste.App(f"sqlite:///{tmp_path / 'kinds.db'}")
    ran: list[str] = []

    @app.activity
    async def part(ctx: geste.ActivityContext, n: int) -> int:
        ran.append(f"part{n}")
        return n * 10

    @app.workflow
    async def kinds(ctx: geste.WorkflowContext) -> list[Any]:
        stamp, token, dice = ctx.now(), ctx.uuid4(), ctx.random()
        parts = await asyncio.gather(part(ctx, 1), part(ctx, 2))
        await ctx.subscribe("news", mode="competing")
        await ctx.publish("log", {"parts": parts})
        await ctx.send_event("kinds.started", {"token": str(token)})
        await ctx.sleep(timedelta(hours=1))
        message = await ctx.receive("news", timeout=timedelta(hours=2))
        try:
            await ctx.receive("news", timeout=60)
        except geste.errors.ReceiveTimeout:
            pass
        return [stamp.isoformat(), dice, parts, message.data]

    async with WorkflowEnvironment(app, start_at=T0) as env:
        cancelled = await env.start_with_id(kinds, "cancelled")
        waiting_receive = await env.start_with_id(kinds, "at-receive")
        finished = await env.start_with_id(kinds, "finished")
        await env.advance(timedelta(hours=1))
        await env.send_to(finished.instance_id, "news", "hello")
        await env.advance(60)
        assert (await finished.result())[3] == "hello"
        assert await waiting_receive.status() == geste.Status.WAITING
        await env.cancel(cancelled.instance_id)  # at its receive: its history says so
        await env.start_with_id(kinds, "at-sleep")
        ran.clear()
        report = await check_replay(app, database_url=env.database_url)
        assert verdicts(report) == {"at-sleep": OK, "at-receive": OK, "finished": OK, "cancelled": OK}
        assert ran == []
        assert [r.instance_id for r in report.results][2:] == ["finished", "cancelled"]  # unfinished first


async def test_an_instance_stopped_by_a_divergence_replays_once_the_code_is_fixed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'deploys.db'}"
    async with replay_app.build("v1", url, poll_interval=0.05) as before:
        await before.workflows["order"].start_with_id("caught", "lamp")
        await wait_status(before, "caught", geste.Status.WAITING)
    async with replay_app.build("renamed", url, poll_interval=0.05) as broken:  # a breaking deploy
        await broken.send_event("shipped", {"item": "lamp"})
        with pytest.raises(geste.errors.WorkflowFailed, match="NonDeterminismError"):
            await broken.get_handle("caught").result(timeout=10)
    # Its history ends where the broken code stopped, not at the workflow's end: the fixed code (v1)
    # replays it, the broken one still diverges.
    fixed = await check_replay(replay_app.app, database_url=url)
    assert verdicts(fixed) == {"caught": OK}
    assert fixed.results[0].instance_status == geste.Status.FAILED
    still = await check_replay(replay_app.renamed, database_url=url)
    assert verdicts(still)["caught"][:2] == ("diverged", 1)
