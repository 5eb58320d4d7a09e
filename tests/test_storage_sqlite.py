"""The SQLite backend on real files: WAL and busy timeout, numbered migrations, race-free claims."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import geste
import geste.storage.sqlite as sqlite_backend
from geste.errors import StorageError
from geste.storage._migrations import Migration
from geste.storage._sql import load_migrations
from geste.storage.base import Commit, HistoryRow, Lease, LeaseLost, NewInstance
from geste.storage.sqlite import SQLiteStorage

INPUT = '{"args":[],"kwargs":{}}'


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "geste.db"


@pytest.fixture
async def storage(path: Path) -> AsyncIterator[SQLiteStorage]:
    store = SQLiteStorage(f"sqlite:///{path}")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def pragma(store: SQLiteStorage, name: str) -> Any:
    return await store._call(lambda conn: conn.execute(f"PRAGMA {name}").fetchone()[0])


async def create(store: SQLiteStorage, instance_id: str, now: float) -> None:
    _, created = await store.create_instance(
        NewInstance(instance_id, "wf", INPUT, now), lease=None, worker_id=None, lock_expires_at=None
    )
    assert created


# -- connection settings -------------------------------------------------------------------------------
async def test_wal_mode_busy_timeout_and_synchronous(path: Path, storage: SQLiteStorage) -> None:
    assert await pragma(storage, "journal_mode") == "wal"
    assert await pragma(storage, "busy_timeout") == 30_000
    assert await pragma(storage, "synchronous") == 1  # NORMAL
    with sqlite3.connect(path) as other:  # WAL is a property of the file, seen by every connection
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()

    tuned = SQLiteStorage(f"sqlite:///{path}?busy_timeout=1500&synchronous=full")
    await tuned.open()
    try:
        assert await pragma(tuned, "busy_timeout") == 1500
        assert await pragma(tuned, "synchronous") == 2  # FULL
    finally:
        await tuned.close()


async def test_a_write_waits_for_another_writer_instead_of_failing(
    path: Path, storage: SQLiteStorage
) -> None:
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process's write transaction holds the lock ...
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, blocker.execute, "COMMIT")  # ... for 0.3 s
        started = time.monotonic()
        await create(storage, "waited", time.time())
        assert time.monotonic() - started >= 0.25
        assert await storage.get_instance("waited") is not None
    finally:
        blocker.close()


async def test_a_writer_that_holds_the_lock_too_long_gives_a_storage_error(path: Path) -> None:
    impatient = SQLiteStorage(f"sqlite:///{path}?busy_timeout=100")
    await impatient.open()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError, match="locked"):
            await create(impatient, "refused", time.time())
        blocker.execute("ROLLBACK")
        assert await impatient.get_instance("refused") is None
        await create(impatient, "refused", time.time())  # the connection is usable again
    finally:
        blocker.close()
        await impatient.close()


# -- migrations ----------------------------------------------------------------------------------------------
def schema(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
        ).fetchall()
    conn.close()
    return rows


def meta(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        rows = dict(conn.execute("SELECT key, value FROM geste_meta").fetchall())
    conn.close()
    return rows


def test_migrations_are_numbered_from_one() -> None:
    versions = [number for number, _ in load_migrations("sqlite")]
    assert versions == list(range(1, len(versions) + 1))
    assert versions[-1] == sqlite_backend.SCHEMA_VERSION


async def test_reopening_does_not_run_migrations_again(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts_run: list[int] = []
    split = sqlite_backend._statements

    def counting(script: str) -> list[str]:
        scripts_run.append(1)
        return split(script)

    monkeypatch.setattr(sqlite_backend, "_statements", counting)
    app = geste.App(f"sqlite:///{path}", poll_interval=0.05)

    @app.workflow
    async def hello(ctx: geste.WorkflowContext) -> str:
        return "hello"

    async with app:
        assert await (await hello.start_with_id("kept")).result(timeout=10) == "hello"
    assert len(scripts_run) == len(sqlite_backend.MIGRATIONS)
    assert meta(path) == {"application": "geste", "schema_version": str(sqlite_backend.SCHEMA_VERSION)}
    before = schema(path)

    for _ in range(3):
        async with app:
            assert (await app.get_instance("kept")).result == "hello"
            assert await app.storage.schema_version() == sqlite_backend.SCHEMA_VERSION
    assert len(scripts_run) == len(sqlite_backend.MIGRATIONS)  # nothing ran again
    assert schema(path) == before


async def test_only_the_newer_migrations_run_on_an_older_database(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = SQLiteStorage(f"sqlite:///{path}")
    await first.open()
    await create(first, "old", 1.0)
    await first.close()

    newer = sqlite_backend.SCHEMA_VERSION + 1
    script = "CREATE TABLE geste_extra (x INTEGER NOT NULL);\nINSERT INTO geste_extra VALUES (7);\n"
    extra = Migration(newer, f"{newer:04}_extra", script)
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", [*sqlite_backend.MIGRATIONS, extra])
    monkeypatch.setattr(sqlite_backend, "SCHEMA_VERSION", newer)
    for _ in range(2):  # the second open finds it at the new version and does nothing
        upgraded = SQLiteStorage(f"sqlite:///{path}")
        await upgraded.open()
        assert await upgraded.schema_version() == newer
        assert await upgraded.get_instance("old") is not None
        assert await upgraded._call(lambda c: [r["x"] for r in c.execute("SELECT x FROM geste_extra")]) == [7]
        await upgraded.close()


OPEN_WHEN_TOLD = """
import asyncio, os, sys, time
from geste.storage.sqlite import SQLiteStorage

