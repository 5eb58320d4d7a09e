"""``result()`` of an instance that ends in another process: woken by the end's notification, not a poll.

On PostgreSQL a ``result()`` call that finds the instance unfinished (and not held by its own process)
registers a row in ``geste_result_waiters`` (schema 14), then reads the instance again; the statement that
ends the instance deletes its rows and, when one of a process other than the ending worker's was there,
sends a ``geste_workflow_resumable`` with a ``finished`` field, which no worker claims for. Registering
locks nothing in ``geste_instances``: a claim racing it still takes the instance (the bug of a first try
that registered in the instance's row).

Apps here poll every ``SLOW`` seconds unless a test says otherwise, and the read ``SETTLE_READ`` after a
registration is as far away (one test brings it back): only a notification, or the read right after a
registration, can return a result within ``FAST_BOUND``. Each App has a worker id of its own, which is
what "another process" means to the database; one test ends the instance in another OS process too.
Notifications are global to a database and other test runs share it: assertions filter them by this
test's instance ids, and ``RawListener.sync`` proves that everything committed before it was delivered,
so "nothing was sent" is asserted without sleeping. On SQLite ``result()`` reads the instance by its
primary key, as before.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import pytest

import geste
import geste._client
from geste._client import Client
from geste.errors import AppNotOpenError, ResultTimeout, WorkflowCancelled, WorkflowFailed
from geste.runtime.wakeups import CHANNELS, WORKFLOW_RESUMABLE
from geste.storage.postgres import PostgresStorage, parse_postgres_url
from geste.storage.sqlite import SQLiteStorage

from .support import MovableClock, database_at_version, raw_query, wait_until

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import POSTGRES_URL, die_with_parent  # noqa: E402
from tests.test_notify import (  # noqa: E402
    RawListener,
    Worker,
    connect,
    listener_backends,
    new_id,
    query,
    wait_status,
)

SLOW = 300.0
"""Poll interval (and leases, fallback) of the Apps that only a notification may wake in time."""
FAST_BOUND = 5.0
"""A result woken by the end's notification returns well within this (far below SLOW)."""
LONG = 3 * FAST_BOUND
"""The timeout of the results awaited: longer than FAST_BOUND, since a wait that times out reads the
instance once more and returns an end it finds then, which ``promptly`` must not take for a wake-up."""
WORKFLOWS = ("waiter", "refuser", "unserved")


def build_app(url: str, *, workflows: Collection[str] = WORKFLOWS, **options: Any) -> geste.App:
    """An App registering ``workflows`` of: ``waiter`` (returns the data of the event it waits for),
    ``refuser`` (fails after it), ``unserved`` (only clients register it: it stays pending)."""
    app = geste.App(url, **options)

    async def waiter(ctx: geste.WorkflowContext, event_type: str) -> Any:
        return (await ctx.wait_event(event_type)).data

    async def refuser(ctx: geste.WorkflowContext, event_type: str) -> None:
        await ctx.wait_event(event_type)
        raise ValueError("refused")

    async def unserved(ctx: geste.WorkflowContext) -> None:
        return None

    for fn in (waiter, refuser, unserved):
        if fn.__name__ in workflows:
            app.workflow(fn)
    return app


class Apps:
    """Apps opened by a test on its database, closed at its end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: list[geste.App] = []

    async def open(self, **options: Any) -> geste.App:
        for key in ("poll_interval", "lock_timeout", "notify_fallback_interval"):
            options.setdefault(key, SLOW)
        options.setdefault("shutdown_grace", 0.1)
        options.setdefault("notify_reconnect_delay", 0.2)
        app = build_app(options.pop("url", self.url), **options)
        await app.open()
        self.opened.append(app)
        if app.run_worker and app.notify.enabled:
            await wait_until(lambda: app.listener_status().state == "listening", "the listener to listen")
        return app

    async def worker(self, **options: Any) -> geste.App:
        options.setdefault("workflows", ("waiter", "refuser"))
        return await self.open(**options)

    async def client(self, **options: Any) -> geste.App:
        return await self.open(run_worker=False, **options)

    async def close(self, app: geste.App) -> None:
        self.opened.remove(app)
        await app.close()

    async def close_all(self) -> None:
        while self.opened:
            await self.opened.pop().close()


@pytest.fixture(autouse=True)
def no_settle_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The read ``SETTLE_READ`` after a registration put minutes away too (one test brings it back): a
    result within FAST_BOUND is then the notification's (or the read right after registering)."""
    monkeypatch.setattr(geste._client, "SETTLE_READ", SLOW)


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


