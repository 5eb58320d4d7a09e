"""A worker process for the rolling-deploy test (tests/test_versions.py): two versions of one codebase.

Run from the repository root (``tests/apps/worker.py``, ``tests/processes.py``)::

    python -m tests.apps.version_app DATABASE_URL --worker-id W --markers DIR --log LOG --code v1|v2

``--code`` picks the code and is the App's version. ``pinned_flow`` (``versioning="pinned"``) changed
between the versions without a patch (v1 runs ``a1``/``b1``, v2 ``a2``/``b2``): its instances must stay on
their version. ``upgrading_flow`` changed with patches: v2 adds ``pre`` (``ctx.patched("pre")``, before its
first step) and ``post`` (``ctx.patched("post")``, after its wait). Both wait for a ``go`` event naming
their instance. Each activity logs its name, worker and version.
"""

from __future__ import annotations

from typing import Any

import geste

from .worker import activity_log, serve


def build_app(
    url: str,
    *,
    markers: str,
    log: str | None = None,
    worker_id: str | None = None,
    code: str = "v1",
    **options: Any,
) -> geste.App:
    app = geste.App(url, version=code, **({"worker_id": worker_id} if worker_id else {}), **options)
    note = activity_log(log, worker_id)

    @app.activity
    async def step(ctx: geste.ActivityContext, name: str) -> str:
        note(ctx, "step", name=name, version=code)
        return name

    async def go(ctx: geste.WorkflowContext) -> None:
        await ctx.wait_event("go", match={"id": ctx.instance_id})

    @app.workflow(versioning="pinned")
    async def pinned_flow(ctx: geste.WorkflowContext) -> list[str]:
        done = [await step(ctx, "a1" if code == "v1" else "a2")]
        await go(ctx)
        done.append(await step(ctx, "b1" if code == "v1" else "b2"))
        return done

    @app.workflow
    async def upgrading_flow(ctx: geste.WorkflowContext) -> list[str]:
        done = []
        if code == "v2" and ctx.patched("pre"):
            done.append(await step(ctx, "pre"))
        done.append(await step(ctx, "a"))
        await go(ctx)
        if code == "v2" and ctx.patched("post"):
            done.append(await step(ctx, "post"))
        done.append(await step(ctx, "b"))
        return done

    return app


def main() -> None:
    # a wake-up routed to a worker that has just stopped (the others learn of it at their next beat) is
    # found by the poll net: a short one keeps the rolling deploy's waits well inside their timeouts
    serve(build_app, prog="version_app", code="v1", poll_interval=0.05, notify_fallback_interval=1.0)


if __name__ == "__main__":
    main()
