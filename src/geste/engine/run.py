"""One run of one instance: load its history, replay the workflow, record what is new, store the end.

Whatever a run needs is in the database, so any worker can run any instance. The one state kept between
runs is an optimisation that correctness never depends on: the cache of suspended runs (``cache``), which
lets a wake-up in the worker where the run suspended continue it without a replay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .. import _tracing
from .._metrics import Metrics
from .._models import ParentClose, Status, StepKind
from .._serde import decode, encode, encode_error
from .._steps import CancelledStep
from .._versions import Versioning, claim_keys
from ..errors import (
    NonDeterminismError,
    SerializationError,
    StorageError,
    WorkflowCancelled,
    WorkflowTimeout,
)
from ..storage.base import Claim, HistoryRow, LeaseLost, Storage
from .activities import DEFAULT_ACTIVITY_THREADS, ActivityRunner
from .cache import PARKED, CachedRun, WorkflowCache
from .context import CURRENT_WORKFLOW, WorkflowContext
from .journal import Abandon, ContinuedAsNew, Journal, StreamSink, Suspended

if TYPE_CHECKING:
    from .._definitions import Workflow

logger = logging.getLogger("geste.engine")

ABANDONED_RETRY = 1.0
"""Seconds before a run abandoned on a storage error is tried again: a database that keeps refusing a
write (or is down) costs one attempt a second, not a busy loop."""

CLOSE_UNWIND = 1.0
"""Seconds ``Engine.close`` gives the dropped parked runs to unwind from their waits."""

UNKNOWN_WORKFLOW_RETRY = 30.0
"""Seconds before an instance of a workflow this worker does not know is offered again (to a peer)."""


_CANCELLED_BY_A_CANCEL = frozenset((ParentClose.CANCEL, ParentClose.WAIT))
_CANCELLED_BY_AN_END = frozenset((ParentClose.CANCEL,))


def _closing(children: Mapping[str, str], status: Status) -> list[str]:
    """The children of this run (not awaited to their end: id -> policy) whose cancellation its end
    requests: those of policy ``CANCEL``, and on a cancellation (of the parent, or its deadline) those
    of policy ``WAIT`` too, not awaited then: a cancel reaches every child but the abandoned ones. The
    ``WAIT`` children of a completion or a failure were awaited before (``_drive``, ``_fail``)."""
    policies = _CANCELLED_BY_A_CANCEL if status == Status.CANCELLED else _CANCELLED_BY_AN_END
    return [child_id for child_id, policy in children.items() if policy in policies]


async def _retry_sleep(_instance_id: str, delay: float) -> None:
    await asyncio.sleep(delay)


def _deadline_passed(journal: Journal) -> None:
    """The local timer of a deadline, armed while the run is in progress here (``Engine._hold``)."""
    if journal.request_cancel(deadline=True):
        logger.info("instance %s: its deadline passed while it runs here; cancelling it", journal.instance_id)


def _ignore_completed(_instance_id: str, _workflow_name: str, _result: str) -> None:
    pass


def _ignore_woken() -> None:
    pass


def _ignore_outbox(_event_id: str) -> None:
    pass


def _ignore_state(_instance_id: str, _key: str) -> None:
    pass


def _no_version() -> str | None:
    return None


class Engine:
    """Runs claimed instances (``run``): what it needs of the rest of geste it is given here.

    The callbacks are attributes an App may set again later (``on_channel_woken`` and ``on_outbox`` once
    its worker and relay run, ``retry_wait`` by ``geste.testing``): a run reads them when it calls them.
    """

    def __init__(
        self,
        *,
        storage: Storage,
        workflows: Mapping[str, Workflow[Any, Any]],
        clock: Callable[[], float],
        lock_timeout: float,
        max_payload_bytes: int,
        on_suspended: Callable[[str, float | None], None],
        on_finished: Callable[[str], None],
        metrics: Metrics | None = None,
        on_completed: Callable[[str, str, str], None] = _ignore_completed,
        on_channel_woken: Callable[[], None] = _ignore_woken,
        on_outbox: Callable[[str], None] = _ignore_outbox,
        on_state: Callable[[str, str], None] = _ignore_state,
        retry_wait: Callable[[str, float], Awaitable[None]] = _retry_sleep,
        workflow_cache_size: int = 0,
        activity_threads: int = DEFAULT_ACTIVITY_THREADS,
        version: Callable[[], str | None] = _no_version,
    ) -> None:
        self.storage = storage
        self.streams: StreamSink | None = None
        """Where ``ctx.write_stream`` writes (the App's streams); None: nowhere."""
        self.version = version
        """The version of the code it runs (docs/versioning.md): recorded by the children it starts, and
        what its worker claims of the pinned workflows (``claim_keys``)."""
        self.metrics = metrics or Metrics()
        """Counted here, by the journals and the activity runner: steps recorded, activity attempts,
        instances ended."""
        self.workflows = workflows
        self.clock = clock
        self.lock_timeout = lock_timeout
        self.max_payload_bytes = max_payload_bytes
        self.on_suspended = on_suspended
        """Called with the instance id and when it is due (None: when a message or an event comes) once a
        suspension committed."""
        self.on_finished = on_finished
        """Called with the instance id once its end committed."""
        self.on_completed = on_completed
        """Called with the instance id, workflow name and stored result once a completion committed: the
        App keeps it, so that awaiting a result this process produced costs no read."""
        self.on_channel_woken = on_channel_woken
        """Called after a step published a message that made receivers runnable: the App pokes its worker."""
        self.on_outbox = on_outbox
        """Called with the event id after a step recorded an outbox event: the App pokes its relay."""
        self.on_state = on_state
        """Called with the instance id and key after a ``set_state`` step committed: the App wakes its
        ``wait_state`` calls of that key without a read of the database."""
        self.retry_wait = retry_wait
        """How an activity's retry back-off waits, given the instance id and the seconds: in real time;
        ``geste.testing`` makes it wait for its virtual clock instead."""
        self.activities = ActivityRunner(self, threads=activity_threads)
        self.cache = WorkflowCache(workflow_cache_size, self.metrics)
        """The runs parked at a wait in this worker (``cache``; size 0: none)."""
        self.running: dict[str, Journal] = {}
        """The journal of each run in progress here, by instance id: what a cancel reaches (``cancel``)."""

    def cancel(self, instance_id: str) -> bool:
        """A cancel of an instance this engine runs now reached it (the worker's renewal or a notification
        said so): the run delivers it at its next step and its running activities are cancelled at once.
        True when that is news to a run in progress here (False: none here, or it knew already)."""
        journal = self.running.get(instance_id)
        return journal is not None and journal.request_cancel()

    def _hold(self, journal: Journal) -> asyncio.TimerHandle | None:
        """The run of ``journal`` is in progress here: a cancel may reach it, and its deadline (if any) is a
        local timer that cancels it as a cancel does (or now, when it passed already)."""
        self.running[journal.instance_id] = journal
        deadline = journal.deadline
        if deadline is None:
            return None
        delay = deadline - self.clock()
        if delay <= 0:
            journal.request_cancel(deadline=True)
            return None
        return asyncio.get_running_loop().call_later(delay, _deadline_passed, journal)

    def _unhold(self, journal: Journal, timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()
        if self.running.get(journal.instance_id) is journal:
            del self.running[journal.instance_id]

    def claim_keys(self) -> list[str]:
        """What its worker claims (``_versions.claim_keys``): the workflows' names, and, for the pinned
        ones, the names with this code's version."""
        return claim_keys(self.workflows, self.version())

    def code_version(self) -> str | None:
        return self.version()

    def start_version(self, workflow_name: str) -> tuple[str | None, bool]:
        workflow = self.workflows.get(workflow_name)
        return self.version(), workflow is not None and workflow.versioning is Versioning.PINNED

    def cached(self, instance_ids: Collection[str] | None = None) -> dict[str, int]:
        """For a claim: the last step held by each parked run (of ``instance_ids``), by instance id."""
        return self.cache.known(instance_ids) if self.cache.size else {}

    def take_heartbeats(self) -> dict[str, str]:
        """For the worker's lease renewal: the activity heartbeat details given since the last one, by
        instance (``ActivityRunner.heartbeats``)."""
        return self.activities.heartbeats.take()

    def restore_heartbeats(self, instance_ids: Collection[str]) -> None:
        """The renewal that carried these details failed: the next one writes them."""
        self.activities.heartbeats.restore(instance_ids)

    async def close(self) -> None:
        """Drop every parked run (the worker stops): their instances replay wherever they wake next. Each
        unwinds from its wait (its ``finally`` blocks run), for a second at most. The threads of ``def``
        activities still running are let go (a thread cannot be stopped)."""
        tasks = [t for t in self.cache.tasks() if not t.done()]
        self.cache.clear()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_UNWIND)
        self.activities.close()

    async def run(self, claim: Claim, history: Sequence[HistoryRow] | None = None) -> None:
        """Run the claimed instance until it suspends, finishes, or cannot go on."""
        tracer = _tracing.tracer()
        if tracer is None:
            await self._run(claim, history, None)
            return
        instance_id = claim.lease.instance_id
        try:
            trace = _tracing.RunTrace(
                tracer, instance_id, claim.workflow_name, await self.storage.trace_context(instance_id)
            )
        except StorageError as exc:  # the run goes on untraced, as it would without the read
            logger.warning("instance %s: its trace context could not be read (%s)", instance_id, exc)
            await self._run(claim, history, None)
            return
        span = trace.begin_run(claim.run, cached=bool(self.cache.size and self.cache.known((instance_id,))))
        error: Exception | None = None
        try:
            await self._run(claim, history, trace)
        except Exception as exc:  # not a cancellation: the worker stops, the run stops with it
            error = exc
            raise
        finally:
            _tracing.end(span, error)

    async def _run(
        self, claim: Claim, history: Sequence[HistoryRow] | None, trace: _tracing.RunTrace | None
    ) -> None:
        instance_id = claim.lease.instance_id
        cached = self.cache.take(instance_id) if self.cache.size else None
        if cached is not None:
            rows = cached.new_rows(claim, () if history is None else history)
            if rows is not None:
                self.metrics.workflow_cache_hits.values[()] += 1
                cached.resume(claim, rows)
                cached.journal.trace = trace
                timer = self._hold(cached.journal)
                try:
                    await self._until_stopped(cached, claim.workflow_name)
                finally:
                    self._unhold(cached.journal, timer)
                return
            self.cache.drop(cached, "stale")
        if claim.history_after:  # the claim read past a run this worker no longer holds: read it all
            history = None
        workflow = self.workflows.get(claim.workflow_name)
        if workflow is None:
            logger.warning(
                "instance %s is of workflow %r, unknown to this worker; offering it again in %ss",
                instance_id,
                claim.workflow_name,
                UNKNOWN_WORKFLOW_RETRY,
            )
            now = self.clock()
            await self.storage.release([claim.lease], now, run_at=now + UNKNOWN_WORKFLOW_RETRY)
            return
        if history is None:
            history = await self.storage.get_history(instance_id)
        journal = Journal(
            self,
            lease=claim.lease,
            workflow_name=claim.workflow_name,
            history=history,
            cancel_requested=claim.cancel_requested,
            run=claim.run,
            deadline=claim.deadline,
            awaited=claim.awaited,
        )
        journal.trace = trace
        timer = self._hold(journal)
        try:
            await self._run_new(journal, claim)
        finally:
            self._unhold(journal, timer)

    async def _run_new(self, journal: Journal, claim: Claim) -> None:
        """Run a new journal's instance (replayed from its history): in a task of its own when a cache may
        keep it, else inline."""
        instance_id = journal.instance_id
        workflow = self.workflows[claim.workflow_name]
        ctx = WorkflowContext(journal, self.activities)
        if self.cache.size:  # in a task of its own, which may outlive this claim, parked at a wait
            run = CachedRun(journal)
            journal.park = run.park
            run.task = asyncio.get_running_loop().create_task(
                self._drive_cached(run, ctx, workflow, claim.input), name=f"geste-workflow-{instance_id}"
            )
            await self._until_stopped(run, claim.workflow_name)
            return
        try:
            result = await self._drive(journal, ctx, workflow, claim.input)
        except (Suspended, Abandon, ContinuedAsNew) as signal:
            await self._signalled(journal, signal)
            return
        self._ended(instance_id, claim.workflow_name, result)

    async def _signalled(self, journal: Journal, signal: Suspended | Abandon | ContinuedAsNew) -> None:
        """A run stopped by one of the engine's signals (a suspension has nothing more to do)."""
        if isinstance(signal, Abandon):
            await self._abandon(journal, signal)
        elif isinstance(signal, ContinuedAsNew):
            self.metrics.workflows_continued.values[journal.workflow_name] += 1
            logger.debug("instance %s: run %d continued as new", journal.instance_id, journal.run)

    def _ended(self, instance_id: str, workflow_name: str, result: str | None) -> None:
        if result is not None:
            self.on_completed(instance_id, workflow_name, result)
        self.on_finished(instance_id)

    async def _drive_cached(
        self, run: CachedRun, ctx: WorkflowContext, workflow: Workflow[Any, Any], stored_input: str
    ) -> None:
        """``_drive`` in the run's own task: its outcome goes to ``run.stopped`` (whichever claim holds
        the run then awaits it); a run dropped while parked ends here with ``Suspended``."""
        journal = run.journal
        try:
            result = await self._drive(journal, ctx, workflow, stored_input)
        except asyncio.CancelledError:
            if not run.stopped.done():
                run.stopped.cancel()
            raise
        except BaseException as exc:  # Suspended, Abandon, or an engine error: the claim's to handle
            if not run.stopped.done():
                run.stopped.set_exception(exc)
            elif not isinstance(exc, Suspended):  # pragma: no cover - only a dropped run ends parked
                logger.error("instance %s: its cached run ended while parked: %r", journal.instance_id, exc)
            self.cache.discard(journal.instance_id, run)
            return
        if not run.stopped.done():
            run.stopped.set_result(result)

    async def _until_stopped(self, run: CachedRun, workflow_name: str) -> None:
        """Wait for the run (in its own task) to stop under this claim: parked (kept in the cache), ended,
        or stopped by a signal, handled as an inline run's."""
        journal = run.journal
        try:
            outcome = await asyncio.shield(run.stopped)
        except (Suspended, Abandon, ContinuedAsNew) as signal:
            await self._signalled(journal, signal)
            return
        except asyncio.CancelledError:  # this claim's task is cancelled (the worker stops)
            stopped = run.stopped
            if stopped.done() and not stopped.cancelled() and stopped.exception() is None:
                if stopped.result() is PARKED:  # parked already, its suspension committed: kept
                    self.cache.put(journal.instance_id, run)
            elif run.task is not None:  # mid-step: the run stops with its claim, as an inline one
                run.task.cancel()
            raise
        if outcome is PARKED:
            self.cache.put(journal.instance_id, run)
            return
        self._ended(journal.instance_id, workflow_name, outcome)

    async def _drive(
        self, journal: Journal, ctx: WorkflowContext, workflow: Workflow[Any, Any], stored_input: str
    ) -> str | None:
        """Run the workflow's code to its end (or a suspension, raised); the stored result if it completed."""
        try:
            if journal.last_recorded == 0 and journal.cancel_pending():
                # Cancelled before it ever ran (a child still pending when its parent's end cancelled it,
                # a deadline passed before any worker took it): its code does not start, as an
                # `app.cancel` of a pending instance ends it unstarted. Delivered at its first step, so
                # a workflow with no step at all is cancelled too (it would complete), and `_fail`
                # records by whom (`_cancelled_by_parent`).
                journal.deliver_cancel(journal.next())
            args, kwargs = workflow.signature.load_args(decode(stored_input))
            token = CURRENT_WORKFLOW.set(ctx)
            try:
                result = await workflow.fn(ctx, *args, **kwargs)
            finally:
                CURRENT_WORKFLOW.reset(token)
            if journal.children:  # the children started with ParentClose.WAIT and not awaited
                await ctx._wait_for_children()
            encoded = encode(result, what=f"result of workflow {workflow.name}", limit=self.max_payload_bytes)
        except NonDeterminismError as exc:
            # Leave the history as it is: an operator decides (fix the code and retry, or cancel).
            logger.error("instance %s stopped: %s", journal.instance_id, exc)
            await self._finish(journal, Status.FAILED, discard=True, error=encode_error(exc))
            return None
        except Exception as exc:
            if journal.divergence is None:
                await self._fail(journal, ctx, exc)
                return None
        if journal.divergence is not None:  # raised, then swallowed by the workflow's own code
            logger.error("instance %s stopped: %s", journal.instance_id, journal.divergence)
            await self._finish(journal, Status.FAILED, discard=True, error=encode_error(journal.divergence))
            return None
        await self._finish(journal, Status.COMPLETED, result=encoded)
        return encoded

    async def _fail(self, journal: Journal, ctx: WorkflowContext, exc: Exception) -> None:
        try:
            exc = await ctx._wait_for_children_after(exc)
        except NonDeterminismError as nd:
            logger.error("instance %s stopped while it waited for its children: %s", journal.instance_id, nd)
            await self._finish(journal, Status.FAILED, discard=True, error=encode_error(nd))
            return
        cancelled = isinstance(exc, WorkflowCancelled)
        error = encode_error(exc)
        if cancelled and not isinstance(exc, WorkflowTimeout):  # its own deadline: not its parent's doing
            by_parent = await self._cancelled_by_parent(journal)
            if by_parent is not None:
                error["message"] = f"{error.get('message')}: by its parent {by_parent}, which ended"
                error["cancelled_by_parent"] = by_parent
        if journal.compensations:
            try:
                failures = await self.activities.compensate(journal)
            except NonDeterminismError as nd:
                logger.error("instance %s stopped during compensation: %s", journal.instance_id, nd)
                await self._finish(journal, Status.FAILED, discard=True, error=encode_error(nd))
                return
            if failures:
                error["compensation_errors"] = failures
        if not cancelled and not isinstance(exc, SerializationError):
            ctx.logger.info("failed: %s: %s", type(exc).__name__, exc)
        await self._finish(journal, Status.CANCELLED if cancelled else Status.FAILED, error=error)

    async def _cancelled_by_parent(self, journal: Journal) -> str | None:
        """A child cancelled by its parent's end (``ParentClose.CANCEL``, or ``WAIT`` when the parent was
        cancelled; one read of its row, on a cancellation only): the parent's id, also written into the
        ``cancelled`` row delivered now."""
        try:
            row = await self.storage.get_instance(journal.instance_id)
        except StorageError:
            return None
        if row is None or row.parent_id is None or row.parent_close != "cancelled":
            return None
        for n, pending in enumerate(journal.pending):
            if pending.kind == StepKind.CANCELLED:
                body = CancelledStep(row.parent_id).encode()
                journal.pending[n] = pending._replace(payload=body)
        return row.parent_id

    async def _finish(
        self,
        journal: Journal,
        status: Status,
        *,
        discard: bool = False,
        result: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Store the end (with the buffered rows, unless ``discard``), and in its transaction the
        cancellation of the children its parent-close policies cancel (``_closing``)."""
        await journal.finish(
            status,
            discard=discard,
            result=result,
            error=None if error is None else encode(error, what="error"),
            cancel_children=_closing(journal.children, status),
        )
        self.metrics.workflows_ended.values[(journal.workflow_name, status)] += 1

    async def _abandon(self, journal: Journal, signal: Abandon) -> None:
        cause = signal.args[0] if signal.args else signal
        if isinstance(cause, LeaseLost):
            logger.warning("instance %s: lease lost to another worker; this run stops", journal.instance_id)
            return
        logger.error(
            "instance %s: storage failed (%s); releasing it to be run again in %ss",
            journal.instance_id,
            cause,
            ABANDONED_RETRY,
        )
        try:
            now = self.clock()
            await self.storage.release([journal.lease], now, run_at=now + ABANDONED_RETRY)
        except (StorageError, LeaseLost):
            pass  # the lease expires by itself after lock_timeout
        except asyncio.CancelledError:
            raise
