"""The App's schedule calls: ``@app.schedule`` and ``create / pause / resume / delete / list_schedules``.

A declared schedule is kept by the App and written at each open (``declare_all``): its definition
replaced, its next tick kept while its cron expression and time zone stay the same, so the ticks missed
while no worker ran are still seen as missed (docs/schedules.md). The calls at run time write the
database at once; the schedule loop of this process is woken, those of other processes see the change
within their longest pause (``runtime.schedules.MAX_PAUSE``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ._definitions import Workflow
from ._queues import Queue
from ._registry import Registry
from ._schedules import Schedule, ScheduleInfo, first_after, tick_datetime
from .errors import InvalidScheduleError, ScheduleNotFoundError, UnknownWorkflowError
from .runtime import Runtime
from .storage.base import ScheduleRow, Storage


class App(Protocol):
    """What the schedule calls use of the App (its parts are read at each call: ``geste.testing`` swaps
    them)."""

    registry: Registry

    @property
    def storage(self) -> Storage: ...

    @property
    def clock(self) -> Callable[[], float]: ...

    @property
    def runtime(self) -> Runtime: ...

    def workflow(self, fn: Any = None, /, *, name: str | None = None) -> Any: ...


LIST_LIMIT = 10_000
"""The most schedules ``list_schedules`` returns."""


def define(
    workflow: Workflow[Any, Any],
    cron: str,
    *,
    name: str | None,
    timezone: str,
    missed: str,
    overlap: str,
    queue: Queue | str | None = None,
    priority: int = 0,
) -> Schedule:
    """A schedule of ``workflow``, checked: its expression, time zone and policies, its queue, and the
    workflow's parameters (none, or one: the tick)."""
    params = len(workflow.signature.param_hints)
    if params > 1:
        raise InvalidScheduleError(
            f"workflow {workflow.name!r} takes {params} arguments: a scheduled workflow takes none, or one "
            "(the tick, an aware UTC datetime)"
        )
    return Schedule(
        name or workflow.name,
        workflow.name,
        cron,
        timezone,
        missed,
        overlap,
        params == 1,
        _queue_name(queue),
        priority,
    )


def row(schedule: Schedule, now: float) -> ScheduleRow:
    """The schedule's row as written now: its next tick the first after ``now``."""
    return ScheduleRow(
        schedule.name,
        schedule.workflow_name,
        schedule.cron,
        schedule.timezone,
        schedule.missed,
        schedule.overlap,
        schedule.pass_tick,
        False,
        first_after(schedule.cron, schedule.timezone, now),
        queue=schedule.queue,
        priority=schedule.priority,
    )


def info(stored: ScheduleRow) -> ScheduleInfo:
    last = None if stored.last_tick is None else tick_datetime(stored.last_tick)
    return ScheduleInfo(
        stored.name,
        stored.workflow_name,
        stored.cron,
        stored.timezone,
        stored.missed,
        stored.overlap,
        stored.paused,
        tick_datetime(stored.next_tick),
        last,
        stored.last_instance_id,
        stored.queue,
        stored.priority,
        stored.waiting,
    )


def _queue_name(queue: Queue | str | None) -> str | None:
    return queue.name if isinstance(queue, Queue) else queue


class Schedules:
    """The schedules of one App: those declared in code, and the calls that change the stored ones."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.declared: dict[str, Schedule] = {}

    def decorator(
        self,
        cron: str,
        *,
        timezone: str,
        name: str | None,
        missed: str,
        overlap: str,
        queue: Queue | str | None,
        priority: int,
    ) -> Callable[[Any], Workflow[Any, Any]]:
        """``@app.schedule(...)``: on a workflow (or a function, registered as one first). Every option is
        checked at once, before the function is given."""
        options: dict[str, Any] = dict(
            timezone=timezone, missed=missed, overlap=overlap, queue=queue, priority=priority
        )
        Schedule(name or "-", "-", cron, timezone, missed, overlap, False, _queue_name(queue), priority)

        def declare(target: Any) -> Workflow[Any, Any]:
            workflow = target if isinstance(target, Workflow) else self.app.workflow(target)
            if not self.app.registry.registered(workflow):
                raise UnknownWorkflowError(workflow.name)
            schedule = define(workflow, cron, name=name, **options)
            if schedule.name in self.declared:
                raise InvalidScheduleError(f"a schedule named {schedule.name!r} is declared already")
            self.declared[schedule.name] = schedule
            return workflow

        return declare

    async def declare_all(self) -> None:
        """Write the declared schedules (the App opens)."""
        now = self.app.clock()
        for schedule in self.declared.values():
            await self.app.storage.schedule_upsert(row(schedule, now), now)
        if self.declared:
            self.app.runtime.schedules_changed()

    async def create(
        self,
        name: str,
        workflow: str | Workflow[Any, Any],
        cron: str,
        *,
        timezone: str,
        missed: str,
        overlap: str,
        queue: Queue | str | None = None,
        priority: int = 0,
    ) -> ScheduleInfo:
        found = self.app.registry.workflows.get(workflow) if isinstance(workflow, str) else workflow
        if found is None or not self.app.registry.registered(found):
            raise UnknownWorkflowError(workflow if isinstance(workflow, str) else workflow.name)
        schedule = define(
            found,
            cron,
            name=name,
            timezone=timezone,
            missed=missed,
            overlap=overlap,
            queue=queue,
            priority=priority,
        )
        now = self.app.clock()
        await self.app.storage.schedule_upsert(row(schedule, now), now)
        self.app.runtime.schedules_changed()
        return await self.get(schedule.name)

    async def get(self, name: str) -> ScheduleInfo:
        stored = await self.app.storage.get_schedule(name)
        if stored is None:
            raise ScheduleNotFoundError(name)
        return info(stored)

    async def pause(self, name: str) -> None:
        if not await self.app.storage.schedule_pause(name, self.app.clock()):
            raise ScheduleNotFoundError(name)

    async def resume(self, name: str) -> None:
        stored = await self.app.storage.get_schedule(name)
        if stored is None:
            raise ScheduleNotFoundError(name)
        now = self.app.clock()
        if not await self.app.storage.schedule_resume(
            name, first_after(stored.cron, stored.timezone, now), now
        ):
            raise ScheduleNotFoundError(name)
        self.app.runtime.schedules_changed()

    async def delete(self, name: str) -> None:
        if not await self.app.storage.schedule_delete(name):
            raise ScheduleNotFoundError(name)

    async def list(self, limit: int = LIST_LIMIT) -> list[ScheduleInfo]:
        return [info(stored) for stored in await self.app.storage.list_schedules(limit=limit)]
