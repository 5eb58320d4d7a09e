"""The ASGI application (``app.asgi()``), in process through httpx's ASGI transport, on both backends.

CloudEvents in binary and structured modes reach workflows waiting in ``ctx.wait_event``; every malformed
request gets its 4xx and a JSON error, and leaves every geste table as it was; the token; the API.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

import geste
from geste.errors import ConfigurationError, StorageError
from geste.http import _endpoints, _routing

from .conftest import POSTGRES_URL
from .support import raw_query, wait_status

MakeApp = Callable[..., geste.App]

EVENT_HEADERS = {
    "ce-specversion": "1.0",
    "ce-id": "evt-1",
    "ce-source": "/bank",
    "ce-type": "payment.confirmed",
    "content-type": "application/json",
}
EVENT_BODY = {"order_id": "A-1", "amount": 9.99}


def structured_event(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-s",
        "source": "/bank",
        "type": "payment.confirmed",
        "data": EVENT_BODY,
    }
    event.update(changes)
    return {k: v for k, v in event.items() if v is not ...}


def build(make_app: MakeApp, **options: Any) -> geste.App:
    """An App with the workflows these tests drive."""
    app = make_app(**options)

    @app.workflow
    async def payment(ctx: geste.WorkflowContext, order_id: str) -> dict[str, Any]:
        event = await ctx.wait_event("payment.confirmed", match={"order_id": order_id}, timeout=60)
        return {
            "data": event.data,
            "event_id": event.event_id,
            "source": event.source,
            "extensions": event.extensions,
        }

    @app.workflow
    async def upload(ctx: geste.WorkflowContext) -> Any:
        return (await ctx.wait_event("doc.uploaded", timeout=60)).data

    @app.workflow
    async def add(ctx: geste.WorkflowContext, a: int, b: int = 0) -> int:
        return a + b

    @app.workflow
    async def boom(ctx: geste.WorkflowContext) -> None:
        raise RuntimeError("it broke")

    @app.workflow
    async def hold(ctx: geste.WorkflowContext) -> str:
        await ctx.wait_event("release", timeout=60)
        return "released"

    return app


def client(app: geste.App, **options: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app.asgi(**options))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000")


@contextlib.asynccontextmanager
async def serving(app: geste.App, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app, client(app, **options) as http:
        yield http


async def table_counts(db_url: str) -> dict[str, int]:
    """Rows in every geste table of the test database, but the chores' rounds (a row per chore, added
    whenever a chore first comes due: not the request's doing)."""
    if db_url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(db_url.removeprefix("sqlite:///"))) as conn:
            names = [
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'geste%'"
                )
            ]
            return {
                name: conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]
                for name in names
                if name != "geste_chores"
            }
    import asyncpg

    schema = parse_qs(urlsplit(db_url).query)["schema"][0]
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        names = [
            row["table_name"]
            for row in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
            )
        ]
        return {
            name: await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{name}"')
            for name in names
            if name != "geste_chores"
        }
    finally:
        await conn.close()


def assert_error(response: httpx.Response, status: int, error_type: str, *fragments: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body


# -- events delivered ---------------------------------------------------------------------------------
async def test_a_binary_mode_event_reaches_the_waiting_workflow(make_app: MakeApp) -> None:
    app = build(make_app)
    async with serving(app) as http:
        handle = await app.start_workflow("payment", "A-1")
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        other = {**EVENT_BODY, "order_id": "B-2"}  # the match filters it out
        answer = await http.post("/events", headers={**EVENT_HEADERS, "ce-id": "evt-0"}, json=other)
        assert answer.status_code == 202
        headers = {
            **EVENT_HEADERS,
            "ce-time": "2024-05-01T12:00:00.5+02:00",
            "ce-subject": "caf%C3%A9%20au%20lait",  # percent-encoded UTF-8, as the HTTP binding says
            "ce-traceparent": "00-abc-01",
            "ce-COUNT": "3",  # header names are case-insensitive: the attribute is `count`
        }
        answer = await http.post("/events", headers=headers, content=json.dumps(EVENT_BODY))
        assert answer.status_code == 202
        assert answer.json() == {"event_id": "evt-1", "duplicate": False}
        assert await handle.result(timeout=10) == {
            "data": EVENT_BODY,
            "event_id": "evt-1",
            "source": "/bank",
            "extensions": {
                "specversion": "1.0",
                "datacontenttype": "application/json",
                "time": "2024-05-01T12:00:00.5+02:00",
                "subject": "café au lait",
                "traceparent": "00-abc-01",
                "count": "3",
            },
        }


async def test_a_structured_mode_event_reaches_the_waiting_workflow(make_app: MakeApp) -> None:
    app = build(make_app)
    async with serving(app) as http:
        handle = await app.start_workflow("payment", "A-1")
        event = structured_event(subject=None, comexampleflag=True, comexamplecount=-5, datacontenttype=...)
        answer = await http.post(
            "/events",
            content=json.dumps(event),
            headers={"content-type": "application/cloudevents+json; charset=UTF-8"},
        )
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"event_id": "evt-s", "duplicate": False}
        assert await handle.result(timeout=10) == {
            "data": EVENT_BODY,
            "event_id": "evt-s",
            "source": "/bank",
            # null is the same as absent; extensions keep their JSON type
            "extensions": {"specversion": "1.0", "comexampleflag": True, "comexamplecount": -5},
        }


