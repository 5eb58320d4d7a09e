"""Queues as an operator sees them (issue 19; docs/queues.md "Watching queues"), on each backend:
``app.list_queues()`` and ``app.status()``, ``geste queues`` and the queues of ``geste status``, ``GET
/queues``, the viewer's ``/ui/queues`` and the per-queue metrics. A queue is seeded on a clock only the
test moves: its queued and admitted instances, its limits, its rate window and its oldest queued instance
(one that is not the head of the line: a lower priority went first) are checked everywhere.

The cost: on 100,000 queued instances of one queue and 100,000 finished ones outside any queue, the
statement reads the two partial indexes only, and at most the counts' cap of their entries
(PostgreSQL's ``EXPLAIN ANALYZE`` with the custom and the generic plan; SQLite's plan and VM steps).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import geste
from geste.runtime import _runtime

from .support import instances_read, raw_query, run_cli, vm_steps
from .test_held_leases import explain
from .test_viewer import BROWSER, page

MakeApp = Callable[..., geste.App]
T0 = 1_000_000.0


class FrozenClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


PAY = geste.Queue("pay", concurrency=2, worker_concurrency=1, rate_limit=5, rate_period=60)
IDLE = geste.Queue("idle<b>")


def queue_app(make_app: MakeApp, clock: FrozenClock) -> geste.App:
    app = make_app(run_worker=False, clock=clock, lock_timeout=1e6, queues=[PAY, IDLE])

    @app.workflow
    async def job(ctx: geste.WorkflowContext, n: int) -> int:
        return n

    return app


async def seed(app: geste.App, clock: FrozenClock) -> None:
    """Five starts onto ``pay``, ten seconds apart, with priorities 5, 0, 0, -1, 0, then one onto ``adhoc``
    (never declared); a claim at T0 + 50 admits two: the line's head (-1) and the first 0. Left queued:
    the second and third 0 and, oldest of all though last in line, the 5 (started at T0)."""
    job = app.workflows["job"]
    for n, priority in enumerate((5, 0, 0, -1, 0)):
        clock.now = T0 + 10 * n
        await job.options(queue="pay", priority=priority).start_with_id(f"pay-{n}", n)
    clock.now = T0 + 45
    await job.options(queue="adhoc").start_with_id("adhoc-0", 0)
    clock.now = T0 + 50
    claims = await app.storage.queue_claim("w1", clock.now, clock.now + 1e6, 10, queue="pay")
    assert sorted(c.lease.instance_id for c in claims) == ["pay-1", "pay-3"]


def by_name(queues: list[geste.QueueInfo]) -> dict[str, geste.QueueInfo]:
    return {queue.name: queue for queue in queues}


async def test_each_queue_shows_its_queued_admitted_limits_rate_and_oldest(
    make_app: MakeApp, db_url: str
) -> None:
    clock = FrozenClock(T0)
    app = queue_app(make_app, clock)
    async with app:
        await seed(app, clock)
        queues = await app.list_queues()
        assert [q.name for q in queues] == ["adhoc", "idle<b>", "pay"]
        adhoc, idle, pay = queues
        assert pay == geste.QueueInfo(
            name="pay",
            declared=True,
            concurrency=2,
            worker_concurrency=1,
            rate_limit=5,
            rate_period=60.0,
            queued=3,
            admitted=2,
            rate_used=2,
            oldest_queued_at=datetime.fromtimestamp(T0, UTC),  # pay-0: priority 5, started first
            oldest_age=50.0,
        )
        assert (adhoc.declared, adhoc.concurrency, adhoc.rate_limit, adhoc.rate_used) == (
            False,
            None,
            None,
            None,
        )
        assert (adhoc.queued, adhoc.admitted, adhoc.oldest_age) == (1, 0, 5.0)
        assert (idle.declared, idle.queued, idle.admitted, idle.oldest_queued_at) == (True, 0, 0, None)

        clock.now = T0 + 111  # past the rate window of the claim at T0 + 50; pay-3 ends; pay-0 admitted
        await raw_query(
            db_url, "UPDATE geste_instances SET status = 'completed' WHERE instance_id = $1", "pay-3"
        )
        await raw_query(db_url, "UPDATE geste_instances SET priority = -9 WHERE instance_id = $1", "pay-0")
        claims = await app.storage.queue_claim("w1", clock.now, clock.now + 1e6, 1, queue="pay")
        assert [c.lease.instance_id for c in claims] == ["pay-0"]
        pay = by_name(await app.list_queues())["pay"]
        assert (pay.queued, pay.admitted, pay.rate_used) == (2, 2, 1)  # pay-1 and pay-0 hold the slots
        assert pay.oldest_queued_at == datetime.fromtimestamp(T0 + 20, UTC) and pay.oldest_age == 91.0

        claims = await app.storage.queue_claim("w1", clock.now, clock.now + 1e6, 1, queue="adhoc")
        assert [c.lease.instance_id for c in claims] == ["adhoc-0"]
        adhoc = by_name(await app.list_queues())["adhoc"]  # named by an admitted instance only: still listed
        assert (adhoc.declared, adhoc.queued, adhoc.admitted, adhoc.oldest_queued_at) == (False, 0, 1, None)

        status = await app.status()
        assert status.queues == await app.list_queues()
        shown = status.as_dict()["queues"]
        assert [(q["name"], q["admitted"]) for q in shown] == [("adhoc", 1), ("idle<b>", 0), ("pay", 2)]
        assert shown[2] == {
            "name": "pay",
            "declared": True,
            "concurrency": 2,
            "worker_concurrency": 1,
            "rate_limit": 5,
            "rate_period": 60.0,
            "queued": 2,
            "queued_capped": False,
            "admitted": 2,
            "admitted_capped": False,
            "rate_used": 1,
            "oldest_queued_at": datetime.fromtimestamp(T0 + 20, UTC).isoformat(),
            "oldest_age": 91.0,
        }


async def test_counts_stop_at_the_cap(make_app: MakeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted up to the cap (and one more, to tell "more"): ``queued_capped`` says there are more."""
    clock = FrozenClock(T0)
    app = queue_app(make_app, clock)
    async with app:
        await seed(app, clock)
        (stored,) = [
            q for q in await app.storage.list_queues(clock.now, cap=2, limit=10, levels=10) if q.name == "pay"
        ]
        assert (stored.queued, stored.admitted) == (2, 2)  # 3 queued, 2 admitted: read 2 of each
        monkeypatch.setattr(_runtime, "QUEUE_COUNT_CAP", 2)
        pay = by_name(await app.list_queues())["pay"]
        assert (pay.queued, pay.queued_capped, pay.admitted, pay.admitted_capped) == (2, True, 2, False)
        monkeypatch.setattr(_runtime, "QUEUE_COUNT_CAP", 1)
        pay = by_name(await app.list_queues())["pay"]
        assert (pay.queued, pay.queued_capped, pay.admitted, pay.admitted_capped) == (1, True, 1, True)
        assert by_name(await app.list_queues())["adhoc"].queued_capped is False  # 1 queued: not more
        stored_few = await app.storage.list_queues(clock.now, cap=10, limit=2, levels=10)
        assert [q.name for q in stored_few] == ["adhoc", "idle<b>"]  # at most `limit` queues, by name


