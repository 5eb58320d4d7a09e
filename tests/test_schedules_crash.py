"""A schedule ticking each second of the real clock, 4 worker processes on one database, one killed with
SIGKILL at a tick: every tick of the run starts exactly once, none is lost, none twice.

The workers run ``tests/apps/schedules_app.py`` (the pattern of ``tests/test_crash.py``). The victim's
schedule write hangs at a tick (``before`` it writes it, ``inside`` its transaction, after the move of the
tick and the insert of its instance and before the commit, or ``after`` it committed it) and the test
kills it there; the three others go on. On PostgreSQL the victim's server process, asleep in the
transaction, is then terminated, as the server does once it sees the client gone (the others wait on the
schedule's row lock until then). Every wait is for a condition (a marker file, a row), with a deadline.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from geste._schedules import instance_id

from .conftest import die_with_parent
from .support import raw_query, wait_until

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `tests.apps` is importable however pytest was started
    sys.path.insert(0, str(ROOT))

from tests.apps.schedules_app import HANG_SQL, SCHEDULE, build_app  # noqa: E402

WORKERS = 4
HANG_AT = 3
"""The victim hangs at its third tick write (or the first it wins from then on): a few ticks into the run."""
TICKS_AFTER_KILL = 5


class Workers:
    """The worker processes of one test, on one database; all killed at the end."""

    def __init__(self, folder: Path, url: str) -> None:
        self.folder, self.url = folder, url
        self.markers = folder / "markers"
        self.markers.mkdir()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, worker_id: str, *options: str) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable,
            "-m",
            "tests.apps.schedules_app",
            self.url,
            f"--worker-id={worker_id}",
            f"--markers={self.markers}",
            *options,
        ]
        with (self.folder / f"worker-{worker_id}.out").open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            )
        self.procs[worker_id] = proc
        return proc

    def output(self, worker_id: str) -> str:
        return (self.folder / f"worker-{worker_id}.out").read_text(errors="replace")

    def ready(self) -> bool:
        for worker_id, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"worker {worker_id} exited:\n{self.output(worker_id)}")
        return all((self.markers / f"ready-{w}").exists() for w in self.procs)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
async def workers(tmp_path: Path, db_url: str) -> AsyncIterator[Workers]:
    group = Workers(tmp_path, db_url)
    try:
        yield group
    finally:
        group.stop_all()


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
    workers: Workers, db_url: str, point: str
) -> None:
    async with build_app(db_url, run_worker=False) as client:  # creates the schema and the schedule
        for n in range(WORKERS - 1):
            workers.spawn(f"w{n}")
        victim = workers.spawn("victim", f"--hang-at={HANG_AT}", f"--hang={point}")
        await wait_until(workers.ready, "the workers to be ready", timeout=60)

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
        for worker_id, proc in workers.procs.items():
            assert proc.poll() is None or worker_id == "victim", workers.output(worker_id)

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
