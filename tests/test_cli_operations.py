"""The operator commands, on both backends: ``geste retry``, ``geste resume``, ``geste cancel`` with filters,
the leases in ``geste status``, and the progress helper they share (plain lines without a terminal).

The commands run in this process through click's ``CliRunner`` (not a terminal); the worker runs
``tests/apps/operations_app.py`` in a subprocess; states are set up with a client App in between.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from click.testing import Result

import geste
from geste._progress import Progress
from geste.storage.base import WorkerRow
from tests.apps.operations_app import build_app
from tests.support import run_cli, wait_for

from .processes import start_process, wait_ready

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
Cli = Callable[..., Result]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, db_url: str) -> Cli:
    """``geste ARGS... --database-url <the test database>`` in this process; it must not crash."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("GESTE_DATABASE_URL", raising=False)

    def invoke(*args: str) -> Result:
        result: Result = run_cli([*args, "--database-url", db_url])
        return result

    return invoke


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def refused(result: Result, exit_code: int, *fragments: str) -> None:
    """Exit code as given, nothing on stdout, one ``Error:`` line naming the problem (after the usage
    for a usage error), no traceback."""
    assert result.exit_code == exit_code, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    if exit_code == 1:
        assert result.stderr == error + "\n"
    for fragment in fragments:
        assert fragment in error, result.stderr


def with_client(db_url: str, action: Callable[[geste.App], Awaitable[T]]) -> T:
    """Run ``action`` with an App on the test database that runs no worker."""

    async def go() -> T:
        async with build_app(db_url, run_worker=False) as client:
            return await action(client)

    return asyncio.run(go())


def status_of(db_url: str, instance_id: str) -> str:
    async def read(app: geste.App) -> str:
        return (await app.get_instance(instance_id)).status.value

    return with_client(db_url, read)


@pytest.fixture
def markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "markers"
    folder.mkdir()
    monkeypatch.setenv("GESTE_TEST_MARKERS", str(folder))
    return folder


@pytest.fixture
def worker(db_url: str, tmp_path: Path, markers: Path) -> Iterator[subprocess.Popen[bytes]]:
    ready, output = tmp_path / "ready", tmp_path / "worker.out"
    command = ["tests.apps.operations_app", db_url, f"--ready={ready}", f"--markers={markers}"]
    proc = start_process(command, output=output, env={})  # with the markers' variable set just now
    try:
        asyncio.run(wait_ready(proc, ready, output=output, what="the worker process", timeout=20))
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# -- geste retry ---------------------------------------------------------------------------------------
def test_geste_retry(cli: Cli, db_url: str, markers: Path, worker: subprocess.Popen[bytes]) -> None:
    async def fail(app: geste.App) -> None:
        handle = await app.start_workflow("pipeline", 4, instance_id="r1")
        with pytest.raises(geste.errors.WorkflowFailed):
            await handle.result(timeout=10)

    with_client(db_url, fail)
    refused(cli("resume", "r1"), 1, "is failed: only an unfinished instance", "geste retry")
    (markers / "fixed").touch()
    lines = ok(cli("retry", "r1", "--wait", "10")).splitlines()
    assert lines == [
        "r1: retry 1, runs again from step 2 (failed steps removed: second; "
        "it had failed with ConnectionError: the service is down)",
        f'result: {{"value": 50, "pid": {worker.pid}}}',
    ]
    assert (markers / "first-r1").read_text().splitlines() == [str(worker.pid)]
    refused(cli("retry", "r1"), 1, "workflow instance 'r1' is completed (retry 1 at ", "UTC), not failed")
    refused(cli("retry", "nope"), 1, "no workflow instance with id 'nope'")

    shown = ok(cli("show", "r1")).splitlines()
    retries = shown.index("retries:")
    line = shown[retries + 1]
    assert line.split()[0] == "1"
    assert (
        "from step 2; had failed with ConnectionError: the service is down; removed 2 second (error" in line
    )
    as_json = json.loads(ok(cli("show", "r1", "--json")))
    (record,) = as_json["retries"]
    assert (record["retry"], record["from_seq"], record["removed"][0]["name"]) == (1, 2, "second")
    assert as_json["instance"]["status"] == "completed"


