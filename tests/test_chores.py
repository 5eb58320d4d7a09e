"""Each periodic chore runs in one worker of the cluster at a time (issue 15), on both backends.

The rules of ``geste_chores`` on one storage with explicit clocks: the holder takes each round when it is
due, another worker only once the holder is a round late or gave the chore back. Then worker processes
on one database (``tests/apps/chores_app.py``, chores every 0.3 s and 0.5 s): while two live, every round
of each chore is taken once (consecutive rounds a whole interval apart, by the database's rule, whoever
takes them), and runs in the worker that took it; the holder killed, the other takes over, a round late
and not sooner; the holder stopped, another takes over and the row shows the chore given back.
Every wait is for a condition (a log line, a process's exit) with a deadline; never a sleep.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import geste
from geste.runtime import chores

from .processes import WorkerProcesses
from .support import raw_query, wait_until

REWAKE = 0.3
CLEANUP = 0.5
INTERVALS = {chores.REWAKE: REWAKE, chores.CLEANUP: CLEANUP}


# -- the rules, on one storage ------------------------------------------------------------------------------
async def test_the_holder_takes_each_round_and_another_only_once_it_is_late_or_gave_it_back(
    db_url: str,
) -> None:
    async with geste.App(db_url, run_worker=False) as app:
        storage = app.storage

        async def take(worker: str, now: float) -> tuple[bool, float, str | None]:
            turn = await storage.chore_take("c", worker, now, interval=5.0, grace=5.0)
            return turn.taken, turn.next_at, turn.holder

        assert await take("A", 100.0) == (True, 105.0, "A")  # the first look of all takes it
        assert await take("B", 100.0) == (False, 105.0, "A")  # not due
        assert await take("A", 104.9) == (False, 105.0, "A")
        assert await take("B", 105.0) == (False, 105.0, "A")  # due, but A holds it and is not late
        assert await take("A", 105.0) == (True, 110.0, "A")  # the holder's round
        assert await take("B", 114.9) == (False, 110.0, "A")  # A is late, not yet by a round
        assert await take("B", 115.0) == (True, 120.0, "B")  # a round late: B takes it over
        assert await take("A", 120.0) == (False, 120.0, "B")  # A came back: B holds it now
        assert await take("B", 120.0) == (True, 125.0, "B")
        await storage.chore_release("B")  # B stops
        assert await take("A", 124.9) == (False, 125.0, None)
        assert await take("A", 125.0) == (True, 130.0, "A")  # given back: taken at its round, not later
        await storage.chore_release("B")  # releases only what B holds
        assert await take("A", 130.0) == (True, 135.0, "A")
        rows = await raw_query(db_url, "SELECT chore, holder, next_at, taken_at FROM geste_chores")
        assert rows == [{"chore": "c", "holder": "A", "next_at": 135.0, "taken_at": 130.0}]


# -- worker processes ----------------------------------------------------------------------------------------
class Workers(WorkerProcesses):
    """Worker processes of ``tests/apps/chores_app.py`` on one database, logging to one file."""

    def __init__(self, folder: Path, url: str) -> None:
        super().__init__(folder, url, "chores_app", options={"rewake": REWAKE, "cleanup": CLEANUP})

    def takes(self, chore: str, **where: Any) -> list[dict[str, Any]]:
        return sorted(self.entries(event="taken", chore=chore, **where), key=lambda e: e["taken_at"])

    async def rounds(self, count: int, *, after: float, by: str | None = None) -> None:
        """Wait until each chore has ``count`` rounds taken after ``after`` (by ``by``, if given)."""

        def enough() -> bool:
            where = {} if by is None else {"worker": by}
            return all(
                len([e for e in self.takes(chore, **where) if e["taken_at"] > after]) >= count
                for chore in INTERVALS
            )

        await wait_until(
            enough, f"{count} rounds of each chore after {after}" + (f" by {by}" if by else ""), 60
        )


def assert_once_a_round(workers: Workers) -> None:
    """Consecutive rounds of each chore, whoever took them, are a whole interval apart (the database lets
    nobody take a round before it is due), and each round taken ran the chore's statements in its worker."""
    log = workers.entries()
    for chore, interval in INTERVALS.items():
        takes = workers.takes(chore)
        gaps = [b["taken_at"] - a["taken_at"] for a, b in itertools.pairwise(takes)]
        assert gaps and min(gaps) >= interval - 1e-6, (chore, [(e["worker"], e["taken_at"]) for e in takes])
        for worker in {e["worker"] for e in takes}:
            ran = [e for e in log if e["event"] == "ran" and e["chore"] == chore and e["worker"] == worker]
            taken = [e for e in takes if e["worker"] == worker]
            assert len(taken) - 1 <= len(ran) <= len(taken), (chore, worker, len(taken), len(ran))


@pytest.fixture
async def workers(tmp_path: Path, db_url: str) -> AsyncIterator[Workers]:
    async with geste.App(db_url, run_worker=False):  # migrated once, before the processes start
        pass
    with Workers(tmp_path, db_url) as group:
        yield group


async def test_two_worker_processes_run_each_chore_once_a_round_and_replace_a_killed_or_stopped_holder(
    workers: Workers, db_url: str
) -> None:
    await workers.spawn("w1")
    await workers.spawn("w2")
    await workers.rounds(6, after=time.time())
    assert_once_a_round(workers)

    # the holder of the last re-wake round is killed: the other takes over, a whole round late
    holder = workers.takes(chores.REWAKE)[-1]["worker"]
    other = "w2" if holder == "w1" else "w1"
    workers.by_id[holder].kill()
    workers.by_id[holder].wait()
    killed_at = time.time()
    await workers.rounds(3, after=killed_at, by=other)
    assert_once_a_round(workers)
    for chore, interval in INTERVALS.items():
        last = [e for e in workers.takes(chore) if e["worker"] == holder][-1]
        first = next(e for e in workers.takes(chore, worker=other) if e["taken_at"] > last["taken_at"])
        if first["taken_at"] > killed_at:  # the killed holder still held the chore: taken over, a round late
            assert first["taken_at"] >= last["next_at"] + interval - 1e-6, (chore, last, first)

    # a third worker comes, the survivor stops gracefully: it gives its chores back, the third takes them
    await workers.spawn("w3")
    await workers.rounds(2, after=time.time())
    workers.by_id[other].send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(workers.by_id[other].wait, 30) == 0
    stopped_at = time.time()
    rows = await raw_query(db_url, "SELECT chore, holder FROM geste_chores ORDER BY chore")
    assert {r["chore"] for r in rows} == set(INTERVALS)
    assert all(r["holder"] in (None, "w3") for r in rows), rows  # given back (or taken by w3 since)
    await workers.rounds(3, after=stopped_at, by="w3")
    assert_once_a_round(workers)
