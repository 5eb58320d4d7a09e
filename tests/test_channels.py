"""Channels: ``ctx.subscribe`` / ``receive`` / ``publish`` / ``send_to``, ``app.publish`` / ``send_to``.

The semantics under test (README, "Channels"): a broadcast subscriber gets every message published after
it subscribed, in order; each message of a channel's competing subscribers is taken by exactly one of
them; a direct message only by its target. Messages are durable (kept for a receiver that is busy,
suspended or whose worker was killed) and land exactly once in a history; a replay never publishes again.
Every wait below is for a condition with a deadline; worker subprocesses run ``tests/apps/channels_app.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner

import geste
import geste.runtime.chores as chores
from geste.cli import main as geste_main
from geste.errors import (
    AppNotOpenError,
    ConfigurationError,
    InstanceNotFoundError,
    PayloadTooLargeError,
    ReceiveTimeout,
    SerializationError,
    WorkflowCancelled,
    WorkflowFailed,
)
from geste.runtime.wakeups import CHANNEL_MESSAGE, Listener, Wakeups
from geste.runtime.worker import Worker
from geste.storage.base import Claims
from geste.storage.postgres import PostgresStorage, parse_postgres_url

from .processes import start_process, wait_ready
from .support import MovableClock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `tests.apps` is importable however pytest was started
    sys.path.insert(0, str(ROOT))

from tests.apps.channels_app import build_app  # noqa: E402
from tests.support import wait_status, wait_until  # noqa: E402

MakeApp = Callable[..., geste.App]
SLOW = 300.0
"""Poll interval, lock timeout and fallback interval of a worker that only a notification may wake."""
FAST_BOUND = 5.0


async def sql(db_url: str, query: str) -> list[tuple[Any, ...]]:
    """Run ``query`` on the test database (either backend) and return its rows."""
    if db_url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(db_url[len("sqlite:///") :])) as conn:
            return [tuple(row) for row in conn.execute(query).fetchall()]
    dsn, options = parse_postgres_url(db_url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
    try:
        return [tuple(row) for row in await conn.fetch(query)]
    finally:
        await conn.close()


async def count(db_url: str, table: str) -> int:
    rows = await sql(db_url, f"SELECT count(*) FROM {table}")
    return int(rows[0][0])


def kinds(history: list[geste.HistoryEntry]) -> list[tuple[str, str]]:
    return [(str(e.kind), e.name) for e in history]


def received(history: list[geste.HistoryEntry]) -> list[Any]:
    return [e.payload["data"] for e in history if e.kind == geste.StepKind.MESSAGE]


# -- broadcast ---------------------------------------------------------------------------------------


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_broadcast_in_order_and_only_after_subscribing(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def listener(ctx: geste.WorkflowContext, n: int) -> list[Any]:
        await ctx.subscribe("news")
        return [(await ctx.receive("news")).data for _ in range(n)]

    async with app:
        early = await listener.start_with_id("early", 3)
        await wait_status(app, "early", geste.Status.WAITING)
        await app.publish("news", 1)  # before "late" subscribed: not for it
        late = await listener.start_with_id("late", 2)
        await wait_status(app, "late", geste.Status.WAITING)
        await app.publish("news", 2)
        await app.publish("news", {"n": 3})
        assert await early.result(timeout=10) == [1, 2, {"n": 3}]
        assert await late.result(timeout=10) == [2, {"n": 3}]
        history = await late.history()
    assert kinds(history) == [
        ("subscribe", "news"),
        ("receive", "news"),
        ("message", "news"),
        ("receive", "news"),
        ("message", "news"),
    ]
    assert history[0].payload == {"mode": "broadcast"}


async def test_every_subscriber_gets_a_burst_in_publication_order(make_app: MakeApp) -> None:
    """Messages published while the subscribers are busy are kept and come in order, with the
    publishing instance as sender."""
    gate = asyncio.Event()
    app = make_app()

    @app.activity
    async def busy(ctx: geste.ActivityContext) -> None:
        await gate.wait()

    @app.workflow
    async def reader(ctx: geste.WorkflowContext) -> list[Any]:
        await ctx.subscribe("ticks")
        await busy(ctx)
        out = []
        for _ in range(20):
            message = await ctx.receive("ticks")
            out.append([message.data, message.sender_instance_id, message.direct])
        return out

    @app.workflow
    async def ticker(ctx: geste.WorkflowContext) -> list[str]:
        return [await ctx.publish("ticks", i) for i in range(20)]

    async with app:
        readers = [await reader.start() for _ in range(3)]
        await wait_until(lambda: _all_subscribed(app, readers), "the readers to subscribe")
        source = await ticker.start_with_id("ticker")
        ids = await source.result(timeout=10)
        gate.set()
        results = [await r.result(timeout=10) for r in readers]
        histories = [await r.history() for r in readers]
    assert len(set(ids)) == 20
    for result in results:
        assert result == [[i, "ticker", False] for i in range(20)]
    for history in histories:
        assert [e.payload["message_id"] for e in history if e.kind == geste.StepKind.MESSAGE] == ids


async def _all_subscribed(app: geste.App, handles: list[geste.WorkflowHandle[Any]]) -> bool:
    for handle in handles:
        if not any(e.kind == geste.StepKind.SUBSCRIBE for e in await handle.history()):
            return False
    return True


# -- competing ---------------------------------------------------------------------------------------


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_competing_each_message_is_taken_exactly_once(make_app: MakeApp, db_url: str) -> None:
    consumers, jobs = 4, 60
    app = make_app()

    @app.workflow
    async def consumer(ctx: geste.WorkflowContext) -> list[int]:
        await ctx.subscribe("jobs", mode="competing")
        got = []
        while True:
            message = await ctx.receive("jobs")
            if message.data == "stop":
                return got
            got.append(message.data)

    @app.workflow
    async def auditor(ctx: geste.WorkflowContext) -> int:
        await ctx.subscribe("jobs")  # a broadcast subscriber of the same channel sees them all
        seen = 0
        while seen < jobs + consumers:
            await ctx.receive("jobs")
            seen += 1
        return seen

    @app.workflow
    async def producer(ctx: geste.WorkflowContext, first: int, last: int) -> None:
        for job in range(first, last):
            await ctx.publish("jobs", job)

    async with app:
        handles = [await consumer.start() for _ in range(consumers)]
        audit = await auditor.start()
        for handle in [*handles, audit]:
            await wait_status(app, handle.instance_id, geste.Status.WAITING)
        # half from outside, concurrently; half from two workflows
        half = jobs // 2
        outside = asyncio.gather(*(app.publish("jobs", job) for job in range(half)))
        inside = [await producer.start(half, half + half // 2), await producer.start(half + half // 2, jobs)]
        await outside
        for handle in inside:
            await handle.result(timeout=20)
        for _ in range(consumers):
            await app.publish("jobs", "stop")
        results = [await handle.result(timeout=20) for handle in handles]
        assert await audit.result(timeout=20) == jobs + consumers
    taken = [job for result in results for job in result]
    assert sorted(taken) == list(range(jobs))  # each exactly once overall
    rows = await sql(db_url, "SELECT count(*), count(claimed_by) FROM geste_channel_messages")
    assert rows == [(jobs + consumers, jobs + consumers)]


async def test_a_competing_message_left_by_a_cancelled_receiver_goes_to_another(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish wakes one competing receiver (the one idle the longest). If it does not take the
    message (cancelled meanwhile), the maintenance sweep wakes the others."""
    monkeypatch.setattr(chores, "REWAKE_INTERVAL", 0.2)

    def define(app: geste.App) -> geste.Workflow[[], Any]:
        @app.workflow
        async def taker(ctx: geste.WorkflowContext) -> Any:
            await ctx.subscribe("work", mode="competing")
            return (await ctx.receive("work")).data

        return taker

    first = make_app()
    taker = define(first)
    async with first:
        one = await taker.start_with_id("one")
        await wait_status(first, "one", geste.Status.WAITING)
        two = await taker.start_with_id("two")
        await wait_status(first, "two", geste.Status.WAITING)
    client = make_app(run_worker=False)
    define(client)
    async with client:
        await client.publish("work", "job")  # wakes "one" only
        assert (await client.storage.get_instance("two")).run_at is None  # type: ignore[union-attr]
        assert (await client.storage.get_instance("one")).run_at is not None  # type: ignore[union-attr]
        await client.cancel("one")
    second = make_app()
    define(second)
    async with second:
        with pytest.raises(WorkflowCancelled):
            await second.get_handle(one.instance_id).result(timeout=10)
        assert await second.get_handle(two.instance_id).result(timeout=10) == "job"