async def test_the_same_ce_id_twice_is_stored_once(make_app: MakeApp, db_url: str) -> None:
    app = build(make_app)
    async with serving(app) as http:
        handle = await app.start_workflow("payment", "A-1")
        before = await table_counts(db_url)
        first = await http.post("/events", headers=EVENT_HEADERS, json=EVENT_BODY)
        second = await http.post("/events", headers=EVENT_HEADERS, json={**EVENT_BODY, "amount": 1})
        structured = await http.post(
            "/events",
            json=structured_event(id="evt-1"),
            headers={"content-type": "application/cloudevents+json"},
        )
        assert [r.status_code for r in (first, second, structured)] == [202, 202, 202]
        assert [r.json()["duplicate"] for r in (first, second, structured)] == [False, True, True]
        assert {r.json()["event_id"] for r in (first, second, structured)} == {"evt-1"}
        assert (await handle.result(timeout=10))["data"] == EVENT_BODY
        events = [e for e in await handle.history() if e.kind == geste.StepKind.EVENT]
        assert len(events) == 1
        after = await table_counts(db_url)
        assert after["geste_events"] == before["geste_events"] + 1


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({"content-type": "text/plain"}, "héllo".encode(), "héllo"),
        ({"content-type": "text/csv; charset=latin-1"}, "héllo".encode("latin-1"), "héllo"),
        (
            {"content-type": "application/octet-stream"},
            b"\x00\xffbin",
            base64.b64encode(b"\x00\xffbin").decode(),
        ),
        ({"content-type": "application/vnd.api+json"}, b'["a", 1]', ["a", 1]),
        ({"content-type": "text/json"}, b'"just a string"', "just a string"),
        ({}, b"", None),
        # no Content-Type: JSON when the body is JSON as application/json data must be, else bytes
        ({}, '{"k": [1, "é"]}'.encode(), {"k": [1, "é"]}),
        ({}, b'"just a string"', "just a string"),
        ({}, b"hello", base64.b64encode(b"hello").decode()),
        ({}, b"\x00\xffbin", base64.b64encode(b"\x00\xffbin").decode()),
        ({}, b"[NaN]", base64.b64encode(b"[NaN]").decode()),
        ({}, '"é"'.encode("latin-1"), base64.b64encode('"é"'.encode("latin-1")).decode()),  # not UTF-8
        ({}, b"\xef\xbb\xbf{}", base64.b64encode(b"\xef\xbb\xbf{}").decode()),  # a BOM: not JSON
        ({}, b"[" * 129 + b"]" * 129, base64.b64encode(b"[" * 129 + b"]" * 129).decode()),  # too deep
    ],
    ids=[
        *("text", "text-latin-1", "binary", "plus-json", "text-json", "no-data"),
        *("untyped-json", "untyped-json-string", "untyped-text", "untyped-bytes", "untyped-nan"),
        *("untyped-latin-1", "untyped-bom", "untyped-too-deep"),
    ],
)
async def test_binary_mode_data_by_content_type(
    make_app: MakeApp, headers: dict[str, str], body: bytes, expected: Any
) -> None:
    app = build(make_app)
    async with serving(app) as http:
        handle = await app.start_workflow("upload")
        event_headers = {**EVENT_HEADERS, "ce-type": "doc.uploaded", **headers}
        if not headers:
            del event_headers["content-type"]
        answer = await http.post("/events", headers=event_headers, content=body)
        assert answer.status_code == 202, answer.text
        assert await handle.result(timeout=10) == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"data": "<a/>", "datacontenttype": "application/xml"}, "<a/>"),
        ({"data": None}, None),
        ({"data": ...}, None),
        ({"data": ..., "data_base64": base64.b64encode(b"\x01\x02").decode()}, "AQI="),
        (
            {
                "data": ...,
                "data_base64": base64.b64encode(b'{"k": 1}').decode(),
                "datacontenttype": "application/json",
            },
            {"k": 1},
        ),
        (
            {
                "data": ...,
                "data_base64": base64.b64encode("é".encode()).decode(),
                "datacontenttype": "text/plain",
            },
            "é",
        ),
    ],
    ids=["xml-string", "null", "absent", "base64", "base64-json", "base64-text"],
)
async def test_structured_mode_data(make_app: MakeApp, changes: dict[str, Any], expected: Any) -> None:
    app = build(make_app)
    async with serving(app) as http:
        handle = await app.start_workflow("upload")
        event = structured_event(type="doc.uploaded", **changes)
        answer = await http.post(
            "/events", content=json.dumps(event), headers={"content-type": "application/cloudevents+json"}
        )
        assert answer.status_code == 202, answer.text
        assert await handle.result(timeout=10) == expected


