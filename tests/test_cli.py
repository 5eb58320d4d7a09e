"""The ``geste`` command, end to end on real SQLite files.

Most commands run in this process through click's ``CliRunner``; the demo and the worker also run as
``python -m geste.cli`` subprocesses, the worker with ``tests/apps/cli_app.py`` and real signals.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from geste.cli import _safe_url

from .conftest import die_with_parent
from .support import run_cli, wait_for

ROOT = Path(__file__).resolve().parents[1]
APP = "tests.apps.cli_app:app"

Cli = Callable[..., Result]


def geste_process(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geste.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Cli:
    """Run ``geste ARGS...`` in this process, from the repository root, and check it did not crash."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the current directory on it
    monkeypatch.delenv("GESTE_DATABASE_URL", raising=False)
    monkeypatch.delenv("GESTE_APP", raising=False)

    def invoke(*args: str, **kwargs: Any) -> Result:
        result: Result = run_cli(list(args), **kwargs)
        return result

    return invoke


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def assert_error(result: Result, exit_code: int, *fragments: str) -> None:
    """Exit code as given, exactly one ``Error:`` line naming the problem, and no traceback."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    if exit_code == 1:
        assert result.stderr.strip() == errors[0]
    for fragment in fragments:
        assert fragment in errors[0]


def instance(cli: Cli, url: str, instance_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = json.loads(ok(cli("show", instance_id, "--database-url", url, "--json")))
    return shown


def wait_status(cli: Cli, url: str, instance_id: str, status: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        shown = instance(cli, url, instance_id)
        return shown if shown["instance"]["status"] == status else None

    found: dict[str, Any] = wait_for(reached, f"{instance_id} to be {status}")
    return found


def start(cli: Cli, url: str, name: str, *args: str) -> Result:
    return cli("start", name, *args, "--app", APP, "--database-url", url)


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=10)


@pytest.fixture
def worker(db_url: str, tmp_path: Path) -> Iterator[Worker]:
    """``geste worker tests.apps.cli_app:app`` in a subprocess on the test database, once it has started."""
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "geste.cli", "worker", APP, "--concurrency", "4"],
            cwd=ROOT,
            env={**os.environ, "GESTE_DATABASE_URL": db_url},
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    running = Worker(process, log)
    try:
        wait_for(lambda: "started" in log.read_text() or process.poll() is not None, "the worker to start")
        assert process.poll() is None, log.read_text()
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


# -- demo ---------------------------------------------------------------------------------------------
def test_demo_prints_the_history_as_it_goes() -> None:
    done = geste_process("demo")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()

    def index(pattern: str) -> int:
        return next(n for n, line in enumerate(lines) if re.search(pattern, line))

    reserve = index(r"^\s+1 .*activity\s+reserve\s+→ \"RSV-ORD-1\"")
    charge = index(r"activity\s+charge\s+→ \"CH-ORD-1\" \(2 attempts\)")
    waiting = index(r"wait_event\s+payment\.confirmed\s+waiting for")
    sent = index(r"the demo sends the event payment\.confirmed")
    received = index(r"event\s+payment\.confirmed\s+received")
    sleep = index(r"sleep\s+sleep\s+1s")
    ship = index(r"activity\s+ship")
    assert reserve < charge < waiting < sent < received < sleep < ship
    assert "status: completed" in lines
    assert 'result: {"order_id": "ORD-1", "charge": "CH-ORD-1", "tracking": "TRK-ORD-1"}' in lines


def test_demo_decline_runs_the_compensations(cli: Cli, db_url: str) -> None:
    out = ok(cli("demo", "--database-url", db_url, "--decline"))
    assert re.search(r"compensation\s+refund.*\n.*compensation\s+release", out)
    assert "status: failed" in out
    assert "PaymentDeclined: the bank declined CH-ORD-1" in out
    (row,) = json.loads(ok(cli("list", "--database-url", db_url, "--json")))
    assert (row["workflow_name"], row["status"]) == ("order", "failed")


# -- start, worker --------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_start_runs_on_a_worker_process_until_a_signal(
    cli: Cli, db_url: str, worker: Worker, signum: int
) -> None:
    out = ok(start(cli, db_url, "compute", "[21]", "--id", "c1", "--wait", "20"))
    assert "started compute instance c1" in out
    assert 'result: {"x": 21, "y": 42}' in out
    again = ok(start(cli, db_url, "compute", "[21]", "--id", "c1"))
    assert "instance c1 exists already (completed); not started" in again

    started = time.monotonic()
    assert worker.stop(signum) == 0, worker.log.read_text()
    assert time.monotonic() - started < 5
    log = worker.log.read_text()
    assert f"{signal.Signals(signum).name} received" in log
    assert "stopped" in log
    assert "Traceback" not in log


def test_start_takes_keyword_and_single_arguments(cli: Cli, db_url: str) -> None:
    ok(start(cli, db_url, "approval", '{"order_id": "K"}', "--id", "kw"))
    ok(start(cli, db_url, "approval", '"S"', "--id", "single"))
    assert instance(cli, db_url, "kw")["instance"]["input"] == {"args": [], "kwargs": {"order_id": "K"}}
    assert instance(cli, db_url, "single")["instance"]["input"] == {"args": ["S"], "kwargs": {}}


# -- list, show, cancel, send-event -----------------------------------------------------------------------
def test_list_filters_by_status_and_workflow(cli: Cli, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, args, iid in [("compute", "[1]", "a"), ("compute", "[2]", "b"), ("approval", '["X"]', "c")]:
        ok(start(cli, db_url, name, args, "--id", iid))
    assert ok(cli("cancel", "b", "--database-url", db_url)).strip() == "b: cancelled"  # it never ran

    def ids(*options: str) -> list[str]:
        rows = json.loads(ok(cli("list", "--database-url", db_url, "--json", *options)))
        return sorted(row["instance_id"] for row in rows)

    assert ids() == ["a", "b", "c"]
    assert ids("--status", "cancelled") == ["b"]
    assert ids("--status", "pending") == ["a", "c"]
    assert ids("--workflow", "approval") == ["c"]
    assert ids("--workflow", "compute", "--status", "pending") == ["a"]
    assert ids("--workflow", "nothing") == []
    assert len(ids("--limit", "1")) == 1

    table = ok(cli("list", "--database-url", db_url, "--status", "cancelled")).splitlines()
    assert table[0].split() == ["ID", "WORKFLOW", "STATUS", "STEPS", "CREATED", "UPDATED"]
    assert table[1].split()[:4] == ["b", "compute", "cancelled", "0"]
    assert len(table) == 2
    assert ok(cli("list", "--database-url", db_url, "--status", "failed")).strip() == "no instances"

    monkeypatch.setenv("GESTE_DATABASE_URL", db_url)
    assert "compute" in ok(cli("list", "--workflow", "compute"))


def test_show_prints_the_instance_and_its_history(cli: Cli, db_url: str) -> None:
    ok(cli("demo", "--database-url", db_url))
    (row,) = json.loads(ok(cli("list", "--database-url", db_url, "--json")))
    out = ok(cli("show", row["instance_id"], "--database-url", db_url))
    assert re.search(r"^status\s+completed$", out, re.M)
    assert re.search(r"^input\s+\{\"args\": \[\"ORD-1\", 42\.0\]", out, re.M)
    assert re.search(r"^result\s+\{\"order_id\": \"ORD-1\"", out, re.M)
    timeline = out[out.index("history:") :].splitlines()[1:]
    assert [line.split()[0] for line in timeline] == ["1", "2", "3", "4", "5", "6"]
    assert [line.split()[2:4] for line in timeline] == [
        ["activity", "reserve"],
        ["activity", "charge"],
        ["wait_event", "payment.confirmed"],
        ["event", "payment.confirmed"],
        ["sleep", "sleep"],
        ["activity", "ship"],
    ]
    shown = instance(cli, db_url, row["instance_id"])
    assert [entry["kind"] for entry in shown["history"]][:2] == ["activity", "activity"]
    assert shown["instance"]["result"]["tracking"] == "TRK-ORD-1"


def test_cancel_ends_a_waiting_instance(cli: Cli, db_url: str, worker: Worker) -> None:
    ok(start(cli, db_url, "approval", '["W"]', "--id", "w"))
    wait_status(cli, db_url, "w", "waiting")
    assert ok(cli("cancel", "w", "--database-url", db_url, "--wait", "10")).strip() == "w: cancelled"
    shown = instance(cli, db_url, "w")
    assert [entry["kind"] for entry in shown["history"]] == ["wait_event", "cancelled"]
    assert "cancellation delivered" in ok(cli("show", "w", "--database-url", db_url))


def test_send_event_wakes_a_waiting_instance(cli: Cli, db_url: str, worker: Worker) -> None:
    ok(start(cli, db_url, "approval", '["E"]', "--id", "e"))
    wait_status(cli, db_url, "e", "waiting")
    data = '{"order_id": "E", "by": "ann"}'
    out = ok(cli("send-event", "approved", data, "--database-url", db_url, "--instance", "e", "--id", "ev-1"))
    assert out.strip() == "sent approved event ev-1"
    shown = wait_status(cli, db_url, "e", "completed")
    assert shown["instance"]["result"] == {"order_id": "E", "by": "ann"}


def test_migrate_prints_each_migration_and_the_schema_version(cli: Cli, db_url: str) -> None:
    from geste.storage._sql import migration_names

    names = migration_names("sqlite" if db_url.startswith("sqlite") else "postgres")
    first = ok(cli("migrate", "--database-url", db_url)).splitlines()
    # not a terminal: plain lines, one per migration applied
    assert first[:-1] == [f"migrating {n}/{len(names)}: {names[n]}" for n in sorted(names)]
    assert first[-1] == f"schema version {len(names)} ({_safe_url(db_url)})"
    assert ok(cli("migrate", "--database-url", db_url)).splitlines() == first[-1:]  # nothing to apply


# -- errors ---------------------------------------------------------------------------------------------
def test_unknown_workflow_name(cli: Cli, db_url: str) -> None:
    known = "known: approval, compute, nightly"
    assert_error(start(cli, db_url, "nope"), 1, "no workflow named 'nope'", known)


def test_arguments_that_do_not_fit_the_workflow(cli: Cli, db_url: str) -> None:
    assert_error(start(cli, db_url, "compute", "[1, 2]"), 1, "workflow compute", "too many")


@pytest.mark.parametrize(
    "args",
    [
        ["start", "compute", "{not json", "--app", APP],
        ["send-event", "approved", "[1,"],
    ],
    ids=["start", "send-event"],
)
def test_invalid_json_is_a_usage_error(cli: Cli, db_url: str, args: list[str]) -> None:
    assert_error(cli(*args, "--database-url", db_url), 2, "not valid JSON")


@pytest.mark.parametrize(
    "args",
    [["show", "nope"], ["cancel", "nope"], ["send-event", "approved", "--instance", "nope"]],
    ids=["show", "cancel", "send-event"],
)
def test_unknown_instance_id(cli: Cli, db_url: str, args: list[str]) -> None:
    assert_error(cli(*args, "--database-url", db_url), 1, "no workflow instance with id 'nope'")


@pytest.mark.parametrize("command", ["list", "migrate", "show x", "send-event t"])
def test_a_file_that_is_not_a_geste_database(cli: Cli, tmp_path: Path, command: str) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    result = cli(*command.split(), "--database-url", f"sqlite:///{junk}")
    assert_error(result, 1, "is not a geste database")


def test_a_sqlite_database_of_someone_else(cli: Cli, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    conn.close()
    assert_error(cli("list", "--database-url", f"sqlite:///{other}"), 1, "not geste's")


def test_errors_from_a_real_process_are_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    done = geste_process("list", "--database-url", f"sqlite:///{junk}")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("Error: ") and "is not a geste database" in done.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_here:app", "no module named 'no_such_module_here'"),
        ("tests.apps.cli_app:missing", "has no attribute 'missing'"),
        ("tests.apps.cli_app:not_an_app", "is a str, not a geste.App"),
        ("tests.apps.cli_app", "expected MODULE:APP"),
    ],
)
def test_worker_with_an_app_it_cannot_load(cli: Cli, spec: str, message: str) -> None:
    assert_error(cli("worker", spec), 2, message)
    assert_error(cli("start", "compute", "--app", spec), 2, message)


def test_start_needs_an_app(cli: Cli, db_url: str) -> None:
    assert_error(cli("start", "compute", "--database-url", db_url), 2, "--app")


def test_passwords_are_not_printed() -> None:
    assert (
        _safe_url("postgresql://u:s3cr%40t@db:5432/app?schema=x") == "postgresql://u:***@db:5432/app?schema=x"
    )
    assert _safe_url("postgresql://u@db/app") == "postgresql://u@db/app"
    assert _safe_url("sqlite:///geste.db") == "sqlite:///geste.db"
