"""Edda's side of the comparison (runs in benchmarks/.peers-venv). See common.py for the scenarios.

Configuration: ``EddaApp(service_name="bench", db_url=...)`` on ``postgresql+asyncpg://`` or
``sqlite+aiosqlite://``, with the pool its docs advise for production (``pool_size`` 20,
``max_overflow`` 40; the defaults are 5 and 10), LISTEN/NOTIFY on (the default on PostgreSQL), uvloop
(EddaApp installs it). ``workflow.start()`` runs the new instance in the calling process until it ends or
suspends, so the in-process scenarios start at most ``--concurrency`` (100) at once. Waits are
``wait_event`` (a broadcast subscription to the event type's channel), woken from the other process by
``publish(storage, type, data, target_instance_id=...)`` on a bare storage with a NOTIFY listener (what
Edda's CloudEvents handler does); the sleep is ``edda.sleep``.

Several worker processes: n/a. A started instance runs in the process that starts it; other processes
only resume instances that waited (there is no queue that hands new instances to workers).

Work-around: the first instance of each run is started alone (see ``_bounded``): concurrent first starts
of a workflow fail on a duplicate key of ``workflow_definitions`` (its upsert is a read then an insert).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Coroutine
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
from edda import EddaApp, WorkflowContext, activity, publish, sleep, wait_event, workflow

REACHED: set[str] = set()
LATENESS: dict[str, float] = {}


@activity
async def step(ctx: WorkflowContext, value: int) -> int:
    return value + 1


@workflow
async def three_steps(ctx: WorkflowContext, value: int) -> int:
    value = await step(ctx, value)
    value = await step(ctx, value)
    return await step(ctx, value)


@workflow
async def waiter(ctx: WorkflowContext, rounds: int) -> int:
    for r in range(rounds):
        common.emit("waiting", id=ctx.instance_id, round=r)
        await wait_event(ctx, common.EVENT)
        common.emit("resumed", id=ctx.instance_id, round=r, at=time.time())
    return rounds


@activity
async def now(ctx: WorkflowContext) -> float:
    return time.time()


@workflow
async def sleeper(ctx: WorkflowContext, seconds: float) -> None:
    intended = await now(ctx) + seconds
    await sleep(ctx, seconds)  # type: ignore[arg-type]  # typed int; a float works
    LATENESS.setdefault(ctx.instance_id, time.time() - intended)


@workflow
async def idler(ctx: WorkflowContext) -> None:
    REACHED.add(ctx.instance_id)
    await wait_event(ctx, common.EVENT)


@workflow
async def long_history(ctx: WorkflowContext, steps: int) -> int:
    value = 0
    for _ in range(steps):
        value = await step(ctx, value)
    common.emit("waiting", id=ctx.instance_id)
    await wait_event(ctx, common.EVENT)
    common.emit("done", at=time.time())
    return value


class System:
    workers_unsupported = (
        "a started instance runs in the process that starts it; other processes only resume waiting"
        " instances (no queue hands new instances to worker processes)"
    )

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.app: EddaApp | None = None
        self.storage: Any = None
        self.listener: Any = None
        self.completed_sql = ""

    @staticmethod
    def run(main: Coroutine[Any, Any, None]) -> None:
        asyncio.run(main)

    def url(self) -> str:
        if common.is_postgres(self.args.db):
            return self.args.db.replace("postgresql://", "postgresql+asyncpg://", 1)
        return self.args.db

    async def open(self, worker: bool) -> None:
        if worker:
            self.app = EddaApp(service_name="bench", db_url=self.url(), pool_size=20, max_overflow=40)
            await self.app.initialize()
            return
        # A client: the storage alone (no resume loop that could run the workflows here), with the
        # NOTIFY listener EddaApp would give it, so deliveries wake the worker at once.
        from edda.storage.sqlalchemy_storage import SQLAlchemyStorage
        from sqlalchemy.ext.asyncio import create_async_engine

        self.storage = SQLAlchemyStorage(create_async_engine(self.url()))
        await self.storage.initialize()
        if common.is_postgres(self.args.db):
            from edda.storage.pg_notify import PostgresNotifyListener

            self.listener = PostgresNotifyListener(dsn=self.args.db)
            await self.listener.start()
            self.storage.set_notify_listener(self.listener)

    async def close(self) -> None:
        if self.app is not None:
            await self.app.shutdown()
            self.app = None
        if self.listener is not None:
            await self.listener.stop()
            self.listener = None
        if self.storage is not None:
            await self.storage.close()
            self.storage = None

    async def _bounded(self, starts: list[Coroutine[Any, Any, str]]) -> list[str]:
        """Run the starts, at most ``--concurrency`` at once. The first runs alone: Edda's upsert of a
        workflow's definition (on its first start) fails when concurrent first starts race."""
        if not starts:
            return []
        first = await starts[0]
        starts = starts[1:]
        gate = asyncio.Semaphore(self.args.concurrency)

        async def one(start: Coroutine[Any, Any, str]) -> str:
            async with gate:
                return await start

        return [first, *await asyncio.gather(*(one(s) for s in starts))]

    async def run_throughput(self, n: int) -> None:
        await self._bounded([three_steps.start(value=i) for i in range(n)])

    async def start_waiters(self, count: int, rounds: int) -> list[str]:
        return [await waiter.start(rounds=rounds) for _ in range(count)]

    async def send(self, instance_id: str, round: int) -> None:
        await publish(self.storage, common.EVENT, {"round": round}, target_instance_id=instance_id)

    async def run_sleepers(self, count: int, seconds: float) -> list[float]:
        ids = await self._bounded([sleeper.start(seconds=seconds) for _ in range(count)])
        deadline = time.monotonic() + 120
        while not set(ids) <= LATENESS.keys() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return list(LATENESS.values())

    async def start_idle(self, count: int) -> None:
        await self._bounded([idler.start() for _ in range(count)])

    async def start_replay(self, steps: int) -> None:
        await long_history.start(steps=steps)


if __name__ == "__main__":
    common.main(System, __file__, "edda")