async def test_the_gesteinstance_extension_sends_to_one_instance(make_app: MakeApp) -> None:
    app = build(make_app)
    async with serving(app) as http:
        one = await app.start_workflow("hold", instance_id="one")
        two = await app.start_workflow("hold", instance_id="two")
        headers = {**EVENT_HEADERS, "ce-type": "release", "ce-gesteinstance": "one"}
        assert (await http.post("/events", headers=headers, json={})).status_code == 202
        assert await one.result(timeout=10) == "released"
        assert (await app.get_instance(two.instance_id)).status != geste.Status.COMPLETED


# -- malformed events: 4xx, a JSON error, nothing written ---------------------------------------------
def _without(name: str) -> dict[str, str]:
    return {k: v for k, v in EVENT_HEADERS.items() if k != name}


BODY = json.dumps(EVENT_BODY).encode()
STRUCTURED = {"content-type": "application/cloudevents+json"}
BAD_EVENTS: dict[str, tuple[dict[str, str] | list[tuple[str, str]], bytes, int, str]] = {
    # binary mode
    "missing-id": (_without("ce-id"), BODY, 400, "InvalidCloudEvent"),
    "missing-source": (_without("ce-source"), BODY, 400, "InvalidCloudEvent"),
    "missing-type": (_without("ce-type"), BODY, 400, "InvalidCloudEvent"),
    "missing-specversion": (_without("ce-specversion"), BODY, 400, "InvalidCloudEvent"),
    "specversion-0.3": ({**EVENT_HEADERS, "ce-specversion": "0.3"}, BODY, 400, "InvalidCloudEvent"),
    "empty-id": ({**EVENT_HEADERS, "ce-id": ""}, BODY, 400, "InvalidCloudEvent"),
    "empty-subject": ({**EVENT_HEADERS, "ce-subject": ""}, BODY, 400, "InvalidCloudEvent"),
    "bad-attribute-name": ({**EVENT_HEADERS, "ce-bad_name": "x"}, BODY, 400, "InvalidCloudEvent"),
    "ce-data": ({**EVENT_HEADERS, "ce-data": "x"}, BODY, 400, "InvalidCloudEvent"),
    "ce-datacontenttype": (
        {**EVENT_HEADERS, "ce-datacontenttype": "text/plain"},
        BODY,
        400,
        "InvalidCloudEvent",
    ),
    "duplicate-header": ([*EVENT_HEADERS.items(), ("ce-id", "evt-2")], BODY, 400, "InvalidCloudEvent"),
    "bad-percent-utf8": ({**EVENT_HEADERS, "ce-subject": "%C0%A0"}, BODY, 400, "InvalidCloudEvent"),
    "control-char": ({**EVENT_HEADERS, "ce-type": "a%01b"}, BODY, 400, "InvalidCloudEvent"),
    "nul-in-source": ({**EVENT_HEADERS, "ce-source": "/a%00b"}, BODY, 400, "InvalidCloudEvent"),
    "source-not-uri": ({**EVENT_HEADERS, "ce-source": "a%20b"}, BODY, 400, "InvalidCloudEvent"),
    "dataschema-relative": (
        {**EVENT_HEADERS, "ce-dataschema": "schema.json"},
        BODY,
        400,
        "InvalidCloudEvent",
    ),
    "time-not-rfc3339": ({**EVENT_HEADERS, "ce-time": "yesterday"}, BODY, 400, "InvalidCloudEvent"),
    "time-feb-30": ({**EVENT_HEADERS, "ce-time": "2024-02-30T00:00:00Z"}, BODY, 400, "InvalidCloudEvent"),
    "id-too-long": ({**EVENT_HEADERS, "ce-id": "x" * 201}, BODY, 400, "ConfigurationError"),
    "unknown-instance": ({**EVENT_HEADERS, "ce-gesteinstance": "nope"}, BODY, 404, "InstanceNotFoundError"),
    "bad-json": (EVENT_HEADERS, b'{"order_id": ', 400, "InvalidJSON"),
    "json-nan": (EVENT_HEADERS, b'{"amount": NaN}', 400, "InvalidJSON"),
    "json-not-utf8": (EVENT_HEADERS, '{"a": "é"}'.encode("latin-1"), 400, "InvalidJSON"),
    "text-not-utf8": ({**EVENT_HEADERS, "content-type": "text/plain"}, b"\xff\xfe", 400, "InvalidCloudEvent"),
    "unknown-charset": (
        {**EVENT_HEADERS, "content-type": "text/plain; charset=nope"},
        b"x",
        415,
        "UnsupportedMediaType",
    ),
    "json-latin-1": (
        {**EVENT_HEADERS, "content-type": "application/json; charset=latin-1"},
        BODY,
        415,
        "UnsupportedMediaType",
    ),
    "malformed-content-type": ({**EVENT_HEADERS, "content-type": "json"}, BODY, 415, "UnsupportedMediaType"),
    "no-ce-headers": ({"content-type": "application/json"}, BODY, 415, "UnsupportedMediaType"),
    # structured mode
    "structured-bad-json": (STRUCTURED, b"{", 400, "InvalidJSON"),
    "structured-array": (STRUCTURED, b"[]", 400, "InvalidCloudEvent"),
    "structured-missing-id": (
        STRUCTURED,
        json.dumps(structured_event(id=...)).encode(),
        400,
        "InvalidCloudEvent",
    ),
    "structured-null-id": (
        STRUCTURED,
        json.dumps(structured_event(id=None)).encode(),
        400,
        "InvalidCloudEvent",
    ),
    "structured-numeric-id": (
        STRUCTURED,
        json.dumps(structured_event(id=7)).encode(),
        400,
        "InvalidCloudEvent",
    ),
    "structured-specversion-number": (
        STRUCTURED,
        json.dumps(structured_event(specversion=1.0)).encode(),
        400,
        "InvalidCloudEvent",
    ),
    "structured-data-and-base64": (
        STRUCTURED,
        json.dumps(structured_event(data_base64="AA==")).encode(),
        400,
        "InvalidCloudEvent",
    ),
    "structured-bad-base64": (
        STRUCTURED,
        json.dumps(structured_event(data=..., data_base64="%%%")).encode(),
        400,
        "InvalidCloudEvent",
    ),
    "structured-base64-bad-json": (
        STRUCTURED,
        json.dumps(
            structured_event(data=..., data_base64="e30x", datacontenttype="application/json")
        ).encode(),
        400,
        "InvalidJSON",
    ),
    "structured-object-extension": (
        STRUCTURED,
        json.dumps(structured_event(ext={"a": 1})).encode(),
        400,
        "InvalidCloudEvent",
    ),
    "structured-float-extension": (
        STRUCTURED,
        json.dumps(structured_event(ext=1.5)).encode(),
        400,
        "InvalidCloudEvent",
    ),
    "structured-int64-extension": (
        STRUCTURED,
        json.dumps(structured_event(ext=2**31)).encode(),
        400,
        "InvalidCloudEvent",
    ),
    "structured-uppercase-name": (
        STRUCTURED,
        json.dumps(structured_event(Ext="x")).encode(),
        400,
        "InvalidCloudEvent",
    ),
    "structured-nul-in-source": (
        STRUCTURED,
        json.dumps(structured_event(source="/a\x00")).encode(),
        400,
        "InvalidCloudEvent",
    ),
    "structured-surrogate-type": (
        STRUCTURED,
        b'{"specversion": "1.0", "id": "x", "source": "/s", "type": "\\ud800"}',
        400,
        "InvalidCloudEvent",
    ),
    "structured-latin-1": (
        {"content-type": "application/cloudevents+json; charset=latin-1"},
        b"{}",
        415,
        "UnsupportedMediaType",
    ),
    "batch": ({"content-type": "application/cloudevents-batch+json"}, b"[]", 415, "UnsupportedMediaType"),
    "other-format": ({"content-type": "application/cloudevents+xml"}, b"<e/>", 415, "UnsupportedMediaType"),
}