async def test_the_oldest_is_looked_for_among_the_first_priorities(make_app: MakeApp) -> None:
    """The oldest queued instance is the oldest of the first ``levels`` priorities of the line: with
    fewer levels than the queue uses, an older one further back is not seen (the documented bound)."""
    clock = FrozenClock(T0)
    app = queue_app(make_app, clock)
    async with app:
        job = app.workflows["job"]
        for n, priority in enumerate((3, 2, 1)):  # the oldest is last in line
            clock.now = T0 + n
            await job.options(queue="pay", priority=priority).start(n)
        for levels, oldest in ((3, T0), (2, T0 + 1), (1, T0 + 2)):
            found = await app.storage.list_queues(clock.now, cap=10, limit=10, levels=levels)
            assert [(q.name, q.oldest_queued_at) for q in found] == [("idle<b>", None), ("pay", oldest)]


# -- the interfaces -----------------------------------------------------------------------------------
async def test_the_cli_http_viewer_and_metrics_show_the_queues(make_app: MakeApp, db_url: str) -> None:
    clock = FrozenClock(T0)
    app = queue_app(make_app, clock)
    async with app:
        await seed(app, clock)
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            answer = await http.get("/queues")
            assert answer.status_code == 200
            assert answer.json() == {"queues": [q.as_dict() for q in await app.list_queues()]}
            assert (await http.get("/queues?x=1")).status_code == 400

            body = await page(http, "/ui/queues")
            assert "<h1>Queues</h1>" in body and "idle&lt;b&gt;" in body and "idle<b>" not in body
            rows = body.split("<tbody>")[1].split("</tr>")
            adhoc, _, pay = rows[:3]
            assert "(not declared)" in adhoc and "(not declared)" not in pay
            cells = [re.sub(r"<[^>]+>", "", cell) for cell in pay.split("</td>")[:7]]
            assert cells[:6] == ["pay", "3", "2", "2", "1", "2 / 5 per 1 min"], cells
            assert f'datetime="{datetime.fromtimestamp(T0, UTC).isoformat()}"' in pay, pay
            assert cells[6] == "50 s ago", cells
            assert '<a href="/ui/queues">Queues</a>' in await page(http, "/ui")  # in the bar of every page
            assert (await http.get("/ui/queues?x=1", headers=BROWSER)).status_code == 400

        snapshot = await app.metrics.snapshot()
        assert snapshot.value("geste_queue_queued", queue="pay") == 3
        assert snapshot.value("geste_queue_queued", queue="adhoc") == 1
        assert snapshot.value("geste_queue_admitted", queue="pay") == 2
        assert snapshot.value("geste_queue_concurrency_limit", queue="pay") == 2
        assert snapshot.value("geste_queue_rate_limit", queue="pay") == 5
        assert snapshot.value("geste_queue_rate_window_admissions", queue="pay") == 2
        assert snapshot.value("geste_queue_oldest_queued_seconds", queue="pay") == 50
        assert snapshot.value("geste_queue_oldest_queued_seconds", queue="adhoc") == 5
        text = snapshot.text()
        assert 'geste_queue_queued{queue="idle<b>"} 0' in text
        assert 'geste_queue_concurrency_limit{queue="adhoc"}' not in text  # no limit: no series
        assert 'geste_queue_rate_limit{queue="idle<b>"}' not in text

    as_json = await asyncio.to_thread(run_cli, ["queues", "--json", "--database-url", db_url])
    assert as_json.exit_code == 0, as_json.output
    listed = json.loads(as_json.stdout)
    assert [(q["name"], q["queued"], q["admitted"], q["declared"]) for q in listed] == [
        ("adhoc", 1, 0, False),
        ("idle<b>", 0, 0, True),
        ("pay", 3, 2, True),
    ]
    assert listed[2]["oldest_queued_at"] == datetime.fromtimestamp(T0, UTC).isoformat()
    table = await asyncio.to_thread(run_cli, ["queues", "--database-url", db_url])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "QUEUE",
        "QUEUED",
        "ADMITTED",
        "LIMIT",
        "PER",
        "WORKER",
        "RATE",
        "OLDEST",
        "QUEUED",
    ]
    assert lines[1].split()[:6] == ["adhoc", "*", "1", "0", "-", "-"]
    assert lines[2].split()[:6] == ["idle<b>", "0", "0", "-", "-", "-"]
    # the CLI reads on the real clock: the window of the claim at T0 + 50 is long gone
    assert lines[3].split()[:8] == ["pay", "3", "2", "2", "1", "0/5", "per", "60s"]
    assert lines[4].startswith("* not declared by any App")

    status = await asyncio.to_thread(run_cli, ["status", "--database-url", db_url])
    assert status.exit_code == 0, status.output
    lines = status.stdout.splitlines()
    row = lines.index("queues (3):")
    assert lines[row + 1].split()[0] == "QUEUE" and lines[row + 4].split()[:3] == ["pay", "3", "2"]
    as_json = await asyncio.to_thread(run_cli, ["status", "--json", "--database-url", db_url])
    assert [q["queued"] for q in json.loads(as_json.stdout)["queues"]] == [1, 0, 3]


