"""LISTEN/NOTIFY wake-ups against the real PostgreSQL server (architecture.md, section 4; issue 4).

Notifications are global to a database and other test runs share it: every assertion filters them by the
instance ids of the test (fresh uuids). A raw ``LISTEN`` in the test checks what geste sends; ``sync()``
sends a marker notification and waits for it, so everything committed before it has been delivered
(a listener receives notifications in commit order) and "nothing was sent" can be asserted without
sleeping. Worker processes run ``tests/apps/notify_app.py`` with polls of minutes: only a notification
can wake them within the few seconds the tests allow.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import geste
from geste.errors import ConfigurationError, StorageError
from geste.runtime.wakeups import CHANNELS, TIMER_EXPIRED, WORKFLOW_RESUMABLE, Listener, Wakeups
from geste.storage._listen import PostgresListening
from geste.storage.postgres import PostgresStorage, parse_postgres_url

from .processes import start_process, wait_ready
from .support import wait_until

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `tests.apps` is importable however pytest was started
    sys.path.insert(0, str(ROOT))

from tests.apps.notify_app import build_app  # noqa: E402
from tests.conftest import POSTGRES_URL  # noqa: E402

SLOW = 300.0
"""Poll interval, lock timeout and fallback interval of workers that only a notification may wake."""
FAST_BOUND = 5.0
"""A wake-up by notification must take less than this (far below SLOW)."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def connect(url: str) -> Any:
    dsn, options = parse_postgres_url(url)
    return await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})