async def main(path, go):
    while not os.path.exists(go):
        time.sleep(0.005)
    store = SQLiteStorage("sqlite:///" + path)
    await store.open()
    print(await store.schema_version())
    await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_processes_opening_a_new_file_together_migrate_it_once(path: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_WHEN_TOLD, str(path), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        go.touch()
        outcomes = [proc.communicate(timeout=30) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [(p.returncode, out.strip()) for p, (out, _) in zip(procs, outcomes, strict=True)] == [
        (0, str(sqlite_backend.SCHEMA_VERSION))
    ] * 4, [err for _, err in outcomes]
    assert meta(path)["schema_version"] == str(sqlite_backend.SCHEMA_VERSION)


# -- claims ------------------------------------------------------------------------------------------------
async def test_the_claim_is_one_conditional_update_inside_begin_immediate(storage: SQLiteStorage) -> None:
    await create(storage, "a", 1.0)
    statements: list[str] = []
    assert storage._conn is not None
    storage._conn.set_trace_callback(statements.append)
    try:
        (claim,) = await storage.claim("w", 2.0, 10.0, 10, workflows=["wf"])
    finally:
        storage._conn.set_trace_callback(None)
    assert claim.lease.instance_id == "a"
    # a SELECT picks the runnable instances (with the expiry of any lease it takes over), one conditional
    # UPDATE takes the lease; the claimed instance's history is read in the same hop, and (it took less
    # than it asked for) when the next instance becomes runnable
    assert [s.split()[0] for s in statements] == ["BEGIN", "SELECT", "UPDATE", "SELECT", "SELECT", "COMMIT"]
    assert statements[0] == "BEGIN IMMEDIATE"
    assert "geste_history" in statements[3]
    assert "MIN(run_at)" in statements[4]


async def test_two_storages_racing_to_claim_never_both_get_one(path: Path, storage: SQLiteStorage) -> None:
    other = SQLiteStorage(f"sqlite:///{path}")
    await other.open()
    rng = random.Random(1234)
    owners: Counter[str] = Counter()
    claimed_by: dict[str, Lease] = {}
    free: set[str] = set()  # created and not claimed yet
    try:
        for rnd in range(150):
            now = 1000.0 + rnd  # leases below last far longer than the test's rounds
            count = rng.randint(1, 25)
            for i in range(count):
                await create(storage, f"r{rnd}-{i}", now)
                free.add(f"r{rnd}-{i}")
            limit_a, limit_b = rng.randint(1, count), rng.randint(1, count)
            got_a, got_b = await asyncio.gather(
                storage.claim("A", now, now + 10_000, limit_a, workflows=["wf"]),
                other.claim("B", now, now + 10_000, limit_b, workflows=["wf"]),
            )
            ids_a = {c.lease.instance_id for c in got_a}
            ids_b = {c.lease.instance_id for c in got_b}
            assert not ids_a & ids_b, f"round {rnd}: both claimed {ids_a & ids_b}"
            assert len(ids_a) == len(got_a) and len(ids_b) == len(got_b)
            assert ids_a | ids_b <= free  # never one already leased
            assert len(ids_a | ids_b) == min(len(free), limit_a + limit_b)
            free -= ids_a | ids_b
            owners.update(ids_a | ids_b)
            claimed_by.update({c.lease.instance_id: c.lease for c in (*got_a, *got_b)})
        assert set(owners.values()) == {1}
        # every lease is still held, by exactly the claim that took it
        kept = await storage.renew(list(claimed_by.values()), 1_000_000.0)
        assert kept == set(claimed_by)
    finally:
        await other.close()


async def test_only_an_expired_lease_is_taken_over_and_the_old_holder_cannot_write(
    path: Path, storage: SQLiteStorage
) -> None:
    other = SQLiteStorage(f"sqlite:///{path}")
    await other.open()
    try:
        await create(storage, "x", 1.0)
        (first,) = await storage.claim("A", 2.0, 12.0, 10, workflows=["wf"])
        assert await other.claim("B", 11.9, 21.9, 10, workflows=["wf"]) == []  # lease still live
        assert await storage.renew([first.lease], 15.0) == {"x"}
        assert await other.claim("B", 14.0, 24.0, 10, workflows=["wf"]) == []  # renewed: still live

        racers = await asyncio.gather(
            *(s.claim(w, 15.0, 25.0, 10, workflows=["wf"]) for s, w in ((storage, "A"), (other, "B")))
        )
        (second,) = [c for claims in racers for c in claims]  # expired: exactly one takes it over
        assert second.lease != first.lease

        row = HistoryRow(1, "activity", "late", '{"result":null}', False, 16.0)
        with pytest.raises(LeaseLost):
            await storage.record(Commit(first.lease, [row], 16.0, 26.0))
        with pytest.raises(LeaseLost):
            await storage.finish(Commit(first.lease, [], 16.0), status=geste.Status.COMPLETED, result="1")
        assert await storage.renew([first.lease], 30.0) == set()
        await storage.release([first.lease], 16.0)  # a stale release changes nothing
        info = await other.get_instance("x")
        assert info is not None and info.lock_expires_at == 25.0 and not info.status.is_finished
        assert await other.get_history("x") == []
        await other.record(Commit(second.lease, [row], 16.0, 26.0))
        assert [r.name for r in await storage.get_history("x")] == ["late"]
    finally:
        await other.close()
