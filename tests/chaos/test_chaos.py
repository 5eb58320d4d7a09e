"""The chaos suite at CI size: a few hundred workflows on worker processes under faults, then the checker.

The long mode is ``python -m tests.chaos --long --runs 10`` (README, "Proof under faults"). The last tests
prove the checker is not vacuous: each kind of damage done by hand to a good run's results fails it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from .checker import CHECKS, check
from .controller import ChaosConfig
from .replica import ReplicatedPair
from .run import ChaosReport, run_chaos

KILLED = "worker SIGKILLed and restarted"


@pytest.mark.timeout(600)
async def test_postgres_workers_killed_disconnected_and_a_server_restart_lose_nothing(
    pg_url: str, tmp_path: Path
) -> None:
    report = await run_chaos(pg_url, tmp_path, ChaosConfig.short())
    print(report)
    faults = report.faults
    assert faults["PostgreSQL restarted"] == 1
    assert faults[KILLED] >= 3, faults
    terminated = sum(n for what, n in faults.items() if what.startswith("backends terminated"))
    assert terminated >= 3, faults


PAUSED = "worker paused (SIGSTOP) past its lease"


@pytest.mark.timeout(600)
async def test_postgres_workers_paused_and_partitioned_lose_nothing(pg_url: str, tmp_path: Path) -> None:
    """Workers stopped (SIGSTOP) past their lease and partitioned from PostgreSQL (stalled or cut
    connections) while they hold instances: the others take those over; resumed or healed, they record
    nothing of what they did meanwhile (the checker: nothing twice; a lost-lease line per pause that
    caught runs in flight), and work again."""
    config = ChaosConfig.short(
        orders=80, jobs=16, duration=8.0, faults=("pause", "partition"), restart_postgres=False
    )
    report = await run_chaos(pg_url, tmp_path, config)
    print(report)
    faults = report.faults
    assert faults[PAUSED] >= 1, faults  # each that caught runs in flight reported them: the checker
    partitions = sum(n for what, n in faults.items() if what.startswith("worker partitioned"))
    assert partitions >= 1 and faults["partitioned worker heartbeats again"] == partitions, faults


@pytest.mark.timeout(600)
async def test_postgres_through_pgbouncer_workers_killed_and_pooled_connections_dropped_lose_nothing(
    pg_url: str, tmp_path: Path
) -> None:
    """The workers' and the client's pools through PgBouncer in transaction mode, their listeners direct.
    The server is not restarted: the server connections behind PgBouncer are terminated (``terminate``)
    and PgBouncer itself crashes and restarts (``pgbouncer``) instead."""
    from ..conftest import POSTGRES_URL
    from ..pgbouncer import PgBouncer

    pooler = PgBouncer(POSTGRES_URL)  # its own: this run crashes it
    pooler.start()
    try:
        config = ChaosConfig.short(
            orders=150, restart_postgres=False, faults=("kill", "terminate", "pgbouncer")
        )
        report = await run_chaos(pg_url, tmp_path, config, pooler=pooler)
    finally:
        pooler.stop()
    print(report)
    faults = report.faults
    assert faults[KILLED] >= 1, faults  # each of the three drawn about 10 times
    assert faults["PgBouncer crashed and restarted"] >= 1, faults
    terminated = sum(n for what, n in faults.items() if what.startswith("backends terminated"))
    assert terminated >= 1, faults


@pytest.mark.timeout(600)
async def test_postgres_failover_to_a_promoted_standby_loses_no_acknowledged_step(tmp_path: Path) -> None:
    """A primary of the test's own, with a synchronous standby; the load through the multi-host URL;
    halfway, the primary SIGKILLed and the standby promoted (and workers killed, backends terminated)."""
    config = ChaosConfig.short(
        orders=120, duration=12.0, restart_postgres=False, faults=("kill", "terminate", "failover")
    )
    with ReplicatedPair() as pair:
        report = await run_chaos(pair.url(schema="chaos"), tmp_path, config, replicas=pair)
        assert pair.query(pair.standby, "SELECT pg_is_in_recovery()") == "f"
    print(report)
    assert report.faults["primary SIGKILLed"] == 1 and report.faults["standby promoted"] == 1, report.faults
    assert report.faults[KILLED] >= 2, report.faults  # the other faults go on around it


@pytest.mark.timeout(600)
async def test_sqlite_workers_killed_lose_nothing(tmp_path: Path) -> None:
    config = ChaosConfig.short(orders=150, listeners=2, competitors=2, jobs=30)
    report = await run_chaos(f"sqlite:///{tmp_path / 'geste.db'}", tmp_path, config)
    print(report)
    assert report.faults[KILLED] >= 5, report.faults


SKEWED_OUTAGE = {"skew": 2.0, "outage": 4.0, "duration": 10.0}
"""Every worker's clock off by up to ±2 s (with one-second leases: live leases are taken over), and the
outbox destination down for 4 s once (its back-off reaches its 0.5 s cap after 0.75 s)."""


def _check_skew_and_outage(report: ChaosReport) -> None:
    assert report.faults["outbox destination down"] == 1, report.faults
    assert "refused by the outage" in report.text  # deliveries were refused, then all were delivered
    assert "worker clocks skewed" in report.text


@pytest.mark.timeout(600)
async def test_postgres_clock_skew_and_a_destination_outage_lose_nothing(pg_url: str, tmp_path: Path) -> None:
    config = ChaosConfig.short(orders=100, restart_postgres=False, **SKEWED_OUTAGE)
    report = await run_chaos(pg_url, tmp_path, config)
    print(report)
    _check_skew_and_outage(report)
    assert report.faults[KILLED] >= 3, report.faults


@pytest.mark.timeout(600)
async def test_sqlite_clock_skew_and_a_destination_outage_lose_nothing(tmp_path: Path) -> None:
    config = ChaosConfig.short(orders=80, listeners=2, competitors=2, jobs=20, **SKEWED_OUTAGE)
    report = await run_chaos(f"sqlite:///{tmp_path / 'geste.db'}", tmp_path, config)
    print(report)
    _check_skew_and_outage(report)
    assert report.faults[KILLED] >= 3, report.faults


# -- the checker catches what it must --------------------------------------------------------------------
CALM = ChaosConfig.short(
    orders=20, workers=1, listeners=2, competitors=2, jobs=6, client_news=2, duration=0.5, fault_interval=3600
)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small run without faults on SQLite, which the checker passes."""
    folder = tmp_path_factory.mktemp("good-run")
    asyncio.run(run_chaos(f"sqlite:///{folder / 'geste.db'}", folder, CALM))
    return folder


