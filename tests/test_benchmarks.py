"""The geste side of the peer comparison (benchmarks/peers/geste_scenarios.py) at a tiny size.

Each scenario runs as compare.py runs it: a subprocess on a fresh PostgreSQL database of its own
(``geste_bench_test_<random>``, on the server of ``GESTE_TEST_POSTGRES_URL``), printing one RESULT line.
No peer is needed and nothing is installed; the report code of compare.py is checked on made-up results.
"""

from __future__ import annotations

import asyncio
import json
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


def test_throughput(database: str) -> None:
    run("setup", database)
    out = run("throughput", database, "--instances", "20")
    assert out["instances"] == 20 and out["workflows_per_s"] > 0 and out["cpu_ms_per_workflow"] > 0


def test_throughput_on_sqlite(tmp_path: Path) -> None:
    out = run("throughput", f"sqlite:///{tmp_path / 'bench.db'}", "--instances", "20")
    assert out["workflows_per_s"] > 0


def test_throughput_with_worker_processes(database: str) -> None:
    out = run("throughput_workers", database, "--instances", "20", "--workers", "2")
    assert out["workers"] == 2 and out["workflows_per_s"] > 0 and out["cpu_ms_per_workflow"] > 0


def test_wakeup(database: str) -> None:
    out = run("wakeup", database, "--samples", "3")
    assert out["n"] == 3 and out["timeouts_40s"] == 0
    assert 0 < out["p50_ms"] <= out["p99_ms"] < 5000


def test_sleep(database: str) -> None:
    out = run("sleep", database, "--sleepers", "5", "--sleep", "0.05")
    assert out["n"] == 5 and out["p50_ms"] >= 0


def test_idle(database: str) -> None:
    out = run("idle", database, "--waiting", "20", "--idle-seconds", "1", "--settle", "0")
    assert out["waiting"] == 20 and out["rss_mib"] > 10
    assert out["transactions_per_min"] is not None and out["transactions_per_min_raw"] >= 0


def test_replay(database: str) -> None:
    out = run("replay", database, "--steps", "3")
    assert out["steps"] == 3 and out["from_start_ms"] > 0 and out["from_event_ms"] > 0


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
    printed = capsys.readouterr().out
    assert "2" in printed and "no queue" in printed and "geste/dbos" in printed
