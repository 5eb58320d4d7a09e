"""Starts, events and messages written in the caller's own transaction (``connection=``; issue 21).

The semantics under test (docs/transactions.md): on PostgreSQL, a start (``workflow.options(connection=
conn)``), an event (``app.send_event(..., connection=conn)``) and a message (``app.publish`` /
``app.send_to``) given an asyncpg connection inside a transaction are written in that transaction: nothing
of them is visible before it commits, everything is after, and a rollback leaves nothing. The
notification goes out with the commit: the Apps here poll every 300 s, so only a notification can wake
their worker, and the assertions read the wake-up causes from the metrics (never a timing). A connection
geste cannot use, and any connection on SQLite, raise ``TransactionUnusableError`` and write nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import geste
from geste.errors import (
    ConfigurationError,
    InstanceNotFoundError,
    StorageError,
    TransactionUnusableError,
    WorkflowFailed,
)
from geste.storage.postgres import parse_postgres_url

from .support import wait_status, wait_until

SLOW = 300.0
"""Poll, fallback and lease intervals: within a test, only a notification wakes the worker."""
RESULT_WAIT = 30.0
"""A bound on waiting for a result woken by a notification (far below SLOW; not a timing assertion)."""


def build(url: str, **options: Any) -> geste.App:
    options.setdefault("poll_interval", SLOW)
    options.setdefault("notify_fallback_interval", SLOW)
    app = geste.App(url, lock_timeout=SLOW, shutdown_grace=2.0, **options)
    app.queue("orders", concurrency=2)

    @app.workflow
    async def greet(ctx: geste.WorkflowContext, name: str) -> str:
        return f"hello {name}"

    @app.workflow
    async def paid(ctx: geste.WorkflowContext, order: str) -> Any:
        event = await ctx.wait_event("order.paid", match={"order": order})
        return event.data

    @app.workflow
    async def inbox(ctx: geste.WorkflowContext) -> Any:
        message = await ctx.receive("go")
        return message.data

    @app.workflow
    async def listener(ctx: geste.WorkflowContext) -> Any:
        await ctx.subscribe("news")
        message = await ctx.receive("news")
        return message.data

    @app.workflow
    async def parent(ctx: geste.WorkflowContext) -> Any:
        return await ctx.start_child(greet.options(connection=object()), "child")

    return app


def wf(app: geste.App, name: str) -> Any:
    return app.workflows[name]


async def user_connection(url: str) -> Any:
    """A connection of the user's to the App's database, with the default search_path: geste's schema is
    reached by its qualified names, not by the path."""
    dsn, _ = parse_postgres_url(url)
    return await asyncpg.connect(dsn)


@asynccontextmanager
async def opened(url: str, **options: Any) -> AsyncIterator[tuple[geste.App, Any]]:
    app = build(url, **options)
    conn = await user_connection(url)
    try:
        async with app:
            await settle(app, conn)
            await conn.execute("CREATE TEMP TABLE orders (id text PRIMARY KEY)")
            yield app, conn
    finally:
        await conn.close()


async def wakes(app: geste.App, cause: str) -> float:
    """How many runs a wake-up of ``cause`` started since the App settled (``settle``)."""
    snap = await app.metrics.snapshot()
    return snap.value("geste_wakeup_latency_seconds_count", cause=cause) - app.settled[cause]  # type: ignore[attr-defined]


async def settle(app: geste.App, conn: Any) -> None:
    """Wait until the worker is past its start: listening, and a start committed in a transaction run by
    the notification of its commit (the worker's first rounds, which poll, and its routing's first view of
    the live workers are behind it). The metrics' counts at that point are kept in ``app.settled``."""
    await wait_until(lambda: app.listener_status().state == "listening", "the listener")
    greet = wf(app, "greet")

    async def woken_by_a_notification() -> bool:
        before = (await app.metrics.snapshot()).value("geste_wakeup_latency_seconds_count", cause="notify")
        async with conn.transaction():
            handle = await greet.options(connection=conn).start("warm-up")
        await handle.result(timeout=RESULT_WAIT)
        after = (await app.metrics.snapshot()).value("geste_wakeup_latency_seconds_count", cause="notify")
        return after == before + 1

    await wait_until(woken_by_a_notification, "a start woken by its notification", timeout=60)
    snap = await app.metrics.snapshot()
    app.settled = {  # type: ignore[attr-defined]
        cause: snap.value("geste_wakeup_latency_seconds_count", cause=cause)
        for cause in ("start", "notify", "local", "timer", "poll", "backlog")
    }
    app.settled["claimed"] = snap.value("geste_claimed_instances_total")  # type: ignore[attr-defined]
    app.settled["instances"] = len(await app.list_instances(limit=1000))  # type: ignore[attr-defined]


