"""geste's side of the comparison (runs in the project's .venv). See common.py for the scenarios.

Configuration: geste's defaults (LISTEN/NOTIFY on PostgreSQL, poll_interval 1 s), concurrency 100 per
worker process (``--concurrency``); the client of the multi-process and wake-up scenarios is an App with
``run_worker=False``.
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

import geste

REACHED: set[str] = set()
"""Instances whose code reached the idle wait (idle scenario)."""
LATENESS: dict[str, float] = {}


class System:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.app: geste.App | None = None
        self.completed_sql = "SELECT count(*) FROM geste_instances WHERE status = 'completed'"

    @staticmethod
    def run(main: Coroutine[Any, Any, None]) -> None:
        asyncio.run(main)

    def build(self, worker: bool) -> geste.App:
        app = geste.App(self.args.db, run_worker=worker, concurrency=self.args.concurrency)

        @app.activity
        async def step(ctx: geste.ActivityContext, value: int) -> int:
            return value + 1

        @app.workflow
        async def three_steps(ctx: geste.WorkflowContext, value: int) -> int:
            value = await step(ctx, value)
            value = await step(ctx, value)
            return await step(ctx, value)

        @app.workflow
        async def waiter(ctx: geste.WorkflowContext, rounds: int) -> int:
            for r in range(rounds):
                common.emit("waiting", id=ctx.instance_id, round=r)
                await ctx.wait_event(common.EVENT)
                common.emit("resumed", id=ctx.instance_id, round=r, at=time.time())
            return rounds

        @app.workflow
        async def sleeper(ctx: geste.WorkflowContext, seconds: float) -> None:
            intended = ctx.now().timestamp() + seconds
            await ctx.sleep(seconds)
            LATENESS.setdefault(ctx.instance_id, time.time() - intended)

        @app.workflow
        async def idler(ctx: geste.WorkflowContext) -> None:
            REACHED.add(ctx.instance_id)
            await ctx.wait_event(common.EVENT)

        @app.workflow
        async def long_history(ctx: geste.WorkflowContext, steps: int) -> int:
            value = 0
            for _ in range(steps):
                value = await step(ctx, value)
            common.emit("waiting", id=ctx.instance_id)
            await ctx.wait_event(common.EVENT)
            common.emit("done", at=time.time())
            return value

        self.workflows = {
            "three_steps": three_steps,
            "waiter": waiter,
            "sleeper": sleeper,
            "idler": idler,
            "long_history": long_history,
        }
        return app

    async def open(self, worker: bool) -> None:
        self.app = self.build(worker)
        await self.app.open()

    async def close(self) -> None:
        if self.app is not None:
            await self.app.close()
            self.app = None

    async def run_throughput(self, n: int) -> None:
        wf = self.workflows["three_steps"]
        handles = [await wf.start(i) for i in range(n)]
        for i, handle in enumerate(handles):
            assert await handle.result(timeout=600) == i + 3

    async def enqueue(self, n: int) -> None:
        wf = self.workflows["three_steps"]
        for i in range(n):
            await wf.start(i)

    async def start_waiters(self, count: int, rounds: int) -> list[str]:
        ids = [f"waiter-{uuid.uuid4().hex[:12]}" for _ in range(count)]
        for iid in ids:
            await self.workflows["waiter"].start_with_id(iid, rounds)
        return ids

    async def send(self, instance_id: str, round: int) -> None:
        assert self.app is not None
        await self.app.send_event(common.EVENT, {"round": round}, instance_id=instance_id)

    async def run_sleepers(self, count: int, seconds: float) -> list[float]:
        handles = [await self.workflows["sleeper"].start(seconds) for _ in range(count)]
        for handle in handles:
            await handle.result(timeout=120)
        return list(LATENESS.values())

    async def start_idle(self, count: int) -> None:
        for _ in range(count):
            await self.workflows["idler"].start()
        while len(REACHED) < count:
            await asyncio.sleep(0.1)

    async def start_replay(self, steps: int) -> None:
        await self.workflows["long_history"].start(steps)


if __name__ == "__main__":
    common.main(System, __file__, "geste")