# -- direct ------------------------------------------------------------------------------------------


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_send_to_reaches_its_target_only_even_before_it_subscribed(make_app: MakeApp) -> None:
    gate = asyncio.Event()
    app = make_app()

    @app.activity
    async def busy(ctx: geste.ActivityContext) -> None:
        await gate.wait()

    @app.workflow
    async def inbox(ctx: geste.WorkflowContext, slow: bool) -> Any:
        if slow:
            await busy(ctx)  # not subscribed yet when the message is sent
        try:
            message = await ctx.receive("inbox", timeout=1.0)
        except ReceiveTimeout:
            return None
        return [message.data, message.direct, message.sender_instance_id]

    @app.workflow
    async def sender(ctx: geste.WorkflowContext, target: str) -> str:
        return await ctx.send_to(target, "inbox", {"hello": target})

    async with app:
        target = await inbox.start_with_id("target", True)
        other = await inbox.start_with_id("other", False)
        await wait_status(app, "other", geste.Status.WAITING)
        await sender.start_with_id("sender", "target")
        await wait_until(lambda: _finished(app, "sender"), "the sender to finish")
        gate.set()
        assert await target.result(timeout=10) == [{"hello": "target"}, True, "sender"]
        assert await other.result(timeout=10) is None
        first = await app.send_to("other", "inbox", "late")  # from outside, after it finished: kept
        assert isinstance(first, str)
        history = await target.history()
    assert kinds(history)[-3:] == [("subscribe", "inbox"), ("receive", "inbox"), ("message", "inbox")]
    assert history[-3].payload == {"mode": "broadcast", "implicit": True}


