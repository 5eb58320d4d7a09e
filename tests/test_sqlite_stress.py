"""SQLite under stress: a full disk, and several processes on one file under load.

- A full disk: a worker process whose file-size limit (``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored: the write
  fails with ``EFBIG`` as on a full disk) stops its writes. Its client calls raise
  ``geste.errors.StorageError`` saying what happened, its worker loops survive, the database passes
  ``PRAGMA integrity_check``, and everything completes once space returns (``tests/apps/full_disk_app.py``).
- Several processes: six worker processes with one-second leases and the test's own client on one file,
  a load of short workflows writing all the time and long activities (2.5 s, held only by renewals):
  no ``database is locked`` reaches a client call or a worker's log, no lease is lost between live
  workers (counted in their logs), and each long activity runs once. Before the fix it failed one run
  in two: a renewal that came just after a run's own end (its commit) took the lease it gave back for a
  lost one ("lease lost", and a cancel of the ending run); ``Worker._taken`` now reads who holds it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import geste
from tests.apps.crash_app import build_app

from .processes import ROOT, Cluster

PROCESSES = 6
WAVE = 150
"""Workflows started at once, six times (three activities each): every process's queue of writes is long."""
LONG = 2.5
"""Seconds a long activity runs: past two leases of one second, so only renewals keep it."""


def integrity(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    conn.close()
    return rows


async def test_a_full_disk_raises_a_storage_error_corrupts_nothing_and_work_resumes(tmp_path: Path) -> None:
    path = tmp_path / "geste.db"
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tests.apps.full_disk_app", str(path)],
        cwd=ROOT,
        capture_output=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    out = json.loads(done.stdout)
    assert len(out["errors"]) == 3, out
    for error_type, message in out["errors"]:
        assert error_type == "geste.errors.StorageError", (error_type, message)
        assert "disk is full or a file-size limit" in message, message
    assert out["after"] == 1000
    assert out["statuses"] == {"completed": 2 + len(out["started"])}, out  # "before", "after", the rest
    assert integrity(path) == ["ok"]
    log = done.stderr.decode(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert "storage failed (SQLite error" in log and "the disk is full" in log, log[-3000:]  # the worker too


@pytest.mark.timeout(300)
async def test_six_processes_on_one_file_under_load_no_locked_error_no_lease_lost(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'geste.db'}"
    cluster = Cluster(tmp_path, url)
    client = build_app(url, run_worker=False, poll_interval=0.05)
    batch, long = client.workflows["batch"], client.workflows["long"]
    errors: list[BaseException] = []

    async def call(coro: object) -> object:
        try:
            return await coro  # type: ignore[misc]
        except geste.errors.GesteError as exc:
            errors.append(exc)
            raise

    try:
        for k in range(PROCESSES):
            await cluster.spawn(f"w{k}", lock_timeout=1.0, poll_interval=0.05)
        async with client:
            longs = [await call(long.start_with_id(f"long-{n}", LONG)) for n in range(12)]
            batches = []
            for wave in range(6):
                batches += await asyncio.gather(
                    *(call(batch.start_with_id(f"batch-{wave}-{n}", n)) for n in range(WAVE))
                )
                await asyncio.gather(*(call(h.result(timeout=120)) for h in batches[-WAVE:]))
            results = await asyncio.gather(*(call(h.result(timeout=120)) for h in longs + batches))
        assert not errors, errors[:3]
        assert results[:12] == ["slow+one:0"] * 12
        assert len(results) == 12 + 6 * WAVE
        slow = cluster.entries(activity="slow")
        assert sorted(e["instance"] for e in slow) == sorted(f"long-{n}" for n in range(12))  # once each
        logs = "".join(cluster.output(p) for p in cluster.procs)
        assert logs.count("lease lost") == 0, logs[-3000:]
        assert logs.count("database is locked") == 0, logs[-3000:]
        assert "Traceback" not in logs, logs[-3000:]
        assert integrity(tmp_path / "geste.db") == ["ok"]
    finally:
        cluster.stop_all()
