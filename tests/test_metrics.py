"""Metrics (``app.metrics``, ``GET /metrics``, ``geste worker --metrics-port``), on both backends.

Counters are checked for their exact values after known runs; wake-ups for the cause they are counted
under (a local poke, a timer, the poll net, LISTEN/NOTIFY) and for the latency measured; a lease taken
over from a killed worker process; a listener reconnect after ``pg_terminate_backend``; the text, read
back with a strict parser of the Prometheus exposition format 0.0.4, and the token rule.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

import geste
from geste._metrics import Counter, Histogram, MetricFamily, MetricSample, gauge, render
from geste.errors import ConfigurationError

from .apps.crash_app import build_app
from .conftest import POSTGRES_URL, _admin, die_with_parent, with_query
from .processes import ROOT, Cluster
from .support import MovableClock, raw_query, wait_status, wait_until

MakeApp = Callable[..., geste.App]
WEIRD = 'we"ird\\name\nwith a newline'
"""A workflow name that needs every escape of the text format."""


# -- a strict parser of the text format ------------------------------------------------------------------
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")


@dataclass
class Family:
    name: str
    type: str | None = None
    help: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, sample_name: str | None = None, **labels: str) -> float:
        found = [v for n, ls, v in self.samples if n == (sample_name or self.name) and ls == labels]
        assert len(found) == 1, (sample_name, labels, self.samples)
        return found[0]


def _unescape(text: str, quote: bool) -> str:
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            assert i + 1 < len(text), f"dangling backslash in {text!r}"
            nxt = text[i + 1]
            allowed = {"\\": "\\", "n": "\n", **({'"': '"'} if quote else {})}
            assert nxt in allowed, f"unknown escape \\{nxt} in {text!r}"
            out.append(allowed[nxt])
            i += 2
            continue
        assert not (quote and char == '"'), f"unescaped quote in {text!r}"
        assert char != "\n"
        out.append(char)
        i += 1
    return "".join(out)


def _number(text: str) -> float:
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    if text == "NaN":
        return math.nan
    assert _FLOAT.match(text), f"not a number: {text!r}"
    return float(text)


def _sample(line: str) -> tuple[str, dict[str, str], float]:
    match = _NAME.match(line)
    assert match, f"no metric name at the start of {line!r}"
    name, rest = match.group(), line[match.end() :]
    labels: dict[str, str] = {}
    if rest.startswith("{"):
        i = 1
        while True:
            label = _LABEL_NAME.match(rest, i)
            assert label, f"bad label name in {line!r}"
            assert not label.group().startswith("__"), line
            assert rest[label.end() : label.end() + 2] == '="', f'expected =" in {line!r}'
            j = start = label.end() + 2
            while rest[j] != '"':
                j += 2 if rest[j] == "\\" else 1
            assert label.group() not in labels, f"label given twice in {line!r}"
            labels[label.group()] = _unescape(rest[start:j], quote=True)
            i = j + 1
            if rest[i] == "}":
                rest = rest[i + 1 :]
                break
            assert rest[i] == ",", f"expected , or }} in {line!r}"
            i += 1
    assert rest.startswith(" ") and not rest.startswith("  "), f"expected one space in {line!r}"
    parts = rest[1:].split(" ")
    assert len(parts) in (1, 2), line
    if len(parts) == 2:
        assert re.fullmatch(r"-?\d+", parts[1]), f"bad timestamp in {line!r}"
    return name, labels, _number(parts[0])


def parse_exposition(text: str) -> dict[str, Family]:
    """Every family of a Prometheus text exposition (format 0.0.4), checked strictly as it is read."""
    assert text.endswith("\n"), "the exposition ends with a line feed"
    families: dict[str, Family] = {}
    current: Family | None = None
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            keyword, name, rest = line[2:6], *line[7:].split(" ", 1)
            assert _NAME.fullmatch(name), line
            family = families.setdefault(name, Family(name))
            assert not family.samples, f"{keyword} of {name} after its samples"
            if keyword == "HELP":
                assert family.help is None, f"HELP of {name} given twice"
                family.help = _unescape(rest, quote=False)
            else:
                assert family.type is None, f"TYPE of {name} given twice"
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), line
                family.type = rest
            current = family
            continue
        assert not line.startswith("#"), f"unexpected comment {line!r}"
        assert line.strip(), "blank line"
        name, labels, value = _sample(line)
        owner = families.get(name)
        if owner is None:
            base = re.sub(r"_(bucket|sum|count)\Z", "", name)
            owner = families.get(base)
            assert owner is not None and owner.type == "histogram", f"{name} belongs to no declared family"
        assert owner is current, f"the samples of {owner.name} are not together"
        key = (name, tuple(sorted(labels.items())))
        assert key not in seen, f"series given twice: {key}"
        seen.add(key)
        owner.samples.append((name, labels, value))
    for family in families.values():
        assert family.type is not None and family.help, f"{family.name} lacks its TYPE or HELP"
        if family.type == "counter":
            assert family.name.endswith("_total"), family.name
            assert all(v >= 0 and math.isfinite(v) for _, _, v in family.samples), family
        if family.type == "histogram":
            _check_histogram(family)
    return families


def _check_histogram(family: Family) -> None:
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for name, labels, value in family.samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(key, {"buckets": []})
        suffix = name.removeprefix(family.name)
        assert suffix in ("_bucket", "_sum", "_count"), name
        if suffix == "_bucket":
            entry["buckets"].append((_number(labels["le"]), value))
        else:
            assert "le" not in labels
            entry[suffix] = value
    for key, entry in series.items():
        buckets = entry["buckets"]
        bounds = [b for b, _ in buckets]
        counts = [c for _, c in buckets]
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), key
        assert bounds[-1] == math.inf, f"{family.name}{key} lacks its +Inf bucket"
        assert counts == sorted(counts), f"{family.name}{key}: buckets not cumulative"
        assert counts[-1] == entry["_count"], key
        assert "_sum" in entry, key


async def exposition(app: geste.App) -> dict[str, Family]:
    return parse_exposition(await app.metrics.exposition())


# -- the registry and the text, without a database ------------------------------------------------------
def test_the_text_format_escapes_and_buckets() -> None:
    steps = Counter("x_steps_total", "Steps\\by kind,\nper line.", ("kind", "workflow"))
    steps.values[("activity", WEIRD)] += 2
    steps.inc(("now", "plain"))
    latency = Histogram("x_latency_seconds", "Latency.", ("cause",), (0.1, 1.0), keys=["poll"])
    for value in (0.1, 0.5, 1.0, 7.0):  # a value equal to a bound counts in that bound's bucket
        latency.observe("notify", value)
    families = [steps.family(), latency.family(), gauge("x_depth", "Depth.", {(): 3.25})]
    text = render(families)
    parsed = parse_exposition(text)
    assert parsed["x_steps_total"].help == "Steps\\by kind,\nper line."
    assert parsed["x_steps_total"].value(kind="activity", workflow=WEIRD) == 2
    assert parsed["x_steps_total"].value(kind="now", workflow="plain") == 1
    assert 'workflow="we\\"ird\\\\name\\nwith a newline"' in text
    hist = parsed["x_latency_seconds"]
    assert hist.value("x_latency_seconds_bucket", cause="notify", le="0.1") == 1
    assert hist.value("x_latency_seconds_bucket", cause="notify", le="1") == 3
    assert hist.value("x_latency_seconds_bucket", cause="notify", le="+Inf") == 4
    assert hist.value("x_latency_seconds_count", cause="notify") == 4
    assert hist.value("x_latency_seconds_sum", cause="notify") == pytest.approx(8.6)
    assert hist.value("x_latency_seconds_count", cause="poll") == 0  # known series show at 0
    assert parsed["x_depth"].value() == 3.25
    snapshot = geste.MetricsSnapshot({f.name: f for f in families})
    assert snapshot.value("x_steps_total") == 3
    assert snapshot.value("x_latency_seconds_bucket", le="1") == 3
    assert snapshot.value("x_latency_seconds_count", cause="notify") == 4
    assert snapshot.value("x_nothing_total") == 0
    assert snapshot.text() == text
    assert (
        render([MetricFamily("x_empty", "gauge", "Nothing yet.")])
        == "# HELP x_empty Nothing yet.\n# TYPE x_empty gauge\n"
    )
    assert MetricSample("x", {}, 1.0).value == 1.0


def test_the_parser_refuses_what_prometheus_refuses() -> None:
    good = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n"
    parse_exposition(good)
    for bad in (
        good.rstrip("\n"),  # no final line feed
        "a_total 1\n",  # no TYPE nor HELP
        good + "# TYPE a_total counter\n",  # TYPE twice
        '# HELP a_total A.\n# TYPE a_total counter\na_total{k="x\\q"} 1\n',  # unknown escape
        '# HELP a_total A.\n# TYPE a_total counter\na_total{k="x""} 1\n',  # stray quote
        "# HELP a_total A.\n# TYPE a_total counter\na_total one\n",  # not a number
        '# HELP a A.\n# TYPE a histogram\na_bucket{le="1"} 2\na_bucket{le="+Inf"} 1\na_sum 1\na_count 1\n',
    ):
        with pytest.raises(AssertionError):
            parse_exposition(bad)


# -- counters, exactly ------------------------------------------------------------------------------------
def build_counted(app: geste.App) -> None:
    @app.activity(retry=geste.RetryPolicy(max_attempts=3, initial_interval=0.001))
    async def flaky(ctx: geste.ActivityContext, x: int) -> int:
        if ctx.attempt < 3:
            raise ConnectionError("not yet")
        return 2 * x

    @app.activity(retry=geste.RetryPolicy(max_attempts=2, initial_interval=0.001))
    async def broken(ctx: geste.ActivityContext) -> None:
        raise RuntimeError("always")

    @app.workflow
    async def order(ctx: geste.WorkflowContext, x: int) -> int:
        ctx.now()
        return await flaky(ctx, x)

    @app.workflow(name=WEIRD)
    async def doomed(ctx: geste.WorkflowContext) -> None:
        await broken(ctx)


async def test_counters_after_a_failing_then_succeeding_activity(make_app: MakeApp, db_url: str) -> None:
    app = make_app()
    build_counted(app)
    async with app:
        assert await (await app.start_workflow("order", 21)).result(timeout=10) == 42
        with pytest.raises(geste.errors.WorkflowFailed):
            await (await app.start_workflow(WEIRD)).result(timeout=10)
        snap = await app.metrics.snapshot()
        families = await exposition(app)

    assert snap.value("geste_workflows_started_total", workflow="order") == 1
    assert snap.value("geste_workflows_started_total", workflow=WEIRD) == 1
    assert snap.value("geste_workflows_ended_total", workflow="order", status="completed") == 1
    assert snap.value("geste_workflows_ended_total", workflow=WEIRD, status="failed") == 1
    assert snap.value("geste_workflows_ended_total") == 2
    # flaky: 2 failed attempts, each retried, then a success; broken: 2 failed attempts, 1 retried
    assert snap.value("geste_activity_attempts_total", activity="flaky") == 3
    assert snap.value("geste_activity_attempt_failures_total", activity="flaky") == 2
    assert snap.value("geste_activity_retries_total", activity="flaky") == 2
    assert snap.value("geste_activity_failures_total", activity="flaky") == 0
    assert snap.value("geste_activity_attempts_total", activity="broken") == 2
    assert snap.value("geste_activity_attempt_failures_total", activity="broken") == 2
    assert snap.value("geste_activity_retries_total", activity="broken") == 1
    assert snap.value("geste_activity_failures_total", activity="broken") == 1
    # one history row per step: flaky's and broken's outcomes (attempts are not rows) and ctx.now()
    assert snap.value("geste_steps_total", kind="activity") == 2
    assert snap.value("geste_steps_total", kind="now") == 1
    assert snap.value("geste_steps_total") == 3
    # both ran at once in this process (created already claimed): no claim, no take-over
    assert snap.value("geste_wakeup_latency_seconds_count", cause="start") == 2
    assert snap.value("geste_wakeup_latency_seconds_count") == 2
    assert snap.value("geste_claimed_instances_total") == 0
    assert snap.value("geste_lease_takeovers_total") == 0
    postgres = db_url.startswith("postgresql")
    assert snap.value("geste_group_commit_batch_size_count", kind="end") == (2 if postgres else 0)
    assert snap.value("geste_group_commit_batch_size_sum", kind="end") == (2 if postgres else 0)
    assert (snap.value("geste_group_commit_batch_size_count", kind="step") >= 1) is postgres
    # the same numbers in the text, with the odd workflow name escaped and read back
    ended = families["geste_workflows_ended_total"]
    assert ended.value(workflow=WEIRD, status="failed") == 1
    assert families["geste_activity_retries_total"].value(activity="flaky") == 2
    assert families["geste_instances"].value(status="completed") == 1
    assert families["geste_instances"].value(status="failed") == 1
    assert families["geste_instances_runnable"].value() == 0
    assert families["geste_queue_up"].value() == 1
    assert families["geste_worker_free_slots"].value() == app.concurrency
    assert families["geste_worker_running"].value() == 0


async def test_gauges_are_read_at_scrape_time(make_app: MakeApp, db_url: str) -> None:
    clock = MovableClock()
    app = make_app(run_worker=False, clock=clock)

    @app.workflow
    async def idle(ctx: geste.WorkflowContext) -> None:
        await ctx.wait_event("never")

    families = await exposition(app)  # not open: what this process knows only
    assert "geste_instances" not in families and "geste_worker_running" not in families
    assert families["geste_listener_connected"].value() == 0
    async with app:
        for _ in range(3):
            await idle.start()
        families = await exposition(app)
        assert families["geste_instances"].value(status="pending") == 3
        assert families["geste_instances_runnable"].value() == 3  # the queue depth
        assert families["geste_leases_held"].value() == 0
        assert "geste_worker_running" not in families  # no worker in this process
        for name in ("geste_outbox_pending", "geste_outbox_dead", "geste_outbox_oldest_pending_seconds"):
            assert (families[name].type, families[name].value()) == ("gauge", 0)

        emitted = clock() - 90  # the outbox: one dead event, one waiting behind it, emitted 90 s ago
        for seq, status in ((1, "dead"), (2, "pending")):
            await raw_query(
                db_url,
                "INSERT INTO geste_outbox (event_id, instance_id, step_seq, event_type, source, status,"
                " attempts, created_at, updated_at) VALUES ($1, 'i', $2, 't', 's', $3, 0, $4, $4)",
                f"i:{seq}",
                seq,
                status,
                emitted,
            )
        families = await exposition(app)
        assert families["geste_outbox_pending"].value() == 1
        assert families["geste_outbox_dead"].value() == 1
        assert 90 <= families["geste_outbox_oldest_pending_seconds"].value() < 150
        clock.advance(3600)  # read at the scrape: an hour later, an hour older
        families = await exposition(app)
        assert 3690 <= families["geste_outbox_oldest_pending_seconds"].value() < 3750


# -- wake-up causes and latency -------------------------------------------------------------------------
def build_waiters(app: geste.App) -> None:
    @app.workflow
    async def waiter(ctx: geste.WorkflowContext, key: str) -> str:
        return str((await ctx.wait_event("go", match={"key": key})).data["key"])

    @app.workflow
    async def sleeper(ctx: geste.WorkflowContext, seconds: float) -> str:
        await ctx.sleep(seconds)
        return "slept"


def latency(snap: geste.MetricsSnapshot) -> dict[str, tuple[float, float]]:
    """Count and sum of the wake-up latency histogram, per cause."""
    return {
        cause: (
            snap.value("geste_wakeup_latency_seconds_count", cause=cause),
            snap.value("geste_wakeup_latency_seconds_sum", cause=cause),
        )
        for cause in ("start", "notify", "local", "timer", "poll", "backlog")
    }


def woken(before: geste.MetricsSnapshot, after: geste.MetricsSnapshot) -> dict[str, float]:
    """The wake-ups counted between two snapshots, per cause (causes with none left out)."""
    old, new = latency(before), latency(after)
    return {cause: new[cause][0] - old[cause][0] for cause in new if new[cause][0] != old[cause][0]}


async def test_wake_ups_by_local_poke_and_by_timer(make_app: MakeApp) -> None:
    app = make_app(listen_notify=False, poll_interval=30.0)  # no poll round during the test
    build_waiters(app)
    async with app:
        # an event sent by this process wakes its worker directly: local
        local = await app.start_workflow("waiter", "a")
        await wait_status(app, local.instance_id, geste.Status.WAITING)
        before = await app.metrics.snapshot()
        await app.send_event("go", {"key": "a"})
        assert await local.result(timeout=10) == "a"
        assert woken(before, await app.metrics.snapshot()) == {"local": 1}

        # a durable sleep ends by the worker's local timer: latency is how late the run starts
        before = await app.metrics.snapshot()
        assert await (await app.start_workflow("sleeper", 0.2)).result(timeout=10) == "slept"
        after = await app.metrics.snapshot()
        assert woken(before, after) == {"start": 1, "timer": 1}
        assert 0 <= latency(after)["timer"][1] - latency(before)["timer"][1] < 1.0
        assert after.value("geste_lease_takeovers_total") == 0


async def test_wake_ups_found_by_polling(make_app: MakeApp) -> None:
    clock = MovableClock()
    app = make_app(listen_notify=False, clock=clock)
    client = make_app(listen_notify=False, run_worker=False, clock=clock)
    build_waiters(app)
    build_waiters(client)
    claiming: list[None] = []  # the worker's claim statements in flight
    claim = app.storage.claim

    async def tracked(*args: Any, **kwargs: Any) -> Any:
        claiming.append(None)
        try:
            return await claim(*args, **kwargs)
        finally:
            claiming.pop()

    async with app, client:
        app.storage.claim = tracked  # type: ignore[method-assign]
        # an event sent by another App (another process, as far as the worker knows) is found by polling
        polled = await app.start_workflow("waiter", "b")
        await wait_status(app, polled.instance_id, geste.Status.WAITING)
        before = await app.metrics.snapshot()
        await client.send_event("go", {"key": "b"})
        assert await polled.result(timeout=10) == "b"
        after = await app.metrics.snapshot()
        assert woken(before, after) == {"poll": 1}
        assert 0 <= latency(after)["poll"][1] - latency(before)["poll"][1] < 5

        # a timer whose time came while the worker slept (the clock jumped 100 s past it): found by the
        # poll net, and the latency counts from the timer's due time, not from the claim
        timer_rounds = after.value("geste_claim_rounds_total", cause="timer")
        late = await app.start_workflow("sleeper", 1000.0)
        await wait_status(app, late.instance_id, geste.Status.WAITING)

        async def timer_round_done() -> bool:  # the alarm set at suspension rang (nothing due yet)
            snap = await app.metrics.snapshot()
            return snap.value("geste_claim_rounds_total", cause="timer") > timer_rounds

        await wait_until(timer_round_done, "the worker's round for the new timer")
        before = await app.metrics.snapshot()
        # the jump comes while the worker sleeps, not while a claim is in flight: that claim would return
        # the sleeper's run_at (not due at its own time) as the next, due by the clock after the jump, and
        # the worker would wake for it at once, as for a timer (seen under load)
        await wait_until(lambda: not claiming, "the worker to sleep between two claims")
        clock.advance(1100.0)
        assert await late.result(timeout=10) == "slept"
        after = await app.metrics.snapshot()
        assert woken(before, after) == {"poll": 1}
        assert 100 <= latency(after)["poll"][1] - latency(before)["poll"][1] < 130
        assert after.value("geste_wakeup_latency_seconds_bucket", cause="poll", le="60") == before.value(
            "geste_wakeup_latency_seconds_bucket", cause="poll", le="60"
        )
        assert after.value("geste_lease_takeovers_total") == 0
        assert after.value("geste_claim_rounds_empty_total", cause="poll") >= 1  # idle polls


@pytest.fixture
def own_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own: channels are per database, so the notifications of
    other tests (other schemas of the shared database) cannot wake its listeners."""
    name = f"geste_metrics_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_wake_ups_through_notify_and_after_a_lost_notification(own_database: str) -> None:
    """With LISTEN/NOTIFY, another process's event wakes the worker through a notification; from a
    process that sends no NOTIFY (a lost notification, as far as the worker can tell), the poll net
    finds it (every ``notify_fallback_interval`` while listening)."""
    pg_url = own_database
    client = geste.App(pg_url, run_worker=False)  # notifies
    silent = geste.App(pg_url, run_worker=False, listen_notify=False)  # does not
    build_waiters(client)
    build_waiters(silent)
    async with client, silent:
        for fallback, sender, cause in ((60.0, client, "notify"), (0.2, silent, "poll")):
            app = geste.App(pg_url, poll_interval=0.05, lock_timeout=60.0, notify_fallback_interval=fallback)
            build_waiters(app)
            async with app:
                await wait_until(lambda: app.listener_status().state == "listening", "the listener")  # noqa: B023
                instance = await app.start_workflow("waiter", cause)
                await wait_status(app, instance.instance_id, geste.Status.WAITING)
                before = await app.metrics.snapshot()
                await sender.send_event("go", {"key": cause})
                assert await instance.result(timeout=10) == cause
                after = await app.metrics.snapshot()
            assert woken(before, after) == {cause: 1}
            assert 0 <= latency(after)[cause][1] - latency(before)[cause][1] < 5
            heard = after.value("geste_listener_notifications_total", channel="geste_workflow_resumable")
            assert heard == (1 if sender is client else 0)
            assert after.value("geste_listener_connected") == 1


