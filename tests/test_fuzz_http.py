"""Bad input and security of the HTTP application (``app.asgi()``), on both backends.

Fuzzed (hypothesis) malformed CloudEvents in both content modes, garbage bodies, odd headers, deep JSON,
bodies over the limit and random requests to every route: each is answered with a 4xx JSON error (never
a 500, never a traceback), leaves every geste table exactly as it was, and the application keeps serving
(a valid event still completes the waiting workflow, a workflow started over HTTP still runs through the
worker). Then the token on every route of the routing table, its constant-time comparison, the body
limit with and without ``Content-Length`` (the body is not read beyond it, also under uvicorn), ``geste
serve``'s default address, and the ASGI protocol (websocket, lifespan, unknown scopes, disconnects).

The application is driven by a small ASGI client here rather than httpx, to control what a server would
deliver: header bytes, chunks, ``more_body`` and disconnects. The hypothesis tests are synchronous and
run the App in an ``asyncio.Runner``, so that one App and one database serve all the examples of a test.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import json
import re
import socket
import sqlite3
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import geste
from geste.cli import main
from geste.http import _endpoints
from geste.http._cloudevents import _is_timestamp
from geste.http._endpoints import GesteASGI
from geste.http._routing import parse_media_type

from .conftest import POSTGRES_URL
from .support import wait_until

MAX_BODY = 8192
"""The body limit of most tests here: small, so that bodies over it are cheap to send."""
TOKEN = "s3cret-t0ken"
HOST = (b"host", b"127.0.0.1:8000")
STRUCTURED = "application/cloudevents+json"
ORDER = {"order_id": "A-1", "amount": 9.99}
VALID_EVENT: dict[str, Any] = {
    "specversion": "1.0",
    "id": "evt-x",
    "source": "/bank",
    "type": "payment.confirmed",
    "data": ORDER,
}
BINARY_HEADERS = [
    ("ce-specversion", "1.0"),
    ("ce-id", "evt-b"),
    ("ce-source", "/bank"),
    ("ce-type", "payment.confirmed"),
    ("content-type", "application/json"),
]
KNOWN_ATTRIBUTES = ("specversion", "id", "source", "type", "subject", "time", "dataschema", "datacontenttype")
FUZZ = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

Headers = Sequence[tuple[str | bytes, str | bytes]]


# -- a small ASGI client ------------------------------------------------------------------------------
@dataclass
class Answer:
    """What the application sent for one request, and how often it asked for the request's body."""

    messages: list[dict[str, Any]]
    receive_calls: int

    @property
    def status(self) -> int:
        status: int = self.messages[0]["status"]
        return status

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode("latin-1"): v.decode("latin-1") for k, v in self.messages[0]["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status if self.messages else None}, {self.body[:300]!r})"


def _bytes(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


async def call(
    asgi: GesteASGI,
    method: str = "POST",
    path: str = "/events",
    *,
    headers: Headers = (),
    body: bytes = b"",
    chunks: Sequence[bytes] | None = None,
    raw_path: bytes | None = None,
    query: bytes = b"",
    disconnect_after_chunks: bool = False,
    http_version: str = "1.1",
) -> Answer:
    """One request as an ASGI server delivers it.

    ``body`` goes in one message with its ``Content-Length`` (unless ``headers`` give one); ``chunks``
    go in as many messages with ``more_body``, under ``Transfer-Encoding: chunked`` in HTTP/1.1 unless
    ``headers`` give a length; ``disconnect_after_chunks`` has the client vanish after the chunks, the
    body unfinished.
    """
    raw_headers = [(_bytes(k).lower(), _bytes(v)) for k, v in headers]
    if not any(k == b"host" for k, _ in raw_headers):
        raw_headers.insert(0, HOST)
    framed = any(k in (b"content-length", b"transfer-encoding") for k, _ in raw_headers)
    if chunks is None:
        chunks = [body]
        if body and not framed:
            raw_headers.append((b"content-length", str(len(body)).encode()))
    elif not framed and http_version == "1.1":
        raw_headers.append((b"transfer-encoding", b"chunked"))
    if raw_path is None:
        raw_path = path.encode("utf-8")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": http_version,
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": raw_headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    calls = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls <= len(chunks):
            more = calls < len(chunks) or disconnect_after_chunks
            return {"type": "http.request", "body": chunks[calls - 1], "more_body": more}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(dict(message))

    await asgi(scope, receive, send)
    return Answer(messages, calls)


def assert_answered(answer: Answer) -> None:
    """One complete JSON response (or the Prometheus text of a GET /metrics), its length right, never a
    traceback."""
    assert [m["type"] for m in answer.messages] == ["http.response.start", "http.response.body"], answer
    assert not answer.messages[1].get("more_body", False)
    assert int(answer.headers["content-length"]) == len(answer.body)
    assert b"Traceback" not in answer.body and b'File "' not in answer.body
    if answer.headers["content-type"] == geste.Metrics.CONTENT_TYPE:
        assert answer.status == 200 and answer.body.startswith(b"# HELP geste_"), answer
        return
    assert answer.headers["content-type"] == "application/json"
    assert answer.body.isascii()
    answer.json()


def assert_refused(answer: Answer, status: int | None = None, error_type: str | None = None) -> None:
    """A clean 4xx: the JSON error body, with its type and message, and nothing else."""
    assert_answered(answer)
    assert 400 <= answer.status < 500, answer
    if status is not None:
        assert answer.status == status, answer
    body = answer.json()
    assert set(body) == {"error"}, answer
    assert set(body["error"]) == {"type", "message"}, answer
    assert isinstance(body["error"]["type"], str) and body["error"]["type"], answer
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], answer
    if error_type is not None:
        assert body["error"]["type"] == error_type, answer


# -- the database, row by row -------------------------------------------------------------------------
class Snapshots:
    """Every row of every geste table, to compare before and after a request.

    ``geste_workers`` is compared by its worker ids only: the heartbeat updates its rows all the time.
    ``geste_chores`` is left out: the worker's chores take their rounds in it whenever they are due.
    """

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self._pg: Any = None

    async def take(self) -> dict[str, list[tuple[Any, ...]]]:
        if self.db_url.startswith("sqlite:///"):
            return self._sqlite()
        return await self._postgres()

    def _sqlite(self) -> dict[str, list[tuple[Any, ...]]]:
        path = self.db_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            names = [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'geste%'"
                )
            ]
            return {
                name: self._rows(name, conn.execute(f'SELECT * FROM "{name}"').fetchall()) for name in names
            }

    async def _postgres(self) -> dict[str, list[tuple[Any, ...]]]:
        import asyncpg

        if self._pg is None:
            self._pg = await asyncpg.connect(POSTGRES_URL)
        schema = parse_qs(urlsplit(self.db_url).query)["schema"][0]
        names = [
            row["table_name"]
            for row in await self._pg.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
            )
        ]
        found = {}
        for name in names:
            rows = await self._pg.fetch(f'SELECT * FROM "{schema}"."{name}"')
            found[name] = self._rows(name, [tuple(row.values()) for row in rows])
        return found

    @staticmethod
    def _rows(name: str, rows: list[Any]) -> list[tuple[Any, ...]]:
        if name == "geste_workers":
            rows = [(row[0],) for row in rows]
        elif name == "geste_chores":
            rows = []
        return sorted((tuple(row) for row in rows), key=repr)

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()
            self._pg = None


