"""The transactional outbox: ``ctx.send_event``, the relay, and what an operator sees.

Deliveries go over real HTTP to ``Receiver``, a small HTTP/1.1 server on 127.0.0.1 (a free port) that
records every request, answers what the test tells it, and counts requests in flight per event id. Each
test runs on SQLite and PostgreSQL; waits poll with deadlines.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import geste
from geste.errors import ConfigurationError, SerializationError, StorageError
from tests.apps.outbox_app import build_app
from tests.conftest import die_with_parent
from tests.support import wait_status, wait_until

MakeApp = Callable[..., geste.App]
ROOT = Path(__file__).resolve().parent.parent


# -- a real HTTP server receiving the deliveries ---------------------------------------------------
@dataclass
class Delivery:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int | None = None  # what the server answered; None: no answer (yet, or ever)

    @property
    def event(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value

    @property
    def event_id(self) -> str:
        return str(self.event["id"])


Respond = Callable[[Delivery], "int | Awaitable[int | None] | None"]


@dataclass
class Receiver:
    """An HTTP/1.1 server (keep-alive, Content-Length bodies) recording what the relays post.

    ``respond(delivery)`` gives the status to answer (default 200), or None to drop the connection
    without answering; it may be async (to hold a request).
    """

    respond: Respond | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: Counter[str] = field(default_factory=Counter)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/events"

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    def answered(self, status_class: int = 2) -> list[Delivery]:
        return [d for d in self.deliveries if d.status is not None and d.status // 100 == status_class]

    def ids(self, status_class: int = 2) -> list[str]:
        return [d.event_id for d in self.answered(status_class)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    raw = await reader.readline()
                    if raw in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = raw.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                delivery = Delivery(method, path, headers, body, time.monotonic())
                self.deliveries.append(delivery)
                event_id = delivery.event_id
                self.in_flight[event_id] += 1
                self.max_in_flight[event_id] = max(self.max_in_flight[event_id], self.in_flight[event_id])
                try:
                    status: int | None = 200
                    if self.respond is not None:
                        outcome = self.respond(delivery)
                        status = await outcome if inspect.isawaitable(outcome) else outcome
                finally:
                    self.in_flight[event_id] -= 1
                if status is None:
                    return  # hang up without an answer
                delivery.status = status
                text = b"ok" if status < 300 else b"no thanks"
                writer.write(
                    f"HTTP/1.1 {status} Whatever\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {len(text)}\r\n\r\n".encode()
                    + text
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as server:
        yield server


# -- helpers ----------------------------------------------------------------------------------------
async def until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)


async def outbox_status(app: geste.App, event_id: str) -> geste.OutboxEntry:
    [entry] = [e for e in await app.outbox(limit=10_000) if e.event_id == event_id]
    return entry


def register(app: geste.App) -> geste.Workflow[[int], list[str]]:
    @app.workflow
    async def emit(ctx: geste.WorkflowContext, count: int) -> list[str]:
        return [await ctx.send_event("test.emitted", {"i": i}) for i in range(count)]

    return emit


def check_order(deliveries: list[Delivery]) -> None:
    """Per instance, each event is first sent only after the one before it was answered 2xx (or died)."""
    by_instance: dict[str, list[Delivery]] = {}
    for d in deliveries:
        by_instance.setdefault(d.event["gesteinstanceid"], []).append(d)
    for instance, sent in by_instance.items():
        done: set[int] = set()
        for d in sent:
            i = d.event["data"]["i"]
            assert all(k in done for k in range(i)), f"{instance}: event {i} sent before {sorted(done)}"
            if d.status is not None and d.status < 300:
                done.add(i)


# -- delivery -----------------------------------------------------------------------------------------
async def test_http_delivery_is_a_structured_cloudevent(make_app: MakeApp, receiver: Receiver) -> None:
    app = make_app(outbox_endpoint=receiver.url, outbox_headers={"Authorization": "Bearer s3cret"})

    @app.workflow
    async def order(ctx: geste.WorkflowContext, order_id: str) -> str:
        return await ctx.send_event("order.paid", {"order_id": order_id, "total": 9.5}, subject=order_id)

    async with app:
        handle = await order.start_with_id("order-1", "ORD-1")
        event_id = await handle.result(timeout=10)
        assert event_id == "order-1:1"  # deterministic: instance id and step
        await until(lambda: receiver.answered(), what="a delivery")
        [delivery] = receiver.deliveries
        assert delivery.method == "POST" and delivery.path == "/hooks/events"
        assert delivery.headers["content-type"] == "application/cloudevents+json; charset=utf-8"
        assert delivery.headers["authorization"] == "Bearer s3cret"
        body = delivery.event
        sent_at = datetime.fromisoformat(body.pop("time"))
        assert sent_at.utcoffset() is not None
        assert abs(sent_at.timestamp() - time.time()) < 60
        assert body == {
            "specversion": "1.0",
            "id": "order-1:1",
            "source": "/geste/order",
            "type": "order.paid",
            "subject": "ORD-1",
            "datacontenttype": "application/json",
            "gesteinstanceid": "order-1",
            "data": {"order_id": "ORD-1", "total": 9.5},
        }
        await until(lambda: _delivered(app, event_id), what="marked delivered")
        entry = await outbox_status(app, event_id)
        assert (entry.status, entry.attempts, entry.last_error) == (geste.OutboxStatus.DELIVERED, 1, None)
        assert entry.instance_id == "order-1" and entry.seq == 1 and entry.type == "order.paid"
        assert entry.delivered_at is not None and entry.next_attempt_at is None
        [step] = await handle.history()
        assert step.kind == geste.StepKind.SEND_EVENT and step.name == "order.paid"
        assert step.payload == {
            "event_id": "order-1:1",
            "type": "order.paid",
            "source": "/geste/order",
            "subject": "ORD-1",
        }


async def _delivered(app: geste.App, event_id: str) -> bool:
    return (await outbox_status(app, event_id)).status == geste.OutboxStatus.DELIVERED


async def all_delivered(app: geste.App, count: int) -> bool:
    entries = await app.outbox(limit=10_000)
    return len(entries) == count and all(e.status == geste.OutboxStatus.DELIVERED for e in entries)


async def test_callable_destination(make_app: MakeApp) -> None:
    received: list[geste.OutboxEvent] = []

    async def handler(event: geste.OutboxEvent) -> None:
        received.append(event)

    app = make_app(outbox_handler=handler)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> list[str]:
        first = await ctx.send_event("a.b", [1, "two"], source="https://shop.example/orders")
        second = await ctx.send_event("a.c", event_id="my-own-id")  # no data
        return [first, second]

    async with app:
        handle = await flow.start_with_id("f")
        assert await handle.result(timeout=10) == ["f:1", "my-own-id"]
        await until(lambda: len(received) == 2, what="two events")
        first, second = received
        assert (first.event_id, first.type, first.source, first.data) == (
            "f:1",
            "a.b",
            "https://shop.example/orders",
            [1, "two"],
        )
        assert (first.instance_id, first.attempt, first.subject) == ("f", 1, None)
        assert first.to_cloudevent()["data"] == [1, "two"]
        assert (second.event_id, second.data, second.source) == ("my-own-id", None, "/geste/flow")
        assert "data" not in second.to_cloudevent()
        assert second.to_cloudevent()["specversion"] == "1.0"


async def test_the_event_is_in_the_outbox_with_its_step_and_replay_does_not_emit_it_again(
    make_app: MakeApp, receiver: Receiver
) -> None:
    runs = 0
    app = make_app(outbox_endpoint=receiver.url, workflow_cache_size=0)  # each wake-up replays

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> list[str]:
        nonlocal runs
        runs += 1
        first = await ctx.send_event("step.one", {"n": 1})
        await ctx.sleep(0.2)  # suspends: the rest runs after a replay from the top
        second = await ctx.send_event("step.two", {"n": 2})
        return [first, second]

    async with app:
        handle = await flow.start_with_id("r")
        assert await handle.result(timeout=10) == ["r:1", "r:3"]
        assert runs == 2
        await until(lambda: all_delivered(app, 2), what="two deliveries")
        assert receiver.ids() == ["r:1", "r:3"]  # and nothing is left to send
        assert [e.event_id for e in await app.outbox()] == ["r:3", "r:1"]  # newest first
        kinds = [(e.seq, str(e.kind)) for e in await handle.history()]
        assert kinds == [(1, "send_event"), (2, "sleep"), (3, "send_event")]


async def test_buffered_rows_commit_with_the_event(make_app: MakeApp) -> None:
    received: list[geste.OutboxEvent] = []

    async def handler(event: geste.OutboxEvent) -> None:
        received.append(event)

    app = make_app(outbox_handler=handler)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        token = str(ctx.uuid4())  # buffered; committed with the send_event step, before the event
        await ctx.send_event("with.token", {"token": token})
        return token

    async with app:
        handle = await flow.start()
        token = await handle.result(timeout=10)
        await until(lambda: received, what="the event")
        assert received[0].data == {"token": token}
        assert [str(e.kind) for e in await handle.history()] == ["uuid", "send_event"]


# -- retries, dead letters, order -----------------------------------------------------------------
@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_failed_attempts_are_retried_with_backoff_then_delivered(make_app: MakeApp) -> None:
    async def respond(d: Delivery) -> int:
        return 503 if len(receiver.deliveries) <= 2 else 200

    async with Receiver(respond) as receiver:
        app = make_app(outbox_endpoint=receiver.url, outbox_initial_backoff=0.2, outbox_max_backoff=10)
        emit = register(app)
        async with app:
            handle = await emit.start_with_id("x", 1)
            [event_id] = await handle.result(timeout=10)
            await until(lambda: _delivered(app, event_id), what="delivered")
            entry = await outbox_status(app, event_id)
            assert entry.attempts == 3
            assert entry.last_error is not None and entry.last_error.startswith("HTTP 503")
            first, second, third = receiver.deliveries
            assert [d.status for d in receiver.deliveries] == [503, 503, 200]
            assert second.at - first.at >= 0.18  # initial_backoff
            assert third.at - second.at >= 0.38  # doubled
            assert {d.event_id for d in receiver.deliveries} == {event_id}


async def test_dead_letter_after_max_attempts_and_retry_by_an_operator(make_app: MakeApp) -> None:
    refuse = True

    def respond(d: Delivery) -> int:
        return 500 if refuse and d.event["data"]["i"] == 0 else 200

    async with Receiver(respond) as receiver:
        app = make_app(outbox_endpoint=receiver.url, outbox_max_attempts=3, outbox_initial_backoff=0.05)
        emit = register(app)
        async with app:
            handle = await emit.start_with_id("d", 2)
            first, second = await handle.result(timeout=10)

            async def dead_and_holding() -> bool:
                entries = {e.event_id: e for e in await app.outbox()}
                return entries[first].status == "dead" and entries[second].next_attempt_at is None

            await until(dead_and_holding, what="the first event dead, the second held behind it")
            dead = await outbox_status(app, first)
            assert (dead.status, dead.attempts) == (geste.OutboxStatus.DEAD, 3)
            assert dead.last_error is not None and dead.last_error.startswith("HTTP 500")
            assert dead.next_attempt_at is None and dead.delivered_at is None
            held = await outbox_status(app, second)
            assert (held.status, held.attempts) == (geste.OutboxStatus.PENDING, 0)  # never sent
            assert receiver.ids(5) == [first] * 3 and receiver.ids() == []
            assert [e.event_id for e in await app.outbox(status="dead")] == [first]
            assert [e.event_id for e in await app.outbox(status=geste.OutboxStatus.PENDING)] == [second]
            assert len(await app.outbox(instance_id="d")) == 2 and await app.outbox(instance_id="zz") == []

            refuse = False
            assert await app.retry_outbox_event(first) is True
            await until(lambda: all_delivered(app, 2), what="the re-queued event, then the held one")
            assert receiver.ids() == [first, second]  # the re-queued event first
            entry = await outbox_status(app, first)
            assert entry.attempts == 1 and entry.last_error is not None  # the last error is kept
            assert await app.retry_outbox_event(first) is False  # not dead any more
            assert await app.retry_outbox_event("no-such-event") is False


async def test_connection_errors_and_timeouts_are_failed_attempts(make_app: MakeApp) -> None:
    async def hold(d: Delivery) -> int:
        await asyncio.sleep(5)
        return 200

    async with Receiver() as closed:
        pass  # shut: nothing listens on its port any more
    async with Receiver(hold) as slow:
        apps = [
            make_app(outbox_endpoint=closed.url, outbox_max_attempts=2, outbox_initial_backoff=0.05),
            make_app(
                outbox_endpoint=slow.url,
                outbox_max_attempts=1,
                outbox_timeout=0.3,
                worker_id="slow",
            ),
        ]
        for app, expected in zip(
            apps, ("ConnectError", "no answer within outbox_timeout (0.3s)"), strict=True
        ):
            emit = register(app)
            async with app:
                [event_id] = await (await emit.start(1)).result(timeout=10)

                async def dead(app: geste.App = app, event_id: str = event_id) -> bool:
                    return (await outbox_status(app, event_id)).status == geste.OutboxStatus.DEAD

                await until(dead, what="dead")
                entry = await outbox_status(app, event_id)
                assert entry.last_error is not None and expected in entry.last_error, entry.last_error


async def test_a_failing_handler_is_retried(make_app: MakeApp) -> None:
    attempts: list[int] = []

    async def handler(event: geste.OutboxEvent) -> None:
        attempts.append(event.attempt)
        if event.attempt < 3:
            raise RuntimeError(f"downstream busy ({event.attempt})")

    app = make_app(outbox_handler=handler, outbox_initial_backoff=0.02)
    emit = register(app)
    async with app:
        [event_id] = await (await emit.start(1)).result(timeout=10)
        await until(lambda: _delivered(app, event_id), what="delivered")
        assert attempts == [1, 2, 3]
        entry = await outbox_status(app, event_id)
        assert entry.last_error == "RuntimeError: downstream busy (2)"


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_events_of_an_instance_go_out_in_order(make_app: MakeApp) -> None:
    failed: set[str] = set()

    async def respond(d: Delivery) -> int:
        await asyncio.sleep(0.002)
        if d.event["data"]["i"] in (0, 2) and d.event_id not in failed:  # the first try of two of them
            failed.add(d.event_id)
            return 500
        return 200

    async with Receiver(respond) as receiver:
        app = make_app(outbox_endpoint=receiver.url, outbox_initial_backoff=0.05)
        emit = register(app)
        async with app:
            handles = [await emit.start_with_id(f"o{n}", 5) for n in range(4)]
            ids = [eid for h in handles for eid in await h.result(timeout=10)]
            await until(lambda: set(receiver.ids()) == set(ids), what="all delivered")
        check_order(receiver.deliveries)
        assert len(receiver.deliveries) == len(ids) + 8  # each event once, plus the refused tries
        for h in handles:  # per instance, the answered order is the emitted order
            assert [
                d.event["data"]["i"]
                for d in receiver.answered()
                if d.event["gesteinstanceid"] == h.instance_id
            ] == list(range(5))


# -- outages, on a clock that only the test moves -----------------------------------------------------
class VirtualClock:
    """The App's ``clock``: it stands still until the test moves it, so an hour passes in no time."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Destination:
    """A callable destination, down while ``refuses(event)`` says so; every attempt recorded in order."""

    refuses: Callable[[geste.OutboxEvent], bool] = lambda event: False
    clock: Callable[[], float] = time.time
    attempts: list[tuple[str, str, int, bool]] = field(default_factory=list)
    """(event id, instance id, the event's data["i"], delivered), in the order of the calls."""
    last_delivery: float | None = None

    async def __call__(self, event: geste.OutboxEvent) -> None:
        ok = not self.refuses(event)
        self.attempts.append((event.event_id, event.instance_id, event.data["i"], ok))
        if ok:
            self.last_delivery = self.clock()
        if not ok:
            raise ConnectionError("the destination is down")

    def delivered(self, instance_id: str) -> list[int]:
        return [i for _, iid, i, ok in self.attempts if ok and iid == instance_id]

    def check_order(self) -> None:
        """Per instance, no event is tried before the one before it was delivered, none delivered twice."""
        done: dict[str, list[int]] = {}
        for event_id, iid, i, ok in self.attempts:
            got = done.setdefault(iid, [])
            assert got == list(range(i)), f"{event_id} tried after {got} only"
            if ok:
                got.append(i)


