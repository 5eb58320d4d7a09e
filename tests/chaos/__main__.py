"""``python -m tests.chaos``: the chaos suite's long mode, from the repository root.

    python -m tests.chaos --long --runs 10             # PostgreSQL, then SQLite, ten times each
    python -m tests.chaos --backend postgres --orders 300
    python -m tests.chaos --long --backend pgbouncer     # the pools through PgBouncer (transaction mode)
    python -m tests.chaos --long --backend postgres --failover    # on a primary and standby of its own

Each run gets a fresh PostgreSQL schema (dropped afterwards when it passed) or SQLite file, in a folder
under ``--keep`` (default: a temporary one) that keeps the workers' output and the side-effect logs.
With ``--failover``, each PostgreSQL run gets a primary and a synchronous standby of its own
(``replica.py``, on free ports) instead of the shared server, and the primary is killed and the standby
promoted halfway through (``--asynchronous``: the standby replicates asynchronously, to see what that
loses: the checker is expected to fail then).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

from ..conftest import POSTGRES_URL, _admin, with_query
from ..pgbouncer import PgBouncer
from .controller import ChaosConfig
from .replica import ReplicatedPair
from .run import ChaosReport, run_chaos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="the long mode: 600 orders, 4 workers")
    parser.add_argument("--runs", type=int, default=1, help="runs in a row (stops at the first failure)")
    parser.add_argument(
        "--backend",
        choices=["postgres", "sqlite", "both", "pgbouncer"],
        default="both",
        help="pgbouncer: PostgreSQL, the pools through a PgBouncer of the run's own, which crashes too",
    )
    parser.add_argument("--orders", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--skew", type=float, default=None, help="workers' clocks off by up to ±S s")
    parser.add_argument("--outage", type=float, default=None, help="the outbox destination down S s once")
    parser.add_argument(
        "--failover", action="store_true", help="PostgreSQL on a pair of its own: the primary killed once"
    )
    parser.add_argument("--asynchronous", action="store_true", help="with --failover: asynchronous standby")
    parser.add_argument("--keep", type=Path, default=None, help="a folder to keep each run's files in")
    parser.add_argument(
        "--no-restart-postgres",
        action="store_true",
        help="never restart the PostgreSQL cluster (a shared one)",
    )
    args = parser.parse_args(argv)
    # the client's pool logs each failed reconnect during the server restart with a traceback: the report
    # counts the restart and the retried calls instead
    logging.getLogger("asyncpg.pool").setLevel(logging.CRITICAL)
    overrides = {
        k: v
        for k, v in (
            ("orders", args.orders),
            ("workers", args.workers),
            ("seed", args.seed),
            ("skew", args.skew),
            ("outage", args.outage),
        )
        if v
    }
    if args.no_restart_postgres:
        overrides["restart_postgres"] = False
    config = ChaosConfig.long(**overrides) if args.long else ChaosConfig.short(**overrides)
    if args.failover:
        # not the partition: each worker's proxy fronts one server, and the pair has two behind one URL
        faults = (*(f for f in config.faults if f != "partition"), "failover")
        config = dataclasses.replace(config, faults=faults, restart_postgres=False)
    backends = ["postgres", "sqlite"] if args.backend == "both" else [args.backend]
    root = args.keep or Path(tempfile.mkdtemp(prefix="geste-chaos-"))
    began = time.monotonic()
    for run in range(1, args.runs + 1):
        for backend in backends:
            folder = root / f"run{run}-{backend}"
            folder.mkdir(parents=True)
            print(f"== run {run}/{args.runs} on {backend} (files in {folder})", flush=True)
            try:
                print(asyncio.run(_one(backend, folder, config, args.asynchronous)), flush=True)
            except AssertionError as exc:
                print(f"FAILED after {run - 1} passing run(s):\n{exc}", flush=True)
                return 1
    print(
        f"== {args.runs} run(s) on {', '.join(backends)} passed in {time.monotonic() - began:.0f}s",
        flush=True,
    )
    return 0


async def _one(backend: str, folder: Path, config: ChaosConfig, asynchronous: bool) -> ChaosReport:
    if backend == "sqlite":
        return await run_chaos(f"sqlite:///{folder / 'geste.db'}", folder, config)  # no failover there
    if "failover" in config.faults:
        with ReplicatedPair(synchronous=not asynchronous) as pair:
            return await run_chaos(pair.url(schema="chaos"), folder, config, replicas=pair)
    schema = f"chaos_{uuid.uuid4().hex[:10]}"
    await asyncio.to_thread(_admin, f'CREATE SCHEMA "{schema}"')
    url = with_query(POSTGRES_URL, schema=schema)
    if backend == "pgbouncer":
        pooler = PgBouncer(POSTGRES_URL)
        pooler.start()
        try:
            faults = tuple(dict.fromkeys((*config.faults, "pgbouncer")))
            report = await run_chaos(url, folder, replace(config, faults=faults), pooler=pooler)
        finally:
            pooler.stop()
    else:
        report = await run_chaos(url, folder, config)
    await asyncio.to_thread(_admin, f'DROP SCHEMA "{schema}" CASCADE')
    return report


if __name__ == "__main__":
    sys.exit(main())
