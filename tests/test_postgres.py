"""What only the PostgreSQL backend has: schemas, migrations under a lock, a server that goes away."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest

import geste
from geste.storage.postgres import SCHEMA_VERSION, PostgresStorage, parse_postgres_url

from .conftest import POSTGRES_URL, with_query
from .support import restart_postgres


def _schema(url: str) -> str:
    return parse_postgres_url(url)[1]["schema"]


async def _sql(query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        return rows
    finally:
        await conn.close()


async def test_ten_workers_starting_at_once_migrate_once(pg_url: str) -> None:
    storages = [PostgresStorage(pg_url) for _ in range(10)]
    await asyncio.gather(*(s.open() for s in storages))
    try:
        assert {await s.schema_version() for s in storages} == {SCHEMA_VERSION}
        rows = await _sql(f'SELECT key, value FROM "{_schema(pg_url)}".geste_meta ORDER BY key')
        assert [tuple(r) for r in rows] == [("application", "geste"), ("schema_version", str(SCHEMA_VERSION))]
    finally:
        await asyncio.gather(*(s.close() for s in storages))


async def test_reopening_does_not_migrate_again(pg_url: str) -> None:
    first = PostgresStorage(pg_url)
    await first.open()
    await first.close()
    schema = _schema(pg_url)
    await _sql(f'INSERT INTO "{schema}".geste_meta VALUES ($1, $2)', "marker", "kept")
    second = PostgresStorage(pg_url)
    await second.open()
    await second.close()
    rows = await _sql(f'SELECT value FROM "{schema}".geste_meta WHERE key = $1', "marker")
    assert [r[0] for r in rows] == ["kept"]


async def test_schemas_keep_apps_apart(pg_url: str) -> None:
    other = with_query(POSTGRES_URL, schema=f"{_schema(pg_url)}_b")
    a, b = geste.App(pg_url, run_worker=False), geste.App(other, run_worker=False)

    for app in (a, b):

        @app.workflow(name="noop")
        async def noop(ctx: geste.WorkflowContext) -> None:
            return None

    try:
        async with a, b:
            await a.start_workflow("noop", instance_id="only-in-a")
            assert [i.instance_id for i in await a.list_instances()] == ["only-in-a"]
            assert await b.list_instances() == []
    finally:
        await _sql(f'DROP SCHEMA IF EXISTS "{_schema(other)}" CASCADE')


async def test_tables_that_are_not_gestes_are_refused_and_left_alone(pg_url: str) -> None:
    schema = _schema(pg_url)
    await _sql(f'CREATE TABLE "{schema}".geste_instances (id int)')
    with pytest.raises(geste.errors.NotAGesteDatabaseError):
        async with geste.App(pg_url, run_worker=False):
            pass
    tables = await _sql("SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)
    assert [r[0] for r in tables] == ["geste_instances"]


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    async with geste.App(pg_url, run_worker=False):
        pass
    await _sql(f"UPDATE \"{_schema(pg_url)}\".geste_meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(geste.errors.SchemaVersionError) as refused:
        async with geste.App(pg_url, run_worker=False):
            pass
    assert refused.value.found == 999


async def test_an_unreachable_server_is_a_storage_error() -> None:
    app = geste.App("postgresql://postgres@127.0.0.1:1/test", run_worker=False)
    with pytest.raises(geste.errors.StorageError, match="cannot connect"):
        await app.open()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1/test?schema=bad-name",
        'postgresql://postgres@127.0.0.1/test?schema=x";drop',
        "postgresql://postgres@127.0.0.1/test?pool_max_size=0",
        "postgresql://postgres@127.0.0.1/test?pool_min_size=5&pool_max_size=2",
        "postgresql://postgres@127.0.0.1/test?application_name=",
        "postgresql://postgres@127.0.0.1/test?application_name=caf%C3%A9",
    ],
)
def test_bad_options_in_the_url_are_configuration_errors(url: str) -> None:
    with pytest.raises(geste.errors.ConfigurationError):
        geste.App(url)


async def test_the_application_name_names_the_pool_and_the_listener(pg_url: str) -> None:
    name = f"orders-{os.getpid()}"
    app = geste.App(with_query(pg_url, application_name=name), poll_interval=0.05)
    async with app:
        while app.listener_status().state != "listening":
            await asyncio.sleep(0.01)
        rows = await _sql(
            "SELECT DISTINCT application_name FROM pg_stat_activity WHERE application_name LIKE $1",
            f"{name}%",
        )
    assert sorted(r[0] for r in rows) == [name, f"{name}-listener"]


async def _terminate_geste_backends() -> int:
    rows = await _sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'geste' AND pid <> pg_backend_pid()"
    )
    return len(rows)


async def test_killed_connections_are_survived(pg_url: str) -> None:
    """Connections killed mid-run: operations fail cleanly, the pool reconnects, nothing is lost."""
    app = geste.App(pg_url, poll_interval=0.05, lock_timeout=1.0)
    gate = asyncio.Event()
    runs: list[str] = []

    @app.activity(retry=geste.RetryPolicy(max_attempts=1))
    async def hold(ctx: geste.ActivityContext, n: int) -> int:
        runs.append(ctx.idempotency_key)
        await gate.wait()
        return n * 2

    @app.workflow
    async def doubled(ctx: geste.WorkflowContext, n: int) -> int:
        first = await hold(ctx, n)
        return first + await hold(ctx, n)

    async with app:
        handles = [await doubled.start(n) for n in range(5)]
        while len(runs) < 5:
            await asyncio.sleep(0.01)
        assert await _terminate_geste_backends() >= 1
        gate.set()
        results = [await h.result(timeout=30) for h in handles]
        assert results == [n * 4 for n in range(5)]
        for handle in handles:
            names = [(e.seq, e.kind) for e in await handle.history()]
            assert names == [(1, "activity"), (2, "activity")]


async def test_a_server_restart_is_survived(pg_url: str) -> None:
    """PostgreSQL restarted while workflows run and wait: every instance still completes, once."""
    app = geste.App(pg_url, poll_interval=0.05, lock_timeout=1.0)
    counted: dict[str, int] = {}

    @app.activity
    async def count(ctx: geste.ActivityContext) -> None:
        counted[ctx.instance_id] = counted.get(ctx.instance_id, 0) + 1

    @app.workflow
    async def sleeper(ctx: geste.WorkflowContext) -> str:
        await ctx.sleep(0.5)
        await count(ctx)
        return "ok"

    async with app:
        handles = [await sleeper.start() for _ in range(10)]
        await restart_postgres(pg_url)
        assert [await h.result(timeout=60) for h in handles] == ["ok"] * 10
        for handle in handles:
            kinds = [e.kind for e in await handle.history()]
            assert kinds == ["sleep", "activity"]


def test_every_postgres_test_fails_without_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture raises (an error, not a skip) when PostgreSQL cannot be reached."""
    from . import conftest

    monkeypatch.setattr(conftest, "POSTGRES_URL", "postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(RuntimeError, match="does not answer"):
        conftest._admin("SELECT 1")


async def test_a_migration_and_those_waiting_for_it_outlast_the_command_timeout(pg_url: str) -> None:
    """An upgrade that builds indexes on a big table takes minutes: neither it nor the processes waiting
    for its lock are cut off by ``command_timeout`` (cut off, it would roll back and start over)."""
    slow = with_query(pg_url, command_timeout="0.3")
    holder = await asyncpg.connect(POSTGRES_URL)
    try:  # another process migrating: it holds the lock for longer than the command timeout
        await holder.execute(
            "SELECT pg_advisory_lock(hashtextextended($1, 0))", f"geste_migrate:{_schema(pg_url)}"
        )
        storage = PostgresStorage(slow)
        opening = asyncio.create_task(storage.open())
        await asyncio.sleep(1.0)  # three command timeouts: the open must still be waiting, not failed
        assert not opening.done()
        await holder.execute("SELECT pg_advisory_unlock_all()")
        await asyncio.wait_for(opening, 30)
        try:
            assert await storage.schema_version() == SCHEMA_VERSION
        finally:
            await storage.close()
    finally:
        await holder.close()