def register_waiting(app: geste.App) -> geste.Workflow[[int, bool], list[str]]:
    """``emit(count, more)``: ``count`` events, then, if ``more``, ``count`` others after a "more" event."""

    @app.workflow
    async def emit(ctx: geste.WorkflowContext, count: int, more: bool) -> list[str]:
        ids = [await ctx.send_event("test.emitted", {"i": i}) for i in range(count)]
        if more:
            await ctx.wait_event("more")
            ids += [await ctx.send_event("test.emitted", {"i": count + i}) for i in range(count)]
        return ids

    return emit


def relay_of(app: geste.App) -> Any:
    assert app._relay is not None
    return app._relay


async def settle(app: geste.App, clock: VirtualClock) -> None:
    """Let the relay do what is due at ``clock.now``: poke it, then wait until it is idle: nothing being
    sent or claimed, nothing it could claim due (the moment it sleeps until is later), and the outbox
    the same before and after that look (so no round ran in between)."""
    relay = relay_of(app)
    relay.poke()

    async def state() -> list[tuple[Any, ...]]:
        return [
            (e.event_id, e.status, e.attempts, e.next_attempt_at, e.claimed_by)
            for e in await app.outbox(limit=10_000)
        ]

    async def idle() -> bool:
        before = await state()
        if relay._inflight or any(claimed_by for *_, claimed_by in before):
            return False
        due = await app.storage.outbox_next_attempt_at()
        if due is not None and due <= clock.now:
            return False
        return not relay._inflight and await state() == before

    await wait_until(idle, "the relay to be done with what is due")


