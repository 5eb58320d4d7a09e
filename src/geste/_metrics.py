"""Metrics: counters and histograms kept in memory, gauges read at collection, Prometheus text out.

What happens in this process (steps recorded, activity attempts, claims, wake-ups, notifications, group
commits, outbox deliveries) is counted where it happens, by adding to an entry of a dict: no lock (one
event loop), no allocation beyond a small key, no database access. What the database knows (instances per
status, the runnable queue, held leases, the oldest wait, the outbox's pending and dead events and its
oldest pending one; per named queue, its queued and admitted instances, limits, rate window and oldest
wait) is read only when the metrics are collected (a scrape): one snapshot read, ``storage.queue_stats``,
and one statement, ``storage.list_queues``.

``app.metrics`` is the App's ``Metrics``; ``await app.metrics.snapshot()`` returns the values as typed
objects, ``await app.metrics.exposition()`` the Prometheus text (format 0.0.4) that ``GET /metrics``
serves.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._metrics_http import MetricsServer
    from ._queues import QueueInfo
    from ._status import QueueStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The media type of the Prometheus text exposition format this module writes."""

LabelKey = str | tuple[str, ...]
"""The key of one series: the label value itself for a metric with one label, a tuple of the values (in
``labelnames`` order) for several, ``()`` for none. A single-label increment thus builds no tuple."""

START = "start"
NOTIFY = "notify"
LOCAL = "local"
TIMER = "timer"
POLL = "poll"
BACKLOG = "backlog"
WAKE_CAUSES = (START, NOTIFY, LOCAL, TIMER, POLL, BACKLOG)
"""Why a worker ran a claim round (or, for ``start``, an instance at all); see docs/metrics.md, "Metrics"."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the wake-up latency histogram: from a millisecond (a notification) to a
minute (a lease taken over, a slow poll)."""
BATCH_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
"""Upper bounds of the group-commit batch size histogram (a batch holds at most 100)."""

Collector = Callable[[], Awaitable[Iterable["MetricFamily"]]]