# -- a lease taken over from a killed worker process ----------------------------------------------------
async def test_a_claim_says_when_it_takes_over_an_expired_lease(make_app: MakeApp) -> None:
    app = make_app(run_worker=False)

    @app.workflow
    async def idle(ctx: geste.WorkflowContext) -> None:
        await ctx.wait_event("never")

    async with app:
        await idle.start()
        now = app.clock()
        (first,) = await app.storage.claim("w1", now, now + 1.0, 10, workflows=["idle"])
        assert first.lease_expired_at is None  # a free instance
        assert (
            await app.storage.claim("w2", now + 0.5, now + 2.0, 10, workflows=["idle"]) == []
        )  # its lease still holds
        (second,) = await app.storage.claim("w2", now + 5.0, now + 6.0, 10, workflows=["idle"])
        assert second.lease_expired_at == pytest.approx(now + 1.0)  # taken over: when w1's ran out
        await app.storage.release([second.lease], now + 6.0)
        (third,) = await app.storage.claim("w3", now + 7.0, now + 8.0, 10, workflows=["idle"])
        assert third.lease_expired_at is None  # released, not expired: no take-over


async def test_a_lease_taken_over_from_a_killed_worker_is_counted(cluster: Cluster, db_url: str) -> None:
    async with cluster.client() as client:
        first = await cluster.spawn("w1")
        handle = await client.start_workflow("pipeline", 7)
        started = await wait_until(lambda: cluster.entries(activity="block"), "block to start in w1")
        assert started[0]["worker"] == "w1"
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL

        dead = await cluster.row(handle.instance_id)
        cluster.go(handle.instance_id)

        # w2's own lease is long (a stall of w2 under load must not expire it: it would take the instance
        # over from itself and count twice); its poll net stays at 1 s on PostgreSQL
        second = build_app(
            db_url,
            log=str(cluster.log),
            markers=str(cluster.markers),
            worker_id="w2",
            lock_timeout=30.0,
            notify_fallback_interval=1.0,
            poll_interval=0.05,
        )
        async with second:
            assert await handle.result(timeout=30) == ["one:7", "two:7", "block:7", "three:7"]

            # the client (another App) can read the end as soon as it commits, before w2's run resumes
            # from that commit and counts it (its steps, its end): wait for w2 to have counted the end
            async def counted() -> geste.MetricsSnapshot | None:
                found = await second.metrics.snapshot()
                ended = found.value("geste_workflows_ended_total", workflow="pipeline", status="completed")
                return found if ended == 1 else None

            snap = await wait_until(counted, "w2 to count the end of the run")
            now = second.clock()
    assert snap.value("geste_lease_takeovers_total", workflow="pipeline") == 1
    assert snap.value("geste_lease_takeovers_total") == 1
    # found by the poll net once the dead lease ran out (on PostgreSQL, a notification of another test's
    # schema may wake the worker first: channels are per database); the latency counts from the lease's
    # end, not from the instance's start
    found = woken(geste.MetricsSnapshot(), snap)
    assert sum(found.values()) == 1 and set(found) <= (
        {"poll", "notify"} if "postgres" in db_url else {"poll"}
    )
    assert 0 <= snap.value("geste_wakeup_latency_seconds_sum") <= now - dead["lock_expires_at"]
    assert snap.value("geste_steps_total", kind="activity") == 2  # block and three, run by w2