async def query(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    conn = await connect(url)
    try:
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def instance_row(url: str, instance_id: str) -> dict[str, Any]:
    rows = await query(url, "SELECT * FROM geste_instances WHERE instance_id = $1", instance_id)
    assert len(rows) == 1, instance_id
    return rows[0]


def own_tcp_ports(pid: int | str = "self") -> set[int]:
    """Local ports of the TCP sockets of process ``pid`` (what pg_stat_activity calls client_port)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def listener_backends(pid: int | str = "self") -> list[dict[str, Any]]:
    """The 'geste-listener' backends opened by process ``pid`` (other test runs have their own)."""
    rows = await query(
        POSTGRES_URL,
        "SELECT pid, client_port, datname, state FROM pg_stat_activity WHERE application_name = $1",
        "geste-listener",
    )
    ports = own_tcp_ports(pid)
    return [row for row in rows if row["client_port"] in ports]


async def the_listener_backend() -> dict[str, Any]:
    """This process's one listener backend (one of a closed App may linger for a moment)."""

    async def one() -> dict[str, Any] | None:
        found = await listener_backends()
        return found[0] if len(found) == 1 else None

    backend: dict[str, Any] = await wait_until(one, "exactly one listener backend of this process")
    return backend


async def no_listener_backend() -> bool:
    return await listener_backends() == []


class RawListener:
    """A plain asyncpg LISTEN on geste's channels, recording every JSON payload it receives."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lease_seen: dict[str, list[Any]] = {}
        """instance id -> the lease_id read from its row at once on each resumable notification."""
        self._sync_channel = f"geste_test_sync_{uuid.uuid4().hex[:12]}"
        self._synced: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawListener:
        self.conn = await connect(self.url)
        self.reader = await connect(self.url)
        self.sender = await connect(self.url)
        self.reading = asyncio.Lock()
        for channel in (WORKFLOW_RESUMABLE, TIMER_EXPIRED, self._sync_channel):
            await self.conn.add_listener(channel, self._on)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.conn.close()
        await self.reader.close()
        await self.sender.close()

    def _on(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        if channel == self._sync_channel:
            self._synced.add(payload)
            return
        body = json.loads(payload)
        self.received.append((channel, body))
        if channel == WORKFLOW_RESUMABLE:  # read the row at once: it must be claimable already
            task = asyncio.get_running_loop().create_task(self._read_lease(body["instance_id"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read_lease(self, instance_id: str) -> None:
        async with self.reading:
            lease = await self.reader.fetchval(
                "SELECT lease_id FROM geste_instances WHERE instance_id = $1", instance_id
            )
        self.lease_seen.setdefault(instance_id, []).append(lease)

    def about(self, instance_id: str, channel: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        return [
            (ch, body)
            for ch, body in self.received
            if body.get("instance_id") == instance_id and (channel is None or ch == channel)
        ]

    async def wait(self, instance_id: str, channel: str, count: int = 1) -> list[dict[str, Any]]:
        await wait_until(
            lambda: len(self.about(instance_id, channel)) >= count, f"{count} {channel} for {instance_id}"
        )
        return [body for _, body in self.about(instance_id, channel)]

    async def sync(self) -> None:
        """Return once every notification committed before this call has been received and handled."""
        marker = uuid.uuid4().hex
        await self.sender.execute("SELECT pg_notify($1, $2)", self._sync_channel, marker)
        await wait_until(lambda: marker in self._synced, "the sync notification")
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Apps:
    """Apps opened by a test, closed at its end (most recent first)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list[geste.App] = []

    async def open(self, **options: Any) -> geste.App:
        options.setdefault("shutdown_grace", 0.1)
        options.setdefault("notify_reconnect_delay", 0.2)  # a refused first connection is retried soon
        app = build_app(options.pop("url", self.url), **options)
        await app.open()
        self.opened.append(app)
        if app.run_worker and app.notify.enabled:
            await wait_until(lambda: app.listener_status().state == "listening", "the listener to listen")
        return app

    async def client(self, **options: Any) -> geste.App:
        return await self.open(run_worker=False, **options)

    async def slow_worker(self, **options: Any) -> geste.App:
        """A worker whose polls are minutes apart: only notifications (or its own pokes) wake it."""
        for key in ("poll_interval", "lock_timeout", "notify_fallback_interval"):
            options.setdefault(key, SLOW)
        return await self.open(**options)

    async def close(self, app: geste.App) -> None:
        await app.close()
        self.opened.remove(app)

    async def close_all(self) -> None:
        while self.opened:
            await self.opened.pop().close()


@pytest.fixture
async def apps(pg_url: str) -> AsyncIterator[Apps]:
    group = Apps(pg_url)
    try:
        yield group
    finally:
        await group.close_all()


@pytest.fixture
async def raw(pg_url: str, apps: Apps) -> AsyncIterator[RawListener]:
    await apps.client()  # creates the schema before the raw listener reads it
    async with RawListener(pg_url) as listener:
        yield listener


class Worker:
    """A worker process running ``tests/apps/notify_app.py``."""

    def __init__(self, folder: Path, url: str) -> None:
        self.folder = folder
        self.url = url
        self.procs: list[subprocess.Popen[bytes]] = []

    async def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        index = len(self.procs)
        ready = self.folder / f"ready-{index}"
        output = self.folder / f"worker-{index}.out"
        proc = start_process(
            ["tests.apps.notify_app", self.url, f"--ready={ready}", *args], output=output, env=env or {}
        )
        self.procs.append(proc)
        await wait_ready(proc, ready, output=output, what="the worker process (listening)", timeout=20)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def workers(tmp_path: Path, pg_url: str) -> Iterator[Worker]:
    group = Worker(tmp_path, pg_url)
    try:
        yield group
    finally:
        group.stop_all()


async def wait_status(url: str, instance_id: str, status: str, timeout: float = 10.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        rows = await query(url, "SELECT * FROM geste_instances WHERE instance_id = $1", instance_id)
        return rows[0] if rows and rows[0]["status"] == status else None

    row: dict[str, Any] = await wait_until(check, f"{instance_id} to be {status}", timeout=timeout)
    return row


# -- 1. options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"listen_notify": "yes"}, "listen_notify"),
        ({"listen_notify": 1}, "listen_notify"),
        ({"listen_notify": 0}, "listen_notify"),
        ({"notify_fallback_interval": 0}, "notify_fallback_interval"),
        ({"notify_fallback_interval": -1.0}, "notify_fallback_interval"),
        ({"notify_fallback_interval": timedelta(0)}, "notify_fallback_interval"),
        ({"notify_fallback_interval": float("nan")}, "notify_fallback_interval"),
        ({"notify_fallback_interval": "30"}, "notify_fallback_interval"),
        ({"notify_reconnect_delay": 0}, "notify_reconnect_delay"),
        ({"notify_reconnect_delay": -0.5}, "notify_reconnect_delay"),
        ({"max_workflows_per_batch": 0}, "max_workflows_per_batch"),
        ({"max_timers_per_batch": -1}, "max_timers_per_batch"),
        ({"max_messages_per_batch": 0}, "max_messages_per_batch"),
        ({"max_workflows_per_batch": 2.5}, "max_workflows_per_batch"),
        ({"max_timers_per_batch": True}, "max_timers_per_batch"),
        ({"listen_database_url": "mysql://db/x"}, "listen_database_url"),
        ({"listen_database_url": "sqlite:///x.db"}, "listen_database_url"),
        ({"listen_database_url": 5}, "listen_database_url"),
        ({"listen_database_url": "postgresql://h/db?schema=no-such-identifier"}, "schema"),
        ({"listen_database_url": "postgresql://h/db?pool_min_size=x"}, "pool_min_size"),
    ],
)
def test_invalid_options_are_refused_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        geste.App(POSTGRES_URL, **options)


