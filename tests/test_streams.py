"""Durable streams (schema 26; docs/streams.md): ``ctx.write_stream`` / ``close_stream`` in workflows and
activities, ``handle.read_stream`` / ``stream_entries`` from any process, over HTTP as Server-Sent Events.

Each item is at one position, once: a workflow's replay rewrites its items under the same keys (nothing
written), a retried activity's writes that an earlier attempt made write nothing. Readers of another App
(another worker id: "another process" to the database) are notified on PostgreSQL, after the commit and
only while they wait; a lost notification is covered by the reader's poll. One test reads from another OS
process, killed mid-stream, and resumes from its last position in a new one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import geste
from geste._streams import Streams
from geste.errors import ConfigurationError, InstanceNotFoundError, StreamClosedError, WorkflowFailed
from geste.storage.base import StreamWrite

from .support import wait_until

ROOT = Path(__file__).resolve().parents[1]
MakeApp = Callable[..., geste.App]


def streams_of(app: geste.App) -> Streams:
    streams = app.client.streams
    assert streams is not None
    return streams


async def read_all(handle: geste.WorkflowHandle[Any], key: str, start: int = 0) -> list[Any]:
    return [item async for item in handle.read_stream(key, start)]


def register(app: geste.App) -> dict[str, Any]:
    """The workflows these tests run."""
    attempts: dict[str, int] = {}

    @app.activity(retry=geste.RetryPolicy(max_attempts=3, initial_interval=0.01))
    async def flaky_tokens(ctx: geste.ActivityContext) -> int:
        attempts[ctx.idempotency_key] = ctx.attempt
        for i in range(3 if ctx.attempt == 1 else 5):
            await ctx.write_stream("tokens", f"attempt{ctx.attempt}-{i}")
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt fails after three writes")
        return ctx.attempt

    @app.workflow
    async def agent(ctx: geste.WorkflowContext, n: int) -> str:
        for i in range(n):
            await ctx.write_stream("tokens", i)
        await flaky_tokens(ctx)
        await ctx.close_stream("tokens")
        return "done"

    @app.workflow
    async def replaying(ctx: geste.WorkflowContext) -> int:
        for i in range(3):
            await ctx.write_stream("s", i)
        await ctx.sleep(0.01)  # suspends: the resume replays the writes above (no workflow cache)
        await ctx.write_stream("s", 3)
        return 4

    @app.workflow
    async def halves(ctx: geste.WorkflowContext) -> None:
        for i in range(10):
            await ctx.write_stream("s", i)
        await ctx.receive("go")
        for i in range(10, 20):
            await ctx.write_stream("s", i)
        await ctx.close_stream("s")

    @app.workflow
    async def unclosed(ctx: geste.WorkflowContext) -> None:
        await ctx.write_stream("s", "only")
        await ctx.receive("go")  # its end closes the stream for its readers

    @app.workflow
    async def closes_twice(ctx: geste.WorkflowContext) -> None:
        await ctx.write_stream("s", 1)
        await ctx.close_stream("s")
        await ctx.close_stream("s")
        await ctx.write_stream("s", 2)

    return {
        "agent": agent,
        "replaying": replaying,
        "halves": halves,
        "unclosed": unclosed,
        "closes_twice": closes_twice,
        "attempts": attempts,
    }


async def test_a_workflow_and_its_activity_write_a_stream_read_in_order(make_app: MakeApp) -> None:
    """A retried activity's first three writes, made by its failed attempt, write nothing again: each
    position holds one item, the retry's later writes follow."""
    app = make_app()
    w = register(app)
    async with app:
        handle = await w["agent"].start(3)
        items = await read_all(handle, "tokens")
        assert await handle.result(timeout=10) == "done"
        assert items == [
            0,
            1,
            2,
            "attempt1-0",
            "attempt1-1",
            "attempt1-2",
            "attempt2-3",
            "attempt2-4",
        ]
        entries = [(e.position, e.item) async for e in handle.stream_entries("tokens", start=5)]
        assert entries == [(5, "attempt1-2"), (6, "attempt2-3"), (7, "attempt2-4")]
        assert [(h.key, h.length, h.closed) for h in await app.client.stream_list(handle.instance_id)] == [
            ("tokens", 9, True)  # eight items and the close
        ]