class Rollback(Exception):
    pass


async def test_start_commits_with_the_business_data(pg_url: str) -> None:
    """The instance exists exactly when the order does; its run is woken by the commit's notification."""
    async with opened(pg_url) as (app, _):
        dsn, _ = parse_postgres_url(pg_url)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn, conn.transaction():  # a pool's connection (a proxy)
                await conn.execute("CREATE TEMP TABLE orders (id text)")
                await conn.execute("INSERT INTO orders VALUES ('A-1')")
                handle = await wf(app, "greet").options(connection=conn).start("A-1")
                assert handle.created
                with pytest.raises(InstanceNotFoundError):  # not there for anybody else yet
                    await app.get_instance(handle.instance_id)
                now = app.clock() + 60.0  # a claim of another worker, as late as it likes, takes nothing
                assert list(await app.storage.claim("probe", now, now + 1.0, 10, workflows=["greet"])) == []
                assert (await conn.fetchrow("SELECT count(*) AS n FROM orders"))["n"] == 1
            assert await handle.result(timeout=RESULT_WAIT) == "hello A-1"
        finally:
            await pool.close()
        assert await wakes(app, "notify") == 1  # the commit's notification, nothing else
        assert await wakes(app, "poll") == 0
        assert await wakes(app, "start") == 0  # never run at once: there was nothing to run before
        snap = await app.metrics.snapshot()
        assert snap.value("geste_workflows_started_total") == 0  # geste never sees the commit
        assert snap.value("geste_workflows_ended_total", workflow="greet", status="completed") == len(
            await app.list_instances()
        )


async def test_rolled_back_start_leaves_nothing(pg_url: str) -> None:
    async with opened(pg_url) as (app, conn):
        with pytest.raises(Rollback):
            async with conn.transaction():
                await conn.execute("INSERT INTO orders VALUES ('B-1')")
                gone = await wf(app, "greet").options(connection=conn).start_with_id("order-B-1", "B-1")
                assert gone.created
                raise Rollback
        with pytest.raises(InstanceNotFoundError):
            await app.get_instance("order-B-1")
        # a later committed start: its notification is the only one (notifications come in commit order,
        # so the rolled-back start's would have come first)
        async with conn.transaction():
            later = await wf(app, "greet").options(connection=conn).start("B-2")
        assert await later.result(timeout=RESULT_WAIT) == "hello B-2"
        snap = await app.metrics.snapshot()
        assert snap.value("geste_claimed_instances_total") - app.settled["claimed"] == 1  # type: ignore[attr-defined]
        assert await wakes(app, "notify") == 1
        assert len(await app.list_instances()) == app.settled["instances"] + 1  # type: ignore[attr-defined]
        # the id is free: a start now creates it
        again = await wf(app, "greet").start_with_id("order-B-1", "B-1")
        assert again.created


async def test_start_with_id_is_idempotent_in_the_transaction(pg_url: str) -> None:
    async with opened(pg_url) as (app, conn):
        greet = wf(app, "greet")
        async with conn.transaction():
            first = await greet.options(connection=conn).start_with_id("order-C-1", "C-1")
            second = await greet.options(connection=conn).start_with_id("order-C-1", "C-1")
            assert (first.created, second.created) == (True, False)
            assert second.instance_id == "order-C-1"
        assert await first.result(timeout=RESULT_WAIT) == "hello C-1"
        async with conn.transaction():  # a start of a committed id, in another transaction: found
            third = await greet.options(connection=conn).start_with_id("order-C-1", "C-1")
            assert not third.created
        assert not (await greet.start_with_id("order-C-1", "C-1")).created
        assert len(await app.list_instances()) == app.settled["instances"] + 1  # type: ignore[attr-defined]
        assert await wakes(app, "notify") == 1