@pytest.mark.parametrize(
    "options", [{"listen_notify": True}, {"listen_database_url": POSTGRES_URL}], ids=["listen", "listen_url"]
)
def test_notify_options_on_sqlite_are_refused(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="PostgreSQL"):
        geste.App(f"sqlite:///{tmp_path / 'x.db'}", **options)


def test_valid_options_are_kept() -> None:
    app = geste.App(
        POSTGRES_URL,
        listen_notify=True,
        notify_fallback_interval=timedelta(minutes=2),
        notify_reconnect_delay=0.5,
        max_workflows_per_batch=7,
        max_timers_per_batch=8,
        max_messages_per_batch=9,
        listen_database_url="postgres://elsewhere/db",
    )
    n = app.notify
    assert (n.enabled, n.fallback_interval, n.reconnect_delay) == (True, 120.0, 0.5)
    assert (n.max_workflows_per_batch, n.max_timers_per_batch, n.max_messages_per_batch) == (7, 8, 9)
    assert n.listen_url == "postgres://elsewhere/db"
    assert geste.App(POSTGRES_URL, listen_notify=False).notify.enabled is False
    assert geste.App(POSTGRES_URL).notify.enabled is True


async def test_listen_notify_auto_by_backend(make_app: Callable[..., geste.App], db_url: str) -> None:
    """None: listening on PostgreSQL (and closed on shutdown), disabled on SQLite."""
    app = make_app()
    assert app.listener_status().state == "disabled"  # not open yet
    async with app:
        if db_url.startswith("sqlite"):
            assert app.listener_status().state == "disabled"
        else:
            await wait_until(lambda: app.listener_status().state == "listening", "listening")
            backend = await the_listener_backend()
            assert backend["datname"] == "test"
    assert app.listener_status().state == "disabled"
    assert await wait_until(no_listener_backend, "the listener connection to close")


async def test_unreachable_listener_leaves_polling_on(pg_url: str) -> None:
    """A listener that cannot connect does not stop the App: it polls and keeps trying (reconnecting)."""
    app = build_app(
        pg_url,
        listen_database_url="postgresql://postgres@127.0.0.1:1/nowhere",
        notify_reconnect_delay=30,
        poll_interval=0.05,
    )
    async with app:
        await wait_until(lambda: app.listener_status().state == "reconnecting", "reconnecting")
        assert app.listener_status().last_error
        handle = await app.start_workflow("sleeper", 0.2)
        assert await handle.result(timeout=10) == os.getpid()


# -- 2. payloads -----------------------------------------------------------------------------------------


def schema_of(url: str) -> str:
    return parse_postgres_url(url)[1]["schema"]


def assert_resumable(
    body: dict[str, Any],
    instance_id: str,
    workflow: str,
    url: str,
    *,
    worker: str | None = None,
    **routing: Any,
) -> None:
    """The specification's keys, then what routes it (schema 13): the worker it goes to (the instance's
    last worker; None: a new one), a worker to avoid (one that gave it back), the schema."""
    assert body == {
        "instance_id": instance_id,
        "workflow_name": workflow,
        "worker": worker,
        **routing,
        "schema": schema_of(url),
    }


async def test_start_by_a_client_notifies_resumable(raw: RawListener, apps: Apps) -> None:
    client = await apps.client()
    iid = new_id("start")
    await client.start_workflow("waiter", "never", instance_id=iid)
    [body] = await raw.wait(iid, WORKFLOW_RESUMABLE)
    assert_resumable(body, iid, "waiter", raw.url)
    await raw.sync()
    assert raw.lease_seen[iid] == [None]  # claimable when the notification arrived
    await client.start_workflow("waiter", "never", instance_id=iid)  # exists already: nothing new
    await raw.sync()
    assert len(raw.about(iid)) == 1


