"""A heartbeat renewal that comes just after a run's own end: the lease the run gave back is not a lost
one (``Worker.renew`` reads who holds it). The renewal is made to come at the worst moment: right after
the end's commit, before the run's task resumes to leave the leases renewed. Before the fix the worker
logged "lease lost" and cancelled the ending run (tests/test_sqlite_stress.py met it one run in two)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

import geste
from geste.storage import create_storage

MakeApp = Callable[..., geste.App]


async def test_a_renewal_right_after_the_runs_own_end_loses_no_lease(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()

    @app.activity
    async def one(ctx: geste.ActivityContext) -> int:
        return 1

    @app.workflow
    async def ends(ctx: geste.WorkflowContext) -> int:
        return await one(ctx)

    missed: set[str] = set()
    """The instances whose lease the renewal right after their end did not find (all of them)."""
    async with app:
        worker = app._worker
        assert worker is not None
        storage = app.storage
        real_finish, real_renew = storage.finish, storage.renew

        ending: list[str] = []

        async def renew(leases: Any, *args: Any, **kwargs: Any) -> set[str]:
            found = await real_renew(leases, *args, **kwargs)
            missed.update(i for i in ending if i not in found and i in {x.instance_id for x in leases})
            return found

        async def finish(commit: Any, **kwargs: Any) -> Any:
            outcome = await real_finish(commit, **kwargs)
            ending[:] = [commit.lease.instance_id]
            await worker.renew()  # the heartbeat's renewal, after the end's commit, before the run resumes
            ending.clear()
            return outcome

        storage.finish = finish  # type: ignore[method-assign]
        storage.renew = renew  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="geste"):
            for n in range(5):  # one at a time: one run ends at a time
                assert await (await ends.start_with_id(f"e-{n}")).result(timeout=10) == 1
    assert sorted(missed) == [f"e-{n}" for n in range(5)]  # each renewal missed the lease given back
    assert "lease lost" not in caplog.text


async def test_a_lease_taken_over_and_given_back_by_the_taker_stops_the_run_in_flight(
    make_app: MakeApp, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The other side: a worker paused past its lease (the chaos suite's SIGSTOP) resumes with a run in
    flight whose lease another worker took over and has already given back. The renewal does not find
    the lease and nobody holds the instance, but its last holder was the taker: the lease is lost, the run
    is stopped and says so (before, the run went on, silent until its next write, or for good if it made
    none)."""
    app = make_app()
    started, cancelled = asyncio.Event(), asyncio.Event()

    @app.activity
    async def hangs(ctx: geste.ActivityContext) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    @app.workflow
    async def stuck(ctx: geste.WorkflowContext) -> None:
        await hangs(ctx)

    thief = create_storage(db_url)
    await thief.open()
    try:
        with caplog.at_level(logging.WARNING, logger="geste"):
            async with app:
                await stuck.start_with_id("s")
                await asyncio.wait_for(started.wait(), 10)
                later = time.time() + 100  # the thief's clock: past the worker's lease
                (claim,) = await thief.claim("thief", later, later + 5, 1, workflows=["stuck"])
                await thief.release([claim.lease], later, run_at=later + 1000)
                await asyncio.wait_for(cancelled.wait(), 10)  # by the worker's next renewal
    finally:
        await thief.close()
    assert "instance s: lease lost; stopping its run here" in caplog.text
