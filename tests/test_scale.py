"""``benchmarks/scale.py``'s own parts at CI size: counts, not times.

Its other parts are ``herd.measure``, ``event_matching.event_wakeup`` and ``loaded_claims``' functions,
tested with what they measure (``test_routing``, ``test_event_matching``, ``test_held_leases``,
``test_chore_costs``); these are the channel subscribers' wake-up and the chores' rounds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import geste

from .support import raw_query

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def scale() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import scale

        yield scale
    finally:
        sys.path.remove(str(BENCHMARKS))


async def test_a_publish_wakes_the_measured_receiver_among_seeded_subscribers(
    scale: ModuleType, pg_url: str
) -> None:
    """200 seeded competing subscribers, all waiting: each of the 4 publishes wakes the measured
    receiver (the one idle the longest), in the worker process, which takes it; the seeded ones still
    wait, and the re-wake chore finds nothing to wake."""
    sample = await scale.channel_wakeup(pg_url, 200, samples=3, warmup=1)
    assert sample.waiters == 200 and len(sample.wakeups) == len(sample.sends) == 3
    assert all(value > 0 for value in (*sample.sends, *sample.wakeups))
    messages = await raw_query(pg_url, "SELECT claimed_by FROM geste_channel_messages")
    (receiver,) = {m["claimed_by"] for m in messages}
    assert len(messages) == 4 and not receiver.startswith("sub-")
    waiting = await raw_query(
        pg_url, "SELECT count(*) AS n FROM geste_channel_subscriptions WHERE waiting_since IS NOT NULL"
    )
    assert waiting[0]["n"] == 200
    async with geste.App(pg_url, run_worker=False) as app:
        assert await scale.maintenance(app).rewake() == []


async def test_the_chores_rounds_on_a_seeded_database_find_nothing_due(
    scale: ModuleType, db_url: str
) -> None:
    """The chores part's seed (500 finished instances, 20 held, 300 rows per table) and 3 rounds of each
    chore: a time for each, and nothing deleted nor woken (the seed holds nothing due)."""
    await scale.seed_chores(db_url, rows=300, finished=500, held=20)
    tables = ["geste_instances", *scale.SEEDED[1:]]

    async def counts() -> dict[str, int]:
        return {t: (await raw_query(db_url, f"SELECT count(*) AS n FROM {t}"))[0]["n"] for t in tables}

    before = await counts()
    assert before["geste_instances"] == 500 + 20 + 300 and before["geste_outbox"] == 300
    medians = await scale.chore_rounds(db_url, 3)
    assert set(medians) == set(scale.CHORES) and all(ms > 0 for ms in medians.values())
    assert await counts() == before
    runnable = await raw_query(
        db_url,
        "SELECT count(*) AS n FROM geste_instances WHERE instance_id LIKE 'sub-%' AND run_at IS NOT NULL",
    )
    assert runnable[0]["n"] == 0