async def test_event_cancel_and_release_notify_once_claimable(
    raw: RawListener, apps: Apps, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Event delivered to a waiting instance, cancel of a waiting one, lease released on shutdown: each
    sends one resumable notification, and the row read on receipt has no lease (no claimer but the raw
    listener exists when they are sent)."""
    client = await apps.client()
    worker = await apps.open(poll_interval=0.05)
    woken, cancelled, held = new_id("event"), new_id("cancel"), new_id("held")
    await worker.start_workflow("waiter", "ping", instance_id=woken)
    await worker.start_workflow("waiter", "ping-other", instance_id=cancelled)
    monkeypatch.setenv("GESTE_TEST_HOLD", "1")
    await worker.start_workflow("held", instance_id=held)
    await wait_status(raw.url, woken, "waiting")
    await wait_status(raw.url, cancelled, "waiting")
    assert (await instance_row(raw.url, held))["lease_id"] is not None
    await raw.sync()
    assert raw.about(woken) == raw.about(cancelled) == raw.about(held) == []  # started locally: no NOTIFY

    ran_them = worker.worker_id
    await apps.close(worker)  # `hold` is cancelled after the grace period; its lease is released
    [body] = await raw.wait(held, WORKFLOW_RESUMABLE)
    assert_resumable(body, held, "held", raw.url, avoid=ran_them)  # given back: to another worker

    await client.send_event("ping", {"n": 1})
    [body] = await raw.wait(woken, WORKFLOW_RESUMABLE)
    assert_resumable(body, woken, "waiter", raw.url, worker=ran_them)  # to the worker that suspended it

    await client.cancel(cancelled)
    [body] = await raw.wait(cancelled, WORKFLOW_RESUMABLE)
    assert_resumable(body, cancelled, "waiter", raw.url, worker=ran_them)

    await raw.sync()
    for iid in (held, woken, cancelled):
        assert raw.lease_seen.get(iid) == [None], iid
    monkeypatch.delenv("GESTE_TEST_HOLD")
    worker = await apps.open(poll_interval=0.05)
    assert (await client.get_handle(woken).result(timeout=10))["data"] == {"n": 1}
    with pytest.raises(geste.errors.WorkflowCancelled):
        await client.get_handle(cancelled).result(timeout=10)
    assert await client.get_handle(held).result(timeout=10) == os.getpid()


async def test_sleep_notifies_timer_expired(raw: RawListener, apps: Apps) -> None:
    """A sleep that rings after the lease given up would have run out (1.2 s, a lease of 1 s) is
    announced, naming its keeper; a shorter one is not (tests/test_routing.py)."""
    worker = await apps.open(poll_interval=0.05, lock_timeout=1.0)
    iid = new_id("sleep")
    handle = await worker.start_workflow("sleeper", 1.2, instance_id=iid)
    [body] = await raw.wait(iid, TIMER_EXPIRED)
    [timer] = await query(raw.url, "SELECT seq, expires_at FROM geste_timers WHERE instance_id = $1", iid)
    assert body == {
        "instance_id": iid,
        "timer_id": timer["seq"],
        "expires_at": timer["expires_at"],
        "workflow_name": "sleeper",  # schema 13: routed to the worker that keeps it
        "worker": worker.worker_id,
        "schema": schema_of(raw.url),
    }
    assert await handle.result(timeout=10) == os.getpid()
    await raw.sync()
    assert raw.about(iid, WORKFLOW_RESUMABLE) == []  # the sleeper's own worker woke by its local timer


async def test_step_commits_send_nothing(raw: RawListener, apps: Apps) -> None:
    """Record never notifies, finish only for a result() awaited in another process (schema 14,
    tests/test_result_wakeup.py): a workflow started (and run) here is notified only by the event
    delivered to it; one started by a client, by its start and the event (and by its end if the client's
    result() came before it)."""
    worker = await apps.open(poll_interval=0.05)
    client = await apps.client()
    here = await worker.start_workflow("waiter", "go-here")
    there = await client.start_workflow("waiter", "go-there")
    await wait_status(raw.url, there.instance_id, "waiting")
    await wait_status(raw.url, here.instance_id, "waiting")
    await worker.send_event("go-here", 1)  # delivered to the waiting instance: one resumable
    await worker.send_event("go-there", 2)
    assert (await here.result(timeout=10))["data"] == 1
    assert (await there.result(timeout=10))["data"] == 2
    assert len(await client.history(here.instance_id)) >= 3  # wait, event, activity: committed steps
    await raw.sync()
    assert [ch for ch, _ in raw.about(here.instance_id)] == [WORKFLOW_RESUMABLE]  # the event only
    wakes = [ch for ch, body in raw.about(there.instance_id) if "finished" not in body]
    assert wakes == [WORKFLOW_RESUMABLE] * 2  # start, event
    ends = [body["finished"] for _, body in raw.about(there.instance_id) if "finished" in body]
    assert ends in ([], ["completed"])  # awaited by the client: told, if it registered before the end


FAIL_AT_COMMIT = """
CREATE FUNCTION geste_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.instance_id LIKE TG_ARGV[0] THEN
        RAISE EXCEPTION 'refused by the test';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER geste_test_refuse AFTER INSERT OR UPDATE ON geste_instances
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION geste_test_refuse('doomed-%');
CREATE TRIGGER geste_test_refuse_timer BEFORE INSERT ON geste_timers
    FOR EACH ROW EXECUTE FUNCTION geste_test_refuse('timeless-%');
"""


async def test_rolled_back_work_sends_nothing(raw: RawListener, apps: Apps) -> None:
    """A transaction that would notify but fails at commit (a deferred trigger of the test refuses it)
    sends nothing: a start, an event delivery, a cancel, a timer registration."""
    worker = await apps.open(poll_interval=0.05)
    client = await apps.client()
    waiting = "doomed-" + uuid.uuid4().hex
    await worker.start_workflow("waiter", "doom", instance_id=waiting)
    await wait_status(raw.url, waiting, "waiting")
    await apps.close(worker)
    conn = await connect(raw.url)
    try:
        await conn.execute(FAIL_AT_COMMIT)
        with pytest.raises(StorageError, match="refused by the test"):
            await client.start_workflow("waiter", "doom", instance_id="doomed-" + uuid.uuid4().hex)
        with pytest.raises(StorageError, match="refused by the test"):
            await client.send_event("doom", "data")
        with pytest.raises(StorageError, match="refused by the test"):
            await client.cancel(waiting)
        assert (await instance_row(raw.url, waiting))["status"] == "waiting"

        # a sleep whose timer insert is refused: the suspension rolls back; the engine releases the
        # instance for a retry (that release commits and says so: a timer with no timer_id)
        worker = await apps.open(poll_interval=0.05, lock_timeout=1.0)
        sleeper = "timeless-" + uuid.uuid4().hex  # longer than the lease: its suspension announces it
        await worker.start_workflow("sleeper", 1.2, instance_id=sleeper)
        await raw.wait(sleeper, TIMER_EXPIRED)
        await raw.sync()
        assert all(body["timer_id"] is None for _, body in raw.about(sleeper)), raw.about(sleeper)
        assert [ch for ch, _ in raw.about(waiting)] == []

        await conn.execute("DROP TRIGGER geste_test_refuse ON geste_instances")
        await conn.execute("DROP TRIGGER geste_test_refuse_timer ON geste_timers")
    finally:
        await conn.close()
    # the same operations, now committed, do notify
    await apps.close(worker)
    await client.send_event("doom", "data")
    await raw.wait(waiting, WORKFLOW_RESUMABLE)
    worker = await apps.open(poll_interval=0.05, lock_timeout=1.0)
    assert (await client.get_handle(waiting).result(timeout=10))["data"] == "data"
    assert await client.get_handle(sleeper).result(timeout=10) == os.getpid()
    assert any(body["timer_id"] is not None for _, body in raw.about(sleeper, TIMER_EXPIRED))


# -- 3. and 4. across processes, without a poll --------------------------------------------------------


async def test_other_process_wakes_at_once_for_a_start_and_an_event(
    workers: Worker, apps: Apps, pg_url: str
) -> None:
    client = await apps.client()
    proc = await workers.spawn()  # polls, leases and fallback of minutes
    iid = new_id("xproc")
    started = time.monotonic()
    handle = await client.start_workflow("waiter", "xproc-go", instance_id=iid)
    await wait_status(pg_url, iid, "waiting", timeout=FAST_BOUND)  # claimed at once, then waits
    claimed_in = time.monotonic() - started

    sent = time.monotonic()
    await client.send_event("xproc-go", {"ok": True})
    result = await handle.result(timeout=FAST_BOUND)
    woken_in = time.monotonic() - sent
    assert result == {"data": {"ok": True}, "pid": proc.pid}
    assert claimed_in < FAST_BOUND and woken_in < FAST_BOUND, (claimed_in, woken_in)


async def test_timer_of_a_killed_worker_fires_on_another(workers: Worker, apps: Apps, pg_url: str) -> None:
    """Worker A (a process, a lease of 1.5 s) starts a sleeper of 2 s, which rings after A's lease would
    have run out, and suspends: the timer is announced; A is killed. Worker B (here, polls of minutes,
    listening before A registered the timer) resumes it near expires_at, from the notification."""
    other = await apps.slow_worker()
    before = other.listener_status().notifications[TIMER_EXPIRED]
    iid = new_id("timer")
    first = await workers.spawn("--lock-timeout=1.5", f"--start=sleeper:{iid}:2.0")
    row = await wait_status(pg_url, iid, "waiting")
    [timer] = await query(pg_url, "SELECT expires_at FROM geste_timers WHERE instance_id = $1", iid)
    assert row["lease_id"] is None and time.time() < timer["expires_at"], "the sleep was over already"
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    await wait_until(
        lambda: other.listener_status().notifications[TIMER_EXPIRED] > before, "the timer notification"
    )

    assert await other.get_handle(iid).result(timeout=FAST_BOUND + 2) == os.getpid()
    done = await instance_row(pg_url, iid)
    late = done["finished_at"] - timer["expires_at"]
    assert 0 <= late < 1.5, late


async def test_sigterm_releases_and_another_worker_takes_over_at_once(
    workers: Worker, apps: Apps, pg_url: str
) -> None:
    """Pitfall 9: the release notification is sent once the lease is gone, so the woken worker claims it
    at once (it would otherwise wait minutes for its poll)."""
    client = await apps.client()
    first = await workers.spawn("--worker-id=first", env={"GESTE_TEST_HOLD": "1"})
    iid = new_id("handover")
    handle = await client.start_workflow("held", instance_id=iid)
    await wait_until(
        lambda: _held_by(pg_url, iid, "first"),
        "the first worker to run the held instance",
        timeout=FAST_BOUND,
    )
    second = await apps.slow_worker(worker_id="second")
    assert (await instance_row(pg_url, iid))["locked_by"] == "first"

    stopped = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert await handle.result(timeout=FAST_BOUND) == os.getpid()
    assert time.monotonic() - stopped < FAST_BOUND
    assert first.wait(timeout=10) == 0
    assert second.listener_status().notifications[WORKFLOW_RESUMABLE] >= 1


async def _held_by(url: str, instance_id: str, worker_id: str) -> bool:
    rows = await query(url, "SELECT locked_by FROM geste_instances WHERE instance_id = $1", instance_id)
    return bool(rows) and rows[0]["locked_by"] == worker_id


# -- 5. the listener's connection killed ----------------------------------------------------------------


async def test_killed_listener_reconnects_and_catches_up(
    apps: Apps, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="geste.wakeups")
    delay = 1.0  # long enough to send an event surely during the outage
    worker = await apps.slow_worker(notify_reconnect_delay=delay)
    client = await apps.client()
    backend = await the_listener_backend()
    assert any("LISTEN/NOTIFY connected" in r.getMessage() for r in caplog.records)
    reconnects = worker.listener_status().reconnects  # 0 unless the server refused a first connection
    caplog.clear()
    handle = await worker.start_workflow("waiter", "outage")
    await wait_status(pg_url, handle.instance_id, "waiting")

    await query(POSTGRES_URL, "SELECT pg_terminate_backend($1)", backend["pid"])
    await wait_until(lambda: worker.listener_status().state == "reconnecting", "reconnecting")
    await client.send_event("outage", "during")  # nobody hears it: no listener, no local poke
    status = worker.listener_status()
    assert (status.state, status.reconnects) == ("reconnecting", reconnects), "not sent in the outage"
    assert status.connected_since is None and status.last_error

    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "geste.wakeups"]
    message = warning.getMessage()
    assert "connection lost" in message and status.last_error in message
    wait = float(re.search(r"reconnecting in ([0-9.]+)s", message).group(1))  # type: ignore[union-attr]
    assert 0.8 * delay - 0.05 <= wait <= 1.2 * delay + 0.05

    # the catch-up poll after reconnecting runs the instance woken during the outage
    assert (await handle.result(timeout=FAST_BOUND))["data"] == "during"
    status = worker.listener_status()
    assert (status.state, status.reconnects) == ("listening", reconnects + 1)
    again = await the_listener_backend()
    assert again["pid"] != backend["pid"]
    old = await query(POSTGRES_URL, "SELECT pid FROM pg_stat_activity WHERE pid = $1", backend["pid"])
    assert old == []

    # it LISTENs again: a start by the client is claimed at once (polls are minutes apart)
    before = status.notifications[WORKFLOW_RESUMABLE]
    handle = await client.start_workflow("sleeper", 0.0)
    assert await handle.result(timeout=FAST_BOUND) == os.getpid()
    assert worker.listener_status().notifications[WORKFLOW_RESUMABLE] > before


# -- 6. and 7. without notifications ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["not_sent", "other_database"])
async def test_fallback_polling_when_no_notification_arrives(apps: Apps, pg_url: str, how: str) -> None:
    if how == "not_sent":
        worker = await apps.slow_worker(listen_notify=True, notify_fallback_interval=0.3)
        client = await apps.client()
        client.storage.notify = False  # type: ignore[attr-defined]
    else:
        worker = await apps.slow_worker(
            notify_fallback_interval=0.3,
            listen_database_url=POSTGRES_URL.rsplit("/", 1)[0] + "/postgres",
        )
        backend = await the_listener_backend()
        assert backend["datname"] == "postgres"
        client = await apps.client()
    async with RawListener(pg_url) as raw:
        handle = await client.start_workflow("waiter", f"fallback-{how}")
        await wait_status(pg_url, handle.instance_id, "waiting")
        await client.send_event(f"fallback-{how}", how)
        assert (await handle.result(timeout=FAST_BOUND))["data"] == how
        await raw.sync()
        heard = raw.about(handle.instance_id)
    assert worker.listener_status().state == "listening"
    # not sent: nothing; other database: the two notifications went where the worker does not listen
    wakes = [ch for ch, body in heard if "finished" not in body]
    assert wakes == ([] if how == "not_sent" else [WORKFLOW_RESUMABLE] * 2)
    # the end told the client's result() (the worker's notifications are on), if it registered in time
    assert [body["finished"] for _, body in heard if "finished" in body] in ([], ["completed"])


async def test_listen_notify_false_polls_only(apps: Apps, pg_url: str) -> None:
    worker = await apps.open(listen_notify=False, poll_interval=0.05)
    client = await apps.client(listen_notify=False)
    assert worker.listener_status().state == "disabled"
    assert await wait_until(no_listener_backend, "no listener backend")  # (another test's may linger)
    async with RawListener(pg_url) as raw:
        handle = await client.start_workflow("waiter", "polled")
        await wait_status(pg_url, handle.instance_id, "waiting")
        await client.send_event("polled", 42)
        assert (await handle.result(timeout=FAST_BOUND))["data"] == 42
        await raw.sync()
        assert raw.about(handle.instance_id) == []  # nothing sent either
    pool = worker.storage._pool  # type: ignore[attr-defined]
    conns = [await pool.acquire() for _ in range(pool.get_size())]
    try:
        for conn in conns:
            assert await conn.fetch("SELECT pg_listening_channels()") == []
    finally:
        for conn in conns:
            await pool.release(conn)
    assert await listener_backends() == []
    assert worker.listener_status().state == "disabled"


# -- 8. listener_status ----------------------------------------------------------------------------------


async def test_listener_status_counts_notifications(apps: Apps) -> None:
    opened = time.time()
    worker = await apps.slow_worker()
    client = await apps.client()
    status = worker.listener_status()
    assert status.state == "listening"
    assert status.reconnects == 0 or status.last_error  # a refused first connection is counted, and why
    assert status.connected_since is not None
    assert opened - 1 <= status.connected_since.timestamp() <= time.time()
    assert set(status.notifications) == set(CHANNELS)
    as_dict = status.as_dict()
    assert as_dict["state"] == "listening" and set(as_dict) == {
        "state",
        "connected_since",
        "reconnects",
        "last_notification_at",
        "notifications",
        "last_error",
    }

    sent = time.time()
    handle = await client.start_workflow("sleeper", 0.3)  # a resumable (the 0.3 s timer is not announced)
    assert await handle.result(timeout=FAST_BOUND) == os.getpid()
    conn = await connect(worker.url)
    try:  # every notification of a channel is counted, routed here or not
        await conn.execute("SELECT pg_notify($1, '{}')", TIMER_EXPIRED)
    finally:
        await conn.close()
    await wait_until(
        lambda: worker.listener_status().notifications[TIMER_EXPIRED] > status.notifications[TIMER_EXPIRED],
        "the timer notification counted",
    )
    after = worker.listener_status()
    assert after.notifications[WORKFLOW_RESUMABLE] >= status.notifications[WORKFLOW_RESUMABLE] + 1
    assert after.last_notification_at is not None and after.last_notification_at.timestamp() >= sent - 0.01
    assert after.connected_since == status.connected_since and after.reconnects == status.reconnects


# -- 9. half-open connections: the probe -----------------------------------------------------------------


async def test_probe_unanswered_means_reconnect(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every probe_interval the listener asks the server which channels its session listens on; a probe
    not answered within probe_timeout (as on a half-open connection, where the socket looks fine and
    nothing arrives) makes it reconnect, and so does an answer without one of geste's channels."""
    caplog.set_level(logging.WARNING, logger="geste.wakeups")
    wakeups = Wakeups(poll_interval=1.0, fallback_interval=30.0, clock=time.time)
    caught_up: list[float] = []
    probes: list[int] = []
    deaf = unlisten = False

    async def deaf_when_told(conn: Any) -> set[str]:
        nonlocal unlisten
        probes.append(conn.connection.get_server_pid())
        if deaf:  # the question is sent and no answer ever comes, as on a half-open connection
            await asyncio.Event().wait()
        if unlisten:  # on this connection, between two of its own statements
            unlisten = False
            await conn.connection.execute(f"UNLISTEN {TIMER_EXPIRED}")
        return await PostgresListening.channels(conn)

    listener = Listener(
        probed(PostgresStorage(pg_url), deaf_when_told),
        wakeups=wakeups,
        reconnect_delay=0.05,
        on_caught_up=lambda: caught_up.append(time.time()),
        probe_interval=0.1,
        probe_timeout=0.3,
    )
    listener.start()
    try:
        await wait_until(lambda: listener.state == "listening", "listening")
        first_pid = listener._conn.connection.get_server_pid()
        await wait_until(lambda: len(probes) >= 5, "five probes answered")
        reconnects, caught = listener.reconnects, len(caught_up)  # 0 and 1 unless a connection was refused
        assert listener._conn.connection.get_server_pid() == first_pid  # answered probes: no reconnect
        assert wakeups.listening

        deaf = True
        await wait_until(lambda: listener.reconnects > reconnects, "a reconnect after an unanswered probe")
        deaf = False
        assert "probe" in (listener.last_error or "")
        assert any("probe" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        await wait_until(lambda: listener.state == "listening" and len(caught_up) > caught, "listening again")
        second_pid = listener._conn.connection.get_server_pid()
        assert second_pid != first_pid
        heard = len(probes)
        await wait_until(lambda: len(probes) >= heard + 3, "probes answered on the new connection")

        # the session stops listening on a channel (an UNLISTEN, a pooler that moved the session): the
        # next probe sees it, and the listener connects and LISTENs again
        reconnects = listener.reconnects
        unlisten = True
        await wait_until(lambda: listener.reconnects > reconnects, "a reconnect after a lost LISTEN")
        assert TIMER_EXPIRED in (listener.last_error or "")
        await wait_until(lambda: listener.state == "listening", "listening again")
        assert listener._conn.connection.get_server_pid() != second_pid
        assert await listener._conn.channels() >= set(CHANNELS)
    finally:
        await listener.stop()
    assert listener._conn is None and not wakeups.listening


async def test_stop_right_after_a_probe_answer_returns(pg_url: str) -> None:
    """Regression: on Python 3.11 ``asyncio.wait_for`` swallows a cancel that arrives while its awaitable
    has just completed; ``Listener.stop()`` called as a probe's answer arrives cancelled the listener task
    once, the cancel was lost, and stop (so ``App.close()``) hung for ever."""
    wakeups = Wakeups(poll_interval=1.0, fallback_interval=30.0, clock=time.time)
    stopping: list[asyncio.Task[None]] = []

    async def stop_on_answer(conn: Any) -> set[str]:
        found = await PostgresListening.channels(conn)
        if not stopping:  # stop while the answer is handed back to the probe
            stopping.append(asyncio.get_running_loop().create_task(listener.stop()))
        return found

    listener = Listener(
        probed(PostgresStorage(pg_url), stop_on_answer),
        wakeups=wakeups,
        reconnect_delay=0.05,
        on_caught_up=lambda: None,
        probe_interval=0.05,
        probe_timeout=2.0,
    )
    task = None
    try:
        listener.start()
        task = listener._task
        await wait_until(lambda: stopping, "a probe answered")
        done, _ = await asyncio.wait(stopping, timeout=5)
        assert done, "stop() did not return"
        assert task is not None and task.done()
    finally:
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=5)
        await listener._close()


def probed(storage: PostgresStorage, probe: Callable[[Any], Awaitable[set[str]]]) -> Any:
    """``storage.listen`` whose connections answer the listener's probe with ``probe(connection)``."""

    async def connect(*args: Any) -> Any:
        conn = await storage.listen(*args)
        conn.channels = partial(probe, conn)  # type: ignore[method-assign]
        return conn

    return connect