async def test_no_queue(make_app: MakeApp, db_url: str) -> None:
    async with make_app(run_worker=False) as app:
        assert await app.list_queues() == [] and (await app.status()).queues == []
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            assert "No queue." in await page(http, "/ui/queues")
            assert (await http.get("/queues")).json() == {"queues": []}
        assert "geste_queue_queued{" not in (await app.metrics.snapshot()).text()
    result = await asyncio.to_thread(run_cli, ["queues", "--database-url", db_url])
    assert result.exit_code == 0 and result.stdout == "no queues\n"


async def test_with_a_token_the_endpoint_and_the_page_need_it(make_app: MakeApp) -> None:
    async with make_app(run_worker=False) as app:
        transport = httpx.ASGITransport(app=app.asgi(token="s3cret"))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            assert (await http.get("/queues")).status_code == 401
            assert (await http.get("/queues", headers={"authorization": "Bearer s3cret"})).status_code == 200
            answer = await http.get("/ui/queues", headers=BROWSER)
            assert answer.status_code == 401 and "Sign in" in answer.text


# -- the cost -----------------------------------------------------------------------------------------
QUEUED = 100_000
ADMITTED = 1_500
FINISHED = 100_000
CAP = 1_001  # what the App asks: QUEUE_COUNT_CAP + 1

