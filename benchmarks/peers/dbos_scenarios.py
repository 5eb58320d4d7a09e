"""DBOS Transact's side of the comparison (runs in benchmarks/.peers-venv). See common.py for the scenarios.

Configuration (DBOS 3.4 defaults unless said): PostgreSQL system database ``system_database_url`` (the
schema ``dbos``), LISTEN/NOTIFY on (the default), ``sys_db_pool_size`` 20 (default); async workflows and
steps (``DBOS.start_workflow_async``), or with ``--variant threads`` synchronous workflows and steps run by
DBOS's thread pool (``DBOS.start_workflow``). Multi-process: the client enqueues with ``DBOSClient`` on a
queue ``bench`` (``worker_concurrency`` = ``--concurrency``, ``polling_interval_sec`` 0.1 instead of the
default 1 s); every worker process runs DBOS and dequeues. Waits are ``DBOS.recv_async`` (a message
sent with ``DBOSClient.send_async`` from the other process); the sleep is ``DBOS.sleep_async``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from collections.abc import Coroutine
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
from dbos import DBOS, DBOSClient, DBOSConfig, EnqueueOptions, SetWorkflowID

QUEUE = "bench"
FOREVER = 24 * 3600.0
REACHED: set[str] = set()


# -- the workflows (DBOS registers them at import, before DBOS() is constructed) -------------------------
@DBOS.step()
async def step(value: int) -> int:
    return value + 1


@DBOS.workflow()
async def three_steps(value: int) -> int:
    value = await step(value)
    value = await step(value)
    return await step(value)


@DBOS.step()
def step_sync(value: int) -> int:
    return value + 1


@DBOS.workflow()
def three_steps_sync(value: int) -> int:
    value = step_sync(value)
    value = step_sync(value)
    return step_sync(value)


@DBOS.workflow()
async def waiter(rounds: int) -> int:
    for r in range(rounds):
        common.emit("waiting", id=DBOS.workflow_id, round=r)
        await DBOS.recv_async(common.EVENT, timeout_seconds=FOREVER)
        common.emit("resumed", id=DBOS.workflow_id, round=r, at=time.time())
    return rounds


@DBOS.step()
async def now() -> float:
    return time.time()


LATENESS: dict[str, float] = {}


@DBOS.workflow()
async def sleeper(seconds: float) -> None:
    intended = await now() + seconds
    await DBOS.sleep_async(seconds)
    LATENESS.setdefault(str(DBOS.workflow_id), time.time() - intended)


@DBOS.workflow()
async def idler() -> None:
    REACHED.add(str(DBOS.workflow_id))
    await DBOS.recv_async(common.EVENT, timeout_seconds=FOREVER)


@DBOS.workflow()
async def long_history(steps: int) -> int:
    value = 0
    for _ in range(steps):
        value = await step(value)
    common.emit("waiting", id=DBOS.workflow_id)
    await DBOS.recv_async(common.EVENT, timeout_seconds=FOREVER)
    common.emit("done", at=time.time())
    return value


class System:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.threads = args.variant == "threads"
        self.client: DBOSClient | None = None
        self.launched = False
        table = "dbos.workflow_status" if common.is_postgres(args.db) else "workflow_status"
        self.completed_sql = f"SELECT count(*) FROM {table} WHERE status = 'SUCCESS'"

    @staticmethod
    def run(main: Coroutine[Any, Any, None]) -> None:
        asyncio.run(main)

    def url(self) -> str:
        return self.args.db

    async def open(self, worker: bool) -> None:
        if not worker:
            self.client = DBOSClient(system_database_url=self.url())
            return
        config: DBOSConfig = {"name": "bench", "system_database_url": self.url(), "log_level": "WARNING"}
        DBOS(config=config)
        DBOS.launch()
        self.launched = True
        if self.args.role == "throughput":  # only there: a queue's polling would add to the idle load
            await DBOS.register_queue_async(
                QUEUE, worker_concurrency=self.args.concurrency, polling_interval_sec=0.1
            )

    async def close(self) -> None:
        if self.client is not None:
            self.client.destroy()
            self.client = None
        if self.launched:
            DBOS.destroy()
            self.launched = False

    async def run_throughput(self, n: int) -> None:
        if self.threads:

            def run_all() -> None:
                handles = [DBOS.start_workflow(three_steps_sync, i) for i in range(n)]
                for i, handle in enumerate(handles):
                    assert handle.get_result() == i + 3

            await asyncio.to_thread(run_all)
            return
        handles = [await DBOS.start_workflow_async(three_steps, i) for i in range(n)]
        results = await asyncio.gather(*(h.get_result() for h in handles))
        assert results == [i + 3 for i in range(n)]

    async def enqueue(self, n: int) -> None:
        assert self.client is not None
        name = "three_steps_sync" if self.threads else "three_steps"
        options: EnqueueOptions = {"queue_name": QUEUE, "workflow_name": name}
        for i in range(n):
            await self.client.enqueue_async(options, i)

    async def start_waiters(self, count: int, rounds: int) -> list[str]:
        ids = [f"waiter-{uuid.uuid4().hex[:12]}" for _ in range(count)]
        for iid in ids:
            with SetWorkflowID(iid):
                await DBOS.start_workflow_async(waiter, rounds)
        return ids

    async def send(self, instance_id: str, round: int) -> None:
        assert self.client is not None
        await self.client.send_async(instance_id, {"round": round}, common.EVENT)

    async def run_sleepers(self, count: int, seconds: float) -> list[float]:
        handles = [await DBOS.start_workflow_async(sleeper, seconds) for _ in range(count)]
        await asyncio.gather(*(h.get_result() for h in handles))
        return list(LATENESS.values())

    async def start_idle(self, count: int) -> None:
        for _ in range(count):
            await DBOS.start_workflow_async(idler)
        while len(REACHED) < count:
            await asyncio.sleep(0.1)

    async def start_replay(self, steps: int) -> None:
        await DBOS.start_workflow_async(long_history, steps)


if __name__ == "__main__":
    common.main(System, __file__, "dbos")