async def _finished(app: geste.App, instance_id: str) -> bool:
    return (await app.get_instance(instance_id)).status.is_finished


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_direct_and_broadcast_messages_come_in_publication_order(make_app: MakeApp) -> None:
    gate = asyncio.Event()
    app = make_app()

    @app.activity
    async def busy(ctx: geste.ActivityContext) -> None:
        await gate.wait()

    @app.workflow
    async def mixed(ctx: geste.WorkflowContext) -> list[Any]:
        await ctx.subscribe("mix")
        await busy(ctx)
        return [(await ctx.receive("mix")).data for _ in range(4)]

    async with app:
        handle = await mixed.start_with_id("mixed")
        await wait_until(lambda: _all_subscribed(app, [handle]), "the subscription")
        await app.publish("mix", "b1")
        await app.send_to("mixed", "mix", "d1")
        await app.publish("mix", "b2")
        await app.send_to("mixed", "mix", "d2")
        gate.set()
        assert await handle.result(timeout=10) == ["b1", "d1", "b2", "d2"]


# -- durability --------------------------------------------------------------------------------------


async def test_a_message_published_before_the_receiver_waits_is_delivered_once(make_app: MakeApp) -> None:
    entered, opened = asyncio.Event(), asyncio.Event()
    app = make_app()

    @app.activity
    async def gate(ctx: geste.ActivityContext) -> None:
        entered.set()
        await opened.wait()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> Any:
        await ctx.subscribe("orders")
        await gate(ctx)
        message = await ctx.receive("orders")
        await ctx.sleep(0.05)  # a replay after this must not take it again
        return message.data

    async with app:
        handle = await flow.start()
        await asyncio.wait_for(entered.wait(), 10)
        await app.publish("orders", "paid")
        assert await handle.status() == geste.Status.RUNNING
        opened.set()
        assert await handle.result(timeout=10) == "paid"
        history = await handle.history()
    assert received(history) == ["paid"]