SEED_POSTGRES = """
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, queue,
                             priority, queued_at)
SELECT 'q-' || g, 'job', 'pending', '[]', g, g, 'big', g % 3, g FROM generate_series(1, $1::integer) g;
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, queue)
SELECT 'a-' || g, 'job', 'waiting', '[]', g, g, 'big' FROM generate_series(1, $2::integer) g;
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at)
SELECT 'f-' || g, 'job', 'completed', '[]', g, g FROM generate_series(1, $3::integer) g;
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, queue,
                             priority, queued_at)
SELECT 's-' || g, 'job', 'pending', '[]', g, g, 'small-' || g, 0, g FROM generate_series(1, 20) g;
"""


def seed_sqlite(conn: sqlite3.Connection) -> None:
    series = "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < :n) "
    columns = (
        "(instance_id, workflow_name, status, input, created_at, updated_at, queue, priority, queued_at)"
    )
    with conn:
        conn.execute(
            f"{series} INSERT INTO geste_instances {columns} "
            "SELECT 'q-' || x, 'job', 'pending', '[]', x, x, 'big', x % 3, x FROM g",
            {"n": QUEUED},
        )
        conn.execute(
            f"{series} INSERT INTO geste_instances {columns} "
            "SELECT 'a-' || x, 'job', 'waiting', '[]', x, x, 'big', 0, NULL FROM g",
            {"n": ADMITTED},
        )
        conn.execute(
            f"{series} INSERT INTO geste_instances {columns} "
            "SELECT 'f-' || x, 'job', 'completed', '[]', x, x, NULL, 0, NULL FROM g",
            {"n": FINISHED},
        )
        conn.execute(
            f"{series} INSERT INTO geste_instances {columns} "
            "SELECT 's-' || x, 'job', 'pending', '[]', x, x, 'small-' || x, 0, x FROM g",
            {"n": 20},
        )


