"""Proof under faults, bad input: whatever text or value a user gives, and whatever a hand does to a
history row, geste answers with a typed error or does the right thing.

1. Odd text and values everywhere a user gives them (hypothesis): workflow arguments, instance ids,
   event types, match dicts, event and message data, channel names, event and message ids, sources.
   Each either round-trips exactly or is refused at the call with a typed error from ``geste.errors``
   (``TypeError`` where the API documents it), never a driver exception, and a refused call leaves every
   ``geste_`` table as it was; the worker goes on (each example ends with a workflow completing).
2. History rows corrupted by hand (not JSON, wrong shape, unknown kind, a gap, another step's name):
   the instance ends ``failed`` with ``HistoryCorruptedError`` (``NonDeterminismError`` for a readable
   row of another step) naming the instance and the step; the row is left as it is; the other instances
   run on, on the same worker; nothing is retried in a loop.
3. No SQL is built from user text: every statement the code executes is a named query of
   ``storage/sql/<backend>/queries.sql`` (or a migration, or a constant), checked on the source's syntax
   tree; and SQL-looking names are plain data.

The fuzz tests run their examples against one open App per backend (an ``asyncio.Runner`` drives it
between examples), so the whole file takes seconds, not minutes.
"""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import decimal
import json
import logging
import math
import re
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import geste
from geste._serde import MAX_NESTING, loads
from geste.errors import (
    ConfigurationError,
    HistoryCorruptedError,
    InstanceNotFoundError,
    NonDeterminismError,
    PayloadTooLargeError,
    SerializationError,
    StorageError,
    WorkflowFailed,
)
from geste.storage._sql import load_migrations, load_queries
from geste.storage.postgres import parse_postgres_url

from .conftest import POSTGRES_URL
from .support import wait_status, wait_until

T = TypeVar("T")
SRC = Path(geste.__file__).parent
FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the database beside the App ---------------------------------------------------------------------
class Database:
    """Direct access to the test database, as an operator (or a careless hand) has it: snapshots of
    geste's tables and edits of history rows."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite_path = url[len("sqlite:///") :] if url.startswith("sqlite:") else None
        self.schema = parse_qs(urlsplit(url).query).get("schema", ["public"])[0]
        self._pg: Any = None

    async def open(self) -> None:
        if self.sqlite_path is None:
            import asyncpg

            self._pg = await asyncpg.connect(POSTGRES_URL)
            await self._pg.execute(f'SET search_path TO "{self.schema}"')

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()

    async def fetch(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """``sql`` with ``?`` placeholders, on either backend."""
        if self.sqlite_path is None:
            for n in range(1, len(params) + 1):
                sql = sql.replace("?", f"${n}", 1)
            return [tuple(row) for row in await self._pg.fetch(sql, *params)]
        conn = sqlite3.connect(self.sqlite_path, timeout=30)
        try:
            with conn:
                return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    async def tables(self) -> list[str]:
        if self.sqlite_path is None:
            rows = await self.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", self.schema
            )
        else:
            rows = await self.fetch("SELECT name FROM sqlite_master WHERE type = 'table'")
        return sorted(name for (name,) in rows if name.startswith("geste_"))

    async def snapshot(self) -> dict[str, list[str]]:
        """Every row of every ``geste_`` table but the worker registry (its heartbeat moves) and the
        chores' rounds (taken whenever they are due)."""
        shot = {}
        for table in await self.tables():
            if table not in ("geste_workers", "geste_chores"):
                shot[table] = sorted(repr(row) for row in await self.fetch(f"SELECT * FROM {table}"))
        return shot

    async def history(self, instance_id: str) -> list[tuple[Any, ...]]:
        rows = await self.fetch(
            "SELECT seq, kind, name, payload, is_error FROM geste_history WHERE instance_id = ? ORDER BY seq",
            instance_id,
        )
        return [(seq, kind, name, payload, bool(is_error)) for seq, kind, name, payload, is_error in rows]


