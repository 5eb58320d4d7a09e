"""The registry of workers and ``geste status``, on both backends.

Workers register at start, refresh their row with every heartbeat (``lock_timeout / 3``) and mark it
stopped on a graceful stop; a worker killed with SIGKILL goes stale after 3 x ``lock_timeout``. The queue
statistics are checked against a set of instances built in known states at known times. Every wait is for
a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

import geste
from geste.storage.base import Commit, HistoryRow, Lease, NewInstance, WorkerRow
from geste.storage.sqlite import SCHEMA_VERSION
from tests.conftest import die_with_parent
from tests.support import database_at_version, raw_query, run_cli, wait_for, wait_until

ROOT = Path(__file__).resolve().parents[1]
APP = "tests.apps.cli_app:app"  # lock_timeout=2.0: heartbeats every 0.67 s, stale after 6 s
APP_LOCK_TIMEOUT = 2.0


def backend(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


def find(status: geste.SystemStatus, worker_id: str) -> geste.WorkerInfo | None:
    return next((w for w in status.workers if w.worker_id == worker_id), None)


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[geste.App]:
    """An App without a worker on the test database, judging liveness with the apps' lock_timeout."""
    async with geste.App(db_url, run_worker=False, lock_timeout=APP_LOCK_TIMEOUT) as app:
        yield app


# -- registration, heartbeat, stop ----------------------------------------------------------------------
async def test_a_worker_registers_with_its_listener_state(
    make_app: Callable[..., geste.App], client: geste.App, db_url: str
) -> None:
    app = make_app(concurrency=7)
    async with app:
        registered = find(await client.status(), app.worker_id)
        assert registered is not None  # at once: registering is part of open()
        assert (registered.host, registered.pid, registered.concurrency) == (
            socket.gethostname(),
            os.getpid(),
            7,
        )
        assert (registered.state, registered.alive, registered.stopped_at, registered.running) == (
            "alive",
            True,
            None,
            0,
        )
        assert registered.started_at <= registered.heartbeat_at
        expected = "listening" if backend(db_url) == "postgres" else "disabled"

        async def listener_shown() -> geste.WorkerInfo | None:
            worker = find(await client.status(), app.worker_id)
            return worker if worker is not None and worker.listener.get("state") == expected else None

        shown = await wait_until(listener_shown, f"the registry to show the listener {expected}")
        assert shown.listener.keys() == app.listener_status().as_dict().keys()
        assert shown.listener["reconnects"] == 0
        assert (shown.listener["connected_since"] is None) == (expected == "disabled")
        assert (await app.status()).listener == app.listener_status()
        assert app.listener_status().state == expected
    assert (await client.status()).listener.state == geste.ListenerState.DISABLED  # no worker, no listener


async def test_the_heartbeat_refreshes_the_row_with_what_runs(
    make_app: Callable[..., geste.App], client: geste.App
) -> None:
    # a heartbeat every second; the lease survives a stall of 2 s under load (with 0.6 s, a renewal 0.4 s
    # late let it expire, and the status counted no lease held)
    app = make_app(lock_timeout=3.0)
    release = asyncio.Event()

    @app.activity
    async def hold(ctx: geste.ActivityContext) -> str:
        await release.wait()
        return "done"

    @app.workflow
    async def holding(ctx: geste.WorkflowContext) -> str:
        return await hold(ctx)

    async with app:
        first = find(await client.status(), app.worker_id)
        assert first is not None

        async def refreshed() -> bool:
            now = find(await client.status(), app.worker_id)
            return now is not None and now.heartbeat_at > first.heartbeat_at

        await wait_until(refreshed, "a second heartbeat")
        handle = await holding.start()

        async def running_one() -> geste.WorkerInfo | None:
            worker = find(await client.status(), app.worker_id)
            return worker if worker is not None and worker.running == 1 else None

        busy = await wait_until(running_one, "the heartbeat to report one running instance")
        assert busy.started_at == first.started_at  # a heartbeat is not a restart
        assert busy.leases == 1
        queue = (await client.status()).queue
        assert queue.held_leases == 1 and queue.leases_by_worker == {app.worker_id: 1}
        release.set()
        assert await handle.result(timeout=10) == "done"

        async def idle() -> bool:
            worker = find(await client.status(), app.worker_id)
            return worker is not None and worker.running == 0 and worker.leases == 0

        await wait_until(idle, "the heartbeat to report nothing running")


