"""A sample app for the published-state tests: a workflow that publishes values a step at a time.

Run as a worker process from the repository root (``tests/apps/worker.py``, ``tests/processes.py``)::

    python -m tests.apps.state_app DATABASE_URL --worker-id W --markers DIR

``publisher(n)`` sets ``status`` to ``"started"``, then ``n`` times waits for a ``go`` event naming it
(``{"id": instance id}``) and sets ``progress`` to ``{"done": i, "pid": its process}``; it returns ``n``.
"""

from __future__ import annotations

import os
from typing import Any

import geste

from .worker import serve


def build_app(
    url: str,
    *,
    log: str | None = None,
    markers: str | None = None,
    worker_id: str | None = None,
    **options: Any,
) -> geste.App:
    app = geste.App(url, worker_id=worker_id, **options)

    @app.workflow
    async def publisher(ctx: geste.WorkflowContext, n: int) -> int:
        await ctx.set_state("status", "started")
        for i in range(1, n + 1):
            await ctx.wait_event("go", match={"id": ctx.instance_id})
            await ctx.set_state("progress", {"done": i, "pid": os.getpid()})
        return n

    return app


def main(argv: list[str] | None = None) -> None:
    serve(build_app, argv, prog="python -m tests.apps.state_app", poll_interval=0.05, lock_timeout=5.0)


if __name__ == "__main__":
    main()