def test_geste_retry_json_is_only_json(cli: Cli, db_url: str, markers: Path) -> None:
    async def fail(app: geste.App) -> None:
        async with build_app(db_url, poll_interval=0.05) as running:
            handle = await running.start_workflow("pipeline", 1, instance_id="j")
            with pytest.raises(geste.errors.WorkflowFailed):
                await handle.result(timeout=10)

    with_client(db_url, fail)
    found = json.loads(ok(cli("retry", "j", "--json")))
    assert (found["retry"]["instance_id"], found["retry"]["retry"]) == ("j", 1)
    assert status_of(db_url, "j") == "waiting"  # nobody runs it here


# -- geste resume --------------------------------------------------------------------------------------
def test_geste_resume(cli: Cli, db_url: str) -> None:
    async def hold(app: geste.App) -> None:
        now = time.time()
        await app.storage.upsert_worker(WorkerRow("ghost", "h", 1, now - 3600, now - 3600, 1, 1, None))
        await app.storage.upsert_worker(WorkerRow("busy", "h", 2, now, now, 1, 1, None))
        for instance_id, holder in (("g", "ghost"), ("b", "busy")):
            await app.start_workflow("waiter", instance_id=instance_id)
            claimed = await app.storage.claim(holder, time.time(), time.time() + 600, 1, workflows=["waiter"])
            assert [c.lease.instance_id for c in claimed] == [instance_id]
        await app.start_workflow("waiter", instance_id="p")

    with_client(db_url, hold)
    assert ok(cli("resume", "g")) == "g: running, runnable now (lease of worker ghost broken)\n"
    refused(cli("resume", "b"), 1, "held by worker 'busy', which is alive", "geste resume --force")
    assert ok(cli("resume", "b", "--force")) == "b: running, runnable now (lease of worker busy broken)\n"
    assert (
        ok(cli("resume", "p")) == "p: pending, runnable now (it was runnable already: nothing held it back)\n"
    )
    found = json.loads(ok(cli("resume", "p", "--json")))
    assert (found["instance_id"], found["status"], found["already_runnable"]) == ("p", "pending", True)
    refused(cli("resume", "nope"), 1, "no workflow instance with id 'nope'")
    refused(cli("resume"), 2, "Missing argument 'ID'")


# -- geste cancel with filters -------------------------------------------------------------------------
def test_geste_cancel_with_filters(cli: Cli, db_url: str) -> None:
    async def start(app: geste.App) -> None:
        for n in range(12):
            await app.start_workflow("waiter", instance_id=f"w{n:02}")
        for n in range(2):
            await app.start_workflow("pipeline", n, instance_id=f"p{n}")

    with_client(db_url, start)  # no worker: all pending, so each cancel ends its instance at once
    lines = ok(cli("cancel", "--workflow", "waiter")).splitlines()
    assert lines[0] == "12 instance(s) to cancel (workflow waiter)"
    progress = lines[1:-1]  # one line per tenth of the work, without a terminal
    assert len(progress) == 10 and progress[-1] == "cancelling: 12/12"
    assert all(line.startswith("cancelling: ") for line in progress)
    assert lines[-1] == (
        "12 instance(s): 12 cancelled, 0 cancel requested (a worker ends each at its next step), "
        "0 finished before the cancel"
    )
    assert {status_of(db_url, f"w{n:02}") for n in range(12)} == {"cancelled"}
    assert status_of(db_url, "p0") == "pending"

    assert ok(cli("cancel", "--status", "waiting")).splitlines() == [
        "0 instance(s) to cancel (status waiting)",
        "0 instance(s): 0 cancelled, 0 cancel requested (a worker ends each at its next step), "
        "0 finished before the cancel",
    ]
    found = json.loads(ok(cli("cancel", "--all", "--json")))  # the whole output is the JSON
    assert sorted(found["cancelled"]) == ["p0", "p1"]
    assert found == {
        "matched": 2,
        "cancelled": found["cancelled"],
        "cancel_requested": [],
        "finished_before": [],
    }

    refused(cli("cancel"), 2, "give an instance ID, or select instances")
    refused(cli("cancel", "p0", "--workflow", "waiter"), 2, "not both")
    refused(cli("cancel", "--all", "--wait", "3"), 2, "--wait goes with one instance ID")
    refused(cli("cancel", "--status", "completed"), 2, "Invalid value for '--status'")
    assert json.loads(ok(cli("cancel", "p0", "--json")))["status"] == "cancelled"


