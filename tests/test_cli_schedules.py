"""``geste schedules`` and ``geste schedule create / pause / resume / delete``, on each backend.

The commands run in this process through click's ``CliRunner``; what they wrote is read back with an App
(``list_schedules``), and bad input is refused with one ``Error:`` line and its exit code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result

import geste

from .support import run_cli

ROOT = Path(__file__).resolve().parents[1]
APP = "tests.apps.cli_app:app"
Cli = Callable[..., Result]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, db_url: str) -> Cli:
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("GESTE_DATABASE_URL", raising=False)
    monkeypatch.delenv("GESTE_APP", raising=False)

    def invoke(*args: str) -> Result:
        result: Result = run_cli([*args, "--database-url", db_url])
        return result

    return invoke


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def refused(result: Result, exit_code: int, fragment: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert fragment in error, result.stderr


def stored(db_url: str) -> list[geste.ScheduleInfo]:
    async def go() -> list[geste.ScheduleInfo]:
        async with geste.App(db_url, run_worker=False) as app:
            return await app.list_schedules()

    return asyncio.run(go())


def test_create_list_pause_resume_delete(cli: Cli, db_url: str) -> None:
    assert ok(cli("schedules")) == "no schedules\n"
    out = ok(
        cli(
            "schedule", "create", "nightly-paris", "--workflow", "nightly", "--cron", "0 2 * * *",
            "--timezone", "Europe/Paris", "--missed", "all", "--overlap", "alongside", "--app", APP,
        )
    )  # fmt: skip
    assert out.startswith("schedule nightly-paris: nightly at '0 2 * * *' in Europe/Paris\nnext tick ")
    (info,) = stored(db_url)
    assert (info.name, info.workflow_name, info.cron, info.timezone, info.missed, info.overlap) == (
        "nightly-paris",
        "nightly",
        "0 2 * * *",
        "Europe/Paris",
        "all",
        "alongside",
    )
    assert not info.paused and info.next_tick.hour in (0, 1)  # 02:00 in Paris, in UTC

    lines = ok(cli("schedules")).splitlines()
    assert lines[0].split() == [
        "NAME", "WORKFLOW", "CRON", "TIMEZONE", "PAUSED", "NEXT", "TICK", "LAST", "TICK", "LAST", "INSTANCE",
        "QUEUE", "WAITING",
    ]  # fmt: skip
    assert lines[1].split()[-3:] == ["-", "-", "0"]  # no last instance, no queue, no tick waiting
    assert lines[1].split()[:9] == ["nightly-paris", "nightly", "0", "2", "*", "*", "*", "Europe/Paris", "no"]
    (listed,) = json.loads(ok(cli("schedules", "--json")))
    assert (listed["name"], listed["paused"], listed["last_instance_id"]) == ("nightly-paris", False, None)
    assert listed["next_tick"] == info.next_tick.isoformat()

    assert ok(cli("schedule", "pause", "nightly-paris")) == "schedule nightly-paris: paused\n"
    assert [s.paused for s in stored(db_url)] == [True]
    assert ok(cli("schedules")).splitlines()[1].split()[8:10] == ["yes", "-"]  # paused: no next tick
    assert ok(cli("schedule", "resume", "nightly-paris")).startswith("schedule nightly-paris: resumed, next")
    assert [s.paused for s in stored(db_url)] == [False]
    assert ok(cli("schedule", "delete", "nightly-paris")) == "schedule nightly-paris: deleted\n"
    assert stored(db_url) == []


def test_create_updates_a_schedule_of_that_name(cli: Cli, db_url: str) -> None:
    create = ("schedule", "create", "job", "--workflow", "nightly", "--app", APP)
    ok(cli(*create, "--cron", "0 * * * *"))
    ok(cli("schedule", "pause", "job"))
    info = json.loads(ok(cli(*create, "--cron", "15 * * * *", "--json")))
    assert (info["cron"], info["paused"]) == ("15 * * * *", True)
    assert [s.cron for s in stored(db_url)] == ["15 * * * *"]
    onto = ("--overlap", "queue", "--queue", "reports", "--priority", "-1")
    out = ok(cli(*create, "--cron", "15 * * * *", *onto))
    assert out.startswith("schedule job: nightly at '15 * * * *' in UTC onto queue reports (paused)\n")
    (stored_info,) = stored(db_url)
    assert (stored_info.overlap, stored_info.queue, stored_info.priority) == ("queue", "reports", -1)
    assert ok(cli("schedules")).splitlines()[1].split()[-2:] == ["reports", "0"]
    assert json.loads(ok(cli("schedules", "--json")))[0]["queue"] == "reports"


@pytest.mark.parametrize("command", ["pause", "resume", "delete"])
def test_an_unknown_schedule(cli: Cli, command: str) -> None:
    refused(cli("schedule", command, "nope"), 1, "no schedule named 'nope'")


@pytest.mark.parametrize(
    ("options", "exit_code", "fragment"),
    [
        (["--cron", "not a cron"], 1, "bad cron expression 'not a cron'"),
        (["--cron", "0 0 30 2 *"], 1, "bad cron expression"),  # never ticks
        (["--cron", "0 * * * *", "--timezone", "Mars/Olympus"], 1, "unknown time zone 'Mars/Olympus'"),
        (["--cron", "0 * * * *", "--missed", "sometimes"], 2, "'sometimes' is not one of"),
        (["--cron", "0 * * * *", "--overlap", "sometimes"], 2, "'sometimes' is not one of"),
        (["--cron", "0 * * * *", "--priority", "3"], 1, "apply to a start onto a queue"),
        (["--cron", "0 * * * *", "--workflow", "nope"], 1, "no workflow named 'nope'"),
        (["--cron", "0 * * * *", "--app", "tests.apps.cli_app:not_an_app"], 2, "not a geste.App"),
    ],
)
def test_create_refuses_bad_input(
    cli: Cli, db_url: str, options: list[str], exit_code: int, fragment: str
) -> None:
    defaults = {"--workflow": "nightly", "--app": APP}
    given = dict(zip(options[::2], options[1::2], strict=True))
    args = [part for key, value in (defaults | given).items() for part in (key, value)]
    refused(cli("schedule", "create", "job", *args), exit_code, fragment)
    assert stored(db_url) == []


def test_create_needs_an_app(cli: Cli) -> None:
    result = cli("schedule", "create", "job", "--workflow", "nightly", "--cron", "0 * * * *")
    assert result.exit_code == 2 and "--app" in result.stderr