def is_driver_error(exc: BaseException | None) -> bool:
    """Whether ``exc`` or anything in its chain comes from a database driver."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__module__.split(".")[0] in ("asyncpg", "sqlite3") or isinstance(exc, sqlite3.Error):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


async def refused(db: Database, error: type[Exception], call: Callable[[], Awaitable[Any]]) -> Exception:
    """``call`` must fail with ``error`` (typed, no driver error in its chain) and write nothing."""
    before = await db.snapshot()
    try:
        result = await call()
    except Exception as exc:
        assert isinstance(exc, error), f"expected {error.__name__}, got {exc!r}"
        assert not isinstance(exc, StorageError) and not is_driver_error(exc), repr(exc)
        assert await db.snapshot() == before, "a refused call changed the database"
        return exc
    raise AssertionError(f"expected {error.__name__}, got the result {result!r:.200}")


class Harness:
    """One open App (and the database beside it) for all the examples of a property: an asyncio
    Runner drives it between examples, so an example costs a few statements, not an App."""

    def __init__(self, url: str, **options: Any) -> None:
        options.setdefault("poll_interval", 0.05)
        options.setdefault("lock_timeout", 10.0)
        options.setdefault("shutdown_grace", 2.0)
        self.runner = asyncio.Runner()
        self.app = geste.App(url, **options)
        self.db = Database(url)
        self.count = 0

    def run(self, coro: Awaitable[T]) -> T:
        async def go() -> T:
            return await asyncio.wait_for(coro, 30)

        return self.runner.run(go())

    def unique(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}-{self.count}"

    def __enter__(self) -> Harness:
        @self.app.workflow(name="fuzz_sentinel")
        async def sentinel(ctx: geste.WorkflowContext, n: int) -> int:
            return n + 1

        self.run(self.app.open())
        self.run(self.db.open())
        return self

    async def alive(self) -> None:
        """The worker still runs workflows."""
        handle = await self.app.start_workflow("fuzz_sentinel", 41)
        assert await handle.result(timeout=15) == 42

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.app.close())
            self.run(self.db.close())
        finally:
            self.runner.close()


@pytest.fixture
def harness(db_url: str) -> Callable[..., Harness]:
    return lambda **options: Harness(db_url, **options)


# -- what a user may give ------------------------------------------------------------------------------
ODD_TEXT = [
    "",
    " ",
    "'",
    '"',
    "`",
    "\\",
    "\\'",
    "''",
    "'); DROP TABLE geste_instances; --",
    "x'; DROP TABLE geste_history; --",
    "Robert'); DELETE FROM geste_events WHERE ('1'='1",
    '"; DROP SCHEMA public CASCADE; --',
    "%_ LIKE * ? [a-z]",
    "$1 $$ :name ? %s {schema} {}",
    "\x00",
    "a\x00b",
    "\ud800",
    "lone \udfff",
    "🎉",
    "\U0001f9d1\u200d\U0001f692",
    "e\u0301\u0308",
    "\u202eRTL\u202c עברית العربية",
    "\ufeff\uffff\ufffe",
    "\n\r\t\x0b\x1b[31m",
    "日本語 Ελληνικά",
]
chars = st.characters(exclude_categories=())  # every code point, lone surrogates included
odd_text = st.one_of(
    st.sampled_from(ODD_TEXT),
    st.text(chars, max_size=12),
    st.lists(st.sampled_from(ODD_TEXT) | st.text(chars, max_size=4), max_size=4).map("".join),
)
names = st.one_of(odd_text, st.text(chars, min_size=195, max_size=205), st.integers(), st.none())
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    odd_text,
)
json_values = st.recursive(
    json_leaves,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(odd_text, kids, max_size=4),
    max_leaves=12,
)


def storable(name: object, *, max_length: int = 200, blank: bool = True) -> bool:
    """Whether every backend can store ``name`` as an id or name: what geste must accept."""
    if not isinstance(name, str) or not name or len(name) > max_length or "\x00" in name:
        return False
    if not blank and not name.strip():
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_ok(value: str) -> bool:
    """No NUL, valid UTF-8: what every backend stores verbatim."""
    return storable(value + "x", max_length=10**9)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON types all the way down (``True`` is not ``1``, ``-0.0`` not ``0.0``),
    object keys in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


# -- 0. the parser of stored JSON ---------------------------------------------------------------------------
@settings(max_examples=400, deadline=None)
@given(json_values, st.sampled_from([None, 1, "\t"]))
def test_stored_json_parses_exactly_as_the_standard_library_parses_it(value: Any, indent: Any) -> None:
    # _serde.loads (msgspec, then json for what msgspec refuses) reads every replayed step: the values it
    # gives must be json's, type for type (an int past 64 bits stays an int, -0.0 stays -0.0)
    for text in (compact(value), json.dumps(value, indent=indent), json.dumps(value, ensure_ascii=False)):
        assert same(loads(text), json.loads(text)), text


@pytest.mark.parametrize(
    "text", ["NaN", "[-Infinity]", "1e400", '"\\ud800"', '{"a":1,"a":2}', " [1 ] ", "2" * 400]
)
def test_json_geste_never_writes_parses_as_the_standard_library_parses_it(text: str) -> None:
    assert repr(loads(text)) == repr(json.loads(text))


@pytest.mark.parametrize("text", ["", "{", "[1,]", "nul", '"\\x"', "\ufeff[]", "[" * 3000 + "]" * 3000])
def test_json_nobody_can_read_raises_what_the_standard_library_raises(text: str) -> None:
    with pytest.raises(Exception) as expected:
        json.loads(text)
    with pytest.raises(expected.type):
        loads(text)


# -- 1. odd input ----------------------------------------------------------------------------------------
def test_workflow_arguments_round_trip_exactly(harness: Callable[..., Harness]) -> None:
    with harness() as h:

        @h.app.activity
        async def relay(ctx: geste.ActivityContext, value: Any) -> Any:
            return value

        @h.app.workflow
        async def echo(ctx: geste.WorkflowContext, value: Any, *, also: Any = None) -> Any:
            through = await relay(ctx, value)
            return {"value": value, "through": through, "also": also}

        @FUZZ
        @given(value=json_values, also=json_values)
        def prop(value: Any, also: Any) -> None:
            async def check() -> None:
                handle = await echo.start(value, also=also)
                result = await handle.result(timeout=15)
                assert same(result, {"value": value, "through": value, "also": also}), result
                assert same((await handle.info()).input, {"args": [value], "kwargs": {"also": also}})

            h.run(check())

        prop()


def test_values_json_cannot_hold_round_trip_by_type_hint_or_are_refused(
    harness: Callable[..., Harness],
) -> None:
    # (hint, values, whether each must be stored): stored ones come back equal, typed by the hints
    utc_offsets = st.integers(-23 * 60, 23 * 60).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
    cases: list[tuple[Any, st.SearchStrategy[Any], Callable[[Any], bool]]] = [
        (set[int], st.sets(st.integers(-(10**9), 10**9), max_size=5), lambda v: True),
        (frozenset[str], st.frozensets(odd_text, max_size=4), lambda v: True),
        (tuple[str, ...], st.lists(odd_text, max_size=4).map(tuple), lambda v: True),
        (bytes, st.binary(max_size=16), lambda v: _utf8(v)),
        (dt.datetime, st.datetimes(timezones=st.none() | st.just(dt.UTC) | utc_offsets), lambda v: True),
        (dt.date, st.dates(), lambda v: True),
        (uuid.UUID, st.uuids(), lambda v: True),
        (decimal.Decimal, st.decimals(allow_nan=False, allow_infinity=False, places=4), lambda v: True),
        (dict[int, str], st.dictionaries(st.integers(-1000, 1000), odd_text, max_size=4), lambda v: True),
        (Any, st.sampled_from([math.nan, math.inf, -math.inf, {"k": [math.nan]}]), lambda v: False),
        (Any, st.sampled_from([object(), {"k": object()}, {(1, 2): "tuple key"}]), lambda v: False),
        (Any, st.binary(min_size=1, max_size=8).filter(lambda b: not _utf8(b)), lambda v: False),
    ]
    with harness() as h:
        flows = []
        for i, (hint, _, _) in enumerate(cases):

            async def echo(ctx: geste.WorkflowContext, value: Any) -> Any:
                return value

            echo.__annotations__ = {"ctx": geste.WorkflowContext, "value": hint, "return": hint}
            flows.append(h.app.workflow(name=f"typed_echo_{i}")(echo))

        @FUZZ
        @given(data=st.data())
        def prop(data: st.DataObject) -> None:
            i = data.draw(st.integers(0, len(cases) - 1), label="case")
            hint, values, stores = cases[i]
            value = data.draw(values, label="value")

            async def check() -> None:
                if stores(value):
                    result = await (await flows[i].start(value)).result(timeout=15)
                    assert result == value and type(result) is type(value), (hint, value, result)
                else:
                    await refused(h.db, SerializationError, lambda: flows[i].start(value))
                    await refused(h.db, SerializationError, lambda: h.app.send_event("fuzz.typed", value))
                    await refused(h.db, SerializationError, lambda: h.app.publish("fuzz.typed", value))
                    await h.alive()

            h.run(check())

        prop()


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


LIMIT = 2048
sized_text = st.tuples(
    st.sampled_from(["x", "é", "🎉", '"', "\\", "\x00", "\ud800"]),  # 1, 6, 12, 2, 2, 6 and 6 bytes encoded
    st.integers(LIMIT - 60, LIMIT + 20),
).map(lambda t: t[0] * (t[1] // len(compact(t[0])[1:-1])))


def test_sizes_near_and_over_max_payload_bytes(harness: Callable[..., Harness]) -> None:
    with harness(max_payload_bytes=LIMIT) as h:

        @h.app.workflow
        async def echo(ctx: geste.WorkflowContext, value: Any) -> Any:
            return value

        @FUZZ
        @given(text=sized_text)
        def prop(text: str) -> None:
            async def check() -> None:
                size = len(compact({"args": [text], "kwargs": {}}))
                if size <= LIMIT:
                    assert await (await echo.start(text)).result(timeout=15) == text
                else:
                    error = await refused(h.db, PayloadTooLargeError, lambda: echo.start(text))
                    assert (error.size, error.limit) == (size, LIMIT)  # type: ignore[attr-defined]
                calls: list[tuple[str, Callable[[], Awaitable[str]]]] = [
                    ("event", lambda: h.app.send_event("fuzz.size", text)),
                    ("message", lambda: h.app.publish("fuzz.size", text)),
                ]
                for what, call in calls:
                    if len(compact(text)) <= LIMIT:
                        assert await call(), what
                    else:
                        await refused(h.db, PayloadTooLargeError, call)
                await h.alive()

            h.run(check())

        prop()


def nested(levels: int, leaf: Any) -> Any:
    value = leaf
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


def test_nesting_is_refused_before_json_cannot_read_it_back(harness: Callable[..., Harness]) -> None:
    # Before the limit, 980 levels were stored, and app.get_instance() raised RecursionError: decoding
    # in a deeper stack than the encoding ran out of recursion.
    with harness() as h:

        @h.app.workflow
        async def echo(ctx: geste.WorkflowContext, value: Any) -> Any:
            return value

        @FUZZ
        @given(levels=st.one_of(st.integers(0, 300), st.integers(MAX_NESTING - 4, MAX_NESTING + 2)))
        def prop(levels: int) -> None:
            value = nested(levels, "🎉'")

            async def check() -> None:
                if depth({"args": [value]}) <= MAX_NESTING:  # the stored input wraps the value twice
                    handle = await echo.start(value)
                    assert same(await handle.result(timeout=15), value)
                    assert same((await handle.info()).input["args"][0], value)
                else:
                    await refused(h.db, SerializationError, lambda: echo.start(value))
                if depth(value) > MAX_NESTING:
                    await refused(h.db, SerializationError, lambda: h.app.send_event("fuzz.deep", value))
                    await refused(h.db, SerializationError, lambda: h.app.publish("fuzz.deep", value))
                await h.alive()

            h.run(check())

        prop()
        for levels in (979, 980, 995, 5000):  # where json itself gave up, at different stack depths
            value = nested(levels, 1)
            h.run(refused(h.db, SerializationError, lambda: echo.start(value)))  # noqa: B023


def test_instance_ids(harness: Callable[..., Harness]) -> None:
    with harness() as h:

        @h.app.workflow
        async def named(ctx: geste.WorkflowContext, given_id: str) -> list[str]:
            return [ctx.instance_id, given_id]

        @FUZZ
        @given(iid=names)
        def prop(iid: Any) -> None:
            async def check() -> None:
                if iid is None:  # a generated id
                    handle = await named.start("x")
                    assert await handle.result(timeout=15) == [handle.instance_id, "x"]
                elif storable(iid):
                    handle = await named.start_with_id(iid, iid)
                    assert handle.instance_id == iid
                    assert await handle.result(timeout=15) == [iid, iid]
                    assert (await h.app.get_instance(iid)).instance_id == iid
                    assert [e.seq for e in await h.app.history(iid)] == []
                    listed = await h.app.list_instances(workflow="named", limit=10_000)
                    assert iid in {info.instance_id for info in listed}
                    assert (await h.app.cancel(iid)).status == geste.Status.COMPLETED  # finished: no-op
                    again = await h.app.start_workflow(named, "other", instance_id=iid)
                    assert not again.created and await again.result(timeout=1) == [iid, iid]
                else:
                    error = ConfigurationError
                    await refused(h.db, error, lambda: named.start_with_id(iid, "x"))
                    await refused(h.db, error, lambda: h.app.start_workflow("named", "x", instance_id=iid))
                    await refused(h.db, error, lambda: h.app.send_event("fuzz.id", event_id=iid))
                    await refused(h.db, error, lambda: h.app.publish("fuzz.id", message_id=iid))
                    await refused(h.db, error, lambda: h.app.send_to(iid, "fuzz.id", 1))
                    # looking one up: a string no instance can have is simply not found
                    lookup = ConfigurationError if not isinstance(iid, str) else InstanceNotFoundError
                    await refused(h.db, lookup, lambda: h.app.get_instance(iid))
                    await refused(h.db, lookup, lambda: h.app.history(iid))
                    await refused(h.db, lookup, lambda: h.app.cancel(iid))
                    await refused(h.db, lookup, lambda: h.app.get_handle(iid).result(timeout=5))
                    await refused(h.db, lookup, lambda: h.app.send_event("fuzz.id", instance_id=iid))
                    if isinstance(iid, str):
                        assert await h.app.list_instances(workflow=iid) == []
                        assert await h.app.outbox(instance_id=iid) == []
                        assert await h.app.retry_outbox_event(iid) is False
                await h.alive()

            h.run(check())

        prop()
        not_workflows: list[Any] = [42, None, named.fn]
        for not_a_workflow in not_workflows:
            call: Any = lambda: h.app.start_workflow(not_a_workflow)  # noqa: E731, B023
            h.run(refused(h.db, TypeError, call))


async def test_a_match_is_compared_as_recorded_whether_the_event_came_first_or_not(
    make_app: Callable[..., geste.App],
) -> None:
    # The wait records its match as JSON and send_event compares events with that; the wait itself
    # compared them with the Python dict: a tuple, an int key or a date matched an event sent after
    # the wait, not one sent before it (and a date could not be stored at all: a raw TypeError).
    app = make_app()
    matches: list[dict[Any, Any]] = [{"pair": (1, 2)}, {7: "seven"}, {"day": dt.date(2030, 1, 2)}]
    data = [{"pair": [1, 2]}, {"7": "seven"}, {"day": "2030-01-02"}]

    @app.workflow
    async def picky(ctx: geste.WorkflowContext, which: int, tag: str) -> Any:
        await ctx.wait_event("picky.go", match={"tag": tag})
        return (await ctx.wait_event("picky", match=matches[which], timeout=30)).data

    async with app:
        for which in range(len(matches)):
            early = await picky.start(which, f"early-{which}")
            await app.send_event("picky", data[which])  # before it waits: kept for it
            await app.send_event("picky.go", {"tag": f"early-{which}"})
            assert await early.result(timeout=15) == data[which]
            late = await picky.start(which, f"late-{which}")
            await app.send_event("picky.go", {"tag": f"late-{which}"})

            async def waits(handle: geste.WorkflowHandle[Any] = late) -> bool:
                return [e.name for e in await handle.history()] == ["picky.go", "picky.go", "picky"]

            await wait_until(waits, "the second wait")
            await app.send_event("picky", data[which])
            assert await late.result(timeout=15) == data[which]


def test_event_types_matches_data_ids_and_sources(harness: Callable[..., Harness]) -> None:
    with harness() as h:

        @h.app.workflow
        async def waiter(ctx: geste.WorkflowContext, event_type: Any, match: Any) -> dict[str, Any]:
            try:
                event = await ctx.wait_event(event_type, match=match)
            except TypeError as exc:
                return {"refused": str(exc)}
            return {"id": event.event_id, "type": event.type, "data": event.data, "source": event.source}

        @FUZZ
        @example(event_type=" \t", data={}, picked=[], event_id=None, source=None)  # blank: never sendable
        @example(event_type="é" * 201, data={}, picked=[], event_id=None, source=None)  # too long: neither
        @example(event_type="t", data={"k": 1}, picked=[True], event_id="\x00", source="\ud800")
        @given(
            event_type=names,
            data=st.dictionaries(odd_text, json_values, max_size=4),
            picked=st.lists(st.booleans(), max_size=4),
            event_id=st.none() | odd_text,
            source=st.none() | odd_text,
        )
        def prop(event_type: Any, data: Any, picked: list[bool], event_id: Any, source: Any) -> None:
            match = {k: v for k, v, keep in zip(data, data.values(), picked, strict=False) if keep}
            # an id stored once is a duplicate later: each example's is its own, odd text kept
            eid = h.unique("event") if event_id is None else f"{h.unique('')}{event_id}"

            async def check() -> None:
                handle = await waiter.start(event_type, match)
                if not storable(event_type, blank=False):
                    outcome = await handle.result(timeout=15)
                    assert outcome["refused"].startswith("event_type must be a non-empty string"), outcome
                    call = lambda: h.app.send_event(event_type, data)  # noqa: E731
                    await refused(h.db, ConfigurationError, call)
                    return
                src = source
                if not storable(eid) or (source is not None and not text_ok(source)):
                    await wait_status(h.app, handle.instance_id, geste.Status.WAITING)  # settled: snapshots
                    call = lambda: h.app.send_event(event_type, data, event_id=eid, source=source)  # noqa: E731
                    await refused(h.db, ConfigurationError, call)
                    eid_ok, src = h.unique("event"), None
                else:
                    eid_ok = eid
                if match:  # one value differs: not for this waiter
                    key = next(iter(match))
                    await h.app.send_event(event_type, {**data, key: [data[key]]}, event_id=h.unique("miss"))
                await h.app.send_event(event_type, data, event_id=eid_ok, source=src)
                outcome = await handle.result(timeout=15)
                assert same(outcome, {"id": eid_ok, "type": event_type, "data": data, "source": src})
                await h.alive()

            h.run(check())

        prop()


def test_channel_names_message_data_and_ids(harness: Callable[..., Harness]) -> None:
    with harness() as h:

        @h.app.workflow
        async def receiver(ctx: geste.WorkflowContext, channel: Any) -> dict[str, Any]:
            try:
                message = await ctx.receive(channel)
            except ConfigurationError as exc:
                return {"refused": str(exc)}
            return {"id": message.message_id, "channel": message.channel, "data": message.data}

        @h.app.workflow
        async def sender(ctx: geste.WorkflowContext, target: str, channel: Any, data: Any) -> str:
            try:
                return await ctx.send_to(target, channel, data)
            except ConfigurationError as exc:
                return f"refused: {exc}"

        @FUZZ
        @given(channel=names, data=json_values, message_id=st.none() | odd_text)
        def prop(channel: Any, data: Any, message_id: Any) -> None:
            async def check() -> None:
                direct = await receiver.start(channel)
                if not storable(channel):
                    assert (await direct.result(timeout=15))["refused"].startswith("a channel name must be")
                    await refused(h.db, ConfigurationError, lambda: h.app.publish(channel, data))
                    call = lambda: h.app.send_to(direct.instance_id, channel, data)  # noqa: E731
                    await refused(h.db, ConfigurationError, call)
                    outcome = await (await sender.start(direct.instance_id, channel, data)).result(timeout=15)
                    assert outcome.startswith("refused: a channel name must be")
                    return
                # sent to one instance: kept for it whether it waits already or not
                mid = h.unique("direct") if message_id is None else f"{h.unique('')}{message_id}"
                if storable(mid):
                    assert await h.app.send_to(direct.instance_id, channel, data, message_id=mid) == mid
                else:
                    await wait_status(h.app, direct.instance_id, geste.Status.WAITING)  # settled: snapshots
                    call = lambda: h.app.send_to(direct.instance_id, channel, data, message_id=mid)  # noqa: E731
                    await refused(h.db, ConfigurationError, call)
                    mid = await (await sender.start(direct.instance_id, channel, data)).result(timeout=15)
                assert same(await direct.result(timeout=15), {"id": mid, "channel": channel, "data": data})
                # published to whoever subscribed: once it waits
                listening = await receiver.start(channel)
                await wait_status(h.app, listening.instance_id, geste.Status.WAITING, timeout=15)
                published = await h.app.publish(channel, data)
                assert same(
                    await listening.result(timeout=15), {"id": published, "channel": channel, "data": data}
                )
                await h.alive()

            h.run(check())

        prop()


BAD_VALUES = [math.nan, object(), "x" * (2 * LIMIT), nested(200, 1)]  # not JSON, not JSON, too big, too deep


def test_steps_refused_inside_a_workflow_leave_a_history_that_replays(
    harness: Callable[..., Harness],
) -> None:
    # A step refused before it is recorded leaves its position empty: the replay fails there again, and
    # must not take the gap for a row removed by hand.
    with harness(max_payload_bytes=LIMIT) as h:

        @h.app.activity
        async def double(ctx: geste.ActivityContext, n: Any) -> int:
            return 2 * int(n)

        @h.app.workflow
        async def refusing(ctx: geste.WorkflowContext, which: int) -> list[str]:
            bad = BAD_VALUES[which]
            seen = []
            for attempt in (
                lambda: ctx.publish("fuzz.steps", bad),
                lambda: ctx.send_event("fuzz.steps", bad),
                lambda: double(ctx, bad),
                lambda: ctx.wait_event("fuzz.steps", match={"k": bad}),
                lambda: ctx.wait_event(" \t "),  # refused before it takes a position
            ):
                try:
                    await attempt()
                except SerializationError:
                    seen.append("refused")
                except TypeError:
                    seen.append("TypeError")
            seen.append(str(await double(ctx, 21)))
            await ctx.wait_event("fuzz.go", match={"id": ctx.instance_id})  # released: the rest replays
            seen.append(str(ctx.uuid4().version))
            seen.append(str(await double(ctx, 2)))
            return seen

        async def check() -> None:
            for which in range(len(BAD_VALUES)):
                handle = await refusing.start(which)
                await wait_status(h.app, handle.instance_id, geste.Status.WAITING, timeout=15)
                await h.app.send_event("fuzz.go", {"id": handle.instance_id})
                seen = await handle.result(timeout=15)
                assert seen == ["refused"] * 4 + ["TypeError", "42", "4", "4"], seen
                assert [(e.seq, e.kind) for e in await handle.history()] == [
                    (5, "activity"),
                    (6, "wait_event"),
                    (7, "event"),
                    (8, "uuid"),
                    (9, "activity"),
                ]
            await h.alive()

        h.run(check())


# -- 2. history rows corrupted by hand -----------------------------------------------------------------
CORRUPT = HistoryCorruptedError
DIVERGED = NonDeterminismError
CORRUPTIONS: list[tuple[str, int, str, Any, type[Exception]]] = [
    # (case, seq, column set on the victim's row (or "delete"), its new value, the error expected)
    ("activity-payload-not-json", 1, "payload", '{"result": "first victim", "attempts": 1', CORRUPT),
    ("activity-payload-a-list", 1, "payload", '["first victim"]', CORRUPT),
    ("activity-payload-null", 1, "payload", None, CORRUPT),
    ("activity-error-flag-without-error", 1, "is_error", True, CORRUPT),
    ("wait-deadline-a-string", 2, "payload", '{"match": null, "timeout": null, "deadline": "soon"}', CORRUPT),
    ("event-payload-without-id", 3, "payload", '{"data": {"who": "victim"}}', CORRUPT),
    ("now-payload-a-string", 4, "payload", '"yesterday"', CORRUPT),
    ("subscription-mode-unknown", 5, "payload", '{"mode": "telepathy"}', CORRUPT),
    ("message-payload-not-json", 7, "payload", "not json at all", CORRUPT),
    ("unknown-kind", 1, "kind", "teleport", CORRUPT),
    ("unknown-kind-of-a-wait-outcome", 3, "kind", "telegram", CORRUPT),
    ("gap-activity-row-deleted", 1, "delete", None, CORRUPT),
    ("gap-event-row-deleted", 3, "delete", None, CORRUPT),
    ("gap-helper-row-deleted", 4, "delete", None, CORRUPT),
    ("another-activity-name", 1, "name", "last", DIVERGED),
    ("another-event-type", 3, "name", "stop", DIVERGED),
]


@pytest.mark.parametrize(
    ("seq", "column", "value", "error"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS]
)
async def test_a_corrupted_history_row_fails_its_instance_only(
    make_app: Callable[..., geste.App],
    db_url: str,
    caplog: pytest.LogCaptureFixture,
    seq: int,
    column: str,
    value: Any,
    error: type[Exception],
) -> None:
    # a row edited by hand below the step a cached run holds is what the cache trusts (docs/design.md,
    # "The cache of suspended runs"): the replay that meets the corruption runs without it
    app = make_app(lock_timeout=10.0, workflow_cache_size=0)
    calls: list[tuple[str, str]] = []

    @app.activity
    async def first(ctx: geste.ActivityContext, who: str) -> str:
        calls.append(("first", who))
        return f"first {who}"

    @app.activity
    async def last(ctx: geste.ActivityContext, who: str) -> str:
        calls.append(("last", who))
        return f"last {who}"

    @app.workflow
    async def journey(ctx: geste.WorkflowContext, who: str) -> dict[str, Any]:
        a = await first(ctx, who)  # 1
        go = await ctx.wait_event("go", match={"who": who})  # 2 the wait, 3 the event
        at = ctx.now()  # 4
        message = await ctx.receive("box")  # 5 the (implicit) subscription, 6 the receive, 7 the message
        await ctx.wait_event("again", match={"who": who})  # 8 the wait, 9 the event
        b = await last(ctx, who)  # 10
        return {"a": a, "go": go.data, "at": at.year, "message": message.data, "b": b}

    @app.workflow
    async def ping(ctx: geste.WorkflowContext) -> str:
        return "pong"

    db = Database(db_url)
    await db.open()
    try:
        async with app:
            victim = await journey.start_with_id("victim", "victim")
            bystander = await journey.start_with_id("bystander 'x'; --", "bystander")
            for handle, who in ((victim, "victim"), (bystander, "bystander")):
                await app.send_event("go", {"who": who})
                await app.send_to(handle.instance_id, "box", {"for": who})

            async def parked() -> bool:
                handles = (victim, bystander)
                rows = [await db.history(h.instance_id) for h in handles]
                statuses = [await h.status() for h in handles]
                return all(len(r) == 8 for r in rows) and statuses == [geste.Status.WAITING] * 2

            await wait_until(parked, "both instances to wait for 'again'")
            where = "WHERE instance_id = ? AND seq = ?"
            if column == "delete":
                await db.fetch(f"DELETE FROM geste_history {where}", "victim", seq)
            else:
                await db.fetch(f"UPDATE geste_history SET {column} = ? {where}", value, "victim", seq)
            corrupted = await db.history("victim")

            with caplog.at_level(logging.ERROR):
                for who in ("victim", "bystander"):
                    await app.send_event("again", {"who": who})
                assert (await bystander.result(timeout=15))["b"] == "last bystander"
                with pytest.raises(WorkflowFailed) as failed:
                    await victim.result(timeout=15)

            cause = failed.value.__cause__
            assert type(cause) is error, repr(cause)
            assert isinstance(cause, NonDeterminismError) and cause.seq == seq
            assert failed.value.error["type"] == f"geste.errors.{error.__name__}"
            assert "'victim'" in str(failed.value) and f"step {seq}" in str(failed.value)
            if error is HistoryCorruptedError:
                assert cause.instance_id == "victim"  # type: ignore[attr-defined]
            # the run wrote nothing: the history is the corrupted one, plus the event send_event put there
            after = await db.history("victim")
            assert after[: len(corrupted)] == corrupted and [r[0] for r in after[len(corrupted) :]] == [9]
            info = await victim.info()
            assert info.status == geste.Status.FAILED and info.locked_by is None
            # run once, failed once: no retry loop, and the first step was not run again
            assert calls.count(("first", "victim")) == 1 and ("last", "victim") not in calls
            stopped = [r for r in caplog.records if "victim stopped" in r.getMessage()]
            assert len(stopped) == 1, [r.getMessage() for r in caplog.records]
            assert not [r for r in caplog.records if r.name == "geste.worker" and r.levelno >= logging.ERROR]
            if column == "kind" or (column == "payload" and value is not None and not is_json(value)):
                with pytest.raises(HistoryCorruptedError, match=f"step {seq}"):
                    await app.history("victim")  # the operator's view names the row too
            assert await (await ping.start()).result(timeout=15) == "pong"  # the worker goes on
    finally:
        await db.close()


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def db_len(db: Database, instance_id: str, n: int) -> bool:
    return len(await db.history(instance_id)) >= n


async def test_a_workflow_catching_the_corruption_error_still_stops(
    make_app: Callable[..., geste.App], db_url: str
) -> None:
    app = make_app(lock_timeout=10.0, workflow_cache_size=0)  # a replay meets the corruption
    steps: list[str] = []

    @app.activity
    async def step(ctx: geste.ActivityContext, n: int) -> int:
        steps.append(f"step {n}")
        return n

    @app.workflow
    async def careless(ctx: geste.WorkflowContext) -> list[Any]:
        seen: list[Any] = []
        try:
            seen.append(await step(ctx, 1))
        except Exception as exc:  # a workflow that swallows everything
            seen.append(type(exc).__name__)
        try:
            await ctx.wait_event("careless.go")
        except Exception as exc:
            seen.append(type(exc).__name__)
        seen.append(await step(ctx, 2))
        return seen

    db = Database(db_url)
    await db.open()
    try:
        async with app:
            handle = await careless.start_with_id("careless")
            await wait_status(app, "careless", geste.Status.WAITING)
            where = "WHERE instance_id = ? AND seq = ?"
            await db.fetch(f"UPDATE geste_history SET payload = 'oops' {where}", "careless", 1)
            await app.send_event("careless.go")
            with pytest.raises(WorkflowFailed) as failed:
                await handle.result(timeout=15)
            assert isinstance(failed.value.__cause__, HistoryCorruptedError)
            assert steps == ["step 1"]
    finally:
        await db.close()


async def test_a_step_number_that_is_no_number_fails_the_instance_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # SQLite only: its columns keep whatever an UPDATE puts there (PostgreSQL's integer column refuses
    # it). Before, the context could not be built: the worker logged an engine error and offered the
    # instance again every poll interval, forever.
    path = tmp_path / "geste.db"
    app = geste.App(f"sqlite:///{path}", poll_interval=0.05, lock_timeout=10.0)

    @app.activity
    async def step(ctx: geste.ActivityContext) -> int:
        return 1

    @app.workflow
    async def numbered(ctx: geste.WorkflowContext) -> int:
        await step(ctx)
        await ctx.wait_event("numbered.go")
        return 2

    db = Database(f"sqlite:///{path}")
    async with app:
        handle = await numbered.start_with_id("numbered")
        await wait_status(app, "numbered", geste.Status.WAITING)
        await db.fetch(
            "UPDATE geste_history SET seq = 'one' WHERE instance_id = ? AND seq = ?", "numbered", 1
        )
        with caplog.at_level(logging.ERROR):
            await app.send_event("numbered.go")
            with pytest.raises(WorkflowFailed) as failed:
                await handle.result(timeout=15)
            assert await (await numbered.start()).info()  # the worker goes on
        assert isinstance(failed.value.__cause__, HistoryCorruptedError)
        assert "'one'" in str(failed.value)
        assert not [r for r in caplog.records if r.name == "geste.worker"]
        assert len([r for r in caplog.records if "numbered stopped" in r.getMessage()]) == 1


async def test_an_activity_lost_in_a_gather_is_run_again_not_taken_for_a_gap(
    make_app: Callable[..., geste.App],
) -> None:
    # An activity and a publish run together; the publish commits, the worker stops before the
    # activity ends: the history has step 2 and not step 1. That is no corruption (steps that commit on
    # their own may commit out of order in a gather): the next run executes step 1.
    gate = asyncio.Event()
    runs: list[str] = []

    def register(app: geste.App) -> Any:
        @app.activity
        async def slow(ctx: geste.ActivityContext) -> str:
            runs.append("slow")
            await gate.wait()
            return "slow"

        @app.workflow
        async def pair(ctx: geste.WorkflowContext) -> list[str]:
            return list(await asyncio.gather(slow(ctx), ctx.publish("lane", "hello")))

        return pair

    first = make_app(shutdown_grace=0.1)
    pair = register(first)
    async with first:
        handle = await pair.start_with_id("pair")

        async def published_first() -> bool:
            return [(e.seq, e.kind) for e in await first.history("pair")] == [(2, "publish")]

        await wait_until(published_first, "the publish to commit while the activity runs")
    gate.set()
    second = make_app()
    register(second)
    async with second:
        result = await second.get_handle(handle.instance_id).result(timeout=15)
        history = await second.history("pair")
    assert result == ["slow", history[1].payload["message_id"]]
    assert [(e.seq, e.kind) for e in history] == [(1, "activity"), (2, "publish")]
    assert runs == ["slow", "slow"]


# -- 3. no SQL built from user text ----------------------------------------------------------------
EXECUTING = {"execute", "executemany", "executescript", "fetch", "fetchrow", "fetchval"}
QUERY_TABLES = {"Q", "self._q"}
ALLOWED_BUILT_SQL = {
    # (module, SQL expression): each built from a value checked at construction, never from user text
    ("storage/postgres.py", """f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'"""): "schema: an identifier",
    ("storage/sqlite.py", "f'PRAGMA busy_timeout = {self._busy_timeout_ms}'"): "an int from the URL",
    ("storage/sqlite.py", "f'PRAGMA synchronous = {self._synchronous}'"): "one of four words",
    ("storage/postgres.py", "script"): "a migration file, its schema substituted",
    ("storage/sqlite.py", "statement"): "a statement of a migration file",
}