async def run_until(app: geste.App, clock: VirtualClock, end: float) -> None:
    """Move the clock from one moment the relay has work to the next, until ``end`` (or until nothing is
    left to send), letting the relay do the work of each."""
    while True:
        await settle(app, clock)
        due = await app.storage.outbox_next_attempt_at()
        if due is None or due > end:
            clock.now = max(clock.now, end)
            return
        clock.now = max(clock.now, due)


async def test_an_hour_long_outage_loses_nothing_and_keeps_the_order(make_app: MakeApp) -> None:
    clock = VirtualClock()
    start = clock.now
    up = False
    destination = Destination(lambda event: not up, clock)
    app = make_app(outbox_handler=destination, clock=clock)  # the defaults: never give up, back-off <= 300 s
    assert app.outbox_config.max_attempts is None
    emit = register_waiting(app)
    async with app:
        early = [await emit.start_with_id(f"early-{n}", 3, True) for n in range(3)]
        for handle in early:
            await wait_status(app, handle.instance_id, geste.Status.WAITING)
        await run_until(app, clock, start + 1800)
        # half an hour in: the early instances emit three more events each, and new instances start
        await app.send_event("more")
        late = [await emit.start_with_id(f"late-{n}", 2, False) for n in range(2)]
        for handle in early + late:
            await handle.result(timeout=10)
        await run_until(app, clock, start + 3600)

        entries = await app.outbox(limit=10_000)
        assert len(entries) == 3 * 6 + 2 * 2
        assert {e.status for e in entries} == {geste.OutboxStatus.PENDING}  # none dead, none lost
        assert {i for _, _, i, _ in destination.attempts} == {0}  # only the first event of each instance
        first = {e.instance_id: e.attempts for e in entries if e.seq == 1}
        assert min(first[h.instance_id] for h in early) >= 15  # far past the 10 attempts of before
        assert all(not ok for *_, ok in destination.attempts)

        up = True  # the destination is back: everything goes out, in order, at the next attempts
        await run_until(app, clock, start + 2 * 3600)
        entries = await app.outbox(limit=10_000)
        assert {e.status for e in entries} == {geste.OutboxStatus.DELIVERED}
        assert destination.last_delivery is not None
        assert destination.last_delivery - start <= 3600 + 300  # within one maximal back-off of the return
    destination.check_order()
    for handle in early:
        assert destination.delivered(handle.instance_id) == list(range(6))
    for handle in late:
        assert destination.delivered(handle.instance_id) == [0, 1]