# -- the listener's connection killed -------------------------------------------------------------------
async def test_a_listener_reconnect_is_counted(pg_url: str) -> None:
    name = f"metrics-{uuid.uuid4().hex[:10]}"
    app = geste.App(
        with_query(pg_url, application_name=name),
        poll_interval=0.05,
        lock_timeout=2.0,
        notify_reconnect_delay=0.05,
    )
    async with app:
        await wait_until(lambda: app.listener_status().state == "listening", "the listener")
        snap = await app.metrics.snapshot()
        assert snap.value("geste_listener_reconnects_total") == 0
        assert snap.value("geste_listener_connected") == 1

        async def backend() -> list[dict[str, Any]]:
            return await raw_query(
                pg_url, "SELECT pid FROM pg_stat_activity WHERE application_name = $1", f"{name}-listener"
            )

        (listener,) = await wait_until(backend, "the listener's backend")
        await raw_query(pg_url, "SELECT pg_terminate_backend($1)", listener["pid"])

        async def reconnected() -> bool:
            if app.listener_status().state != "listening":
                return False
            return (await app.metrics.snapshot()).value("geste_listener_reconnects_total") == 1

        await wait_until(reconnected, "the listener to reconnect")
        (again,) = await wait_until(backend, "the new listener backend")
        assert again["pid"] != listener["pid"]
        families = await exposition(app)
        assert families["geste_listener_reconnects_total"].value() == 1
        assert families["geste_listener_connected"].value() == 1
        assert app.listener_status().reconnects == 1


