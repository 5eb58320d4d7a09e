"""Activities: the step that calls one (replayed, or run live with its attempts, timeouts and retries) and
the compensations run when a workflow fails.

An activity runs at least once and its outcome is recorded once: the row is buffered in the journal and
commits with the workflow's next write (``Journal.buffer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import _tracing
from .._models import StepKind
from .._serde import decode, decode_error, encode, encode_error
from .._steps import ActivityStep, CompensationStep, RawJSON, activity_payload
from ..errors import (
    ActivityCancelled,
    ActivityHeartbeatTimeout,
    ActivityTimeout,
    NonDeterminismError,
    SerializationError,
)
from ..storage.base import HistoryRow
from .journal import Host, Journal, StreamSink

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
        # Not the task running now: the attempt itself asked (an activity cancelling its own instance).
        # A task's cancel of itself is thrown at its next await even once the attempt has returned, so
        # it would cut the run short; the attempt goes on and its result is recorded, as a caught cancel's.
        if self.task is not None and self.task is not asyncio.current_task():
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


CURRENT_ACTIVITY: contextvars.ContextVar[ActivityContext | None] = contextvars.ContextVar(
    "geste_current_activity", default=None
)
"""The context of the ``async`` activity attempt running in this task (None outside one): how an
integration that cannot be handed the context (pydantic-ai's event handlers) finds it."""


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
    _beat: _Beat | None = field(default=None, repr=False, compare=False)
    """This attempt's heartbeat state (None: a context built by hand, whose heartbeats go nowhere)."""

    def heartbeat(self, details: Any = None) -> None:
        """Say this attempt is alive (``heartbeat_timeout``) and, unless ``details`` is None, record
        how far it got: the next attempt, here or on another worker after a crash, reads the last details
        given as ``heartbeat_details``. Costs no statement: the worker writes the last details with its
        next lease renewal. Callable from any thread (a ``def`` activity's). ``details`` must be JSON
        (``SerializationError`` otherwise, raised here)."""
        beat = self._beat
        if beat is not None:
            beat.beat(details)

    @property
    def heartbeat_details(self) -> Any:
        """The last details an earlier attempt of this step gave ``heartbeat`` (as JSON decodes them);
        None on a first attempt, or when none gave any."""
        return None if self._beat is None else self._beat.previous

    _live: LiveActivity = field(default=_NOT_LIVE, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        """True once a cancel of the workflow (or its deadline) reached this attempt. An ``async``
        activity also gets ``asyncio.CancelledError`` at its current ``await``; code that shields itself
        from it (or runs in a thread) checks this flag to stop early. Safe to read from any thread."""
        return self._live.cancelled

    _streams: StreamSink | None = field(default=None, repr=False, compare=False)
    """Where ``write_stream`` writes (None: a context built by hand, whose writes go nowhere)."""
    _stream_writes: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    async def write_stream(self, key: str, item: Any) -> None:
        """Append ``item`` (JSON) to the instance's durable stream ``key``; return once it committed
        (``ctx.write_stream`` of the workflow, docs/streams.md). The n-th write of this step is written
        once whatever the attempt: a retried attempt's first writes, those an earlier attempt made, write
        nothing, so readers never get a position twice (an activity whose items differ between attempts
        writes to a key of its own per attempt, ``f"{key}-{ctx.attempt}"``). ``async`` activities only."""
        from .._validation import check_stream_key

        key = check_stream_key(key)
        n = self._stream_writes.get(key, 0)
        self._stream_writes[key] = n + 1
        stored = encode(item, what=f"an item of stream {key!r:.80}")
        if self._streams is not None:
            await self._streams.write(self.instance_id, key, f"{self.run}.{self.seq}:{n}", stored)

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


class HeartbeatBuffer:
    """The last heartbeat details of the activities running in this worker, by instance and step, until
    the worker's next lease renewal writes those of the instances given new ones since (``take``). Thread
    safe: a ``def`` activity heartbeats from its thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._details: dict[str, dict[str, str]] = {}
        self._dirty: set[str] = set()

    def put(self, beat: _Beat, encoded: str) -> None:
        """``beat``'s details, unless its attempt is over: checked under the lock, so that a ``def``
        activity's thread that heartbeats as its attempt ends never puts back the entry ``drop`` took."""
        with self._lock:
            if not beat.live:
                return
            self._details.setdefault(beat.instance_id, {})[beat.key] = encoded
            self._dirty.add(beat.instance_id)

    def seed(self, instance_id: str, key: str, encoded: str) -> None:
        """Details read from the database: kept for the next attempts, not written back."""
        with self._lock:
            self._details.setdefault(instance_id, {}).setdefault(key, encoded)

    def get(self, instance_id: str, key: str) -> str | None:
        with self._lock:
            return self._details.get(instance_id, {}).get(key)

    def drop(self, instance_id: str, key: str) -> None:
        """The step ended (or its run left this worker): forget its details here (the database keeps
        them until the instance's next write of details)."""
        with self._lock:
            steps = self._details.get(instance_id)
            if steps is not None:
                steps.pop(key, None)
                if not steps:
                    del self._details[instance_id]
                    self._dirty.discard(instance_id)

    def take(self) -> dict[str, str]:
        """The details to write, by instance (a JSON object of its steps' details), of the instances given
        new details since the last ``take``."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            return {
                instance_id: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in steps.items()) + "}"
                for instance_id in dirty
                if (steps := self._details.get(instance_id))
            }

    def restore(self, instance_ids: Collection[str]) -> None:
        """A renewal that carried these failed: write them with the next one."""
        with self._lock:
            self._dirty.update(i for i in instance_ids if i in self._details)


class _Beat:
    """One attempt's heartbeat: when it last beat (``time.monotonic``), what the attempts before gave."""

    __slots__ = ("at", "buffer", "instance_id", "key", "limit", "live", "previous", "what")

    def __init__(
        self, buffer: HeartbeatBuffer, instance_id: str, key: str, previous: Any, limit: int, what: str
    ) -> None:
        self.at = time.monotonic()
        self.buffer = buffer
        self.instance_id = instance_id
        self.key = key
        self.previous = previous
        self.limit = limit
        self.what = what
        self.live = True

    def beat(self, details: Any) -> None:
        encoded = None if details is None else encode(details, what=self.what, limit=self.limit)
        if not self.live:  # a thread left to finish after its attempt failed: nobody listens any more
            return
        self.at = time.monotonic()
        if encoded is not None:
            self.buffer.put(self, encoded)


class _Watchdog:
    """Expires an attempt's timeout scope once ``limit`` seconds pass without a heartbeat: a timer on the
    event loop checked at the deadline, not at each heartbeat (which may come from a thread)."""

    def __init__(self, scope: asyncio.Timeout, beat: _Beat, limit: float) -> None:
        self.scope = scope
        self.beat = beat
        self.limit = limit
        self.fired = False
        self.loop = asyncio.get_running_loop()
        self.handle = self.loop.call_later(limit, self.check)

    def check(self) -> None:
        idle = time.monotonic() - self.beat.at
        if idle < self.limit:
            self.handle = self.loop.call_later(self.limit - idle, self.check)
            return
        self.fired = True
        with contextlib.suppress(RuntimeError):  # RuntimeError: the scope was left meanwhile
            self.scope.reschedule(self.loop.time())  # expires at once: the attempt's task is cancelled

    def cancel(self) -> None:
        self.handle.cancel()


DEFAULT_ACTIVITY_THREADS = 32
"""The threads that run ``def`` activities at most at once, unless ``App(activity_threads=...)``."""


class ThreadPool:
    """At most ``size`` daemon threads, started as work needs them, that run ``def`` activities.

    Not a ``concurrent.futures.ThreadPoolExecutor``: its threads are joined when the interpreter exits, so
    one ``def`` activity stuck in a call that never returns (its attempt long failed by its timeout) would
    keep a stopped worker's process alive for ever. Daemon threads do not hold the exit: the activity is
    cut short as a crash would cut it (at least once: its step was not recorded, it runs again).
    """

    def __init__(self, size: int, name: str = "geste-activity") -> None:
        self.size = size
        self.name = name
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool of def activities is closed")
            self._work.put((future, fn))
            if self._idle:
                self._idle -= 1  # an idle thread takes it
            elif len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._serve, name=f"{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn = item
            if future.set_running_or_notify_cancel():  # False: cancelled while it waited for a thread
                try:
                    result = fn()
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                del future, fn, item
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        """Cancel what waits for a thread; let each thread end once its activity returns."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
            for _ in self._threads:
                self._work.put(None)


def _call_sync(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):  # a callable object whose __call__ is async, say: not a def activity
        close = getattr(result, "close", None)
        if close is not None:
            close()
        raise TypeError(f"the def activity {fn!r} returned an awaitable: declare it with `async def`")
    return result


class ActivityRunner:
    """Runs the activity steps of the runs of one engine (``host``): ``async def`` activities on the
    event loop, ``def`` ones in a pool of ``threads`` threads."""

    def __init__(self, host: Host, *, threads: int = DEFAULT_ACTIVITY_THREADS) -> None:
        self.host = host
        self.threads = threads
        self.heartbeats = HeartbeatBuffer()
        """The heartbeat details the worker's next renewal writes."""
        self._pool: ThreadPool | None = None

    def _executor(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(self.threads)
        return self._pool

    def close(self) -> None:
        """Let the pool's threads go once their activities return (a thread cannot be stopped); a
        later ``def`` activity starts a new pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _in_thread(self, activity: Activity[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = functools.partial(contextvars.copy_context().run, _call_sync, activity.fn, args, kwargs)
        return asyncio.wrap_future(self._executor().submit(call))

    async def _stored_details(self, instance_id: str, key: str) -> str | None:
        """The details of this step that an earlier worker's renewals stored before it died (the first
        attempt here of an activity with a ``heartbeat_timeout``): one read by primary key."""
        stored = await self.host.storage.heartbeat_details(instance_id)
        steps = None if stored is None else json.loads(stored)
        found = steps.get(key) if isinstance(steps, dict) else None
        if found is None:
            return None
        encoded = json.dumps(found, separators=(",", ":"))
        self.heartbeats.seed(instance_id, key, encoded)
        return encoded

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
        key = f"{journal.run}.{seq}"
        live = LiveActivity(asyncio.current_task())
        try:
            if kind is StepKind.COMPENSATION:
                return await self._attempts(
                    journal, activity, seq, kind, args, kwargs, encoded_args, key, live
                )
            running = journal.live_activities
            running.add(live)
            try:
                return await self._attempts(
                    journal, activity, seq, kind, args, kwargs, encoded_args, key, live
                )
            finally:
                running.discard(live)
        finally:
            self.heartbeats.drop(journal.instance_id, key)

    async def _attempts(
        self,
        journal: Journal,
        activity: Activity[Any, Any],
        seq: int,
        kind: StepKind,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        encoded_args: str,
        key: str,
        live: LiveActivity,
    ) -> HistoryRow:
        host = self.host
        policy = activity.retry
        timeout = policy.timeout_seconds
        beat_limit = activity.heartbeat_timeout
        started = host.clock()
        metrics = host.metrics
        attempt = 0
        while True:
            attempt += 1
            metrics.activity_attempts.values[activity.name] += 1
            previous = self.heartbeats.get(journal.instance_id, key)  # what the attempts before gave
            if previous is None and attempt == 1 and beat_limit is not None:
                try:
                    previous = await self._stored_details(journal.instance_id, key)
                except asyncio.CancelledError:  # a cancel that came during the read: as during the attempt
                    if not _ours(live):
                        raise
                    return self._cancelled(journal, activity, seq, kind, attempt, started, encoded_args, live)
            beat = _Beat(
                self.heartbeats,
                journal.instance_id,
                key,
                None if previous is None else decode(previous),
                host.max_payload_bytes,
                f"heartbeat details of activity {activity.name}",
            )
            actx = ActivityContext(
                instance_id=journal.instance_id,
                workflow_name=journal.workflow_name,
                activity_name=activity.name,
                seq=seq,
                attempt=attempt,
                max_attempts=policy.max_attempts,
                is_compensation=kind == StepKind.COMPENSATION,
                run=journal.run,
                _beat=beat,
                _live=live,
                _streams=getattr(host, "streams", None),
            )
            error: BaseException | None = None
            current = CURRENT_ACTIVITY.set(actx)  # reset in the finally below
            span: _tracing.Span | None = None
            token: object = None
            failure: BaseException | None = None
            if journal.trace is not None:  # the attempt's span, current while it runs (its code's spans nest)
                span = journal.trace.attempt(
                    activity.name, seq, attempt, compensation=kind is StepKind.COMPENSATION
                )
                token = _tracing.attach(span)
            try:
                if activity.is_async:
                    call = activity.fn(actx, *args, **kwargs)
                else:
                    call = self._in_thread(activity, (actx, *args), kwargs)
                if timeout is None and beat_limit is None:
                    result = await call
                else:
                    scope = asyncio.timeout(timeout)  # None: the heartbeat's watchdog alone expires it
                    watchdog = None
                    try:
                        async with scope:
                            if beat_limit is not None:
                                watchdog = _Watchdog(scope, beat, beat_limit)
                            result = await call
                    except TimeoutError as exc:
                        if not scope.expired():
                            raise
                        if watchdog is not None and watchdog.fired:
                            raise ActivityHeartbeatTimeout(
                                f"attempt {attempt} of activity {activity.name} gave no heartbeat "
                                f"for {beat_limit}s"
                            ) from exc
                        raise ActivityTimeout(
                            f"attempt {attempt} of activity {activity.name} ran past {timeout}s"
                        ) from exc
                    finally:
                        if watchdog is not None:
                            watchdog.cancel()
            except asyncio.CancelledError as exc:
                failure = exc
                if not _ours(live):  # the run itself is cancelled (the worker stops, the lease is lost)
                    raise
                return self._cancelled(journal, activity, seq, kind, attempt, started, encoded_args, live)
            except Exception as exc:
                failure = exc
                if live.cancelled:  # the attempt turned the cancel into an error of its own
                    _swallowed(live)
                    return self._cancelled(journal, activity, seq, kind, attempt, started, encoded_args, live)
                error = exc
            else:
                if live.cancelled:  # it caught the CancelledError and returned: its result is recorded
                    _swallowed(live)
            finally:
                beat.live = False
                CURRENT_ACTIVITY.reset(current)
                if span is not None:
                    _tracing.detach(token)
                    _tracing.end(span, failure)
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