# -- the App ------------------------------------------------------------------------------------------
def build(db_url: str, **options: Any) -> geste.App:
    """An App with a workflow waiting for an event, one that adds, and one that echoes its input."""
    options.setdefault("poll_interval", 0.05)
    options.setdefault("lock_timeout", 2.0)
    options.setdefault("shutdown_grace", 2.0)
    app = geste.App(db_url, **options)

    @app.workflow
    async def payment(ctx: geste.WorkflowContext, order_id: str) -> dict[str, Any]:
        await ctx.set_state("stage", "awaiting payment")  # what GET /instances/{id}/state/{key} reads
        event = await ctx.wait_event("payment.confirmed", match={"order_id": order_id}, timeout=3600)
        return {"data": event.data, "event_id": event.event_id}

    @app.workflow
    async def add(ctx: geste.WorkflowContext, a: int, b: int = 0) -> int:
        return a + b

    @app.workflow
    async def echo(ctx: geste.WorkflowContext, value: Any) -> Any:
        return value

    return app


async def start_waiting(app: geste.App) -> None:
    """Instance ``A-1`` of ``payment``, waiting for its event: what the fuzzed requests must not touch."""
    await app.start_workflow("payment", "A-1", instance_id="A-1")

    async def waiting() -> bool:
        info = await app.get_instance("A-1")
        return info.status == geste.Status.WAITING and info.locked_by is None

    await wait_until(waiting, "A-1 to wait for its event")


async def still_serving(asgi: GesteASGI, *, auth: Headers = ()) -> None:
    """The application still works: a valid event completes ``A-1``, and a workflow started over HTTP
    runs to completion through the worker."""
    headers = [(k, "evt-final" if k == "ce-id" else v) for k, v in BINARY_HEADERS]
    answer = await call(asgi, headers=[*headers, *auth], body=json.dumps(ORDER).encode())
    assert answer.status == 202, answer
    assert answer.json() == {"event_id": "evt-final", "duplicate": False}
    answer = await call(asgi, "GET", "/instances/A-1/result", query=b"wait=20", headers=auth)
    assert answer.status == 200, answer
    assert answer.json()["result"] == {"data": ORDER, "event_id": "evt-final"}

    answer = await call(
        asgi,
        "POST",
        "/workflows/add",
        headers=[("content-type", "application/json"), *auth],
        body=b'{"args": [2, 3]}',
    )
    assert answer.status == 201, answer
    instance_id = answer.json()["instance_id"]
    answer = await call(asgi, "GET", f"/instances/{instance_id}/result", query=b"wait=20", headers=auth)
    assert (answer.status, answer.json().get("result")) == (200, 5), answer


class Served:
    """An App (``build``) with ``A-1`` waiting, its ASGI application and a snapshot of its database,
    driven from synchronous code (a hypothesis test) through an ``asyncio.Runner``."""

    def __init__(self, runner: asyncio.Runner, db_url: str, app: geste.App, asgi: GesteASGI) -> None:
        self.runner = runner
        self.app = app
        self.asgi = asgi
        self.snapshots = Snapshots(db_url)
        self.before: dict[str, list[tuple[Any, ...]]] = {}

    def request(self, method: str = "POST", path: str = "/events", **options: Any) -> Answer:
        return self.runner.run(call(self.asgi, method, path, **options))

    def assert_unchanged(self, answer: Answer) -> None:
        after = self.runner.run(self.snapshots.take())
        assert after == self.before, f"{answer} changed the database"


@contextlib.contextmanager
def served(db_url: str, **asgi_options: Any) -> Iterator[Served]:
    """Serve ``build(db_url)``; on the way out (the test passed), prove the application still serves."""
    asgi_options.setdefault("max_body_bytes", MAX_BODY)
    with asyncio.Runner() as runner:
        app = build(db_url)
        runner.run(app.open())
        serving = Served(runner, db_url, app, app.asgi(**asgi_options))
        try:
            runner.run(start_waiting(app))
            serving.before = runner.run(serving.snapshots.take())
            yield serving
            runner.run(still_serving(serving.asgi))
        finally:
            runner.run(serving.snapshots.close())
            runner.run(app.close())


@pytest.fixture(autouse=True)
def _no_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GESTE_HTTP_TOKEN", raising=False)


def routes(asgi: GesteASGI) -> list[tuple[str, tuple[str, ...]]]:
    """Every route of the JSON API in the application's routing table: (method, pattern segments).

    The web viewer's HTML pages under /ui answer browsers with HTML, and are fuzzed, authorized and
    checked for escaping in tests/test_viewer.py."""
    return [(method, pattern) for method, pattern, _ in asgi._router._routes if pattern[:1] != ("ui",)]


# -- strategies ---------------------------------------------------------------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
FORBIDDEN = [
    *("\x00", "\x01", "\t", "\n", "\x1b", "\x7f", "\x85", "\x9f"),  # control characters
    *("\ud800", "\udfff"),  # lone surrogates
    *("\ufdd0", "\ufdef", "\ufffe", "\uffff", "\U0001fffe", "\U0010ffff"),  # non-characters
]
safe_text = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]), max_size=10)
bad_strings = st.builds(lambda a, c, b: a + c + b, safe_text, st.sampled_from(FORBIDDEN), safe_text)
non_strings = st.one_of(
    st.integers(),
    st.floats(),
    st.booleans(),
    st.lists(json_values, max_size=3),
    st.dictionaries(st.text(max_size=5), json_values, max_size=3),
)
bad_attribute_values = st.one_of(non_strings, st.just(""), bad_strings)
"""Never a valid value of a known attribute (id, source, type, subject, time, ...)."""
extension_names = st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True).filter(
    lambda name: name not in (*KNOWN_ATTRIBUTES, "data", "gesteinstance")
)
extensions = st.dictionaries(
    extension_names,
    st.one_of(safe_text, st.booleans(), st.integers(-(2**31), 2**31 - 1)),
    max_size=3,
)
"""Valid extensions, added to the events below for variety: they never make a bad event good."""
BAD_TIMES = [
    *("2024-13-01T00:00:00Z", "2024-02-30T12:00:00Z", "2024-05-01 12:00:00Z", "2024-05-01T12:00:00"),
    *("2024-05-01T25:00:00Z", "2024-05-01T12:00:00+24:00", "yesterday", "1714564800", "2024-05-01"),
]
URI_REFERENCE = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+")


def _base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _json(raw: bytes) -> bool:
    """Whether ``raw`` is strict JSON in UTF-8 (no NaN or Infinity)."""

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        json.loads(raw.decode("utf-8"), parse_constant=refuse)
    except (ValueError, RecursionError):
        return False
    return True


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def event(extras: dict[str, Any], **changes: Any) -> Any:
    """The valid event with ``extras`` and ``changes`` (``...`` removes an attribute)."""
    document = {**VALID_EVENT, **extras, **changes}
    return {name: value for name, value in document.items() if value is not ...}