async def viewer_text(app: geste.App, instance_id: str) -> str:
    """The text of the instance's page in the web viewer (its timeline shows each event's delivery)."""
    import html
    import re

    import httpx

    transport = httpx.ASGITransport(app=app.asgi())
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        answer = await http.get(f"/ui/instances/{instance_id}", headers={"accept": "text/html"})
    assert answer.status_code == 200, answer.text[:500]
    return html.unescape(re.sub(r"<[^>]+>", " ", answer.text))


def tried(destination: Destination, instance_id: str) -> list[int]:
    """The events of ``instance_id`` the destination was called with, in order (its ``data["i"]``)."""
    return [i for _, iid, i, _ in destination.attempts if iid == instance_id]


async def entries_of(app: geste.App, instance_id: str) -> list[geste.OutboxEntry]:
    return sorted(await app.outbox(instance_id=instance_id, limit=1000), key=lambda e: e.seq)


async def test_a_dead_event_holds_the_later_events_of_its_instance_until_retried(make_app: MakeApp) -> None:
    clock = VirtualClock()
    refused = {"held:1"}
    destination = Destination(lambda event: event.event_id in refused, clock)
    app = make_app(outbox_handler=destination, clock=clock, outbox_max_attempts=3)
    emit = register_waiting(app)
    async with app:
        held = await emit.start_with_id("held", 3, True)
        other = await emit.start_with_id("other", 3, False)
        await other.result(timeout=10)
        await wait_status(app, "held", geste.Status.WAITING)
        await run_until(app, clock, clock.now + 3600)
        first, *later = await entries_of(app, "held")
        assert (first.event_id, first.status, first.attempts) == ("held:1", geste.OutboxStatus.DEAD, 3)
        assert [(e.status, e.attempts, e.next_attempt_at) for e in later] == [("pending", 0, None)] * 2
        assert tried(destination, "held") == [0, 0, 0]  # nothing after the dead event went out
        assert destination.delivered("other") == [0, 1, 2]  # another instance is not held back

        await app.send_event("more")  # the instance emits three more events: they wait too
        await held.result(timeout=10)
        await run_until(app, clock, clock.now + 3600)
        assert tried(destination, "held") == [0, 0, 0]
        assert [e.status for e in await entries_of(app, "held")] == ["dead"] + ["pending"] * 5

        refused.clear()
        assert await app.retry_outbox_event("held:1") is True
        await run_until(app, clock, clock.now + 60)
        assert {e.status for e in await entries_of(app, "held")} == {geste.OutboxStatus.DELIVERED}
    assert destination.delivered("held") == list(range(6))  # the re-queued event first, then the rest
    destination.check_order()


