"""The contexts user code receives: ``WorkflowContext`` (replay-aware steps) and ``ActivityContext``.

A ``WorkflowContext`` numbers every step the workflow takes. A step whose number is in the recorded
history returns its recorded outcome; the first step past the history runs and its outcome is committed
before the workflow goes on. Outcomes that need no durability of their own (``now``, ``uuid4``,
``random``, the start of a wait) are buffered and written in the same transaction as the next commit.
The numbering, the replay and the recording are the journal's (``journal``); the activities are run by
the activity runner (``activities``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random as _random
import uuid
from collections.abc import Coroutine, Mapping, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, overload
from urllib.parse import quote

from .. import _tracing
from .._channels import Message
from .._models import Event, ParentClose, Status, StepKind
from .._retry import seconds
from .._serde import decode, encode
from .._steps import (
    ChildStep,
    EventStep,
    EventTimeoutStep,
    MessageStep,
    NowStep,
    PublishStep,
    RandomStep,
    RawJSON,
    ReceiveStep,
    ReceiveTimeoutStep,
    SendEventStep,
    SendToStep,
    SetStateStep,
    SleepStep,
    StartChildStep,
    SubscribeStep,
    UuidStep,
    WaitEventStep,
    event_history_payload,
    message_history_payload,
)
from .._validation import (
    BROADCAST,
    check_channel,
    check_event_attribute,
    check_event_id,
    check_event_type,
    check_id,
    check_instance_id,
    check_mode,
    check_name,
    check_state_key,
    check_stream_key,
)
from .._versions import Versioning
from ..errors import (
    ChildWorkflowError,
    ConfigurationError,
    EventTimeout,
    InstanceAlreadyExistsError,
    InstanceNotFoundError,
    NonDeterminismError,
    QueueDeduplicated,
    ReceiveTimeout,
    StreamClosedError,
    WorkflowCancelled,
)
from ..storage.base import (
    ChildState,
    DedupHeld,
    EventWait,
    HistoryRow,
    MessageWait,
    NewInstance,
    NewMessage,
    NewOutboxEvent,
)
from . import journal as _journal
from .activities import ActivityContext, ActivityRunner, step_key
from .journal import RESUMED, Journal, Resumed, StreamSink

if TYPE_CHECKING:
    from .._definitions import Activity, Workflow, WorkflowStarter

__all__ = ["ActivityContext", "ChildHandle", "WorkflowContext"]

logger = logging.getLogger("geste.workflow")

T = TypeVar("T")
R = TypeVar("R")


class ChildHandle(Generic[R]):
    """A child workflow started by ``ctx.start_child``: ``await handle.result()`` waits durably for its
    end and returns its result (typed by the child's ``Workflow[P, R]``), or raises
    ``geste.errors.ChildWorkflowError`` if it failed or was cancelled. Only the workflow that started it
    awaits it (a handle is no value to keep in a workflow's arguments: keep ``handle.id``)."""

    __slots__ = ("_ctx", "_fresh", "_workflow", "id", "workflow_name")

    def __init__(
        self, ctx: WorkflowContext, child_id: str, workflow_name: str, workflow: Workflow[Any, R] | None
    ):
        self._ctx = ctx
        self._fresh = False
        """Started live by this run a moment ago: its first wait expects no end yet (no read first)."""
        self._workflow = workflow
        self.id = child_id
        """The child's instance id (``app.get_handle(id)`` reaches it from outside)."""
        self.workflow_name = workflow_name

    async def result(self) -> R:
        """The child's result: a durable wait (the parent is released until the child's end wakes it),
        recorded in the parent's history; at once if the child has ended already."""
        return await self._ctx._wait_child(self)

    def __repr__(self) -> str:
        return f"<geste.ChildHandle {self.workflow_name} {self.id}>"


class _ReplayQuietLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that says nothing while the workflow replays steps it already took."""

    def __init__(self, ctx: WorkflowContext) -> None:
        super().__init__(logger, {"instance_id": ctx.instance_id})
        self._ctx = ctx

    def isEnabledFor(self, level: int) -> bool:
        return not self._ctx.is_replaying and super().isEnabledFor(level)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{self._ctx.workflow_name} {self._ctx.instance_id}] {msg}", kwargs


CURRENT_WORKFLOW: contextvars.ContextVar[WorkflowContext | None] = contextvars.ContextVar(
    "geste_current_workflow", default=None
)
"""The context of the workflow whose code runs in this task (None outside one; its activities see it
too): how an integration that cannot be handed the context (pydantic-ai's durability capability) finds
it. Set once per run by the engine, in the run's own task."""


class WorkflowContext:
    """Passed to every workflow as its first argument; every durable operation goes through it."""

    def __init__(self, journal: Journal, activities: ActivityRunner) -> None:
        """The context of the run that ``journal`` records (built by the engine, never by user code)."""
        self._journal = journal
        self._host = journal.host
        self._activities = activities
        self.instance_id = journal.instance_id
        self.workflow_name = journal.workflow_name
        self._stream_writes: dict[str, int] = {}
        """Writes of this run to each stream so far: the n-th is keyed ``<run>:<n>`` (a replay's no-op)."""
        self._closed_streams: set[str] = set()
        self._subscriptions: dict[str, str] = {}
        """channel -> mode of this instance's subscriptions, rebuilt by the replay of its steps."""
        self.logger = _ReplayQuietLogger(self)

    # -- introspection ---------------------------------------------------------------------------
    @property
    def is_replaying(self) -> bool:
        """True while the workflow re-runs steps it took before (side effects outside steps repeat)."""
        return self._journal.is_replaying

    @property
    def run(self) -> int:
        """The number of this run of the instance: 1, then one more after each ``continue_as_new``."""
        return self._journal.run

    @property
    def continue_as_new_suggested(self) -> bool:
        """True once this run's history passed 10,000 steps (``engine.journal.LONG_HISTORY_STEPS``): every
        resume replays all of them, so a loop that checks this and calls ``continue_as_new`` keeps its
        wake-ups as cheap as its first ones. Deterministic: it counts the steps taken so far."""
        return self._journal.seq > _journal.LONG_HISTORY_STEPS

    # -- evolving code: patches -------------------------------------------------------------------
    def patched(self, patch_id: str) -> bool:
        """Whether this run takes the new branch of a code change named ``patch_id`` (docs/versioning.md).

        ``if ctx.patched("id"): <new code> else: <old code>`` lets a deploy change a workflow's steps
        under its running instances. A new run (one that reaches this point live) gets True, and a
        marker row is recorded (with the next commit, no round trip of its own); a replay of a history
        that holds the marker here gets True; a replay of a history recorded before the patch (it holds
        another step here, or the whole run, without the marker) gets False, and takes no step, so its
        recorded steps still match the old branch. Decided once per run: asked again, the same answer.
        """
        return self._journal.patched(check_name(patch_id, "patch"))

    def deprecate_patch(self, patch_id: str) -> None:
        """Keep only the new branch of ``patch_id`` once no old run remains (``geste patches`` says):
        replace ``if ctx.patched(id): new else: old`` by ``ctx.deprecate_patch(id); new``. Histories that
        hold the marker here take it; those without (recorded since) go on: nothing is required or
        recorded. Once no unfinished instance holds the marker either, the call can go too."""
        self._journal.deprecate_patch(check_name(patch_id, "patch"))

    # -- deterministic helpers ---------------------------------------------------------------------
    def now(self) -> datetime:
        """The current time (UTC), recorded so that a replay sees the same value."""
        journal = self._journal
        seq = journal.next()
        row = journal.replay(seq, StepKind.NOW, "now")
        if row is not None:
            return journal.read(row, NowStep).moment()
        journal.running()
        journal.live(seq)
        step = NowStep(self._host.clock())
        self._record_value(seq, StepKind.NOW, step.encode())
        return step.moment()

    def uuid4(self) -> uuid.UUID:
        """A random UUID, recorded so that a replay sees the same value."""
        journal = self._journal
        seq = journal.next()
        row = journal.replay(seq, StepKind.UUID, "uuid")
        if row is not None:
            return journal.read(row, UuidStep).value
        journal.running()
        journal.live(seq)
        value = uuid.uuid4()
        self._record_value(seq, StepKind.UUID, UuidStep(value).encode())
        return value

    def random(self) -> float:
        """A random float in [0, 1), recorded so that a replay sees the same value."""
        journal = self._journal
        seq = journal.next()
        row = journal.replay(seq, StepKind.RANDOM, "random")
        if row is not None:
            return float(journal.read(row, RandomStep).value)
        journal.running()
        journal.live(seq)
        value = _random.random()
        self._record_value(seq, StepKind.RANDOM, RandomStep(value).encode())
        return value

    def _record_value(self, seq: int, kind: StepKind, payload: str) -> None:
        """Record the value a ``now``, ``uuid4`` or ``random`` step made (with the next commit)."""
        self._journal.buffer(HistoryRow(seq, kind, kind.value, payload, False, self._host.clock()))

    # -- activities --------------------------------------------------------------------------------
    def on_failure(self, activity: Activity[Any, Any], /, *args: Any, **kwargs: Any) -> None:
        """Register a compensation: run (newest first) if the workflow fails or is cancelled."""
        from .._definitions import Activity

        if not isinstance(activity, Activity):
            raise TypeError(f"on_failure takes an activity (decorated with @app.activity), not {activity!r}")
        activity.signature.bind(args, kwargs, what=f"compensation {activity.name}")
        encode(
            {"args": args, "kwargs": kwargs},
            what=f"arguments of compensation {activity.name}",
            limit=self._host.max_payload_bytes,
        )
        self._journal.compensations.append((activity, args, kwargs))

    def _activity(
        self, activity: Activity[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Coroutine[Any, Any, Any]:
        """The step of a call of ``activity`` (what ``Activity.__call__`` returns to be awaited)."""
        return self._activities.step(self._journal, activity, args, kwargs)

    # -- continue as new ---------------------------------------------------------------------------
    async def continue_as_new(self, *args: Any, **kwargs: Any) -> NoReturn:
        """End this run and start the workflow afresh under the same instance id, with these arguments
        and a new, empty history; never returns.

        For loops that would otherwise grow one history without end (an entity that takes message after
        message, a poller, an agent): carry the state the next run needs in its arguments. The arguments
        are checked as ``start`` checks them (``SerializationError``, ``PayloadTooLargeError``), here,
        before anything is written. In one transaction with the rows not yet written, this run's history is
        kept (``app.runs``, ``app.history(id, run=n)``) and the next run is made runnable. What carries
        over: the events sent to the instance and the messages on its channels that this run did not take
        (the next run's ``wait_event`` and ``receive`` take them), its channel subscriptions with their
        positions, and its outbox events (still sent in order). What does not: its timers and waits, the
        compensations it registered (not run: a continue is no failure). A cancel requested before wins:
        ``WorkflowCancelled`` is raised here instead, as at any step. ``handle.result()`` waits for the
        last run's end. It must be awaited by the workflow itself, not inside a ``gather``.
        """
        journal = self._journal
        workflow = self._host.workflows.get(self.workflow_name)
        if workflow is not None:
            workflow.signature.bind(args, kwargs, what=f"workflow {self.workflow_name}")
        stored = encode(
            {"args": args, "kwargs": kwargs},
            what=f"input of workflow {self.workflow_name}",
            limit=self._host.max_payload_bytes,
        )
        seq = journal.next()
        row = journal.replay(seq, StepKind.CONTINUE_AS_NEW, self.workflow_name)
        if row is None:
            journal.begin(seq)
            journal.live(seq)
        await journal.continue_as_new(seq, stored, recorded=row is not None)

    # -- child workflows -----------------------------------------------------------------------------
    @overload
    async def start_child(
        self,
        workflow: Workflow[Any, R] | WorkflowStarter[Any, R],
        /,
        *args: Any,
        child_id: str | None = None,
        parent_close: ParentClose | str = ParentClose.CANCEL,
        **kwargs: Any,
    ) -> ChildHandle[R]: ...
    @overload
    async def start_child(
        self,
        workflow: str,
        /,
        *args: Any,
        child_id: str | None = None,
        parent_close: ParentClose | str = ParentClose.CANCEL,
        **kwargs: Any,
    ) -> ChildHandle[Any]: ...
    async def start_child(
        self,
        workflow: Workflow[Any, Any] | WorkflowStarter[Any, Any] | str,
        /,
        *args: Any,
        child_id: str | None = None,
        parent_close: ParentClose | str = ParentClose.CANCEL,
        **kwargs: Any,
    ) -> ChildHandle[Any]:
        """Start ``workflow`` as a child of this instance; return its handle.

        ``workflow`` is a workflow registered on this app (its arguments are checked against its
        signature, its result typed and validated), or the name of one that only other workers register
        (neither checked nor typed: a name no worker registers stays pending until one does, as a start
        of it by ``app.start_workflow`` would). A step of its own: the child's instance and this step's
        history row commit in one transaction, so a replay, or a rerun after a crash, never starts a
        second child. ``child_id`` defaults to one derived from this instance's id, run and step number
        (``"<id>:<seq>"``, ``"<id>:<run>.<seq>"`` after a ``continue_as_new``), the same on every replay.
        ``workflow.options(timeout=..., deadline=...)`` gives the child a deadline of its own, from
        the time of this step (the same on every replay): when it passes, the child is cancelled and
        ends with ``WorkflowTimeout``, which its parent sees as a ``ChildWorkflowError``.
        ``workflow.options(queue=..., priority=..., dedup_id=...)`` starts the child onto a queue
        (docs/queues.md): it waits, queued, until a worker serving the queue admits it. A dedup id held
        by an unfinished instance of the queue raises ``QueueDeduplicated`` (recorded: a replay raises it
        again), whatever ``on_duplicate`` says: the holder is not this instance's child.
        The child runs on any worker that registers its workflow. ``parent_close`` (``ParentClose``)
        says what this instance's end does to the child if it still runs: cancel it (default), abandon
        it, or wait for it (cancel it if this instance is cancelled). Raises, before anything is
        written: ``UnknownWorkflowError`` (a workflow object this app does not register),
        ``SerializationError`` (arguments that do not fit its signature, or are not JSON),
        ``ConfigurationError`` (a bad ``child_id``, name or policy), and ``InstanceAlreadyExistsError``
        (recorded: a replay raises it again) when ``child_id`` names an instance that is not this step's
        child.
        """
        from .._definitions import Workflow, WorkflowStarter
        from .._retry import workflow_deadline
        from ..errors import UnknownWorkflowError

        known: Workflow[Any, Any] | None
        starter = workflow if isinstance(workflow, WorkflowStarter) else None
        if starter is not None:
            if starter.connection is not None:  # the child is written with the parent's step, by geste
                raise ConfigurationError("start_child takes no connection= option (docs/transactions.md)")
            workflow = starter.workflow
        if isinstance(workflow, str):
            name = check_name(workflow, "workflow")
            known = self._host.workflows.get(name)
        elif isinstance(workflow, Workflow):
            name, known = workflow.name, workflow
        else:
            raise TypeError(
                "start_child takes a workflow (decorated with @app.workflow, or its .options(...)) "
                f"or its name, not {workflow!r:.80}"
            )
        try:
            policy = ParentClose(parent_close)
        except ValueError:
            choices = ", ".join(repr(p.value) for p in ParentClose)
            raise ConfigurationError(
                f"parent_close must be one of {choices}, not {parent_close!r:.80}"
            ) from None
        if child_id is not None:
            check_id(child_id, "child_id")
        if known is not None:
            known.signature.bind(args, kwargs, what=f"workflow {name}")
        stored = encode(
            {"args": args, "kwargs": kwargs},
            what=f"input of workflow {name}",
            limit=self._host.max_payload_bytes,
        )
        journal = self._journal
        seq = journal.next()
        row = journal.replay(seq, StepKind.START_CHILD, name)
        if row is not None:
            started = journal.read(row, StartChildStep)
            if started.dedup is not None:
                raise QueueDeduplicated(*started.dedup)
            if started.error is not None:
                raise InstanceAlreadyExistsError(started.error)
            journal.children[started.child_id] = started.parent_close
            return ChildHandle(self, started.child_id, name, known)
        if isinstance(workflow, Workflow) and self._host.workflows.get(name) is not workflow:
            raise UnknownWorkflowError(name)  # (checked live only: a replay check has the parent alone)
        journal.begin(seq)
        journal.live(seq, ordered=False)
        cid = step_key(self.instance_id, journal.run, seq) if child_id is None else child_id
        now = self._host.clock()
        due = None if starter is None else workflow_deadline(starter.timeout, starter.deadline, now)
        done = HistoryRow(
            seq, StepKind.START_CHILD, name, StartChildStep(cid, policy.value).encode(), False, now
        )
        queue, priority, dedup_id, key = (None, 0, None, "")
        if starter is not None:  # onto a queue (20): created queued, admitted by a claim of the queue
            queue, priority, dedup_id = starter.queue, starter.priority, starter.dedup_id
            key = starter.partition_key  # its partition (22)
        pinned = known is not None and known.versioning is Versioning.PINNED
        trace, span = journal.trace, None
        if trace is not None:  # the child's start span, in this run's: the child's spans are of this trace
            span = trace.child_start(cid, name, seq)
        child = NewInstance(
            cid,
            name,
            stored,
            now,
            due,
            queue,
            priority,
            dedup_id,
            key,
            self._host.version(),
            pinned,
            None if span is None else _tracing.dump(span),
        )
        try:
            taken = await journal.start_child(done, child, policy.value)
        except BaseException as exc:  # Abandon (a storage failure), a cancellation: ended, as an error
            if span is not None:
                _tracing.end(span, exc)
            raise
        if span is not None:
            span.set_attribute("geste.created", taken is None)
            _tracing.end(span)
        if isinstance(taken, DedupHeld):  # another instance holds its queue's dedup id: recorded, raised
            assert queue is not None and dedup_id is not None
            held = QueueDeduplicated(queue, dedup_id, taken.instance_id)
            body = StartChildStep(cid, policy.value, str(held), (queue, dedup_id, taken.instance_id)).encode()
            await journal.commit(HistoryRow(seq, StepKind.START_CHILD, name, body, True, now))
            raise held
        if taken is not None:
            if taken.parent_id != self.instance_id or taken.workflow_name != name:
                problem = (
                    f"instance {cid!r} exists already (a {taken.workflow_name!r} workflow"
                    f"{'' if taken.parent_id is None else f' started by {taken.parent_id!r}'}): it cannot be "
                    f"the child {name!r} of {self.instance_id!r}"
                )
                body = StartChildStep(cid, policy.value, problem).encode()
                await journal.commit(HistoryRow(seq, StepKind.START_CHILD, name, body, True, now))
                raise InstanceAlreadyExistsError(problem)
            await journal.commit(done)  # our own child, its step's row lost: recorded again
        journal.children[cid] = policy.value
        handle: ChildHandle[Any] = ChildHandle(self, cid, name, known)
        handle._fresh = True
        return handle

    @overload
    async def run_child(
        self, workflow: Workflow[Any, R] | WorkflowStarter[Any, R], /, *args: Any, **kwargs: Any
    ) -> R: ...
    @overload
    async def run_child(self, workflow: str, /, *args: Any, **kwargs: Any) -> Any: ...
    async def run_child(
        self, workflow: Workflow[Any, Any] | WorkflowStarter[Any, Any] | str, /, *args: Any, **kwargs: Any
    ) -> Any:
        """``start_child`` then ``result()``: start ``workflow`` as a child and wait for its result (the
        options of ``start_child`` are taken here too)."""
        handle = await self.start_child(workflow, *args, **kwargs)
        return await handle.result()

    async def _wait_child(self, handle: ChildHandle[R]) -> R:
        """A durable wait for ``handle``'s end: its outcome is a ``child`` row, found in the history on a
        replay, or read from the child (then buffered) once it has ended."""
        if handle._ctx is not self:
            raise ConfigurationError("a child is awaited by the workflow run that started it")
        journal = self._journal
        seq = journal.next()
        fresh, handle._fresh = handle._fresh, False
        while True:  # again when a cached run continues here (woken by a child's end, or a cancel)
            out = journal.wait_outcome(seq, handle.id, StepKind.CHILD, StepKind.CHILD, "child")
            if out is not None:
                return self._child_outcome(handle, journal.read(out, ChildStep))
            journal.running()
            # A wait resumed (woken, most likely by the child's end) reads the child first: one probe
            # of its key rather than the suspension's transaction; a child just started is not read.
            ended = None if fresh else await journal.child_ended(handle.id)
            fresh = False
            taken = ended if ended is not None else await journal.take_child_or_suspend(handle.id, seq)
            if isinstance(taken, ChildState):
                break
        error = None if taken.error is None else decode(taken.error)
        result = None if taken.result is None else RawJSON(taken.result)
        body = ChildStep(taken.workflow_name, str(taken.status), result, error).encode()
        step = ChildStep.decode(body)
        journal.buffer(HistoryRow(seq, StepKind.CHILD, handle.id, body, step.is_error, self._host.clock()))
        return self._child_outcome(handle, step)

    def _child_outcome(self, handle: ChildHandle[R], step: ChildStep) -> R:
        self._journal.children.pop(handle.id, None)
        if step.status != Status.COMPLETED:
            raise ChildWorkflowError(handle.id, step.workflow, step.status, step.error)
        workflow = handle._workflow
        return step.result if workflow is None else workflow.signature.load_result(step.result)  # type: ignore[no-any-return]

    async def _wait_for_children(self) -> None:
        """At the end of the workflow's code: wait for the children started with ``ParentClose.WAIT``
        that it did not await (their failures are not its own)."""
        for cid, policy in list(self._journal.children.items()):
            if policy == ParentClose.WAIT:
                handle: ChildHandle[Any] = ChildHandle(self, cid, "", None)
                with contextlib.suppress(ChildWorkflowError):
                    await self._wait_child(handle)

    async def _wait_for_children_after(self, error: Exception) -> Exception:
        """The workflow's code raised ``error``: unless it is a cancellation (which cancels them instead:
        ``ParentClose``), the ``ParentClose.WAIT`` children it did not await are awaited first, as at
        its completion, durable waits that a replay finds again (their failures are not its own). What
        ends the run is returned: ``error``, or the cancellation delivered at such a wait (a cancel
        wins there, as at completion). A divergence found meanwhile is raised."""
        if isinstance(error, WorkflowCancelled) or ParentClose.WAIT not in self._journal.children.values():
            return error
        try:
            await self._wait_for_children()
        except WorkflowCancelled as cancelled:
            return cancelled
        return error

    # -- durable timers ----------------------------------------------------------------------------
    async def sleep(self, duration: float | timedelta) -> None:
        """Wait durably: the instance is released and resumed (on any worker) once the time is up."""
        secs = seconds(duration, what="sleep duration")
        journal = self._journal
        seq = journal.next()
        row = journal.replay(seq, StepKind.SLEEP, "sleep")
        now = started = self._host.clock()
        if row is None:
            journal.begin(seq)
            journal.live(seq)
            expires_at = now + secs
            journal.buffer(
                HistoryRow(seq, StepKind.SLEEP, "sleep", SleepStep(secs, expires_at).encode(), False, now)
            )
        else:
            expires_at = float(journal.read(row, SleepStep).expires_at)
            if journal.last_recorded > seq:
                journal.cancelled_here()
                return
            started = row.created_at
        while now < expires_at:  # again after a wake-up that continues a cached run early
            if journal.cancel_pending():
                journal.deliver_cancel(journal.next())
            await journal.suspend(run_at=expires_at, timer=(seq, expires_at))
            now = self._host.clock()
        if journal.trace is not None:  # this run is the first past it (a later step would return above)
            journal.trace.wait("sleep", None, seq, started, now, seconds=secs)

    async def sleep_until(self, when: datetime) -> None:
        """Wait durably until ``when`` (an aware datetime; a naive one is taken as UTC)."""
        if not isinstance(when, datetime):
            raise TypeError(f"sleep_until takes a datetime, not {when!r}")
        moment = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        seq_time = self.now().timestamp()
        await self.sleep(max(0.0, moment.timestamp() - seq_time))

    # -- events --------------------------------------------------------------------------------------
    async def wait_event(
        self,
        event_type: str,
        *,
        match: Mapping[str, Any] | None = None,
        timeout: float | timedelta | None = None,
    ) -> Event:
        """Wait durably for an event of ``event_type`` whose data has every key/value of ``match``.

        Events sent with ``app.send_event`` at or after this instance was started are kept until it takes
        them, so an event that arrives before the workflow waits is not lost. Raises
        ``geste.errors.EventTimeout`` after ``timeout``.
        """
        check_event_type(event_type)
        match_dict = dict(match) if match is not None else None
        secs = None if timeout is None else seconds(timeout, what="timeout")
        journal = self._journal
        seq = journal.next()
        row = journal.replay(seq, StepKind.WAIT_EVENT, event_type)
        if row is None:
            journal.begin(seq)
            now = started = self._host.clock()
            deadline = None if secs is None else now + secs
            body = WaitEventStep(match_dict, secs, deadline).encode(limit=self._host.max_payload_bytes)
            journal.live(seq)
            journal.buffer(HistoryRow(seq, StepKind.WAIT_EVENT, event_type, body, False, now))
            # matched as recorded (JSON), like the events it is compared with, whether it finds one
            # now or app.send_event brings one later: a tuple, a date or an int key match the same
            match_dict = WaitEventStep.decode(body).match
        else:
            wait = journal.read(row, WaitEventStep)
            deadline, match_dict = _optional_float(wait.deadline), wait.match
            started = row.created_at
        out_seq = journal.next()
        while True:  # once more when a cached run continues here: its outcome is recorded now
            out = journal.wait_outcome(out_seq, event_type, StepKind.EVENT, StepKind.EVENT_TIMEOUT, "event")
            if out is not None:
                timed_out = out.kind == StepKind.EVENT_TIMEOUT
                if journal.trace is not None:
                    self._traced_wait("event", event_type, seq, started, out_seq, timed_out)
                if timed_out:
                    raise EventTimeout(f"no {event_type!r} event arrived within {secs}s")
                return journal.read(out, EventStep).event()
            now = self._host.clock()
            event_wait = EventWait(event_type, match_dict, deadline, out_seq)
            taken = await journal.take_event_or_suspend(event_wait, now)
            if taken is not RESUMED:
                break
        if journal.trace is not None:
            self._traced_wait("event", event_type, seq, started, out_seq, taken is None)
        if taken is not None:
            assert not isinstance(taken, Resumed)
            return EventStep.decode(event_history_payload(taken)).event()
        journal.buffer(
            HistoryRow(out_seq, StepKind.EVENT_TIMEOUT, event_type, EventTimeoutStep().encode(), True, now)
        )
        raise EventTimeout(f"no {event_type!r} event arrived within {secs}s")

    # -- the transactional outbox ------------------------------------------------------------------
    async def send_event(
        self,
        event_type: str,
        data: Any = None,
        *,
        source: str | None = None,
        subject: str | None = None,
        event_id: str | None = None,
    ) -> str:
        """Emit an event to the outside world through the transactional outbox; return its id.

        A step of its own: its history row and the outbox row commit in one transaction (with the
        buffered rows before it), so the event exists exactly when the step is recorded, and a replay
        returns the recorded id without emitting it again. The relay delivers it at least once, after
        this instance's earlier events (docs/guide.md, "The transactional outbox"). ``event_id`` defaults to
        ``"<instance id>:<seq>"`` (``"<instance id>:<run>.<seq>"`` after a ``continue_as_new``), the same
        on every replay; an id already in the outbox is not stored again. ``source`` defaults to
        ``/geste/<workflow name>``.
        """
        check_event_attribute(event_type, "event_type")
        if source is not None:
            check_event_attribute(source, "source")
        if subject is not None:
            check_event_attribute(subject, "subject")
        if event_id is not None:
            check_event_id(event_id)
        journal = self._journal
        seq = journal.next()
        row = journal.replay(seq, StepKind.SEND_EVENT, event_type)
        if row is not None:
            return journal.read(row, SendEventStep).event_id
        journal.begin(seq)
        encoded = (
            None
            if data is None
            else encode(data, what=f"data of event {event_type}", limit=self._host.max_payload_bytes)
        )
        journal.live(seq, ordered=False)
        eid = step_key(self.instance_id, journal.run, seq) if event_id is None else event_id
        src = f"/geste/{quote(self.workflow_name, safe='')}" if source is None else source
        now = self._host.clock()
        body = SendEventStep(eid, event_type, src, subject).encode()
        await journal.send_event(
            HistoryRow(seq, StepKind.SEND_EVENT, event_type, body, False, now),
            NewOutboxEvent(eid, seq, event_type, src, subject, encoded),
            now,
        )
        return eid

    # -- published state -------------------------------------------------------------------------------
    async def set_state(self, key: str, value: Any) -> None:
        """Publish ``value`` (JSON-serialisable) under ``key``: ``handle.get_state(key)`` reads it from any
        process, ``handle.wait_state(key, after=...)`` wakes on it (docs/state.md).

        A step of its own: the value, the key's next version (1, 2, ...) and the step's history row
        commit in one transaction, so a replay writes nothing and a value is never written twice. Every
        value is kept (``get_state(key, version=n)``); they stay after the instance's end and across
        ``continue_as_new`` (versions go on). Raises, before anything is written,
        ``ConfigurationError`` for a bad key (a non-empty string of at most 200 characters),
        ``SerializationError`` for a value that is not JSON, ``PayloadTooLargeError`` past
        ``App(max_payload_bytes=...)``.
        """
        check_state_key(key)
        journal = self._journal
        seq = journal.next()
        row = journal.replay(seq, StepKind.SET_STATE, key)
        if row is not None:
            journal.read(row, SetStateStep)
            return
        journal.begin(seq)
        encoded = encode(value, what=f"value of state {key}", limit=self._host.max_payload_bytes)
        journal.live(seq, ordered=False)
        now = self._host.clock()
        body = SetStateStep(len(encoded)).encode()
        await journal.set_state(HistoryRow(seq, StepKind.SET_STATE, key, body, False, now), key, encoded, now)

    # -- channels ------------------------------------------------------------------------------------
    # -- durable streams (docs/streams.md) ----------------------------------------------------------
    async def write_stream(self, key: str, item: Any) -> None:
        """Append ``item`` (JSON) to this instance's durable stream ``key``; return once it committed.

        Not a step (nothing in the history): the n-th write of this run to ``key`` is keyed ``<run>:<n>``,
        so a replay, which writes again, writes nothing, and each item is in the stream once. Any process
        reads it with ``handle.read_stream(key)``. ``StreamClosedError`` after ``close_stream(key)``."""
        key = check_stream_key(key)
        if key in self._closed_streams:
            raise StreamClosedError(f"stream {key!r:.80} of instance {self.instance_id} was closed")
        n = self._stream_writes.get(key, 0)
        self._stream_writes[key] = n + 1
        stored = encode(item, what=f"an item of stream {key!r:.80}", limit=self._host.max_payload_bytes)
        sink: StreamSink | None = getattr(self._host, "streams", None)
        if sink is not None:
            with _journal._abandon_on_failure:  # a database error stops the run: its replay writes again
                await sink.write(self.instance_id, key, f"{self.run}:{n}", stored)

    async def close_stream(self, key: str) -> None:
        """Close the stream ``key``: its readers' loops end once they read what came before (the
        instance's end closes every stream of it too). Idempotent; later writes raise."""
        key = check_stream_key(key)
        self._closed_streams.add(key)
        sink: StreamSink | None = getattr(self._host, "streams", None)
        if sink is not None:
            with _journal._abandon_on_failure:
                await sink.write(self.instance_id, key, "close", None)

    async def subscribe(self, channel: str, mode: str = "broadcast") -> None:
        """Subscribe this instance to ``channel``: it receives the messages published from now on.

        ``"broadcast"``: every message, in publication order. ``"competing"``: the channel's competing
        subscribers share its messages, each taken by exactly one of them. A step of its own (one
        commit). Subscribing again in the same mode does nothing; in the other mode raises
        ``geste.errors.ConfigurationError``. A first ``receive`` on a channel subscribes in broadcast mode.
        """
        check_channel(channel)
        check_mode(mode)
        if self._subscribed(channel, mode):
            return
        journal = self._journal
        seq = journal.next()
        row = journal.replay(seq, StepKind.SUBSCRIBE, channel)
        if row is not None:
            self._replayed_subscription(seq, row, channel, mode)
            return
        journal.begin(seq)
        journal.live(seq, ordered=False)
        now = self._host.clock()
        body = SubscribeStep(mode).encode()
        await journal.subscribe(
            HistoryRow(seq, StepKind.SUBSCRIBE, channel, body, False, now), channel, mode, now
        )
        self._subscriptions[channel] = mode

    async def receive(self, channel: str, timeout: float | timedelta | None = None) -> Message:
        """Wait durably for this instance's next message on ``channel`` and return it.

        Subscribed in broadcast mode: the next message published after the subscription, in order;
        in competing mode: the oldest one no other competing subscriber took. A message sent to this
        instance with ``send_to`` comes in publication order with them. A message published while the
        instance is not waiting (running, suspended, crashed) is kept until it receives. Never
        subscribed to ``channel``: this receive subscribes it in broadcast mode, from now on. Raises
        ``geste.errors.ReceiveTimeout`` after ``timeout``.
        """
        check_channel(channel)
        secs = None if timeout is None else seconds(timeout, what="timeout")
        journal = self._journal
        mode = self._subscriptions.get(channel)
        if mode is None:  # an implicit subscription: its row is written with the receive's transaction
            mode = BROADCAST
            seq = journal.next()
            row = journal.replay(seq, StepKind.SUBSCRIBE, channel)
            if row is not None:
                self._replayed_subscription(seq, row, channel, mode)
            else:
                journal.begin(seq)
                journal.live(seq)
                body = SubscribeStep(mode, implicit=True).encode()
                journal.buffer(HistoryRow(seq, StepKind.SUBSCRIBE, channel, body, False, self._host.clock()))
                self._subscriptions[channel] = mode
        seq = journal.next()
        row = journal.replay(seq, StepKind.RECEIVE, channel)
        if row is None:
            journal.begin(seq)
            journal.live(seq)
            now = started = self._host.clock()
            deadline = None if secs is None else now + secs
            body = ReceiveStep(secs, deadline).encode()
            journal.buffer(HistoryRow(seq, StepKind.RECEIVE, channel, body, False, now))
        else:
            deadline = _optional_float(journal.read(row, ReceiveStep).deadline)
            started = row.created_at
        out_seq = journal.next()
        while True:  # once more when a cached run continues here: its outcome is recorded now
            out = journal.wait_outcome(
                out_seq, channel, StepKind.MESSAGE, StepKind.RECEIVE_TIMEOUT, "message on channel"
            )
            if out is not None:
                timed_out = out.kind == StepKind.RECEIVE_TIMEOUT
                if journal.trace is not None:
                    self._traced_wait("message", channel, seq, started, out_seq, timed_out)
                if timed_out:
                    raise ReceiveTimeout(f"no message on channel {channel!r} within {secs}s")
                return journal.read(out, MessageStep).message()
            now = self._host.clock()
            taken = await journal.take_message_or_suspend(MessageWait(channel, mode, deadline, out_seq), now)
            if taken is not RESUMED:
                break
        if journal.trace is not None:
            self._traced_wait("message", channel, seq, started, out_seq, taken is None)
        if taken is not None:
            assert not isinstance(taken, Resumed)
            return MessageStep.decode(message_history_payload(taken)).message()
        journal.buffer(
            HistoryRow(out_seq, StepKind.RECEIVE_TIMEOUT, channel, ReceiveTimeoutStep().encode(), True, now)
        )
        raise ReceiveTimeout(f"no message on channel {channel!r} within {secs}s")

    def _traced_wait(
        self, kind: str, name: str, seq: int, started: float, out_seq: int, timed_out: bool
    ) -> None:
        """The span of a wait (``geste.wait <kind>``) whose outcome (step ``out_seq``) this run is the
        first to go past: the outcome is the last step recorded, or is taken now."""
        journal = self._journal
        if journal.trace is not None and out_seq >= journal.last_recorded:
            journal.trace.wait(kind, name, seq, started, self._host.clock(), timed_out=timed_out)

    async def publish(self, channel: str, data: Any = None) -> str:
        """Publish ``data`` (JSON-serialisable) on ``channel``; return the message id.

        A step of its own: the message and its history row commit in one transaction (with the rows
        buffered before it), so a replay returns the recorded id and never publishes again. The
        subscribers waiting on the channel are made runnable in that transaction.
        """
        return await self._publish(StepKind.PUBLISH, channel, data, None)

    async def send_to(self, instance_id: str, channel: str, data: Any = None) -> str:
        """Send ``data`` to instance ``instance_id`` only, on ``channel``; return the message id.

        It takes it with ``receive(channel)``, whenever it does (the message is kept until then). A step
        like ``publish``; an instance id that does not exist raises ``geste.errors.InstanceNotFoundError``
        (recorded: a replay raises it again).
        """
        check_instance_id(instance_id)
        return await self._publish(StepKind.SEND_TO, channel, data, instance_id)

    async def _publish(self, kind: StepKind, channel: str, data: Any, target: str | None) -> str:
        check_channel(channel)
        journal = self._journal
        seq = journal.next()
        row = journal.replay(seq, kind, channel)
        if row is not None:
            published = journal.read(row, PublishStep)  # a SendToStep is one
            if row.is_error:
                raise InstanceNotFoundError(str(published.target_instance_id))
            return str(published.message_id)
        journal.begin(seq)
        encoded = encode(
            data, what=f"data of a message on channel {channel}", limit=self._host.max_payload_bytes
        )
        journal.live(seq, ordered=False)
        message_id = uuid.uuid4().hex
        now = self._host.clock()
        step = PublishStep if kind is StepKind.PUBLISH else SendToStep
        body = step(message_id, target).encode()
        if not await journal.publish(
            HistoryRow(seq, kind, channel, body, False, now),
            NewMessage(message_id, channel, encoded, self.instance_id, target, now),
            now,
        ):  # nothing was written: record the outcome, so a replay raises it too
            missing = step(None, target).encode()
            await journal.commit(HistoryRow(seq, kind, channel, missing, True, now))
            raise InstanceNotFoundError(str(target))
        return message_id

    def _subscribed(self, channel: str, mode: str) -> bool:
        current = self._subscriptions.get(channel)
        if current is None:
            return False
        if current != mode:
            raise ConfigurationError(
                f"instance {self.instance_id} is subscribed to channel {channel!r} in {current} mode "
                f"already; it cannot subscribe in {mode} mode too"
            )
        return True

    def _replayed_subscription(self, seq: int, row: HistoryRow, channel: str, mode: str) -> None:
        recorded = self._journal.read(row, SubscribeStep).mode
        if recorded != mode:
            raise self._journal.diverged(
                NonDeterminismError(
                    seq, f"subscribe {channel!r} ({recorded})", f"subscribe {channel!r} ({mode})"
                )
            )
        self._subscriptions[channel] = mode


def _optional_float(value: float | None) -> float | None:
    """A recorded deadline as the run uses it (a float, as it was written)."""
    return None if value is None else float(value)