@dataclass(frozen=True, slots=True)
class MetricSample:
    """One value of a metric: a series (name and labels) at collection time."""

    name: str
    """The sample's name: the family's, or with ``_bucket``, ``_sum`` or ``_count`` for a histogram."""
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """A metric with its type, help text and samples."""

    name: str
    type: str
    """``counter``, ``gauge`` or ``histogram``."""
    help: str
    samples: tuple[MetricSample, ...] = ()


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Every metric of an App at one moment (``await app.metrics.snapshot()``)."""

    families: dict[str, MetricFamily] = field(default_factory=dict)

    def value(self, name: str, /, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (0 when none does).

        ``value("geste_steps_total", kind="activity")``; without labels, the sum over every series;
        a histogram's ``..._count`` or ``..._bucket`` (with ``le="0.1"``) by its sample name.
        """
        family = self.families.get(name)
        if family is None:
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix):
                    family = self.families.get(name.removesuffix(suffix))
                    break
        if family is None:
            return 0.0
        return float(
            sum(
                sample.value
                for sample in family.samples
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
            )
        )

    def text(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of every family."""
        return render(self.families.values())


class Counter:
    """A monotonic count per series. Hot paths add to ``values`` directly: ``c.values[key] += 1``."""

    __slots__ = ("help", "labelnames", "name", "values")

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str] = (), *, keys: Iterable[LabelKey] = ()
    ):
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.values: defaultdict[LabelKey, float] = defaultdict(int)
        for key in keys:  # series known in advance show from the start, at 0
            self.values[key] = 0

    def inc(self, key: LabelKey = (), amount: float = 1) -> None:
        self.values[key] += amount

    def family(self) -> MetricFamily:
        samples = tuple(
            MetricSample(self.name, _labels(self.labelnames, key), value)
            for key, value in sorted(self.values.items(), key=_order)
        )
        return MetricFamily(self.name, "counter", self.help, samples)


class _Buckets:
    __slots__ = ("counts", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.sum = 0.0


class Histogram:
    """Observations counted in fixed buckets (``le``: less than or equal), per series."""

    __slots__ = ("bounds", "help", "labelnames", "name", "series")

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str],
        bounds: Sequence[float],
        *,
        keys: Iterable[LabelKey] = (),
    ) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("histogram bounds must be increasing")
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in bounds)
        self.series: dict[LabelKey, _Buckets] = {key: _Buckets(len(self.bounds) + 1) for key in keys}

    def observe(self, key: LabelKey, value: float) -> None:
        buckets = self.series.get(key)
        if buckets is None:
            buckets = self.series[key] = _Buckets(len(self.bounds) + 1)
        buckets.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value
        buckets.sum += value

    def family(self) -> MetricFamily:
        samples: list[MetricSample] = []
        for key, buckets in sorted(self.series.items(), key=_order):
            labels = _labels(self.labelnames, key)
            running = 0
            for bound, count in zip((*self.bounds, math.inf), buckets.counts, strict=True):
                running += count
                samples.append(MetricSample(f"{self.name}_bucket", {**labels, "le": _number(bound)}, running))
            samples.append(MetricSample(f"{self.name}_sum", labels, buckets.sum))
            samples.append(MetricSample(f"{self.name}_count", labels, running))
        return MetricFamily(self.name, "histogram", self.help, tuple(samples))


def gauge(
    name: str, help: str, values: Mapping[LabelKey, float], labelnames: Sequence[str] = ()
) -> MetricFamily:
    """A gauge family from values read now."""
    names = tuple(labelnames)
    samples = tuple(
        MetricSample(name, _labels(names, key), value) for key, value in sorted(values.items(), key=_order)
    )
    return MetricFamily(name, "gauge", help, samples)


class Metrics:
    """The metrics of one App: counted in this process, plus what collectors read at collection time.

    Counters and histograms live as long as the App object (across ``open``/``close``), and are this
    process's own: with several worker processes, scrape each one. Every name starts with ``geste_``;
    labels are workflow, activity, step kind, status, cause or channel names, never instance ids.
    """

    CONTENT_TYPE = CONTENT_TYPE

    def __init__(self) -> None:
        self.steps = Counter(
            "geste_steps_total",
            "History rows recorded by this process's workflow runs, by step kind.",
            ("kind",),
        )
        self.workflows_started = Counter(
            "geste_workflows_started_total",
            "Instances created by this process (start_workflow, and the ticks of cron schedules).",
            ("workflow",),
        )
        self.schedule_ticks = Counter(
            "geste_schedule_ticks_total",
            "Ticks of cron schedules whose round this process won, by schedule and outcome: started "
            "(or released after a wait, overlap=queue), queued (put to wait for the previous run, "
            "overlap=queue), skipped (the previous run unfinished, overlap=skip, or the queue's wait at "
            "its limit), missed (dropped by the missed policy).",
            ("schedule", "outcome"),
        )
        self.workflows_ended = Counter(
            "geste_workflows_ended_total",
            "Instances this process's worker ended, by workflow and final status "
            "(completed, failed, cancelled).",
            ("workflow", "status"),
        )
        self.workflows_continued = Counter(
            "geste_workflows_continued_total",
            "Runs this process's worker ended with ctx.continue_as_new (the instance goes on in a new run).",
            ("workflow",),
        )
        self.long_histories = Counter(
            "geste_long_histories_total",
            "Runs whose history passed 10,000 steps in this process (each warned about once: "
            "ctx.continue_as_new keeps histories short).",
            ("workflow",),
        )
        self.activity_attempts = Counter(
            "geste_activity_attempts_total", "Activity (and compensation) attempts run live.", ("activity",)
        )
        self.activity_attempt_failures = Counter(
            "geste_activity_attempt_failures_total",
            "Activity attempts that raised or timed out (retried or not).",
            ("activity",),
        )
        self.activity_retries = Counter(
            "geste_activity_retries_total",
            "Failed activity attempts followed by another attempt.",
            ("activity",),
        )
        self.activity_failures = Counter(
            "geste_activity_failures_total",
            "Activities whose recorded outcome is an error (attempts exhausted or not retryable).",
            ("activity",),
        )
        self.wakeup_latency = Histogram(
            "geste_wakeup_latency_seconds",
            "From an instance becoming runnable (event or message committed, timer due, lease expired, "
            "start) to its run starting in this worker, by what made the worker claim it.",
            ("cause",),
            LATENCY_BUCKETS,
            keys=WAKE_CAUSES,
        )
        self.claim_rounds = Counter(
            "geste_claim_rounds_total",
            "Claim statements this worker ran, by cause.",
            ("cause",),
            keys=WAKE_CAUSES[1:],
        )
        self.claim_rounds_empty = Counter(
            "geste_claim_rounds_empty_total",
            "Claim statements that took nothing, by cause.",
            ("cause",),
            keys=WAKE_CAUSES[1:],
        )
        self.claimed = Counter(
            "geste_claimed_instances_total", "Instances taken by claim statements, by cause.", ("cause",)
        )
        self.lease_takeovers = Counter(
            "geste_lease_takeovers_total",
            "Instances claimed while a previous lease on them had expired (its worker died or stalled).",
            ("workflow",),
        )
        self.workflow_cache_hits = Counter(
            "geste_workflow_cache_hits_total",
            "Wake-ups that continued a run kept in this worker's cache of suspended runs (no replay).",
            keys=[()],
        )
        self.workflow_cache_drops = Counter(
            "geste_workflow_cache_drops_total",
            "Runs dropped from the cache of suspended runs, by reason: evicted (beyond its size), stale "
            "(claimed with other rows than its wait's outcome, or with its whole history), replaced, "
            "stopped (the worker stopped).",
            ("reason",),
            keys=("evicted", "stale", "replaced", "stopped"),
        )
        self.listener_reconnects = Counter(
            "geste_listener_reconnects_total",
            "Reconnection attempts of the LISTEN/NOTIFY connection after it was lost or refused.",
            keys=[()],
        )
        self.listener_notifications = Counter(
            "geste_listener_notifications_total", "Notifications received, by channel.", ("channel",)
        )
        self.group_commit_batch_size = Histogram(
            "geste_group_commit_batch_size",
            "Instances per group-commit statement on PostgreSQL (kind step: step commits; end: ends).",
            ("kind",),
            BATCH_BUCKETS,
        )
        self.outbox_deliveries = Counter(
            "geste_outbox_deliveries_total",
            "Outbox events delivered (2xx or the handler returned).",
            keys=[()],
        )
        self.outbox_failures = Counter(
            "geste_outbox_delivery_failures_total",
            "Failed outbox delivery attempts, by outcome: retry (tried again later) or dead.",
            ("outcome",),
            keys=("retry", "dead"),
        )
        self._collectors: list[Collector] = []

    def recorded(self, records: Iterable[Recorded]) -> None:
        """Count history rows just committed (a step commit, suspension, end...), by kind."""
        steps = self.steps.values
        for row in records:
            steps[row.kind] += 1

    def add_collector(self, collector: Collector) -> None:
        """Add a coroutine function whose families join every collection (gauges read at scrape time)."""
        self._collectors.append(collector)

    def own_families(self) -> list[MetricFamily]:
        """The families counted in this process, without running the collectors (no I/O)."""
        return [value.family() for value in vars(self).values() if isinstance(value, Counter | Histogram)]

    async def snapshot(self) -> MetricsSnapshot:
        """Every metric now: the counted ones and what the collectors read (one query for the queue)."""
        families = {family.name: family for family in self.own_families()}
        for collector in self._collectors:
            for family in await collector():
                families[family.name] = family
        return MetricsSnapshot(families)

    async def exposition(self) -> str:
        """The Prometheus text exposition (format 0.0.4, ``CONTENT_TYPE``) of ``snapshot()``."""
        return (await self.snapshot()).text()

    async def serve(self, *, port: int, host: str = "127.0.0.1", token: str | None = None) -> MetricsServer:
        """Serve ``GET /metrics`` (and nothing else) on ``host:port``, for a worker with no HTTP app.

        ``token`` (default ``$GESTE_HTTP_TOKEN``) is required as ``Authorization: Bearer <token>``;
        without one only requests whose ``Host`` is an IP address or ``localhost`` are answered, as in
        ``app.asgi()``. Port 0 picks a free port (``server.port``). Stop it with ``await server.close()``.
        """
        from ._metrics_http import MetricsServer

        server = MetricsServer(self, host=host, port=port, token=token)
        await server.start()
        return server


class Recorded(Protocol):
    """A history row as ``Metrics.recorded`` counts it (``storage.base.HistoryRow``): by kind."""

    @property
    def kind(self) -> str: ...


class GaugeSource(Protocol):
    """What ``app_collector`` reads at collection time (the App's runtime)."""

    def worker_slots(self) -> tuple[int, int] | None:
        """Instances running in this process and slots free; None when it runs no worker."""
        ...

    def listener_connected(self) -> bool:
        """Whether this process's LISTEN/NOTIFY connection listens."""
        ...

    async def queue_stats(self) -> QueueStats | None:
        """The queue (one snapshot read; raises ``StorageError``); None while closed."""
        ...

    async def queues(self, limit: int = ...) -> list[QueueInfo] | None:
        """The named queues, at most ``limit`` (one statement; raises ``StorageError``); None while
        closed."""
        ...


METRICS_QUEUES = 100
"""The most queues (by name) the per-queue gauges show: at most 6 series each, one statement per scrape
whose cost grows with the queues and the counts' cap (``QUEUE_COUNT_CAP``), never with the instances."""


def app_collector(source: GaugeSource) -> Collector:
    """The gauges of an App read at collection time: its worker's slots, its listener, the queue
    (``storage.queue_stats``: one snapshot read) and the named queues (``storage.list_queues``: one
    statement, at most ``METRICS_QUEUES`` queues), the last two only while the App is open."""
    from ._models import Status
    from .errors import StorageError

    async def collect() -> list[MetricFamily]:
        families = []
        slots = source.worker_slots()
        if slots is not None:
            running, free = slots
            families.append(
                gauge("geste_worker_running", "Instances running in this process now.", {(): running})
            )
            families.append(
                gauge(
                    "geste_worker_free_slots",
                    "Instances this process could still run at once.",
                    {(): free},
                )
            )
        families.append(
            gauge(
                "geste_listener_connected",
                "1 while this process's LISTEN/NOTIFY connection listens, else 0.",
                {(): int(source.listener_connected())},
            )
        )
        try:
            queue = await source.queue_stats()
            queues = await source.queues(METRICS_QUEUES)
        except StorageError:
            families.append(
                gauge("geste_queue_up", "1 when the queue could be read at this scrape.", {(): 0})
            )
            return families
        if queue is None:  # closed
            return families
        families += [
            gauge("geste_queue_up", "1 when the queue could be read at this scrape.", {(): 1}),
            gauge(
                "geste_instances",
                "Instances in the database per status (all workers).",
                {str(status): queue.counts.get(status, 0) for status in Status},
                ("status",),
            ),
            gauge(
                "geste_instances_runnable",
                "Instances a worker could claim now: due, lease free or expired (the queue depth).",
                {(): queue.runnable},
            ),
            gauge(
                "geste_leases_held",
                "Unexpired leases held by workers (all workers).",
                {(): queue.held_leases},
            ),
            gauge(
                "geste_oldest_waiting_seconds",
                "Age of the longest-waiting instance's last change (0 when nothing waits).",
                {(): queue.oldest_waiting_age or 0.0},
            ),
            gauge(
                "geste_outbox_pending",
                "Outbox events not delivered yet (all instances): being retried, or waiting behind an "
                "earlier event of their instance.",
                {(): queue.outbox_pending},
            ),
            gauge(
                "geste_outbox_dead",
                "Outbox events given up after outbox_max_attempts; each holds back the later events of its "
                "instance until retried or discarded.",
                {(): queue.outbox_dead},
            ),
            gauge(
                "geste_outbox_oldest_pending_seconds",
                "Age of the oldest pending outbox event (0 when none is pending): how far behind the "
                "outbox is.",
                {(): queue.outbox_oldest_pending_age or 0.0},
            ),
        ]
        return families + queue_families(queues or [])

    return collect


def queue_families(queues: Sequence[QueueInfo]) -> list[MetricFamily]:
    """The per-queue gauges (docs/queues.md): what waits, what holds a slot, the limits, the rate window
    and the oldest wait, labelled by queue name. A limit's series exists only where the limit is set."""
    by = ("queue",)
    return [
        gauge(
            "geste_queue_queued",
            "Instances queued, waiting for admission, per queue (counted up to 1,000 per queue).",
            {q.name: q.queued for q in queues},
            by,
        ),
        gauge(
            "geste_queue_admitted",
            "Instances admitted and not ended per queue: the slots in use, running, sleeping or waiting "
            "(counted up to 1,000 per queue).",
            {q.name: q.admitted for q in queues},
            by,
        ),
        gauge(
            "geste_queue_concurrency_limit",
            "The most instances a queue admits at once across the cluster (queues with a limit only).",
            {q.name: q.concurrency for q in queues if q.concurrency is not None},
            by,
        ),
        gauge(
            "geste_queue_rate_limit",
            "The most admissions a queue makes per window of its rate period (queues with a rate only).",
            {q.name: q.rate_limit for q in queues if q.rate_limit is not None},
            by,
        ),
        gauge(
            "geste_queue_rate_window_admissions",
            "Admissions within a queue's current rate window (queues with a rate only).",
            {q.name: q.rate_used or 0 for q in queues if q.rate_limit is not None},
            by,
        ),
        gauge(
            "geste_queue_oldest_queued_seconds",
            "How long a queue's oldest queued instance has waited (0 when none waits).",
            {q.name: q.oldest_age or 0.0 for q in queues},
            by,
        ),
    ]


# -- the text format -------------------------------------------------------------------------------------
def render(families: Iterable[MetricFamily]) -> str:
    """Prometheus text exposition format 0.0.4: ``# HELP``, ``# TYPE`` and the samples of each family."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for sample in family.samples:
            if sample.labels:
                pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sample.labels.items())
                lines.append(f"{sample.name}{{{pairs}}} {_number(sample.value)}")
            else:
                lines.append(f"{sample.name} {_number(sample.value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int) or (value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    return repr(float(value))


def _labels(names: tuple[str, ...], key: LabelKey) -> dict[str, str]:
    if not names:
        return {}
    values = (key,) if isinstance(key, str) else key
    return {name: str(value) for name, value in zip(names, values, strict=True)}


def _order(item: tuple[LabelKey, Any]) -> tuple[str, ...]:
    key = item[0]
    return (str(key),) if isinstance(key, str) else tuple(str(k) for k in key)
