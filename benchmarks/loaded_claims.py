"""Three-step workflows/s on a loaded database against an empty one (issue 15: held leases, finished rows).

    .venv/bin/python benchmarks/loaded_claims.py                        # PostgreSQL, 1,000,000 + 10,000
    .venv/bin/python benchmarks/loaded_claims.py --backend sqlite --finished 200000 --runs 3
    .venv/bin/python benchmarks/loaded_claims.py --processes 0          # starts and runs in one process

The loaded database holds ``finished`` completed instances (seeded by SQL: ``generate_series`` on
PostgreSQL, a recursive CTE on SQLite) and ``held`` instances of the benchmark's own workflow under a live
lease of another worker (taken by that worker's real claims, so the rows are exactly as the code under
test leaves a held instance, lease an hour long; then vacuumed and analysed, as autovacuum would). Each
run starts ``instances`` workflows and waits for their completion: by default a client (this process)
starts them and one worker process (``throughput.py --serve``, concurrency 200) claims and runs them, so
every instance goes through a claim that must step over the held instances of its workflow; with
``--processes 0`` one process starts and runs them (most start with a free local slot, claimed at their
creation: few claims). Runs alternate empty / loaded; the empty database is a fresh one each time, the
loaded one is seeded once (each run adds its finished instances to it). First the median time of a claim
round on each (nothing due; one instance due). It prints the medians and the ratio loaded / empty (the
target of issue 15: at least 0.9).

``seed``, ``workflows_per_second`` and ``claim_round_ms`` are importable (``benchmarks/scale.py`` uses
them), with the benchmarks folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import geste
from geste.storage.base import Commit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import POSTGRES, _drop_schema, build_app  # noqa: E402

HOLDER = "held-by-another-worker"
"""The worker id of the (fake, live) worker that holds the seeded leases."""

SEED_FINISHED_POSTGRES = """
INSERT INTO geste_instances
    (instance_id, workflow_name, status, input, result, created_at, updated_at, finished_at, steps)
SELECT 'done-' || g, 'three_steps', 'completed', '{"args": [0], "kwargs": {}}', '3',
       $1 - 86400 + g * 0.01, $1 - 86400 + g * 0.01, $1 - 86400 + g * 0.01, 3
FROM generate_series(1, $2::integer) AS g
"""

SEED_PENDING_POSTGRES = """
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, run_at)
SELECT 'held-' || g, 'three_steps', 'pending', '{"args": [0], "kwargs": {}}', $1 - 60, $1 - 60,
       $1 - 60 + g * 0.001
FROM generate_series(1, $2::integer) AS g
"""

SEED_FINISHED_SQLITE = """
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :count)
INSERT INTO geste_instances
    (instance_id, workflow_name, status, input, result, created_at, updated_at, finished_at, steps)
SELECT 'done-' || n, 'three_steps', 'completed', '{"args": [0], "kwargs": {}}', '3',
       :now - 86400 + n * 0.01, :now - 86400 + n * 0.01, :now - 86400 + n * 0.01, 3
FROM g
"""

SEED_PENDING_SQLITE = """
WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :count)
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, run_at)
SELECT 'held-' || n, 'three_steps', 'pending', '{"args": [0], "kwargs": {}}', :now - 60, :now - 60,
       :now - 60 + n * 0.001