async def test_start_onto_a_queue_in_the_transaction(pg_url: str) -> None:
    async with opened(pg_url) as (app, conn):
        greet = wf(app, "greet")
        async with conn.transaction():
            handle = await greet.options(queue="orders", connection=conn).start("Q-1")
            with pytest.raises(InstanceNotFoundError):
                await app.get_instance(handle.instance_id)
        assert await handle.result(timeout=RESULT_WAIT) == "hello Q-1"


async def test_event_in_the_transaction(pg_url: str) -> None:
    async with opened(pg_url) as (app, conn):
        handle = await wf(app, "paid").start("D-1")
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        with pytest.raises(Rollback):
            async with conn.transaction():
                await app.send_event(
                    "order.paid", {"order": "D-1", "try": 1}, event_id="pay-D-1", connection=conn
                )
                raise Rollback
        assert (await app.get_instance(handle.instance_id)).status == geste.Status.WAITING
        async with conn.transaction():
            await conn.execute("INSERT INTO orders VALUES ('D-1')")
            # the same id again: the rolled-back one was never stored
            sent = await app.client.send_event(
                "order.paid", {"order": "D-1", "try": 2}, event_id="pay-D-1", connection=conn
            )
            assert sent.stored
            info = await app.get_instance(handle.instance_id)
            assert info.status == geste.Status.WAITING  # as everybody else sees it before the commit
        assert await handle.result(timeout=RESULT_WAIT) == {"order": "D-1", "try": 2}
        assert await wakes(app, "notify") == 1
        assert await wakes(app, "poll") == 0


async def test_start_then_event_to_it_in_one_transaction(pg_url: str) -> None:
    """An event sent to an instance the same transaction started: the transaction sees its own start."""
    async with opened(pg_url) as (app, conn):
        async with conn.transaction():
            handle = await wf(app, "paid").options(connection=conn).start("E-1")
            await app.send_event(
                "order.paid", {"order": "E-1"}, instance_id=handle.instance_id, connection=conn
            )
        assert await handle.result(timeout=RESULT_WAIT) == {"order": "E-1"}


async def test_message_in_the_transaction(pg_url: str) -> None:
    async with opened(pg_url) as (app, conn):
        handle = await wf(app, "inbox").start()
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        with pytest.raises(Rollback):
            async with conn.transaction():
                await app.send_to(handle.instance_id, "go", "first", message_id="m-1", connection=conn)
                raise Rollback
        async with conn.transaction():
            await app.send_to(handle.instance_id, "go", "second", message_id="m-1", connection=conn)
            assert (await app.get_instance(handle.instance_id)).status == geste.Status.WAITING
        assert await handle.result(timeout=RESULT_WAIT) == "second"  # m-1 was free: the first rolled back
        assert await wakes(app, "notify") == 1
        assert await wakes(app, "poll") == 0


async def test_publish_in_the_transaction(pg_url: str) -> None:
    async with opened(pg_url) as (app, conn):
        handle = await wf(app, "listener").start()
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        with pytest.raises(Rollback):
            async with conn.transaction():
                await app.publish("news", "rolled back", connection=conn)
                raise Rollback
        async with conn.transaction():
            await app.publish("news", "committed", connection=conn)
        assert await handle.result(timeout=RESULT_WAIT) == "committed"
        assert await wakes(app, "notify") == 1


async def test_send_to_a_missing_instance_in_the_transaction(pg_url: str) -> None:
    async with opened(pg_url) as (app, conn):
        async with conn.transaction():
            with pytest.raises(InstanceNotFoundError):
                await app.send_to("nobody", "go", 1, connection=conn)
            with pytest.raises(InstanceNotFoundError):
                await app.send_event("x", 1, instance_id="nobody", connection=conn)
            await conn.execute("INSERT INTO orders VALUES ('F-1')")  # the transaction goes on
        assert (await conn.fetchrow("SELECT count(*) AS n FROM orders"))["n"] == 1


