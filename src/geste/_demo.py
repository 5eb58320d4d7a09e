"""The workflow behind ``geste demo``: an order that reserves stock, charges, waits for the bank, ships.

It is ordinary user code, kept apart from the command that drives it (``geste.cli``): one activity
fails once and is retried, each side effect registers its compensation with ``ctx.on_failure``, the
payment confirmation is a durable ``ctx.wait_event`` and the cooling-off period a durable ``ctx.sleep``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ._app import App
from ._definitions import Workflow
from ._models import HistoryEntry, InstanceInfo, Status, StepKind
from ._retry import RetryPolicy
from .engine.context import ActivityContext, WorkflowContext
from .errors import ResultTimeout

DEADLINE = 30.0
"""Seconds the demo gives its instance to finish before giving up."""
CONFIRMATION = "payment.confirmed"
COOLING_OFF = 1.0
"""Seconds of durable sleep between the confirmed payment and the shipment."""


class PaymentDeclined(Exception):
    """The bank answered no: the order fails and its compensations run."""


def build_demo_app(url: str) -> tuple[App, Workflow[[str, float], dict[str, Any]]]:
    """A fresh App on ``url`` with the order workflow and its activities registered."""
    app = App(url, poll_interval=0.1, lock_timeout=5.0, shutdown_grace=2.0)

    @app.activity
    async def reserve(ctx: ActivityContext, order_id: str) -> str:
        return f"RSV-{order_id}"

    @app.activity
    async def release(ctx: ActivityContext, reservation: str) -> None:
        return None

    @app.activity(retry=RetryPolicy(max_attempts=3, initial_interval=0.2))
    async def charge(ctx: ActivityContext, order_id: str, amount: float) -> str:
        if ctx.attempt == 1:
            raise ConnectionError("payment gateway timed out")
        return f"CH-{order_id}"

    @app.activity
    async def refund(ctx: ActivityContext, charge_id: str) -> None:
        return None

    @app.activity
    async def ship(ctx: ActivityContext, order_id: str) -> str:
        return f"TRK-{order_id}"

    @app.workflow
    async def order(ctx: WorkflowContext, order_id: str, amount: float) -> dict[str, Any]:
        reservation = await reserve(ctx, order_id)
        ctx.on_failure(release, reservation)
        charge_id = await charge(ctx, order_id, amount)
        ctx.on_failure(refund, charge_id)
        confirmation = await ctx.wait_event(CONFIRMATION, match={"order_id": order_id}, timeout=30)
        if not confirmation.data.get("approved", False):
            raise PaymentDeclined(f"the bank declined {charge_id}")
        await ctx.sleep(COOLING_OFF)
        tracking = await ship(ctx, order_id)
        return {"order_id": order_id, "charge": charge_id, "tracking": tracking}

    return app, order


async def run_demo(
    url: str,
    *,
    approved: bool,
    echo: Callable[[str], None],
    describe: Callable[[HistoryEntry, datetime], str],
) -> InstanceInfo:
    """Run one order on ``url``, echo each history entry as it is recorded, return the final instance.

    The demo plays the bank: once the instance waits for the confirmation, it sends the event.
    """
    app, order = build_demo_app(url)
    async with app:
        handle = await order.start_with_id(f"demo-{uuid.uuid4().hex[:8]}", "ORD-1", 42.0)
        echo(f"started {order.name} instance {handle.instance_id}")
        seen, sent, deadline = 0, False, time.monotonic() + DEADLINE
        while True:
            info = await handle.info()
            history = await handle.history()
            for entry in history[seen:]:
                echo(describe(entry, info.created_at))
            seen = len(history)
            if info.status.is_finished:
                return info
            if not sent and info.status == Status.WAITING and history[-1].kind == StepKind.WAIT_EVENT:
                await asyncio.sleep(0.2)
                data = {"order_id": "ORD-1", "approved": approved}
                echo(f"  (the demo sends the event {CONFIRMATION} {json.dumps(data)})")
                await app.send_event(CONFIRMATION, data)
                sent = True
            if time.monotonic() > deadline:
                raise ResultTimeout(f"the demo instance is still {info.status} after {DEADLINE:g}s")
            await asyncio.sleep(0.05)