malformed_structured_events = st.one_of(
    # a required attribute missing, or null (the same in JSON)
    st.builds(
        lambda e, name, null: event(e, **{name: None if null else ...}),
        extensions,
        st.sampled_from(["specversion", "id", "source", "type"]),
        st.booleans(),
    ),
    # a known attribute of another type, empty, or holding a control character, surrogate, non-character
    st.builds(
        lambda e, name, value: event(e, **{name: value}),
        extensions,
        st.sampled_from(KNOWN_ATTRIBUTES),
        bad_attribute_values,
    ),
    st.builds(
        lambda e, v: event(e, specversion=v), extensions, st.text(max_size=6).filter(lambda v: v != "1.0")
    ),
    # huge: an id or a type longer than geste takes (the body under the limit)
    st.builds(
        lambda e, name, size: event(e, **{name: "x" * size}),
        extensions,
        st.sampled_from(["id", "type"]),
        st.integers(201, 6000),
    ),
    # an attribute name that is not lower-case ASCII letters and digits
    st.builds(
        lambda e, name, value: event(e, **{name: value}),
        extensions,
        st.text(max_size=10).filter(
            lambda name: not re.fullmatch(r"[a-z0-9]+", name) and name not in ("data", "data_base64")
        ),
        json_values,
    ),
    # an extension that is not a string, a boolean or a 32-bit integer
    st.builds(
        lambda e, name, value: event(e, **{name: value}),
        extensions,
        extension_names,
        st.one_of(
            st.floats(),
            st.lists(json_values, max_size=3),
            st.dictionaries(st.text(max_size=5), json_values, max_size=3),
            st.integers().filter(lambda i: not -(2**31) <= i < 2**31),
            bad_strings,
        ),
    ),
    # data_base64 not a string, not base64, or given with data
    st.builds(
        lambda e, value: event(e, data=..., data_base64=value),
        extensions,
        st.one_of(non_strings, st.text(min_size=1, max_size=20).filter(lambda t: not _base64(t))),
    ),
    st.builds(lambda e, raw: event(e, data_base64=base64.b64encode(raw).decode()), extensions, st.binary()),
    # data_base64 whose bytes are not what datacontenttype says they are
    st.builds(
        lambda e, raw, kind: event(
            e, data=..., data_base64=base64.b64encode(raw).decode(), datacontenttype=kind
        ),
        extensions,
        st.binary(min_size=1, max_size=40).filter(lambda raw: not _json(raw)),
        st.sampled_from(["application/json", "text/json", "application/vnd.x+json; charset=utf-8"]),
    ),
    st.builds(
        lambda e, raw: event(
            e, data=..., data_base64=base64.b64encode(raw).decode(), datacontenttype="text/plain"
        ),
        extensions,
        st.binary(min_size=1, max_size=40).filter(lambda raw: not _utf8(raw)),
    ),
    # datacontenttype that is not a media type
    st.builds(
        lambda e, value: event(e, datacontenttype=value),
        extensions,
        st.text(max_size=20).filter(lambda t: parse_media_type(t) is None),
    ),
    # time, dataschema and source outside their formats
    st.builds(
        lambda e, value: event(e, time=value),
        extensions,
        st.one_of(st.sampled_from(BAD_TIMES), st.text(max_size=25).filter(lambda t: not _is_timestamp(t))),
    ),
    st.builds(
        lambda e, value: event(e, dataschema=value),
        extensions,
        st.sampled_from(["schema.json", "/schema", "#frag", "//host/x", "http://a b", "1http://x", "é:x"]),
    ),
    st.builds(
        lambda e, value: event(e, source=value),
        extensions,
        st.text(min_size=1, max_size=12).filter(lambda t: not URI_REFERENCE.fullmatch(t)),
    ),
    # gesteinstance naming no instance (404), or not a string
    st.builds(
        lambda e, value: event(e, gesteinstance=value),
        extensions,
        st.one_of(safe_text.filter(lambda t: t != "A-1"), st.integers(), st.booleans()),
    ),
    # not an object at all
    json_values.filter(lambda value: not isinstance(value, dict)),
)
STRUCTURED_TYPES = [STRUCTURED, f"{STRUCTURED}; charset=utf-8", "Application/CloudEvents+JSON; Charset=UTF-8"]
chunk_sizes = st.one_of(st.none(), st.integers(1, 512))
"""None: the body in one message with its Content-Length; else streamed in chunks of that size."""


def delivered(body: bytes, chunk: int | None) -> dict[str, Any]:
    if chunk is None:
        return {"body": body}
    return {"chunks": [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]}


# -- fuzzed malformed CloudEvents ----------------------------------------------------------------------
def test_fuzzed_malformed_structured_events_get_a_4xx_and_change_nothing(db_url: str) -> None:
    with served(db_url) as serving:

        @settings(FUZZ, max_examples=80)
        @given(
            document=malformed_structured_events,
            ascii_only=st.booleans(),
            content_type=st.sampled_from(STRUCTURED_TYPES),
            chunk=chunk_sizes,
        )
        def check(document: Any, ascii_only: bool, content_type: str, chunk: int | None) -> None:
            body = json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
            answer = serving.request(headers=[("content-type", content_type)], **delivered(body, chunk))
            assert_refused(answer)
            serving.assert_unchanged(answer)

        check()


garbage_content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            *STRUCTURED_TYPES,
            *("application/json", "text/plain", "application/octet-stream", "text/xml", ""),
            *("application/cloudevents-batch+json", "application/cloudevents+xml", "json"),
            *("multipart/form-data; boundary=x", "application/x-www-form-urlencoded"),
        ]
    ),
    st.text(st.characters(max_codepoint=255), max_size=30),
)
garbage_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    json_values.map(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-16")),
    st.text(max_size=60).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from(["\x00", "{", '"', "}", "[", "]", ":", ",", "a", "\\u0000"]), max_size=40).map(
        lambda parts: "".join(parts).encode()
    ),
)


def test_fuzzed_garbage_bodies_without_ce_headers_get_a_4xx_and_change_nothing(db_url: str) -> None:
    with served(db_url) as serving:

        @settings(FUZZ, max_examples=60)
        @given(
            content_type=st.one_of(st.sampled_from(STRUCTURED_TYPES), garbage_content_types),
            body=garbage_bodies,
            chunk=chunk_sizes,
        )
        def check(content_type: str | None, body: bytes, chunk: int | None) -> None:
            headers = [] if content_type is None else [("content-type", content_type)]
            answer = serving.request(headers=headers, **delivered(body, chunk))
            assert_refused(answer)
            serving.assert_unchanged(answer)

        check()


REQUIRED_HEADERS = ["ce-specversion", "ce-id", "ce-source", "ce-type"]
BAD_PERCENT = [
    *("%ff", "%C3", "%e2%82", "%C3%28", "%ED%A0%80", "%F4%90%80%80", "%c0%af"),  # not UTF-8
    *("%00", "%0A", "%1b", "%7F", "%C2%85", "%EF%B7%90", "%EF%BF%BE", "%F0%9F%BF%BF"),  # forbidden
]
ascii_safe = st.text(string.ascii_letters + string.digits + "-._~/", max_size=5)
bad_header_values = st.one_of(
    st.binary(min_size=1, max_size=12).filter(lambda raw: not raw.isascii()),
    st.builds(
        lambda a, bad, b: f"{a}{bad}{b}".encode(), ascii_safe, st.sampled_from(BAD_PERCENT), ascii_safe
    ),
    st.builds(
        lambda a, bad, b: a.encode() + bad + b.encode(),
        ascii_safe,
        st.sampled_from([b"\x00", b"\x01", b"\x1f", b"\x7f", b"\n", b"\r"]),
        ascii_safe,
    ),
)
"""Never a valid value of any ce-* header: raw non-ASCII bytes, percent-encoded bytes that are not UTF-8
or decode to a forbidden character, raw control characters."""