async def waiters_of(url: str, instance_id: str) -> list[str]:
    """The processes (worker ids) registered for the instance's end, one per waiting call."""
    rows = await query(
        url, "SELECT process FROM geste_result_waiters WHERE instance_id = $1 ORDER BY process", instance_id
    )
    return [row["process"] for row in rows]


async def registered(url: str, instance_id: str, app: geste.App, calls: int = 1) -> bool:
    """``calls`` result() calls of ``app`` are registered for the instance's end and its listener listens:
    from now on an end elsewhere notifies them."""
    listening = app.listener_status().state == "listening"
    return listening and (await waiters_of(url, instance_id)).count(app.worker_id) == calls


async def no_waiters(url: str, instance_id: str) -> bool:
    return await waiters_of(url, instance_id) == []


async def promptly(waiting: asyncio.Future[Any]) -> Any:
    """The outcome of ``waiting`` (a result() task), which must come within FAST_BOUND: a poll would
    take SLOW, and a timed-out wait's last read LONG."""
    done, _ = await asyncio.wait([waiting], timeout=FAST_BOUND)
    assert done, f"not woken within {FAST_BOUND}s"
    return waiting.result()


def ends(raw: RawListener, instance_id: str) -> list[dict[str, Any]]:
    """The end notifications heard about the instance."""
    return [body for _, body in raw.about(instance_id, WORKFLOW_RESUMABLE) if "finished" in body]


def schema_of(url: str) -> str:
    return parse_postgres_url(url)[1]["schema"]


async def waiting_instance(client: geste.App, pg_url: str, workflow: str = "waiter") -> tuple[str, str]:
    """A ``workflow`` instance started by ``client`` and waiting for its own event: (instance id, event)."""
    event = new_id(workflow)
    handle = await client.start_workflow(workflow, event)
    await wait_status(pg_url, handle.instance_id, "waiting")
    return handle.instance_id, event


# -- woken by the end ------------------------------------------------------------------------------------


async def test_a_result_awaited_in_a_client_returns_on_the_end_not_a_poll(
    apps: Apps, raw: RawListener, pg_url: str
) -> None:
    """A client (no worker) opens its listener at its first wait, shares it with every later wait, and
    closes it with the App; the end notifies it once, and forgets the registration."""
    worker = await apps.worker()
    client = await apps.client()
    assert client.listener_status().state == "disabled"  # no listener until a result must be awaited
    assert len(await listener_backends()) == 1  # the worker's
    iid, event = await waiting_instance(client, pg_url)
    waiting = asyncio.create_task(client.get_handle(iid).result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, iid, client), "the client to register and listen")
    assert len(await listener_backends()) == 2  # the client's, started by its first wait
    listener = client.runtime.listener
    assert listener is not None and listener.channels == (WORKFLOW_RESUMABLE,)  # not the other three

    other, other_event = await waiting_instance(client, pg_url)
    also = [asyncio.create_task(client.get_handle(other).result(timeout=LONG)) for _ in range(2)]
    await wait_until(lambda: registered(pg_url, other, client, calls=2), "two more calls to register")
    assert len(await listener_backends()) == 2  # one listener for every wait of the App

    heard = client.listener_status().notifications[WORKFLOW_RESUMABLE]
    await worker.send_event(event, {"n": 1})
    assert await promptly(waiting) == {"n": 1}
    await worker.send_event(other_event, "both")
    assert [await promptly(task) for task in also] == ["both", "both"]
    assert client.listener_status().notifications[WORKFLOW_RESUMABLE] > heard
    await raw.sync()
    assert ends(raw, iid) == [
        {"instance_id": iid, "workflow_name": "waiter", "finished": "completed", "schema": schema_of(pg_url)}
    ]
    assert len(ends(raw, other)) == 1  # one notification for the instance, however many wait
    assert await waiters_of(pg_url, iid) == [] and await waiters_of(pg_url, other) == []  # the end's delete
    await apps.close(client)
    await wait_until(lambda: _count(listener_backends(), 1), "the client's listener to close with it")


async def _count(rows: Any, n: int) -> bool:
    return len(await rows) == n


