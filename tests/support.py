"""Waiting helpers shared by the tests: every wait is for a condition, with a deadline, never a bare sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import geste


class MovableClock:
    """The real time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


async def wait_until(
    check: Callable[[], Any | Awaitable[Any]],
    what: str = "the condition",
    timeout: float = 15.0,
    interval: float = 0.01,
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy, and return that value.

    Fails with ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def wait_status(app: geste.App, instance_id: str, status: geste.Status, timeout: float = 10.0) -> None:
    """Wait until the instance has ``status`` in the database."""

    async def reached() -> bool:
        return (await app.get_instance(instance_id)).status == status

    await wait_until(reached, f"{instance_id} to be {status}", timeout)