# -- outbox deliveries ------------------------------------------------------------------------------------
async def test_outbox_deliveries_and_failures_are_counted(make_app: MakeApp) -> None:
    calls: list[str] = []

    async def deliver(event: geste.OutboxEvent) -> None:
        calls.append(event.event_id)
        if len(calls) == 1:
            raise ConnectionError("the receiver is down")

    app = make_app(outbox_handler=deliver, outbox_initial_backoff=0.01)

    @app.workflow
    async def emit(ctx: geste.WorkflowContext) -> None:
        await ctx.send_event("thing.done", {"n": 1})

    async with app:
        await (await emit.start()).result(timeout=10)
        await wait_until(lambda: len(calls) == 2, "the second delivery attempt")

        async def delivered() -> geste.MetricsSnapshot | None:
            snap = await app.metrics.snapshot()
            return snap if snap.value("geste_outbox_deliveries_total") == 1 else None

        snap = await wait_until(delivered, "the delivery to be counted")
    assert snap.value("geste_outbox_delivery_failures_total", outcome="retry") == 1
    assert snap.value("geste_outbox_delivery_failures_total", outcome="dead") == 0
    assert snap.value("geste_steps_total", kind="send_event") == 1


# -- over HTTP --------------------------------------------------------------------------------------------
async def test_get_metrics_parses_and_follows_the_token_rule(make_app: MakeApp) -> None:
    app = make_app()
    build_counted(app)
    async with app:
        await (await app.start_workflow("order", 1)).result(timeout=10)
        transport = httpx.ASGITransport(app=app.asgi(token="s3cret"))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            refused = await http.get("/metrics")
            assert refused.status_code == 401
            assert refused.json()["error"]["type"] == "Unauthorized"
            wrong = await http.get("/metrics", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            answer = await http.get("/metrics?scraper=any", headers={"Authorization": "Bearer s3cret"})
            assert (
                await http.post("/metrics", headers={"Authorization": "Bearer s3cret"})
            ).status_code == 405
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            open_answer = await http.get("/metrics")
        async with httpx.AsyncClient(transport=transport, base_url="http://metrics.example:8000") as http:
            assert (await http.get("/metrics")).status_code == 403  # a DNS name without a token
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = parse_exposition(answer.text)
    assert families["geste_workflows_ended_total"].value(workflow="order", status="completed") == 1
    assert families["geste_activity_attempts_total"].value(activity="flaky") == 3
    assert families["geste_wakeup_latency_seconds"].type == "histogram"
    assert families["geste_steps_total"].type == "counter"
    assert families["geste_instances"].type == "gauge"
    assert families["geste_outbox_dead"].type == "gauge" and families["geste_outbox_dead"].value() == 0
    assert families["geste_outbox_oldest_pending_seconds"].type == "gauge"
    assert open_answer.status_code == 200
    parse_exposition(open_answer.text)


def _get(port: int, path: str = "/metrics", **headers: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10)


async def test_the_metrics_only_server(make_app: MakeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GESTE_HTTP_TOKEN", raising=False)
    app = make_app()
    build_counted(app)
    async with app:
        await (await app.start_workflow("order", 1)).result(timeout=10)
        server = await app.metrics.serve(port=0)
        try:
            answer = await asyncio.to_thread(_get, server.port)
            assert answer.status_code == 200
            assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            families = parse_exposition(answer.text)
            assert families["geste_workflows_ended_total"].value(workflow="order", status="completed") == 1
            assert (await asyncio.to_thread(_get, server.port, "/health")).status_code == 404
            post = await asyncio.to_thread(
                lambda: httpx.post(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
            )
            assert post.status_code == 405
            assert (await asyncio.to_thread(_get, server.port, Host="evil.example")).status_code == 403
        finally:
            await server.close()
        guarded = await app.metrics.serve(port=0, token="s3cret")
        try:
            assert (await asyncio.to_thread(_get, guarded.port)).status_code == 401
            fine = await asyncio.to_thread(
                _get, guarded.port, Authorization="Bearer s3cret", Host="w1.example"
            )
            assert fine.status_code == 200
            parse_exposition(fine.text)
        finally:
            await guarded.close()
        with pytest.raises(ConfigurationError):
            await app.metrics.serve(port=70000)
        with pytest.raises(ConfigurationError):
            await app.metrics.serve(port=0, token="with space")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_geste_worker_serves_its_metrics(db_url: str, tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "worker.log"
    env = {key: value for key, value in os.environ.items() if key != "GESTE_HTTP_TOKEN"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "geste.cli", "worker", "tests.apps.cli_app:app", "--concurrency", "4",
             "--metrics-port", str(port)],
            cwd=ROOT, env={**env, "GESTE_DATABASE_URL": db_url}, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        await wait_until(
            lambda: "started" in log.read_text() or process.poll() is not None, "the worker", timeout=60
        )
        assert process.poll() is None, log.read_text()
        client = geste.App(db_url, run_worker=False)

        @client.workflow
        async def compute(ctx: geste.WorkflowContext, x: int) -> dict[str, int]:
            raise AssertionError("runs in the worker process")

        async with client:
            assert await (await compute.start(5)).result(timeout=15) == {"x": 5, "y": 10}

        # the end is read from the database as it commits; the worker process counts it (its steps, its
        # end) and frees the slot once its run resumes from that commit: scrape until it has
        async def scraped() -> dict[str, Family] | None:
            answer = await asyncio.to_thread(_get, port)
            assert answer.status_code == 200, log.read_text()
            families = parse_exposition(answer.text)
            ended = families["geste_workflows_ended_total"].samples  # none before the first end
            done = ended and families["geste_worker_running"].value() == 0
            return families if done else None

        families = await wait_until(scraped, "the worker to count the end of the run")
        assert families["geste_workflows_ended_total"].value(workflow="compute", status="completed") == 1
        assert families["geste_steps_total"].value(kind="activity") == 1
        assert families["geste_steps_total"].value(kind="sleep") == 1
        assert families["geste_worker_free_slots"].value() == 4
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