def _sql(folder: Path, query: str, *args: object) -> None:
    with sqlite3.connect(folder / "geste.db") as conn:
        assert conn.execute(query, args).rowcount >= 1, query
    conn.close()


def _result(folder: Path, instance_id: str, change: Callable[[object], object]) -> None:
    with sqlite3.connect(folder / "geste.db") as conn:
        (text,) = conn.execute(
            "SELECT result FROM geste_instances WHERE instance_id = ?", (instance_id,)
        ).fetchone()
        conn.execute(
            "UPDATE geste_instances SET result = ? WHERE instance_id = ?",
            (json.dumps(change(json.loads(text))), instance_id),
        )
    conn.close()


def _drop_log_line(folder: Path, log: str, keep: Callable[[dict[str, object]], bool]) -> None:
    path = folder / log
    lines = [line for line in path.read_text().splitlines() if keep(json.loads(line))]
    path.write_text("".join(line + "\n" for line in lines))


def _refused_by_outage(folder: Path, prefix: str) -> None:
    """Turn the deliveries of an event into attempts the outage refused (it was never delivered after)."""
    path = folder / "deliveries.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines = [{**d, "refused": "outage"} if str(d["event_id"]).startswith(prefix) else d for d in lines]
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))


def _repeat_first_end(folder: Path) -> None:
    path = folder / "effects.jsonl"
    end = next(line for line in path.read_text().splitlines() if json.loads(line)["event"] == "end")
    with path.open("a") as log:
        log.write(end + "\n")


def _lose_an_acknowledged_step(folder: Path) -> None:
    """What a failover to a standby that lacked a commit does: the step re-run, another outcome recorded."""
    _result(folder, "order-8", lambda r: {**r, "runs": [r["runs"][0], "a-re-run", r["runs"][2]]})  # type: ignore[index, dict-item]