async def test_a_replay_writes_nothing_again(make_app: MakeApp) -> None:
    app = make_app(workflow_cache_size=0)
    w = register(app)
    async with app:
        handle = await w["replaying"].start()
        assert await handle.result(timeout=10) == 4
        assert [(e.position, e.item) async for e in handle.stream_entries("s")] == [
            (0, 0),
            (1, 1),
            (2, 2),
            (3, 3),
        ]
        history = await handle.history()
        assert not any("stream" in entry.kind for entry in history)  # not steps: nothing in the history


async def test_a_rewrite_of_the_same_writer_is_a_no_op_in_the_storage(make_app: MakeApp) -> None:
    """What a replay (or a second process running the same run) does, below the engine: one statement
    with the same writer twice, and again later, stores the item once."""
    app = make_app()
    async with app:
        storage = app.storage
        write = StreamWrite("i1", "k", "1:0", '"a"')
        await storage.stream_write([write, StreamWrite("i1", "k", "1:1", '"b"')], 1.0)
        await storage.stream_write([write, StreamWrite("i1", "k", "1:2", '"c"')], 2.0)
        await storage.stream_write([StreamWrite("i1", "k", "close", None)], 3.0)
        await storage.stream_write([StreamWrite("i1", "k", "1:3", '"after the close"')], 4.0)
        assert await storage.stream_read("i1", "k", 0, 10) == [(0, '"a"'), (1, '"b"'), (2, '"c"'), (3, None)]
        assert await storage.stream_read("i1", "k", 2, 1) == [(2, '"c"')]


async def test_the_end_of_the_instance_ends_its_readers_loops(make_app: MakeApp) -> None:
    app = make_app()
    w = register(app)
    async with app:
        handle = await w["unclosed"].start()
        read = asyncio.create_task(read_all(handle, "s"))
        await wait_until(
            lambda: app.storage.stream_read(handle.instance_id, "s", 0, 1), "the item is written"
        )
        await app.send_to(handle.instance_id, "go")
        assert await asyncio.wait_for(read, 10) == ["only"]
        assert await read_all(handle, "never written") == []  # ended: an unwritten stream is empty


async def test_a_closed_stream_refuses_writes(make_app: MakeApp) -> None:
    app = make_app()
    w = register(app)
    async with app:
        handle = await w["closes_twice"].start()
        with pytest.raises(WorkflowFailed) as failed:
            await handle.result(timeout=10)
        assert isinstance(failed.value.__cause__, StreamClosedError)
        assert await read_all(handle, "s") == [1]


async def test_bad_keys_and_positions_are_refused(make_app: MakeApp) -> None:
    app = make_app()
    w = register(app)
    async with app:
        handle = await w["agent"].start(1)
        for key in ("", "x" * 201, "a\x00b", 3):
            with pytest.raises(ConfigurationError):
                await read_all(handle, key)  # type: ignore[arg-type]
        for start in (-1, 1.5, True):
            with pytest.raises(ConfigurationError):
                await read_all(handle, "tokens", start)  # type: ignore[arg-type]
        with pytest.raises(InstanceNotFoundError):
            await read_all(app.get_handle("no-such-instance"), "tokens")
        await handle.result(timeout=10)


