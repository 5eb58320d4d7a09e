"""OpenTelemetry tracing (geste._tracing, docs/tracing.md): one trace per instance, linked to the caller's
span, across its runs, workers and children; spans of the activity attempts and the waits; nothing at all
when tracing is not configured or the API is absent. Spans collected by the SDK's in-memory exporter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import geste
from geste import _tracing

from .support import count_storage_calls, raw_query, wait_until

MakeApp = Callable[..., geste.App]


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A tracer provider that keeps every span in memory, made the global one for this test only (the
    API sets it once per process: the test restores the unset provider after)."""
    found = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(found))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield found
    provider.shutdown()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The reads of a trace context (``Storage.trace_context``), on both backends."""
    return count_storage_calls(monkeypatch, ["trace_context"])


class Boom(Exception):
    pass


def workflows(app: geste.App, failures: dict[str, int]) -> Any:
    @app.activity(retry=geste.RetryPolicy(max_attempts=3, initial_interval=0.01))
    async def flaky(ctx: geste.ActivityContext, n: int) -> int:
        if failures.get(ctx.instance_id, 0) < 1:
            failures[ctx.instance_id] = failures.get(ctx.instance_id, 0) + 1
            raise Boom("the first attempt fails")
        return n + 1

    @app.activity()
    async def double(ctx: geste.ActivityContext, n: int) -> int:
        return 2 * n

    @app.workflow()
    async def child(ctx: geste.WorkflowContext, n: int) -> int:
        return await double(ctx, n)

    @app.workflow()
    async def order(ctx: geste.WorkflowContext, n: int) -> int:
        m = await flaky(ctx, n)
        await ctx.sleep(0.05)
        event = await ctx.wait_event("go")
        return await ctx.run_child(child, m + int(event.data))

    return order


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


async def waits_for_event(app: geste.App, instance_id: str) -> bool:
    history = await app.get_handle(instance_id).history()
    return any(entry.kind == geste.StepKind.WAIT_EVENT for entry in history)


@pytest.mark.parametrize("cache", [0, 100])
async def test_one_trace_across_runs_workers_and_children(
    make_app: MakeApp, db_url: str, exporter: InMemorySpanExporter, reads: Counter[str], cache: int
) -> None:
    """An instance with a retried activity, a sleep and an event wait, resumed on a second App (another
    worker), with a child: every span is of the caller's trace; the start span is the caller's child."""
    failures: dict[str, int] = {}
    first = make_app(workflow_cache_size=cache)
    order = workflows(first, failures)
    caller_tracer = trace.get_tracer("the caller")
    async with first:
        with caller_tracer.start_as_current_span("caller") as caller:
            handle = await order.start(1)
        await wait_until(lambda: waits_for_event(first, handle.instance_id), "the event wait")
    second = make_app(workflow_cache_size=cache)
    workflows(second, failures)
    async with second:
        await second.send_event("go", 10)
        assert await second.get_handle(handle.instance_id).result(timeout=30) == 2 * (2 + 10)

    spans = list(exporter.get_finished_spans())
    ours = [s for s in spans if s.name.startswith("geste.")]
    caller_span = named(spans, "caller")[0]
    trace_id = caller.get_span_context().trace_id
    assert {s.context.trace_id for s in spans if s.context is not None} == {trace_id}

    (start,) = named(ours, "geste.start order")
    assert parent_id(start) == span_id(caller_span)
    assert start.attributes is not None
    assert start.attributes["geste.instance_id"] == handle.instance_id
    assert start.attributes["geste.created"] is True

    runs = named(ours, "geste.run order")
    assert len(runs) >= 3  # until the sleep, until the event wait, after the event (on the second App)
    assert {parent_id(r) for r in runs} == {span_id(start)}
    assert all(
        r.attributes is not None and r.attributes["geste.instance_id"] == handle.instance_id for r in runs
    )

    attempts = named(ours, "geste.activity flaky")
    assert [a.attributes["geste.attempt"] for a in attempts if a.attributes is not None] == [1, 2]
    assert [a.status.status_code for a in attempts] == [StatusCode.ERROR, StatusCode.UNSET]
    assert attempts[0].events and attempts[0].events[0].name == "exception"
    assert {parent_id(a) for a in attempts} <= {span_id(r) for r in runs}

    (slept,) = named(ours, "geste.wait sleep")  # once, though later runs replay it
    (waited,) = named(ours, "geste.wait event")
    assert parent_id(slept) == parent_id(waited) == span_id(start)
    assert waited.attributes is not None and waited.attributes["geste.wait"] == "go"
    assert slept.start_time is not None and waited.start_time is not None
    assert slept.start_time <= waited.start_time

    (child_start,) = named(ours, "geste.start child")
    assert parent_id(child_start) in {span_id(r) for r in runs}
    child_runs = named(ours, "geste.run child")
    assert child_runs and {parent_id(r) for r in child_runs} == {span_id(child_start)}
    (doubled,) = named(ours, "geste.activity double")
    assert parent_id(doubled) in {span_id(r) for r in child_runs}

    assert reads["trace_context"] == len(runs) + len(child_runs)  # one read by primary key per run
    stored = await raw_query(
        db_url, "SELECT instance_id, trace_context FROM geste_instances ORDER BY created_at"
    )
    assert [r["trace_context"].split("-")[1] for r in stored] == [format(trace_id, "032x")] * 2


async def test_a_start_without_a_current_span_is_a_root_and_activity_code_nests(
    make_app: MakeApp, exporter: InMemorySpanExporter
) -> None:
    app = make_app()

    @app.activity()
    def blocking(ctx: geste.ActivityContext) -> str:
        with trace.get_tracer("user code").start_as_current_span("inside"):
            return "done"

    @app.workflow()
    async def alone(ctx: geste.WorkflowContext) -> str:
        return await blocking(ctx)

    async with app:
        handle = await alone.start()
        assert await handle.result(timeout=10) == "done"
    spans = list(exporter.get_finished_spans())
    (start,) = named(spans, "geste.start alone")
    assert start.parent is None
    (run,) = named(spans, "geste.run alone")
    assert parent_id(run) == span_id(start)
    (attempt,) = named(spans, "geste.activity blocking")
    (inside,) = named(spans, "inside")  # a def activity's own span, in its thread: the attempt's child
    assert parent_id(attempt) == span_id(run) and parent_id(inside) == span_id(attempt)


async def test_an_instance_started_untraced_has_one_trace_drawn_from_its_id(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started while tracing was off (or by a schedule): no context stored; once tracing is on, its runs
    share one trace whose ids come from its id (the same on any worker), under a parent never recorded."""
    app = make_app(workflow_cache_size=0)

    @app.workflow()
    async def late(ctx: geste.WorkflowContext) -> str:
        await ctx.wait_event("go")
        await ctx.sleep(0.05)
        return "done"

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with app:
        handle = await late.start()
        await wait_until(lambda: waits_for_event(app, handle.instance_id), "the event wait")
        monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)  # tracing on from now
        await app.send_event("go")
        assert await handle.result(timeout=30) == "done"
    provider.shutdown()

    spans = list(exporter.get_finished_spans())
    runs = named(spans, "geste.run late")
    assert len(runs) == 2  # after the event (until the sleep), after the sleep
    expected = trace.get_current_span(_tracing.derived(handle.instance_id)).get_span_context()
    assert {r.context.trace_id for r in runs if r.context is not None} == {expected.trace_id}
    assert {parent_id(r) for r in runs} == {expected.span_id}
    assert not named(spans, "geste.start late")
    (waited,) = named(spans, "geste.wait sleep")
    assert waited.context is not None and waited.context.trace_id == expected.trace_id


