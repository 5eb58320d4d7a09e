"""Published state: ``ctx.set_state`` in a workflow, ``get_state`` / ``wait_state`` from any process.

In-process tests run on both backends (``make_app``); the cross-process ones run a worker process of
``tests/apps/state_app.py`` that sets the values while this process reads them. On PostgreSQL a
``wait_state`` of another process is woken by the ``set_state``'s notification: the client polls every
``SLOW`` seconds and its read after registering is as far away, so a wait that returns in time was woken
by the notification, which the number of its reads shows too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import geste
import geste._client
from geste.errors import (
    ConfigurationError,
    InstanceNotFoundError,
    PayloadTooLargeError,
    SerializationError,
    StateEndedError,
    StateTimeout,
)
from tests.processes import WorkerProcesses, worker_processes
from tests.support import raw_query, wait_status, wait_until
from tests.test_result_wakeup import FAST_BOUND, SLOW, promptly

MakeApp = Callable[..., geste.App]


def build(app: geste.App) -> geste.App:
    @app.workflow
    async def publisher(ctx: geste.WorkflowContext, n: int) -> int:
        await ctx.set_state("status", "started")
        for i in range(1, n + 1):
            await ctx.wait_event("go", match={"id": ctx.instance_id})
            await ctx.set_state("progress", {"done": i})
        return n

    @app.workflow
    async def gathered(ctx: geste.WorkflowContext) -> None:
        await asyncio.gather(*(ctx.set_state("k", i) for i in range(5)))

    @app.workflow
    async def setter(ctx: geste.WorkflowContext, key: Any, value: Any) -> str:
        try:
            await ctx.set_state(key, value)
        except geste.errors.GesteError as exc:
            return type(exc).__name__
        return "set"

    @app.workflow
    async def looping(ctx: geste.WorkflowContext, n: int) -> int:
        await ctx.set_state("run", n)
        if n < 3:
            await ctx.continue_as_new(n + 1)
        return n

    return app


async def state_rows(url: str, instance_id: str, key: str) -> list[int]:
    rows = await raw_query(
        url,
        "SELECT version FROM geste_state WHERE instance_id = $1 AND key = $2 ORDER BY version",
        instance_id,
        key,
    )
    return [row["version"] for row in rows]


@pytest.fixture
async def app(make_app: MakeApp) -> AsyncIterator[geste.App]:
    async with build(make_app(workflow_cache_size=0)) as opened:  # every resume replays
        yield opened


# -- in one process, both backends ---------------------------------------------------------------------
async def test_values_are_versioned_kept_and_never_written_twice_by_a_replay(
    app: geste.App, db_url: str
) -> None:
    handle = await app.start_workflow("publisher", 2)
    first = await handle.wait_state("status")
    assert (first.key, first.value, first.version, first.run) == ("status", "started", 1, 1)
    assert await handle.get_state("progress") is None  # never set: None, not an error
    waiting = asyncio.create_task(handle.wait_state("progress", timeout=30))
    await wait_status(app, handle.instance_id, geste.Status.WAITING)
    await app.send_event("go", {"id": handle.instance_id})
    one = await waiting
    assert (one.value, one.version) == ({"done": 1}, 1)
    nxt = asyncio.create_task(handle.wait_state("progress", after=one.version, timeout=30))
    await app.send_event("go", {"id": handle.instance_id})
    two = await nxt
    assert (two.value, two.version) == ({"done": 2}, 2)
    assert await handle.result(timeout=30) == 2
    # two suspensions, each resume replaying the set_state steps before it: one row per value
    assert await state_rows(db_url, handle.instance_id, "status") == [1]
    assert await state_rows(db_url, handle.instance_id, "progress") == [1, 2]
    old = await handle.get_state("progress", version=1)  # the history of values is kept
    assert old is not None and old.value == {"done": 1}
    assert await handle.get_state("progress", version=3) is None
    latest = await app.get_state(handle.instance_id, "progress")  # the id-based call
    assert latest is not None and latest.version == 2
    assert [(s.key, s.version) for s in await app.list_state(handle.instance_id)] == [
        ("progress", 2),
        ("status", 1),
    ]
    kinds = [(e.kind, e.name) for e in await handle.history() if e.kind == "set_state"]
    assert kinds == [("set_state", "status"), ("set_state", "progress"), ("set_state", "progress")]
    with pytest.raises(StateEndedError) as ended:  # ended: no newer value will come
        await handle.wait_state("progress", after=2, timeout=30)
    assert ended.value.status == "completed"
    again = await handle.wait_state("progress", after=1)  # a value past `after` exists: at once
    assert again.version == 2


async def test_a_crash_right_after_the_commit_replays_without_writing_again(
    make_app: MakeApp, db_url: str
) -> None:
    """The value and the step's row committed, then the worker lost its run (a storage error after the
    commit: the run is abandoned, as by a crash): the next claim replays the step and writes nothing."""
    from geste.errors import StorageError

    app = build(make_app(lock_timeout=1.0))
    original = app.storage.state_set
    failed: list[int] = []

    async def committed_then_lost(*args: Any, **kwargs: Any) -> Any:
        outcome = await original(*args, **kwargs)
        if not failed:
            failed.append(outcome.version)
            raise StorageError("connection lost after the commit")
        return outcome

    app.storage.state_set = committed_then_lost  # type: ignore[method-assign]
    async with app:
        handle = await app.start_workflow("setter", "k", {"a": 1})
        assert await handle.result(timeout=30) == "set"
    assert failed == [1]
    assert await state_rows(db_url, handle.instance_id, "k") == [1]
    rows = await raw_query(
        db_url,
        "SELECT count(*) AS n FROM geste_history WHERE instance_id = $1 AND kind = 'set_state'",
        handle.instance_id,
    )
    assert rows[0]["n"] == 1


async def test_set_state_in_a_gather_numbers_each_value_once(app: geste.App, db_url: str) -> None:
    handle = await app.start_workflow("gathered")
    await handle.result(timeout=30)
    assert await state_rows(db_url, handle.instance_id, "k") == [1, 2, 3, 4, 5]


async def test_state_carries_over_continue_as_new(app: geste.App, db_url: str) -> None:
    handle = await app.start_workflow("looping", 1)
    assert await handle.result(timeout=30) == 3
    latest = await handle.get_state("run")
    assert latest is not None and (latest.value, latest.version, latest.run) == (3, 3, 3)


async def test_bad_input_is_a_typed_error(app: geste.App) -> None:
    handle = await app.start_workflow("setter", "k", {"a": 1})
    assert await handle.result(timeout=30) == "set"
    for key, value, error in (
        ("", 1, "ConfigurationError"),
        ("x" * 201, 1, "ConfigurationError"),
        (3, 1, "ConfigurationError"),
    ):
        bad = await app.start_workflow("setter", key, value)
        assert await bad.result(timeout=30) == error
    with pytest.raises(ConfigurationError):
        await handle.get_state("")
    with pytest.raises(ConfigurationError):
        await handle.get_state("k", version=0)
    with pytest.raises(ConfigurationError):
        await handle.wait_state("k", after=-1)
    with pytest.raises(ConfigurationError):
        await handle.wait_state("k", after=True)
    with pytest.raises(InstanceNotFoundError):
        await app.get_state("no-such-instance", "k")
    with pytest.raises(InstanceNotFoundError):
        await app.wait_state("no-such-instance", "k", timeout=1)
    with pytest.raises(InstanceNotFoundError):
        await app.list_state("no-such-instance")


async def test_values_that_are_not_json_or_too_large_are_refused_before_anything_is_written(
    make_app: MakeApp, db_url: str
) -> None:
    app = make_app(max_payload_bytes=100)

    @app.workflow
    async def bad(ctx: geste.WorkflowContext, which: str) -> str:
        try:
            await ctx.set_state("k", object() if which == "object" else "x" * 200)
        except (PayloadTooLargeError, SerializationError) as exc:
            return type(exc).__name__
        return "set"

    async with app:
        for which, error in (("object", "SerializationError"), ("large", "PayloadTooLargeError")):
            handle = await app.start_workflow(bad, which)
            assert await handle.result(timeout=30) == error
            assert await state_rows(db_url, handle.instance_id, "k") == []


async def test_a_wait_times_out(app: geste.App) -> None:
    handle = await app.start_workflow("publisher", 1)
    await handle.wait_state("status")
    with pytest.raises(StateTimeout):
        await handle.wait_state("progress", timeout=0.2)


# -- across processes ----------------------------------------------------------------------------------
workers = worker_processes("state_app")


async def test_a_worker_process_sets_and_this_process_reads_and_waits(
    workers: WorkerProcesses, db_url: str
) -> None:
    proc = await workers.spawn("w1")
    async with workers.client() as client:
        handle = await client.start_workflow("publisher", 2)
        status = await handle.wait_state("status", timeout=60)
        assert status.value == "started"
        waiting = asyncio.create_task(handle.wait_state("progress", timeout=60))
        await client.send_event("go", {"id": handle.instance_id})
        one = await waiting
        assert one.value == {"done": 1, "pid": proc.pid} and one.version == 1
        await client.send_event("go", {"id": handle.instance_id})
        assert await handle.result(timeout=60) == 2
        latest = await handle.get_state("progress")
        assert latest is not None and latest.value == {"done": 2, "pid": proc.pid}
        with pytest.raises(StateEndedError):
            await handle.wait_state("progress", after=2, timeout=60)


# -- PostgreSQL: woken by NOTIFY, not by polling -------------------------------------------------------
@pytest.fixture(name="pg_workers")
def _pg_workers(tmp_path: Any, pg_url: str) -> Any:
    with WorkerProcesses(tmp_path, pg_url, "state_app") as group:
        yield group


async def registered_for(url: str, instance_id: str, key: str, app: geste.App) -> bool:
    rows = await raw_query(
        url,
        "SELECT process FROM geste_result_waiters WHERE instance_id = $1 AND state_key = $2",
        instance_id,
        key,
    )
    listening = app.listener_status().state == "listening"
    return listening and [r["process"] for r in rows] == [app.worker_id]


def counting_reads(app: geste.App) -> list[str]:
    """Count the reads of state ``app`` makes (``Storage.get_state``)."""
    calls: list[str] = []
    storage = app.storage
    original = storage.get_state

    async def get_state(instance_id: str, key: str, **kwargs: Any) -> Any:
        calls.append(key)
        return await original(instance_id, key, **kwargs)

    storage.get_state = get_state  # type: ignore[method-assign]
    return calls


async def test_a_wait_in_another_process_is_woken_by_notify_not_by_polling(
    pg_workers: WorkerProcesses, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(geste._client, "SETTLE_READ", SLOW)
    await pg_workers.spawn("w1")
    async with pg_workers.client(poll_interval=SLOW, notify_fallback_interval=SLOW) as client:
        handle = await client.start_workflow("publisher", 1)
        await handle.wait_state("status", timeout=60)  # set already: read at once
        reads = counting_reads(client)
        waiting = asyncio.create_task(handle.wait_state("progress", timeout=3 * FAST_BOUND))
        await wait_until(
            lambda: registered_for(pg_url, handle.instance_id, "progress", client), "the wait to register"
        )
        assert reads == ["progress", "progress"]  # before and after registering; then no poll
        await client.send_event("go", {"id": handle.instance_id})
        value = await promptly(waiting)
        assert value.value["done"] == 1
        assert reads == ["progress"] * 3  # the notification's read, no other
        await wait_until(  # the call forgot its registration
            lambda: _none(
                raw_query(pg_url, "SELECT 1 FROM geste_result_waiters WHERE state_key IS NOT NULL")
            ),
            "the registration to go",
        )


async def _none(rows: Any) -> bool:
    return not await rows


async def test_set_state_notifies_nobody_when_nobody_waits(pg_url: str, make_app: MakeApp) -> None:
    """A value nobody waits for is written without a NOTIFY (no notify lock at commit)."""
    from tests.test_notify import RawListener

    async with build(geste.App(pg_url, poll_interval=0.05)) as app:
        async with RawListener(pg_url) as raw:
            handle = await app.start_workflow("setter", "k", 1)
            assert await handle.result(timeout=30) == "set"
            await raw.sync()
            assert [
                b for _, b in raw.about(handle.instance_id, "geste_workflow_resumable") if "state" in b
            ] == []


async def test_a_lost_notification_is_covered_by_the_poll(
    pg_workers: WorkerProcesses, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await pg_workers.spawn("w1")
    async with pg_workers.client(poll_interval=0.2) as client:
        monkeypatch.setattr(client.client, "on_state", lambda instance_id, key: None)  # every one lost
        handle = await client.start_workflow("publisher", 1)
        await handle.wait_state("status", timeout=60)
        waiting = asyncio.create_task(handle.wait_state("progress", timeout=60))
        await wait_until(
            lambda: registered_for(pg_url, handle.instance_id, "progress", client), "the wait to register"
        )
        await client.send_event("go", {"id": handle.instance_id})
        assert (await waiting).value["done"] == 1


# -- HTTP and the viewer --------------------------------------------------------------------------------
async def test_http_reads_and_waits_for_state(make_app: MakeApp) -> None:
    from tests.test_http import assert_error, serving

    app = build(make_app())
    async with serving(app) as http:
        handle = await app.start_workflow("publisher", 1, instance_id="p")
        await handle.wait_state("status", timeout=30)
        answer = await http.get("/instances/p/state/status")
        assert answer.status_code == 200
        body = answer.json()
        assert body.pop("set_at").endswith("+00:00")
        assert body == {"instance_id": "p", "key": "status", "value": "started", "version": 1, "run": 1}
        assert_error(await http.get("/instances/p/state/progress"), 404, "StateNotFound", "progress")
        answer = await http.get("/instances/p/state/progress", params={"wait": 0})  # not yet: ask again
        assert (answer.status_code, answer.json()) == (
            202,
            {"instance_id": "p", "key": "progress", "after": 0},
        )
        await wait_status(app, "p", geste.Status.WAITING)
        waiting = asyncio.create_task(
            http.get("/instances/p/state/progress", params={"after": 0, "wait": 20})
        )
        await app.send_event("go", {"id": "p"})
        answer = await waiting
        assert answer.status_code == 200 and answer.json()["value"] == {"done": 1}
        await handle.result(timeout=30)
        assert_error(
            await http.get("/instances/p/state/progress", params={"after": 1, "wait": 5}),
            409,
            "StateEndedError",
        )
        assert (await http.get("/instances/p/state/progress", params={"version": 1})).status_code == 200
        assert_error(
            await http.get("/instances/p/state/progress", params={"version": 2}), 404, "StateNotFound"
        )
        listed = (await http.get("/instances/p/state")).json()
        assert [(s["key"], s["version"]) for s in listed["state"]] == [("progress", 1), ("status", 1)]
        for params in (
            {"version": "0"},
            {"after": "-1"},
            {"after": "x"},
            {"version": "1", "wait": "1"},
            {"w": "1"},
        ):
            assert_error(await http.get("/instances/p/state/status", params=params), 400, "BadRequest")
        assert_error(await http.get("/instances/p/state/" + "k" * 201), 400, "ConfigurationError")
        assert_error(await http.get("/instances/nope/state/k"), 404, "InstanceNotFoundError")
        assert_error(await http.get("/instances/nope/state"), 404, "InstanceNotFoundError")


async def test_the_viewer_shows_an_instances_state(make_app: MakeApp) -> None:
    from tests.test_viewer import page, serving

    app = build(make_app())
    async with serving(app) as http:
        handle = await app.start_workflow("publisher", 1, instance_id="p")
        await handle.wait_state("status", timeout=30)
        text = await page(http, "/ui/instances/p")
        assert "State · 1 key" in text
        assert "<code>status</code>" in text and "started" in text
        bare = await app.start_workflow("setter", "", 1)  # refused: no state
        assert await bare.result(timeout=30) == "ConfigurationError"
        assert "State ·" not in await page(http, f"/ui/instances/{bare.instance_id}")


async def test_a_wait_elsewhere_is_woken_by_the_instances_end(
    pg_workers: WorkerProcesses, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No value comes: the end (a cancel) deletes the registration and notifies; the wait raises."""
    monkeypatch.setattr(geste._client, "SETTLE_READ", SLOW)
    await pg_workers.spawn("w1")
    async with pg_workers.client(poll_interval=SLOW, notify_fallback_interval=SLOW) as client:
        handle = await client.start_workflow("publisher", 1)
        await handle.wait_state("status", timeout=60)
        waiting = asyncio.create_task(handle.wait_state("progress", timeout=3 * FAST_BOUND))
        await wait_until(
            lambda: registered_for(pg_url, handle.instance_id, "progress", client), "the wait to register"
        )
        await client.cancel(handle.instance_id)
        with pytest.raises(StateEndedError) as ended:
            await promptly(waiting)
        assert ended.value.status == "cancelled"
        assert not await registered_for(pg_url, handle.instance_id, "progress", client)  # the end's delete