async def test_a_reader_of_another_app_gets_the_items_written_while_it_waits(make_app: MakeApp) -> None:
    """On PostgreSQL the waiting reader registers, and the writer's batches notify it after their
    commits; on SQLite it polls. Writes with no reader waiting notify nobody."""
    writer = make_app()
    w = register(writer)
    reader_app = make_app(run_worker=False, notify_fallback_interval=30.0, poll_interval=0.05)
    async with writer, reader_app:
        handle = await w["halves"].start()
        await wait_until(
            lambda: writer.storage.stream_read(handle.instance_id, "s", 9, 1), "the first half is written"
        )
        assert streams_of(writer).notifications == 0  # nobody waited
        got: list[int] = []
        first_half = asyncio.Event()

        async def read() -> None:
            async for item in reader_app.get_handle(handle.instance_id).read_stream("s"):
                got.append(item)
                if len(got) == 10:
                    first_half.set()

        reading = asyncio.create_task(read())
        await asyncio.wait_for(first_half.wait(), 10)
        postgres = writer.url.startswith("postgresql")
        if postgres:  # registered: the second half is notified, not found by a 30 s poll
            await wait_until(lambda: _readers(writer), "the reader registered")
        await writer.send_to(handle.instance_id, "go")
        await asyncio.wait_for(reading, 10)
        assert got == list(range(20))
        if postgres:
            assert streams_of(writer).notifications >= 1

            async def forgotten() -> bool:
                return await _readers(writer) == 0

            await wait_until(forgotten, "the reader forgot its registration")