@pytest.fixture
def worker_procs(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


async def spawn_worker(
    procs: list[subprocess.Popen[bytes]],
    folder: Path,
    url: str,
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    index = len(procs)
    ready = folder / f"ready-{index}"
    output = folder / f"worker-{index}.out"
    proc = start_process(
        ["tests.apps.channels_app", url, f"--ready={ready}", *args], output=output, env=env or {}
    )
    procs.append(proc)
    await wait_ready(proc, ready, output=output, what="the worker process", timeout=20)
    return proc


async def test_a_message_published_while_the_receivers_worker_is_killed(
    db_url: str, tmp_path: Path, worker_procs: list[subprocess.Popen[bytes]]
) -> None:
    """The worker running the receiver is killed (SIGKILL) in the middle of its run; a message
    published meanwhile is taken, once, by the worker that takes the instance over; the message it
    had taken before the kill is not taken again."""
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = await spawn_worker(
        worker_procs,
        tmp_path,
        db_url,
        "--lock-timeout=1.0",
        env={"GESTE_TEST_HOLD": "1", "GESTE_TEST_MARKERS": str(markers)},
    )
    client = build_app(db_url, run_worker=False)
    async with client:
        handle = await client.start_workflow("receiver", "crash", 2, instance_id="victim")
        await wait_status(client, "victim", geste.Status.WAITING, timeout=20)
        await client.publish("crash", "before the kill")
        await wait_until(lambda: (markers / "hold-victim-0").exists(), "the held activity", timeout=20)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        await client.publish("crash", "while it is dead")
    worker = build_app(db_url, poll_interval=0.05, lock_timeout=1.0)
    async with worker:  # takes the instance over once the dead worker's lease expired
        result = await worker.get_handle(handle.instance_id).result(timeout=20)
        history = await worker.history(handle.instance_id)
    assert result == {"data": ["before the kill", "while it is dead"], "pids": [os.getpid(), os.getpid()]}
    assert received(history) == ["before the kill", "while it is dead"]


# -- replay ------------------------------------------------------------------------------------------


async def test_a_replay_does_not_publish_again(make_app: MakeApp, db_url: str) -> None:
    app = make_app()

    @app.workflow
    async def chatty(ctx: geste.WorkflowContext) -> list[str]:
        first = await ctx.publish("chat", "a")
        await ctx.sleep(0.05)  # suspended: what follows runs in a replay of the above
        second = await ctx.publish("chat", "b")
        await ctx.sleep(0.05)
        return [first, second]

    @app.workflow
    async def audience(ctx: geste.WorkflowContext) -> list[Any]:
        await ctx.subscribe("chat")
        out = []
        while True:
            try:
                message = await ctx.receive("chat", timeout=0.5)
            except ReceiveTimeout:
                return out
            out.append([message.message_id, message.data])

    async with app:
        listener = await audience.start()
        await wait_status(app, listener.instance_id, geste.Status.WAITING)
        talker = await chatty.start()
        first, second = await talker.result(timeout=10)
        assert await listener.result(timeout=10) == [[first, "a"], [second, "b"]]
        history = await talker.history()
    assert await count(db_url, "geste_channel_messages") == 2
    assert [e.payload["message_id"] for e in history if e.kind == geste.StepKind.PUBLISH] == [first, second]


# -- timeouts ----------------------------------------------------------------------------------------


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_a_receive_timeout_is_catchable_and_fires_without_polling(make_app: MakeApp) -> None:
    app = make_app(poll_interval=30.0)  # only the instance's run_at (a local timer) can wake it in time

    @app.workflow
    async def patient(ctx: geste.WorkflowContext) -> list[Any]:
        try:
            await ctx.receive("quiet", timeout=timedelta(milliseconds=300))
        except ReceiveTimeout:
            outcome = "timed out"
        message = await ctx.receive("quiet", timeout=10)  # the cursor did not move: next one comes
        return [outcome, message.data]

    @app.workflow
    async def impatient(ctx: geste.WorkflowContext) -> None:
        await ctx.receive("silence", timeout=0.1)

    async with app:
        started = time.monotonic()
        handle = await patient.start()
        await wait_until(lambda: _timed_out(handle), "the timeout", timeout=FAST_BOUND)
        assert time.monotonic() - started < FAST_BOUND
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        await app.publish("quiet", "now")
        assert await handle.result(timeout=10) == ["timed out", "now"]
        history = await handle.history()
        with pytest.raises(WorkflowFailed) as failed:
            await (await impatient.start()).result(timeout=FAST_BOUND)
    assert failed.value.error["type"] == "geste.errors.ReceiveTimeout"
    assert kinds(history) == [
        ("subscribe", "quiet"),
        ("receive", "quiet"),
        ("receive_timeout", "quiet"),
        ("receive", "quiet"),
        ("message", "quiet"),
    ]


async def _timed_out(handle: geste.WorkflowHandle[Any]) -> bool:
    return any(e.kind == geste.StepKind.RECEIVE_TIMEOUT for e in await handle.history())


# -- wake-ups across processes (PostgreSQL) ----------------------------------------------------------


class RawListener:
    """A plain LISTEN on geste_channel_message, with a marker channel to know all was delivered."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.received: list[dict[str, Any]] = []
        self._marker_channel = f"geste_test_sync_{uuid.uuid4().hex[:12]}"
        self._markers: set[str] = set()

    async def __aenter__(self) -> RawListener:
        dsn, _ = parse_postgres_url(self.url)
        self.conn = await asyncpg.connect(dsn)
        await self.conn.add_listener(CHANNEL_MESSAGE, self._on)
        await self.conn.add_listener(self._marker_channel, self._on)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    def _on(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        if channel == self._marker_channel:
            self._markers.add(payload)
        else:
            self.received.append(json.loads(payload))

    async def sync(self) -> None:
        """Return once every notification committed before this call has been received."""
        marker = uuid.uuid4().hex
        await self.conn.execute("SELECT pg_notify($1, $2)", self._marker_channel, marker)
        await wait_until(lambda: marker in self._markers, "the marker notification")

    def about(self, channel: str) -> list[dict[str, Any]]:
        return [body for body in self.received if body["channel_name"] == channel]


@pytest.fixture
async def pg_client(pg_url: str) -> AsyncIterator[geste.App]:
    async with build_app(pg_url, run_worker=False) as client:
        yield client


async def test_a_notification_wakes_a_receiver_in_another_process(
    pg_url: str, pg_client: geste.App, tmp_path: Path, worker_procs: list[subprocess.Popen[bytes]]
) -> None:
    """The worker process polls every 5 minutes: only geste_channel_message can wake it in time."""
    channel, elsewhere = f"xproc-{uuid.uuid4().hex}", f"elsewhere-{uuid.uuid4().hex}"
    slow = [f"--poll-interval={SLOW}", f"--lock-timeout={SLOW}", f"--fallback-interval={SLOW}"]
    proc = await spawn_worker(worker_procs, tmp_path, pg_url, *slow)
    async with RawListener(pg_url) as raw:
        handle = await pg_client.start_workflow("receiver", channel, 2)
        await wait_status(pg_client, handle.instance_id, geste.Status.WAITING, timeout=FAST_BOUND)

        await pg_client.publish(elsewhere, "nobody waits")  # no receiver: no notification
        sent = time.monotonic()
        first = await pg_client.publish(channel, "broadcast")
        await wait_until(lambda: _received_count(pg_client, handle, 1), "the first message", FAST_BOUND)
        await wait_status(pg_client, handle.instance_id, geste.Status.WAITING, timeout=FAST_BOUND)
        second = await pg_client.send_to(handle.instance_id, channel, "direct")
        result = await handle.result(timeout=FAST_BOUND)
        assert time.monotonic() - sent < 2 * FAST_BOUND
        await raw.sync()
    assert result == {"data": ["broadcast", "direct"], "pids": [proc.pid, proc.pid]}
    # one per woken instance (schema 13), routed to the worker that suspended it
    (ran_it,) = {row[0] for row in await sql(pg_url, "SELECT last_worker FROM geste_instances")}
    routing = {
        "instance_id": handle.instance_id,
        "workflow_name": "receiver",
        "worker": ran_it,
        "schema": parse_postgres_url(pg_url)[1]["schema"],
    }
    assert raw.about(channel) == [
        {"channel_name": channel, "message_id": first, "target_instance_id": None, **routing},
        {"channel_name": channel, "message_id": second, "target_instance_id": handle.instance_id, **routing},
    ]
    assert raw.about(elsewhere) == []


async def _received_count(app: geste.App, handle: geste.WorkflowHandle[Any], n: int) -> bool:
    return len(received(await app.history(handle.instance_id))) >= n


async def test_no_notification_without_notify(pg_url: str) -> None:
    async with (
        build_app(pg_url, run_worker=False, listen_notify=False) as client,
        build_app(pg_url, listen_notify=False, poll_interval=0.05) as worker,
        RawListener(pg_url) as raw,
    ):
        channel = f"quiet-{uuid.uuid4().hex}"
        handle = await client.start_workflow("receiver", channel, 1)
        await wait_status(client, handle.instance_id, geste.Status.WAITING)
        await client.publish(channel, "polled")
        assert (await worker.get_handle(handle.instance_id).result(timeout=FAST_BOUND))["data"] == ["polled"]
        await raw.sync()
    assert raw.about(channel) == []


def test_the_listener_turns_a_channel_message_into_a_batch_of_message_size() -> None:
    """geste_channel_message pokes the claim loop, which then claims up to max_messages_per_batch."""

    class Storage:
        limits: list[int] = []

        async def claim(
            self,
            worker_id: str,
            now: float,
            expires: float,
            limit: int,
            *,
            due_before: float | None = None,
            workflows: Sequence[str] = (),
            known: object = None,
        ) -> Claims:
            self.limits.append(limit)
            return Claims()

        async def next_run_at(self) -> None:
            return None

    async def run() -> list[int]:
        wakeups = Wakeups(poll_interval=1.0, fallback_interval=1.0, clock=time.time)
        listener = Listener(
            PostgresStorage("postgresql://unused").listen,
            wakeups=wakeups,
            reconnect_delay=1.0,
            on_caught_up=wakeups.poke,
        )
        storage = Storage()
        worker = Worker(
            runner=SimpleNamespace(  # type: ignore[arg-type]
                workflows={"w": None}, cached=lambda ids=None: {}, claim_keys=lambda: ["w"]
            ),
            storage=storage,  # type: ignore[arg-type]
            worker_id="w",
            clock=time.time,
            concurrency=50,
            wakeups=wakeups,
            lock_timeout=10.0,
            shutdown_grace=1.0,
            max_workflows_per_batch=40,
            max_messages_per_batch=7,
        )
        await worker._claim_round()
        listener._on_notification(CHANNEL_MESSAGE, '{"channel_name": "c", "message_id": "m"}')
        assert wakeups.event.is_set()
        await worker._claim_round()
        await worker._claim_round()
        assert listener.counts[CHANNEL_MESSAGE] == 1
        return storage.limits

    assert asyncio.run(run()) == [40, 7, 40]


# -- retention ---------------------------------------------------------------------------------------


async def test_cleanup_keeps_what_a_subscriber_needs_and_deletes_the_rest(
    make_app: MakeApp, db_url: str
) -> None:
    clock = MovableClock()
    app = make_app(clock=clock, message_retention=timedelta(hours=1), event_retention=timedelta(hours=2))

    @app.workflow
    async def reader(ctx: geste.WorkflowContext) -> list[Any]:
        await ctx.subscribe("log")
        return [(await ctx.receive("log")).data for _ in range(2)]

    @app.workflow
    async def idler(ctx: geste.WorkflowContext) -> None:
        await ctx.subscribe("log")  # subscribed, never receives: the messages are kept for it
        await ctx.wait_event("never")

    @app.workflow
    async def eventful(ctx: geste.WorkflowContext) -> Any:
        return (await ctx.wait_event("ping")).data

    async with app:
        assert app.runtime.maintenance is not None
        cleanup = app.runtime.maintenance.cleanup
        done = await reader.start()
        stuck = await idler.start()
        listens = await eventful.start()
        for handle in (done, stuck, listens):
            await wait_status(app, handle.instance_id, geste.Status.WAITING)
        await app.publish("log", 1)
        await app.publish("log", 2)
        await app.publish("nobody", "listens")
        await app.send_event("ping", "pong")
        assert await done.result(timeout=10) == [1, 2]
        assert await listens.result(timeout=10) == "pong"
        await app.send_to(done.instance_id, "log", "too late")  # its target finished: never taken

        await cleanup()  # nothing is old yet; the finished reader's subscription goes at once
        assert await count(db_url, "geste_channel_messages") == 4
        assert await count(db_url, "geste_channel_subscriptions") == 1
        assert (await count(db_url, "geste_events"), await count(db_url, "geste_event_deliveries")) == (1, 1)

        clock.advance(3601)  # past the message retention: the idler still needs 1 and 2
        await cleanup()
        rows = await sql(db_url, "SELECT data FROM geste_channel_messages ORDER BY seq")
        assert rows == [("1",), ("2",)]
        assert await count(db_url, "geste_events") == 1

        clock.advance(3600)  # past the event retention
        await app.cancel(stuck.instance_id)
        with pytest.raises(WorkflowCancelled):
            await stuck.result(timeout=10)
        assert await cleanup() == 5  # its subscription, the two messages, the event and its delivery
        for table in ("channel_messages", "channel_subscriptions", "events", "event_deliveries"):
            assert await count(db_url, f"geste_{table}") == 0, table


async def test_the_maintenance_runs_by_itself(
    make_app: MakeApp, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chores, "REWAKE_INTERVAL", 0.05)
    monkeypatch.setattr(chores, "CLEANUP_INTERVAL", 0.05)
    app = make_app(message_retention=0, event_retention=timedelta(0))
    async with app:
        await app.publish("void", "gone soon")
        await app.send_event("unheard")

        async def cleaned() -> bool:
            return await count(db_url, "geste_channel_messages") + await count(db_url, "geste_events") == 0

        await wait_until(cleaned, "the maintenance to delete the message and the event")


# -- names and bad input -----------------------------------------------------------------------------

ODD_NAMES = [
    'it\'s "quoted"',
    "'; DROP TABLE geste_channel_messages; --",
    "ünï©ødé ✓ 🚀 通道",
    "x" * 194,  # + "/reply": 200, the longest name
    " ",
    "a:b/c?d=e&f#g",
    "%_\\ LIKE 'x%'",
    "$1 {schema}",
]


async def test_odd_channel_names_are_stored_verbatim(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def echo(ctx: geste.WorkflowContext, channel: str) -> list[Any]:
        await ctx.subscribe(channel, mode="competing")
        message = await ctx.receive(channel)
        await ctx.publish(channel + "/reply", message.data)
        return [message.channel, message.data]

    @app.workflow
    async def caller(ctx: geste.WorkflowContext, channel: str) -> Any:
        await ctx.subscribe(channel + "/reply")
        return (await ctx.receive(channel + "/reply")).data

    async with app:
        pairs = []
        for index, name in enumerate(ODD_NAMES):
            pairs.append((name, await echo.start(name), await caller.start(name)))
            await wait_status(app, pairs[-1][1].instance_id, geste.Status.WAITING)
            await wait_status(app, pairs[-1][2].instance_id, geste.Status.WAITING)
            await app.publish(name, {"index": index, "name": name})
        for index, (name, echoing, calling) in enumerate(pairs):
            assert await echoing.result(timeout=10) == [name, {"index": index, "name": name}]
            assert await calling.result(timeout=10) == {"index": index, "name": name}
            assert [e.name for e in await echoing.history()][:2] == [name, name]
        long = await caller.start("y" * 194)  # 200 characters is the limit, inclusive
        await wait_status(app, long.instance_id, geste.Status.WAITING)
        await app.publish("y" * 194 + "/reply", "long")
        assert await long.result(timeout=10) == "long"


BAD_CHANNELS = ["", "x" * 201, "a\x00b", "lone \ud800 surrogate", 42, None, b"bytes"]


async def test_bad_input_is_refused_with_typed_errors(make_app: MakeApp) -> None:
    app = make_app(max_payload_bytes=100)

    @app.workflow
    async def bad(ctx: geste.WorkflowContext, what: str) -> Any:
        if what == "mode":
            await ctx.subscribe("c", mode="fanout")
        elif what == "both modes":
            await ctx.subscribe("c")
            await ctx.subscribe("c")  # the same mode again: nothing
            await ctx.subscribe("c", mode="competing")
        elif what == "channel":
            await ctx.receive("")
        elif what == "publish channel":
            await ctx.publish("a\x00b", 1)
        elif what == "timeout":
            await ctx.receive("c", timeout=-1)
        elif what == "data":
            await ctx.publish("c", object())
        elif what == "size":
            await ctx.publish("c", "x" * 200)
        elif what == "target":
            await ctx.send_to("", "c", 1)
        return "not reached"

    with pytest.raises(AppNotOpenError):
        await app.publish("c", 1)
    async with app:
        for channel in BAD_CHANNELS:
            with pytest.raises(ConfigurationError):
                await app.publish(channel, 1)  # type: ignore[arg-type]
            with pytest.raises(ConfigurationError):
                await app.send_to("someone", channel, 1)  # type: ignore[arg-type]
        with pytest.raises(SerializationError):
            await app.publish("c", object())
        with pytest.raises(PayloadTooLargeError):
            await app.publish("c", "x" * 200)
        with pytest.raises(InstanceNotFoundError):
            await app.send_to("no such instance", "c", 1)
        for instance_id in ("", "x" * 201, 7):
            with pytest.raises(ConfigurationError):
                await app.send_to(instance_id, "c", 1)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            await app.publish("c", 1, message_id="")
        expected = {
            "mode": "ConfigurationError",
            "both modes": "ConfigurationError",
            "channel": "ConfigurationError",
            "publish channel": "ConfigurationError",
            "timeout": "ConfigurationError",
            "data": "SerializationError",
            "size": "PayloadTooLargeError",
            "target": "ConfigurationError",
        }
        for what, error in expected.items():
            with pytest.raises(WorkflowFailed) as failed:
                await (await bad.start(what)).result(timeout=10)
            assert failed.value.error["type"] == f"geste.errors.{error}", what
    for options in (
        {"message_retention": -1},
        {"message_retention": "7d"},
        {"event_retention": float("nan")},
    ):
        with pytest.raises(ConfigurationError):
            make_app(**options)


async def test_send_to_an_unknown_instance_is_recorded_and_raised_again_on_replay(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def lonely(ctx: geste.WorkflowContext) -> list[str]:
        outcomes = []
        for _ in range(2):
            try:
                await ctx.send_to("nobody", "c", 1)
            except InstanceNotFoundError as exc:
                outcomes.append(exc.instance_id)
            await ctx.sleep(0.05)  # the next round replays the first
        return outcomes

    async with app:
        handle = await lonely.start()
        assert await handle.result(timeout=10) == ["nobody", "nobody"]
        history = await handle.history()
    sends = [e for e in history if e.kind == geste.StepKind.SEND_TO]
    assert [(e.is_error, e.payload) for e in sends] == [
        (True, {"message_id": None, "target_instance_id": "nobody"})
    ] * 2


async def test_a_message_id_published_twice_is_stored_once(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def two(ctx: geste.WorkflowContext) -> list[Any]:
        await ctx.subscribe("dup")
        return [(await ctx.receive("dup")).data for _ in range(2)]

    async with app:
        handle = await two.start()
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        assert await app.publish("dup", "once", message_id="m-1") == "m-1"
        assert await app.publish("dup", "twice?", message_id="m-1") == "m-1"
        await app.publish("dup", "next")
        assert await handle.result(timeout=10) == ["once", "next"]


# -- the command line --------------------------------------------------------------------------------


async def test_geste_publish_from_the_command_line(make_app: MakeApp, db_url: str) -> None:
    app = make_app()

    @app.workflow
    async def listener(ctx: geste.WorkflowContext) -> list[Any]:
        await ctx.subscribe("cli")
        return [(await ctx.receive("cli")).data for _ in range(2)]

    runner = CliRunner()

    def geste_cli(*args: str) -> Any:
        return runner.invoke(geste_main, [*args, "--database-url", db_url])

    async with app:
        handle = await listener.start_with_id("listener")
        await wait_status(app, "listener", geste.Status.WAITING)
        done = await asyncio.to_thread(geste_cli, "publish", "cli", '{"n": 1}')
        assert done.exit_code == 0, done.output
        assert done.output.startswith("published message ") and done.output.rstrip().endswith(" on cli")
        done = await asyncio.to_thread(geste_cli, "publish", "cli", "--to", "listener", "--id", "m-7")
        assert (done.exit_code, done.output) == (0, "published message m-7 on cli to listener\n")
        assert await handle.result(timeout=10) == [{"n": 1}, None]
        history = await handle.history()
        shown = await asyncio.to_thread(geste_cli, "show", "listener")
    assert [e.payload["message_id"] for e in history if e.kind == geste.StepKind.MESSAGE][1] == "m-7"
    assert "received null (direct)" in shown.output
    for args, code, message in [
        (("publish", "cli", "{not json"), 2, "not valid JSON"),
        (("publish", "", "1"), 1, "channel name"),
        (("publish", "cli", "1", "--to", "nobody"), 1, "no workflow instance with id 'nobody'"),
    ]:
        done = await asyncio.to_thread(geste_cli, *args)
        assert done.exit_code == code, done.output
        assert message in done.output
