"""Patch markers (``ctx.patched``, ``ctx.deprecate_patch``): a deploy that changes a workflow's steps
under its running instances. Old histories (recorded before the patch) replay the old branch, new runs
record a marker and take the new one, on a real database (both backends) and in the replay check, on the
golden histories of both (``tests/golden`` recorded before the patch, ``tests/golden/patched`` with it).

The versions of the ``order`` workflow are in ``tests/apps/replay_app.py``.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

import geste
from geste.testing import ReplayReport, WorkflowEnvironment, check_replay, export_history

from .apps import replay_app
from .support import run_cli, wait_status

GOLDEN = Path(__file__).resolve().parent / "golden"
PATCHED = GOLDEN / "patched"
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def verdicts(report: ReplayReport) -> dict[str, tuple[str, int | None, str | None, str | None]]:
    return {r.instance_id: (r.status.value, r.seq, r.expected, r.found) for r in report.results}


OK = ("ok", None, None, None)


def kinds(rows: list[geste.HistoryEntry]) -> list[tuple[str, str]]:
    return [(str(row.kind), row.name) for row in rows]


async def test_old_and_new_runs_on_a_database(db_url: str) -> None:
    """An instance started on the old code resumes on the patched code down the old branch; one started
    on the patched code records the marker (committed with its next write) and takes the new branch; a
    patch reached live by an old run after its history (patched-late) takes the new branch too."""
    async with replay_app.build("v1", db_url, poll_interval=0.05) as old:
        await old.workflows["order"].start_with_id("old", "pen")
        await wait_status(old, "old", geste.Status.WAITING)
    replay_app.CALLS.clear()
    async with replay_app.build("patched-late", db_url, poll_interval=0.05) as new:
        await new.workflows["order"].start_with_id("new", "book")
        await wait_status(new, "new", geste.Status.WAITING)
        assert replay_app.CALLS == ["check_fraud", "reserve", "pay"]  # the old run ran nothing again
        for item in ("pen", "book"):
            await new.send_event("shipped", {"item": item}, event_id=f"shipped-{item}")
        assert await new.get_handle("old").result(timeout=10) == "p-r-pen"
        assert await new.get_handle("new").result(timeout=10) == "p-r-book"
        old_rows = kinds(await new.history("old"))
        new_rows = kinds(await new.history("new"))
    assert old_rows == [
        ("activity", "reserve"),
        ("activity", "pay"),
        ("wait_event", "shipped"),
        ("event", "shipped"),
        ("activity", "notify"),
        ("patch", "notify-twice"),  # past its history: live, the new branch
        ("activity", "notify"),
    ]
    assert new_rows == [
        ("patch", "fraud-check"),
        ("activity", "check_fraud"),
        ("activity", "reserve"),
        ("activity", "pay"),
        ("wait_event", "shipped"),
        ("event", "shipped"),
        ("activity", "notify"),
        ("patch", "notify-twice"),
        ("activity", "notify"),
    ]
    # both replay against the code that made them, and the patched histories against the deprecation
    report = await check_replay(replay_app.patched_late, database_url=db_url)
    assert verdicts(report) == {"old": OK, "new": OK}
    report = await check_replay(replay_app.app, database_url=db_url)
    assert verdicts(report)["new"] == ("diverged", 1, "patch 'fraud-check'", "activity 'reserve'")


async def test_patched_is_decided_once_per_run_and_checks_its_id() -> None:
    app = geste.App("sqlite:///never-opened.db")
    answers: list[bool] = []

    @app.workflow
    async def twice(ctx: geste.WorkflowContext) -> list[bool]:
        answers.extend([ctx.patched("a"), ctx.patched("a"), ctx.patched("b")])
        ctx.deprecate_patch("c")
        return answers

    async with WorkflowEnvironment(app, start_at=T0):
        handle = await twice.start_with_id("t")
        assert await handle.result() == [True, True, True]
        assert kinds(await app.history("t")) == [("patch", "a"), ("patch", "b")]  # no marker for c

    @app.workflow
    async def bad(ctx: geste.WorkflowContext) -> None:
        ctx.patched("")

    async with WorkflowEnvironment(app, start_at=T0):
        handle = await bad.start_with_id("b")
        with pytest.raises(geste.errors.WorkflowFailed, match="patch name must be a non-empty string"):
            await handle.result()


async def test_patches_lists_the_old_runs_until_they_end(db_url: str) -> None:
    """``app.patches()`` and ``geste patches``: each patch id of a workflow with the unfinished instances
    started before its first marker that lack it (old runs); once they end, none: it can be deprecated."""
    async with replay_app.build("v1", db_url, poll_interval=0.05) as old:
        await old.workflows["order"].start_with_id("old", "pen")
        await wait_status(old, "old", geste.Status.WAITING)
        assert await old.patches() == []
    async with replay_app.build("patched", db_url, poll_interval=0.05) as new:
        await new.workflows["order"].start_with_id("new", "book")
        await wait_status(new, "new", geste.Status.WAITING)
        (found,) = await new.patches()
        assert (found.workflow_name, found.patch_id, found.marked, found.old_runs) == (
            "order",
            "fraud-check",
            1,
            1,
        )
        result = await asyncio.to_thread(run_cli, ["patches", "--database-url", db_url])
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines[0].split() == ["WORKFLOW", "PATCH", "FIRST", "MARKED", "MARKED", "OLD", "RUNS"]
        assert lines[1].split()[:2] == ["order", "fraud-check"] and lines[1].split()[-2:] == ["1", "1"]
        await new.send_event("shipped", {"item": "pen"}, event_id="shipped-pen")
        await new.get_handle("old").result(timeout=10)
        (found,) = await new.patches()
        assert (found.marked, found.old_runs) == (1, 0)
        result = await asyncio.to_thread(run_cli, ["patches", "--database-url", db_url, "--json"])
        assert json.loads(result.output) == [found.as_dict()]
        with pytest.raises(geste.errors.ConfigurationError):
            await new.patches(limit=0)


# -- the replay check on the golden histories of both ---------------------------------------------------
async def record_patched_golden(folder: Path) -> None:
    """(Re)write ``tests/golden/patched`` (this module's ``__main__``): the order workflow's histories
    recorded by its ``patched`` version, with the marker."""
    from .test_replay_check import record_v1

    await asyncio.to_thread(folder.mkdir, exist_ok=True)
    app = replay_app.build("patched")
    async with WorkflowEnvironment(app, start_at=T0) as env:
        await record_v1(app, env.advance)
        for instance_id in ("done", "failed", "waiting"):
            await export_history(app, instance_id, folder / f"order-{instance_id}.json")


IDS = ("done", "failed", "waiting")
PATCH_AT_1 = ("diverged", 1, "patch 'fraud-check'", "activity 'reserve'")
ADDED_AT_1 = ("diverged", 1, "patch 'fraud-check'", "activity 'check_fraud'")
OLD_AT_1 = ("diverged", 1, "activity 'reserve'", "activity 'check_fraud'")


@pytest.mark.parametrize(
    ("version", "old", "new"),
    [
        ("v1", dict.fromkeys(IDS, OK), dict.fromkeys(IDS, PATCH_AT_1)),
        ("patched", dict.fromkeys(IDS, OK), dict.fromkeys(IDS, OK)),
        # a completed old run holds the whole run: the late patch is an old run's there (False)
        ("patched-late", dict.fromkeys(IDS, OK), dict.fromkeys(IDS, OK)),
        ("deprecated", dict.fromkeys(IDS, OLD_AT_1), dict.fromkeys(IDS, OK)),
        # the same change without the patch: every history diverges, old and new
        ("added", dict.fromkeys(IDS, OLD_AT_1), dict.fromkeys(IDS, ADDED_AT_1)),
    ],
)
async def test_golden_histories_before_and_after_the_patch(
    version: str, old: dict[str, tuple[str, int | None, str | None, str | None]], new: dict[str, object]
) -> None:
    code = replay_app.app if version == "v1" else getattr(replay_app, version.replace("-", "_"))
    replay_app.CALLS.clear()
    assert verdicts(await check_replay(code, files=[GOLDEN])) == old
    assert verdicts(await check_replay(code, files=[PATCHED])) == new
    assert replay_app.CALLS == []


def test_the_patched_golden_histories_hold_the_marker() -> None:
    for instance_id in IDS:
        document = json.loads((PATCHED / f"order-{instance_id}.json").read_text())
        first = document["history"][0]
        assert (first["seq"], first["kind"], first["name"], first["payload"]) == (
            1,
            "patch",
            "fraud-check",
            None,
        )


if __name__ == "__main__":  # python -m tests.test_patches: rewrite tests/golden/patched
    asyncio.run(record_patched_golden(PATCHED))


def test_the_replay_check_command_understands_markers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``geste replay-check``: the patched code passes on the histories from before and after the patch;
    the code from before fails on those recorded with it, at the marker."""
    from .test_replay_check import replay_cli

    result = replay_cli(monkeypatch, "tests.apps.replay_app:patched", "tests/golden", "tests/golden/patched")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "6 histories replayed: 6 ok"
    result = replay_cli(monkeypatch, "tests.apps.replay_app:app", "tests/golden/patched", "-v")
    assert result.exit_code == 1, result.output
    assert any(
        "history has patch 'fraud-check', the code now does activity 'reserve'" in line
        for line in result.stdout.splitlines()
    )
