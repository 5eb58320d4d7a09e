"""A small shop whose instances show every part of the web viewer: completed, failed with compensations,
waiting for an event, a timer and a channel message, an outbox event, channel messages between
instances. ``seed(url)`` runs them to those states and returns their ids; the viewer's tests and its
screenshot (``tests/test_viewer_browser.py``) look at what it leaves in the database.

Run it alone to leave a demo database and look at it with ``geste serve``::

    .venv/bin/python -m tests.viewer_demo sqlite:///demo.db
    .venv/bin/geste serve --database-url sqlite:///demo.db --no-worker
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import geste

from .support import wait_until

ORDERS = [("ORD-1041", 18.5), ("ORD-1042", 42.0), ("ORD-1043", 7.25), ("ORD-1044", 99.9)]


class PaymentDeclined(Exception):
    """The bank said no: not retried."""


def build(url: str) -> geste.App:
    delivered: list[str] = []

    async def deliver(event: Any) -> None:
        delivered.append(event.event_id)

    app = geste.App(url, poll_interval=0.05, lock_timeout=5.0, outbox_handler=deliver)

    @app.activity
    async def reserve_stock(ctx: geste.ActivityContext, order_id: str, items: int) -> str:
        return f"rsv-{order_id}-{items}"

    @app.activity
    async def release_stock(ctx: geste.ActivityContext, reservation: str) -> None:
        return None

    @app.activity(
        retry=geste.RetryPolicy(max_attempts=3, initial_interval=0.01, non_retryable=[PaymentDeclined])
    )
    async def charge_card(ctx: geste.ActivityContext, order_id: str, amount: float) -> str:
        if amount > 90:
            raise PaymentDeclined(f"card declined for {order_id}: amount {amount} over the limit")
        if ctx.attempt == 1:
            raise ConnectionError("payment gateway timed out")
        return f"ch_{order_id.lower()}"

    @app.activity
    async def refund(ctx: geste.ActivityContext, charge_id: str) -> None:
        return None

    @app.activity
    async def send_receipt(ctx: geste.ActivityContext, order_id: str, email: str) -> dict[str, Any]:
        return {"to": email, "subject": f"Your order {order_id}", "queued": True}

    @app.workflow
    async def checkout(
        ctx: geste.WorkflowContext, order_id: str, amount: float, items: int = 1
    ) -> dict[str, Any]:
        reservation = await reserve_stock(ctx, order_id, items)
        ctx.on_failure(release_stock, reservation)
        charge = await charge_card(ctx, order_id, amount)
        ctx.on_failure(refund, charge)
        shipped = await ctx.wait_event("parcel.shipped", match={"order_id": order_id}, timeout=7 * 24 * 3600)
        await ctx.publish("orders", {"order_id": order_id, "status": "shipped"})
        await ctx.send_event("order.shipped", {"order_id": order_id, "carrier": shipped.data["carrier"]})
        receipt = await send_receipt(ctx, order_id, "ada@example.com")
        return {
            "order_id": order_id,
            "charge": charge,
            "tracking": shipped.data["tracking"],
            "receipt": receipt,
        }

    @app.workflow
    async def trial_reminder(ctx: geste.WorkflowContext, user: str) -> str:
        started = ctx.now()
        await ctx.sleep(3 * 24 * 3600)
        return f"reminded {user} (trial started {started:%Y-%m-%d})"

    @app.workflow
    async def ledger(ctx: geste.WorkflowContext) -> list[Any]:
        await ctx.subscribe("ledger", "competing")
        booked = []
        for _ in range(2):
            message = await ctx.receive("ledger", timeout=24 * 3600)
            booked.append(message.data)
        return booked

    @app.workflow
    async def bookkeeper(ctx: geste.WorkflowContext, target: str) -> str:
        entry = ctx.uuid4()
        await ctx.send_to(target, "ledger", {"entry": str(entry), "amount": 18.5})
        return str(entry)

    return app


async def seed(url: str) -> dict[str, str]:
    """Run the shop's instances into their states; return ``{role: instance_id}``."""
    app = build(url)
    ids: dict[str, str] = {}
    async with app:
        for order_id, amount in ORDERS:
            await app.start_workflow("checkout", order_id, amount, items=2, instance_id=order_id)
        ids["completed"] = "ORD-1041"
        ids["waiting_event"] = "ORD-1043"
        ids["failed"] = "ORD-1044"
        ids["completing"] = "ORD-1042"

        async def waiting(instance_id: str) -> bool:
            return (await app.get_instance(instance_id)).status == geste.Status.WAITING

        for order_id in ("ORD-1041", "ORD-1042", "ORD-1043"):
            await wait_until(lambda order_id=order_id: waiting(order_id), f"{order_id} to wait")
        await app.send_event(
            "parcel.shipped", {"order_id": "ORD-1041", "carrier": "DHL", "tracking": "JD0142"}
        )
        await app.send_event(
            "parcel.shipped", {"order_id": "ORD-1042", "carrier": "UPS", "tracking": "1Z999"}
        )
        for order_id in ("ORD-1041", "ORD-1042", "ORD-1044"):
            try:
                await app.get_handle(order_id).result(timeout=20)
            except geste.errors.WorkflowFailed:
                pass

        reminder = await app.start_workflow("trial_reminder", "ada", instance_id="trial-ada")
        ids["waiting_timer"] = reminder.instance_id
        await wait_until(lambda: waiting("trial-ada"), "the reminder to sleep")

        await app.start_workflow("ledger", instance_id="ledger-1")
        ids["waiting_channel"] = "ledger-1"
        await wait_until(lambda: waiting("ledger-1"), "the ledger to wait")
        keeper = await app.start_workflow("bookkeeper", "ledger-1", instance_id="bookkeeper-1")
        await keeper.result(timeout=20)
        ids["sender"] = "bookkeeper-1"

        async def ledger_waits_again() -> bool:
            history = await app.history("ledger-1")
            return await waiting("ledger-1") and sum(e.kind == geste.StepKind.MESSAGE for e in history) == 1

        await wait_until(ledger_waits_again, "the ledger to take one message and wait for the next")

        async def delivered() -> bool:
            return all(entry.status == "delivered" for entry in await app.outbox())

        await wait_until(delivered, "the outbox events to be delivered")
    return ids


if __name__ == "__main__":
    print(asyncio.run(seed(sys.argv[1] if len(sys.argv) > 1 else "sqlite:///demo.db")))
