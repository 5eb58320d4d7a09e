"""Bad input is refused with a typed error, writing nothing; odd but valid input is stored verbatim."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import geste
import geste.engine.run
from geste.errors import (
    ConfigurationError,
    NotAGesteDatabaseError,
    PayloadTooLargeError,
    SchemaVersionError,
    SerializationError,
    StorageError,
    UnknownWorkflowError,
)
from geste.storage.sqlite import SCHEMA_VERSION

from .support import wait_until

MiB = 1024 * 1024


async def wait_for_status(app: geste.App, instance_id: str, *statuses: geste.Status) -> geste.InstanceInfo:
    for _ in range(1000):
        info = await app.get_instance(instance_id)
        if info.status in statuses:
            return info
        await asyncio.sleep(0.01)
    raise AssertionError(f"{instance_id} never reached {statuses}")


# -- workflows that do not exist here ----------------------------------------------------------------
async def test_unknown_workflow_name(make_app: Callable[..., geste.App]) -> None:
    app = make_app()

    @app.workflow
    async def known(ctx: geste.WorkflowContext) -> None: ...

    async with app:
        with pytest.raises(UnknownWorkflowError) as raised:
            await app.start_workflow("nope")
        assert raised.value.name == "nope"
        assert isinstance(raised.value, LookupError)
        assert await app.list_instances() == []


async def test_an_instance_of_a_workflow_this_worker_lacks_is_left_for_a_worker_that_has_it(
    make_app: Callable[..., geste.App],
) -> None:
    """A worker never claims an instance of a workflow it does not register (it used to claim it and
    put it back for 30 s): the instance waits, untouched, for a worker that can run it."""
    client = make_app(run_worker=False)
    knowing = make_app(worker_id="knowing")
    for app in (client, knowing):

        @app.workflow(name="report")
        async def report(ctx: geste.WorkflowContext, n: int) -> str:
            return f"report {n}"

    ignorant = make_app(worker_id="ignorant")

    @ignorant.workflow(name="something_else")
    async def something_else(ctx: geste.WorkflowContext) -> None: ...

    async with client:
        handle = await client.start_workflow("report", 5)
        before = await client.storage.get_instance(handle.instance_id)
        assert before is not None
        async with ignorant:
            worker = ignorant._worker
            assert worker is not None
            rounds = worker.claim_rounds
            for _ in range(3):  # three claim rounds after the start: none takes it
                worker.poke()
                await wait_until(lambda: worker.claim_rounds > rounds, "a claim round")  # noqa: B023
                rounds = worker.claim_rounds
            assert worker.claimed == 0
        after = await client.storage.get_instance(handle.instance_id)
        assert after == before  # not claimed, run_at not pushed back
        assert await handle.history() == []

        async with knowing:
            assert await handle.result(timeout=10) == "report 5"
        assert (await handle.info()).status == geste.Status.COMPLETED


# -- values that cannot be stored ------------------------------------------------------------------------
class Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [Opaque(), object(), math.nan, math.inf, {"nested": [1, {"deep": math.nan}]}, {"k": Opaque()}],
    ids=["object", "bare-object", "nan", "inf", "nested-nan", "nested-object"],
)
async def test_unserialisable_arguments_write_no_instance(
    make_app: Callable[..., geste.App], value: Any
) -> None:
    app = make_app()

    @app.workflow
    async def takes(ctx: geste.WorkflowContext, value: Any) -> None: ...

    async with app:
        with pytest.raises(SerializationError, match="input of workflow takes"):
            await takes.start(value)
        with pytest.raises(SerializationError):
            await app.start_workflow("takes", value=value, instance_id="given-id")
        with pytest.raises(SerializationError):
            await app.send_event("some.event", {"value": value})
        assert await app.list_instances() == []
        with pytest.raises(geste.errors.InstanceNotFoundError):
            await app.get_instance("given-id")


async def test_unserialisable_activity_arguments_fail_the_step_before_it_runs(
    make_app: Callable[..., geste.App],
) -> None:
    app = make_app()
    calls: list[Any] = []

    @app.activity
    async def record(ctx: geste.ActivityContext, value: Any) -> None:
        calls.append(value)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        try:
            await record(ctx, {1: object()})
        except SerializationError as exc:
            return f"refused: {type(exc).__name__}"
        return "stored"

    async with app:
        handle = await flow.start()
        assert await handle.result(timeout=10) == "refused: SerializationError"
        assert calls == []
        assert await handle.history() == []


# -- payloads over the limit ---------------------------------------------------------------------------
async def test_workflow_input_over_the_default_limit(make_app: Callable[..., geste.App]) -> None:
    app = make_app()
    assert app.max_payload_bytes == MiB

    @app.workflow
    async def sized(ctx: geste.WorkflowContext, blob: str) -> int:
        return len(blob)

    async with app:
        with pytest.raises(PayloadTooLargeError) as raised:
            await sized.start("x" * MiB)
        assert raised.value.limit == MiB and raised.value.size > MiB
        with pytest.raises(PayloadTooLargeError):  # counted in bytes, not characters
            await sized.start("é" * (MiB // 2 + 1))
        assert await app.list_instances() == []
        fits = MiB - 100  # the input's JSON adds a few bytes around the string
        assert await (await sized.start("x" * fits)).result(timeout=10) == fits


async def test_payloads_over_a_configured_limit(make_app: Callable[..., geste.App]) -> None:
    limit = 1000
    app = make_app(max_payload_bytes=limit)
    ran: list[str] = []

    @app.activity
    async def consume(ctx: geste.ActivityContext, blob: str) -> int:
        ran.append("consume")
        return len(blob)

    @app.activity
    async def produce(ctx: geste.ActivityContext, size: int) -> str:
        ran.append("produce")
        return "y" * size

    @app.workflow
    async def with_input(ctx: geste.WorkflowContext, blob: str) -> None: ...

    @app.workflow
    async def big_argument(ctx: geste.WorkflowContext) -> int:
        return await consume(ctx, "x" * (limit + 1))

    @app.workflow
    async def big_result(ctx: geste.WorkflowContext) -> str:
        try:
            await produce(ctx, limit + 1)
        except PayloadTooLargeError as exc:
            return f"refused {exc.size > exc.limit} {exc.limit}"
        return "stored"

    @app.workflow
    async def big_own_result(ctx: geste.WorkflowContext) -> str:
        return "z" * (limit + 1)

    async with app:
        with pytest.raises(PayloadTooLargeError):
            await with_input.start("x" * limit)
        assert await app.list_instances() == []

        # activity arguments: refused at the call, in the workflow; the activity never runs
        handle = await big_argument.start()
        with pytest.raises(geste.errors.WorkflowFailed) as failed:
            await handle.result(timeout=10)
        assert failed.value.error["type"] == "geste.errors.PayloadTooLargeError"
        assert isinstance(failed.value.__cause__, PayloadTooLargeError)
        assert ran == [] and await handle.history() == []

        # an activity result: the activity ran once (not retried: it would fail the same way) and its
        # step records the error, not the value
        handle = await big_result.start()
        assert await handle.result(timeout=10) == f"refused True {limit}"
        assert ran == ["produce"]
        (step,) = await handle.history()
        assert step.name == "produce" and step.is_error and step.payload["attempts"] == 1
        assert "y" * 100 not in str(step.payload)

        # the workflow's own result
        handle = await big_own_result.start()
        with pytest.raises(geste.errors.WorkflowFailed) as failed:
            await handle.result(timeout=10)
        assert failed.value.error["type"] == "geste.errors.PayloadTooLargeError"
        assert (await handle.info()).result is None


async def test_event_data_over_the_limit_is_not_stored(make_app: Callable[..., geste.App]) -> None:
    app = make_app(max_payload_bytes=1000)

    @app.workflow
    async def waiter(ctx: geste.WorkflowContext) -> Any:
        return (await ctx.wait_event("big.one")).data

    async with app:
        handle = await waiter.start()
        await wait_for_status(app, handle.instance_id, geste.Status.WAITING)
        with pytest.raises(PayloadTooLargeError):
            await app.send_event("big.one", {"blob": "x" * 1000}, event_id="e-1")
        with pytest.raises(PayloadTooLargeError):
            await app.send_event("big.one", {"small": True}, event_id="e-1", extensions={"x": "y" * 1000})
        assert (await handle.info()).status == geste.Status.WAITING
        # had either been stored, e-1 would be a duplicate now, or the oldest event for the waiter
        await app.send_event("big.one", {"small": True}, event_id="e-1")
        assert await handle.result(timeout=10) == {"small": True}


# -- files that are not geste databases --------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


async def _refuses(path: Path, error: type[Exception]) -> pytest.ExceptionInfo[Exception]:
    before = _snapshot(path.parent)
    app = geste.App(f"sqlite:///{path}")
    with pytest.raises(error) as raised:
        await app.open()
    assert _snapshot(path.parent) == before  # not a byte changed, no journal or WAL file left
    return raised


async def test_random_bytes_are_not_a_geste_database(tmp_path: Path) -> None:
    path = tmp_path / "noise.db"
    path.write_bytes(b"not SQLite" + os.urandom(8182))
    raised = await _refuses(path, NotAGesteDatabaseError)
    assert str(path) in str(raised.value)


async def test_someone_elses_sqlite_database_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()
    raised = await _refuses(path, NotAGesteDatabaseError)
    assert "users" in str(raised.value)


async def test_a_foreign_geste_meta_table_is_not_taken_for_geste(tmp_path: Path) -> None:
    path = tmp_path / "lookalike.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE geste_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO geste_meta VALUES ('application', 'something else')")
    conn.close()
    await _refuses(path, NotAGesteDatabaseError)


async def test_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "geste.db"
    async with geste.App(f"sqlite:///{path}", run_worker=False):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE geste_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    conn.close()
    for _ in range(2):
        with pytest.raises(SchemaVersionError) as raised:
            await geste.App(f"sqlite:///{path}").open()
        assert (raised.value.found, raised.value.supported) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM geste_meta WHERE key = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION + 1),
        )
    conn.close()


# -- database URLs ---------------------------------------------------------------------------------------
async def test_sqlite_url_in_a_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    app = geste.App(f"sqlite:///{missing}/geste.db")
    with pytest.raises(StorageError, match="does not exist"):
        await app.open()
    assert not (tmp_path / "no").exists()
    with pytest.raises(geste.errors.AppNotOpenError):
        await app.list_instances()


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root@localhost/shop",
        "redis://localhost:6379/0",
        "http://example.com/db",
        "geste.db",
        "sqlite:",
        "sqlite://",
        "sqlite:///",
        "sqlite:///shop.db?journal=off",
        "sqlite:///shop.db?synchronous=sometimes",
    ],
)
def test_unsupported_or_malformed_urls(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError):
        geste.App(url)
    monkeypatch.setenv("GESTE_DATABASE_URL", url)
    with pytest.raises(ConfigurationError):
        geste.App()
    assert list(tmp_path.iterdir()) == []


# -- odd but valid ids and names ----------------------------------------------------------------------
ODD_EVENT = '\'; DROP TABLE geste_events; -- "événement" 🎉'
ODD_IDS = [
    'it\'s "quoted"',
    "'; DROP TABLE geste_instances; --",
    "Robert'); DELETE FROM geste_history WHERE ('1'='1",
    "%_ LIKE wildcards * ? [a-z]",
    "back\\slash /slash",
    "line\nbreak\ttab\r",
    " padded ",
    "ünïcødé 日本語 Ελληνικά עברית",
    "x" * 200,
    "🎉" * 200,
]


@pytest.mark.parametrize("instance_id", ODD_IDS, ids=range(len(ODD_IDS)))
async def test_odd_ids_and_event_types_are_stored_verbatim(
    make_app: Callable[..., geste.App], instance_id: str
) -> None:
    app = make_app()

    @app.workflow
    async def echo(ctx: geste.WorkflowContext, tag: str) -> dict[str, Any]:
        event = await ctx.wait_event(ODD_EVENT, match={"tag": tag})
        return {"id": ctx.instance_id, "event_id": event.event_id, "type": event.type, "data": event.data}

    async with app:
        other = await echo.start("other")
        handle = await echo.start_with_id(instance_id, instance_id)
        assert handle.instance_id == instance_id and handle.created
        again = await app.start_workflow("echo", "ignored", instance_id=instance_id)
        assert not again.created
        await wait_for_status(app, instance_id, geste.Status.WAITING)
        await wait_for_status(app, other.instance_id, geste.Status.WAITING)  # its wait is registered
        await app.send_event(ODD_EVENT, {"tag": instance_id}, event_id=instance_id)
        assert await handle.result(timeout=10) == {
            "id": instance_id,
            "event_id": instance_id,
            "type": ODD_EVENT,
            "data": {"tag": instance_id},
        }
        info = await app.get_instance(instance_id)
        assert info.instance_id == instance_id and info.input == {"args": [instance_id], "kwargs": {}}
        assert [e.name for e in await handle.history()] == [ODD_EVENT, ODD_EVENT]
        listed = {i.instance_id for i in await app.list_instances()}
        assert listed == {instance_id, other.instance_id}
        assert (await other.info()).status == geste.Status.WAITING  # its tag did not match


@pytest.mark.parametrize("bad", ["", "x" * 201, "🎉" * 201, 42, None])
async def test_ids_over_200_characters_or_not_strings_are_refused(
    make_app: Callable[..., geste.App], bad: Any
) -> None:
    app = make_app()

    @app.workflow
    async def simple(ctx: geste.WorkflowContext) -> None: ...

    async with app:
        if bad is not None:  # None means "generate one"
            with pytest.raises(ConfigurationError):
                await simple.start_with_id(bad)
        with pytest.raises(ConfigurationError):
            await app.send_event(
                "x" * 201 if bad is None else "fine", event_id=bad if bad is not None else "e"
            )
        if isinstance(bad, str) and bad:
            with pytest.raises(ConfigurationError):
                await app.send_event(bad)  # as an event type
        assert await app.list_instances() == []


@pytest.mark.parametrize("bad", ["a\x00b", "lone \ud800 surrogate"], ids=["nul", "surrogate"])
async def test_ids_and_event_types_that_no_backend_can_store_are_refused(
    make_app: Callable[..., geste.App], bad: str
) -> None:
    app = make_app()

    @app.workflow
    async def simple(ctx: geste.WorkflowContext) -> None: ...

    async with app:
        with pytest.raises(ConfigurationError):
            await simple.start_with_id(bad)
        with pytest.raises(ConfigurationError):
            await app.send_event("fine", event_id=bad)
        with pytest.raises(ConfigurationError):
            await app.send_event(bad)
        assert await app.list_instances() == []
    with pytest.raises(ConfigurationError):
        make_app(worker_id=bad)


@pytest.mark.parametrize("bad", ["a\x00b", "lone \ud800 surrogate", ""], ids=["nul", "surrogate", "empty"])
async def test_waiting_for_an_event_type_no_backend_can_store_fails_at_the_call(
    make_app: Callable[..., geste.App], bad: str
) -> None:
    # Before the check, PostgreSQL refused the NUL at the commit of the wait, and the instance was
    # released and re-run at once, forever.
    app = make_app()

    @app.workflow
    async def waits(ctx: geste.WorkflowContext) -> str:
        try:
            await ctx.wait_event(bad)
        except TypeError as exc:
            return f"refused: {exc}"
        return "waited"

    async with app:
        result = await (await waits.start()).result(timeout=10)
    assert result.startswith("refused: event_type must be a non-empty string")


async def test_an_instance_that_keeps_failing_in_the_engine_backs_off_and_the_worker_goes_on(
    make_app: Callable[..., geste.App], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error in the engine (a bug, not the workflow's own error) releases the instance to
    be offered again after a delay that doubles each time: no hot loop, and the other instances run."""
    app = make_app(poll_interval=0.02)

    @app.workflow
    async def fine(ctx: geste.WorkflowContext) -> str:
        return "ok"

    delays: list[float] = []
    release = app.storage.release

    async def recording_release(leases: Any, now: float, *, run_at: float | None = None) -> None:
        delays.append((now if run_at is None else run_at) - now)
        await release(leases, now, run_at=run_at)

    run = geste.engine.run.Engine.run

    async def failing_run(self: geste.engine.run.Engine, claim: Any, history: Any = None) -> None:
        if claim.lease.instance_id == "broken":
            raise RuntimeError("a bug in the engine")
        await run(self, claim, history)

    monkeypatch.setattr(app.storage, "release", recording_release)
    monkeypatch.setattr(geste.engine.run.Engine, "run", failing_run)
    async with app:
        await app.start_workflow(fine, instance_id="broken")
        await wait_until(lambda: len(delays) >= 4, "four failed runs")
        assert await (await app.start_workflow(fine, instance_id="healthy")).result(timeout=10) == "ok"
    assert delays[:4] == pytest.approx([0.02, 0.04, 0.08, 0.16], abs=0.005)