def binary_event(
    extras: dict[str, Any], *, drop: Sequence[str] = (), add: Headers = (), body: bytes | None = None
) -> tuple[list[tuple[str | bytes, str | bytes]], bytes]:
    """The valid binary-mode event with ``extras`` as ce-* headers (percent-encoded), without the headers
    named in ``drop``, replaced by or extended with ``add``; and its body."""
    replaced = {_bytes(name) for name, _ in add if _bytes(name) in {_bytes(n) for n, _ in BINARY_HEADERS}}
    headers: list[tuple[str | bytes, str | bytes]] = [
        (name, value) for name, value in BINARY_HEADERS if name not in drop and _bytes(name) not in replaced
    ]
    for name, value in extras.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        headers.append((f"ce-{name}", quote(text, safe="")))
    headers += list(add)
    return headers, json.dumps(ORDER).encode() if body is None else body


def twice(
    extras: dict[str, Any], name: str, value: str
) -> tuple[list[tuple[str | bytes, str | bytes]], bytes]:
    """The valid binary-mode event with the header ``name`` given twice."""
    headers, body = binary_event(extras)
    if not any(header == name for header, _ in headers):
        headers.append((name, value))
    headers.append((name, value))
    return headers, body


malformed_binary_events = st.one_of(
    st.builds(lambda e, name: binary_event(e, drop=[name]), extensions, st.sampled_from(REQUIRED_HEADERS)),
    st.builds(
        lambda e, value: binary_event(e, add=[("ce-specversion", value)]),
        extensions,
        st.one_of(
            st.sampled_from(["", "1", "1.1", "0.3", "2.0", "1.0.0", "v1.0", "1.0%00", '"1.0', "1,0", "%31"]),
            st.text("0123456789.", max_size=5).filter(lambda v: v != "1.0"),
        ),
    ),
    # a header twice, or ce-datacontenttype (binary mode has Content-Type)
    st.builds(
        twice,
        extensions,
        st.sampled_from([*REQUIRED_HEADERS, "ce-subject"]),
        ascii_safe.filter(bool),
    ),
    st.builds(
        lambda e, value: binary_event(e, add=[("ce-datacontenttype", value)]),
        extensions,
        st.sampled_from(["application/json", "text/plain", ""]),
    ),
    # a ce-* header whose name is not lower-case ASCII letters and digits
    st.builds(
        lambda e, name, value: binary_event(e, add=[(b"ce-" + name.encode("latin-1"), value)]),
        extensions,
        st.text(st.characters(max_codepoint=255), max_size=10).filter(
            lambda name: not re.fullmatch(rb"[a-z0-9]+", name.encode("latin-1").lower())  # as servers do
        ),
        ascii_safe,
    ),
    # a ce-* header with a value no attribute may have
    st.builds(
        lambda e, name, value: binary_event(e, add=[(name, value)]),
        extensions,
        st.sampled_from([*REQUIRED_HEADERS, "ce-subject", "ce-time", "ce-dataschema", "ce-comexample"]),
        bad_header_values,
    ),
    st.builds(
        lambda e, name, value: binary_event(e, add=[(name, value)]),
        extensions,
        st.sampled_from(["ce-id", "ce-source", "ce-type", "ce-subject", "ce-dataschema"]),
        st.sampled_from(["", '""', " ", "\t"]),
    ),
    st.builds(
        lambda e, value: binary_event(e, add=[("ce-time", quote(value, safe=""))]),
        extensions,
        st.one_of(st.sampled_from(BAD_TIMES), safe_text.filter(lambda t: not _is_timestamp(t))),
    ),
    st.builds(
        lambda e, value: binary_event(e, add=[("ce-source", quote(value, safe=""))]),
        extensions,
        safe_text.filter(lambda t: not URI_REFERENCE.fullmatch(t)),
    ),
    st.builds(
        lambda e, value: binary_event(e, add=[("ce-dataschema", quote(value, safe=""))]),
        extensions,
        st.sampled_from(["schema.json", "/schema", "#frag", "http://a b"]),
    ),
    st.builds(
        lambda e, value: binary_event(e, add=[("ce-gesteinstance", quote(value, safe=""))]),
        extensions,
        safe_text.filter(lambda t: t != "A-1"),
    ),
    # content types: malformed, a JSON type not in UTF-8, a charset that is no text encoding or unknown,
    # the batched mode or another event format (none is no error: tests/test_http.py, "untyped")
    st.builds(
        lambda e, value: binary_event(e, add=[("content-type", value.encode("latin-1"))]),
        extensions,
        st.one_of(
            st.text(st.characters(max_codepoint=255), max_size=20).filter(
                lambda t: parse_media_type(t) is None
            ),
            st.sampled_from(
                [
                    *(
                        "application/json; charset=latin-1",
                        "application/json; charset=utf-16",
                        "text/json; charset=ascii",
                    ),
                    *("text/plain; charset=nope", "text/plain; charset=base64", "text/plain; charset=rot13"),
                    *("text/plain; charset=hex", "text/csv; charset=zlib", "text/plain; charset=bz2"),
                    *(
                        "text/plain; charset=uu",
                        "text/plain; charset=quopri",
                        "text/plain; charset=x-unknown",
                    ),
                    *("application/cloudevents-batch+json", "application/cloudevents+xml"),
                ]
            ),
        ),
    ),
    # bodies that are not what their content type says
    st.builds(
        lambda e, raw: binary_event(e, body=raw),
        extensions,
        st.one_of(
            st.binary(min_size=1, max_size=60).filter(lambda raw: not _json(raw)),
            st.sampled_from(
                [
                    *(b"NaN", b"[Infinity]", b"-Infinity", b"\xef\xbb\xbf{}", '"é"'.encode("latin-1")),
                    *("{}".encode("utf-16"), b"1e400", b"[1e999]", b"\x00"),
                ]
            ),
        ),
    ),
    st.builds(
        lambda e, kind, raw: binary_event(e, add=[("content-type", kind)], body=raw),
        extensions,
        st.sampled_from(["text/plain", "text/plain; charset=utf-8", "text/markdown; charset=UTF8"]),
        st.binary(min_size=1, max_size=60).filter(lambda raw: not _utf8(raw)),
    ),
    st.builds(
        lambda e, raw: binary_event(e, add=[("content-type", "text/csv; charset=ascii")], body=raw),
        extensions,
        st.binary(min_size=1, max_size=60).filter(lambda raw: not raw.isascii()),
    ),
    # codecs that raise UnicodeError rather than UnicodeDecodeError
    st.builds(
        lambda e, kind_and_raw: binary_event(
            e, add=[("content-type", kind_and_raw[0])], body=kind_and_raw[1]
        ),
        extensions,
        st.sampled_from(
            [
                *(("text/plain; charset=idna", b"xn--"), ("text/plain; charset=idna", b"-\xff-")),
                *(("text/plain; charset=punycode", b"\\"), ("text/plain; charset=punycode", b"\xff")),
                ("text/plain; charset=undefined", b"x"),
            ]
        ),
    ),
)