async def test_discarding_an_event_lets_the_later_ones_go(make_app: MakeApp) -> None:
    clock = VirtualClock()
    poison = {"dead-end:1", "stuck:1"}
    destination = Destination(lambda event: event.event_id in poison, clock)
    emit_options = {"outbox_handler": destination, "clock": clock}

    # with outbox_max_attempts, the event is dead: discarding it releases the events behind it
    app = make_app(**emit_options, outbox_max_attempts=2)
    emit = register_waiting(app)
    async with app:
        await (await emit.start_with_id("dead-end", 3, False)).result(timeout=10)
        await run_until(app, clock, clock.now + 600)
        assert [e.status for e in await entries_of(app, "dead-end")] == ["dead", "pending", "pending"]
        timeline = await viewer_text(app, "dead-end")
        assert "dead: gave up" in timeline
        assert timeline.count("waits for an earlier event of this instance") == 2
        assert await app.discard_outbox_event("dead-end:1") is True
        await run_until(app, clock, clock.now + 60)
        assert [e.status for e in await entries_of(app, "dead-end")] == ["discarded"] + ["delivered"] * 2
        timeline = await viewer_text(app, "dead-end")
        assert "discarded by an operator" in timeline and "waits for an earlier" not in timeline
        assert destination.delivered("dead-end") == [1, 2]
        assert tried(destination, "dead-end") == [0, 0, 1, 2]  # the discarded one never again
        [discarded] = await app.outbox(status="discarded")
        assert discarded.event_id == "dead-end:1" and discarded.last_error is not None
        assert await app.discard_outbox_event("dead-end:1") is False  # discarded already
        assert await app.discard_outbox_event("dead-end:2") is False  # delivered
        assert await app.retry_outbox_event("dead-end:1") is False  # not dead: discarded is final
        assert await app.discard_outbox_event("no-such-event") is False

    # by default the event never dies: discarding the pending one that nothing accepts does the same
    app = make_app(**emit_options)
    emit = register_waiting(app)
    async with app:
        await (await emit.start_with_id("stuck", 3, False)).result(timeout=10)
        await run_until(app, clock, clock.now + 3600)
        first, *later = await entries_of(app, "stuck")
        assert first.status == "pending" and first.attempts > 10
        assert [(e.status, e.next_attempt_at) for e in later] == [("pending", None)] * 2
        assert await app.discard_outbox_event("stuck:1") is True
        await run_until(app, clock, clock.now + 60)
        assert [e.status for e in await entries_of(app, "stuck")] == ["discarded"] + ["delivered"] * 2
        assert destination.delivered("stuck") == [1, 2]


async def test_status_and_metrics_show_the_dead_events_and_the_oldest_pending_one(make_app: MakeApp) -> None:
    clock = VirtualClock()
    start = clock.now
    destination = Destination(lambda event: event.event_id == "refused:1", clock)
    app = make_app(outbox_handler=destination, clock=clock, outbox_max_attempts=2)
    emit = register_waiting(app)

    async def shown() -> tuple[tuple[Any, ...], tuple[float, ...]]:
        queue = (await app.status()).queue
        snap = await app.metrics.snapshot()
        assert {snap.families[name].type for name in GAUGES} == {"gauge"}
        return (
            (queue.outbox_pending, queue.outbox_dead, queue.outbox_oldest_pending_age),
            tuple(snap.value(name) for name in GAUGES),
        )

    async with app:
        assert await shown() == ((0, 0, None), (0, 0, 0))
        await (await emit.start_with_id("refused", 3, False)).result(timeout=10)
        clock.now += 100
        await (await emit.start_with_id("accepted", 2, False)).result(timeout=10)
        await run_until(app, clock, start + 600)
        # refused:1 is dead; the two after it wait, the oldest of them emitted 600 s ago
        assert await shown() == ((2, 1, 600.0), (2, 1, 600.0))
        queue = (await app.status()).queue
        assert queue.as_dict()["outbox_dead"] == 1 and queue.as_dict()["outbox_oldest_pending_age"] == 600
        text = await app.metrics.exposition()
        assert "# TYPE geste_outbox_dead gauge\ngeste_outbox_dead 1\n" in text
        assert "geste_outbox_oldest_pending_seconds 600\n" in text

        assert await app.discard_outbox_event("refused:1") is True
        await run_until(app, clock, start + 700)
        assert await shown() == ((0, 0, None), (0, 0, 0))


GAUGES = ("geste_outbox_pending", "geste_outbox_dead", "geste_outbox_oldest_pending_seconds")


