"""geste through PgBouncer in transaction mode (``pooler=transaction``), the listener straight to the server.

PgBouncer here is the tests' own (``tests/pgbouncer.py``, one per session); the behaviour tests of the
modules marked ``pgbouncer`` run through it too (``-m via_pgbouncer`` runs those variants alone).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import geste
from geste.errors import ConfigurationError, StorageError
from geste.storage.postgres import SCHEMA_VERSION, PostgresStorage, parse_postgres_url
from geste.testing import check_replay

from .support import raw_query, run_cli, wait_until

FAST: dict[str, Any] = {"poll_interval": 0.05, "lock_timeout": 2.0, "shutdown_grace": 2.0}


def build(url: str, **options: Any) -> geste.App:
    app = geste.App(url, **{**FAST, **options})

    @app.activity
    async def double(ctx: geste.ActivityContext, n: int) -> int:
        return 2 * n

    @app.workflow
    async def paid(ctx: geste.WorkflowContext, n: int) -> dict[str, Any]:
        first = await double(ctx, n)
        event = await ctx.wait_event("paid", match={"n": n}, timeout=60)
        await ctx.sleep(0.05)
        return {"double": first, "amount": event.data["amount"], "again": await double(ctx, first)}

    return app


async def test_workers_and_a_client_through_pgbouncer_wake_each_other_through_the_direct_listener(
    pg_url: str, pgbouncer_url: str
) -> None:
    async with (
        build(pgbouncer_url, listen_database_url=pg_url) as worker,
        build(pgbouncer_url, listen_database_url=pg_url, run_worker=False) as client,
    ):
        assert worker.notify.enabled and client.notify.enabled
        handles = [await client.workflows["paid"].start_with_id(f"p-{n}", n) for n in range(20)]

        async def all_waiting() -> bool:
            return all([await _waiting(h) for h in handles])

        await wait_until(all_waiting, "every instance to wait for its event")
        first = asyncio.create_task(handles[0].result(timeout=30))  # ends elsewhere: the client listens

        def client_listens() -> bool:
            return client.listener_status().state == geste.ListenerState.LISTENING

        await wait_until(client_listens, "the client's listener (for result waiters) to listen")
        for n in range(20):
            await client.send_event("paid", {"n": n, "amount": n + 100})
        results = [await first, *[await h.result(timeout=30) for h in handles[1:]]]
        heard = worker.listener_status().notifications
        told = client.listener_status().notifications
    assert results == [{"double": 2 * n, "amount": n + 100, "again": 4 * n} for n in range(20)]
    assert heard.get("geste_workflow_resumable", 0) >= 1, heard  # the events woke it: NOTIFY through it
    assert heard.get("geste_timer_expired", 0) >= 1, heard
    assert told.get("geste_workflow_resumable", 0) >= 1, told  # an end, for the result waiter


async def test_concurrent_starts_through_pgbouncer_migrate_once_and_leave_no_lock(
    pg_url: str, pgbouncer_url: str
) -> None:
    """The migration's advisory lock is its transaction's: a session lock and its unlock, behind a
    transaction pooler, run on two server sessions and the lock stays held by the first."""
    storages = [PostgresStorage(pgbouncer_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in storages))
    try:
        assert [await s.schema_version() for s in storages] == [SCHEMA_VERSION] * 4
    finally:
        await asyncio.gather(*(s.close() for s in storages))
    schema = parse_postgres_url(pg_url)[1]["schema"]
    held = await raw_query(
        pg_url,
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
        "AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)",
        f"geste_migrate:{schema}",
    )
    assert held == [{"n": 0}]
    versions = await raw_query(pg_url, "SELECT value FROM geste_meta WHERE key = 'schema_version'")
    assert versions == [{"value": str(SCHEMA_VERSION)}]


async def test_without_a_direct_listener_url_the_app_polls(pgbouncer_url: str) -> None:
    app = build(pgbouncer_url)
    assert not app.notify.enabled  # LISTEN through the pooler would hear nothing: polling only
    async with app:
        assert app.listener_status().state == geste.ListenerState.DISABLED
        handle = await app.workflows["paid"].start_with_id("p-1", 1)
        await wait_until(
            lambda: _waiting(handle), "the instance to wait for its event", timeout=15, interval=0.05
        )
        await app.send_event("paid", {"n": 1, "amount": 5})
        assert await handle.result(timeout=30) == {"double": 2, "amount": 5, "again": 4}


async def _waiting(handle: geste.WorkflowHandle[Any]) -> bool:
    return (await handle.info()).status == geste.Status.WAITING


async def test_listening_through_a_transaction_pooler_is_refused(pg_url: str, pgbouncer_url: str) -> None:
    with pytest.raises(ConfigurationError, match="direct listen_database_url"):
        geste.App(pgbouncer_url, listen_notify=True)
    with pytest.raises(ConfigurationError, match="listen_database_url"):
        geste.App(pg_url, listen_notify=True, listen_database_url=pgbouncer_url)
    assert not geste.App(pg_url, listen_database_url=pgbouncer_url).notify.enabled  # None: off, not refused
    with pytest.raises(ConfigurationError, match="pooler must be one of none, transaction"):
        geste.App(pg_url.replace("schema=", "pooler=session&schema="))


async def test_a_lost_prepared_statement_names_the_pooler_option(pg_url: str) -> None:
    """What asyncpg's statement cache meets behind a transaction pooler: the error says what to set."""
    storage = PostgresStorage(pg_url)
    await storage.open()
    try:
        with pytest.raises(StorageError, match="add pooler=transaction to the URL"):
            await storage._run(lambda conn: conn.execute("EXECUTE geste_prepared_elsewhere"))
    finally:
        await storage.close()


async def test_the_replay_check_and_the_cli_read_through_pgbouncer(pg_url: str, pgbouncer_url: str) -> None:
    async with build(pgbouncer_url, listen_database_url=pg_url) as app:
        handle = await app.workflows["paid"].start_with_id("p-7", 7)
        await wait_until(lambda: _waiting(handle), "p-7 to wait", timeout=15, interval=0.05)
        await app.send_event("paid", {"n": 7, "amount": 1})
        assert (await handle.result(timeout=30))["again"] == 28
    report = await check_replay(build(pgbouncer_url), database_url=pgbouncer_url)
    assert report.ok and len(report.results) == 1, [r.describe() for r in report.results]
    shown = await asyncio.to_thread(run_cli, ["show", "p-7", "--database-url", pgbouncer_url])
    assert shown.exit_code == 0, shown.output
    assert "completed" in shown.output