async def _readers(app: geste.App) -> int:
    from .support import raw_query

    rows = await raw_query(app.url, "SELECT count(*) AS n FROM geste_stream_readers")
    return int(rows[0]["n"])


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_lost_notification_is_covered_by_the_readers_poll(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = make_app()
    w = register(writer)
    reader_app = make_app(run_worker=False, notify_fallback_interval=0.2)
    lost: list[Any] = []

    async def drop(payloads: Any) -> None:
        lost.append(payloads)

    async with writer, reader_app:
        monkeypatch.setattr(writer.storage, "stream_notify", drop)
        handle = await w["halves"].start()
        got: list[int] = []

        async def read() -> None:
            async for item in reader_app.get_handle(handle.instance_id).read_stream("s"):
                got.append(item)

        reading = asyncio.create_task(read())
        await wait_until(lambda: len(got) == 10, "the first half is read")
        await wait_until(lambda: _readers(writer), "the reader registered")
        await writer.send_to(handle.instance_id, "go")
        await asyncio.wait_for(reading, 10)
        assert got == list(range(20))
        assert lost  # notifications were due, and none was sent


async def test_server_sent_events(make_app: MakeApp) -> None:
    app = make_app()
    w = register(app)
    async with app:
        handle = await w["agent"].start(2)
        await handle.result(timeout=10)
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            url = f"/instances/{handle.instance_id}/streams/tokens"
            response = await http.get(url)
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            events = _events(response.text)
            assert events[-1] == ("end", None, {})
            assert [(e[1], e[2]) for e in events[:-1]] == [
                ("0", 0),
                ("1", 1),
                ("2", "attempt1-0"),
                ("3", "attempt1-1"),
                ("4", "attempt1-2"),
                ("5", "attempt2-3"),
                ("6", "attempt2-4"),
            ]
            resumed = _events((await http.get(url, headers={"last-event-id": "5"})).text)
            assert [(e[1], e[2]) for e in resumed] == [("6", "attempt2-4"), (None, {})]
            started = _events((await http.get(url + "?start=6")).text)
            assert [e[2] for e in started] == ["attempt2-4", {}]
            missing = await http.get("/instances/nope/streams/tokens")
            assert missing.status_code == 404
            bad = await http.get(url, headers={"last-event-id": "x"})
            assert bad.status_code == 400


def _events(text: str) -> list[tuple[str, str | None, Any]]:
    """(event, id, data) of each Server-Sent Event of ``text``."""
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            events.append((fields["event"], fields.get("id"), json.loads(fields["data"])))
    return events


READER = textwrap.dedent(
    """
    import asyncio, sys
    import geste

    async def main(url, instance_id, start):
        app = geste.App(url, run_worker=False, poll_interval=0.05)
        async with app:
            async for entry in app.get_handle(instance_id).stream_entries("s", start=start):
                print(entry.position, entry.item, flush=True)
        print("end", flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


async def test_a_reader_in_another_process_resumes_after_a_crash(make_app: MakeApp, tmp_path: Path) -> None:
    """A reader process is killed (SIGKILL) after it printed the first half; a new one resumes after the
    last position it printed and gets the second half, written while it waits: each item once."""
    from tests.conftest import die_with_parent

    app = make_app()
    w = register(app)
    script = tmp_path / "reader.py"
    script.write_text(READER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    async with app:
        handle = await w["halves"].start()

        def reader(start: int) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [sys.executable, str(script), app.url, handle.instance_id, str(start)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                preexec_fn=die_with_parent,
            )

        first = reader(0)
        assert first.stdout is not None
        lines = [await asyncio.to_thread(first.stdout.readline) for _ in range(10)]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        read = [line.split() for line in lines]
        assert read == [[str(i), str(i)] for i in range(10)]
        second = reader(int(read[-1][0]) + 1)
        assert second.stdout is not None
        await app.send_to(handle.instance_id, "go")
        out, _ = await asyncio.to_thread(second.communicate, timeout=60)
        assert out.split("\n")[:-1] == [f"{i} {i}" for i in range(10, 20)] + ["end"]


async def test_the_viewer_shows_an_instances_streams(make_app: MakeApp) -> None:
    app = make_app()
    w = register(app)
    async with app:
        handle = await w["agent"].start(2)
        await handle.result(timeout=10)
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            response = await http.get(f"/ui/instances/{handle.instance_id}", headers={"accept": "text/html"})
        assert response.status_code == 200
        text = response.text
        assert "Streams · 1" in text
        assert "<strong>tokens</strong> · 7 items · " in text
        assert f"/instances/{handle.instance_id}/streams/tokens" in text
        # the last five items, numbered by position
        for position, item in [(2, "attempt1-0"), (6, "attempt2-4")]:
            assert f'<li value="{position}"><code>&quot;{item}&quot;</code></li>' in text
        assert "&quot;1&quot;" not in text and '<li value="1">' not in text


async def test_a_failed_write_abandons_the_run_and_its_replay_writes_once(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database error on a workflow's write stops the run, as on a step commit (not a failure of the
    workflow): the run is taken again once its lease expires, replays, and its rewrites write nothing."""
    from geste.errors import StorageError

    app = make_app(lock_timeout=1.0)

    @app.workflow
    async def three(ctx: geste.WorkflowContext) -> int:
        for i in range(3):
            await ctx.write_stream("s", i)
        return 3

    failed: list[int] = []

    async with app:
        storage = app.storage
        original = storage.stream_write

        async def failing_once(writes: Any, now: float) -> Any:
            if any(w.writer == "1:2" for w in writes) and not failed:
                failed.append(1)
                raise StorageError("the database went away")
            return await original(writes, now)

        monkeypatch.setattr(storage, "stream_write", failing_once)
        handle = await three.start()
        assert await handle.result(timeout=20) == 3
        assert failed == [1]
        assert [(e.position, e.item) async for e in handle.stream_entries("s")] == [(0, 0), (1, 1), (2, 2)]


async def test_server_sent_events_come_as_written_and_stop_when_the_client_goes(make_app: MakeApp) -> None:
    """Called as an ASGI server calls it: each item is sent when it is written (the stream still open),
    and the client going away ends the response (and the read)."""
    app = make_app()
    w = register(app)
    async with app:
        handle = await w["unclosed"].start()
        asgi = app.asgi()
        sent: list[dict[str, Any]] = []
        gone = asyncio.Event()
        first = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if not sent:
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if b"event: item" in message.get("body", b""):
                first.set()

        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "GET",
            "path": f"/instances/{handle.instance_id}/streams/s",
            "raw_path": f"/instances/{handle.instance_id}/streams/s".encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
        }
        call = asyncio.create_task(asgi(scope, receive, send))
        await asyncio.wait_for(first.wait(), 10)
        assert sent[0]["status"] == 200
        assert b'data: "only"' in sent[1]["body"] and sent[1]["more_body"]
        assert not call.done()  # open: the instance waits, the stream may go on
        gone.set()
        await asyncio.wait_for(call, 10)
        await app.send_to(handle.instance_id, "go")
        await handle.result(timeout=10)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_the_registrations_of_dead_readers_expire(make_app: MakeApp) -> None:
    """A reader that died leaves its row; past its expiry the cleanup chore deletes it (oldest first)."""
    app = make_app()
    async with app:
        storage = app.storage
        await storage.stream_watch("i", "k", reader="dead", process="p", expires_at=10.0)
        await storage.stream_watch("i", "k", reader="alive", process="p", expires_at=1e12)
        assert await storage.stream_write([StreamWrite("i", "k", "1:0", "1")], 1.0) == [("i", "k")]
        assert await storage.stream_readers_cleanup(100.0, limit=10) == 1
        await storage.stream_unwatch([("i", "k", "alive")])
        assert await storage.stream_write([StreamWrite("i", "k", "1:1", "2")], 2.0) == []  # nobody reads


async def test_closing_the_app_ends_a_waiting_reader(make_app: MakeApp) -> None:
    from geste.errors import AppNotOpenError

    writer = make_app()
    w = register(writer)
    reader_app = make_app(run_worker=False, notify_fallback_interval=60.0, poll_interval=60.0)
    async with writer:
        handle = await w["unclosed"].start()
        await reader_app.open()
        got: list[Any] = []

        async def read() -> None:
            async for item in reader_app.get_handle(handle.instance_id).read_stream("s"):
                got.append(item)

        reading = asyncio.create_task(read())
        await wait_until(lambda: got, "the first item is read")
        await reader_app.close()
        with pytest.raises(AppNotOpenError):
            await asyncio.wait_for(reading, 10)  # not after a 60 s poll
        await writer.send_to(handle.instance_id, "go")


async def test_positions_are_exact_across_batches_streams_and_rewrites(make_app: MakeApp) -> None:
    """Several batches over several streams, each with rewrites of writers stored before (a replay), a
    writer twice in one batch, a close followed in its batch and in later ones by items (dropped) while
    another stream of the same batch goes on: every stream's positions are 0, 1, 2, ... in the order of its
    writes, each item once, and a read from any position (inside a batch too) starts exactly there."""
    app = make_app()
    async with app:
        storage = app.storage

        def w(stream: str, writer: str, item: str | None) -> StreamWrite:
            return StreamWrite("i1" if stream != "other" else "i2", stream, writer, item)

        await storage.stream_write([w("a", "r:0", '"a0"'), w("b", "r:0", '"b0"'), w("a", "r:1", '"a1"')], 1.0)
        await storage.stream_write(
            [
                w("a", "r:0", '"a0 again"'),  # stored: nothing
                w("a", "r:2", '"a2"'),
                w("b", "r:1", '"b1"'),
                w("other", "r:0", '"o0"'),
                w("b", "r:1", '"b1 twice in the batch"'),
                w("a", "r:1", '"a1 again"'),
                w("a", "r:3", '"a3"'),
            ],
            2.0,
        )
        await storage.stream_write(
            [
                w("b", "r:2", '"b2"'),
                w("b", "close", None),
                w("b", "r:3", '"after the close"'),
                w("a", "r:4", '"a4"'),
            ],
            3.0,
        )
        await storage.stream_write(
            [
                w("b", "r:4", '"after"'),
                w("b", "close", None),
                w("a", "r:5", '"a5"'),
                w("other", "r:1", '"o1"'),
            ],
            4.0,
        )
        a = [(p, f'"a{p}"') for p in range(6)]
        assert await storage.stream_read("i1", "a", 0, 100) == a
        assert await storage.stream_read("i1", "b", 0, 100) == [
            (0, '"b0"'),
            (1, '"b1"'),
            (2, '"b2"'),
            (3, None),
        ]
        assert await storage.stream_read("i2", "other", 0, 100) == [(0, '"o0"'), (1, '"o1"')]
        for start in range(7):  # resumes at every position, those inside a batch among them
            assert await storage.stream_read("i1", "a", start, 2) == a[start : start + 2]
        heads = {h.key: (h.length, h.closed) for h in await storage.stream_list("i1")}
        assert heads == {"a": (6, False), "b": (4, True)}


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_write_batch_probes_the_writer_index_per_item_on_postgres(
    pg_url: str, plan_cache_mode: str
) -> None:
    """EXPLAIN ANALYZE of the real statement, 64 items into 64 streams as the benchmark's batches are, over
    64,000 stored items and 1,000 closed streams, with the custom plan and the generic one asyncpg switches
    to: geste_streams is read only by one probe of the writer index per item (never a scan, nor a hash of
    the whole table), the heads only by the upsert (no probe per item), the insert checks the writer index
    only (positions come from the locked heads), and with no reader registered the readers' table is not
    probed per stream."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    from .support import plan_nodes, sql_literal

    dsn, options = parse_postgres_url(pg_url)
    query = schema_queries(options["schema"])["stream_write"]
    async with geste.App(pg_url, run_worker=False):  # migrated
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            await conn.execute(
                "INSERT INTO geste_streams (instance_id, key, position, writer, item, written_at) "
                "SELECT 'i' || s, 'tokens', b, '1:' || b, '\"t\"', 1 "
                "FROM generate_series(0, 63) s, generate_series(0, 999) b"
            )
            await conn.execute(
                "INSERT INTO geste_stream_heads SELECT 'i' || s, 'tokens', 1000, false "
                "FROM generate_series(0, 63) s UNION ALL "
                "SELECT 'c' || s, 'tokens', 0, true FROM generate_series(0, 999) s"
            )
            await conn.execute("VACUUM ANALYZE geste_streams")
            await conn.execute("VACUUM ANALYZE geste_stream_heads")
            await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            ids = [f"i{s}" for s in range(64)]
            params = (ids, ["tokens"] * 64, ["1:1000"] * 64, ['"t"'] * 64, 2.0)
            arguments = ", ".join(sql_literal(value) for value in params)
            transaction = conn.transaction()
            await transaction.start()
            try:
                await conn.execute(f"PREPARE plan_under_test AS {query}")
                found = await conn.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE plan_under_test({arguments})"
                )
                written = await conn.fetchval("SELECT count(*) FROM geste_streams WHERE writer = '1:1000'")
            finally:
                await transaction.rollback()
        finally:
            await conn.close()
        nodes = plan_nodes(json.loads(found)[0]["Plan"])
        shown = [
            (n["Node Type"], n.get("Relation Name"), n.get("Index Name"), n["Actual Loops"]) for n in nodes
        ]
        assert written == 64
        reads = [
            n for n in nodes if n.get("Relation Name") == "geste_streams" and n["Node Type"] != "ModifyTable"
        ]
        assert [(n["Node Type"], n["Index Name"], n["Actual Loops"]) for n in reads] == [
            ("Index Only Scan", "geste_streams_by_writer", 64)
        ], shown
        heads = [n for n in nodes if n.get("Relation Name") == "geste_stream_heads"]
        assert [n["Node Type"] for n in heads] == ["ModifyTable"], shown
        insert = next(
            n for n in nodes if n["Node Type"] == "ModifyTable" and n["Relation Name"] == "geste_streams"
        )
        assert insert["Conflict Arbiter Indexes"] == ["geste_streams_by_writer"], insert
        probes = [n for n in nodes if n.get("Index Name") == "geste_stream_readers_pkey"]
        assert all(n["Actual Loops"] == 0 for n in probes), shown