async def test_a_backlog_behind_a_failing_event_is_read_once_and_holds_no_other_instance(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    import geste.runtime.relay

    monkeypatch.setattr(geste.runtime.relay, "CLAIM_WINDOW", 4)  # a claim round reads 4 due events at most
    clock = VirtualClock()
    up = False
    destination = Destination(lambda event: event.instance_id == "busy" and not up, clock)
    app = make_app(outbox_handler=destination, clock=clock)
    emit = register_waiting(app)
    async with app:
        await (await emit.start_with_id("busy", 12, False)).result(timeout=10)
        await run_until(app, clock, clock.now + 30)
        # 11 events wait behind the failing first one, out of the due range: a claim reads none of them
        first, *later = await entries_of(app, "busy")
        assert first.attempts >= 4 and {e.next_attempt_at for e in later} == {None}
        clock.now += 1
        # another instance's events, recorded after the backlog, go out at once, in order
        await (await emit.start_with_id("quiet", 3, False)).result(timeout=10)
        await settle(app, clock)
        assert destination.delivered("quiet") == [0, 1, 2]
        assert set(tried(destination, "busy")) == {0}

        up = True
        await run_until(app, clock, clock.now + 600)
        assert destination.delivered("busy") == list(range(12))
    destination.check_order()


# -- wake-ups ----------------------------------------------------------------------------------------
async def test_relay_is_poked_locally_and_wakes_at_the_next_attempt(make_app: MakeApp) -> None:
    def respond(d: Delivery) -> int:
        return 500 if len(receiver.deliveries) == 1 else 200

    async with Receiver(respond) as receiver:
        # polls every minute: only the local poke and the wake-up at next_attempt_at can be this fast
        app = make_app(
            outbox_endpoint=receiver.url,
            outbox_initial_backoff=0.3,
            poll_interval=60,
            notify_fallback_interval=60,
        )
        emit = register(app)
        async with app:
            await asyncio.sleep(0.2)  # the relay's first look is over: it sleeps for a minute
            started = time.monotonic()
            [event_id] = await (await emit.start(1)).result(timeout=10)
            await until(lambda: _delivered(app, event_id), timeout=5, what="delivered")
        first, second = receiver.deliveries
        assert first.at - started < 2
        assert 0.28 <= second.at - first.at < 2


async def test_a_full_relay_looks_again_as_soon_as_a_delivery_ends(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay with every slot taken skips its rounds; the first delivery to end must start one, even when
    its instance has nothing more to send: the due events of other instances wait for that slot (they
    waited for the next poll, here a minute, once per batch: a backlog went out a batch per poll)."""
    import geste.runtime.relay

    monkeypatch.setattr(geste.runtime.relay, "MAX_IN_FLIGHT", 2)
    gate = asyncio.Event()
    received: list[str] = []

    async def handler(event: geste.OutboxEvent) -> None:
        await gate.wait()
        received.append(event.event_id)

    app = make_app(outbox_handler=handler, poll_interval=60, notify_fallback_interval=60, lock_timeout=60)
    emit = register(app)
    async with app:
        handles = [await emit.start_with_id(f"full-{n}", 1) for n in range(5)]  # one event each
        for handle in handles:
            await handle.result(timeout=10)
        await until(lambda: len(relay_of(app)._inflight) == 2, what="the relay full")
        assert len(await app.outbox(status="pending")) == 5  # three of them due, not claimed
        gate.set()
        await until(lambda: len(received) == 5, timeout=5, what="all delivered without waiting for a poll")


async def test_outbox_pending_notification_wakes_the_relay_of_another_process(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's process records nothing itself: it claims only in its start-up rounds (the first, and
    the catch-up once it listens), in a poll, when told (a notification) or when a delivery ends. Its
    polls are two minutes apart and its start-up rounds are over before the event exists, so the round
    that claims the first event must have been started by notifications alone. (The second event is
    claimed when the first one's delivery ends: an instance's events go out in order.)"""
    from geste.runtime.relay import Relay

    log: list[tuple[str, Any]] = []  # in order: what woke the relay, and its claims
    notifying = False
    real_notified, real_poke = Relay.notified, Relay.poke

    def notified(self: Relay, body: dict[str, Any]) -> None:
        nonlocal notifying
        log.append(("notified", body.get("event_id")))
        notifying = True
        try:
            real_notified(self, body)
        finally:
            notifying = False

    def poke(self: Relay) -> None:
        log.append(("poke", "notification" if notifying else "other"))
        real_poke(self)

    monkeypatch.setattr(Relay, "notified", notified)
    monkeypatch.setattr(Relay, "poke", poke)

    received: list[geste.OutboxEvent] = []

    async def handler(event: geste.OutboxEvent) -> None:
        received.append(event)

    emitter = geste.App(pg_url, poll_interval=0.05, lock_timeout=2)  # runs the workflow, no relay
    emit = register(emitter)
    relay = geste.App(
        pg_url, outbox_handler=handler, poll_interval=120, notify_fallback_interval=120, lock_timeout=120
    )
    real_claim = relay.storage.outbox_claim

    async def claim(*args: Any, **kwargs: Any) -> Any:
        log.append(("claim", None))
        claims = await real_claim(*args, **kwargs)
        log.append(("claimed", [c.event_id for c in claims]))
        return claims

    relay.storage.outbox_claim = claim  # type: ignore[method-assign]

    def settled(after: int) -> bool:
        """The relay's round started after the poke at ``after`` is over and nothing poked it since: it
        sleeps until its next poll. Its first round is not enough (a poke before it leaves one more)."""
        starts = [i for i, (kind, _) in enumerate(log) if kind == "claim"]
        return (
            len(starts) >= 2
            and starts[-1] > after
            and log[-1][0] == "claimed"
            and not any(kind == "poke" for kind, _ in log[starts[-1] :])
        )

    async with emitter, relay:
        await until(lambda: relay.listener_status().state == geste.ListenerState.LISTENING, what="listening")
        catch_up = max(i for i, entry in enumerate(log) if entry == ("poke", "other"))
        await until(lambda: settled(catch_up), what="the relay's start-up rounds over")
        assert received == []
        handle = await emit.start_with_id(f"n-{uuid.uuid4().hex[:6]}", 2)  # runs in `emitter`
        ids = await handle.result(timeout=10)
        await until(lambda: len(received) == 2, what="both events delivered")
        assert [e.event_id for e in received] == ids
    # both events' notifications reached the relay (other schemas' may come too: one database)
    assert ("notified", ids[0]) in log and ("notified", ids[1]) in log
    first = next(i for i, (kind, value) in enumerate(log) if kind == "claimed" and ids[0] in value)
    starts = [i for i, (kind, _) in enumerate(log[:first]) if kind == "claim"]
    woken_by = [value for kind, value in log[starts[-2] : starts[-1]] if kind == "poke"]
    assert woken_by and set(woken_by) == {"notification"}, log


async def test_a_client_app_does_not_relay(make_app: MakeApp) -> None:
    received: list[geste.OutboxEvent] = []

    async def handler(event: geste.OutboxEvent) -> None:
        received.append(event)

    worker = make_app()  # runs workflows, has no destination: no relay
    emit = register(worker)
    client = make_app(run_worker=False, outbox_handler=handler)  # a destination but no worker: no relay
    claims = 0
    real_claim = client.storage.outbox_claim

    async def claim(*args: Any, **kwargs: Any) -> Any:
        nonlocal claims
        claims += 1
        return await real_claim(*args, **kwargs)

    client.storage.outbox_claim = claim  # type: ignore[method-assign]
    async with worker, client:
        # a relay starts with its App, as a task that claims at once: none was started
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("geste-outbox")]
        [event_id] = await (await emit.start(1)).result(timeout=10)
        entry = await outbox_status(client, event_id)
        assert (entry.status, entry.attempts, entry.claimed_by) == (geste.OutboxStatus.PENDING, 0, None)
    assert received == [] and claims == 0
    relay = make_app(outbox_handler=handler)
    async with relay:
        await until(lambda: _delivered(relay, event_id), what="delivered by a relay started later")
        assert [e.event_id for e in received] == [event_id]


# -- at least once, never concurrently -------------------------------------------------------------
@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_a_failed_mark_sends_the_event_again(make_app: MakeApp, receiver: Receiver) -> None:
    app = make_app(outbox_endpoint=receiver.url, outbox_timeout=0.5, lock_timeout=0.5)
    emit = register(app)
    real_mark = app.storage.outbox_mark_delivered
    marks = 0

    async def failing_mark(event_id: str, claim_id: str, now: float) -> bool:
        nonlocal marks
        marks += 1
        if marks == 1:
            raise StorageError("the database went away while marking")
        return await real_mark(event_id, claim_id, now)

    app.storage.outbox_mark_delivered = failing_mark  # type: ignore[method-assign]
    async with app:
        [event_id] = await (await emit.start(1)).result(timeout=10)
        await until(lambda: _delivered(app, event_id), what="delivered after the claim expired")
        assert receiver.ids() == [event_id, event_id]  # at least once: sent again
        assert receiver.deliveries[1].at - receiver.deliveries[0].at >= 0.5  # after the claim expired
        assert (await outbox_status(app, event_id)).attempts == 2


def spawn_worker(url: str, endpoint: str, ready: Path, log: Path, worker_id: str) -> subprocess.Popen[bytes]:
    """A worker process (tests/apps/outbox_app.py) whose relay posts to ``endpoint``."""
    args = ["--endpoint", endpoint, "--ready", str(ready), "--worker-id", worker_id]
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.apps.outbox_app", url, *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=die_with_parent,
        )