def assert_the_big_queue(found: list[Any]) -> None:
    big = found[0]
    assert (big.name, big.queued, big.admitted, big.oldest_queued_at) == ("big", CAP, CAP, 1.0)
    assert [q.name for q in found[1:]] == sorted(f"small-{g}" for g in range(1, 21))
    assert all(q.queued == 1 and q.admitted == 0 for q in found[1:])


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_the_queues_read_the_partial_indexes_only_on_postgres(
    pg_url: str, plan_cache_mode: str
) -> None:
    """EXPLAIN ANALYZE of the real statement, with the parameters the App passes, over 100,000 queued
    instances of one queue, 1,500 admitted and 100,000 finished outside any queue (and 20 small queues):
    every read of geste_instances is one of the two partial indexes, and the rows read are the two capped
    counts plus a few per queue, with the custom plan and the generic one asyncpg switches to."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    dsn, options = parse_postgres_url(pg_url)
    query = schema_queries(options["schema"])["list_queues"]
    async with geste.App(pg_url, run_worker=False) as app:  # migrated
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            await conn.execute(
                SEED_POSTGRES.replace("$1::integer", str(QUEUED))
                .replace("$2::integer", str(ADMITTED))
                .replace("$3::integer", str(FINISHED))
            )
            await conn.execute("VACUUM ANALYZE geste_instances")
            await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            nodes = await explain(conn, query, (time.time(), CAP, 1000, 100))
            on_table = [node for node in nodes if node.get("Relation Name") == "geste_instances"]
            shown = [(n["Node Type"], n.get("Index Name"), instances_read([n])) for n in on_table]
            assert on_table and {n.get("Index Name") for n in on_table} == {
                "geste_instances_queued",
                "geste_instances_queue_admitted",
            }, shown
            assert not any(n["Node Type"] == "Seq Scan" for n in on_table), shown  # (geste_queues may)
            # the two counts of the big queue (CAP each), then a few probes per queue (21 queues)
            assert instances_read(nodes) <= 2 * CAP + 10 * 21, shown
        finally:
            await conn.close()
        assert_the_big_queue(await app.storage.list_queues(time.time(), cap=CAP, limit=1000, levels=100))


async def test_the_queues_read_the_partial_indexes_only_on_sqlite(tmp_path: Path) -> None:
    """The same seeded table on SQLite: each step of the plan on geste_instances searches one of the two
    partial indexes (never a scan), and the statement runs a small fraction of one pass over the table."""
    from geste.storage.sqlite import Q

    url = f"sqlite:///{tmp_path / 'seeded.db'}"
    async with geste.App(url, run_worker=False) as app:
        with contextlib.closing(sqlite3.connect(tmp_path / "seeded.db")) as conn:
            seed_sqlite(conn)
            conn.execute("ANALYZE")
            params = {"now": time.time(), "cap": CAP, "limit": 1000, "levels": 100}
            plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + Q["list_queues"], params)]
            on_table = [step for step in plan if step.split()[1:2] in (["geste_instances"], ["i"])]
            assert on_table and all(
                step.startswith("SEARCH")
                and re.search(r"USING (COVERING )?INDEX geste_instances_(queued|queue_admitted)\b", step)
                for step in on_table
            ), plan
            one_pass = vm_steps(conn, "SELECT count(*) FROM geste_instances WHERE input <> ''", {})
            steps = vm_steps(conn, Q["list_queues"], params)
            assert steps * 10 < one_pass, (steps, one_pass)
        assert_the_big_queue(await app.storage.list_queues(time.time(), cap=CAP, limit=1000, levels=100))


async def test_a_database_that_does_not_answer(make_app: MakeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queues cannot be read: the scrape says so (``geste_queue_up`` 0, no per-queue series), the API
    answers 503 and the viewer its "unavailable" page; nothing is raised to the scraper."""
    from geste.errors import StorageError

    clock = FrozenClock(T0)
    app = queue_app(make_app, clock)
    async with app:
        await seed(app, clock)

        async def unreadable(*args: Any, **kwargs: Any) -> Any:
            raise StorageError("the database went away")

        monkeypatch.setattr(app.storage, "list_queues", unreadable)
        snapshot = await app.metrics.snapshot()
        assert snapshot.value("geste_queue_up") == 0 and "geste_queue_queued" not in snapshot.families
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            answer = await http.get("/queues")
            assert answer.status_code == 503 and answer.json()["error"]["type"] == "StorageError"
            assert "the database went away" not in answer.text
            await page(http, "/ui/queues", 503)