FROM g
"""


async def seed(url: str, *, finished: int, held: int) -> None:
    """Load the (migrated or new) database at ``url``: ``finished`` completed instances, then ``held``
    pending instances of ``three_steps`` claimed by ``HOLDER`` for an hour through the storage's own
    claim (100 at a time), so that they are held exactly as this version holds a running instance."""
    now = time.time()
    async with geste.App(url, run_worker=False) as app:  # migrates
        if url.startswith("sqlite"):
            import sqlite3

            path = url.removeprefix("sqlite:///").split("?", 1)[0]
            conn = sqlite3.connect(path, timeout=60)
            try:
                with conn:
                    conn.execute(SEED_FINISHED_SQLITE, {"count": finished, "now": now})
                    conn.execute(SEED_PENDING_SQLITE, {"count": held, "now": now})
                conn.execute("ANALYZE")
            finally:
                conn.close()
        else:
            import asyncpg

            from geste.storage.postgres import parse_postgres_url

            dsn, options = parse_postgres_url(url)
            conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
            try:
                await conn.execute(SEED_FINISHED_POSTGRES, now, finished)
                await conn.execute(SEED_PENDING_POSTGRES, now, held)
                await conn.execute("VACUUM ANALYZE geste_instances")
            finally:
                await conn.close()
        taken = 0
        while taken < held:
            claims = await app.storage.claim(
                HOLDER, time.time(), time.time() + 3600, 100, workflows=["three_steps"]
            )
            if not claims:
                raise RuntimeError(f"seeding: only {taken} of {held} instances could be claimed")
            taken += len(claims)
    await _vacuum(url)


async def _vacuum(url: str) -> None:
    """What autovacuum and the checkpointer do to a database in its steady state: dead row versions
    cleaned up, statistics up to date (a claim moves its rows from one index to another), the seed's
    writes flushed (CHECKPOINT needs a superuser, as the benchmark's PostgreSQL user is)."""
    if url.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(url.removeprefix("sqlite:///").split("?", 1)[0], timeout=60)
        try:
            conn.execute("ANALYZE")
        finally:
            conn.close()
        return
    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
    try:
        await conn.execute("VACUUM ANALYZE geste_instances")
        await conn.execute("CHECKPOINT")  # the seed's writes flushed now, not during a measured run
    finally:
        await conn.close()


async def workflows_per_second(url: str, instances: int, processes: int = 1) -> float:
    """Three-step workflows per second, from the first start to the last completion. ``processes`` 0: one
    process starts and runs them (concurrency 200; a start with a free slot runs at once, without a
    claim). N > 0: N worker processes (``throughput.py --serve``, concurrency 200) claim and run what a
    client process (this one) starts; the end is when a count of the run's completed instances, polled
    every 20 ms, reaches ``instances``."""
    if processes == 0:
        app, workflow = build_app(url, concurrency=200)
        async with app:
            started = time.perf_counter()
            handles = [await workflow.start(i) for i in range(instances)]
            for i, handle in enumerate(handles):
                assert await handle.result(timeout=600) == i + 3
            return instances / (time.perf_counter() - started)
    workers = [
        subprocess.Popen(
            [sys.executable, str(HERE / "throughput.py"), "--serve", url], stdout=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    prefix = f"run-{uuid.uuid4().hex[:8]}-"
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        app, workflow = build_app(url, run_worker=False)
        async with app:
            count = _completed_counter(url, prefix)
            started = time.perf_counter()
            for i in range(instances):
                await workflow.start_with_id(f"{prefix}{i:06}", i)
            while await count() < instances:
                await asyncio.sleep(0.02)
            return instances / (time.perf_counter() - started)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=60)


def _completed_counter(url: str, prefix: str) -> Callable[[], Awaitable[int]]:
    """A coroutine function counting the completed instances whose id starts with ``prefix`` (a range of
    the primary key: the loaded database's other instances are not read)."""
    low, high = prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)
    if url.startswith("sqlite"):
        import sqlite3

        path = url.removeprefix("sqlite:///").split("?", 1)[0]
        query = (
            "SELECT count(*) FROM geste_instances"
            " WHERE instance_id >= ? AND instance_id < ? AND status = 'completed'"
        )

        async def count_sqlite() -> int:
            def read() -> int:
                conn = sqlite3.connect(path, timeout=60)
                try:
                    return int(conn.execute(query, (low, high)).fetchone()[0])
                finally:
                    conn.close()

            return await asyncio.to_thread(read)

        return count_sqlite

    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(url)

    async def count_postgres() -> int:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            found = await conn.fetchval(
                "SELECT count(*) FROM geste_instances"
                " WHERE instance_id >= $1 AND instance_id < $2 AND status = 'completed'",
                low,
                high,
            )
            return int(found)
        finally:
            await conn.close()

    return count_postgres


async def claim_round_ms(url: str, *, rounds: int = 200) -> tuple[float, float]:
    """Median milliseconds of a claim round of ``three_steps`` (the storage's own ``claim``, batch 100)
    that finds nothing due, then of one that finds one instance (started just before): the cost of
    stepping over what the database holds."""
    app, workflow = build_app(url, run_worker=False)
    empty: list[float] = []
    one: list[float] = []
    async with app:
        for _ in range(rounds):
            started = time.perf_counter()
            await app.storage.claim("bench", time.time(), time.time() + 60, 100, workflows=["three_steps"])
            empty.append(time.perf_counter() - started)
            handle = await workflow.start(0)
            started = time.perf_counter()
            claims = await app.storage.claim(
                "bench", time.time(), time.time() + 60, 100, workflows=["three_steps"]
            )
            one.append(time.perf_counter() - started)
            assert [c.lease.instance_id for c in claims] == [handle.instance_id]
            await app.storage.finish(
                Commit(claims[0].lease, [], time.time()), status=geste.Status.COMPLETED, result="3"
            )
    return statistics.median(empty) * 1000, statistics.median(one) * 1000


def fresh_url(backend: str, folder: Path) -> tuple[str, str | None]:
    """A new database: a SQLite file in ``folder`` or a PostgreSQL schema (returned, to drop it)."""
    if backend == "sqlite":
        return f"sqlite:///{folder / f'loaded-{uuid.uuid4().hex[:8]}.db'}", None
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    return f"{POSTGRES}?schema={schema}", schema


async def compare(
    backend: str, *, finished: int, held: int, instances: int, runs: int, processes: int = 1
) -> dict[str, float]:
    """Medians of ``runs`` alternated runs on an empty and on a loaded database, and their ratio."""
    empty: list[float] = []
    loaded: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        loaded_url, loaded_schema = fresh_url(backend, Path(tmp))
        try:
            began = time.perf_counter()
            await seed(loaded_url, finished=finished, held=held)
            print(f"seeded {finished:,} finished and {held:,} held in {time.perf_counter() - began:.1f}s")
            for label, url in (("loaded", loaded_url), ("empty", None)):
                if url is None:
                    url, schema = fresh_url(backend, Path(tmp))
                try:
                    empty_ms, one_ms = await claim_round_ms(url)
                finally:
                    if label == "empty" and schema is not None:
                        await _drop_schema(schema)
                print(
                    f"claim round on the {label} database:"
                    f" {empty_ms:.2f} ms finding nothing, {one_ms:.2f} ms finding one"
                )
            for run in range(runs):
                url, schema = fresh_url(backend, Path(tmp))
                try:
                    empty.append(await workflows_per_second(url, instances, processes))
                finally:
                    if schema is not None:
                        await _drop_schema(schema)
                await _vacuum(loaded_url)  # the last run's dead rows: autovacuum may be off (it is here)
                loaded.append(await workflows_per_second(loaded_url, instances, processes))
                print(f"run {run + 1}: empty {empty[-1]:.0f}/s, loaded {loaded[-1]:.0f}/s")
        finally:
            if loaded_schema is not None:
                await _drop_schema(loaded_schema)
    result = {"empty": statistics.median(empty), "loaded": statistics.median(loaded)}
    result["ratio"] = result["loaded"] / result["empty"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--held", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--processes", type=int, default=1, help="worker processes; 0: in the client's")
    args = parser.parse_args()
    result = asyncio.run(
        compare(
            args.backend,
            finished=args.finished,
            held=args.held,
            instances=args.instances,
            runs=args.runs,
            processes=args.processes,
        )
    )
    where = "in one process" if args.processes == 0 else f"{args.processes} worker process(es) and a client"
    print(
        f"\n{args.backend}: 3-step workflows/s, {args.instances} instances {where},"
        f" median of {args.runs} runs\n"
        f"  empty database                                   {result['empty']:8.0f}\n"
        f"  {args.finished:,} finished + {args.held:,} held leases{'':>10}{result['loaded']:8.0f}\n"
        f"  ratio loaded / empty                             {result['ratio']:8.2f}"
    )


if __name__ == "__main__":
    main()
