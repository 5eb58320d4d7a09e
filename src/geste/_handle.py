"""A handle on one workflow instance: wait for its result, look at it, cancel it.

It holds the client that made it (``geste._client.Client``), reached through ``HandleClient``: this
module imports nothing above the core models, so that ``Workflow.start`` (``_definitions.py``) can name
what it returns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

from ._models import HistoryEntry, InstanceInfo, RunInfo, StateValue, Status, StreamEntry

R = TypeVar("R")


class HandleClient(Protocol):
    """What a handle asks of the client that made it."""

    async def result(self, instance_id: str, timeout: float | timedelta | None) -> Any: ...

    async def get_instance(self, instance_id: str) -> InstanceInfo: ...

    async def history(self, instance_id: str, *, run: int | None = None) -> list[HistoryEntry]: ...

    async def runs(self, instance_id: str) -> list[RunInfo]: ...

    async def cancel(self, instance_id: str) -> InstanceInfo: ...

    async def get_state(
        self, instance_id: str, key: str, *, version: int | None = None
    ) -> StateValue | None: ...

    async def wait_state(
        self, instance_id: str, key: str, *, after: int = 0, timeout: float | timedelta | None = None
    ) -> StateValue: ...

    def stream_entries(self, instance_id: str, key: str, start: int = 0) -> AsyncIterator[StreamEntry]: ...


class WorkflowHandle(Generic[R]):
    """Returned by ``start``; also made from an id with ``app.get_handle(instance_id)``."""

    def __init__(self, client: HandleClient, instance_id: str, *, created: bool = True) -> None:
        self.client = client
        self.instance_id = instance_id
        self.created = created
        """False when ``start`` found an instance with this id already: it was not started again."""

    async def result(self, timeout: float | timedelta | None = None) -> R:
        """Wait for the instance to finish and return its result.

        Raises ``WorkflowFailed`` / ``WorkflowCancelled`` for those ends, ``ResultTimeout`` when
        ``timeout`` runs out first (the instance goes on running).
        """
        value: R = await self.client.result(self.instance_id, timeout)
        return value

    async def info(self) -> InstanceInfo:
        return await self.client.get_instance(self.instance_id)

    async def status(self) -> Status:
        return (await self.info()).status

    async def history(self, *, run: int | None = None) -> list[HistoryEntry]:
        """The steps of its current run, or of its run ``run`` kept by ``continue_as_new``."""
        return await self.client.history(self.instance_id, run=run)

    async def runs(self) -> list[RunInfo]:
        """Its runs ended by ``continue_as_new``, oldest first (``app.runs``)."""
        return await self.client.runs(self.instance_id)

    async def cancel(self) -> InstanceInfo:
        return await self.client.cancel(self.instance_id)

    async def get_state(self, key: str, *, version: int | None = None) -> StateValue | None:
        """The latest value the instance published under ``key`` with ``ctx.set_state`` (or its value
        ``version``), with its version; None when there is none (docs/state.md). One read by primary key.
        Raises ``InstanceNotFoundError``, and ``ConfigurationError`` for a bad key or version."""
        return await self.client.get_state(self.instance_id, key, version=version)

    async def wait_state(
        self, key: str, *, after: int = 0, timeout: float | timedelta | None = None
    ) -> StateValue:
        """The first value of ``key`` whose version is past ``after`` (0: any value), waiting for one if
        there is none yet: pass the version you have to wait for the next. Woken by the ``set_state``
        itself (in memory in this process, by NOTIFY on PostgreSQL, by reads otherwise). Raises
        ``StateTimeout`` once ``timeout`` runs out, ``StateEndedError`` if the instance ended without
        one (none will come), ``InstanceNotFoundError``."""
        return await self.client.wait_state(self.instance_id, key, after=after, timeout=timeout)

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.instance_id}>"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, WorkflowHandle) and other.instance_id == self.instance_id

    def __hash__(self) -> int:
        return hash(self.instance_id)

    async def read_stream(self, key: str, start: int = 0) -> AsyncIterator[Any]:
        """The items of its durable stream ``key`` (``ctx.write_stream``) from position ``start`` on, in
        order, each once, waiting for more until the stream is closed (``ctx.close_stream``) or the instance
        has ended. Reads from any process; ``start`` resumes where a reader stopped (docs/streams.md)."""
        async for entry in self.client.stream_entries(self.instance_id, key, start):
            yield entry.item

    def stream_entries(self, key: str, start: int = 0) -> AsyncIterator[StreamEntry]:
        """As ``read_stream``, each item with its position (``StreamEntry``): what a reader keeps to resume
        after a crash (``start=entry.position + 1``)."""
        return self.client.stream_entries(self.instance_id, key, start)