async def test_a_graceful_stop_marks_the_worker_stopped(
    make_app: Callable[..., geste.App], client: geste.App
) -> None:
    app = make_app(worker_id="graceful")
    async with app:
        pass
    stopped = find(await client.status(), "graceful")
    assert stopped is not None
    assert (stopped.state, stopped.alive, stopped.running) == ("stopped", False, 0)
    assert stopped.stopped_at is not None and stopped.stopped_at >= stopped.started_at

    again = make_app(worker_id="graceful")
    async with again:
        restarted = find(await client.status(), "graceful")
        assert restarted is not None
        assert (restarted.state, restarted.stopped_at) == ("alive", None)
        assert restarted.started_at > stopped.started_at
    assert [w.worker_id for w in (await client.status()).workers] == ["graceful"]  # one row per id


async def test_a_beat_in_flight_as_the_worker_stops_lands_before_its_stop_mark(
    make_app: Callable[..., geste.App], client: geste.App
) -> None:
    """An announce (the listener connected) or a health report beats in a task of its own; a stop right
    after it must wait for that beat, or the beat, landing after the stop mark, says the worker is alive
    (found by CI: the listener connected as ``async with app: pass`` closed)."""
    app = make_app(worker_id="in-flight")
    async with app:
        storage = app.storage
        marked = asyncio.Event()
        heartbeat, mark_stopped = storage.heartbeat, storage.mark_worker_stopped

        async def late_heartbeat(*args: Any, **kwargs: Any) -> Any:
            try:  # held until the stop is marked; with the fix nothing is marked before it: a bound
                await asyncio.wait_for(marked.wait(), timeout=1.0)
            except TimeoutError:
                pass
            return await heartbeat(*args, **kwargs)

        async def marking(worker_id: str, now: float) -> None:
            await mark_stopped(worker_id, now)
            marked.set()

        storage.heartbeat = late_heartbeat  # type: ignore[method-assign]
        storage.mark_worker_stopped = marking  # type: ignore[method-assign]
        worker = app._parts.runtime.worker
        assert worker is not None
        worker.announce()
    stopped = find(await client.status(), "in-flight")
    assert stopped is not None
    assert (stopped.state, stopped.alive) == ("stopped", False)


async def test_a_heartbeat_in_flight_as_the_worker_stops_lands_before_its_stop_mark(
    make_app: Callable[..., geste.App], client: geste.App
) -> None:
    """The heartbeat loop's own beat, its statement sent as the worker stops: the stop cancels the loop,
    but a statement the database received runs all the same (cancelling the call does not undo it; on
    PostgreSQL the pool gives up waiting for the cancel after 0.1 s). The stop must wait for the beat, or
    it lands after the stop mark and says the worker is alive."""
    app = make_app(worker_id="beating", lock_timeout=0.6)  # a heartbeat every 0.2 s
    async with app:
        storage = app.storage
        entered, marked = asyncio.Event(), asyncio.Event()
        statements: list[asyncio.Future[None]] = []
        mark_stopped = storage.mark_worker_stopped

        async def beat(row: WorkerRow, **kwargs: Any) -> list[WorkerRow]:
            task = asyncio.current_task()
            if task is not None and task.get_name().startswith(("geste-announce-", "geste-health-")):
                await client.storage.upsert_worker(row)  # not the heartbeat loop's
                return []

            async def statement() -> None:  # sent: it runs whatever becomes of its caller
                entered.set()
                try:  # held until the stop is marked; with the fix nothing is marked before it: a bound
                    await asyncio.wait_for(marked.wait(), timeout=1.0)
                except TimeoutError:
                    pass
                # the database runs it (the client's connection stands in for the worker's, closed by then)
                await client.storage.upsert_worker(row)

            statements.append(asyncio.ensure_future(statement()))
            await asyncio.shield(statements[-1])
            return []

        async def marking(worker_id: str, now: float) -> None:
            await mark_stopped(worker_id, now)
            marked.set()

        storage.upsert_worker = beat  # type: ignore[method-assign]
        storage.heartbeat = beat  # type: ignore[method-assign]
        storage.mark_worker_stopped = marking  # type: ignore[method-assign]
        await asyncio.wait_for(entered.wait(), timeout=30)
    await asyncio.gather(*statements)  # what was sent has run
    stopped = find(await client.status(), "beating")
    assert stopped is not None
    assert (stopped.state, stopped.alive) == ("stopped", False)