def sql_violations(source: str, module: str) -> list[str]:
    """Every call that executes SQL whose text is neither a named query (``Q[...]``, ``self._q[...]``),
    nor a literal, nor one of ``ALLOWED_BUILT_SQL``: an f-string, a concatenation, a ``%`` or a
    ``.format`` with a value in it would be one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in EXECUTING
            and node.args
        ):
            continue
        sql = node.args[0]
        text = ast.unparse(sql)
        if isinstance(sql, ast.Subscript) and ast.unparse(sql.value) in QUERY_TABLES:
            continue
        if isinstance(sql, ast.Constant) and isinstance(sql.value, str):
            continue
        if (module, text) in ALLOWED_BUILT_SQL:
            continue
        found.append(f"{module}:{node.lineno}: {node.func.attr}({text})")
    return found


def source_modules() -> Iterator[tuple[str, str]]:
    for path in sorted(SRC.rglob("*.py")):
        yield path.relative_to(SRC).as_posix(), path.read_text(encoding="utf-8")


def test_every_executed_statement_is_a_named_query_or_a_constant() -> None:
    violations = [v for module, source in source_modules() for v in sql_violations(source, module)]
    assert violations == []
    # the storage modules do execute SQL, all of it seen by the check above
    executing = {
        module: sum(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in EXECUTING
            for n in ast.walk(ast.parse(source))
        )
        for module, source in source_modules()
    }
    assert executing["storage/postgres.py"] > 50 and executing["storage/sqlite.py"] > 50


@pytest.mark.parametrize(
    "line",
    [
        "await conn.execute(f\"SELECT * FROM geste_instances WHERE instance_id = '{instance_id}'\")",
        "conn.execute(Q['get_instance'] + ' AND name = ' + name)",
        "conn.execute('SELECT * FROM t WHERE name = %s' % name)",
        "conn.execute('SELECT * FROM t WHERE name = {}'.format(name))",
        "await conn.fetchrow(sql, instance_id)",
        "conn.executemany(self._q['release'].replace('x', name), rows)",
        "await self._pg.fetchval(f'SELECT {column} FROM t')",
    ],
)
def test_the_check_catches_sql_built_from_values(line: str) -> None:
    assert sql_violations(line, "storage/postgres.py") != []


def test_queries_are_named_text_with_only_the_schema_to_substitute() -> None:
    for backend in ("sqlite", "postgres"):
        queries = load_queries(backend)
        used = set()
        for module, source in source_modules():
            for node in ast.walk(ast.parse(source)):
                if (
                    isinstance(node, ast.Subscript)
                    and ast.unparse(node.value) in QUERY_TABLES
                    and module == f"storage/{backend}.py"
                    and isinstance(node.slice, ast.Constant)
                ):
                    used.add(node.slice.value)
        assert used and used <= set(queries), used - set(queries)
        for text in [*queries.values(), *(script for _, script in load_migrations(backend))]:
            placeholders = set(re.findall(r"\{[^}]*\}", text))
            # the schema, as an identifier and (schema 13, in notification payloads) as a string literal:
            # both from the name parse_postgres_url checked, filled once at construction
            assert placeholders <= {"{schema}", "{schema_name}"}, placeholders
    # the query tables are filled once, at construction (the schema substituted there), never after
    filled = set()
    for module, source in source_modules():
        for function in ast.walk(ast.parse(source)):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store | ast.Del):
                    assert ast.unparse(node.value) not in QUERY_TABLES, (module, node.lineno)
                if isinstance(node, ast.Assign) and any(ast.unparse(t) in QUERY_TABLES for t in node.targets):
                    filled.add((module, function.name))
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "replace"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value == "{schema}"
                ):
                    filled.add((module, function.name))
    assert filled == {
        ("storage/postgres.py", "__init__"),
        ("storage/postgres.py", "schema_queries"),  # the only place the schema is substituted
        ("storage/postgres.py", "read_histories"),  # the replay check's read-only read: schema_queries
    }
    # and the schema is a plain identifier, or the App is not built
    for schema in ('x"; DROP SCHEMA public; --', "a b", "a-b", "1abc", "é", "x" * 64, ""):
        with pytest.raises(ConfigurationError):
            parse_postgres_url(f"postgresql://u@h/db?schema={schema}")


SQL_LIKE = "x'; DROP TABLE geste_history; --"


async def test_sql_in_names_and_ids_is_plain_data(make_app: Callable[..., geste.App], db_url: str) -> None:
    app = make_app(worker_id=SQL_LIKE)

    @app.activity(name=SQL_LIKE)
    async def act(ctx: geste.ActivityContext, text: str) -> str:
        return text

    @app.workflow(name=SQL_LIKE)
    async def flow(ctx: geste.WorkflowContext, text: str) -> dict[str, Any]:
        echoed = await act(ctx, text)
        event = await ctx.wait_event(SQL_LIKE, match={SQL_LIKE: text})
        await ctx.subscribe(SQL_LIKE)
        message = await ctx.receive(SQL_LIKE)
        sent = await ctx.send_event(SQL_LIKE, {SQL_LIKE: text}, source=SQL_LIKE, subject=SQL_LIKE)
        return {
            "id": ctx.instance_id,
            "echoed": echoed,
            "event": [event.event_id, event.type, event.source, event.data],
            "message": [message.channel, message.data],
            "sent": sent,
        }

    db = Database(db_url)
    await db.open()
    try:
        async with app:
            tables = await db.tables()
            handle = await flow.start_with_id(SQL_LIKE, SQL_LIKE)
            await app.send_event(SQL_LIKE, {SQL_LIKE: SQL_LIKE}, event_id=SQL_LIKE, source=SQL_LIKE)
            # act, wait, event, subscribe, receive: the receive row is written as it waits
            await wait_until(lambda: db_len(db, SQL_LIKE, 5), "the instance to wait on the channel")
            assert await app.publish(SQL_LIKE, SQL_LIKE, message_id=SQL_LIKE) == SQL_LIKE
            assert await handle.result(timeout=15) == {
                "id": SQL_LIKE,
                "echoed": SQL_LIKE,
                "event": [SQL_LIKE, SQL_LIKE, SQL_LIKE, {SQL_LIKE: SQL_LIKE}],
                "message": [SQL_LIKE, SQL_LIKE],
                "sent": f"{SQL_LIKE}:7",
            }
            assert {e.name for e in await app.history(SQL_LIKE)} == {SQL_LIKE}
            assert [i.instance_id for i in await app.list_instances(workflow=SQL_LIKE)] == [SQL_LIKE]
            assert [e.event_id for e in await app.outbox(instance_id=SQL_LIKE)] == [f"{SQL_LIKE}:7"]
            assert [w.worker_id for w in (await app.status()).workers] == [SQL_LIKE]
        assert await db.tables() == tables  # nothing dropped
        assert len(await db.history(SQL_LIKE)) == 7
    finally:
        await db.close()
