"""The geste side of the peer comparison (benchmarks/peers/geste_scenarios.py) at a tiny size.

Each scenario runs as compare.py runs it: a subprocess on a fresh PostgreSQL database of its own
(``geste_bench_test_<random>``, on the server of ``GESTE_TEST_POSTGRES_URL``), printing one RESULT line.
No peer is needed and nothing is installed; the report code of compare.py is checked on made-up results.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import POSTGRES_URL

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "peers" / "geste_scenarios.py"
SERVER = POSTGRES_URL.rsplit("/", 1)[0]


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(f"{SERVER}/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def database() -> Iterator[str]:
    name = f"geste_bench_test_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{SERVER}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def run(scenario: str, db: str, *options: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), scenario, "--db", db, *options],
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["system"] == "geste" and result["scenario"] == scenario
    return dict(result)


def query(db: str, sql: str) -> list[tuple[Any, ...]]:
    """What the scenario left in its database, read behind its back (PostgreSQL or SQLite)."""
    if db.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(db[len("sqlite:///") :])) as conn:
            return [tuple(row) for row in conn.execute(sql).fetchall()]

    async def fetch() -> list[tuple[Any, ...]]:
        import asyncpg

        conn = await asyncpg.connect(db)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def steps_match_history(db: str) -> bool:
    """Every instance's ``steps`` counts its history rows."""
    return not query(
        db,
        "SELECT i.instance_id FROM geste_instances i "
        "WHERE i.steps <> (SELECT count(*) FROM geste_history h WHERE h.instance_id = i.instance_id)",
    )


def assert_three_step_workflows_done(db: str, count: int) -> None:
    """``count`` three_steps instances completed, each with its right result and three activity rows."""
    done = query(db, "SELECT workflow_name, status, result FROM geste_instances")
    assert sorted(int(result) for _, _, result in done) == [i + 3 for i in range(count)]
    assert {(name, status) for name, status, _ in done} == {("three_steps", "completed")}
    assert query(db, "SELECT kind, count(*) FROM geste_history GROUP BY kind") == [("activity", 3 * count)]
    assert steps_match_history(db)


def assert_rate_consistent(out: dict[str, Any]) -> None:
    assert out["seconds"] > 0 and out["cpu_ms_per_workflow"] > 0
    assert out["workflows_per_s"] == pytest.approx(out["instances"] / out["seconds"])


def test_throughput(database: str) -> None:
    run("setup", database)
    assert query(database, "SELECT count(*) FROM geste_instances") == [(0,)]  # setup ran no workflow
    out = run("throughput", database, "--instances", "20")
    assert out["instances"] == 20
    assert_rate_consistent(out)
    assert_three_step_workflows_done(database, 20)


def test_throughput_on_sqlite(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'bench.db'}"
    out = run("throughput", db, "--instances", "20")
    assert out["instances"] == 20
    assert_rate_consistent(out)
    assert_three_step_workflows_done(db, 20)


def test_throughput_with_worker_processes(database: str) -> None:
    out = run("throughput_workers", database, "--instances", "20", "--workers", "2")
    assert out["workers"] == 2 and out["instances"] == 20
    assert_rate_consistent(out)
    # the workers' whole lives (start-up included) against the window of the run
    assert out["cpu_ms_per_workflow"] >= out["cpu_ms_per_workflow_window"] > 0
    assert_three_step_workflows_done(database, 20)
    workers = query(database, "SELECT DISTINCT locked_by FROM geste_instances")
    assert workers == [(None,)]  # every lease given back


def test_wakeup(database: str) -> None:
    out = run("wakeup", database, "--samples", "3")
    assert out["n"] == 3 and out["timeouts_40s"] == 0
    assert 0 < out["p50_ms"] <= out["p99_ms"] <= out["max_ms"]
    # one waiter (10 rounds each) woken three times by an event, each delivered once
    waiters = query(database, "SELECT workflow_name, status FROM geste_instances")
    assert waiters == [("waiter", "waiting")]
    assert query(database, "SELECT count(*) FROM geste_history WHERE kind = 'event'") == [(3,)]
    assert steps_match_history(database)


def test_sleep(database: str) -> None:
    out = run("sleep", database, "--sleepers", "5", "--sleep", "0.05")
    assert out["n"] == 5  # every sleeper reported how late it woke
    assert 0 <= out["p50_ms"] <= out["p99_ms"] <= out["max_ms"]
    assert query(database, "SELECT workflow_name, status, count(*) FROM geste_instances GROUP BY 1, 2") == [
        ("sleeper", "completed", 5)
    ]
    kinds = query(database, "SELECT kind, count(*) FROM geste_history GROUP BY kind ORDER BY kind")
    assert kinds == [("now", 5), ("sleep", 5)]
    assert steps_match_history(database)