def test_fuzzed_malformed_binary_mode_events_get_a_4xx_and_change_nothing(db_url: str) -> None:
    with served(db_url) as serving:

        @settings(FUZZ, max_examples=100)
        @given(request=malformed_binary_events, chunk=chunk_sizes)
        def check(request: tuple[Headers, bytes], chunk: int | None) -> None:
            headers, body = request
            answer = serving.request(headers=headers, **delivered(body, chunk))
            assert_refused(answer)
            serving.assert_unchanged(answer)

        check()


def nested(depth: int, kind: str) -> str:
    """JSON nesting ``depth`` arrays or objects (``kind`` "[" or "{") around a 1."""
    if kind == "[":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def deep_request(placement: str, value: str) -> dict[str, Any]:
    """A POST carrying the JSON text ``value`` as an event's data or as a workflow's argument."""
    if placement == "structured":
        body = json.dumps(event({}, data="DATA")).replace('"DATA"', value)
        return {"path": "/events", "headers": [("content-type", STRUCTURED)], "body": body.encode()}
    if placement == "binary":
        return {"path": "/events", "headers": BINARY_HEADERS, "body": value.encode()}
    if placement == "base64":
        encoded = base64.b64encode(value.encode()).decode()
        document = event({}, data=..., datacontenttype="application/json", data_base64=encoded)
        return {
            "path": "/events",
            "headers": [("content-type", STRUCTURED)],
            "body": json.dumps(document).encode(),
        }
    body = '{"args": [VALUE]}'.replace("VALUE", value)
    return {
        "path": "/workflows/echo",
        "headers": [("content-type", "application/json")],
        "body": body.encode(),
    }


def test_fuzzed_deeply_nested_json_gets_a_4xx_and_changes_nothing(db_url: str) -> None:
    """Nested deeper than geste stores (128 levels), up to far beyond what ``json`` can parse."""
    with served(db_url, max_body_bytes=1_000_000) as serving:

        @settings(FUZZ, max_examples=25)
        @given(
            depth=st.one_of(st.integers(129, 1200), st.integers(1200, 60_000)),
            kind=st.sampled_from(["[", "{"]),
            placement=st.sampled_from(["structured", "binary", "base64", "start"]),
        )
        def check(depth: int, kind: str, placement: str) -> None:
            answer = serving.request("POST", **deep_request(placement, nested(depth, kind)))
            assert_refused(answer, 400)
            serving.assert_unchanged(answer)

        check()


# -- any request to any route --------------------------------------------------------------------------
methods = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT"]),
    st.text(string.ascii_uppercase, min_size=1, max_size=8),
)
path_text = st.text(max_size=12).map(lambda text: text.encode("utf-8", "surrogatepass"))
origins = st.one_of(
    st.sampled_from(
        [
            *(
                "http://127.0.0.1:8000",
                "http://evil.example",
                "null",
                "http://[::1",
                "http://[",
                "https://[zz]",
            ),
            *("http://127.0.0.1:8000:1", "%", "", "http://\xbd", "file://", "http://user@127.0.0.1:8000"),
        ]
    ),
    st.text(st.characters(max_codepoint=255), max_size=20),
)
hosts = st.one_of(
    st.sampled_from(["127.0.0.1:8000", "localhost", "[::1]:8000", "evil.example", "", "[", "1.2.3.4:x"]),
    st.text(st.characters(max_codepoint=255), max_size=20),
)
odd_headers = st.lists(
    st.one_of(
        st.tuples(st.just("origin"), origins),
        st.tuples(st.just("host"), hosts),
        st.tuples(st.just("sec-fetch-site"), st.sampled_from(["cross-site", "same-origin", "none", ""])),
        st.tuples(st.just("authorization"), st.text(st.characters(max_codepoint=255), max_size=20)),
        st.tuples(
            st.just("content-length"), st.sampled_from(["0", "", "-1", "abc", "²", "9" * 5000, "1, 1"])
        ),
        st.tuples(st.just("content-type"), st.text(st.characters(max_codepoint=255), max_size=20)),
    ),
    max_size=3,
).map(lambda pairs: [(name, value.encode("latin-1")) for name, value in pairs])


def segments_to_path(segments: Sequence[bytes]) -> bytes:
    return b"/" + b"/".join(quote(segment, safe="").encode() for segment in segments)


def test_fuzzed_requests_to_every_route_are_answered_without_a_500_and_change_nothing(db_url: str) -> None:
    """Any method, any path (the routes' patterns with random values, or random bytes), any query,
    odd Origin/Host/Authorization/Content-Length headers: a JSON answer, 2xx or 4xx, and no write."""
    with served(db_url) as serving:
        table = routes(serving.asgi)
        registered = set(serving.app.workflows)

        def filled(pattern: tuple[str, ...], values: list[bytes]) -> bytes:
            it = iter(values)
            parts = [next(it) if part.startswith("{") else part.encode() for part in pattern]
            return segments_to_path(parts)

        requests = st.one_of(
            st.builds(
                lambda route, values: (route[0], filled(route[1], values)),
                st.sampled_from(table),
                st.lists(path_text, min_size=3, max_size=3),
            ),
            st.tuples(methods, st.binary(max_size=30).map(lambda raw: b"/" + raw)),
            st.tuples(
                methods,
                st.lists(
                    st.sampled_from(
                        [b"instances", b"events", b"workflows", b"health", b"%00", b"%ff", b"", b".."]
                    ),
                    max_size=4,
                ).map(lambda parts: b"/" + b"/".join(parts)),
            ),
        )
        queries = st.one_of(
            st.binary(max_size=40),
            st.lists(
                st.tuples(
                    st.sampled_from(["wait", "limit", "offset", "status", "workflow", "x", ""]),
                    st.one_of(
                        st.sampled_from(["1", "-1", "nan", "1e999", "%00", "%ff", "waiting"]),
                        st.text(max_size=6),
                    ),
                ),
                max_size=4,
            ).map(lambda pairs: "&".join(f"{quote(n)}={quote(v, safe='%')}" for n, v in pairs).encode()),
        )

        @settings(FUZZ, max_examples=120)
        @given(request=requests, query=queries, headers=odd_headers)
        def check(request: tuple[str, bytes], query: bytes, headers: list[tuple[str, bytes]]) -> None:
            method, raw_path = request
            decoded = unquote(raw_path.decode("latin-1"), errors="replace")
            # A start of a registered workflow or anything done to A-1 could rightly write.
            assume(not any(f"/workflows/{name}" == decoded.rstrip("/") for name in registered))
            assume("A-1" not in decoded)
            answer = serving.request(method, raw_path=raw_path, query=query, headers=headers)
            assert_answered(answer)
            assert answer.status in (200, 202) or 400 <= answer.status < 500, answer
            if answer.status >= 400:
                assert_refused(answer)
            serving.assert_unchanged(answer)

        check()


