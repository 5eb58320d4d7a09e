"""Events built by the official CloudEvents Python SDK (``cloudevents``), posted to ``app.asgi()`` exactly as
the SDK makes them, and received by a workflow in ``ctx.wait_event``, on both backends.

Both of the SDK's APIs: the current one (``cloudevents.core``: ``CloudEvent``, ``to_binary_event``,
``to_structured_event``) and the 1.x one, kept under ``cloudevents.v1`` since 2.0 (``cloudevents.v1.http``'s
``CloudEvent``, ``cloudevents.v1.conversion``'s ``to_binary`` and ``to_structured``); binary and structured
modes; dict, str and bytes data; with and without ``datacontenttype``. Without it, the SDK sends a
binary-mode body with no Content-Type: geste takes the body as JSON when it parses as JSON, and as bytes
(a base64 string) otherwise.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1.conversion import to_binary as v1_to_binary
from cloudevents.v1.conversion import to_structured as v1_to_structured
from cloudevents.v1.http import CloudEvent as V1CloudEvent

import geste

MakeApp = Callable[..., geste.App]
Request = tuple[dict[str, str], bytes]

EVENT_TYPE = "com.example.sdk.sent"
DICT = {"message": "hi", "amount": 9.99, "tags": ["a", "é"]}
TEXT = "héllo, wörld"
BYTES = b"\x89PNG\r\n\x1a\n\x00\xff"  # neither UTF-8 nor JSON
TYPES = {"dict": "application/json", "str": "text/plain", "bytes": "application/octet-stream"}
DATA: dict[str, Any] = {"dict": DICT, "str": TEXT, "bytes": BYTES}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def core_binary(attributes: dict[str, Any], data: Any) -> Request:
    message = to_binary_event(CloudEvent(attributes, data))
    return message.headers, message.body


def core_structured(attributes: dict[str, Any], data: Any) -> Request:
    message = to_structured_event(CloudEvent(attributes, data))
    return message.headers, message.body


def v1_binary(attributes: dict[str, Any], data: Any) -> Request:
    headers, body = v1_to_binary(V1CloudEvent(attributes, data))
    return dict(headers), body


def v1_structured(attributes: dict[str, Any], data: Any) -> Request:
    headers, body = v1_to_structured(V1CloudEvent(attributes, data))
    return dict(headers), body


SENDERS: dict[str, Callable[[dict[str, Any], Any], Request]] = {
    "core-binary": core_binary,
    "core-structured": core_structured,
    "v1-binary": v1_binary,
    "v1-structured": v1_structured,
}

# What the workflow receives as event.data, for each (SDK API and mode, data, datacontenttype given).
EXPECTED: dict[tuple[str, str, bool], Any] = {}
for api in ("core", "v1"):
    for typed in (False, True):
        # structured mode: `data` as it is, bytes as data_base64 (kept as base64 with or without a type)
        EXPECTED[f"{api}-structured", "dict", typed] = DICT
        EXPECTED[f"{api}-structured", "str", typed] = TEXT
        EXPECTED[f"{api}-structured", "bytes", typed] = b64(BYTES)
        EXPECTED[f"{api}-binary", "dict", typed] = DICT  # JSON, with Content-Type application/json or none
        EXPECTED[f"{api}-binary", "bytes", typed] = b64(BYTES)  # application/octet-stream, or no type
EXPECTED["core-binary", "str", True] = TEXT  # text/plain
# The current API sends str data as its UTF-8 bytes, with no Content-Type without a datacontenttype:
# not JSON, so bytes (set datacontenttype to text/plain to receive text).
EXPECTED["core-binary", "str", False] = b64(TEXT.encode())
# The 1.x API JSON-encodes str data whatever datacontenttype says: without one, the body is the JSON
# string; with text/plain, the text received is that JSON (quotes and \u escapes included).
EXPECTED["v1-binary", "str", False] = TEXT
EXPECTED["v1-binary", "str", True] = json.dumps(TEXT)


def build(make_app: MakeApp) -> geste.App:
    app = make_app()

    @app.workflow
    async def receive(ctx: geste.WorkflowContext) -> dict[str, Any]:
        event = await ctx.wait_event(EVENT_TYPE, timeout=60)
        return {
            "data": event.data,
            "event_id": event.event_id,
            "datacontenttype": event.extensions.get("datacontenttype"),
        }

    return app


async def deliver(make_app: MakeApp, request: Request) -> tuple[httpx.Response, Any]:
    """Post ``request`` to a served App whose workflow waits for the event; the answer and the result."""
    headers, body = request
    app = build(make_app)
    transport = httpx.ASGITransport(app=app.asgi())
    async with app, httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        handle = await app.start_workflow("receive")
        answer = await http.post("/events", headers=headers, content=body)
        assert answer.status_code == 202, answer.text
        return answer, await handle.result(timeout=10)


@pytest.mark.parametrize("typed", [False, True], ids=["no-datacontenttype", "datacontenttype"])
@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("sender", list(SENDERS))
async def test_an_sdk_event_reaches_the_waiting_workflow(
    make_app: MakeApp, sender: str, kind: str, typed: bool
) -> None:
    attributes = {"type": EVENT_TYPE, "source": "https://example.com/producer", "id": f"{sender}-{kind}"}
    if typed:
        attributes["datacontenttype"] = TYPES[kind]
    request = SENDERS[sender](attributes, DATA[kind])
    if sender.endswith("-binary"):  # what the SDK sends, as the case assumes
        assert request[0].get("content-type") == (TYPES[kind] if typed else None)
    answer, received = await deliver(make_app, request)
    assert answer.json() == {"event_id": attributes["id"], "duplicate": False}
    assert received == {
        "data": EXPECTED[sender, kind, typed],
        "event_id": attributes["id"],
        "datacontenttype": TYPES[kind] if typed else None,
    }


async def test_the_sdk_readme_example(make_app: MakeApp) -> None:
    """The 1.x README's example as it was reported (issue 13): a dict, no datacontenttype, binary mode."""
    attributes = {"type": EVENT_TYPE, "source": "https://example.com/event-producer"}
    event = V1CloudEvent(attributes, {"message": "Hello World!"})
    headers, body = v1_to_binary(event)
    answer, received = await deliver(make_app, (dict(headers), body))
    assert answer.json()["event_id"] == event["id"]
    assert received["data"] == {"message": "Hello World!"}


@pytest.mark.parametrize("sender", list(SENDERS))
async def test_bytes_that_parse_as_json_without_datacontenttype(make_app: MakeApp, sender: str) -> None:
    """Binary mode has nothing but the body to go by: bytes that are JSON are taken as JSON. Structured
    mode's data_base64 says the data is bytes, so they stay bytes there."""
    raw = b'{"k": [1, 2]}'
    attributes = {"type": EVENT_TYPE, "source": "/producer", "id": "json-bytes"}
    _, received = await deliver(make_app, SENDERS[sender](attributes, raw))
    assert received["data"] == ({"k": [1, 2]} if sender.endswith("-binary") else b64(raw))