@pytest.mark.parametrize("case", list(BAD_EVENTS))
async def test_a_malformed_event_is_refused_and_changes_nothing(
    make_app: MakeApp, db_url: str, case: str
) -> None:
    headers, body, status, error_type = BAD_EVENTS[case]
    app = build(make_app)
    async with serving(app) as http:
        handle = await app.start_workflow("payment", "A-1")
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        before = await table_counts(db_url)
        answer = await http.post("/events", headers=headers, content=body)
        assert_error(answer, status, error_type)
        assert await table_counts(db_url) == before
        assert (await app.get_instance(handle.instance_id)).status == geste.Status.WAITING
        # and the endpoint still works
        assert (await http.post("/events", headers=EVENT_HEADERS, content=BODY)).status_code == 202
        assert (await handle.result(timeout=10))["data"] == EVENT_BODY


async def test_bodies_over_the_limit_are_refused_early(make_app: MakeApp, db_url: str) -> None:
    app = build(make_app)
    async with serving(app, max_body_bytes=10_000) as http:
        before = await table_counts(db_url)
        big = json.dumps({"order_id": "A-1", "pad": "x" * 20_000})
        answer = await http.post("/events", headers=EVENT_HEADERS, content=big)
        assert_error(answer, 413, "PayloadTooLarge", "10000 bytes")

        pulled = 0

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read until over the limit
            nonlocal pulled
            for _ in range(1000):
                pulled += 1
                yield b"x" * 1000

        answer = await http.post("/events", headers=EVENT_HEADERS, content=chunks())
        assert_error(answer, 413, "PayloadTooLarge")
        assert pulled <= 12  # it stopped at the chunk that crossed the limit
        answer = await http.post("/workflows/add", json={"args": ["x" * 20_000]})
        assert_error(answer, 413, "PayloadTooLarge")
        assert await table_counts(db_url) == before


async def test_the_default_body_limit_follows_max_payload_bytes(make_app: MakeApp, db_url: str) -> None:
    app = build(make_app, max_payload_bytes=1000)
    assert app.asgi().max_body_bytes == 1000 + 64 * 1024
    async with serving(app) as http:
        before = await table_counts(db_url)
        # under the body limit, over the App's limit on event data: the App refuses it, also with 413
        data = {"order_id": "A-1", "pad": "x" * 2000}
        answer = await http.post("/events", headers=EVENT_HEADERS, json=data)
        assert_error(answer, 413, "PayloadTooLargeError", "over the limit of 1000 bytes")
        assert await table_counts(db_url) == before


