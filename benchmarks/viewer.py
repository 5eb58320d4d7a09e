"""How long the web viewer takes to render a page of the list of 100,000 instances (SQLite, PostgreSQL).

    .venv/bin/python benchmarks/viewer.py                            # 100,000 instances, 21 runs each
    .venv/bin/python benchmarks/viewer.py --instances 1000000 --backend postgres

The instances are inserted with one SQL statement (a recursive CTE on SQLite, ``generate_series`` on
PostgreSQL): four workflow names, every status, one created every second. The pages are rendered in
process through the ASGI application (``app.asgi()`` under httpx's ASGI transport: no socket), so a time
is what a request costs the server: the queries, the counts and the HTML. For each page the table shows
the median and the slowest of ``--runs`` renders after two warm-ups:

- the first page (no filter: 50 rows, the counts per status, the workflow names),
- a page deep in the list, 90 % of the way down, reached by its key as the "Older" links do,
- a filtered page (one workflow and one status, from a creation time on),
- for contrast, the JSON API's ``GET /instances?offset=`` at the same depth (OFFSET, the whole input and
  result of each row), which the viewer does not use.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx

import geste

POSTGRES = os.environ.get("GESTE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
WORKFLOWS = ("checkout", "refund", "ledger", "reminder")
STATUSES = ("completed", "completed", "completed", "failed", "waiting", "cancelled", "running")
START = 1.75e9

SEED_SQLITE = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
INSERT INTO geste_instances (instance_id, workflow_name, status, input, result, created_at, updated_at,
                             finished_at)
SELECT printf('inst-%08d', i),
       CASE i % 4 WHEN 0 THEN 'checkout' WHEN 1 THEN 'refund' WHEN 2 THEN 'ledger' ELSE 'reminder' END,
       CASE i % 7 WHEN 3 THEN 'failed' WHEN 4 THEN 'waiting' WHEN 5 THEN 'cancelled' WHEN 6 THEN 'running'
                  ELSE 'completed' END,
       '{"args":["ORD-' || i || '",' || (i % 100) || '.5],"kwargs":{}}', '{"ok":true}',
       :start + i, :start + i + 2, :start + i + 2
FROM n
"""
SEED_POSTGRES = """
INSERT INTO geste_instances (instance_id, workflow_name, status, input, result, created_at, updated_at,
                             finished_at)
SELECT 'inst-' || lpad(i::text, 8, '0'),
       (ARRAY['checkout', 'refund', 'ledger', 'reminder'])[1 + i % 4],
       (ARRAY['completed', 'completed', 'completed', 'failed', 'waiting', 'cancelled', 'running'])[1 + i % 7],
       '{"args":["ORD-' || i || '",' || (i % 100) || '.5],"kwargs":{}}', '{"ok":true}',
       $2 + i, $2 + i + 2, $2 + i + 2
FROM generate_series(1, $1::integer) AS i
"""


async def seed(url: str, count: int) -> None:
    async with geste.App(url, run_worker=False):
        pass  # creates (migrates) the schema
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            conn.execute(SEED_SQLITE, {"count": count, "start": START})
            conn.execute("ANALYZE")
        conn.close()
        return
    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
    try:
        await conn.execute(SEED_POSTGRES, count, START)
        await conn.execute("VACUUM ANALYZE geste_instances")
    finally:
        await conn.close()


async def timed(render: Callable[[], Awaitable[httpx.Response]], runs: int) -> list[float]:
    for _ in range(2):
        answer = await render()
        assert answer.status_code == 200, answer.text[:300]
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        answer = await render()
        times.append(time.perf_counter() - started)
        assert answer.status_code == 200
    return times


async def measure(url: str, count: int, runs: int) -> dict[str, list[float]]:
    app = geste.App(url, run_worker=False)
    results: dict[str, list[float]] = {}
    async with app:
        transport = httpx.ASGITransport(app=app.asgi(token=None))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            depth = int(count * 0.9)
            deep = count - depth  # newest first: the instance 90 % of the way down
            key = f"{START + deep!r}:inst-{deep:08d}"
            since = datetime.fromtimestamp(START + count // 2, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            pages = {
                "first page": lambda: http.get("/ui"),
                "deep page (key, 90 % down)": lambda: http.get("/ui", params={"before": key}),
                "filtered page (workflow, status, from)": lambda: http.get(
                    "/ui", params={"workflow": "ledger", "status": "failed", "from": since}
                ),
                "API ?offset= at 90 % (contrast)": lambda: http.get(
                    "/instances", params={"limit": "50", "offset": str(depth)}
                ),
            }
            for name, render in pages.items():
                results[name] = await timed(render, runs)
    return results


async def run_backend(backend: str, count: int, runs: int) -> dict[str, list[float]]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{Path(folder) / 'viewer.db'}"
            started = time.perf_counter()
            await seed(url, count)
            print(
                f"sqlite: {count:,} instances seeded in {time.perf_counter() - started:.1f} s",
                file=sys.stderr,
            )
            return await measure(url, count, runs)
    import asyncpg

    schema = f"bench_viewer_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(POSTGRES)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        sep = "&" if "?" in POSTGRES else "?"
        url = f"{POSTGRES}{sep}schema={schema}"
        started = time.perf_counter()
        await seed(url, count)
        print(
            f"postgres: {count:,} instances seeded in {time.perf_counter() - started:.1f} s", file=sys.stderr
        )
        return await measure(url, count, runs)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def table(results: dict[str, dict[str, list[float]]], count: int, runs: int) -> str:
    backends = list(results)
    lines = [
        f"Viewer render time over {count:,} instances: median (slowest) of {runs} runs, in ms",
        "",
        "| page | " + " | ".join(backends) + " |",
        "|---|" + "---|" * len(backends),
    ]
    names = list(next(iter(results.values())))
    for name in names:
        cells = []
        for backend in backends:
            times = results[backend][name]
            cells.append(f"{statistics.median(times) * 1000:.1f} ({max(times) * 1000:.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    args = parser.parse_args()
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    results = {b: asyncio.run(run_backend(b, args.instances, args.runs)) for b in backends}
    print(table(results, args.instances, args.runs))


if __name__ == "__main__":
    main()
