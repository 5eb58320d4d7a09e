"""Activities: the step that calls one (replayed, or run live with its attempts, timeouts and retries) and
the compensations run when a workflow fails.

An activity runs at least once and its outcome is recorded once: the row is buffered in the journal and
commits with the workflow's next write (``Journal.buffer``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._models import StepKind
from .._serde import decode, decode_error, encode, encode_error
from .._steps import ActivityStep, CompensationStep, RawJSON, activity_payload
from ..errors import ActivityCancelled, ActivityTimeout, NonDeterminismError, SerializationError
from ..storage.base import HistoryRow
from .journal import Host, Journal

REPLAY_SLICE_MASK = 255
"""A replayed activity step whose number is a multiple of 256 yields to the event loop: replaying a long
history is otherwise one piece of work on the loop, which holds up every other instance of the process
(its heartbeats, its group commits) for as long as it takes."""

if TYPE_CHECKING:
    from .._definitions import Activity

logger = logging.getLogger("geste.workflow")

CANCELLED_TYPE = f"{ActivityCancelled.__module__}.{ActivityCancelled.__qualname__}"
"""The recorded type of an activity outcome a cancel cut short (``_serde.encode_error``)."""


class LiveActivity:
    """One activity step running live (its attempts and the waits between them): what a cancel of its
    instance reaches (``Journal.request_cancel``). ``cancelled`` is a plain attribute, written once from
    the event loop: reading it from any thread (a ``def`` activity's) is safe."""

    __slots__ = ("cancelled", "deadline", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.cancelled = False
        """A cancel reached this step: its running attempt's task was cancelled, no other attempt runs."""
        self.deadline = False
        """The cancel was the workflow's deadline passing."""

    def cancel(self, *, deadline: bool = False) -> None:
        """Cancel the attempt running now (or the retry wait): the step records ``ActivityCancelled``."""
        if self.cancelled:
            return
        self.cancelled = True
        self.deadline = deadline
        if self.task is not None:
            self.task.cancel()


def _ours(live: LiveActivity) -> bool:
    """Whether the ``CancelledError`` caught in a live step is the one ``live.cancel`` asked for, and no
    other cancel of the task (the run's own: the worker stops) is pending: then it is taken back."""
    task = live.task
    return live.cancelled and task is not None and task.uncancel() == 0


def _swallowed(live: LiveActivity) -> None:
    """The attempt caught the ``CancelledError`` that ``live.cancel`` threw into it and did not re-raise
    it: the task's count of pending cancels is taken back, or a later ``asyncio.timeout`` of the run would
    take its own expiry for an outside cancel."""
    if live.task is not None and live.task.cancelling():
        live.task.uncancel()


_NOT_LIVE = LiveActivity(None)
"""The state of a context built outside a live step (tests, tools): never cancelled."""


@dataclass(frozen=True, slots=True)
class ActivityContext:
    """What an activity knows about the call it serves.

    ``idempotency_key`` is the same for every attempt and every replay of this step of this instance:
    hand it to external systems so a retried call is not applied twice.
    """

    instance_id: str
    workflow_name: str
    activity_name: str
    seq: int
    attempt: int
    max_attempts: int
    is_compensation: bool = False
    run: int = 1
    """The instance's run that calls it (1, then one more after each ``continue_as_new``)."""
    _live: LiveActivity = field(default=_NOT_LIVE, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        """True once a cancel of the workflow (or its deadline) reached this attempt. An ``async``
        activity also gets ``asyncio.CancelledError`` at its current ``await``; code that shields itself
        from it (or runs in a thread) checks this flag to stop early. Safe to read from any thread."""
        return self._live.cancelled

    @property
    def idempotency_key(self) -> str:
        """``<instance id>:<seq>``, or ``<instance id>:<run>.<seq>`` from the second run on (whose steps are
        numbered from 1 again): never the key of another step of the instance."""
        return step_key(self.instance_id, self.run, self.seq)


def step_key(instance_id: str, run: int, seq: int) -> str:
    """A key of one step of one instance: ``<instance id>:<seq>`` in its first run, ``<instance
    id>:<run>.<seq>`` in a later one. Unique: a first run's ends with ``:`` and digits, a later one's with
    ``:`` and ``<digits>.<digits>``, so no instance id can make two keys alike."""
    return f"{instance_id}:{seq}" if run == 1 else f"{instance_id}:{run}.{seq}"


class ActivityRunner:
    """Runs the activity steps of the runs of one engine (``host``)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    async def step(
        self,
        journal: Journal,
        activity: Activity[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: StepKind = StepKind.ACTIVITY,
    ) -> Any:
        """The activity step: its recorded outcome, or its outcome now (buffered); raises its error."""
        journal.seq = seq = journal.seq + 1  # journal.next(), inline on the hot path
        row = journal.replay(seq, kind, activity.name)
        if row is None:
            journal.begin(seq)
            activity.signature.bind(args, kwargs, what=f"activity {activity.name}")
            encoded_args = encode(
                {"args": args, "kwargs": kwargs},
                what=f"arguments of activity {activity.name}",
                limit=self.host.max_payload_bytes,
            )
            # the activity gets its arguments as recorded (JSON, typed by its hints), never the
            # workflow's own objects: what it mutates cannot leak into the workflow
            loaded_args, loaded_kwargs = activity.signature.load_args(decode(encoded_args))
            journal.live(seq, ordered=False)
            if journal.pending:  # what the workflow saw (now, uuid4, random, a timeout) may be in
                await journal.flush()  # the arguments: a rerun of the activity after a crash must see it too
                journal.cancel_if_requested(seq)  # the flush is where a cancel requested meanwhile shows
            row = await self._execute(
                journal, activity, seq, kind, tuple(loaded_args), loaded_kwargs, encoded_args
            )
            journal.pending.append(row)  # journal.buffer(row), inline: see there why it can wait
        elif not seq & REPLAY_SLICE_MASK:  # a long replay gives the event loop a turn now and then
            await asyncio.sleep(0)
        step = journal.read(row, ActivityStep)  # a CompensationStep is one
        if step.error is not None:
            if step.error.get("type") == CANCELLED_TYPE and kind is StepKind.ACTIVITY:
                raise journal.activity_cancelled(deadline=bool(step.error.get("deadline")))
            raise decode_error(step.error)
        return activity.signature.load_result(step.result)

    async def _execute(
        self,
        journal: Journal,
        activity: Activity[Any, Any],
        seq: int,
        kind: StepKind,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        encoded_args: str,
    ) -> HistoryRow:
        """Run the activity's attempts to its outcome: the row that records it. While they run, a cancel
        of the instance reaches them (``LiveActivity``); a compensation is never cancelled."""
        live = LiveActivity(asyncio.current_task())
        if kind is StepKind.COMPENSATION:
            return await self._attempts(journal, activity, seq, kind, args, kwargs, encoded_args, live)
        running = journal.live_activities
        running.add(live)
        try:
            return await self._attempts(journal, activity, seq, kind, args, kwargs, encoded_args, live)
        finally:
            running.discard(live)

    async def _attempts(
        self,
        journal: Journal,
        activity: Activity[Any, Any],
        seq: int,
        kind: StepKind,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        encoded_args: str,
        live: LiveActivity,
    ) -> HistoryRow:
        host = self.host
        policy = activity.retry
        timeout = policy.timeout_seconds
        started = host.clock()
        metrics = host.metrics
        attempt = 0
        while True:
            attempt += 1
            metrics.activity_attempts.values[activity.name] += 1
            actx = ActivityContext(
                instance_id=journal.instance_id,
                workflow_name=journal.workflow_name,
                activity_name=activity.name,
                seq=seq,
                attempt=attempt,
                max_attempts=policy.max_attempts,
                is_compensation=kind == StepKind.COMPENSATION,
                run=journal.run,
                _live=live,
            )
            error: BaseException | None = None
            try:
                if timeout is None:
                    result = await activity.fn(actx, *args, **kwargs)
                else:
                    scope = asyncio.timeout(timeout)
                    try:
                        async with scope:
                            result = await activity.fn(actx, *args, **kwargs)
                    except TimeoutError as exc:
                        if not scope.expired():
                            raise
                        raise ActivityTimeout(
                            f"attempt {attempt} of activity {activity.name} ran past {timeout}s"
                        ) from exc
            except asyncio.CancelledError:
                if not _ours(live):  # the run itself is cancelled (the worker stops, the lease is lost)
                    raise
                return self._cancelled(journal, activity, seq, kind, attempt, started, encoded_args, live)
            except Exception as exc:
                if live.cancelled:  # the attempt turned the cancel into an error of its own
                    _swallowed(live)
                    return self._cancelled(journal, activity, seq, kind, attempt, started, encoded_args, live)
                error = exc
            else:
                if live.cancelled:  # it caught the CancelledError and returned: its result is recorded
                    _swallowed(live)
            if error is None:
                try:
                    body = activity_payload(  # ActivityStep(...).encode(), the step not built (hot path)
                        result,
                        None,
                        attempt,
                        started,
                        host.clock() - started,
                        encoded_args,
                        what=f"result of activity {activity.name}",
                        limit=host.max_payload_bytes,
                    )
                except SerializationError as exc:  # deterministic: retrying would fail the same way
                    error, attempt_final = exc, True
                else:
                    return HistoryRow(seq, kind, activity.name, body, False, started)
            else:
                attempt_final = attempt >= policy.max_attempts or not policy.is_retryable(error)
            metrics.activity_attempt_failures.values[activity.name] += 1
            if attempt_final:
                metrics.activity_failures.values[activity.name] += 1
                step = CompensationStep if kind is StepKind.COMPENSATION else ActivityStep
                outcome = step(
                    None, encode_error(error), attempt, started, host.clock() - started, RawJSON(encoded_args)
                )
                body = outcome.encode(what="error", limit=None)
                return HistoryRow(seq, kind, activity.name, body, True, started)
            delay = policy.delay(attempt)
            metrics.activity_retries.values[activity.name] += 1
            logger.warning(
                "activity %s of %s attempt %d/%d failed (%s: %s); retrying in %.3gs",
                activity.name,
                journal.instance_id,
                attempt,
                policy.max_attempts,
                type(error).__name__,
                error,
                delay,
            )
            try:
                await host.retry_wait(journal.instance_id, delay)
            except asyncio.CancelledError:  # a cancel ends the wait at once: no further attempt
                if not _ours(live):
                    raise
                return self._cancelled(journal, activity, seq, kind, attempt, started, encoded_args, live)
            if live.cancelled:
                return self._cancelled(journal, activity, seq, kind, attempt, started, encoded_args, live)

    def _cancelled(
        self,
        journal: Journal,
        activity: Activity[Any, Any],
        seq: int,
        kind: StepKind,
        attempt: int,
        started: float,
        encoded_args: str,
        live: LiveActivity,
    ) -> HistoryRow:
        """The row of a step a cancel cut short: an ``ActivityCancelled`` error (``deadline``: the
        workflow's deadline was the cause), which the step turns into the workflow's cancellation."""
        host = self.host
        host.metrics.activity_attempt_failures.values[activity.name] += 1
        cause = "the workflow's deadline passed" if live.deadline else "the workflow was cancelled"
        error = encode_error(
            ActivityCancelled(f"attempt {attempt} of activity {activity.name} was cancelled: {cause}")
        )
        error["traceback"] = ""
        if live.deadline:
            error["deadline"] = True
        logger.info(
            "activity %s of %s: attempt %d cancelled (%s)", activity.name, journal.instance_id, attempt, cause
        )
        step = CompensationStep if kind is StepKind.COMPENSATION else ActivityStep
        outcome = step(None, error, attempt, started, host.clock() - started, RawJSON(encoded_args))
        body = outcome.encode(what="error", limit=None)
        return HistoryRow(seq, kind, activity.name, body, True, started)

    async def compensate(self, journal: Journal) -> list[dict[str, Any]]:
        """Run the registered compensations newest first; collect (not raise) their final errors."""
        journal.compensate()
        await journal.flush()  # the status says "compensating" from the first compensation on
        errors = []
        for activity, args, kwargs in reversed(journal.compensations):
            try:
                await self.step(journal, activity, args, kwargs, StepKind.COMPENSATION)
            except Exception as exc:
                if isinstance(exc, NonDeterminismError):
                    raise
                errors.append({"activity": activity.name, **encode_error(exc)})
        return errors