async def test_a_result_ended_in_another_os_process_returns_on_the_end(
    tmp_path: Path, apps: Apps, pg_url: str
) -> None:
    """The end happens in a worker process (``tests/apps/notify_app.py``, polls of minutes)."""
    workers = Worker(tmp_path, pg_url)
    try:
        proc = await workers.spawn()
        client = await apps.client()
        iid, event = await waiting_instance(client, pg_url)  # claimed by the process, by notification
        waiting = asyncio.create_task(client.get_handle(iid).result(timeout=LONG))
        await wait_until(lambda: registered(pg_url, iid, client), "the client to register")
        await client.send_event(event, "x")
        assert await promptly(waiting) == {"data": "x", "pid": proc.pid}
    finally:
        workers.stop_all()


async def test_a_worker_awaiting_an_instance_another_worker_runs_is_woken(apps: Apps, pg_url: str) -> None:
    """A process whose worker runs other workflows registers like a client; its worker's listener (the
    four channels) hands the end to its result() calls."""
    runner = await apps.worker()
    other = await apps.worker(workflows=("refuser",))
    iid, event = await waiting_instance(runner, pg_url)  # started by runner: runs there
    waiting = asyncio.create_task(other.get_handle(iid).result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, iid, other), "the other worker to register")
    assert other.runtime.listener is not None and other.runtime.listener.channels == CHANNELS
    await runner.send_event(event, "peer")
    assert await promptly(waiting) == "peer"


