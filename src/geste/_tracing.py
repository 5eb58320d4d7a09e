"""OpenTelemetry spans of geste (docs/tracing.md), with ``opentelemetry-api`` as an optional extra.

Tracing is on when the application set a tracer provider (``trace.set_tracer_provider``, which imports
``opentelemetry.trace``). geste never imports OpenTelemetry itself until then: ``tracer()`` first looks for
``opentelemetry.trace`` among the modules already imported (one dict lookup), so an application that does
not trace, whether the API is installed or not, pays that lookup per start and per run and nothing else;
the engine's per-step hooks test a None (``Journal.trace``): no span object, no context, no read.

One instance is one trace. Its start span (``geste.start``) is a child of the caller's current span; its
W3C trace context is stored in the instance's row (``trace_context``, schema 30). Every later span of the
instance (its runs, on any worker, after any resume; its activity attempts; its waits; its children's start
spans, and through them the children's spans) descends from that stored context.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span as Span
    from opentelemetry.trace import Tracer

INSTRUMENTATION = "geste"
"""The instrumentation scope's name: the tracer is ``trace.get_tracer("geste")``."""

_tracer: tuple[object, Tracer] | None = None
"""The tracer of the provider seen last: (provider, tracer)."""


def tracer() -> Tracer | None:
    """The tracer when tracing is on (a tracer provider set), else None. Imports nothing: an application
    that set a provider imported ``opentelemetry.trace`` to do it."""
    global _tracer
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # the API absent, or never used by the application: tracing is off
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    cached = _tracer
    if cached is not None and cached[0] is provider:
        return cached[1]
    found: Tracer = provider.get_tracer(INSTRUMENTATION)
    _tracer = (provider, found)
    return found


def _propagator() -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def dump(span: Span) -> str | None:
    """The span's W3C trace context as stored: its ``traceparent``, and its ``tracestate`` after a
    newline when it has one; None for a span that is no real one (not sampled in, say)."""
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagator().inject(carrier, context=in_context(span))
    parent = carrier.get("traceparent")
    if parent is None:
        return None
    state = carrier.get("tracestate")
    return parent if not state else f"{parent}\n{state}"


def load(stored: str | None) -> Context | None:
    """The context a stored trace context (``dump``) names; None for none (a root span then)."""
    if not stored:
        return None
    parent, _, state = stored.partition("\n")
    carrier = {"traceparent": parent}
    if state:
        carrier["tracestate"] = state
    found: Context = _propagator().extract(carrier)
    return found


def derived(instance_id: str) -> Context:
    """The context of an instance that has none stored (started by a schedule, or while tracing was off):
    a remote parent whose trace and span ids are drawn from the instance id (BLAKE2b), sampled, so that all
    its runs still make one trace, the same wherever they run, with no write. The parent span itself is
    never recorded (a trace viewer shows its runs under a missing root)."""
    from opentelemetry import trace

    digest = hashlib.blake2b(instance_id.encode(), digest_size=24, person=b"geste-trace").digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:], "big") or 1
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)
    parent = trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)
    found: Context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    return found


def attributes(instance_id: str, workflow_name: str, **more: Any) -> dict[str, Any]:
    """The attributes of every geste span (``geste.instance_id``, ``geste.workflow``) and ``more``, each
    named ``geste.<key>``."""
    found = {"geste.instance_id": instance_id, "geste.workflow": workflow_name}
    for key, value in more.items():
        if value is not None:
            found[f"geste.{key}"] = value
    return found


def start_span(
    tracer: Tracer,
    name: str,
    attrs: Mapping[str, Any],
    *,
    parent: Context | None = None,
    current: bool = False,
    start_time: float | None = None,
) -> Span:
    """A span of ``tracer``, child of ``parent`` (``current``: of the caller's current span instead; else
    a root span when ``parent`` is None), started now or at ``start_time`` (seconds since the epoch)."""
    from opentelemetry import context, trace

    if not current and parent is None:
        parent = context.Context()  # not the current span's: a root
    return tracer.start_span(
        name,
        context=parent,
        kind=trace.SpanKind.INTERNAL,
        attributes=dict(attrs),
        start_time=None if start_time is None else int(start_time * 1e9),
    )


def in_context(span: Span) -> Context:
    """A context whose current span is ``span``: the parent of the spans it contains."""
    from opentelemetry import trace

    found: Context = trace.set_span_in_context(span)
    return found


def attach(span: Span) -> object:
    """Make ``span`` the current one (what user code under it sees, its own spans' parent); ``detach``
    with the token undoes it."""
    from opentelemetry import context

    return context.attach(in_context(span))


def detach(token: object) -> None:
    from opentelemetry import context

    context.detach(token)  # type: ignore[arg-type]


def end(span: Span, error: BaseException | None = None, *, end_time: float | None = None) -> None:
    """End ``span``; with ``error``, its status is ERROR and the error is recorded as its exception."""
    if error is not None:
        from opentelemetry import trace

        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end(end_time=None if end_time is None else int(end_time * 1e9))


class RunTrace:
    """The tracing of one run of an instance (``Journal.trace``, None when tracing is off): the stored
    context of the instance (``parent``: its start span; ``derived`` when none is stored) and the span of
    the run under the current claim (``span``: the parent of its activity attempts and of its children's
    start spans)."""

    __slots__ = ("instance_id", "parent", "span", "tracer", "workflow_name")

    def __init__(self, tracer: Tracer, instance_id: str, workflow_name: str, stored: str | None) -> None:
        self.tracer = tracer
        self.instance_id = instance_id
        self.workflow_name = workflow_name
        self.parent = load(stored) or derived(instance_id)
        self.span: Span | None = None

    def begin_run(self, run: int, *, cached: bool) -> Span:
        """The span of a run under a new claim (``geste.run <workflow>``): claim to suspension or end."""
        self.span = start_span(
            self.tracer,
            f"geste.run {self.workflow_name}",
            attributes(self.instance_id, self.workflow_name, run=run, cached=cached),
            parent=self.parent,
        )
        return self.span

    def _under_run(self) -> Context | None:
        return self.parent if self.span is None else in_context(self.span)

    def attempt(self, activity_name: str, seq: int, attempt: int, *, compensation: bool) -> Span:
        """The span of one attempt of an activity (``geste.activity <name>``), in the current run's."""
        return start_span(
            self.tracer,
            f"geste.activity {activity_name}",
            attributes(
                self.instance_id,
                self.workflow_name,
                activity=activity_name,
                step=seq,
                attempt=attempt,
                compensation=compensation or None,
            ),
            parent=self._under_run(),
        )

    def child_start(self, child_id: str, child_workflow: str, seq: int) -> Span:
        """The start span of a child (``geste.start <child workflow>``), in the current run's: its
        context is recorded in the child's row, so the child's spans are of this trace."""
        return start_span(
            self.tracer,
            f"geste.start {child_workflow}",
            attributes(child_id, child_workflow, parent_id=self.instance_id, step=seq),
            parent=self._under_run(),
        )

    def wait(self, kind: str, name: str | None, seq: int, started: float, ended: float, **more: Any) -> None:
        """A wait (``geste.wait <kind>``) the current run is the first to go past, from when it began
        (in an earlier run, maybe) to now: recorded at once, a child of the instance's start span (it may
        span several runs)."""
        span = start_span(
            self.tracer,
            f"geste.wait {kind}",
            attributes(self.instance_id, self.workflow_name, step=seq, wait=name, **more),
            parent=self.parent,
            start_time=started,
        )
        end(span, end_time=max(started, ended))
