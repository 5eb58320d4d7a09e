"""Versions of one ``order`` workflow, for the replay check's tests: ``app`` is the code the golden
histories of ``tests/golden`` were recorded with; each other App changes it the way a careless deploy
would; ``patched``, ``patched-late`` and ``deprecated`` change it safely, with patches (docs/versioning.md),
and ``patched`` recorded the histories of ``tests/golden/patched``. None of them is ever opened by the
replay check (``geste replay-check tests.apps.replay_app:renamed``).

Every activity appends its name to ``CALLS``: the replay check must never run one.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import geste

CALLS: list[str] = []
VERSIONS = ("v1", "renamed", "removed", "added", "reordered", "extended", "retyped")


def build(version: str, url: str = "sqlite:///replay-app-never-opened.db", **options: Any) -> geste.App:
    app = geste.App(url, **options)

    @app.activity
    async def reserve(ctx: geste.ActivityContext, item: str) -> str:
        CALLS.append("reserve")
        return f"r-{item}"

    @app.activity(name="reserve_stock")
    async def reserve_stock(ctx: geste.ActivityContext, item: str) -> str:
        CALLS.append("reserve_stock")
        return f"r-{item}"

    @app.activity
    async def pay(ctx: geste.ActivityContext, reservation: str) -> str:
        CALLS.append("pay")
        return f"p-{reservation}"

    @app.activity
    async def check_fraud(ctx: geste.ActivityContext, item: str) -> bool:
        CALLS.append("check_fraud")
        return True

    @app.activity
    async def notify(ctx: geste.ActivityContext, item: str) -> None:
        CALLS.append("notify")

    @app.activity
    async def refund(ctx: geste.ActivityContext, payment: str) -> None:
        CALLS.append("refund")

    async def shipped(ctx: geste.WorkflowContext, item: str) -> None:
        await ctx.wait_event("shipped", match={"item": item}, timeout=timedelta(days=2))

    if version == "retyped":

        @app.workflow(name="order")
        async def order_retyped(ctx: geste.WorkflowContext, item: str, quantity: int) -> str:
            return item

        return app

    @app.workflow(name="order")
    async def order(ctx: geste.WorkflowContext, item: str) -> str:
        if version == "reordered":
            payment = await pay(ctx, f"r-{item}")
            await reserve(ctx, item)
        else:
            if version == "added" or (version in ("patched", "patched-late") and ctx.patched("fraud-check")):
                await check_fraud(ctx, item)
            elif version == "deprecated":
                ctx.deprecate_patch("fraud-check")
                await check_fraud(ctx, item)
            reservation = await (reserve_stock if version == "renamed" else reserve)(ctx, item)
            payment = "unpaid" if version == "removed" else await pay(ctx, reservation)
        ctx.on_failure(refund, payment)
        try:
            await shipped(ctx, item)
        except geste.errors.EventTimeout:
            raise RuntimeError(f"{item} was never shipped") from None
        await notify(ctx, item)
        if version == "patched-late" and ctx.patched("notify-twice"):
            await notify(ctx, item)
        if version == "extended":
            await notify(ctx, item)
        return payment

    return app


app = build("v1")
renamed = build("renamed")
removed = build("removed")
added = build("added")
reordered = build("reordered")
extended = build("extended")
retyped = build("retyped")
patched = build("patched")
patched_late = build("patched-late")
deprecated = build("deprecated")