async def test_a_result_awaited_where_the_instance_runs_registers_once_it_suspends(
    apps: Apps, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held by this process, an instance is awaited without a registration (its end here wakes the call
    in memory); its suspension wakes the call, which then registers, since it may end elsewhere now. Ended
    here after all, it wakes the call in memory and forgets the registration."""
    released: list[str] = []
    original = Client.on_released

    def spy(self: Client, instance_id: str) -> None:
        released.append(instance_id)
        original(self, instance_id)

    monkeypatch.setattr(Client, "on_released", spy)
    worker = await apps.worker()
    event = new_id("here")
    handle = await worker.start_workflow("waiter", event)  # created claimed: runs here, then suspends
    waiting = asyncio.create_task(handle.result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, handle.instance_id, worker), "the call to register")
    assert released == [handle.instance_id]  # the engine's suspension told the client
    await worker.send_event(event, "here")
    assert await promptly(waiting) == "here"
    assert await no_waiters(pg_url, handle.instance_id)


async def test_failures_and_cancellations_are_told_too(apps: Apps, pg_url: str) -> None:
    """A failure and a cancellation after compensations (finish) and the cancel of an instance that never
    ran (cancel_unstarted) notify the calls waiting elsewhere, with their errors as before."""
    worker = await apps.worker()
    client, canceller = await apps.client(), await apps.client()
    failing, event = await waiting_instance(client, pg_url, "refuser")
    waiting = asyncio.create_task(client.get_handle(failing).result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, failing, client), "registered")
    await worker.send_event(event)
    with pytest.raises(WorkflowFailed, match="refused"):
        await promptly(waiting)

    flagged, _ = await waiting_instance(client, pg_url)
    waiting = asyncio.create_task(client.get_handle(flagged).result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, flagged, client), "registered")
    await canceller.cancel(flagged)  # flagged: the worker ends it as cancelled
    with pytest.raises(WorkflowCancelled):
        await promptly(waiting)

    unstarted = await client.start_workflow("unserved")  # pending: a cancel ends it at once
    waiting = asyncio.create_task(unstarted.result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, unstarted.instance_id, client), "registered")
    await canceller.cancel(unstarted.instance_id)
    with pytest.raises(WorkflowCancelled):
        await promptly(waiting)
    for iid in (failing, flagged, unstarted.instance_id):
        assert await no_waiters(pg_url, iid)


# -- registering locks nothing a claim needs (the bug of the first try) --------------------------------


async def test_an_open_registration_never_keeps_a_claim_from_the_instance(apps: Apps, pg_url: str) -> None:
    """A registration held uncommitted (the statement run in an open transaction) while the instance is
    woken: the worker (polls of minutes) claims it at once, and a SKIP LOCKED read finds its row
    unlocked. Registering in the instance's row locked it, and the claim skipped it: a lost wake-up."""
    await apps.worker()
    client = await apps.client()
    iid, event = await waiting_instance(client, pg_url)
    sql = client.storage._q["watch_result"]  # type: ignore[attr-defined]
    conn, probe = await connect(pg_url), await connect(pg_url)
    try:
        held = conn.transaction()
        await held.start()
        assert await conn.fetchval(sql, iid, "held-open", "another-process", time.time() + 60)
        free = await probe.fetch(
            "SELECT instance_id FROM geste_instances WHERE instance_id = $1 FOR UPDATE SKIP LOCKED", iid
        )
        assert [row["instance_id"] for row in free] == [iid]  # not locked by the registration
        await client.send_event(event, "claimed")
        await wait_status(pg_url, iid, "completed", timeout=FAST_BOUND)  # claimed by the notification
        await held.commit()
    finally:
        await conn.close()
        await probe.close()
    assert await client.get_handle(iid).result(timeout=LONG) == "claimed"


async def test_registrations_racing_claims_in_two_processes(tmp_path: Path, apps: Apps, pg_url: str) -> None:
    """Repeatedly, result() registers in this process while the event that wakes the instance makes the
    worker process (polls of minutes) claim it: every claim takes its instance and every result returns
    on the end's notification."""
    workers = Worker(tmp_path, pg_url)
    try:
        proc = await workers.spawn()
        client = await apps.client()
        instances = [await waiting_instance(client, pg_url) for _ in range(12)]

        async def race(iid: str, event: str, pause: float) -> Any:
            waiting = asyncio.create_task(client.get_handle(iid).result(timeout=LONG))
            await asyncio.sleep(pause)  # registration and claim overlap at various points
            await client.send_event(event, event)
            return await promptly(waiting)

        for round_ in range(3):
            batch = instances[round_ * 4 : (round_ + 1) * 4]
            pauses = [0.0, 0.0005, 0.001, 0.002]
            found = await asyncio.gather(*(race(i, e, p) for (i, e), p in zip(batch, pauses, strict=True)))
            assert found == [{"data": e, "pid": proc.pid} for _, e in batch]
        for iid, _ in instances:
            assert await no_waiters(pg_url, iid)
    finally:
        workers.stop_all()


# -- the race between registering and ending -----------------------------------------------------------


async def test_an_end_committed_before_the_registration_is_read_at_once(
    apps: Apps, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end commits between the call's first read and its registration (forced: the test ends the
    instance, which nobody runs, just before the registration): nothing is registered on an ended
    instance, and the read that follows the registration returns it; no notification was needed."""
    client = await apps.client()
    handle = await client.start_workflow("unserved")
    original = PostgresStorage.watch_result
    written: list[bool] = []

    async def end_first(self: PostgresStorage, instance_id: str, **kwargs: Any) -> bool:
        await query(
            pg_url,
            "UPDATE geste_instances SET status = 'completed', result = '7', finished_at = 1 "
            "WHERE instance_id = $1",
            instance_id,
        )
        written.append(await original(self, instance_id, **kwargs))
        return written[-1]

    monkeypatch.setattr(PostgresStorage, "watch_result", end_first)
    assert await promptly(asyncio.create_task(handle.result(timeout=LONG))) == 7
    assert written == [False] and await no_waiters(pg_url, handle.instance_id)


async def test_an_end_whose_statement_read_before_the_registration_is_found_by_the_settle_read(
    apps: Apps, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one order neither side sees: the end's statement took its snapshot before the registration
    committed (so it finds no waiter and notifies nobody) and commits after the call read the instance
    again (so that read finds it unfinished). Forced with a REPEATABLE READ transaction that ends the
    instance: its snapshot is taken, the call registers and reads, then it ends the instance and commits.
    The read SETTLE_READ after the registration finds the end, long before the poll (SLOW)."""
    reads: list[str] = []
    original = PostgresStorage.get_instance

    async def counted(self: PostgresStorage, instance_id: str) -> Any:
        found = await original(self, instance_id)
        reads.append(instance_id)
        return found

    monkeypatch.setattr(PostgresStorage, "get_instance", counted)
    monkeypatch.setattr(geste._client, "SETTLE_READ", 2.0)  # well after the steps below, well before SLOW
    client = await apps.client()
    client.runtime.listen_for_results(True)  # listening before the call: its reads are the ones below
    await wait_until(lambda: client.listener_status().state == "listening", "the client's listener")
    handle = await client.start_workflow("unserved")
    iid = handle.instance_id
    conn = await connect(pg_url)
    try:
        end = conn.transaction(isolation="repeatable_read")
        await end.start()
        await conn.fetchval(
            "SELECT count(*) FROM geste_result_waiters WHERE instance_id = $1", iid
        )  # snapshot
        waiting = asyncio.create_task(handle.result(timeout=LONG))
        await wait_until(lambda: registered(pg_url, iid, client), "the call to register")
        await wait_until(lambda: reads.count(iid) >= 2, "the call to read again after registering")
        assert len(reads) == 2 and not waiting.done()  # the first read, the read after registering
        gone = await conn.fetchval(
            "WITH awaited AS (DELETE FROM geste_result_waiters WHERE instance_id = $1 RETURNING 1) "
            "SELECT count(*) FROM awaited",
            iid,
        )
        assert gone == 0  # the end's snapshot predates the registration: nobody to notify
        await conn.execute(
            "UPDATE geste_instances SET status = 'completed', result = '8', finished_at = 1 "
            "WHERE instance_id = $1",
            iid,
        )
        await end.commit()
    finally:
        await conn.close()
    assert await promptly(waiting) == 8
    assert len(reads) == 3  # the settle read, 2 s after the registration; the poll is minutes away
    await wait_until(lambda: no_waiters(pg_url, iid), "the call to forget its registration")


async def test_results_awaited_as_their_ends_commit_all_return_at_once(apps: Apps, pg_url: str) -> None:
    """result() called as the event that ends the instance is sent, for 20 instances at once: whichever
    comes first, each returns in time (from a read or from the notification)."""
    worker = await apps.worker()
    client = await apps.client()
    instances = [await waiting_instance(client, pg_url) for _ in range(20)]

    async def race(iid: str, event: str) -> Any:
        waiting = asyncio.create_task(client.get_handle(iid).result(timeout=LONG))
        await worker.send_event(event, event)
        return await waiting

    done = asyncio.gather(*(race(i, e) for i, e in instances))
    assert await promptly(done) == [e for _, e in instances]  # type: ignore[arg-type]


# -- registrations are cleaned up ------------------------------------------------------------------------


async def test_calls_that_stop_waiting_forget_their_registration(apps: Apps, pg_url: str) -> None:
    """A timeout, a cancelled call and an end found by a read (the ending worker sends no notification)
    each delete the call's row; a closing App deletes those of its calls still waiting."""
    worker = await apps.worker(listen_notify=False, poll_interval=0.05)
    client = await apps.client(poll_interval=0.3)
    iid, event = await waiting_instance(client, pg_url)
    handle = client.get_handle(iid)

    with pytest.raises(ResultTimeout):
        await handle.result(timeout=0.5)
    await wait_until(lambda: no_waiters(pg_url, iid), "the timed-out call to forget its row")

    waiting = asyncio.create_task(handle.result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, iid, client), "registered")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await wait_until(lambda: no_waiters(pg_url, iid), "the cancelled call to forget its row")

    waiting = asyncio.create_task(handle.result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, iid, client), "registered")
    await worker.send_event(event, "polled")  # listen_notify=False: the end deletes it, tells nobody
    assert await promptly(waiting) == "polled"  # the poll (0.3 s) found it
    await wait_until(lambda: no_waiters(pg_url, iid), "the end to delete the row")

    other, _ = await waiting_instance(client, pg_url)
    calls = [asyncio.create_task(client.get_handle(other).result(timeout=LONG)) for _ in range(3)]
    await wait_until(lambda: registered(pg_url, other, client, calls=3), "three calls registered")
    await apps.close(client)
    assert await no_waiters(pg_url, other)  # deleted while the App closed, before the database was
    for call in calls:
        with pytest.raises(AppNotOpenError):
            await promptly(call)


