"""A sample app for the command-line tests: ``geste worker tests.apps.cli_app:app`` (from the root).

The App takes its database from ``GESTE_DATABASE_URL``, as an App built without a URL does; the tests set
it for worker subprocesses and pass ``--database-url`` to in-process commands.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import geste

app = geste.App(poll_interval=0.05, lock_timeout=2.0, shutdown_grace=2.0)

not_an_app = "a string, not a geste.App"


@app.activity
async def double(ctx: geste.ActivityContext, x: int) -> int:
    return 2 * x


@app.workflow
async def compute(ctx: geste.WorkflowContext, x: int) -> dict[str, int]:
    """An activity and a short durable sleep."""
    y = await double(ctx, x)
    await ctx.sleep(0.1)
    return {"x": x, "y": y}


@app.workflow
async def approval(ctx: geste.WorkflowContext, order_id: str) -> dict[str, Any]:
    """Waits (up to a minute) for an ``approved`` event about ``order_id``."""
    event = await ctx.wait_event("approved", match={"order_id": order_id}, timeout=60)
    return {"order_id": order_id, "by": event.data.get("by")}


@app.workflow
async def nightly(ctx: geste.WorkflowContext, tick: datetime) -> str:
    """Started by a schedule (``geste schedule create``): it takes the tick."""
    return tick.isoformat()
