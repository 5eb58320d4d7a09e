"""Background loops survive anything: a row this version cannot read, an unexpected exception in a claim
or a renewal; a loop that ends anyway marks its worker unhealthy in the registry (``geste status``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import geste
from geste.errors import InstanceStateError

from .support import raw_query, run_cli, wait_status, wait_until

MakeApp = Callable[..., geste.App]


def build(make_app: MakeApp, **options: Any) -> geste.App:
    app = make_app(**options)

    @app.workflow
    async def double(ctx: geste.WorkflowContext, n: int) -> int:
        return n * 2

    return app


async def test_a_status_this_version_does_not_know_is_skipped_and_shown(
    make_app: MakeApp, db_url: str
) -> None:
    """A runnable row with a status written by a newer geste (or by hand): no worker claims it, the claim
    loop goes on with the others, and the status, the viewer and the API show the row as it is."""
    async with build(make_app, run_worker=False) as client:
        odd = await client.start_workflow("double", 1, instance_id="odd")
        await raw_query(db_url, "UPDATE geste_instances SET status = 'queued' WHERE instance_id = 'odd'")
        first = await client.start_workflow("double", 2)
        async with build(make_app) as worker:
            assert await first.result(timeout=10) == 4
            later = await client.start_workflow("double", 3)
            assert await later.result(timeout=10) == 6  # the claim loop lives on

            info = await odd.info()
            assert (info.status, info.status.is_known, info.locked_by) == ("queued", False, None)
            status = await worker.status()
            assert status.queue.counts[geste.Status.stored("queued")] == 1
            assert status.as_dict()["queue"]["counts"]["queued"] == 1
            with pytest.raises(InstanceStateError, match="does not know"):
                await worker.resume("odd")
            listed = await worker.list_instances(limit=10)
            assert "queued" in {str(i.status) for i in listed}
            transport = httpx.ASGITransport(app=worker.asgi())
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
                page = await http.get("/ui")
                assert page.status_code == 200 and "queued" in page.text
                one = await http.get("/ui/instances/odd")
                assert one.status_code == 200 and "queued" in one.text
                api = await http.get("/instances/odd")
                assert api.status_code == 200 and api.json()["status"] == "queued"
    printed = await asyncio.to_thread(run_cli, ["status", "--database-url", db_url])
    assert printed.exit_code == 0, printed.output
    assert "statuses this version of geste does not know" in printed.output and "'queued' 1" in printed.output


async def test_the_claim_loop_survives_an_unexpected_error(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    worker = build(make_app)
    real, real_ids = worker.storage.claim, worker.storage.claim_ids
    calls = whole = 0

    async def claim(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls, whole
        calls, whole = calls + 1, whole + 1
        if whole == 1:
            raise RuntimeError("a bug in a claim")
        return await real(*args, **kwargs)

    async def claim_ids(*args: Any, **kwargs: Any) -> Any:  # a routed wake-up (PostgreSQL) claims by id
        nonlocal calls
        calls += 1
        return await real_ids(*args, **kwargs)

    worker.storage.claim = claim  # type: ignore[method-assign]
    worker.storage.claim_ids = claim_ids  # type: ignore[method-assign]
    caplog.set_level(logging.ERROR, logger="geste.worker")
    async with build(make_app, run_worker=False) as client, worker:
        handle = await client.start_workflow("double", 21)
        assert await handle.result(timeout=10) == 42
    assert calls > 1  # it claimed again after the failure (a whole claim, or by id)
    failures = [r for r in caplog.records if "claiming failed unexpectedly" in r.getMessage()]
    assert failures and failures[0].levelno == logging.ERROR
    assert failures[0].exc_info is not None and "a bug in a claim" in str(failures[0].exc_info[1])


async def test_the_heartbeat_survives_an_unexpected_error_and_keeps_the_lease(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    """The renewal fails once with an unexpected error; it goes on renewing, so the activity that runs
    for several lease lengths is never taken over (it runs once)."""
    renewed = asyncio.Event()
    successes = 0
    runs = 0
    # a heartbeat every second: after the failed renewal the lease has 1 s left when the next one is due
    # (with 0.6 s, a renewal 0.2 s late under load let it expire, and the worker took the instance over)
    app = make_app(lock_timeout=3.0)
    real = app.storage.renew
    calls = 0

    async def renew(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls, successes
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in a renewal")
        kept = await real(*args, **kwargs)
        successes += 1
        if successes >= 6:  # 6 s after the failure: two lease lengths
            renewed.set()
        return kept

    app.storage.renew = renew  # type: ignore[method-assign]

    @app.activity
    async def long(ctx: geste.ActivityContext) -> str:
        nonlocal runs
        runs += 1
        await renewed.wait()
        return "done"

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        return await long(ctx)

    caplog.set_level(logging.ERROR, logger="geste.worker")
    async with app:
        assert await (await flow.start()).result(timeout=30) == "done"
    assert runs == 1
    assert any("renewing leases failed unexpectedly" in r.getMessage() for r in caplog.records)


class Fatal(BaseException):
    """Escapes ``except Exception``: what a loop cannot survive."""


async def test_a_loop_that_ends_marks_its_worker_unhealthy(
    make_app: MakeApp, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = build(make_app, worker_id="fragile")
    caplog.set_level(logging.CRITICAL, logger="geste.loops")
    async with app:
        worker = app._worker
        assert worker is not None

        async def fatal(cause: str = "poll") -> float:
            raise Fatal("the end")

        worker._claim_round = fatal  # type: ignore[method-assign]
        worker.poke()

        async def unhealthy() -> Any:
            (info,) = (await app.status()).workers
            return info if info.state == "unhealthy" else None

        info = await wait_until(unhealthy, "the registry to show the worker unhealthy")
        assert info.health is not None and "claim loop" in info.health and "Fatal: the end" in info.health
        assert info.as_dict()["health"] == info.health
        printed = await asyncio.to_thread(run_cli, ["status", "--database-url", db_url])
        assert printed.exit_code == 0, printed.output
        assert "fragile is unhealthy" in printed.output
    assert any(r.levelno == logging.CRITICAL and "claim loop ended" in r.getMessage() for r in caplog.records)


async def test_a_worker_stopped_normally_is_not_unhealthy(make_app: MakeApp) -> None:
    app = build(make_app, worker_id="calm")
    async with app:
        assert await (await app.start_workflow("double", 1)).result(timeout=10) == 2
    async with build(make_app, run_worker=False) as reader:
        (info,) = (await reader.status()).workers
        assert (info.state, info.health) == ("stopped", None)


async def test_an_instance_of_an_unknown_status_is_not_cancelled_by_a_wait(
    make_app: MakeApp, db_url: str
) -> None:
    """What a worker of this version writes never touches such a row: a cancel flags it, nothing runs."""
    async with build(make_app, run_worker=False) as client:
        await client.start_workflow("double", 1, instance_id="odd")
        await raw_query(db_url, "UPDATE geste_instances SET status = 'queued' WHERE instance_id = 'odd'")
        async with build(make_app) as worker:
            info = await worker.cancel("odd")
            assert str(info.status) == "queued"
            done = await worker.start_workflow("double", 5)
            assert await done.result(timeout=10) == 10
            await wait_status(worker, done.instance_id, geste.Status.COMPLETED)
            row = (
                await raw_query(
                    db_url, "SELECT status, locked_by FROM geste_instances WHERE instance_id = 'odd'"
                )
            )[0]
            assert row == {"status": "queued", "locked_by": None}
