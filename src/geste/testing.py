"""Helpers for testing workflows: an environment whose clock the test moves, and the replay check.

``WorkflowEnvironment`` runs your App in this process on a temporary SQLite file, with a frozen clock that
moves only when the test says so::

    async with geste.testing.WorkflowEnvironment(app) as env:
        handle = await env.start(order, "o-1")     # returns once the instance waits, finishes or fails
        await env.advance(timedelta(days=3))       # fires every timer due in those 3 days, in order
        assert await handle.result() == ...

``check_replay`` replays recorded histories (from a database, read-only, or from files written by
``export_history``) against the workflows' current code and reports every step that no longer matches,
before a deploy makes running instances fail with ``NonDeterminismError``.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from ._app import App, _Parts
from ._definitions import Activity, Workflow
from ._handle import WorkflowHandle
from ._metrics import Metrics
from ._models import InstanceInfo
from ._retry import seconds
from .engine import replay as _replay
from .engine.histories import export_history
from .engine.replay import ReplayReport, ReplayResult, ReplayStatus
from .errors import ConfigurationError, IdleTimeout, ResultTimeout
from .runtime import OpenClose
from .runtime.relay import OutboxConfig
from .runtime.worker import Worker
from .storage import create_storage

__all__ = [
    "ReplayReport",
    "ReplayResult",
    "ReplayStatus",
    "WorkflowEnvironment",
    "check_replay",
    "export_history",
]

P = ParamSpec("P")
R = TypeVar("R")

LEASE = 100 * 365 * 24 * 3600.0
"""The environment's ``lock_timeout``: a lease outlives any jump of the clock (no other worker could take
an instance over, and this one must not take its own back)."""
_POLL = 0.002
"""Seconds between two looks at the instances while some still run (or a task finishes first)."""


class WorkflowEnvironment(OpenClose):
    """Your App, in this process, on a temporary SQLite database and a clock that only the test moves.

    Entering it swaps what ``app`` runs on (its workflows and activities stay registered) for parts the
    environment assembles: a fresh database in a temporary folder, the environment's clock and a runtime
    of their own (its worker claims nothing ahead of the clock and stops without a grace), and starts its
    worker; so ``order.start(...)``, ``app.send_event(...)`` and the rest of the App's API, called by the
    test or by the code under test, act on the test database. Leaving it closes that App, deletes the
    folder and swaps the App's own parts back (the same objects: its database, clock and metrics). The
    App must be closed.

    Time stands still at ``start_at`` (default: now) until ``advance`` moves it: a workflow's ``ctx.now()``,
    its timers, the deadlines of its waits and the back-off between the attempts of an activity all read
    this clock. ``activities`` replaces the code of some activities while the environment is open: give
    ``{activity or its name: async def fake(ctx, ...)}`` (or a plain ``def``, run in the thread pool as a
    ``def`` activity is).

    The methods that act (``start``, ``send_event``, ``advance``...) return once every instance that could
    run has run until it waits again (for an event, a message, a timer, or an activity's retry), finishes
    or fails; ``idle_timeout`` (real seconds) bounds that wait (``geste.errors.IdleTimeout``).
    The environment runs no outbox relay: events of ``ctx.send_event`` stay pending in ``app.outbox()``.
    """

    def __init__(
        self,
        app: App,
        *,
        start_at: datetime | None = None,
        activities: Mapping[Activity[Any, Any] | str, Callable[..., Awaitable[Any]]] | None = None,
        idle_timeout: float | timedelta = 30.0,
    ) -> None:
        if not isinstance(app, App):
            raise ConfigurationError(f"WorkflowEnvironment takes a geste.App, not {app!r:.80}")
        if start_at is not None and not isinstance(start_at, datetime):
            raise ConfigurationError(f"start_at must be a datetime, not {start_at!r:.80}")
        self.app = app
        moment = start_at if start_at is None or start_at.tzinfo else start_at.replace(tzinfo=UTC)
        self._now = time.time() if moment is None else moment.timestamp()
        self._fakes = dict(activities or {})
        self.idle_timeout = seconds(idle_timeout, what="idle_timeout", allow_zero=False)
        self._saved: _Parts | None = None
        """The App's own parts while it runs on the environment's."""
        self._swapped: list[tuple[Activity[Any, Any], Callable[..., Any]]] = []
        self._folder: str | None = None
        self._retries: list[tuple[float, int, str, asyncio.Future[None]]] = []
        """Activities waiting out a retry back-off: (due, order, instance id, future), a heap."""
        self._order = 0
        self._parked: set[str] = set()
        """Instances whose run waits for a retry back-off: they wait, like a suspended instance."""
        self._entered = False

    # -- life cycle --------------------------------------------------------------------------------
    async def open(self) -> None:
        """Swap the App onto parts of its own (a temporary database, this clock, a runtime for them) and
        start its worker."""
        if self._entered:
            raise ConfigurationError("a WorkflowEnvironment can be opened once")
        app = self.app
        if app.is_open:
            raise ConfigurationError(
                "the App is open: close it before testing it in a WorkflowEnvironment (which opens it "
                "on a database of its own)"
            )
        self._entered = True
        fakes = self._check_fakes()
        self._folder = tempfile.mkdtemp(prefix="geste-testing-")
        try:
            self._saved = app._swap(self._assemble(f"sqlite:///{Path(self._folder) / 'geste.db'}"))
            for activity, fake in fakes:
                self._swapped.append((activity, activity.fn))
                activity.fn = fake
            await app.open()
            schedules = app.runtime.schedules
            if schedules is not None:  # this environment runs its rounds, at each moment it stops at: the
                await schedules.stop()  # loop's own, in real time, would race them (a tick released late)
        except BaseException:
            await self._restore()
            raise

    def _assemble(self, url: str) -> _Parts:
        """The App's registry on a database of its own, this clock, and a runtime built for them: the
        App's options for what runs, a lease outliving any jump of the clock, no grace, no claim ahead of
        the clock, no listener, no outbox relay, no cache of suspended runs (each wake-up replays the
        whole history, so a test meets a non-deterministic workflow at its first wake-up); the
        activities' retry back-off waits for ``advance``."""
        return self.app._assemble(
            url,
            create_storage(url),
            clock=self._time,
            metrics=Metrics(),
            retry_wait=self._retry_wait,
            workflow_cache_size=0,
            worker_id="geste-testing",
            run_worker=True,
            lock_timeout=LEASE,
            shutdown_grace=0.0,
            notify=replace(self.app.notify, enabled=False, listen_url=None),
            outbox=OutboxConfig(),
            lookahead=0.0,  # no claim ahead of a moment only advance() brings
        )

    async def close(self) -> None:
        """Close the App, delete the temporary database, and give the App back its own parts."""
        await self._restore()

    def _check_fakes(self) -> list[tuple[Activity[Any, Any], Callable[..., Any]]]:
        found = []
        for key, fake in self._fakes.items():
            activity = key if isinstance(key, Activity) else self.app.registry.activities.get(key)
            if activity is None:
                raise ConfigurationError(f"no activity named {key!r:.80} is registered to replace")
            if not callable(fake):
                raise ConfigurationError(
                    f"the replacement of activity {activity.name!r} must be a function (async def or def)"
                )
            found.append((activity, fake))
        return found

    async def _restore(self) -> None:
        app = self.app
        try:
            if app.is_open:
                await app.close()
        finally:
            for future in (entry[3] for entry in self._retries):
                future.cancel()
            self._retries.clear()
            self._parked.clear()
            for activity, fn in reversed(self._swapped):
                activity.fn = fn
            self._swapped.clear()
            if self._saved is not None:
                app._swap(self._saved)
                self._saved = None
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None

    # -- the clock ---------------------------------------------------------------------------------
    def _time(self) -> float:
        return self._now

    @property
    def now(self) -> datetime:
        """The environment's current time (an aware UTC datetime): what ``ctx.now()`` would return."""
        return datetime.fromtimestamp(self._now, UTC)

    @property
    def database_url(self) -> str:
        """The temporary database (to look at it during a test; it is deleted on close)."""
        self._require_open()
        return self.app.url

    async def advance(self, duration: float | timedelta) -> None:
        """Move the clock forward by ``duration`` (seconds or a timedelta), firing on the way every timer
        (and every tick of a cron schedule) it makes due, in order: the clock stops at each due moment,
        the instances due then run until they wait, finish or fail, then it goes on. Returns with the
        clock at the end and nothing left to run. Nothing sleeps in real time."""
        await self._advance_to(self._now + seconds(duration, what="duration"))

    async def advance_to(self, moment: datetime) -> None:
        """Like ``advance``, up to ``moment`` (an aware datetime; a naive one is taken as UTC)."""
        if not isinstance(moment, datetime):
            raise ConfigurationError(f"advance_to takes a datetime, not {moment!r:.80}")
        target = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
        if target < self._now:
            raise ConfigurationError(f"cannot go back in time: {moment.isoformat()} is before {self.now}")
        await self._advance_to(target)

    async def _advance_to(self, target: float) -> None:
        self._require_open()
        await self.wait_until_idle()
        last = None
        while True:
            due = await self._next_due()
            if due is None or due > target or due == last:  # the same moment again: nothing would change
                break
            last = due
            self._now = max(self._now, due)
            self._fire_retries()
            await self._fire_schedules()
            self._worker().poke()
            await self._settle()
        self._now = max(self._now, target)
        await self._fire_schedules()  # a tick at the target itself
        await self._settle()

    async def _settle(self) -> None:
        """Until idle, and no schedule tick waiting for a run that ended is left unstarted
        (``overlap="queue"``: an end releases the next tick, at the same moment)."""
        await self.wait_until_idle()
        while await self._fire_schedules():
            self._worker().poke()
            await self.wait_until_idle()

    async def _fire_schedules(self) -> int:
        """Start the cron schedules' ticks due at the clock's time, and release the waiting ticks whose
        previous run ended (their loop would, within a pause). Returns the instances started."""
        schedules = self.app.runtime.schedules
        return 0 if schedules is None else await schedules.catch_up()

    async def next_wakeup(self) -> datetime | None:
        """When the next timer fires (a sleep, a wait's deadline, a retry, a schedule's tick), or None when
        none is set."""
        self._require_open()
        due = await self._next_due()
        return None if due is None else datetime.fromtimestamp(due, UTC)

    async def _next_due(self) -> float | None:
        while self._retries and self._retries[0][3].done():
            heapq.heappop(self._retries)
        candidates = [self._retries[0][0]] if self._retries else []
        stored = await self.app.storage.next_run_at()
        if stored is not None:
            candidates.append(stored)
        tick = await self.app.storage.schedule_next_tick()
        if tick is not None:
            candidates.append(tick)
        worker = self.app._worker  # a queue's rate window with room again (a timer of the worker only)
        if worker is not None:
            candidates += [moment for moment in worker.rate_moments() if moment > self._now]
        return min(candidates, default=None)

    def _fire_retries(self) -> None:
        while self._retries and self._retries[0][0] <= self._now:
            _, _, instance_id, future = heapq.heappop(self._retries)
            if not future.done():
                self._parked.discard(instance_id)  # busy from now on, before its task even resumes
                future.set_result(None)

    async def _retry_wait(self, instance_id: str, delay: float) -> None:
        """The engine's retry back-off under this clock: until ``advance`` reaches it.

        Only for an activity awaited by the instance's run itself; a retry inside an ``asyncio.gather``
        (another task) is made at once, without moving the clock: the instance could otherwise look
        idle while its other branches still run.
        """
        worker = self.app._worker
        entry = None if worker is None else worker._running.get(instance_id)
        if delay <= 0 or entry is None or entry[1] is not asyncio.current_task():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._order += 1
        heapq.heappush(self._retries, (self._now + delay, self._order, instance_id, future))
        self._parked.add(instance_id)
        try:
            await future
        finally:
            self._parked.discard(instance_id)

    # -- quiescence --------------------------------------------------------------------------------
    async def wait_until_idle(self, timeout: float | timedelta | None = None) -> None:
        """Return once every instance that can run has run until it waits, finishes or fails.

        Raises ``geste.errors.IdleTimeout`` naming the busy instances if that takes longer than
        ``timeout`` real seconds (default: the environment's ``idle_timeout``).
        """
        self._require_open()
        limit = self.idle_timeout if timeout is None else seconds(timeout, what="timeout")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            busy = await self._busy()
            if busy is None:
                return
            if loop.time() > deadline:
                raise IdleTimeout(f"after {limit:g}s (real time), still busy: {busy}")
            worker = self._worker()
            tasks = [task for iid, (_, task) in worker._running.items() if iid not in self._parked]
            if tasks:
                await asyncio.wait(tasks, timeout=_POLL * 10, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(_POLL)

    async def _busy(self) -> str | None:
        """What still runs or can run (None: nothing). The database is read first: a claim that took
        instances before this read has spawned their runs by the time it returns (one thread serves the
        database, in order), and one after it leaves them runnable in it."""
        worker = self._worker()
        stats = await self.app.storage.queue_stats(self._now)
        running = set(worker._running)
        active = sorted(running - self._parked)
        if stats.runnable:
            worker.poke()
        if not active and not stats.runnable and not worker._reserved and stats.held_leases <= len(running):
            return None
        parts = []
        if active:
            parts.append(f"running {', '.join(active[:10])}{' ...' if len(active) > 10 else ''}")
        if stats.runnable:
            parts.append(f"{stats.runnable} runnable instance(s) not yet claimed")
        if worker._reserved or stats.held_leases > len(running):
            parts.append("instances being started or claimed")
        return "; ".join(parts)

    def _worker(self) -> Worker:
        self._require_open()
        worker = self.app._worker
        assert worker is not None
        return worker

    def _require_open(self) -> None:
        if self._saved is None:
            raise ConfigurationError("the WorkflowEnvironment is not open: use `async with` first")

    # -- acting --------------------------------------------------------------------------------------
    async def start(
        self, workflow: Workflow[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> WorkflowHandle[R]:
        """Start an instance (a generated id), and return once it waits, finishes or fails."""
        self._require_open()
        handle = await self.app.client.start_instance(workflow, args, kwargs, instance_id=None)
        await self._settle()
        return handle

    async def start_with_id(
        self, workflow: Workflow[P, R], instance_id: str, /, *args: P.args, **kwargs: P.kwargs
    ) -> WorkflowHandle[R]:
        """Start the instance ``instance_id`` (or find it), and return once it waits, finishes or fails."""
        self._require_open()
        handle = await self.app.client.start_instance(workflow, args, kwargs, instance_id=instance_id)
        await self._settle()
        return handle

    async def send_event(self, event_type: str, data: Any = None, **options: Any) -> str:
        """``app.send_event``, then wait until the instances it woke have run (see ``wait_until_idle``)."""
        event_id = await self.app.send_event(event_type, data, **options)
        await self._settle()
        return event_id

    async def publish(self, channel: str, data: Any = None, *, message_id: str | None = None) -> str:
        """``app.publish``, then wait until the instances it woke have run."""
        message = await self.app.publish(channel, data, message_id=message_id)
        await self._settle()
        return message

    async def send_to(
        self, instance_id: str, channel: str, data: Any = None, *, message_id: str | None = None
    ) -> str:
        """``app.send_to``, then wait until the instance has run."""
        message = await self.app.send_to(instance_id, channel, data, message_id=message_id)
        await self._settle()
        return message

    async def cancel(self, instance_id: str) -> InstanceInfo:
        """``app.cancel``, then wait until the instance (and its compensations) have run."""
        await self.app.cancel(instance_id)
        await self._settle()
        return await self.app.get_instance(instance_id)

    async def result(
        self, handle: WorkflowHandle[R], *, max_advance: float | timedelta = timedelta(days=3650)
    ) -> R:
        """The instance's result, moving the clock from timer to timer until it finishes.

        Raises ``geste.errors.ResultTimeout`` when it waits for something no timer brings (an event, a
        message: send it first) or would need the clock moved past ``max_advance``; the clock is then
        left where the last timer put it. ``WorkflowFailed`` and ``WorkflowCancelled`` as
        ``handle.result()``.
        """
        self._require_open()
        limit = self._now + seconds(max_advance, what="max_advance")
        while True:
            await self._settle()
            info = await self.app.get_instance(handle.instance_id)
            if info.status.is_finished:
                return await handle.result()
            due = await self._next_due()
            if due is None:
                raise ResultTimeout(
                    f"instance {handle.instance_id} is {info.status.value} and no timer is set: it waits for "
                    "an event or a message that no advance of the clock brings"
                )
            if due > limit:
                raise ResultTimeout(
                    f"instance {handle.instance_id} is still {info.status.value}; its next timer is past "
                    f"max_advance ({datetime.fromtimestamp(due, UTC).isoformat()})"
                )
            await self._advance_to(due)


async def check_replay(
    app: App,
    *,
    database_url: str | None = None,
    files: Iterable[str | os.PathLike[str]] | None = None,
    workflow: str | None = None,
    limit: int = 1000,
    timeout: float = 30.0,
    on_result: Callable[[ReplayResult], None] | None = None,
) -> ReplayReport:
    """Replay recorded histories against the workflows ``app`` registers now; report each verdict.

    Give either ``database_url`` (a copy of production, say: it is only read, never written; at most
    ``limit`` instances, of ``workflow`` if given, the unfinished ones first) or ``files`` (exported with
    ``export_history``; a folder stands for its ``*.json`` files). The App need not be open: only its
    registry of workflows is used. Activities are never run: a replay stops where its history ends.
    ``timeout`` (seconds) bounds each replay; ``on_result`` is called after each one (progress).
    """
    return await _replay.check_replay(
        app.workflows,
        max_payload_bytes=app.max_payload_bytes,
        database_url=database_url,
        files=files,
        workflow=workflow,
        limit=limit,
        timeout=timeout,
        on_result=on_result,
    )
