"""Helpers shared by the tests: waits for a condition with a deadline (never a bare sleep), raw
queries, a server restart."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import pytest

import geste


def run_cli(args: list[str], **kwargs: Any) -> Any:
    """``geste ARGS`` in this process (click's ``CliRunner``): its ``Result``, exit code and output as
    the command left them; an exception other than the command's own exit fails the test with the
    output, so that a crash never passes for a refusal."""
    from click.testing import CliRunner

    from geste.cli import main

    result = CliRunner().invoke(main, args, **kwargs)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"geste {' '.join(args)} crashed:\n{result.output}") from result.exception
    return result


class MovableClock:
    """The real time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


async def wait_until(
    check: Callable[[], Any | Awaitable[Any]],
    what: str = "the condition",
    timeout: float = 15.0,
    interval: float = 0.01,
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy, and return that value.

    Fails with ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """``wait_until`` for synchronous tests: call ``condition`` until it returns something truthy, and
    return that value; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_status(app: geste.App, instance_id: str, status: geste.Status, timeout: float = 10.0) -> None:
    """Wait until the instance has ``status`` in the database."""

    async def reached() -> bool:
        return (await app.get_instance(instance_id)).status == status

    await wait_until(reached, f"{instance_id} to be {status}", timeout)


CANCELLED_TYPE = "geste.errors.ActivityCancelled"


def cancelled_outcome(entry: geste.HistoryEntry) -> dict[str, Any]:
    """The error of an activity step whose outcome is ``ActivityCancelled`` (asserted)."""
    assert entry.kind == geste.StepKind.ACTIVITY and entry.is_error, entry
    error: dict[str, Any] = entry.payload["error"]
    assert error["type"] == CANCELLED_TYPE, error
    return error


def count_storage_calls(monkeypatch: pytest.MonkeyPatch, names: Iterable[str]) -> Counter[str]:
    """Count, by name, the calls of the storage operations ``names`` (async methods, each one statement or
    more) on both backends' storages, for the rest of the test."""
    from geste.storage.postgres import PostgresStorage
    from geste.storage.sqlite import SQLiteStorage

    counts: Counter[str] = Counter()
    for name in names:
        for cls in (SQLiteStorage, PostgresStorage):
            original = getattr(cls, name)
            assert asyncio.iscoroutinefunction(original), (cls, name)

            def counting(original: Any = original, name: str = name) -> Callable[..., Any]:
                async def wrapper(*args: Any, **kwargs: Any) -> Any:
                    counts[name] += 1
                    return await original(*args, **kwargs)

                return wrapper

            monkeypatch.setattr(cls, name, counting())
    return counts


async def raw_query(url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    """Rows read straight from the database, past geste (``$n`` parameters on both backends)."""
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute(query.replace("$", "?"), args).fetchall()]
        conn.close()
        return rows
    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(url)
    if options["pooler"] == "transaction":  # PgBouncer: no startup parameter, no session state
        conn = await asyncpg.connect(dsn, statement_cache_size=0)
        try:
            async with conn.transaction():
                await conn.execute(f'SET LOCAL search_path = "{options["schema"]}"')
                return [dict(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()
    conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
    try:
        return [dict(r) for r in await conn.fetch(query, *args)]
    finally:
        await conn.close()


async def restart_postgres(url: str) -> None:
    """Restart the local PostgreSQL cluster that serves ``url`` (found by its port with ``pg_lsclusters``,
    as Debian's packages set it up; CI has ``main`` on 5432)."""
    port = urlsplit(url).port or 5432
    listing = await asyncio.create_subprocess_exec(
        "pg_lsclusters", "--no-header", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await listing.communicate()
    clusters = [line.split()[:3] for line in out.decode().splitlines() if line.strip()]
    found = [(version, name) for version, name, p in clusters if p == str(port)]
    if not found:
        raise AssertionError(f"no local PostgreSQL cluster on port {port} to restart: {clusters}")
    version, name = found[0]
    process = await asyncio.create_subprocess_exec(
        "pg_ctlcluster", "--skip-systemctl-redirect", version, name, "restart"
    )
    if await process.wait() != 0:
        raise AssertionError(f"pg_ctlcluster {version} {name} restart failed")


async def database_at_version(url: str, version: int, statements: Sequence[str] = ()) -> None:
    """Make the empty database of ``url`` what an older geste left: its migrations up to ``version``
    applied as they were, its meta rows, then ``statements`` (``{t}`` in each is the tables' prefix: the
    quoted schema and a dot on PostgreSQL, nothing on SQLite)."""
    from geste.storage._sql import load_migrations

    if url.startswith("sqlite"):
        scripts = [script for number, script in load_migrations("sqlite") if number <= version]
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            for script in scripts:
                conn.executescript(script)
            meta = [("application", "geste"), ("schema_version", str(version))]
            conn.executemany("INSERT INTO geste_meta VALUES (?, ?)", meta)
            for statement in statements:
                conn.execute(statement.format(t=""))
            conn.commit()
        finally:
            conn.close()
        return
    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(url)
    schema = f'"{options["schema"]}"'
    scripts = [script for number, script in load_migrations("postgres") if number <= version]
    pg = await asyncpg.connect(dsn)
    try:
        async with pg.transaction():
            for script in scripts:
                await pg.execute(script.replace("{schema}", schema))
            meta = f"('application', 'geste'), ('schema_version', '{version}')"
            await pg.execute(f"INSERT INTO {schema}.geste_meta VALUES {meta}")
            for statement in statements:
                await pg.execute(statement.format(t=schema + "."))
    finally:
        await pg.close()


# -- plans: what a query reads ----------------------------------------------------------------------
def sql_literal(value: Any) -> str:
    """A parameter of the test's own making as SQL text (``EXPLAIN EXECUTE`` takes no ``$n``)."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, list):
        return f"ARRAY[{', '.join(sql_literal(item) for item in value)}]::text[]"
    if isinstance(value, float):
        return f"'{value}'::double precision"
    return str(int(value))


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


def instances_read(nodes: list[dict[str, Any]]) -> int:
    """Rows the plan took from geste_instances, kept or filtered out, over all its loops (EXPLAIN gives
    per-loop averages)."""
    total = 0.0
    for node in nodes:
        if node.get("Relation Name") == "geste_instances" and node["Node Type"] != "ModifyTable":
            removed = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
            total += (node["Actual Rows"] + removed) * node["Actual Loops"]
    return round(total)


def vm_steps(conn: sqlite3.Connection, sql: str, params: dict[str, Any]) -> int:
    """Hundreds of SQLite VM instructions one query runs: a measure of the rows it reads."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 100)
    try:
        conn.execute(sql, params).fetchall()
    finally:
        conn.set_progress_handler(None, 100)
    return steps


CLAIM_INDEXES = ("geste_instances_runnable_by_name", "geste_instances_leased_by_name")


def instance_steps_searching(conn: sqlite3.Connection, sql: str, params: dict[str, Any]) -> list[str]:
    """The steps of SQLite's plan of ``sql`` that read ``geste_instances``, asserted to be searches of one
    of the claims' two indexes (never a scan): returned for the caller's further checks."""
    plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
    on_table = [step for step in plan if step.split()[1:2] in (["geste_instances"], ["i"])]
    assert on_table and all(
        step.startswith("SEARCH")
        and any(
            f"USING {how} {index}" in step for how in ("INDEX", "COVERING INDEX") for index in CLAIM_INDEXES
        )
        for step in on_table
    ), plan
    return on_table