def test_idle(database: str) -> None:
    out = run("idle", database, "--waiting", "20", "--idle-seconds", "1", "--settle", "0")
    assert out["waiting"] == 20 and out["rss_mib"] > 10 and out["setup_s"] > 0
    net, raw, control = out["transactions_per_min"], out["transactions_per_min_raw"], out["control_per_min"]
    assert raw >= 0 and control >= 0 and net == pytest.approx(raw - control)
    # the waiting workflows were really there, none of them finished (SIGKILLed while they wait)
    idlers = query(
        database, "SELECT workflow_name, count(*) FROM geste_instances WHERE finished_at IS NULL GROUP BY 1"
    )
    assert idlers == [("idler", 20)]
    assert query(database, "SELECT count(*) FROM geste_instances") == [(20,)]


def test_replay(database: str) -> None:
    out = run("replay", database, "--steps", "3")
    assert out["steps"] == 3 and out["from_start_ms"] > 0 and out["from_event_ms"] > 0
    # the instance killed while waiting ended in the second process, its three steps replayed, not re-run
    assert query(database, "SELECT workflow_name, status, result FROM geste_instances") == [
        ("long_history", "completed", "3")
    ]
    kinds = query(database, "SELECT kind FROM geste_history ORDER BY seq")
    assert kinds == [("activity",), ("activity",), ("activity",), ("wait_event",), ("event",)]
    assert steps_match_history(database)


def test_compare_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """compare.py's table from made-up results: medians, ratios, n/a with its reason, failures."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compare
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    scenarios = "throughput,throughput_workers"
    args = compare.argparse.Namespace(quick=True, systems="geste,dbos,edda", scenarios=scenarios)
    chosen = compare.cases(args)
    assert [c.key for c in chosen] == ["throughput_pg", "throughput_workers_pg", "throughput_sqlite"]
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for case in chosen:
        raw[case.key] = {e.name: [] for e in case.entrants}
    for rate in (100, 300, 200):
        raw["throughput_pg"]["geste"].append({"workflows_per_s": rate, "cpu_ms_per_workflow": 1.0})
        raw["throughput_pg"]["dbos"].append({"workflows_per_s": rate / 2, "cpu_ms_per_workflow": 4.0})
    raw["throughput_pg"]["edda"].append({"error": "RuntimeError: boom"})
    raw["throughput_workers_pg"]["edda"].append({"na": "no queue"})
    rows = compare.summarise(chosen, raw)
    first = rows[0]
    assert first["values"]["geste"] == 200 and first["values"]["dbos"] == 100
    assert first["na"]["edda"].startswith("failed: RuntimeError")
    workers = next(r for r in rows if r["case"] == "throughput_workers_pg")
    assert workers["na"]["edda"] == "no queue"
    compare.print_table(rows, [compare.GESTE, compare.DBOS, compare.DBOS_THREADS, compare.EDDA], 3)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("case / metric")).split()
    assert header[3:] == [
        "geste",
        "dbos",
        "dbos-threads",
        "edda",
        "geste/dbos",
        "geste/dbos-threads",
        "geste/edda",
    ]
    table = [line.split() for line in lines if line.startswith("  ") and not line.startswith("  samples")]
    # the first case's rows: geste's and DBOS's medians and the ratio geste / DBOS (n/a: no run, failed)
    assert table[0] == ["workflows/s", "200", "100", "n/a", "n/a", "2", "nan", "nan"]
    assert table[2] == [
        "client",
        "CPU",
        "per",
        "workflow",
        "(ms)",
        "1.00",
        "4.00",
        "n/a",
        "n/a",
        "0.25",
        "nan",
        "nan",
    ]
    notes = lines[lines.index("n/a:") + 1 :]
    assert "  edda: failed: RuntimeError: boom" in notes and "  edda: no queue" in notes


def test_child_benchmark_smoke() -> None:
    """benchmarks/child.py at a tiny size on both backends: a parent here, its child in a worker process."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "child.py"), "--samples", "3", "--postgres", POSTGRES_URL],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stderr[-3000:]
    results = json.loads(lines[0][len("RESULT ") :])["results"]
    assert [r["backend"] for r in results] == ["postgres", "sqlite"]
    for key in ("", "end_to_end_"):
        assert all(
            r["n"] == 3 and 0 < r[f"{key}p50_ms"] <= r[f"{key}p90_ms"] <= r[f"{key}p99_ms"] for r in results
        )
    assert all(r["p50_ms"] < r["end_to_end_p50_ms"] for r in results)  # the parent's part of the whole
    assert "round trip in the parent  over 3 samples: p50" in proc.stdout
    assert "end to end                over 3 samples: p50" in proc.stdout


def test_queue_benchmark_smoke() -> None:
    """benchmarks/queues.py at a tiny size: 2 worker processes, a backlog of 40 per queue, 3 starts each."""
    sizes = ["--runs", "1", "--workers", "2", "--backlog", "40", "--starts", "3", "--settle", "1"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "queues.py"), *sizes],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "GESTE_BENCH_POSTGRES_SERVER": SERVER},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stderr[-3000:]
    medians = json.loads(lines[0][len("RESULT ") :])["medians"]
    assert set(medians) == {"limited", "free"}
    for figures in medians.values():
        assert figures["admissions_per_s"] > 0 and figures["admitted_per_claim"] >= 1
        assert 0 < figures["p50_ms"] <= figures["p90_ms"] and figures["queue_claims_per_start"] >= 1
    assert "limited (50)" in proc.stdout and "free (none)" in proc.stdout