async def test_a_waiting_call_renews_its_registration_and_the_chore_deletes_the_dead(
    apps: Apps, pg_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A call that waits long renews its row before it expires; the row of a process killed while it
    waited stays until its expiry, and the cleanup chore (one worker of the cluster) deletes it then,
    leaving the live ones."""
    client = await apps.client()
    iid = (await client.start_workflow("unserved")).instance_id  # pending for ever: nobody runs it
    monkeypatch.setattr(geste._client, "RESULT_WATCH_TTL", 1.0)  # renewed every 0.5 s
    short = asyncio.create_task(client.get_handle(iid).result(timeout=60))
    await wait_until(lambda: registered(pg_url, iid, client), "registered")
    [first] = await query(pg_url, "SELECT expires_at FROM geste_result_waiters WHERE instance_id = $1", iid)

    async def renewed() -> bool:
        rows = await query(pg_url, "SELECT expires_at FROM geste_result_waiters WHERE instance_id = $1", iid)
        return len(rows) == 1 and rows[0]["expires_at"] > first["expires_at"] + 0.3

    await wait_until(renewed, "the waiting call to renew its row")
    short.cancel()
    await wait_until(lambda: no_waiters(pg_url, iid), "the cancelled call to forget its row")

    monkeypatch.setattr(geste._client, "RESULT_WATCH_TTL", 10_000.0)
    live = asyncio.create_task(client.get_handle(iid).result(timeout=60))
    await wait_until(lambda: registered(pg_url, iid, client), "registered")
    dead = await _killed_waiter(tmp_path, pg_url, iid)  # its row stays, expiring in 600 s (its TTL)
    clock = MovableClock()
    worker = await apps.worker(clock=clock)
    maintenance = worker.runtime.maintenance
    assert maintenance is not None
    await maintenance.cleanup()
    assert sorted(await waiters_of(pg_url, iid)) == sorted([client.worker_id, dead])  # none expired
    clock.advance(700)
    await maintenance.cleanup()
    assert await waiters_of(pg_url, iid) == [client.worker_id]  # the dead one's expired, the live one not
    live.cancel()


async def _killed_waiter(folder: Path, pg_url: str, instance_id: str) -> str:
    """A client process that awaits the instance's result, killed (SIGKILL) once it registered: its
    worker id."""
    script = folder / "waiter.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            sys.path.insert(0, {str(ROOT)!r})
            from tests.test_result_wakeup import build_app

            async def main():
                app = build_app({pg_url!r}, run_worker=False, worker_id="doomed-waiter")
                async with app:
                    await app.get_handle({instance_id!r}).result()

            asyncio.run(main())
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=ROOT, env={**os.environ}, preexec_fn=die_with_parent
    )
    try:

        async def there() -> bool:
            assert proc.poll() is None, "the waiter process exited"
            return "doomed-waiter" in await waiters_of(pg_url, instance_id)

        await wait_until(there, "the waiter process to register", timeout=30)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return "doomed-waiter"


# -- a lost notification costs latency, never the result -------------------------------------------------


async def test_a_result_whose_listener_is_gone_is_found_by_the_poll(apps: Apps, pg_url: str) -> None:
    """The client's listener connection is killed and reconnects only minutes later: the end's
    notification is lost; the call, no longer listening, reads every ≤ poll_interval and finds it."""
    worker = await apps.worker()
    client = await apps.client(poll_interval=0.5, notify_reconnect_delay=SLOW)
    iid, event = await waiting_instance(client, pg_url)
    waiting = asyncio.create_task(client.get_handle(iid).result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, iid, client), "registered")
    await query(POSTGRES_URL, "SELECT pg_terminate_backend($1)", await _listener_backend_of(client))
    await wait_until(lambda: client.listener_status().state == "reconnecting", "the listener to be lost")
    await worker.send_event(event, "polled")
    assert await promptly(waiting) == "polled"
    assert client.listener_status().state == "reconnecting"  # no catch-up explains it


async def test_an_end_during_a_listener_outage_is_caught_up_on_reconnect(
    apps: Apps, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's listener connection dies and the end is notified while nobody of it listens: the call
    polls from the loss on, and the reconnect makes every waiting call read (the catch-up)."""
    caught_up: list[bool] = []
    original = Client.wake_waiters

    def spy(self: Client) -> None:
        caught_up.append(self._listen(False) is True)  # woken by a connect, not by the loss
        original(self)

    monkeypatch.setattr(Client, "wake_waiters", spy)
    worker = await apps.worker()
    client = await apps.client(notify_reconnect_delay=1.0)
    iid, event = await waiting_instance(client, pg_url)
    waiting = asyncio.create_task(client.get_handle(iid).result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, iid, client), "registered")
    await query(POSTGRES_URL, "SELECT pg_terminate_backend($1)", await _listener_backend_of(client))
    await wait_until(lambda: client.listener_status().state == "reconnecting", "the outage")
    caught_up.clear()
    await worker.send_event(event, "caught up")
    await wait_status(pg_url, iid, "completed")
    assert client.listener_status().state == "reconnecting", "ended after the outage: inconclusive"
    assert await promptly(waiting) == "caught up"  # read at the loss, then polled, or caught up
    await wait_until(lambda: client.listener_status().state == "listening", "the reconnect")
    assert True in caught_up  # on reconnect every waiting call reads: an end notified meanwhile is found