def test_geste_cancel_with_filters_asks_running_instances_to_stop(
    cli: Cli, db_url: str, worker: subprocess.Popen[bytes]
) -> None:
    async def start(app: geste.App) -> None:
        for n in range(3):
            await app.start_workflow("waiter", instance_id=f"w{n}")

    with_client(db_url, start)
    wait_for(lambda: all(status_of(db_url, f"w{n}") == "waiting" for n in range(3)), "the instances to wait")
    lines = ok(cli("cancel", "--workflow", "waiter", "--status", "waiting")).splitlines()
    assert lines[0] == "3 instance(s) to cancel (workflow waiter, status waiting)"
    assert lines[-1].startswith("3 instance(s): 0 cancelled, 3 cancel requested")
    wait_for(
        lambda: all(status_of(db_url, f"w{n}") == "cancelled" for n in range(3)), "the worker to end them"
    )


# -- geste status: the leases --------------------------------------------------------------------------
def test_geste_status_lists_the_leases_and_their_holders(cli: Cli, db_url: str) -> None:
    async def hold(app: geste.App) -> None:
        now = time.time()
        await app.storage.upsert_worker(WorkerRow("ghost", "h", 1, now - 3600, now - 3600, 1, 1, None))
        await app.start_workflow("waiter", instance_id="held")
        await app.storage.claim("ghost", time.time(), time.time() + 600, 1, workflows=["waiter"])

    with_client(db_url, hold)
    lines = ok(cli("status")).splitlines()
    start = lines.index("leases (1 held):")
    assert lines[start + 1].split() == ["INSTANCE", "WORKFLOW", "WORKER", "WORKER", "STATE", "EXPIRES", "IN"]
    row = lines[start + 2].split()
    assert row[:4] == ["held", "waiter", "ghost", "stale"] and row[4].endswith("m")
    assert "`geste resume ID` frees it now" in lines[start + 3]
    (lease,) = json.loads(ok(cli("status", "--json")))["leases"]
    assert (lease["instance_id"], lease["worker_id"], lease["worker_state"]) == ("held", "ghost", "stale")
    assert 590 < lease["expires_in"] <= 600


# -- the progress helper -------------------------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere() -> None:
    plain = io.StringIO()
    with Progress("working", total=4, stream=plain) as progress:
        for _ in range(4):
            progress.advance()
        progress.note("a note")
        progress.advance(0, label="labelled")
    assert plain.getvalue().splitlines() == [
        "working: 1/4",
        "working: 2/4",
        "working: 3/4",
        "working: 4/4",
        "a note",
        "working 4/4: labelled",
    ]
    unknown = io.StringIO()
    with Progress("counting", stream=unknown) as progress:
        progress.advance(2500)
    assert unknown.getvalue() == "counting: 2500\n"

    silent = Terminal()
    with Progress("quiet", total=3, stream=silent, enabled=False) as progress:
        progress.advance(3)
        progress.note("nothing")
    assert silent.getvalue() == "" and progress.done == 3

    terminal = Terminal()
    with Progress("migrating", total=2, stream=terminal) as progress:
        progress.advance(label="0001_initial")
        progress.advance(label="0002_workers")
    shown = terminal.getvalue()
    assert "migrating 1/2: 0001_initial" in shown and "migrating 2/2: 0002_workers" in shown
    assert "━" in shown and "2/2" in shown  # rich drew its bar
