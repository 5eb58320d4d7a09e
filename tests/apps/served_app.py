"""A sample app for ``geste worker --queues``: two declared queues, ``a`` and ``b``, and workflows that
sleep durably or wait for an event (so that a run resumes after its admission). Run as
``geste worker tests.apps.served_app:app --queues a --no-unqueued`` from the repository root; the App
takes its database from ``GESTE_DATABASE_URL``. The tests build client Apps with ``build_app(url)``.
"""

from __future__ import annotations

from typing import Any

import geste


def build_app(url: str | None = None, **options: Any) -> geste.App:
    options.setdefault("poll_interval", 0.05)
    options.setdefault("lock_timeout", 2.0)
    options.setdefault("shutdown_grace", 2.0)
    app = geste.App(url, queues=[geste.Queue("a", concurrency=2), geste.Queue("b")], **options)

    @app.workflow
    async def job(ctx: geste.WorkflowContext, x: int) -> int:
        await ctx.sleep(0.1)  # resumed after its admission: by a timer
        return x

    @app.workflow
    async def waits(ctx: geste.WorkflowContext) -> str:
        event = await ctx.wait_event("go")  # resumed after its admission: by an event
        return str(event.data)

    return app


app = build_app()
