"""A replay divergence cannot be swallowed by the workflow's own `except Exception`."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import geste

from .support import wait_status


async def test_swallowed_non_determinism_still_fails_the_instance(make_app: Callable[..., geste.App]) -> None:
    first = make_app()

    @first.activity
    async def step_a(ctx: geste.ActivityContext) -> str:
        return "a"

    @first.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        await step_a(ctx)
        await ctx.wait_event("go")
        return "done"

    async with first:
        handle = await flow.start_with_id("diverge")
        await wait_status(first, "diverge", geste.Status.WAITING)

    second = make_app()

    @second.activity
    async def step_b(ctx: geste.ActivityContext) -> str:
        return "b"

    @second.workflow(name="flow")
    async def changed(ctx: geste.WorkflowContext) -> str:
        try:
            await step_b(ctx)  # history has step_a at this position
        except Exception:
            pass
        await ctx.wait_event("go")  # taking another step after the divergence re-raises it
        return "should not complete"

    async with second:
        before = await second.history("diverge")
        await second.send_event("go")
        with pytest.raises(geste.errors.WorkflowFailed) as failed:
            await second.get_handle(handle.instance_id).result(timeout=10)
        assert failed.value.error["type"] == "geste.errors.NonDeterminismError"
        assert "step 1" in failed.value.error["message"]
        after = await second.history("diverge")
        assert after[: len(before)] == before  # the failed replay wrote nothing;
        assert [(e.kind, e.name) for e in after[len(before) :]] == [("event", "go")]  # send_event did
