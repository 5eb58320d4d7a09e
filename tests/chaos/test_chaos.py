"""The chaos suite at CI size: a few hundred workflows on worker processes under faults, then the checker.

The long mode is ``python -m tests.chaos --long --runs 10`` (README, "Proof under faults").
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .controller import ChaosConfig
from .run import run_chaos


@pytest.mark.timeout(600)
async def test_postgres_workers_killed_disconnected_and_a_server_restart_lose_nothing(
    pg_url: str, tmp_path: Path
) -> None:
    print(await run_chaos(pg_url, tmp_path, ChaosConfig.short()))


@pytest.mark.timeout(600)
async def test_sqlite_workers_killed_lose_nothing(tmp_path: Path) -> None:
    config = ChaosConfig.short(orders=150, listeners=2, competitors=2, jobs=30)
    print(await run_chaos(f"sqlite:///{tmp_path / 'geste.db'}", tmp_path, config))