# -- the token ----------------------------------------------------------------------------------------
async def test_the_token_is_required_when_set(make_app: MakeApp, db_url: str) -> None:
    app = build(make_app)
    async with serving(app, token="s3cret-token") as http:
        before = await table_counts(db_url)
        for headers in [
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": "Bearer s3cret-token-and-more"},
            {"authorization": "Basic s3cret-token"},
            {"authorization": "s3cret-token"},
        ]:
            for method, url in [
                ("POST", "/events"),
                ("POST", "/workflows/add"),
                ("GET", "/instances"),
                ("GET", "/instances/x/result"),
                ("POST", "/instances/x/cancel"),
                ("POST", "/instances/x/retry"),
                ("POST", "/instances/x/resume"),
                ("GET", "/no/such/path"),
            ]:
                answer = await http.request(method, url, headers={**EVENT_HEADERS, **headers}, content=BODY)
                assert_error(answer, 401, "Unauthorized")
                assert answer.headers["www-authenticate"].startswith("Bearer")
        assert await table_counts(db_url) == before
        assert (await http.get("/health")).status_code == 200  # no token needed
        good = {"authorization": "Bearer s3cret-token"}
        assert (
            await http.post("/events", headers={**EVENT_HEADERS, **good}, content=BODY)
        ).status_code == 202
        assert (
            await http.get("/instances", headers={"authorization": "bearer s3cret-token"})
        ).status_code == 200