async def test_unusable_connections(pg_url: str) -> None:
    async with opened(pg_url) as (app, conn):
        greet = wf(app, "greet")
        for bad in (object(), "postgresql://", sqlite3.connect(":memory:")):
            with pytest.raises(TransactionUnusableError, match="asyncpg"):
                await greet.options(connection=bad).start("G")
            with pytest.raises(TransactionUnusableError):
                await app.send_event("x", connection=bad)
            with pytest.raises(TransactionUnusableError):
                await app.publish("news", connection=bad)
        # outside a transaction: refused, not committed statement by statement
        with pytest.raises(TransactionUnusableError, match="not inside a transaction"):
            await greet.options(connection=conn).start_with_id("G-1", "G")
        with pytest.raises(TransactionUnusableError, match="not inside a transaction"):
            await app.send_to("G-1", "go", connection=conn)
        with pytest.raises(InstanceNotFoundError):
            await app.get_instance("G-1")
        assert isinstance(TransactionUnusableError("x"), ConfigurationError)
        # closed, and a pool's connection released back to its pool
        closed = await user_connection(pg_url)
        await closed.close()
        with pytest.raises(TransactionUnusableError, match="closed"):
            await greet.options(connection=closed).start("G")
        dsn, _ = parse_postgres_url(pg_url)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        try:
            async with pool.acquire() as released:
                pass
            with pytest.raises(TransactionUnusableError):
                await greet.options(connection=released).start("G")
        finally:
            await pool.close()
        assert len(await app.list_instances()) == app.settled["instances"]  # type: ignore[attr-defined]
        # a child start cannot take one: the parent's step writes it
        child = await wf(app, "parent").start()
        with pytest.raises(WorkflowFailed):
            await child.result(timeout=RESULT_WAIT)


async def test_failed_statement_is_a_storage_error(pg_url: str) -> None:
    """A geste statement that fails in the caller's transaction (here: geste's table dropped inside a
    savepoint of the caller's) raises StorageError, which says the caller's transaction is aborted; once
    the caller rolled back to its savepoint, the publish goes through."""
    async with opened(pg_url) as (app, conn):
        schema = parse_postgres_url(pg_url)[1]["schema"]
        async with conn.transaction():
            sp = conn.transaction()
            await sp.start()  # a savepoint: the table is gone only inside it
            await conn.execute(f'DROP TABLE "{schema}".geste_channel_messages CASCADE')
            with pytest.raises(StorageError, match="roll it back"):
                await app.publish("news", "x", connection=conn)
            await sp.rollback()
            await app.publish("news", "y", connection=conn)


async def test_sqlite_offers_no_transaction(tmp_path: Path) -> None:
    """Not offered on SQLite: a typed error whatever the connection, sqlite3's own included."""
    path = tmp_path / "geste.db"
    app = build(f"sqlite:///{path}", poll_interval=0.05)
    async with app:
        mine = sqlite3.connect(path)
        try:
            mine.execute("BEGIN")
            for bad in (mine, object()):
                with pytest.raises(TransactionUnusableError, match="only PostgreSQL"):
                    await wf(app, "greet").options(connection=bad).start_with_id("S-1", "S")
                with pytest.raises(TransactionUnusableError, match="only PostgreSQL"):
                    await app.send_event("x", connection=bad)
                with pytest.raises(TransactionUnusableError, match="only PostgreSQL"):
                    await app.send_to("S-1", "go", connection=bad)
            mine.rollback()
        finally:
            mine.close()
        assert await app.list_instances() == []
        with pytest.raises(InstanceNotFoundError):
            await app.get_instance("S-1")


async def test_events_and_messages_need_read_committed(pg_url: str) -> None:
    """Under repeatable read the snapshot predates the lock: an event or a message is refused (nothing
    written, the transaction goes on); a start is not."""
    async with opened(pg_url) as (app, conn):
        async with conn.transaction(isolation="repeatable_read"):
            with pytest.raises(TransactionUnusableError, match="read committed"):
                await app.send_event("order.paid", {"order": "H-1"}, connection=conn)
            with pytest.raises(TransactionUnusableError, match="read committed"):
                await app.publish("news", "x", connection=conn)
            handle = await wf(app, "greet").options(connection=conn).start("H-1")
        assert await handle.result(timeout=RESULT_WAIT) == "hello H-1"
