"""The App of ``geste serve tests.apps.http_app:app`` in tests/test_http_serve.py (run from the root).

Its database comes from ``GESTE_DATABASE_URL``; its workflow is the README's HTTP example.
"""

from __future__ import annotations

from typing import Any

import geste

app = geste.App(poll_interval=0.05, lock_timeout=2.0, shutdown_grace=2.0)


@app.workflow
async def payment(ctx: geste.WorkflowContext, order_id: str) -> dict[str, Any]:
    """Waits for the ``payment.confirmed`` event of ``order_id``."""
    event = await ctx.wait_event("payment.confirmed", match={"order_id": order_id}, timeout=60)
    return {"order_id": order_id, "amount": event.data["amount"], "by": event.source}