async def test_the_token_comes_from_the_environment(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GESTE_HTTP_TOKEN", "from-env")
    app = build(make_app)
    async with serving(app) as http:
        assert_error(await http.get("/instances"), 401, "Unauthorized")
        assert (await http.get("/instances", headers={"authorization": "Bearer from-env"})).status_code == 200


@pytest.mark.parametrize(
    "options", [{"token": ""}, {"token": "two words"}, {"token": "é"}, {"max_body_bytes": 0}]
)
def test_bad_options_are_refused(make_app: MakeApp, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        make_app().asgi(**options)


# -- the API ------------------------------------------------------------------------------------------
async def test_start_a_workflow_by_name(make_app: MakeApp) -> None:
    app = build(make_app)
    async with serving(app) as http:
        answer = await http.post(
            "/workflows/add", json={"args": [2], "kwargs": {"b": 3}, "instance_id": "sum/1"}
        )
        assert answer.status_code == 201
        assert answer.json() == {"instance_id": "sum/1", "created": True}
        assert answer.headers["location"] == "/instances/sum%2F1"
        again = await http.post("/workflows/add", json={"args": [2], "instance_id": "sum/1"})
        assert again.status_code == 200
        assert again.json() == {"instance_id": "sum/1", "created": False}
        assert await app.get_handle("sum/1").result(timeout=10) == 5

        generated = await http.post("/workflows/add", json={"args": [1]})
        assert generated.status_code == 201
        assert await app.get_handle(generated.json()["instance_id"]).result(timeout=10) == 1
        assert (await http.post("/workflows/hold")).status_code == 201  # no body: no arguments


@pytest.mark.parametrize(
    ("root_path", "path", "raw_path", "local"),
    [
        ("", "/instances/a/b", b"/instances/a%2Fb", "/instances/a%2Fb"),
        # Starlette's Mount (and the servers): `path` and `raw_path` hold the prefix
        ("/geste", "/geste/instances/a/b", b"/geste/instances/a%2Fb", "/instances/a%2Fb"),
        ("/geste", "/geste/instances/a/b", b"/geste/instances/a%2Fb?wait=1", "/instances/a%2Fb"),
        ("/geste/", "/geste/ui", b"/geste/ui", "/ui"),
        ("/geste", "/geste", b"/geste", ""),
        ("/my app", "/my app/ui/instances/é", b"/my%20app/ui/instances/%C3%A9", "/ui/instances/%C3%A9"),
        # a prefix of two segments, one of them a proxy's that it stripped from `raw_path`
        ("/api/geste", "/api/geste/instances/x%2Fy", b"/geste/instances/x%252Fy", "/instances/x%252Fy"),
        ("/api/geste", "/api/geste/ui", b"/ui", "/ui"),  # all of it stripped
        # the older convention: `path` without the prefix
        ("/geste", "/instances/x", b"/instances/x", "/instances/x"),
        ("/geste", "/gestes/x", b"/gestes/x", "/gestes/x"),  # not under the prefix: a longer segment
        # no `raw_path`: the decoded path, each character of it an id's own (a "%" is no escape)
        ("/geste", "/geste/instances/50%", None, "/instances/50%25"),
        # paths that disagree: the decoded one routes
        ("/geste", "/geste/ui", b"/elsewhere", "/ui"),
    ],
)
def test_the_path_below_the_mount_point(
    root_path: str, path: str, raw_path: bytes | None, local: str
) -> None:
    """What routes a request to an App mounted under a prefix (a FastAPI app's ``mount``, a proxy's
    ``--root-path``): the path below it, percent-encoded as sent, so that an id keeps its ``%2F``."""
    scope: dict[str, Any] = {"type": "http", "path": path, "root_path": root_path}
    if raw_path is not None:
        scope["raw_path"] = raw_path
    assert _routing.local_path(scope) == local


async def test_under_a_prefix_the_locations_keep_it(make_app: MakeApp) -> None:
    """Mounted at /geste (as Starlette's Mount does it: the full path, ``root_path`` the prefix), the
    API routes below it and its ``Location`` headers point under it."""
    app = build(make_app)
    async with app:
        transport = httpx.ASGITransport(app=app.asgi(), root_path="/geste")
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            answer = await http.post("/geste/workflows/add", json={"args": [2, 3], "instance_id": "s/1"})
            assert answer.status_code == 201, answer.text
            assert answer.headers["location"] == "/geste/instances/s%2F1"
            followed = await http.get(answer.headers["location"] + "/result", params={"wait": 10})
            assert followed.json() == {"instance_id": "s/1", "status": "completed", "result": 5}
            schedule = await http.post(
                "/geste/schedules/nightly", json={"workflow": "hold", "cron": "0 3 * * *"}
            )
            assert schedule.status_code == 201, schedule.text
            assert schedule.headers["location"] == "/geste/schedules/nightly"
            assert (await http.get("/geste/schedules/nightly")).json()["name"] == "nightly"


async def test_starting_badly_is_refused_and_writes_nothing(make_app: MakeApp, db_url: str) -> None:
    app = build(make_app)
    async with serving(app) as http:
        await app.start_workflow("hold", instance_id="taken")
        await wait_status(app, "taken", geste.Status.WAITING)
        before = await table_counts(db_url)
        assert_error(await http.post("/workflows/nope", json={}), 404, "UnknownWorkflowError", "nope")
        assert_error(await http.post("/workflows/add", json={"args": []}), 400, "SerializationError")
        assert_error(await http.post("/workflows/add", json={"args": [1, 2, 3]}), 400, "SerializationError")
        assert_error(
            await http.post("/workflows/add", json={"kwargs": {"c": 1}, "args": [1]}),
            400,
            "SerializationError",
        )
        assert_error(await http.post("/workflows/add", json=[1]), 400, "BadRequest")
        assert_error(await http.post("/workflows/add", json={"args": 1}), 400, "BadRequest")
        assert_error(await http.post("/workflows/add", json={"kwargs": []}), 400, "BadRequest")
        assert_error(await http.post("/workflows/add", json={"arg": [1]}), 400, "BadRequest", "arg")
        assert_error(
            await http.post("/workflows/add", json={"args": [1], "instance_id": 5}), 400, "BadRequest"
        )
        assert_error(
            await http.post("/workflows/add", json={"kwargs": {"instance_id": "x"}}),
            400,
            "BadRequest",
            "instance_id",
        )
        assert_error(
            await http.post("/workflows/add", json={"args": [1], "instance_id": "x" * 201}),
            400,
            "ConfigurationError",
        )
        assert_error(
            await http.post("/workflows/add", json={"args": [1], "instance_id": "taken"}),
            409,
            "InstanceAlreadyExistsError",
        )
        assert_error(
            await http.post(
                "/workflows/add", content=b'{"args": [1]}', headers={"content-type": "text/plain"}
            ),
            415,
            "UnsupportedMediaType",
        )
        assert_error(
            await http.post("/workflows/add", content=b"{", headers={"content-type": "application/json"}),
            400,
            "InvalidJSON",
        )
        assert await table_counts(db_url) == before


async def test_look_at_instances(make_app: MakeApp, db_url: str) -> None:
    app = build(make_app)
    async with serving(app) as http:
        done = await app.start_workflow("add", 1, b=2, instance_id="done")
        await done.result(timeout=10)
        await app.start_workflow("hold", instance_id="held")
        await wait_status(app, "held", geste.Status.WAITING)

        shown = (await http.get("/instances/done")).json()
        assert shown["instance_id"] == "done"
        assert shown["workflow_name"] == "add"
        assert shown["status"] == "completed"
        assert shown["input"] == {"args": [1], "kwargs": {"b": 2}}
        assert shown["result"] == 3
        assert shown["error"] is None
        assert shown["created_at"].endswith("+00:00") and shown["finished_at"]

        listed = (await http.get("/instances")).json()["instances"]
        assert {i["instance_id"] for i in listed} == {"done", "held"}
        waiting = (await http.get("/instances", params={"status": "waiting"})).json()["instances"]
        assert [i["instance_id"] for i in waiting] == ["held"]
        of_add = (await http.get("/instances", params={"workflow": "add", "limit": 5, "offset": 0})).json()
        assert [i["instance_id"] for i in of_add["instances"]] == ["done"]
        assert (await http.get("/instances", params={"limit": 1, "offset": 1})).json()["instances"][0][
            "instance_id"
        ] in {"done", "held"}

        history = (await http.get("/instances/held/history")).json()
        assert history["instance_id"] == "held"
        assert [(e["seq"], e["kind"], e["name"]) for e in history["history"]] == [
            (1, "wait_event", "release")
        ]

        await raw_query(db_url, "UPDATE geste_history SET payload = $1 WHERE instance_id = $2", "{", "held")
        assert_error(await http.get("/instances/held/history"), 500, "HistoryCorruptedError", "held")

        assert_error(await http.get("/instances/nope"), 404, "InstanceNotFoundError", "nope")
        assert_error(await http.get("/instances/nope/history"), 404, "InstanceNotFoundError")
        assert_error(await http.get("/instances", params={"status": "sleepy"}), 400, "ConfigurationError")
        assert_error(await http.get("/instances", params={"limit": "-1"}), 400, "BadRequest")
        assert_error(await http.get("/instances", params={"limit": "0"}), 400, "ConfigurationError")
        assert_error(await http.get("/instances", params={"limit": "ten"}), 400, "BadRequest")
        assert_error(await http.get("/instances", params={"color": "red"}), 400, "BadRequest", "color")
        assert_error(await http.get("/instances?limit=1&limit=2"), 400, "BadRequest")


async def test_results(make_app: MakeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    app = build(make_app)
    async with serving(app) as http:
        await app.start_workflow("add", 20, 22, instance_id="ok")
        answer = await http.get("/instances/ok/result", params={"wait": 10})
        assert answer.status_code == 200
        assert answer.json() == {"instance_id": "ok", "status": "completed", "result": 42}

        await app.start_workflow("boom", instance_id="bad")
        answer = await http.get("/instances/bad/result", params={"wait": 10})
        assert answer.status_code == 409
        body = answer.json()
        assert (body["instance_id"], body["status"]) == ("bad", "failed")
        assert body["error"]["type"].endswith("RuntimeError")
        assert body["error"]["message"] == "it broke"
        assert "traceback" not in body["error"] and "Traceback" not in answer.text
        assert "traceback" not in (await http.get("/instances/bad")).json()["error"]

        await app.start_workflow("hold", instance_id="held")
        started = time.monotonic()
        answer = await http.get("/instances/held/result", params={"wait": 0.2})
        assert answer.status_code == 202
        assert answer.json() == {"instance_id": "held", "status": "waiting"}
        assert 0.15 < time.monotonic() - started < 5
        assert (await http.get("/instances/held/result")).status_code == 202  # no wait: at once

        monkeypatch.setattr(_endpoints, "MAX_RESULT_WAIT", 0.2)
        started = time.monotonic()
        assert (await http.get("/instances/held/result", params={"wait": 3600})).status_code == 202
        assert time.monotonic() - started < 5  # capped

        for wait in ["-1", "soon", "nan", "inf"]:
            assert_error(await http.get("/instances/held/result", params={"wait": wait}), 400, "BadRequest")
        assert_error(await http.get("/instances/nope/result"), 404, "InstanceNotFoundError")


async def test_cancel(make_app: MakeApp, db_url: str) -> None:
    app = build(make_app)
    async with serving(app) as http:
        await app.start_workflow("hold", instance_id="held")
        await wait_status(app, "held", geste.Status.WAITING)
        answer = await http.post("/instances/held/cancel")
        assert answer.status_code == 202
        assert answer.json()["instance_id"] == "held"
        assert answer.json()["cancel_requested"] is True
        answer = await http.get("/instances/held/result", params={"wait": 10})
        assert answer.status_code == 409
        assert answer.json()["status"] == "cancelled"
        assert answer.json()["error"]["type"] == "geste.errors.WorkflowCancelled"
        before = await table_counts(db_url)
        assert_error(await http.post("/instances/nope/cancel"), 404, "InstanceNotFoundError")
        assert await table_counts(db_url) == before


async def test_paths_and_methods(make_app: MakeApp) -> None:
    app = build(make_app)
    async with serving(app) as http:
        health = await http.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        answer = await http.get("/events")
        assert_error(answer, 405, "MethodNotAllowed")
        assert answer.headers["allow"] == "POST"
        assert_error(await http.delete("/instances/x"), 405, "MethodNotAllowed")
        assert_error(await http.get("/workflows/add"), 405, "MethodNotAllowed")
        assert_error(await http.post("/health"), 405, "MethodNotAllowed")
        for path in ["/", "/nope", "/instances/x/y", "/instances//history", "/events/x"]:
            assert_error(await http.get(path), 404, "NotFound")
        assert_error(await http.get("/instances/%ff"), 400, "BadRequest")
        assert_error(await http.get("/instances/x?wait=1"), 400, "BadRequest")


async def test_unexpected_errors_are_a_generic_500_and_logged(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = build(make_app)
    async with serving(app) as http:

        async def broken(instance_id: str) -> None:
            raise RuntimeError("secret detail")

        monkeypatch.setattr(app, "get_instance", broken)
        with caplog.at_level(logging.ERROR, logger="geste.http"):
            answer = await http.get("/instances/x")
        assert_error(answer, 500, "InternalError")
        assert "secret" not in answer.text and "Traceback" not in answer.text
        assert "secret detail" in caplog.text

        async def down(instance_id: str) -> None:
            raise StorageError("cannot connect to db.internal:5432 as admin")

        monkeypatch.setattr(app, "get_instance", down)
        answer = await http.get("/instances/x")
        assert_error(answer, 503, "StorageError")
        assert "db.internal" not in answer.text


async def test_a_client_app_takes_events_for_workers_elsewhere(make_app: MakeApp) -> None:
    """What ``geste serve`` without MODULE:APP serves: no workflows, no worker; events and queries work."""
    worker = build(make_app)
    server = make_app(run_worker=False)
    async with worker, serving(server) as http:
        handle = await worker.start_workflow("payment", "A-1")
        assert_error(
            await http.post("/workflows/payment", json={"args": ["A-2"]}), 404, "UnknownWorkflowError"
        )
        assert (await http.post("/events", headers=EVENT_HEADERS, json=EVENT_BODY)).status_code == 202
        answer = await http.get(f"/instances/{handle.instance_id}/result", params={"wait": 10})
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"]["data"] == EVENT_BODY


async def test_an_app_that_is_not_open_answers_503(make_app: MakeApp) -> None:
    app = build(make_app)
    async with client(app) as http:
        assert_error(await http.get("/instances"), 503, "AppNotOpenError")
        assert (await http.get("/health")).status_code == 200


# -- lifespan -----------------------------------------------------------------------------------------
class Lifespan:
    """Drives an ASGI application's lifespan protocol as a server does."""

    def __init__(self, asgi: Any) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task = asyncio.create_task(asgi({"type": "lifespan"}, self.inbox.get, self.outbox.put))

    async def send(self, message_type: str) -> str:
        await self.inbox.put({"type": message_type})
        answer: str = (await self.outbox.get())["type"]
        return answer


async def test_lifespan_opens_and_closes_the_app_it_opened(make_app: MakeApp) -> None:
    app = build(make_app)
    lifespan = Lifespan(app.asgi())
    assert await lifespan.send("lifespan.startup") == "lifespan.startup.complete"
    assert await app.list_instances() == []  # open
    assert await lifespan.send("lifespan.shutdown") == "lifespan.shutdown.complete"
    await lifespan.task
    with pytest.raises(geste.errors.AppNotOpenError):
        await app.list_instances()


async def test_lifespan_leaves_an_app_open_by_its_owner(make_app: MakeApp) -> None:
    app = build(make_app)
    async with app:
        lifespan = Lifespan(app.asgi())
        assert await lifespan.send("lifespan.startup") == "lifespan.startup.complete"
        assert await lifespan.send("lifespan.shutdown") == "lifespan.shutdown.complete"
        await lifespan.task
        assert await app.list_instances() == []  # still open


def test_lifespan_reports_an_app_that_cannot_open(tmp_path: Any) -> None:
    app = geste.App(f"sqlite:///{tmp_path}/missing/dir/x.db")

    async def go() -> str:
        lifespan = Lifespan(app.asgi())
        answer = await lifespan.send("lifespan.startup")
        await lifespan.task
        return answer

    assert asyncio.run(go()) == "lifespan.startup.failed"


@pytest.fixture(autouse=True)
def _no_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("GESTE_HTTP_TOKEN", raising=False)
    yield


# -- what a browser could send behind the user's back --------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"origin": "null"},
        {"sec-fetch-site": "cross-site"},
    ],
)
async def test_cross_site_requests_are_refused(
    make_app: Callable[..., geste.App], headers: dict[str, str]
) -> None:
    app = build(make_app, run_worker=False)
    async with app, client(app) as http:
        handle = await app.start_workflow("hold", instance_id="victim")
        response = await http.post(f"/instances/{handle.instance_id}/cancel", headers=headers)
        assert response.status_code == 403
        assert response.json()["error"]["type"] == "Forbidden"
        assert not (await app.get_instance("victim")).cancel_requested


async def test_same_origin_requests_pass(make_app: Callable[..., geste.App]) -> None:
    app = build(make_app, run_worker=False)
    async with app, client(app) as http:
        await app.start_workflow("hold", instance_id="mine")
        response = await http.post("/instances/mine/cancel", headers={"origin": "http://127.0.0.1:8000"})
        assert response.status_code == 202


async def test_a_dns_name_as_host_needs_the_token(make_app: Callable[..., geste.App]) -> None:
    """DNS rebinding: a hostile name resolving to 127.0.0.1 is refused unless a token protects the API."""
    app = build(make_app, run_worker=False)
    async with app:
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://rebound.example:8000") as http:
            assert (await http.get("/instances")).status_code == 403
        transport = httpx.ASGITransport(app=app.asgi(token="s3cret"))
        async with httpx.AsyncClient(transport=transport, base_url="http://rebound.example:8000") as http:
            response = await http.get("/instances", headers={"authorization": "Bearer s3cret"})
            assert response.status_code == 200
