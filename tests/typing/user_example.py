"""geste as a user's code sees it: checked by `mypy --strict` against the installed package, then run.

tests/test_packaging.py type-checks this file against the source tree and runs it; `.ci/check-wheel`
type-checks it against the wheel installed in a fresh environment (what `py.typed` promises). Each
`assert_type` fails the check if a public signature loses its types (to `Any`, say); each
`# type: ignore[...]` marks a call mypy must refuse, and fails the check (an unused ignore, under
`--strict`) once mypy would accept it.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import assert_type

from pydantic import BaseModel

import geste
from geste.errors import EventTimeout, GesteError

app = geste.App("sqlite:///user_example.db", poll_interval=0.05)


class Charge(BaseModel):
    order_id: str
    amount: float


@app.activity(
    retry=geste.RetryPolicy(max_attempts=3, initial_interval=0.01, max_interval=timedelta(seconds=1))
)
async def charge(ctx: geste.ActivityContext, charge: Charge) -> str:
    assert_type(ctx.attempt, int)
    return f"ch_{charge.order_id}"


@app.activity
def audit(ctx: geste.ActivityContext, line: str) -> int:  # a plain def: runs in the App's thread pool
    return len(line)


@app.workflow(name="checkout")
async def checkout(ctx: geste.WorkflowContext, order_id: str, amount: float) -> dict[str, str | int]:
    charged = await charge(ctx, Charge(order_id=order_id, amount=amount))
    assert_type(charged, str)
    written = await audit(ctx, charged)
    assert_type(written, int)
    try:
        event = await ctx.wait_event("approved", match={"order_id": order_id}, timeout=10)
    except EventTimeout:
        return {"charge": charged, "by": "nobody"}
    assert_type(event, geste.Event)
    await ctx.sleep(0.01)
    return {"charge": charged, "audit": written, "by": str(event.data["by"])}


typed: geste.Workflow[[str, float], dict[str, str | int]] = checkout


async def main() -> None:
    async with app:
        handle = await checkout.start("A-1", 12.5)
        assert_type(handle, geste.WorkflowHandle[dict[str, str | int]])
        await app.send_event("approved", {"order_id": "A-1", "by": "ada"}, event_id="evt-A-1")
        result = await handle.result(timeout=10)
        assert_type(result, dict[str, str | int])
        print("result:", result)
        for entry in await handle.history():
            assert_type(entry, geste.HistoryEntry)
            print(entry.seq, entry.kind.value, entry.name)
        info = await handle.info()
        assert_type(info, geste.InstanceInfo)
        assert info.status is geste.Status.COMPLETED
        again = await checkout.start_with_id("A-2", "A-2", 1.0)
        assert_type(again, geste.WorkflowHandle[dict[str, str | int]])
        await again.cancel()
        try:
            await again.result(timeout=10)
        except GesteError as error:
            print("A-2:", type(error).__name__)


async def refused(ctx: geste.WorkflowContext) -> None:
    """Never called: calls mypy must refuse (a wrong argument type, one missing, an activity without ctx)."""
    await checkout.start("A-3", "12.5")  # type: ignore[arg-type]
    await checkout.start("A-3")  # type: ignore[call-arg]
    await charge(Charge(order_id="A-4", amount=1.0))  # type: ignore[call-arg, arg-type]
    await ctx.sleep("soon")  # type: ignore[arg-type]


if __name__ == "__main__":
    asyncio.run(main())