async def test_relay_killed_after_sending_before_marking_sends_again(db_url: str, tmp_path: Path) -> None:
    proc: subprocess.Popen[bytes] | None = None
    held: list[str] = []

    def respond(d: Delivery) -> int | None:
        if not held:  # the first request: kill its sender while it waits for the answer
            held.append(d.event_id)
            assert proc is not None
            os.kill(proc.pid, signal.SIGKILL)
            return None
        return 200

    async with Receiver(respond) as receiver:
        ready = tmp_path / "ready"
        proc = spawn_worker(db_url, receiver.url, ready, tmp_path / "worker.log", "doomed")
        try:
            await until(ready.exists, timeout=30, what="the worker ready")
            client = build_app(db_url, run_worker=False)
            async with client:
                await client.start_workflow("emit", 3, instance_id="k")
                await until(lambda: proc.poll() is not None, what="the worker killed")
                [first] = held
                assert first == "k:1"
                entry = await outbox_status(client, first)
                assert (entry.status, entry.attempts, entry.claimed_by) == (
                    geste.OutboxStatus.PENDING,
                    1,
                    "doomed",
                )

            # another worker and relay take over: the lease and the claim expire, the event goes again
            successor = build_app(
                db_url,
                worker_id="successor",
                outbox_endpoint=receiver.url,
                poll_interval=0.05,
                lock_timeout=1.0,
            )
            async with successor:
                assert await successor.get_handle("k").result(timeout=20) == ["k:1", "k:2", "k:3"]
                await until(lambda: all_delivered(successor, 3), timeout=20, what="all delivered")
                entries = {e.event_id: e for e in await successor.outbox()}
                assert [entries[k].attempts for k in ("k:1", "k:2", "k:3")] == [2, 1, 1]
            assert [d.event_id for d in receiver.deliveries] == ["k:1", "k:1", "k:2", "k:3"]
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_two_relays_never_send_one_event_concurrently(make_app: MakeApp) -> None:
    async def respond(d: Delivery) -> int:
        await asyncio.sleep(0.01)  # widen the window a second sender would hit
        return 200

    async with Receiver(respond) as receiver:
        apps = [make_app(outbox_endpoint=receiver.url, worker_id=f"relay-{n}") for n in range(2)]
        emits = [register(app) for app in apps]
        async with apps[0], apps[1]:
            handles = [await emits[n % 2].start_with_id(f"race-{n}", 4) for n in range(16)]
            ids = [eid for h in handles for eid in await h.result(timeout=20)]
            await until(lambda: all_delivered(apps[1], len(ids)), timeout=30, what="all delivered")
            entries = await apps[0].outbox(limit=1000)
        assert sorted(receiver.ids()) == sorted(ids)  # each event exactly once: nothing crashed
        assert len(receiver.deliveries) == len(ids)
        assert set(receiver.max_in_flight.values()) == {1}
        check_order(receiver.deliveries)
        assert {e.status for e in entries} == {geste.OutboxStatus.DELIVERED}
        assert {e.attempts for e in entries} == {1}