# -- the body limit -----------------------------------------------------------------------------------
def test_fuzzed_bodies_over_the_limit_get_413_and_are_not_read_beyond_it(db_url: str) -> None:
    """A truthful Content-Length over the limit: not one chunk read. Chunked, streamed over HTTP/2 (no
    length at all), or under a Content-Length that lies: read up to the chunk that crosses the limit,
    not one more. Over HTTP/1.1 the answer says ``Connection: close``, so the server stops reading too."""
    with served(db_url) as serving:

        @settings(FUZZ, max_examples=40)
        @given(
            size=st.integers(MAX_BODY + 1, 4 * MAX_BODY),
            how=st.sampled_from(["content-length", "chunked", "http/2", "lying-length"]),
            chunk=st.integers(1, 3000),
            target=st.sampled_from(["binary", "structured", "start"]),
        )
        def check(size: int, how: str, chunk: int, target: str) -> None:
            body = b"x" * size
            path, headers = {
                "binary": ("/events", list(BINARY_HEADERS)),
                "structured": ("/events", [("content-type", STRUCTURED)]),
                "start": ("/workflows/add", [("content-type", "application/json")]),
            }[target]
            version = "2" if how == "http/2" else "1.1"
            if how == "content-length":
                answer = serving.request("POST", path, headers=headers, body=body)
                expected_reads = 0
            else:
                if how == "lying-length":
                    headers.append(("content-length", str(min(size // 2, MAX_BODY))))
                chunks = [body[i : i + chunk] for i in range(0, size, chunk)]
                expected_reads = MAX_BODY // chunk + 1  # the chunk that crosses the limit is the last read
                answer = serving.request("POST", path, headers=headers, chunks=chunks, http_version=version)
            assert_refused(answer, 413, "PayloadTooLarge")
            assert answer.receive_calls == expected_reads, (answer.receive_calls, expected_reads)
            assert answer.headers.get("connection") == (None if version == "2" else "close")
            serving.assert_unchanged(answer)

        check()


async def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_refused(db_url: str) -> None:
    app = build(db_url)
    async with app:
        asgi = app.asgi(max_body_bytes=MAX_BODY)
        data = json.dumps({"pad": "x" * (MAX_BODY - 11)}).encode()
        assert len(data) == MAX_BODY
        answer = await call(asgi, headers=BINARY_HEADERS, chunks=[data[:5000], data[5000:]])
        assert answer.status == 202, answer
        assert "connection" not in answer.headers  # read to its end: the connection can serve another
        answer = await call(asgi, headers=BINARY_HEADERS, chunks=[data[:5000], data[5000:], b" "])
        assert_refused(answer, 413, "PayloadTooLarge")
        assert answer.receive_calls == 3
        assert answer.headers["connection"] == "close"


async def test_under_uvicorn_a_body_over_the_limit_is_refused_and_the_connection_closed(db_url: str) -> None:
    """The server stops reading: after the 413 it closes the connection rather than read (and drop) the
    rest of a declared terabyte, or of a chunked body that never ends."""
    import uvicorn

    from geste.http._serve import _Server, bind

    app = build(db_url)
    async with app:
        snapshots = Snapshots(db_url)
        before = await snapshots.take()
        sock = bind("127.0.0.1", 0)
        config = uvicorn.Config(
            app.asgi(max_body_bytes=MAX_BODY), lifespan="off", log_config=None, ws="none", access_log=False
        )
        server = _Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await wait_until(lambda: server.started, "uvicorn to start")
            port = sock.getsockname()[1]
            head = (
                b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/cloudevents+json\r\n"
            )

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + b"Content-Length: 1000000000000\r\n\r\n")  # and not one byte of it
            status, headers, body = await read_response(reader)
            assert (status, json.loads(body)["error"]["type"]) == (413, "PayloadTooLarge")
            assert headers["connection"] == "close"
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
            writer.close()

            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
            for _ in range(MAX_BODY // 1000 + 1):  # just over the limit, and no last chunk ever
                writer.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
            await writer.drain()
            status, headers, body = await read_response(reader)
            assert (status, headers["connection"]) == (413, "close")
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            assert await snapshots.take() == before
        finally:
            server.should_exit = True
            await serving
            await snapshots.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: its status, headers and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = dict(line.lower().split(": ", 1) for line in lines)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return int(status_line.split()[1]), headers, body


# -- the token ----------------------------------------------------------------------------------------
BAD_CREDENTIALS: list[list[tuple[str, str | bytes]]] = [
    [],
    [("authorization", "Bearer wrong")],
    [("authorization", f"Bearer {TOKEN}x")],
    [("authorization", f"Bearer {TOKEN[:-1]}")],
    [("authorization", f"Bearer {TOKEN.upper()}")],
    [("authorization", f"Basic {TOKEN}")],
    [("authorization", TOKEN)],
    [("authorization", "Bearer")],
    [("authorization", "Bearer ")],
    [("authorization", f"Bearer\t{TOKEN}")],
    [("authorization", b"Bearer " + TOKEN.encode() + b"\xff")],
    [("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer wrong")],
    [("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")],
    [("x-token", TOKEN)],
    [("cookie", f"token={TOKEN}")],
]


def realistic(method: str, pattern: tuple[str, ...]) -> dict[str, Any]:
    """A request to this route that would do its work with the right token: A-1 as the id, a registered
    workflow as the name, a key A-1 set ("stage") as the state key, a valid event or valid arguments as
    the body."""
    values = {"id": "A-1", "name": "add", "key": "stage"}
    path = "/" + "/".join(values.get(part[1:-1], "A-1") if part.startswith("{") else part for part in pattern)
    if (method, pattern) == ("POST", ("events",)):
        headers = [(k, "evt-token" if k == "ce-id" else v) for k, v in BINARY_HEADERS]
        return {"path": path, "headers": headers, "body": json.dumps(ORDER).encode()}
    if (method, pattern) == ("POST", ("schedules", "{name}")):
        body = json.dumps({"workflow": "echo", "cron": "0 * * * *"}).encode()
        return {"path": path, "headers": [("content-type", "application/json")], "body": body}
    if method == "POST" and pattern[:1] == ("schedules",):  # pause, resume: no body
        return {"path": path}
    if method == "POST":
        return {"path": path, "headers": [("content-type", "application/json")], "body": b'{"args": [1, 2]}'}
    return {"path": path}


async def test_every_route_but_health_refuses_a_missing_or_wrong_token(db_url: str) -> None:
    """The routes come from the routing table: a new route is covered without changing this test."""
    app = build(db_url)
    async with app:
        asgi = app.asgi(token=TOKEN, max_body_bytes=MAX_BODY)
        await start_waiting(app)
        snapshots = Snapshots(db_url)
        before = await snapshots.take()
        table = routes(asgi)
        assert len(table) >= 8 and ("GET", ("health",)) in table
        opened = []
        for method, pattern in table:
            request = realistic(method, pattern)
            for credentials in BAD_CREDENTIALS:
                answer = await call(
                    asgi,
                    method,
                    request["path"],
                    headers=[*request.get("headers", []), *credentials],
                    body=request.get("body", b""),
                )
                if answer.status == 200 and pattern == ("health",):
                    opened.append((method, pattern))
                    continue
                assert_refused(answer, 401, "Unauthorized")
                assert answer.headers["www-authenticate"] == 'Bearer realm="geste"'
            # other methods and unknown paths beside it: 401 as well, before 404 or 405
            for other in ("PUT", "DELETE", "PATCH", "OPTIONS"):
                if pattern != ("health",):
                    assert_refused(await call(asgi, other, request["path"]), 401, "Unauthorized")
            assert_refused(await call(asgi, method, request["path"] + "/nope"), 401, "Unauthorized")
        assert set(opened) == {("GET", ("health",))}
        assert await snapshots.take() == before  # nothing was sent, started, cancelled

        good = [("authorization", f"Bearer {TOKEN}")]
        for method, pattern in table:  # the same requests with the token do their work
            request = realistic(method, pattern)
            answer = await call(
                asgi,
                method,
                request["path"],
                headers=[*request.get("headers", []), *good],
                body=request.get("body", b""),
            )
            # A-1 completed (the event above): its retry and resume are refused, past the token
            refused_past_the_token = answer.status == 409 and pattern[-1] in ("retry", "resume")
            assert answer.status in (200, 201, 202) or refused_past_the_token, (method, pattern, answer)
        await snapshots.close()


def test_the_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Through ``hmac.compare_digest``, for every request naming a Bearer token; never with ``==``."""
    import hmac

    from geste import _access

    assert "bearer_matches(" in inspect.getsource(GesteASGI._authorize)
    assert "hmac.compare_digest(" in inspect.getsource(_access.bearer_matches)
    assert not re.search(r"(==|!=)\s*self\._token|self\._token\s*(==|!=)", inspect.getsource(GesteASGI))
    assert _access.hmac is hmac

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    asgi = geste.App(f"sqlite:///{tmp_path / 'x.db'}").asgi(token=TOKEN)  # never opened: 503 once through

    async def go() -> list[int]:
        statuses = []
        for value in ["Bearer wrong", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}"]:
            answer = await call(asgi, "GET", "/instances", headers=[("authorization", value)])
            statuses.append(answer.status)
        return statuses

    assert asyncio.run(go()) == [401, 401, 503]
    assert compared == [
        (b"wrong", TOKEN.encode()),
        (TOKEN[:-1].encode(), TOKEN.encode()),
        (TOKEN.encode(),) * 2,
    ]


def test_geste_serve_listens_on_127_0_0_1_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The real ``bind`` of ``geste serve`` on port 0; the server itself replaced by a stand-in that notes
    the address and returns, so nothing keeps running."""
    from geste.http import _serve

    options = {param.name: param for param in main.commands["serve"].params}
    assert options["host"].default == "127.0.0.1"

    listened: list[tuple[str, int]] = []

    async def stand_in(app: geste.App, asgi: GesteASGI, sock: socket.socket) -> None:
        listened.append(sock.getsockname()[:2])
        sock.close()

    monkeypatch.setattr(_serve, "serve", stand_in)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    for extra, host in [([], "127.0.0.1"), (["--host", "127.0.0.2"], "127.0.0.2")]:
        result = CliRunner().invoke(main, ["serve", "--database-url", url, "--port", "0", *extra])
        assert result.exit_code == 0, result.output
        assert listened[-1][0] == host and listened[-1][1] > 0


# -- the ASGI protocol: nothing escapes to the server -------------------------------------------------
async def test_a_websocket_scope_is_closed_before_being_accepted(tmp_path: Any) -> None:
    asgi = geste.App(f"sqlite:///{tmp_path / 'x.db'}").asgi()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/events",
        "raw_path": b"/events",
        "headers": [HOST],
        "query_string": b"",
    }
    assert await asgi(scope, receive, send) is None
    assert [m["type"] for m in sent] == ["websocket.close"]


async def test_an_unknown_scope_type_gets_no_answer_and_no_exception(tmp_path: Any) -> None:
    asgi = geste.App(f"sqlite:///{tmp_path / 'x.db'}").asgi()

    async def receive() -> dict[str, Any]:
        raise AssertionError("nothing to receive")

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError(f"nothing to send: {message}")

    for scope_type in ("webtransport", "", "HTTP"):
        assert await asgi({"type": scope_type}, receive, send) is None


async def test_lifespan_messages_are_answered_and_unknown_ones_ignored(db_url: str) -> None:
    app = build(db_url)
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(app.asgi()({"type": "lifespan"}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await asyncio.wait_for(outbox.get(), 10))["type"] == "lifespan.startup.complete"
    await inbox.put({"type": "lifespan.something.new"})  # a later ASGI version's message: no answer
    await inbox.put({"type": "lifespan.shutdown"})
    assert (await asyncio.wait_for(outbox.get(), 10))["type"] == "lifespan.shutdown.complete"
    await asyncio.wait_for(task, 10)
    assert outbox.empty()


async def test_a_client_that_disconnects_mid_body_gets_no_answer_and_changes_nothing(db_url: str) -> None:
    app = build(db_url)
    async with app:
        asgi = app.asgi()
        await start_waiting(app)
        snapshots = Snapshots(db_url)
        before = await snapshots.take()
        body = json.dumps(ORDER).encode()
        for path, headers in [
            ("/events", BINARY_HEADERS),
            ("/workflows/add", [("content-type", "application/json")]),
        ]:
            answer = await call(
                asgi, "POST", path, headers=headers, chunks=[body[:5]], disconnect_after_chunks=True
            )
            assert answer.messages == [] and answer.receive_calls == 2
        assert await snapshots.take() == before
        await snapshots.close()
        await still_serving(asgi)


async def test_every_route_answers_a_wrong_method_with_405_and_unknown_paths_with_404(db_url: str) -> None:
    app = build(db_url)
    async with app:
        asgi = app.asgi()
        table = routes(asgi)
        for method, pattern in table:
            path = realistic(method, pattern)["path"]
            allowed = [m for m, p in table if p == pattern]
            for other in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW"):
                if other in allowed:
                    continue
                answer = await call(asgi, other, path)
                assert_refused(answer, 405, "MethodNotAllowed")
                assert answer.headers["allow"] == ", ".join(allowed)
            assert_refused(await call(asgi, method, path + "/x/y/z"), 404, "NotFound")
        for path in ["/", "//", "/nope", "/instances/", "/events/", "/%2e%2e/events", "/health/"]:
            assert_refused(await call(asgi, "GET", path), 404, "NotFound")


@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), KeyError("k"), RecursionError(), UnicodeError("u"), TimeoutError()]
)
async def test_an_unexpected_exception_on_any_route_is_a_generic_500_never_raised(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    app = build(db_url)
    async with app:
        asgi = app.asgi()

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise error

        monkeypatch.setattr(app.client, "send_event", broken)  # what POST /events calls
        for name in (
            "start_workflow",
            "get_instance",
            "list_instances",
            "history",
            "cancel",
            "retry",
            "resume",
            "list_schedules",
            "get_schedule",
            "create_schedule",
            "pause_schedule",
            "resume_schedule",
            "delete_schedule",
            "list_queues",
            "get_state",
            "wait_state",
            "list_state",
        ):
            monkeypatch.setattr(app, name, broken)
        monkeypatch.setattr(app.metrics, "exposition", broken)
        for method, pattern in routes(asgi):
            if pattern == ("health",):
                continue
            request = realistic(method, pattern)
            answer = await call(
                asgi,
                method,
                request["path"],
                headers=request.get("headers", []),
                body=request.get("body", b""),
            )
            assert_answered(answer)
            assert answer.status == 500, answer
            assert answer.json() == {
                "error": {"type": "InternalError", "message": "the server failed to handle the request"}
            }
        assert "failed" in caplog.text


# -- the bugs found here, one regression test each ----------------------------------------------------
async def test_a_content_length_that_int_cannot_read_is_a_400_or_a_413_not_a_500(db_url: str) -> None:
    """``str.isdigit`` takes "²" (int() does not), and int() refuses more than 4300 digits."""
    app = build(db_url)
    async with app:
        asgi = app.asgi()
        snapshots = Snapshots(db_url)
        before = await snapshots.take()
        for length in ["²", "1²", "¹0"]:
            answer = await call(
                asgi, headers=[("content-type", STRUCTURED), ("content-length", length)], body=b"{}"
            )
            assert_refused(answer, 400, "BadRequest")
        answer = await call(
            asgi, headers=[("content-type", STRUCTURED), ("content-length", "9" * 5000)], body=b"{}"
        )
        assert_refused(answer, 413, "PayloadTooLarge")
        assert answer.receive_calls == 0
        # leading zeros are still the length it says
        answer = await call(
            asgi, headers=[("content-type", STRUCTURED), ("content-length", "0" * 5000 + "2")], body=b"{}"
        )
        assert_refused(answer, 400, "InvalidCloudEvent")
        assert await snapshots.take() == before
        await snapshots.close()


@pytest.mark.parametrize("charset", ["base64", "rot13", "hex", "zlib", "bz2", "uu", "quopri"])
async def test_a_charset_that_is_not_a_text_encoding_is_refused_with_415_before_the_body_is_read(
    db_url: str, charset: str
) -> None:
    """``codecs.lookup`` finds them, and ``bytes.decode`` then raised LookupError: a 500."""
    app = build(db_url)
    async with app:
        asgi = app.asgi()
        snapshots = Snapshots(db_url)
        before = await snapshots.take()
        headers = [*BINARY_HEADERS[:4], ("content-type", f"text/plain; charset={charset}")]
        answer = await call(asgi, headers=headers, body=b"aGk=")
        assert_refused(answer, 415, "UnsupportedMediaType")
        assert answer.receive_calls == 0
        encoded = base64.b64encode(b"hi").decode()
        document = event({}, data=..., data_base64=encoded, datacontenttype=f"text/plain; charset={charset}")
        answer = await call(asgi, headers=[("content-type", STRUCTURED)], body=json.dumps(document).encode())
        assert_refused(answer, 400, "InvalidCloudEvent")
        assert await snapshots.take() == before
        await snapshots.close()


@pytest.mark.parametrize(("charset", "body"), [("idna", b"xn--"), ("punycode", b"\\"), ("undefined", b"x")])
async def test_a_codec_raising_unicode_error_is_a_400(db_url: str, charset: str, body: bytes) -> None:
    """Not every codec raises UnicodeDecodeError: idna, punycode and undefined raise UnicodeError."""
    app = build(db_url)
    async with app:
        headers = [*BINARY_HEADERS[:4], ("content-type", f"text/plain; charset={charset}")]
        assert_refused(await call(app.asgi(), headers=headers, body=body), 400, "InvalidCloudEvent")


@pytest.mark.parametrize("origin", ["http://[::1", "http://[", "https://[zz]:80", "http://[::1]x"])
async def test_an_origin_urlsplit_cannot_parse_is_refused_as_cross_site(db_url: str, origin: str) -> None:
    """``urlsplit`` raises ValueError on an unclosed IPv6 bracket: it was a 500."""
    app = build(db_url)
    async with app:
        answer = await call(app.asgi(), "GET", "/instances", headers=[("origin", origin)])
        assert_refused(answer, 403, "Forbidden")


async def test_a_nul_in_an_id_a_name_or_a_filter_is_a_400_on_both_backends(db_url: str) -> None:
    """PostgreSQL fails on a NUL in a parameter: it was answered as a 503 "database not available"."""
    app = build(db_url)
    async with app:
        asgi = app.asgi()
        await start_waiting(app)
        snapshots = Snapshots(db_url)
        before = await snapshots.take()
        for method, raw_path, query in [
            ("GET", b"/instances/%00", b""),
            ("GET", b"/instances/A-1%00", b""),
            ("GET", b"/instances/%00/history", b""),
            ("GET", b"/instances/%00/result", b"wait=1"),
            ("POST", b"/instances/A-1%00/cancel", b""),
            ("POST", b"/workflows/add%00", b""),
            ("GET", b"/instances", b"workflow=%00"),
            ("GET", b"/instances", b"status=waiting%00"),
            ("GET", b"/instances", b"%00=1"),
        ]:
            answer = await call(asgi, method, raw_path=raw_path, query=query)
            assert_refused(answer, 400, "BadRequest")
        assert await snapshots.take() == before
        await snapshots.close()


async def test_json_nested_deeper_than_128_levels_is_refused_and_128_taken(db_url: str) -> None:
    app = build(db_url)
    async with app:
        asgi = app.asgi()
        headers = [(k, "evt-deep" if k == "ce-id" else v) for k, v in BINARY_HEADERS]
        answer = await call(asgi, headers=headers, body=nested(129, "[").encode())
        assert_refused(answer, 400, "InvalidJSON")
        assert "128" in answer.json()["error"]["message"]
        answer = await call(asgi, headers=headers, body=nested(128, "{").encode())
        assert answer.status == 202, answer


def test_deep_values_already_stored_are_shown_not_a_500() -> None:
    """``dataclasses.asdict`` recursed two frames a level: a result 600 deep (a database written before
    values were limited) made ``GET /instances`` a 500 for every instance listed with it."""
    from datetime import UTC, datetime

    deep: Any = 1
    for _ in range(600):
        deep = [deep]
    now = datetime.now(UTC)
    info = geste.InstanceInfo(
        instance_id="deep",
        workflow_name="echo",
        status=geste.Status.COMPLETED,
        input={"args": [deep], "kwargs": {}},
        result=deep,
        error=None,
        created_at=now,
        updated_at=now,
        finished_at=now,
        locked_by=None,
        lock_expires_at=None,
        cancel_requested=False,
        steps=0,
    )
    entry = geste.HistoryEntry(
        seq=1, kind=geste.StepKind.ACTIVITY, name="x", payload=deep, is_error=False, created_at=now
    )
    shown = _endpoints.json_response(
        200, {"instances": [_endpoints._instance(info)], "history": [_endpoints._entry(entry)]}
    )
    assert shown.body.count(b"[") > 1800


async def test_a_malformed_datacontenttype_is_refused_with_json_data_too(db_url: str) -> None:
    app = build(db_url)
    async with app:
        for declared in ["json", "application/", "text/plain; charset", "a b/c"]:
            document = event({}, datacontenttype=declared)
            answer = await call(
                app.asgi(), headers=[("content-type", STRUCTURED)], body=json.dumps(document).encode()
            )
            assert_refused(answer, 400, "InvalidCloudEvent")
            assert "datacontenttype" in answer.json()["error"]["message"]