async def test_a_client_whose_listener_cannot_connect_polls(apps: Apps, pg_url: str) -> None:
    worker = await apps.worker()
    client = await apps.client(
        poll_interval=0.2, listen_database_url="postgresql://postgres@127.0.0.1:1/none"
    )
    iid, event = await waiting_instance(client, pg_url)
    waiting = asyncio.create_task(client.get_handle(iid).result(timeout=LONG))
    await wait_until(lambda: client.listener_status().state == "reconnecting", "the listener to fail")
    await worker.send_event(event, "polled")
    assert await promptly(waiting) == "polled"


async def _listener_backend_of(app: geste.App) -> int:
    """The pid of the server process of ``app``'s listener connection."""
    listener = app.runtime.listener
    assert listener is not None and listener._conn is not None
    transport = listener._conn.connection._transport  # type: ignore[attr-defined]
    port = transport.get_extra_info("sockname")[1]
    [row] = await query(POSTGRES_URL, "SELECT pid FROM pg_stat_activity WHERE client_port = $1", port)
    pid: int = row["pid"]
    return pid


# -- nothing sent, nothing more paid, when nobody waits elsewhere ---------------------------------------


async def test_an_end_nobody_awaits_elsewhere_sends_no_notification(
    apps: Apps, raw: RawListener, pg_url: str
) -> None:
    """Awaited nowhere, or only by the process that ends it (registered while it waited unheld: the end
    skips the ending worker's own process): no NOTIFY. The same end awaited by another process: one."""
    worker = await apps.worker()
    client = await apps.client()
    alone, alone_event = await waiting_instance(client, pg_url)
    mine, mine_event = await waiting_instance(client, pg_url)
    waiting_here = asyncio.create_task(worker.get_handle(mine).result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, mine, worker), "the worker's own call to register")
    for event in (alone_event, mine_event):
        await client.send_event(event, event)
    assert await promptly(waiting_here) == mine_event
    await wait_status(pg_url, alone, "completed")
    await raw.sync()
    assert ends(raw, alone) == [] and ends(raw, mine) == []
    assert await no_waiters(pg_url, mine)

    awaited, event = await waiting_instance(client, pg_url)
    waiting = asyncio.create_task(client.get_handle(awaited).result(timeout=LONG))
    await wait_until(lambda: registered(pg_url, awaited, client), "the client to register")
    await client.send_event(event, 1)
    assert await promptly(waiting) == 1
    await raw.sync()
    assert [end["finished"] for end in ends(raw, awaited)] == ["completed"]


