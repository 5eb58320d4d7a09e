"""One run of one instance: load its history, replay the workflow, record what is new, store the end.

The engine holds no state between runs: whatever a run needs is in the database, so any worker can run
any instance, and a waiting instance costs no memory anywhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._metrics import Metrics
from .._models import Status
from .._serde import decode, encode, encode_error
from ..errors import NonDeterminismError, SerializationError, StorageError, WorkflowCancelled
from ..storage.base import Claim, HistoryRow, LeaseLost, Storage
from .context import Abandon, Suspended, WorkflowContext

if TYPE_CHECKING:
    from .._definitions import Workflow

logger = logging.getLogger("geste.engine")

ABANDONED_RETRY = 1.0
"""Seconds before a run abandoned on a storage error is tried again: a database that keeps refusing a
write (or is down) costs one attempt a second, not a busy loop."""

UNKNOWN_WORKFLOW_RETRY = 30.0
"""Seconds before an instance of a workflow this worker does not know is offered again (to a peer)."""


async def _retry_sleep(_instance_id: str, delay: float) -> None:
    await asyncio.sleep(delay)


class Engine:
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
    ) -> None:
        self.storage = storage
        self.metrics = metrics or Metrics()
        """Counted here and by the contexts: steps recorded, activity attempts, instances ended."""
        self.workflows = workflows
        self.clock = clock
        self.lock_timeout = lock_timeout
        self.max_payload_bytes = max_payload_bytes
        self.on_suspended = on_suspended
        self.on_finished = on_finished
        self.on_completed: Callable[[str, str, str], None] = lambda _id, _workflow, _result: None
        """Called with the instance id, workflow name and stored result once a completion committed: the
        App keeps it, so that awaiting a result this process produced costs no read."""
        self.on_channel_woken: Callable[[], None] = lambda: None
        """Called after a step published a message that made receivers runnable: the App pokes its worker."""
        self.on_outbox: Callable[[str], None] = lambda _event_id: None
        """Called with the event id after a step recorded an outbox event: the App pokes its relay."""
        self.retry_wait: Callable[[str, float], Awaitable[None]] = _retry_sleep
        """How an activity's retry back-off waits, given the instance id and the seconds: in real time;
        ``geste.testing`` makes it wait for its virtual clock instead."""

    async def run(self, claim: Claim, history: Sequence[HistoryRow] | None = None) -> None:
        """Run the claimed instance until it suspends, finishes, or cannot go on."""
        instance_id = claim.lease.instance_id
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
        ctx = WorkflowContext(
            self,
            lease=claim.lease,
            workflow_name=claim.workflow_name,
            history=history,
            cancel_requested=claim.cancel_requested,
        )
        try:
            result = await self._drive(ctx, workflow, claim.input)
        except (Suspended, Abandon) as signal:
            if isinstance(signal, Abandon):
                await self._abandon(ctx, signal)
            return
        if result is not None:
            self.on_completed(instance_id, claim.workflow_name, result)
        self.on_finished(instance_id)

    async def _drive(
        self, ctx: WorkflowContext, workflow: Workflow[Any, Any], stored_input: str
    ) -> str | None:
        """Run the workflow's code to its end (or a suspension, raised); the stored result if it completed."""
        try:
            args, kwargs = workflow.signature.load_args(decode(stored_input))
            result = await workflow.fn(ctx, *args, **kwargs)
            encoded = encode(result, what=f"result of workflow {workflow.name}", limit=self.max_payload_bytes)
        except NonDeterminismError as exc:
            # Leave the history as it is: an operator decides (fix the code and retry, or cancel).
            logger.error("instance %s stopped: %s", ctx.instance_id, exc)
            await self._finish(ctx, [], Status.FAILED, error=encode_error(exc))
            return None
        except Exception as exc:
            if ctx._divergence is None:
                await self._fail(ctx, exc)
                return None
        if ctx._divergence is not None:  # raised, then swallowed by the workflow's own code
            logger.error("instance %s stopped: %s", ctx.instance_id, ctx._divergence)
            await self._finish(ctx, [], Status.FAILED, error=encode_error(ctx._divergence))
            return None
        await self._finish(ctx, ctx._pending, Status.COMPLETED, result=encoded)
        return encoded

    async def _fail(self, ctx: WorkflowContext, exc: Exception) -> None:
        cancelled = isinstance(exc, WorkflowCancelled)
        error = encode_error(exc)
        if ctx._compensations:
            try:
                failures = await ctx._run_compensations()
            except NonDeterminismError as nd:
                logger.error("instance %s stopped during compensation: %s", ctx.instance_id, nd)
                await self._finish(ctx, [], Status.FAILED, error=encode_error(nd))
                return
            if failures:
                error["compensation_errors"] = failures
        if not cancelled and not isinstance(exc, SerializationError):
            ctx.logger.info("failed: %s: %s", type(exc).__name__, exc)
        await self._finish(ctx, ctx._pending, Status.CANCELLED if cancelled else Status.FAILED, error=error)

    async def _finish(
        self,
        ctx: WorkflowContext,
        records: Sequence[HistoryRow],
        status: Status,
        *,
        result: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        try:
            await self.storage.finish(
                ctx._lease,
                records,
                now=self.clock(),
                status=status,
                result=result,
                error=None if error is None else encode(error, what="error"),
            )
        except (LeaseLost, StorageError) as exc:
            raise Abandon(exc) from exc
        self.metrics.recorded(records)
        self.metrics.workflows_ended.values[(ctx.workflow_name, status)] += 1
        ctx._pending = []

    async def _abandon(self, ctx: WorkflowContext, signal: Abandon) -> None:
        cause = signal.args[0] if signal.args else signal
        if isinstance(cause, LeaseLost):
            logger.warning("instance %s: lease lost to another worker; this run stops", ctx.instance_id)
            return
        logger.error(
            "instance %s: storage failed (%s); releasing it to be run again in %ss",
            ctx.instance_id,
            cause,
            ABANDONED_RETRY,
        )
        try:
            now = self.clock()
            await self.storage.release([ctx._lease], now, run_at=now + ABANDONED_RETRY)
        except (StorageError, LeaseLost):
            pass  # the lease expires by itself after lock_timeout
        except asyncio.CancelledError:
            raise
