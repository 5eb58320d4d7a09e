"""A schedule ticking each second of the real clock, 4 worker processes on one database, one killed with
SIGKILL at a tick: every tick of the run starts exactly once, none is lost, none twice.

The workers run ``tests/apps/schedules_app.py`` (the shared harness, ``tests/processes.py``). The victim's
schedule write hangs at a tick (``before`` it writes it, ``inside`` its transaction, after the move of the
tick and the insert of its instance and before the commit, or ``after`` it committed it) and the test
kills it there; the three others go on. On PostgreSQL the victim's server process, asleep in the
transaction, is then terminated, as the server does once it sees the client gone (the others wait on the
schedule's row lock until then). Every wait is for a condition (a marker file, a row), with a deadline.
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest

from geste._schedules import instance_id

from .apps.schedules_app import HANG_SQL, SCHEDULE
from .processes import WorkerProcesses, worker_processes
from .support import raw_query, wait_until

WORKERS = 4
HANG_AT = 3
"""The victim hangs at its third tick write (or the first it wins from then on): a few ticks into the run."""
TICKS_AFTER_KILL = 5

workers = worker_processes("schedules_app")


async def started_ids(url: str) -> list[str]:
    rows = await raw_query(
        url,
        "SELECT instance_id FROM geste_instances WHERE instance_id LIKE $1 ORDER BY instance_id",
        f"sched:{SCHEDULE}:%",
    )
    return [row["instance_id"] for row in rows]


def tick_of(iid: str) -> float:
    return datetime.fromisoformat(iid.removeprefix(f"sched:{SCHEDULE}:")).timestamp()


@pytest.mark.parametrize("point", ["before", "inside", "after"])
async def test_a_worker_killed_at_a_tick_every_tick_starts_exactly_once(
    workers: WorkerProcesses, db_url: str, point: str
) -> None:
    async with workers.client() as client:  # creates the schema and the schedule
        for n in range(WORKERS - 1):
            await workers.spawn(f"w{n}")
        victim = await workers.spawn("victim", hang_at=HANG_AT, hang=point)

        hung = workers.markers / "hung-victim"
        await wait_until(hung.exists, "the victim to hang at a tick", timeout=60)
        sleeping: list[dict[str, int]] = []
        schema = parse_qs(urlsplit(db_url).query).get("schema", [""])[0]
        if point == "inside" and not db_url.startswith("sqlite"):
            sleeping = await wait_until(
                lambda: raw_query(
                    db_url,
                    "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
                    f'%"{schema}".geste_schedules%{HANG_SQL}%',
                ),
                "the victim's transaction to sleep",
            )
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=10) == -signal.SIGKILL
        for backend in sleeping:
            await raw_query(db_url, "SELECT pg_terminate_backend($1)", backend["pid"])
        killed_at = time.time()
        at_kill = json.loads(hung.read_text())

        async def ticks_after_kill() -> datetime | None:
            (info,) = await client.list_schedules()
            last = info.last_tick
            return last if last is not None and last.timestamp() >= killed_at + TICKS_AFTER_KILL else None

        end = await wait_until(ticks_after_kill, "ticks after the kill", timeout=60)
        for proc in workers.procs:
            assert proc.poll() is None or proc is victim, workers.output(proc)

        found = await started_ids(db_url)
        assert len(found) == len(set(found))  # none twice
        first = min(tick_of(iid) for iid in found)
        window = [iid for iid in found if tick_of(iid) <= end.timestamp()]
        expected = [
            instance_id(SCHEDULE, tick) for tick in range(int(first), int(end.timestamp()) + 1)
        ]  # each second from the first tick to the last seen: none lost
        assert window == expected
        assert len(window) >= HANG_AT + TICKS_AFTER_KILL
        assert set(at_kill) <= set(window)  # the tick the victim died at: started (by it, or another)
        for iid in window:  # the victim's leases run out: the others run what it held
            assert await client.get_handle(iid).result(timeout=60) == "ticked"
        assert all(datetime.fromtimestamp(tick_of(i), UTC).microsecond == 0 for i in found)


queued = worker_processes("schedules_app", name="queued", options={"overlap": "queue", "run_seconds": 1.5})
RUNS_BEFORE_KILL = 2
RUNS_AFTER_KILL = 4


async def test_overlap_queue_across_four_workers_one_killed_mid_run(
    queued: WorkerProcesses, db_url: str
) -> None:
    """``overlap="queue"``, a tick each second, runs of 1.5 s: 4 worker processes race for the ticks and
    for the releases; the worker running a scheduled run is killed with SIGKILL, its run taken over once
    its lease ends. Every tick of the run is started once or still waits, in tick order, and no run
    starts before the previous one ended (the activity log's times, one machine's clock)."""
    async with queued.client(overlap="queue", run_seconds=1.5):  # creates the schema and the schedule
        for n in range(WORKERS):
            await queued.spawn(f"w{n}")
        await wait_until(
            lambda: len(queued.entries(event="end")) >= RUNS_BEFORE_KILL, "runs before the kill", timeout=60
        )

        def running() -> dict[str, object] | None:
            ended = {entry["instance"] for entry in queued.entries(event="end")}
            unended = [entry for entry in queued.entries(event="start") if entry["instance"] not in ended]
            return unended[-1] if unended else None

        holder = await wait_until(running, "a run to kill", timeout=30)
        victim = queued.by_id[str(holder["worker"])]
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=10) == -signal.SIGKILL
        await wait_until(
            lambda: holder["instance"] in {entry["instance"] for entry in queued.entries(event="end")},
            "the killed run to be taken over and end",
            timeout=60,
        )
        ends = len(queued.entries(event="end"))
        await wait_until(
            lambda: len(queued.entries(event="end")) >= ends + RUNS_AFTER_KILL,
            "runs after the kill",
            timeout=60,
        )
        for proc in queued.procs:
            assert proc.poll() is None or proc is victim, queued.output(proc)
    queued.stop_all()  # nothing moves while the database is read

    found = await started_ids(db_url)
    (row,) = await raw_query(
        db_url, "SELECT next_tick, waiting FROM geste_schedules WHERE name = $1", SCHEDULE
    )
    waits = await raw_query(db_url, "SELECT tick FROM geste_schedule_waiting WHERE name = $1", SCHEDULE)
    waiting = sorted(float(w["tick"]) for w in waits)
    assert row["waiting"] == len(waiting) > 0  # the runs are slower than the ticks: a backlog
    started = sorted(tick_of(iid) for iid in found)
    assert len(started) == len(set(started)) >= RUNS_BEFORE_KILL + RUNS_AFTER_KILL
    assert max(started) < min(waiting)  # released in tick order
    first = int(started[0])
    assert [*started, *waiting] == [float(t) for t in range(first, int(row["next_tick"]))]  # none lost

    by_instance: dict[str, list[dict[str, object]]] = {}
    for entry in queued.entries(event="start") + queued.entries(event="end"):
        by_instance.setdefault(str(entry["instance"]), []).append(entry)
    order = sorted(found, key=tick_of)
    assert set(by_instance) <= set(order)
    for before, after in itertools.pairwise(order):
        ended = [float(e["t"]) for e in by_instance.get(before, []) if e["event"] == "end"]
        began = [float(e["t"]) for e in by_instance.get(after, []) if e["event"] == "start"]
        if began:
            assert ended and min(began) >= max(ended), (before, after)  # never two runs at once