async def test_bursts_and_failures_on_two_relays_lose_nothing_and_keep_the_order(make_app: MakeApp) -> None:
    """Events recorded while the one before them is being sent, retried or not yet held: each delivered
    once, in its instance's order, by one relay at a time."""
    refused: set[str] = set()

    async def respond(d: Delivery) -> int:
        await asyncio.sleep(0.003)
        if zlib.crc32(d.event_id.encode()) % 4 == 0 and d.event_id not in refused:  # a quarter, once
            refused.add(d.event_id)
            return 503
        return 200

    async with Receiver(respond) as receiver:
        apps = [
            make_app(
                outbox_endpoint=receiver.url,
                outbox_initial_backoff=0.02,
                outbox_max_backoff=0.1,
                worker_id=f"relay-{n}",
            )
            for n in range(2)
        ]
        emits = [register(app) for app in apps]
        async with apps[0], apps[1]:
            handles = [await emits[n % 2].start_with_id(f"burst-{n}", 12) for n in range(10)]
            ids = [eid for h in handles for eid in await h.result(timeout=30)]
            await until(lambda: all_delivered(apps[0], len(ids)), timeout=60, what="all delivered")
    assert sorted(receiver.ids()) == sorted(ids)  # each once: nothing crashed
    assert len(receiver.deliveries) == len(ids) + len(refused) and refused
    assert set(receiver.max_in_flight.values()) == {1}
    check_order(receiver.deliveries)


# -- bad input -------------------------------------------------------------------------------------
async def _handler(event: geste.OutboxEvent) -> None:
    return None


def _sync_handler(event: geste.OutboxEvent) -> None:
    return None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"outbox_endpoint": "http://h/x", "outbox_handler": _handler}, "exclusive"),
        ({"outbox_endpoint": "ftp://h/x"}, "http:// or https://"),
        ({"outbox_endpoint": "http://"}, "with a host"),
        ({"outbox_endpoint": 42}, "URL string"),
        ({"outbox_handler": _sync_handler}, "async callable"),
        ({"outbox_handler": "not callable"}, "async callable"),
        ({"outbox_handler": _handler, "outbox_max_attempts": 0}, "outbox_max_attempts"),
        ({"outbox_handler": _handler, "outbox_max_attempts": True}, "outbox_max_attempts"),
        ({"outbox_handler": _handler, "outbox_max_attempts": -3}, "outbox_max_attempts"),
        ({"outbox_handler": _handler, "outbox_max_attempts": 2.0}, "outbox_max_attempts"),
        ({"outbox_handler": _handler, "outbox_max_attempts": "10"}, "outbox_max_attempts"),
        ({"outbox_handler": _handler, "outbox_initial_backoff": -1}, "outbox_initial_backoff"),
        ({"outbox_handler": _handler, "outbox_initial_backoff": 0}, "outbox_initial_backoff"),
        (
            {"outbox_handler": _handler, "outbox_initial_backoff": 5, "outbox_max_backoff": 1},
            "outbox_max_backoff",
        ),
        ({"outbox_handler": _handler, "outbox_timeout": 0}, "outbox_timeout"),
        ({"outbox_handler": _handler, "outbox_timeout": "10"}, "outbox_timeout"),
        ({"outbox_endpoint": "http://h/x", "outbox_headers": {"X-A": "1\r\nX-B: 2"}}, "not a valid header"),
        ({"outbox_endpoint": "http://h/x", "outbox_headers": {"Bad Name": "1"}}, "not a valid header"),
        ({"outbox_endpoint": "http://h/x", "outbox_headers": {"X-A": 1}}, "not a valid header"),
        ({"outbox_endpoint": "http://h/x", "outbox_headers": {"Content-Type": "text/plain"}}, "Content-Type"),
        ({"outbox_endpoint": "http://h/x", "outbox_headers": ["X-A"]}, "mapping"),
        ({"outbox_handler": _handler, "outbox_headers": {"X-A": "1"}}, "outbox_endpoint"),
    ],
)
def test_bad_outbox_configuration_is_refused_at_construction(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        geste.App(f"sqlite:///{tmp_path / 'x.db'}", **options)


def test_valid_outbox_configuration_is_kept(tmp_path: Path) -> None:
    from datetime import timedelta

    app = geste.App(
        f"sqlite:///{tmp_path / 'x.db'}",
        outbox_endpoint="https://hooks.example/in",
        outbox_headers={"Authorization": "Bearer t"},
        outbox_max_attempts=4,
        outbox_initial_backoff=timedelta(milliseconds=500),
        outbox_max_backoff=2,
        outbox_timeout=3,
    )
    config = app.outbox_config
    assert (config.endpoint, config.max_attempts, config.initial_backoff, config.max_backoff) == (
        "https://hooks.example/in",
        4,
        0.5,
        2.0,
    )
    assert [config.backoff(n) for n in (1, 2, 3, 4, 100)] == [0.5, 1.0, 2.0, 2.0, 2.0]
    default = geste.App(f"sqlite:///{tmp_path / 'y.db'}").outbox_config
    assert default.enabled is False
    assert (default.max_attempts, default.initial_backoff, default.max_backoff) == (None, 1.0, 300.0)
    assert [default.backoff(n) for n in (1, 9, 10, 10_000)] == [1.0, 256.0, 300.0, 300.0]
    explicit = geste.App(f"sqlite:///{tmp_path / 'z.db'}", outbox_max_attempts=None).outbox_config
    assert explicit.max_attempts is None


async def test_bad_send_event_arguments_fail_the_workflow_and_emit_nothing(make_app: MakeApp) -> None:
    app = make_app(outbox_handler=_handler)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext, case: str) -> str:
        if case == "type":
            return await ctx.send_event("")
        if case == "subject":
            return await ctx.send_event("t", subject="")
        if case == "id":
            return await ctx.send_event("t", event_id="x" * 201)
        return await ctx.send_event("t", {"not json": object()})

    async with app:
        for case, error in (
            ("type", TypeError),
            ("subject", TypeError),
            ("id", TypeError),
            ("data", SerializationError),
        ):
            handle = await flow.start(case)
            with pytest.raises(geste.errors.WorkflowFailed) as failed:
                await handle.result(timeout=10)
            assert isinstance(failed.value.__cause__, error), failed.value.error
        assert await app.outbox() == []
        with pytest.raises(ConfigurationError, match="unknown outbox status"):
            await app.outbox(status="lost")
        with pytest.raises(ConfigurationError, match="limit"):
            await app.outbox(limit=0)
