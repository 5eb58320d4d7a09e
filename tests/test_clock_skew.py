"""Clock skew between workers, and its tolerance: leases.

Two workers with leases of ``LOCK`` seconds: one holds an instance in a long activity (its lease kept
only by its heartbeat, every third of a lease), the other claims all the time with its clock ahead. A
lease renewed on time has two thirds of a lease left at worst, so a claimer ahead by less than that never
takes it; one ahead by more than a lease takes it over while its holder lives. That is safe (the lease id
fences the holder's writes: the result is recorded once) but the activity runs twice. A worker warns at
start when its clock is off the database's by more than a third of ``lock_timeout``.
The chaos suite runs whole loads with each worker's clock off by up to ±2 s (tests/chaos, ``skew``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

import geste

from .support import wait_until

LOCK = 1.5
"""The leases: renewed every 0.5 s; a live lease has at least 1 s left (2/3) when renewals are on time."""


def build(url: str, *, skew: float, started: list[str], release: asyncio.Event) -> geste.App:
    app = geste.App(
        url,
        clock=lambda: time.time() + skew,
        lock_timeout=LOCK,
        poll_interval=0.05,
        listen_notify=False,  # the claimer polls every poll_interval on PostgreSQL too
        shutdown_grace=0.5,
        worker_id=f"skew{skew:+}",
    )

    @app.activity
    async def hold(ctx: geste.ActivityContext) -> str:
        started.append(app.worker_id)
        await release.wait()
        return app.worker_id

    @app.workflow
    async def holder(ctx: geste.WorkflowContext) -> str:
        return await hold(ctx)

    return app


def counting(app: geste.App, method: str) -> Callable[[], int]:
    """Count the calls of one of the App's storage methods (the real one is called)."""
    calls = [0]
    real = getattr(app.storage, method)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return await real(*args, **kwargs)

    setattr(app.storage, method, counted)
    return lambda: calls[0]


async def run(url: str, ahead: float, caplog: pytest.LogCaptureFixture) -> tuple[list[str], int, str]:
    """The holder on a true clock runs ``holder``; then a claimer ``ahead`` seconds ahead claims while
    the holder's heartbeat renews four times (or until it takes the lease over). Returns who started the
    activity, the claimer's take-overs, and the result."""
    started: list[str] = []
    release = asyncio.Event()
    holder_app = build(url, skew=0.0, started=started, release=release)
    claimer = build(url, skew=ahead, started=started, release=release)
    async with holder_app:
        renewals = counting(holder_app, "renew")
        handle = await holder_app.workflows["holder"].start_with_id("held")
        await wait_until(lambda: started == [holder_app.worker_id], "the holder to run the activity")
        with caplog.at_level(logging.WARNING, logger="geste.worker"):
            async with claimer:
                claims = counting(claimer, "claim")
                since = renewals()

                def takeovers() -> int:
                    return sum(claimer.metrics.lease_takeovers.values.values())

                await wait_until(
                    lambda: renewals() >= since + 4 or takeovers(), "four renewals or a take-over", timeout=30
                )
                assert claims() >= 1 if takeovers() else claims() >= 4  # the claimer looked all along
                taken = takeovers()
                release.set()
                result = await handle.result(timeout=30)
    return started, taken, result


async def test_a_claimer_ahead_by_less_than_two_thirds_of_a_lease_takes_no_live_lease(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    started, takeovers, result = await run(db_url, 0.4, caplog)
    assert takeovers == 0
    assert started == ["skew+0.0"] and result == "skew+0.0"  # ran once, by its holder
    assert "off the database's" not in caplog.text  # within the tolerance: no warning


async def test_a_claimer_ahead_by_more_than_a_lease_takes_a_live_lease_and_the_result_is_recorded_once(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    started, takeovers, result = await run(db_url, 2 * LOCK, caplog)
    assert takeovers >= 1
    assert started[0] == "skew+0.0" and "skew+3.0" in started  # run again while its holder lived
    assert result in ("skew+0.0", "skew+3.0")
    said = re.search(r"worker skew\+3\.0: its clock is ([-+][0-9.]+)s off the database's", caplog.text)
    assert said is not None and abs(float(said.group(1)) - 3.0) < 0.5, caplog.text  # it said so at start