async def test_ends_in_one_group_commit_notify_each_awaited_one(
    apps: Apps, raw: RawListener, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ends committed together (``finish_batch``) notify the awaited ones, each once, and no other."""
    batch_sizes: list[int] = []
    original = PostgresStorage._finish_batch

    async def spy(self: Any, batch: Any) -> Any:
        batch_sizes.append(len(batch))
        return await original(self, batch)

    monkeypatch.setattr(PostgresStorage, "_finish_batch", spy)
    await apps.worker()
    client = await apps.client()
    event = new_id("many")
    handles = [await client.start_workflow("waiter", event) for _ in range(30)]
    for handle in handles:
        await wait_status(pg_url, handle.instance_id, "waiting")
    awaited = handles[::2]
    waiting = [asyncio.create_task(h.result(timeout=LONG)) for h in awaited]
    for handle in awaited:
        await wait_until(lambda h=handle: registered(pg_url, h.instance_id, client), "registered")
    await client.send_event(event, "all")  # one event for all 30: they end together
    assert await promptly(asyncio.gather(*waiting)) == ["all"] * len(awaited)  # type: ignore[arg-type]
    for handle in handles:
        await wait_status(pg_url, handle.instance_id, "completed")
    await raw.sync()
    assert [len(ends(raw, h.instance_id)) for h in handles] == [1, 0] * 15
    assert max(batch_sizes) > 1  # ends shared finish_batch statements


async def test_an_end_probes_the_waiters_by_key(apps: Apps, pg_url: str) -> None:
    """With 10,000 registrations of other instances, ``finish`` and ``finish_batch`` read the waiters'
    table through its primary key and find nothing for an instance nobody awaits (EXPLAIN ANALYZE of each
    statement on a leased instance, rolled back)."""
    client = await apps.client()
    conn = await connect(pg_url)
    try:
        await conn.execute(
            "INSERT INTO geste_result_waiters SELECT 'other-' || n, 'w', 'p', 1e12 "
            "FROM generate_series(1, 10000) AS n"
        )
        await conn.execute("ANALYZE geste_result_waiters")
        handle = await client.start_workflow("unserved")
        iid = handle.instance_id
        await conn.execute(
            "UPDATE geste_instances SET lease_id = 'l', locked_by = 'x' WHERE instance_id = $1", iid
        )
        q = client.storage._q  # type: ignore[attr-defined]
        rows: list[list[Any]] = [[], [], [], [], [], [], []]
        for name, params in (
            ("finish", (iid, "l", "completed", "null", None, 1.0, *rows[1:], True, [])),  # no children
            ("finish_batch", ([iid], ["l"], ["completed"], ["null"], [None], [1.0], [0], *rows, True, [])),
        ):
            tx = conn.transaction()
            await tx.start()
            try:
                plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {q[name]}", *params)
            finally:
                await tx.rollback()
            scans = [
                (node["Node Type"], node.get("Index Name"), node.get("Actual Rows"))
                for node in _nodes(json.loads(plan)[0]["Plan"])
                if node.get("Relation Name") == "geste_result_waiters" and "Scan" in node["Node Type"]
            ]
            assert scans == [("Index Scan", "geste_result_waiters_pkey", 0)], (name, scans)
    finally:
        await conn.close()


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


# -- SQLite, and the upgrade from schema 13 ---------------------------------------------------------------


async def test_sqlite_a_result_awaited_in_another_app_reads_the_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No LISTEN/NOTIFY: result() reads the instance (one read by primary key a round), registers nothing
    and opens no listener, as before."""
    url = f"sqlite:///{tmp_path / 'geste.db'}"
    reads: list[str] = []
    original = SQLiteStorage.get_instance

    async def spy(self: Any, instance_id: str) -> Any:
        reads.append(instance_id)
        return await original(self, instance_id)

    async def refused(self: Any, *args: Any, **kwargs: Any) -> bool:
        raise AssertionError("SQLite has nothing to register")

    monkeypatch.setattr(SQLiteStorage, "get_instance", spy)
    monkeypatch.setattr(Client, "_watch", refused)
    worker = build_app(url, poll_interval=0.05)
    client = build_app(url, run_worker=False, poll_interval=0.2)
    async with worker, client:
        handle = await client.start_workflow("waiter", "sqlite-go")
        waiting = asyncio.create_task(handle.result(timeout=LONG))
        await wait_until(lambda: len(reads) >= 3, "three reads")
        assert client.listener_status().state == "disabled"
        await worker.send_event("sqlite-go", "read")
        assert await waiting == "read"
        assert set(reads) == {handle.instance_id}


async def test_an_upgrade_from_schema_13(db_url: str) -> None:
    """A database of schema 13 opens at the current schema (14 added the waiters' table, on PostgreSQL
    only), and a result() awaited in a client returns on the end."""
    url = db_url
    backend = "sqlite" if url.startswith("sqlite") else "postgres"
    await database_at_version(url, 13)
    group = Apps(url)
    try:
        worker = await group.worker(poll_interval=0.05 if backend == "sqlite" else SLOW)
        client = await group.client(poll_interval=0.05 if backend == "sqlite" else SLOW)
        assert await client.storage.schema_version() >= 14
        tables = await raw_query(
            url,
            "SELECT name FROM sqlite_master WHERE name = 'geste_result_waiters'"
            if backend == "sqlite"
            else "SELECT table_name AS name FROM information_schema.tables "
            "WHERE table_name = 'geste_result_waiters' AND table_schema = $1",
            *(() if backend == "sqlite" else (schema_of(url),)),
        )
        assert len(tables) == (0 if backend == "sqlite" else 1)
        event = new_id("upgraded")
        handle = await client.start_workflow("waiter", event)
        waiting = asyncio.create_task(handle.result(timeout=LONG))
        if backend == "postgres":
            await wait_until(lambda: registered(url, handle.instance_id, client), "registered")
        await worker.send_event(event, "upgraded")
        assert await promptly(waiting) == "upgraded"
    finally:
        await group.close_all()


# -- the benchmark's measurement, at a tiny size ----------------------------------------------------------


async def test_the_benchmark_measures_a_notified_result_across_processes(pg_url: str) -> None:
    """``benchmarks/result_latency.measure`` runs end to end (its numbers are the benchmark's business)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from result_latency import NOTIFY, measure
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    measured = await measure(pg_url, samples=3, mode=NOTIFY, poll_interval=SLOW, spread=(0.01, 0.05), seed=1)
    assert len(measured.samples) == 3
    assert measured.p99 < FAST_BOUND  # with polls of minutes: every sample was notified
