"""asyncpg or psycopg 3 for geste's statements? One step commit, measured on each driver, alternating.

    .venv/bin/pip install asyncpg 'psycopg[binary]'
    .venv/bin/python benchmarks/driver_choice.py [--url postgresql://postgres@127.0.0.1:5432/test]

The statement is the shape of geste's step commit on PostgreSQL: one round trip that renews the lease
(conditional UPDATE … RETURNING) and appends a history row, committed on its own. Prints the median
steps/s of 5 alternating runs per driver and the client CPU per step.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

SETUP = """
DROP TABLE IF EXISTS bench_history, bench_instances;
CREATE TABLE bench_instances (instance_id text PRIMARY KEY, lease_id text, lock_expires_at float8,
                              cancel_requested boolean NOT NULL DEFAULT false, steps int NOT NULL DEFAULT 0);
CREATE TABLE bench_history (instance_id text, seq int, kind text, name text, payload text,
                            PRIMARY KEY (instance_id, seq));
INSERT INTO bench_instances VALUES ('i', 'l', 0, false, 0);
"""
STEP = """
WITH lease AS (
    UPDATE bench_instances SET lock_expires_at = $3, steps = steps + 1
    WHERE instance_id = $1 AND lease_id = $2 RETURNING cancel_requested
), row AS (
    INSERT INTO bench_history SELECT $1, $4, 'activity', 'step', $5 WHERE EXISTS (SELECT 1 FROM lease)
)
SELECT cancel_requested FROM lease
"""


async def run_asyncpg(url: str, n: int, offset: int) -> tuple[float, float]:
    import asyncpg

    conn = await asyncpg.connect(url)
    stmt = await conn.prepare(STEP)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        await stmt.fetchval("i", "l", 1.0, offset + i, '{"result": 1}')
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await conn.close()
    return n / wall, cpu / n * 1000


async def run_psycopg(url: str, n: int, offset: int) -> tuple[float, float]:
    import psycopg

    query = STEP.replace("$1", "%(i)s").replace("$2", "%(l)s").replace("$3", "%(e)s")
    query = query.replace("$4", "%(s)s").replace("$5", "%(p)s")
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=0)
    cpu, wall = time.process_time(), time.perf_counter()
    async with conn.cursor() as cur:
        for i in range(n):
            await cur.execute(query, {"i": "i", "l": "l", "e": 1.0, "s": offset + i, "p": '{"result": 1}'})
            await cur.fetchone()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await conn.close()
    return n / wall, cpu / n * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import asyncpg

    setup = await asyncpg.connect(args.url)
    await setup.execute(SETUP)
    results: dict[str, list[tuple[float, float]]] = {"asyncpg": [], "psycopg 3": []}
    offset = 0
    for _ in range(args.runs):
        for name, runner in (("asyncpg", run_asyncpg), ("psycopg 3", run_psycopg)):
            results[name].append(await runner(args.url, args.steps, offset))
            offset += args.steps
    await setup.execute("DROP TABLE bench_history, bench_instances")
    await setup.close()
    print(f"\nstep commit (lease renewal + history row, one round trip), {args.runs} alternating runs")
    print(f"{'driver':<12}{'steps/s (median)':>18}{'client CPU ms/step':>20}")
    for name, values in results.items():
        rate = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"{name:<12}{rate:>18.0f}{cpu:>20.3f}")


if __name__ == "__main__":
    asyncio.run(main())