def _other_run(result: object) -> object:
    assert isinstance(result, dict)
    return {**result, "runs": ["not-a-recorded-run", *result["runs"][1:]]}


def _duplicated(key: str) -> Callable[[object], object]:
    def change(result: object) -> object:
        assert isinstance(result, dict)
        return {**result, key: [*result[key], result[key][0]]}

    return change


PAUSE_REPORTED = {"fault": "pause", "output": "worker-w1-0.out", "leases": 2, "taken": 2, "seconds": 2.0}
"""A pause the controller saw reported (``logged``), whose worker's log has no lost lease."""
PAUSE_REPORTED["logged"] = True

DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "an unfinished instance": (
        "every_instance_completed",
        lambda f: _sql(f, "UPDATE geste_instances SET status = 'running' WHERE instance_id = 'order-3'"),
    ),
    "a result that did not use the recorded activity result": (
        "orders_have_the_right_results",
        lambda f: _result(f, "order-1", _other_run),
    ),
    "a wrong value": (
        "orders_have_the_right_results",
        lambda f: _result(f, "order-2", lambda r: {**r, "values": [0, 0, 0]}),  # type: ignore[dict-item]
    ),
    "a hole in a history": (
        "histories_are_whole",
        lambda f: _sql(f, "DELETE FROM geste_history WHERE instance_id = 'order-4' AND seq = 2"),
    ),
    "an activity execution recorded twice": ("no_activity_result_recorded_twice", _repeat_first_end),
    "an acknowledged step lost": ("acknowledged_steps_kept", _lose_an_acknowledged_step),
    "a direct message received twice": (
        "direct_messages_received_exactly_once",
        lambda f: _result(f, "ledger-0", _duplicated("orders")),
    ),
    "a direct message never taken": (
        "direct_messages_received_exactly_once",
        lambda f: _sql(
            f, "UPDATE geste_channel_messages SET claimed_by = NULL WHERE target_instance_id = 'ledger-1'"
        ),
    ),
    "a broadcast missed by one listener": (
        "broadcasts_received_exactly_once_by_each",
        lambda f: _result(f, "listener-1", lambda r: r[1:]),  # type: ignore[index]
    ),
    "a competing message taken twice": (
        "competing_messages_taken_exactly_once",
        lambda f: _result(f, "competitor-0", _duplicated("jobs")),
    ),
    "an outbox event never delivered": (
        "outbox_events_delivered",
        lambda f: _drop_log_line(
            f, "deliveries.jsonl", lambda d: not str(d["event_id"]).startswith("order-5:")
        ),
    ),
    "an outbox event refused by the outage, never delivered after": (
        "outbox_events_delivered",
        lambda f: _refused_by_outage(f, "order-8:"),
    ),
    "an instance left locked": (
        "nothing_left_locked_or_waiting",
        lambda f: _sql(f, "UPDATE geste_instances SET locked_by = 'w9' WHERE instance_id = 'order-6'"),
    ),
    "a paused worker that logged no lost lease": (
        "paused_workers_dropped_their_lost_runs",
        lambda f: (f / "faults.jsonl").write_text(
            json.dumps(
                {
                    "fault": "pause",
                    "output": "worker-w1-0.out",
                    "leases": 2,
                    "taken": 2,
                    "seconds": 2,
                    "logged": True,
                }
            )
            + "\n"
        ),
    ),
    "a timer left behind": (
        "nothing_left_locked_or_waiting",
        lambda f: _sql(f, "INSERT INTO geste_timers VALUES ('order-7', 99, 0)"),
    ),
}


async def test_the_checker_passes_a_good_run(good_run: Path) -> None:
    assert len(await check(f"sqlite:///{good_run / 'geste.db'}", good_run, CALM)) == len(CHECKS)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
async def test_the_checker_fails_a_damaged_run(good_run: Path, tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "run"
    shutil.copytree(good_run, folder)
    failing_check, do = DAMAGE[damage]
    do(folder)
    with pytest.raises(AssertionError) as failed:
        await check(f"sqlite:///{folder / 'geste.db'}", folder, CALM)
    failures = [line for line in str(failed.value).splitlines() if line.startswith("FAIL")]
    assert any(line.startswith(f"FAIL  {failing_check}:") for line in failures), str(failed.value)