async def test_workers_not_heard_from_for_a_week_are_forgotten_at_the_next_start(
    make_app: Callable[..., geste.App], client: geste.App
) -> None:
    old = time.time() - 8 * 24 * 3600
    async with make_app(worker_id="long-gone", clock=lambda: old):
        pass
    assert find(await client.status(), "long-gone") is not None
    async with make_app(worker_id="fresh"):
        assert [w.worker_id for w in (await client.status()).workers] == ["fresh"]


# -- a killed worker --------------------------------------------------------------------------------------
def spawn_worker(url: str, log: Path) -> subprocess.Popen[bytes]:
    """``geste worker tests.apps.cli_app:app`` on ``url``, from the repository root."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "geste.cli", "worker", APP, "--concurrency", "3"],
            cwd=ROOT,
            env={**os.environ, "GESTE_DATABASE_URL": url},
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )


@pytest.fixture
def worker_process(db_url: str, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = tmp_path / "worker.log"
    process = spawn_worker(db_url, log)
    try:
        yield process, log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def registered_process(client: geste.App, pid: int, *, listener: str) -> geste.WorkerInfo:
    async def found() -> geste.WorkerInfo | None:
        for worker in (await client.status()).workers:
            if worker.pid == pid and worker.alive and worker.listener.get("state") == listener:
                return worker
        return None

    worker: geste.WorkerInfo = await wait_until(found, f"process {pid} to register, listener {listener}", 30)
    return worker


async def test_a_killed_worker_shows_as_not_alive_after_three_lock_timeouts(
    client: geste.App, db_url: str, worker_process: tuple[subprocess.Popen[bytes], Path]
) -> None:
    process, log = worker_process
    listener = "listening" if backend(db_url) == "postgres" else "disabled"
    worker = await registered_process(client, process.pid, listener=listener)
    assert (worker.concurrency, worker.state) == (3, "alive"), log.read_text()

    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    killed_at = time.time()
    just_killed = find(await client.status(), worker.worker_id)
    assert just_killed is not None and just_killed.alive  # not before 3 x lock_timeout without a heartbeat

    async def stale() -> geste.WorkerInfo | None:
        now = find(await client.status(), worker.worker_id)
        assert now is not None
        return now if not now.alive else None

    gone = await wait_until(stale, "the killed worker to go stale", timeout=30)
    assert gone.state == "stale" and gone.stopped_at is None  # it never said goodbye
    assert gone.heartbeat_age > 3 * APP_LOCK_TIMEOUT
    assert gone.heartbeat_at == just_killed.heartbeat_at and gone.heartbeat_at.timestamp() <= killed_at


# -- queue statistics ---------------------------------------------------------------------------------------
T0 = 1_000_000.0


async def build_known_instances(storage: Any) -> None:
    """Instances in known states at known times (T0 + seconds), through the storage operations."""

    async def leased(iid: str, worker: str, expires: float, at: float = T0) -> Lease:
        lease = Lease(iid, f"lease-{iid}")
        await storage.create_instance(
            NewInstance(iid, "wf", "{}", at), lease=lease, worker_id=worker, lock_expires_at=expires
        )
        return lease

    async def pending(iid: str, at: float) -> None:
        await storage.create_instance(
            NewInstance(iid, "wf", "{}", at), lease=None, worker_id=None, lock_expires_at=None
        )

    await leased("held", "w1", T0 + 100)  # running, lease held
    await leased("expired", "w2", T0 + 1)  # running, lease expired at T0+1: runnable again
    compensating = await leased("compensating", "w1", T0 + 100)
    row = HistoryRow(1, "activity", "a", '{"result": 1}', False, T0 + 1)
    await storage.record(Commit(compensating, [row], T0 + 1, T0 + 100), status=geste.Status.COMPENSATING)
    await storage.suspend(Commit(await leased("waiting-long", "w1", T0 + 100), [], T0 + 0.5), run_at=None)
    await storage.suspend(
        Commit(await leased("waiting-timer", "w1", T0 + 100), [], T0 + 2),
        run_at=T0 + 100,
        timer=(1, T0 + 100),
    )
    done = await leased("done", "w1", T0 + 100)
    await storage.finish(Commit(done, [], T0 + 1), status=geste.Status.COMPLETED, result="1")
    failed = await leased("failed", "w1", T0 + 100)
    await storage.finish(Commit(failed, [], T0 + 1), status=geste.Status.FAILED, error="{}")
    await pending("cancelled", T0)
    await storage.request_cancel("cancelled", T0 + 1)
    for iid in ("p1", "p2", "p3"):
        await pending(iid, T0 + 3)
    await pending("later", T0 + 10)  # run_at in the future


async def test_queue_stats_match_a_known_set_of_instances(db_url: str) -> None:
    now = [T0 + 5]
    async with geste.App(db_url, run_worker=False, clock=lambda: now[0]) as app:
        await build_known_instances(app.storage)
        queue = (await app.status()).queue
        assert queue.counts == {
            geste.Status.PENDING: 4,
            geste.Status.RUNNING: 2,
            geste.Status.WAITING: 2,
            geste.Status.COMPENSATING: 1,
            geste.Status.COMPLETED: 1,
            geste.Status.FAILED: 1,
            geste.Status.CANCELLED: 1,
        }
        assert queue.runnable == 4  # p1-p3 and the expired lease; not "later", the held ones, the waiting
        assert (queue.held_leases, queue.leases_by_worker) == (2, {"w1": 2})
        assert queue.oldest_waiting_age == pytest.approx(4.5)

        now[0] = T0 + 50  # "later" is due, the held leases are not yet expired
        queue = (await app.status()).queue
        assert (queue.runnable, queue.held_leases) == (5, 2)
        assert queue.oldest_waiting_age == pytest.approx(49.5)
        now[0] = T0 + 150  # the held leases expired; the timer is due
        queue = (await app.status()).queue
        assert (queue.runnable, queue.held_leases, queue.leases_by_worker) == (8, 0, {})
        assert queue.as_dict()["counts"]["waiting"] == 2


async def insert_outbox(url: str, rows: list[tuple[str, str, float]]) -> None:
    """``(event_id, status, created_at)`` outbox rows of instance "i", inserted past geste, in that order."""
    for seq, (event_id, status, created_at) in enumerate(rows, 1):
        await raw_query(
            url,
            "INSERT INTO geste_outbox (event_id, instance_id, step_seq, event_type, source, status, attempts,"
            " next_attempt_at, created_at, updated_at) VALUES ($1, 'i', $2, 't', 's', $3, 0, NULL, $4, $4)",
            event_id,
            seq,
            status,
            created_at,
        )


async def test_queue_stats_count_the_outbox(db_url: str) -> None:
    now = [T0 + 1000]
    async with geste.App(db_url, run_worker=False, clock=lambda: now[0]) as app:
        queue = (await app.status()).queue
        assert (queue.outbox_pending, queue.outbox_dead, queue.outbox_oldest_pending_age) == (0, 0, None)
        await insert_outbox(
            db_url,
            [
                ("sent", "delivered", T0),
                ("dropped", "discarded", T0 + 1),
                ("dead", "dead", T0 + 2),
                ("p1", "pending", T0 + 400),
                ("p2", "pending", T0 + 300),
                ("p3", "pending", T0 + 900),
            ],
        )
        queue = (await app.status()).queue
        assert (queue.outbox_pending, queue.outbox_dead) == (3, 1)
        assert queue.outbox_oldest_pending_age == pytest.approx(700)  # p2, the oldest pending one
        assert queue.as_dict()["outbox_oldest_pending_age"] == pytest.approx(700)
        now[0] = T0 + 1300
        assert (await app.status()).queue.outbox_oldest_pending_age == pytest.approx(1000)


async def test_an_empty_database(db_url: str) -> None:
    async with geste.App(db_url, run_worker=False) as app:
        found = await app.status()
    assert found.workers == []
    assert set(found.queue.counts.values()) == {0}
    assert (found.queue.runnable, found.queue.held_leases, found.queue.oldest_waiting_age) == (0, 0, None)


async def test_the_status_queries_read_through_indexes_on_sqlite(tmp_path: Path) -> None:
    from geste.storage.sqlite import Q

    url = f"sqlite:///{tmp_path / 'plans.db'}"
    async with geste.App(url, run_worker=False):
        pass
    conn = sqlite3.connect(tmp_path / "plans.db")
    try:
        for name in ("count_by_status", "count_runnable", "held_leases", "oldest_waiting"):
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + Q[name], {"now": 1.0})]
            assert any("INDEX geste_instances_" in step for step in plan), (name, plan)
            assert "SCAN geste_instances" not in plan, (name, plan)  # never the table itself, whole
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + Q["outbox_stats"])]
        assert sum("INDEX geste_outbox_" in step for step in plan) == 3, plan  # the partial indexes
        assert "SCAN geste_outbox" not in plan, plan
        assert any("geste_outbox_dead_by_instance" in step for step in plan), plan
        assert any("geste_outbox_pending_by_created" in step for step in plan), plan
    finally:
        conn.close()


async def test_the_status_of_a_closed_app_is_refused(db_url: str) -> None:
    app = geste.App(db_url, run_worker=False)
    with pytest.raises(geste.errors.AppNotOpenError):
        await app.status()


# -- migration from version 1 ----------------------------------------------------------------------------
async def test_a_version_1_database_is_upgraded_on_open(db_url: str, tmp_path: Path) -> None:
    insert_old = (
        "INSERT INTO {t}geste_instances (instance_id, workflow_name, status, input, created_at, updated_at) "
        "VALUES ('old', 'wf', 'pending', '{{}}', 1.0, 1.0)"
    )
    await database_at_version(db_url, 1, [insert_old])

    assert SCHEMA_VERSION >= 2
    async with geste.App(db_url, run_worker=False) as app:
        assert await app.storage.schema_version() == SCHEMA_VERSION
        assert (await app.get_instance("old")).status == geste.Status.PENDING  # data kept
        assert (await app.status()).workers == []
    async with geste.App(db_url, worker_id="after-upgrade", poll_interval=0.05) as app:
        assert [w.worker_id for w in (await app.status()).workers] == ["after-upgrade"]
        assert await app.storage.schema_version() == SCHEMA_VERSION


# -- the command --------------------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("GESTE_DATABASE_URL", raising=False)

    def invoke(*args: str) -> Result:
        result: Result = run_cli(list(args))
        return result

    return invoke


def status_json(cli: Callable[..., Result], url: str) -> dict[str, Any]:
    result = cli("status", "--database-url", url, "--json")
    assert result.exit_code == 0, result.output
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def test_geste_status_end_to_end(
    cli: Callable[..., Result], db_url: str, worker_process: tuple[subprocess.Popen[bytes], Path]
) -> None:
    process, log = worker_process
    listener = "listening" if backend(db_url) == "postgres" else "disabled"

    def shown() -> dict[str, Any] | None:
        found = status_json(cli, db_url)
        ours = [w for w in found["workers"] if w["pid"] == process.pid]
        return found if ours and ours[0]["listener"].get("state") == listener else None

    wait_for(shown, "the worker in `geste status --json`", timeout=30)
    started = cli("start", "approval", '["A-1"]', "--app", APP, "--database-url", db_url, "--id", "a1")
    assert started.exit_code == 0, started.output

    def waiting() -> dict[str, Any] | None:
        found = status_json(cli, db_url)
        return found if found["queue"]["counts"]["waiting"] == 1 else None

    wait_for(waiting, "the approval to wait")
    suspended = time.time()

    def beat_since() -> dict[str, Any] | None:
        # the registry's running count is the last heartbeat's: one during the run (under load a run
        # takes a while) says 1 running until the next, 0.67 s later; a beat after the suspension says 0
        found = status_json(cli, db_url)
        beats = [datetime.fromisoformat(w["heartbeat_at"]).timestamp() for w in found["workers"]]
        return found if beats and min(beats) > suspended else None

    found = wait_for(beat_since, "a heartbeat after the suspension")
    assert found["queue"]["counts"] == {
        "pending": 0,
        "running": 0,
        "waiting": 1,
        "compensating": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert found["queue"]["runnable"] == 0 and found["queue"]["held_leases"] == 0
    assert found["queue"]["oldest_waiting_age"] >= 0
    (worker,) = found["workers"]
    assert (worker["pid"], worker["state"], worker["alive"], worker["concurrency"]) == (
        process.pid,
        "alive",
        True,
        3,
    )
    assert worker["listener"]["state"] == listener
    assert found["listener"]["state"] == "disabled"  # the command's own App runs no worker

    table = cli("status", "--database-url", db_url)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].startswith("queue (")
    assert "waiting 1" in lines[1] and "pending 0" in lines[1]
    assert "runnable now 0" in lines[2] and "held leases 0" in lines[2] and "oldest waiting" in lines[2]
    assert lines[3] == "  outbox: pending 0  dead 0  oldest pending -"
    assert lines[4] == "workers:"
    header = lines[5].split()
    assert header[:8] == ["WORKER", "HOST", "PID", "STATE", "RUNNING", "LEASES", "LISTENER", "RECONNECTS"]
    row = lines[6].split()
    assert row[:8] == [
        worker["worker_id"],
        socket.gethostname(),
        str(process.pid),
        "alive",
        "0/3",
        "0",
        listener,
        "0",
    ]
    assert lines[6].rsplit(maxsplit=1)[0].endswith(" ago")  # its heartbeat, then its version

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0, log.read_text()
    (stopped,) = status_json(cli, db_url)["workers"]
    assert (stopped["state"], stopped["alive"], stopped["running"]) == ("stopped", False, 0)
    row = cli("status", "--database-url", db_url).stdout.splitlines()[6].split()
    assert row[3:7] == ["stopped", "0/3", "0", "-"]


def test_geste_status_shows_the_outbox(cli: Callable[..., Result], db_url: str) -> None:
    async def setup() -> None:
        async with geste.App(db_url, run_worker=False):
            pass  # the schema
        now = time.time()
        await insert_outbox(
            db_url, [("d", "dead", now - 500), ("p", "pending", now - 125), ("q", "pending", now)]
        )

    asyncio.run(setup())
    found = status_json(cli, db_url)["queue"]
    assert (found["outbox_pending"], found["outbox_dead"]) == (2, 1)
    assert 125 <= found["outbox_oldest_pending_age"] < 185
    lines = cli("status", "--database-url", db_url).stdout.splitlines()
    assert re.fullmatch(r"  outbox: pending 2  dead 1  oldest pending 2m \d+s", lines[3]), lines


def test_geste_status_errors_are_one_line(cli: Callable[..., Result], tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    result = cli("status", "--database-url", f"sqlite:///{junk}")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "is not a geste database" in result.stderr
    missing = cli("status", "--database-url", f"sqlite:///{tmp_path / 'no' / 'such.db'}")
    assert missing.exit_code == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.output


def test_geste_status_on_an_empty_database(cli: Callable[..., Result], tmp_path: Path) -> None:
    result = cli("status", "--database-url", f"sqlite:///{tmp_path / 'new.db'}")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1:] == [
        "  pending 0  running 0  waiting 0  compensating 0  completed 0  failed 0  cancelled 0",
        "  runnable now 0  held leases 0  oldest waiting -",
        "  outbox: pending 0  dead 0  oldest pending -",
        "workers: none registered",
    ]