async def test_not_configured_records_nothing(make_app: MakeApp, db_url: str, reads: Counter[str]) -> None:
    """The API installed but no tracer provider set (its default, a no-op): no span, no trace context
    stored, no error; the engine skips even the read of the trace context."""
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert _tracing.tracer() is None
    failures: dict[str, int] = {}
    app = make_app()
    order = workflows(app, failures)
    async with app:
        with trace.get_tracer("the caller").start_as_current_span("caller"):
            handle = await order.start(1)
        await wait_until(lambda: waits_for_event(app, handle.instance_id), "the event wait")
        await app.send_event("go", 10)
        assert await handle.result(timeout=30) == 24
    assert reads["trace_context"] == 0
    stored = await raw_query(db_url, "SELECT trace_context FROM geste_instances")
    assert [r["trace_context"] for r in stored] == [None, None]


@pytest.mark.parametrize("api", ["absent", "unused"])
def test_without_the_api_geste_works_and_never_imports_it(tmp_path: Any, api: str) -> None:
    """The extra absent (opentelemetry cannot be imported), or installed but never imported by the
    application: a workflow runs, and geste imports no module of OpenTelemetry."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys

        class NoOtel:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError("no opentelemetry here")
                return None

        if {api == "absent"}:
            sys.meta_path.insert(0, NoOtel())
        import geste
        from geste import _tracing

        app = geste.App("sqlite:///{tmp_path / "g.db"}")

        @app.activity()
        async def hello(ctx, name: str) -> str:
            return "hello " + name

        @app.workflow()
        async def greet(ctx, name: str) -> str:
            await ctx.sleep(0.01)
            return await hello(ctx, name)

        async def main():
            async with app:
                handle = await greet.start("otel")
                print(await handle.result(timeout=10))

        asyncio.run(main())
        assert _tracing.tracer() is None
        assert not [m for m in sys.modules if m.startswith("opentelemetry")], "imported"
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello otel"
