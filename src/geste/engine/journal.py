"""The journal of one run: the recorded history the workflow's steps replay, and what they record next.

Every step the workflow takes gets the next number (``next``). A step whose number is in the recorded
history returns its recorded outcome (``replay``, ``read``); the first step past the history runs
(``live``) and its outcome is committed before the workflow goes on. Outcomes that need no durability of
their own (``now``, ``uuid4``, ``random``, the start of a wait, an activity's result) are buffered
(``buffer``) and written in the same transaction as the next commit (``flush``, or the storage call of
the step that commits: a suspension, a publication, an event sent, the end).

The journal holds the run's state (step numbers, the divergence that stops it, the cancellation and its
delivery, the compensations registered, the suspension) and makes every storage call that records: one
place maps what storage raises (the lease lost, a database error) to ``Abandon``. It is also where a run
ends by ``continue_as_new`` (``ContinuedAsNew``), and where a history that grows past
``LONG_HISTORY_STEPS`` is noticed (a comparison per commit).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from operator import itemgetter
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

from .._metrics import Metrics
from .._models import Status, StepKind
from .._steps import STEPS, CancelledStep, ContinueAsNewStep, RawJSON, Step, decode_step
from ..errors import (
    HistoryCorruptedError,
    NonDeterminismError,
    StorageError,
    WorkflowCancelled,
    WorkflowTimeout,
)
from ..storage.base import (
    ChildState,
    Commit,
    DedupHeld,
    EventWait,
    HistoryRow,
    Lease,
    LeaseLost,
    MessageWait,
    NewInstance,
    NewMessage,
    NewOutboxEvent,
    Storage,
    StoredEvent,
    StoredMessage,
    Suspension,
)

if TYPE_CHECKING:
    from .._definitions import Activity, Workflow
    from .._tracing import RunTrace

logger = logging.getLogger("geste.engine")

LONG_HISTORY_STEPS = 10_000
"""A run whose history passes this many steps is warned about, once (a log line and
``geste_long_histories_total``), and ``ctx.continue_as_new_suggested`` says so: each resume replays the
whole history, so its cost grows with it (docs/guide.md, "Long-lived workflows: continue as new")."""

T = TypeVar("T")
S = TypeVar("S", bound=Step)

_WAIT_KINDS = frozenset(
    kind.value
    for kind in (
        StepKind.SLEEP,
        StepKind.WAIT_EVENT,
        StepKind.EVENT,
        StepKind.EVENT_TIMEOUT,
        StepKind.RECEIVE,
        StepKind.MESSAGE,
        StepKind.RECEIVE_TIMEOUT,
        StepKind.CHILD,
    )
)
"""Rows of waits: a wait is never inside a gather, so everything before one was recorded before it."""
_INT = frozenset((int,))
_seq_of = itemgetter(0)
_kind_of = itemgetter(1)
"""A ``HistoryRow``'s seq and kind, read in C (a named tuple): a replay's journal looks at every row."""


class _Unwind(BaseException):
    """Base of the engine's own signals: ``BaseException`` so a user's ``except Exception`` lets them by."""


class Suspended(_Unwind):
    """The wait was committed and the instance released; unwind the coroutine, keep nothing. Raised at
    the wait when no cache keeps the run (``Journal.park`` is None), or later, when the cache drops it."""


class Abandon(_Unwind):
    """The lease is lost or the database failed: stop this run without writing anything more."""


class Resumed:
    """What a take-or-suspend returns once a run parked at its wait continues (``engine.cache``): the
    wait reads its outcome again, now in the history, as a replay would."""

    __slots__ = ()


RESUMED = Resumed()

Park = Callable[["Journal", int], Awaitable[None]]
"""Keep a suspended run alive (``engine.cache``): called with the journal and the last step it holds;
returns when a wake-up here continues it (``Journal.resumed`` was called), raises ``Suspended`` when
the cache drops it."""


class Cancellable(Protocol):
    """A live activity step (``activities.LiveActivity``): what a cancel of its instance reaches."""

    def cancel(self, *, deadline: bool = False) -> None: ...


DEADLINE = "deadline"
"""The name of a ``cancelled`` row delivered because the workflow's deadline passed (else ``cancelled``):
a replay raises ``WorkflowTimeout`` there, as the live run did."""


class ContinuedAsNew(_Unwind):
    """The run ended by ``ctx.continue_as_new``: its history is kept, the next run is committed and
    runnable (``input``, the next run's stored input); unwind the coroutine, keep nothing."""

    def __init__(self, input: str) -> None:
        super().__init__(input)
        self.input = input


_STORAGE_FAILURES = (LeaseLost, StorageError)


class _AbandonOnStorageFailure:
    """``with _abandon_on_failure:`` around every storage call that records: the lease lost to another
    worker or a database error stops the run (``Abandon``, with the cause as its argument), written once.
    A stateless singleton: no allocation, no await."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc is not None and isinstance(exc, _STORAGE_FAILURES):
            raise Abandon(exc) from exc


_abandon_on_failure = _AbandonOnStorageFailure()


class StreamSink(Protocol):
    """Where the writes to durable streams go (``geste._streams.Streams``, as the engine's ``streams``): a
    host without one (the replay check's) writes nothing."""

    async def write(self, instance_id: str, key: str, writer: str, item: str | None) -> None:
        """Append ``item`` (stored JSON; None closes) under the idempotency key ``writer``; return once
        committed."""
        ...


class Host(Protocol):
    """What a run uses of the engine that runs it (``Engine`` is one; the replay check builds its own)."""

    storage: Storage
    metrics: Metrics
    """Counted by the journal and the activity runner: steps recorded, activity attempts."""
    clock: Callable[[], float]
    lock_timeout: float
    max_payload_bytes: int
    on_suspended: Callable[[str, float | None], None]
    """Called with the instance id and when it is due (None: when a message or an event comes) after a
    suspension committed."""
    on_channel_woken: Callable[[], None]
    """Called after a step published a message that made receivers runnable."""
    on_outbox: Callable[[str], None]
    """Called with the event id after a step recorded an outbox event."""
    on_state: Callable[[str, str], None]
    """Called with the instance id and the key after a ``set_state`` step committed a value."""
    retry_wait: Callable[[str, float], Awaitable[None]]
    """How an activity's retry back-off waits, given the instance id and the seconds."""
    workflows: Mapping[str, Workflow[Any, Any]]
    """The workflows it runs, by name: ``continue_as_new`` checks the next run's arguments against its
    workflow's signature, as ``start`` does."""
    version: Callable[[], str | None]
    """The version of the code it runs: the children it starts record it (docs/versioning.md)."""


class Journal:
    """The history of one instance as one run replays and extends it (see the module's docstring).

    ``replay`` and ``live`` are the hooks of the replay check (``engine.replay``): a subclass that stops
    at the first step past the recorded history, before anything of it runs.
    """

    def __init__(
        self,
        host: Host,
        *,
        lease: Lease,
        workflow_name: str,
        history: Sequence[HistoryRow],
        cancel_requested: bool,
        run: int = 1,
        deadline: float | None = None,
        awaited: tuple[str, ChildState] | None = None,
        complete: bool = False,
    ) -> None:
        self.host = host
        self.lease = lease
        self.instance_id = lease.instance_id
        self.workflow_name = workflow_name
        self.run = run
        """The number of the instance's run this journal records (1, then one more per continue)."""
        self._history: dict[int, HistoryRow] = dict(zip(map(_seq_of, history), history, strict=True))
        last_recorded = last_wait = 0
        cancel_delivered = StepKind.CANCELLED in map(_kind_of, history)
        misnumbered: tuple[int, HistoryRow] | None = None
        if set(map(type, self._history)) <= _INT:  # the common case, in C but for the waits' filter
            last_recorded = max(self._history, default=0)
            last_wait = max((row.seq for row in history if row.kind in _WAIT_KINDS), default=0)
        else:  # a step number that is no int (SQLite keeps what an UPDATE puts): each row looked at
            for position, row in enumerate(history, 1):
                seq = row.seq
                if type(seq) is not int:
                    if misnumbered is None:
                        misnumbered = position, row
                    continue
                if seq > last_recorded:
                    last_recorded = seq
                if seq > last_wait and row.kind in _WAIT_KINDS:
                    last_wait = seq
        self.last_recorded = last_recorded
        """The number of the last recorded step: the steps up to it replay."""
        self._last_wait = last_wait
        self._long = last_recorded > LONG_HISTORY_STEPS
        """The history passed ``LONG_HISTORY_STEPS`` (warned about by the commit that took it there)."""
        self.complete = complete
        """The history holds the whole run (the replay check of a finished one): every step is a replay,
        so a patch whose marker it lacks is an old run's (``patched``)."""
        self.patches: dict[str, bool] = {}
        """What ``patched`` (or ``deprecate_patch``: True) said of each patch id in this run, kept: asked
        again, the same answer, and no step."""
        self.seq = 0
        """The number of the step taken last (``next``; the activity step counts inline)."""
        self.pending: list[HistoryRow] = []
        """The rows buffered for the next commit (``buffer``; the activity step appends inline)."""
        self._cancel_requested = cancel_requested
        self._cancel_delivered = cancel_delivered
        self.deadline = deadline
        """When the instance's deadline passes (its clock; None: none): then it is cancelled for it."""
        self._timed_out = deadline is not None and host.clock() >= deadline
        if self._timed_out:
            self._cancel_requested = True
        self._cancel_reached = False
        self.live_activities: set[Cancellable] = set()
        """The activity steps running live now (``ActivityRunner``): a cancel requested reaches them."""
        self.awaited = awaited
        """The id and end of the awaited child, read by the claim (``Claim.awaited``): ``child_ended``
        takes it instead of reading the child."""
        self.children: dict[str, str] = {}
        """The children this run started (``ctx.start_child``, replayed or live): id -> parent-close
        policy; those it awaited to their end are dropped, so the run's end applies the policy to the rest."""
        self._state_lock = asyncio.Lock()
        self.compensations: list[tuple[Activity[Any, Any], tuple[Any, ...], dict[str, Any]]] = []
        """The compensations the workflow registered (``on_failure``), oldest first."""
        self._compensating = False
        self._suspended = False
        self.park: Park | None = None
        """Set by the engine when a cache may keep the run at a wait (else a suspension unwinds)."""
        self.divergence: NonDeterminismError | None = None
        """The divergence (or corruption) that stops the run, even if the workflow swallowed it."""
        self.trace: RunTrace | None = None
        """The tracing of the run under the current claim (set by the engine); None: tracing is off."""
        if misnumbered is not None:  # fail the run like a divergence, not the engine at every claim
            position, row = misnumbered
            self.corrupted(position, f"the row in position {position} has the step number {row.seq!r:.80}")

    @property
    def is_replaying(self) -> bool:
        return self.seq < self.last_recorded

    def resumed(
        self,
        lease: Lease,
        rows: Sequence[HistoryRow],
        cancel_requested: bool,
        awaited: tuple[str, ChildState] | None = None,
    ) -> None:
        """A run parked at a wait continues under a new ``lease`` with the ``rows`` recorded since it
        parked (its wait's outcome, if any: ``engine.cache`` checked them), and the awaited child's end
        if the claim read it."""
        self.lease = lease
        self.awaited = awaited
        for row in rows:
            self._history[row.seq] = row
            self.last_recorded = max(self.last_recorded, row.seq)
            if row.kind in _WAIT_KINDS:
                self._last_wait = max(self._last_wait, row.seq)
            if row.kind == StepKind.CANCELLED:
                self._cancel_delivered = True
        self._cancel_requested = self._cancel_requested or cancel_requested
        self._suspended = False

    def forget_replayed(self) -> None:
        """Drop the rows of the steps taken already: a parked run never reads them again, and a cache
        of long histories would otherwise hold every row."""
        seq = self.seq
        self._history = {s: r for s, r in self._history.items() if s > seq}

    # -- step numbers and the recorded history -------------------------------------------------------
    def next(self) -> int:
        """The number of the step the workflow takes now."""
        self.seq += 1
        return self.seq

    def replay(self, seq: int, kind: StepKind, name: str) -> HistoryRow | None:
        """The recorded row of the step ``seq`` (a ``kind`` step named ``name``), None past the history.

        Raises the run's divergence again if there is one, ``WorkflowCancelled`` at a recorded
        cancellation, and a new divergence if the recorded step is another one. A hook of the replay check.
        """
        if self.divergence is not None:
            raise self.divergence
        row = self._history.get(seq)
        if row is None:
            return None
        if row.kind != kind or row.name != name:  # (the row of the step asked for is of a known kind)
            self.row(seq)  # a kind geste never writes is corruption
            if row.kind == StepKind.CANCELLED:
                raise self.cancelled(row)
            raise self.diverged(
                NonDeterminismError(seq, f"{row.kind} {row.name!r}", f"{kind.value} {name!r}")
            )
        return row

    def patched(self, patch_id: str) -> bool:
        """Whether this run takes the patched branch of ``patch_id`` (``ctx.patched``), decided once per
        run, with no step when asked again. The next step's row is a marker of ``patch_id``: True (the
        marker is that step). It is another step, or the history holds later steps (a hole), or the whole
        run (``complete``): False, an old run, and no step is taken. Past the history: True, and a marker
        is buffered, written with the next commit (no round trip of its own). A hook of the replay check."""
        known = self.patches.get(patch_id)
        if known is not None:
            return known
        if self.divergence is not None:
            raise self.divergence
        seq = self.seq + 1
        row = self.row(seq)
        if row is not None and row.kind == StepKind.PATCH and row.name == patch_id:
            self.seq = seq
            taken = True
        elif row is not None or seq <= self.last_recorded or self.complete:
            taken = False
        else:
            self.running()
            self.live(seq)
            self.seq = seq
            self.buffer(HistoryRow(seq, StepKind.PATCH, patch_id, None, False, self.host.clock()))
            taken = True
        self.patches[patch_id] = taken
        return taken

    def deprecate_patch(self, patch_id: str) -> None:
        """``ctx.deprecate_patch``: the marker of ``patch_id`` is taken (as a replayed step) if it is the
        next step's row, else nothing: no marker is written and none is required."""
        if patch_id in self.patches:
            return
        if self.divergence is not None:
            raise self.divergence
        row = self.row(self.seq + 1)
        if row is not None and row.kind == StepKind.PATCH and row.name == patch_id:
            self.seq += 1
        self.patches[patch_id] = True

    def row(self, seq: int) -> HistoryRow | None:
        """The recorded row at ``seq``, if any; one of a kind geste never writes is corruption."""
        row = self._history.get(seq)
        if row is not None and row.kind not in STEPS:
            raise self.corrupted(seq, f"unknown step kind {row.kind!r:.80}")
        return row

    def read(self, row: HistoryRow, cls: type[S]) -> S:
        """The step a recorded row records (a ``cls``: its kind was checked by ``replay``). A row that is
        not what its step writes (not JSON, not its shape) was not written by geste: it fails the
        instance like a divergence, even if the workflow catches the error, and is left as it is."""
        try:
            step = decode_step(row, instance_id=self.instance_id)
        except HistoryCorruptedError as error:
            self.diverged(error)
            raise
        assert isinstance(step, cls)
        return step

    def live(self, seq: int, *, ordered: bool = True) -> None:
        """Before a step at ``seq`` is taken live: below later recorded steps it fills a hole, a row
        removed by hand. Rows are written in order, except for steps that commit on their own
        (activities, publish, send_event, subscribe), which a gather may commit out of order (a crash
        can then lose the earlier one): those may fill a hole, unless a wait, which is never in a
        gather, was recorded after it. (A step that fails before it is recorded leaves a hole too; a
        replay fails there again, before this check.) A hook of the replay check."""
        if seq < (self.last_recorded if ordered else self._last_wait):
            raise self.corrupted(seq, "no row at this step, but later steps are recorded")

    def diverged(self, error: NonDeterminismError) -> NonDeterminismError:
        """Remember the divergence: user code that swallows it still cannot take another step."""
        self.divergence = error
        return error

    def corrupted(self, seq: int, problem: str) -> HistoryCorruptedError:
        error = HistoryCorruptedError(self.instance_id, seq, problem)
        self.diverged(error)
        return error

    # -- suspension and cancellation ------------------------------------------------------------------
    def running(self) -> None:
        """Nothing runs after a suspension: a step a gather's other branch takes unwinds too."""
        if self._suspended:
            raise Suspended()

    def begin(self, seq: int) -> None:
        """Checks before a new step: nothing runs after a suspension; a pending cancel is delivered."""
        if self._suspended:
            raise Suspended()
        if self._cancel_requested and not self._cancel_delivered and not self._compensating:
            self.deliver_cancel(seq)

    def request_cancel(self, *, deadline: bool = False) -> bool:
        """A cancel (``deadline``: the workflow's deadline passed) reached the run while it runs: it is
        delivered at the next step, and the activity steps running now are cancelled (their tasks get
        ``CancelledError``; compensations are never among them). True the first time (news)."""
        if deadline:
            self._timed_out = True
        self._cancel_requested = True
        # Delivered already (the workflow caught it and cleans up with more steps) or compensating: the
        # flag stays set in the database and every renewal reports it again, and those steps must run.
        if not self._cancel_delivered and not self._compensating:
            for live in list(self.live_activities):
                live.cancel(deadline=self._timed_out)
        news, self._cancel_reached = not self._cancel_reached, True
        return news

    def activity_cancelled(self, *, deadline: bool) -> WorkflowCancelled:
        """An activity step whose recorded outcome is ``ActivityCancelled`` (live or replayed): the cancel
        is delivered there (the workflow gets ``WorkflowCancelled``, or ``WorkflowTimeout``)."""
        self._cancel_requested = True
        self._cancel_delivered = True
        return self.cancelled(deadline=deadline)

    def cancel_if_requested(self, seq: int) -> None:
        """Deliver a cancel requested and not delivered yet at ``seq``."""
        if self._cancel_requested and not self._cancel_delivered and not self._compensating:
            self.deliver_cancel(seq)

    def cancel_pending(self) -> bool:
        """A cancel was requested and is not delivered yet (never while compensating)."""
        return self._cancel_requested and not self._cancel_delivered and not self._compensating

    def deliver_cancel(self, seq: int) -> NoReturn:
        """Record the cancellation at ``seq`` (with the next commit) and raise it in the workflow."""
        self._cancel_delivered = True
        payload = CancelledStep().encode()
        name = DEADLINE if self._timed_out else "cancelled"
        self.pending.append(HistoryRow(seq, StepKind.CANCELLED, name, payload, False, self.host.clock()))
        raise self.cancelled(deadline=self._timed_out)

    def cancelled(self, row: HistoryRow | None = None, *, deadline: bool = False) -> WorkflowCancelled:
        """The error a delivered cancel raises in the workflow (as recorded by ``row``, if given)."""
        if row is not None:
            deadline = row.name == DEADLINE
        if deadline:
            return WorkflowTimeout(f"workflow instance {self.instance_id} ran past its deadline")
        return WorkflowCancelled(f"workflow instance {self.instance_id} was cancelled")

    def cancelled_here(self) -> None:
        """A wait recorded as interrupted by cancellation raises at the wait, as it did live."""
        after = self._history.get(self.seq + 1)
        if after is not None and after.kind == StepKind.CANCELLED:
            self.seq += 1
            raise self.cancelled(after)

    def compensate(self) -> None:
        """From now on the compensations run: a cancel is not delivered, the status says so."""
        self._compensating = True

    # -- recording ---------------------------------------------------------------------------------------
    def buffer(self, row: HistoryRow) -> None:
        """Record ``row`` with the next commit.

        An activity's outcome is buffered too: it commits with the workflow's next write, before the next
        activity starts, or with the suspension, publication or end that follows. That saves a transaction
        per activity, and the last activity commits with the instance's end. No side effect can happen in
        between (workflow code is deterministic), so a crash before that commit only re-runs this
        activity, as a crash during it would: at least once, recorded once."""
        self.pending.append(row)

    async def commit(self, row: HistoryRow) -> None:
        """Record ``row`` (and the rows buffered before it) now."""
        self.pending.append(row)
        await self.flush()

    def _commit(self, records: Sequence[HistoryRow], now: float, *, ends_lease: bool = False) -> Commit:
        """A write of ``records`` at ``now`` under the run's lease, renewed for ``lock_timeout`` from then
        (not where the write ends the lease: a suspension, the end)."""
        return Commit(self.lease, records, now, None if ends_lease else now + self.host.lock_timeout)

    def _counted(self, records: Sequence[HistoryRow]) -> None:
        """After a commit of ``records``: count them, and warn once when the history passed
        ``LONG_HISTORY_STEPS`` (one comparison per commit; the steps are numbered from 1, so the number
        of the step taken last is the history's length)."""
        self.host.metrics.recorded(records)
        if self.seq > LONG_HISTORY_STEPS and not self._long:
            self._long = True
            self._warn_long()

    def _warn_long(self) -> None:
        self.host.metrics.long_histories.values[self.workflow_name] += 1
        logger.warning(
            "instance %s (workflow %s, run %d): its history passed %d steps; every resume replays all of "
            "them: end the run with ctx.continue_as_new(...) to go on with a new, empty history",
            self.instance_id,
            self.workflow_name,
            self.run,
            LONG_HISTORY_STEPS,
        )

    def _recorded(self, records: Sequence[HistoryRow], outcome_cancel_requested: bool) -> None:
        self._counted(records)
        if outcome_cancel_requested:
            self._cancel_requested = True

    async def flush(self) -> None:
        """Commit the buffered rows in one transaction that also renews the lease."""
        records, self.pending = self.pending, []
        host = self.host
        status = Status.COMPENSATING if self._compensating else None
        with _abandon_on_failure:
            outcome = await host.storage.record(self._commit(records, host.clock()), status=status)
        self._counted(records)
        if outcome.cancel_requested:
            self._cancel_requested = True

    async def send_event(self, row: HistoryRow, event: NewOutboxEvent, now: float) -> None:
        """Record the ``send_event`` step ``row`` and its outbox event in one transaction."""
        self.pending.append(row)
        records, self.pending = self.pending, []
        host = self.host
        with _abandon_on_failure:
            outcome = await host.storage.outbox_record(
                self._commit(records, now), event, status=Status.COMPENSATING if self._compensating else None
            )
        self._recorded(records, outcome.cancel_requested)
        host.on_outbox(event.event_id)

    async def set_state(self, row: HistoryRow, key: str, value: str, now: float) -> int:
        """Record the ``set_state`` step ``row`` and the key's next value in one transaction; return its
        version. One at a time per run (``_state_lock``): versions are numbered by the statement, which
        must see the previous one committed (two of a gather would otherwise both read the same last)."""
        async with self._state_lock:
            self.pending.append(row)
            records, self.pending = self.pending, []
            host = self.host
            with _abandon_on_failure:
                outcome = await host.storage.state_set(
                    self._commit(records, now), key=key, value=value, run=self.run, seq=row.seq
                )
        self._recorded(records, outcome.cancel_requested)
        host.on_state(self.instance_id, key)
        return outcome.version

    async def subscribe(self, row: HistoryRow, channel: str, mode: str, now: float) -> None:
        """Record the ``subscribe`` step ``row`` and the subscription in one transaction."""
        self.pending.append(row)
        records, self.pending = self.pending, []
        host = self.host
        with _abandon_on_failure:
            outcome = await host.storage.channel_subscribe(
                self._commit(records, now), channel=channel, mode=mode
            )
        self._recorded(records, outcome.cancel_requested)

    async def publish(self, row: HistoryRow, message: NewMessage, now: float) -> bool:
        """Record the ``publish``/``send_to`` step ``row`` and its message in one transaction; False (and
        nothing written) when the message's target instance does not exist."""
        records = [*self.pending, row]
        host = self.host
        with _abandon_on_failure:
            result = await host.storage.channel_publish(message, commit=self._commit(records, now))
        if result.target_missing:
            return False
        self.pending = []
        self._recorded(records, result.cancel_requested)
        if result.woken:
            host.on_channel_woken()
        return True

    async def start_child(
        self, row: HistoryRow, child: NewInstance, parent_close: str
    ) -> ChildState | DedupHeld | None:
        """Record the ``start_child`` step ``row`` and create ``child`` in one transaction; None when
        done, else (nothing written) the instance that has the child's id already, or the one holding its
        queue's dedup id."""
        records = [*self.pending, row]
        host = self.host
        with _abandon_on_failure:
            outcome = await host.storage.start_child(
                self._commit(records, child.now), child, parent_close=parent_close
            )
        if isinstance(outcome, ChildState | DedupHeld):
            return outcome
        self.pending = []
        self._recorded(records, outcome.cancel_requested)
        return None

    async def child_ended(self, child_id: str) -> ChildState | None:
        """The child's state if it has ended (one read by primary key, nothing written), else None: a
        wait woken by the child's end finds it so, without the suspension's transaction. The claim that
        woke the run may have read it already (``awaited``, schema 21): then nothing is read."""
        awaited, self.awaited = self.awaited, None
        if awaited is not None and awaited[0] == child_id:
            return awaited[1]
        with _abandon_on_failure:
            row = await self.host.storage.get_instance(child_id)
        if row is None or not row.status.is_finished:
            return None
        return ChildState(row.workflow_name, row.status, row.result, row.error, row.parent_id)

    async def take_child_or_suspend(self, child_id: str, out_seq: int) -> ChildState | Resumed:
        """The awaited child's state once it has ended (the caller buffers its ``child`` row), or the
        buffered rows are committed with a suspension until its end wakes the instance (``Suspended``, or
        ``RESUMED`` once a cached run goes on), or a cancel pending is delivered at ``out_seq``."""
        host = self.host
        commit = self._commit(self.pending, host.clock(), ends_lease=True)
        with _abandon_on_failure:
            outcome = await host.storage.take_child_or_suspend(commit, child_id)
        if isinstance(outcome, Suspension):
            await self._waited(outcome, out_seq, None)
            return RESUMED
        return outcome

    async def finish(
        self,
        status: Status,
        *,
        discard: bool,
        result: str | None = None,
        error: str | None = None,
        cancel_children: Sequence[str] = (),
    ) -> None:
        """Store the instance's end with the buffered rows (none if ``discard``: a divergence keeps the
        history as it is, for an operator to decide), and the cancellation of ``cancel_children`` (the
        parent-close policies) in the same transaction."""
        records = [] if discard else self.pending
        host = self.host
        commit = self._commit(records, host.clock(), ends_lease=True)
        with _abandon_on_failure:
            await host.storage.finish(
                commit, status=status, result=result, error=error, cancel_children=cancel_children
            )
        self._counted(records)
        self.pending = []

    # -- waits ---------------------------------------------------------------------------------------------
    def wait_outcome(
        self, seq: int, name: str, taken: StepKind, timed_out: StepKind, waited_for: str
    ) -> HistoryRow | None:
        """The recorded outcome (a ``taken`` or ``timed_out`` row named ``name``) of the wait whose
        outcome is step ``seq``; None past the history, once the wait may go on live (a cancel requested
        meanwhile is delivered there). ``waited_for`` says what the wait expects, for a divergence."""
        out = self.row(seq)
        if out is None:
            self.live(seq)
            if self._cancel_requested and not self._cancel_delivered and not self._compensating:
                self.deliver_cancel(seq)
            return None
        if out.kind == StepKind.CANCELLED:
            raise self.cancelled(out)
        if out.name == name and (out.kind == taken or out.kind == timed_out):
            return out
        raise self.diverged(NonDeterminismError(seq, f"{out.kind} {out.name!r}", f"{waited_for} {name!r}"))

    async def take_event_or_suspend(self, wait: EventWait, now: float) -> StoredEvent | Resumed | None:
        """The event the wait takes (recorded with the buffered rows), None if its deadline passed; or
        the wait is committed and the run unwinds (``Suspended``) or, kept by the cache, continues later
        (``RESUMED``); or a cancel is delivered there."""
        host = self.host
        with _abandon_on_failure:
            outcome = await host.storage.take_event_or_suspend(self._commit(self.pending, now), wait)
        return await self._took(outcome, StepKind.EVENT, wait.outcome_seq, wait.deadline)

    async def take_message_or_suspend(self, wait: MessageWait, now: float) -> StoredMessage | Resumed | None:
        """The message the receive takes (recorded with the buffered rows), None if its deadline passed;
        or the wait is committed and the run unwinds or continues later (as ``take_event_or_suspend``),
        or a cancel is delivered there."""
        host = self.host
        with _abandon_on_failure:
            outcome = await host.storage.channel_take_or_suspend(self._commit(self.pending, now), wait)
        return await self._took(outcome, StepKind.MESSAGE, wait.outcome_seq, wait.deadline)

    async def _took(
        self, outcome: T | Suspension | None, kind: StepKind, out_seq: int, deadline: float | None
    ) -> T | Resumed | None:
        """After a wait's take-or-suspend transaction: what it took (recorded with the buffered rows, a
        ``kind`` row), None if the deadline passed, or ``_waited`` (``RESUMED`` once a cached run goes on)."""
        if outcome is None:
            return None
        if isinstance(outcome, Suspension):
            await self._waited(outcome, out_seq, deadline)
            return RESUMED
        self._counted(self.pending)
        self.host.metrics.steps.values[kind] += 1
        self.pending = []
        return outcome

    async def _waited(self, outcome: Suspension, out_seq: int, deadline: float | None) -> None:
        """After a wait's take-or-suspend transaction found nothing: deliver a pending cancel at the
        wait's outcome position, or suspend the workflow there."""
        if outcome is Suspension.CANCEL_REQUESTED:
            self._cancel_requested = True
            self.deliver_cancel(out_seq)
        await self._suspended_until(deadline, out_seq - 1)

    async def suspend(self, *, run_at: float, timer: tuple[int, float]) -> None:
        """Commit the buffered rows and the timer, release the instance until ``run_at`` and unwind (or,
        kept by the cache, return when a wake-up here continues the run)."""
        host = self.host
        commit = self._commit(self.pending, host.clock(), ends_lease=True)
        with _abandon_on_failure:
            outcome = await host.storage.suspend(commit, run_at=run_at, timer=timer)
        if outcome is Suspension.CANCEL_REQUESTED:
            self._cancel_requested = True
            self.deliver_cancel(self.next())
        await self._suspended_until(run_at, timer[0])

    async def _suspended_until(self, run_at: float | None, known: int) -> None:
        """The suspension committed (every step up to ``known`` is recorded): unwind, or park."""
        self._counted(self.pending)
        self.pending = []
        self._suspended = True
        deadline = self.deadline  # the storage woke it at its deadline too (its run_at): the timer here
        if deadline is not None and (run_at is None or deadline < run_at):
            run_at = deadline
        self.host.on_suspended(self.instance_id, run_at)
        if self.park is None:
            raise Suspended()
        await self.park(self, known)

    # -- continue as new -------------------------------------------------------------------------------
    async def continue_as_new(self, seq: int, input: str, *, recorded: bool) -> NoReturn:
        """End the run at step ``seq`` and start the next with ``input`` (stored JSON text), in one
        transaction with the buffered rows and the ``continue_as_new`` row (unless ``recorded``: a run
        kept by an earlier continue, replayed), then unwind (``ContinuedAsNew``). A cancel pending wins:
        nothing is written and it is delivered here, at ``seq``. The compensations registered are not run
        (a continue is no failure); the next run registers its own."""
        host = self.host
        now = host.clock()
        records = list(self.pending)
        if not recorded:
            body = ContinueAsNewStep(RawJSON(input)).encode()
            records.append(HistoryRow(seq, StepKind.CONTINUE_AS_NEW, self.workflow_name, body, False, now))
        with _abandon_on_failure:
            outcome = await host.storage.continue_as_new(
                self._commit(records, now, ends_lease=True), input=input, last_seq=self.seq
            )
        if outcome is Suspension.CANCEL_REQUESTED:
            self._cancel_requested = True
            self.deliver_cancel(seq)
        host.metrics.recorded(records)  # not _counted: a run ending by a continue needs no warning
        self.pending = []
        self._suspended = True  # nothing runs after it: a step of a gather's other branch unwinds too
        host.on_suspended(self.instance_id, now)  # the next run, runnable now: this worker claims it
        raise ContinuedAsNew(input)
