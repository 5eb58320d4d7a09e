"""Queue partitions (schema 22; docs/queues.md "Partitions", docs/design.md "Queues"), on each backend.

The per-partition limit is checked where it can break: claimers racing at the storage level (separate
connections, one batch each; the most admitted and unfinished per partition is measured after every
round) and worker processes racing on one queue (the most runs of one partition that ever overlapped,
from their log). Fairness (a partition with a big backlog does not starve another's instance, within a
claim and across claims), the partition rate (on explicit claim times: no sleeping), the global limit on
top, the key-less partition, and the index the claim reads (EXPLAIN on a seeded table).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import geste
from geste.errors import ConfigurationError
from geste.storage import Storage, create_storage
from geste.storage._sql import load_queries
from geste.storage.base import Claims

from .support import raw_query, wait_until
from .test_queues import Workers, all_completed, most_at_once

UNFINISHED = "('pending', 'running', 'waiting', 'compensating')"


async def start_jobs(make_app: Any, queue: geste.Queue, keys: list[str | None]) -> dict[str, str | None]:
    """Start one queued ``noop`` per key (None: without a key), in this order, with no worker running:
    the instance ids, each with its key."""
    async with make_app(run_worker=False, queues=[queue]) as app:

        @app.workflow
        async def noop(ctx: geste.WorkflowContext) -> None:
            return None

        started = {}
        for key in keys:
            handle = await noop.options(queue=queue, partition_key=key).start()
            started[handle.instance_id] = key
    return started


async def admitted_by_key(db_url: str, queue: str) -> Counter[str]:
    """The admitted and unfinished instances of ``queue``, counted per partition key."""
    rows = await raw_query(
        db_url,
        "SELECT partition_key FROM geste_instances WHERE queue = $1 AND queued_at IS NULL "
        f"AND status IN {UNFINISHED}",
        queue,
    )
    return Counter(r["partition_key"] for r in rows)


async def end_admitted(db_url: str, queue: str) -> None:
    """The admitted instances of ``queue`` end: their slots are free again."""
    await raw_query(
        db_url,
        f"UPDATE geste_instances SET status = 'completed' WHERE queue = $1 AND queued_at IS NULL "
        f"AND status IN {UNFINISHED}",
        queue,
    )


@pytest.fixture
async def storages(db_url: str) -> Any:
    """Eight storages on the test database: eight claimers on eight connections (pools)."""
    opened: list[Storage] = []
    try:
        for _ in range(8):
            storage = create_storage(db_url)
            await storage.open()
            opened.append(storage)
        yield opened
    finally:
        for storage in opened:
            await storage.close()


async def claim(storage: Storage, queue: str, n: int, now: float, worker: str = "w") -> Claims:
    return await storage.queue_claim(worker, now, now + 60, n, queue=queue)


def ids_of(claims: Claims) -> list[str]:
    return [c.lease.instance_id for c in claims]


async def test_racing_claimers_admit_no_more_than_the_partition_limit(
    make_app: Any, db_url: str, storages: list[Storage]
) -> None:
    """Eight claimers race for a queue of 2 per partition, no global limit, four partitions (three keys
    and the key-less one) of 12 queued each: each round admits exactly 2 of each partition, never more,
    whatever the claimers' interleaving; once those end, the next round admits 2 more of each."""
    queue = geste.Queue("race", partition_concurrency=2)
    keys: list[str | None] = [k for _ in range(12) for k in ("a", "b", "c", None)]
    await start_jobs(make_app, queue, keys)
    most: Counter[str] = Counter()
    for _ in range(4):
        now = 1e9
        taken = await asyncio.gather(*(claim(s, "race", 10, now, f"c{n}") for n, s in enumerate(storages)))
        busy = await admitted_by_key(db_url, "race")
        for key, count in busy.items():
            most[key] = max(most[key], count)
        assert busy == {"a": 2, "b": 2, "c": 2, "": 2}, busy
        assert sum(len(t) for t in taken) == 8
        await end_admitted(db_url, "race")
    assert most == {"a": 2, "b": 2, "c": 2, "": 2}  # the most ever admitted at once per partition


async def test_the_global_limit_holds_on_top_of_the_partitions(
    make_app: Any, db_url: str, storages: list[Storage]
) -> None:
    queue = geste.Queue("both", concurrency=3, partition_concurrency=2)
    await start_jobs(make_app, queue, [k for _ in range(5) for k in ("a", "b", "c")])
    for _ in range(3):
        await asyncio.gather(*(claim(s, "both", 10, 1e9, f"c{n}") for n, s in enumerate(storages)))
        busy = await admitted_by_key(db_url, "both")
        assert sum(busy.values()) == 3 and max(busy.values()) <= 2, busy
        await end_admitted(db_url, "both")


async def test_a_big_partition_does_not_starve_a_small_one(make_app: Any, db_url: str) -> None:
    """Partition big's 30 instances were started before small's one. Within one claim, partitions take
    turns (a batch of 3: big, small, big; in the order of the line, 3 of big); across claims of one each,
    a full partition is skipped, not a wall before the others (head-of-line blocking)."""
    started = await start_jobs(
        make_app, geste.Queue("fair", partition_concurrency=5), ["big"] * 30 + ["small"]
    )
    small = next(iid for iid, key in started.items() if key == "small")
    storage = create_storage(db_url)
    await storage.open()
    try:
        taken = ids_of(await claim(storage, "fair", 3, 1e9))
        assert len(taken) == 3 and small in taken
        assert [started[i] for i in taken].count("big") == 2
    finally:
        await storage.close()

    started = await start_jobs(
        make_app, geste.Queue("one-each", partition_concurrency=1), ["big"] * 30 + ["small"]
    )
    small = next(iid for iid, key in started.items() if key == "small")
    storage = create_storage(db_url)
    await storage.open()
    try:
        first = ids_of(await claim(storage, "one-each", 1, 1e9))
        second = ids_of(await claim(storage, "one-each", 1, 1e9))
        assert [started[i] for i in first] == ["big"]  # the head of the line
        assert second == [small]  # big is full: small's instance, 30 places behind, comes next
        assert await claim(storage, "one-each", 5, 1e9) == []  # both full
    finally:
        await storage.close()


async def test_the_partition_rate_holds_per_partition(make_app: Any, db_url: str) -> None:
    """2 admissions per partition in any window of 60 s (claims at explicit times): a claim admits 2 of
    each partition and says when the first full window has room again; before that, nothing more."""
    queue = geste.Queue("mail", partition_rate_limit=2, rate_period=60)
    started = await start_jobs(make_app, queue, [k for _ in range(5) for k in ("a", "b")])
    storage = create_storage(db_url)
    await storage.open()
    try:
        first = await claim(storage, "mail", 10, 1000.0)
        assert Counter(started[i] for i in ids_of(first)) == {"a": 2, "b": 2}
        assert first.next_run_at == pytest.approx(1060.0)
        later = await claim(storage, "mail", 10, 1030.0)
        assert ids_of(later) == [] and later.next_run_at == pytest.approx(1060.0)
        again = await claim(storage, "mail", 10, 1060.5)  # each window has room for 2 again
        assert Counter(started[i] for i in ids_of(again)) == {"a": 2, "b": 2}
        assert not set(ids_of(first)) & set(ids_of(again))
    finally:
        await storage.close()


async def test_starts_without_a_key_share_the_key_less_partition(make_app: Any, db_url: str) -> None:
    started = await start_jobs(
        make_app, geste.Queue("mixed", partition_concurrency=1), [None, None, None, "a", "a"]
    )
    storage = create_storage(db_url)
    await storage.open()
    try:
        taken = ids_of(await claim(storage, "mixed", 10, 1e9))
        assert sorted(str(started[i]) for i in taken) == ["None", "a"]  # one of each partition
    finally:
        await storage.close()


async def test_a_queue_without_partition_limits_ignores_the_keys(make_app: Any, db_url: str) -> None:
    """Keys on a queue without partition limits change nothing: its line's order (start order here)."""
    started = await start_jobs(make_app, geste.Queue("plain", concurrency=3), ["a", "a", "a", "b"])
    storage = create_storage(db_url)
    await storage.open()
    try:
        taken = ids_of(await claim(storage, "plain", 10, 1e9))
        assert sorted(taken) == sorted(list(started)[:3])
    finally:
        await storage.close()


def test_partition_options_are_checked() -> None:
    app = geste.App("sqlite:///unused.db")

    @app.workflow
    async def job(ctx: geste.WorkflowContext) -> None:
        return None

    with pytest.raises(ConfigurationError):
        job.options(partition_key="customer-7")  # a partition means something on a queue only
    for bad in ("", 7, "x" * 201):
        with pytest.raises(ConfigurationError):
            job.options(queue="q", partition_key=bad)  # type: ignore[arg-type]
    for limit in (0, -1, 1.5, True):
        with pytest.raises(ConfigurationError):
            geste.Queue("q", partition_concurrency=limit)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            geste.Queue("q", partition_rate_limit=limit)  # type: ignore[arg-type]
    assert job.options(queue="q", partition_key="customer-7").partition_key == "customer-7"


async def test_one_run_per_customer_at_a_time_with_an_app(make_app: Any) -> None:
    """End to end with a worker: 3 customers' imports, 1 at a time per customer, 3 at once overall."""
    running: Counter[str] = Counter()
    most: Counter[str] = Counter()
    app = make_app(queues=[geste.Queue("imports", partition_concurrency=1)])

    @app.activity
    async def load(ctx: geste.ActivityContext, customer: str) -> str:
        running[customer] += 1
        most[customer] = max(most[customer], running[customer])
        await asyncio.sleep(0.02)  # room for another of the customer to start, were it admitted
        running[customer] -= 1
        return customer

    @app.workflow
    async def import_file(ctx: geste.WorkflowContext, customer: str) -> str:
        return await load(ctx, customer)

    async with app:
        handles = [
            await import_file.options(queue="imports", partition_key=c).start(c)
            for _ in range(3)
            for c in ("acme", "globex", "initech")
        ]
        assert [await h.result(timeout=30) for h in handles] == ["acme", "globex", "initech"] * 3
    assert most == {"acme": 1, "globex": 1, "initech": 1}


@pytest.fixture
def workers(tmp_path: Path, db_url: str) -> Iterator[Workers]:
    with Workers(tmp_path, db_url) as group:
        yield group


async def test_four_worker_processes_run_one_per_partition_at_a_time(workers: Workers) -> None:
    from tests.apps.queue_app import QUEUE, build_app

    options: dict[str, Any] = {"queue_concurrency": None, "partition_concurrency": 1}
    async with build_app(workers.url, run_worker=False, **options) as client:
        for n in range(4):
            await workers.spawn(f"w{n}", queue_concurrency=0, partition_concurrency=1, hold=0.1)
        keys = {}
        for i in range(24):
            key = f"customer-{i % 4}"
            handle = await client.workflows["job"].options(queue=QUEUE, partition_key=key).start(i)
            keys[handle.instance_id] = key
        ids = list(keys)
        await wait_until(lambda: all_completed(client, ids), "every queued job to complete", timeout=90)
    runs = workers.entries(event="start") + workers.entries(event="end")
    for key in set(keys.values()):
        peak = most_at_once(e for e in runs if keys[e["instance"]] == key)
        assert peak == 1, f"{peak} runs of partition {key} at once"
    assert most_at_once(runs) >= 2  # the partitions did run side by side


# -- the index the claim reads ----------------------------------------------------------------------------
SEED_PARTITIONS = 200
SEED_PER_PARTITION = 50


async def seed(db_url: str, *, keyed: bool = True, statistics: str = "after") -> None:
    """A queue whose line holds 200 partitions of 50 queued instances each (10,000 rows), written
    straight to the table; without ``keyed``, all in the key-less partition. ``statistics``: the
    table's statistics taken ``"after"`` the rows are in, or ``"before"`` (PostgreSQL: while it was
    empty, as right after a burst of starts, before autovacuum analyses it)."""
    rows = [
        (f"i-{p}-{n}", "w", "pending", "{}", 1.0, 1.0, "seeded", f"k{p:03}" if keyed else "", 0, float(n))
        for p in range(SEED_PARTITIONS)
        for n in range(SEED_PER_PARTITION)
    ]
    columns = "instance_id, workflow_name, status, input, created_at, updated_at, queue, partition_key, "
    columns += "priority, queued_at"
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            conn.executemany(f"INSERT INTO geste_instances ({columns}) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            conn.execute("ANALYZE")
        conn.close()
        return
    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(db_url)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'SET search_path = "{options["schema"]}"')
        if statistics == "before":
            await conn.execute("ANALYZE geste_instances")
        await conn.copy_records_to_table(
            "geste_instances", records=rows, columns=[c.strip() for c in columns.split(",")]
        )
        if statistics == "after":
            await conn.execute("ANALYZE geste_instances")
    finally:
        await conn.close()


async def test_the_partition_claim_reads_the_partition_index(make_app: Any, db_url: str) -> None:
    """On a seeded line of 200 partitions of 50: the loose scan of the partitions and the probe of a
    partition's next instance read geste_instances_queued_partition, and the probe reads one entry (rows
    read proportional to the result, not to the partition's backlog)."""
    async with make_app(run_worker=False):
        pass  # the schema
    await seed(db_url)
    if db_url.startswith("sqlite"):
        queries = load_queries("sqlite")
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            for name in ("queue_partitions", "queue_partition_next"):
                params = {
                    "queue": "seeded",
                    "key": "k100",
                    "priority": 0,
                    "queued_at": 10.0,
                    "instance_id": "",
                }
                plan = " | ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {queries[name]}", params))
                assert "geste_instances_queued_partition" in plan, (name, plan)
                assert "SCAN geste_instances" not in plan.replace("USING", ""), (name, plan)
        conn.close()
        return
    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(db_url)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'SET search_path = "{options["schema"]}"')
        probe = """
            SELECT w.instance_id, w.priority, w.queued_at FROM geste_instances AS w
            WHERE w.queue = 'seeded' AND w.partition_key = 'k100'
              AND w.queued_at IS NOT NULL AND w.status = 'pending'
              AND (w.priority, w.queued_at, w.instance_id) > (0, 10.0::float8, '')
            ORDER BY w.priority, w.queued_at, w.instance_id LIMIT 1"""
        plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {probe}"))
        text = str(plan)
        assert "geste_instances_queued_partition" in text, text
        node = plan[0]["Plan"]["Plans"][0]
        assert node["Actual Rows"] == 1, node  # one entry read for one instance taken
        loose = """
            WITH RECURSIVE parts(k) AS (
                (SELECT w.partition_key FROM geste_instances AS w
                 WHERE w.queue = 'seeded' AND w.queued_at IS NOT NULL AND w.status = 'pending'
                 ORDER BY w.partition_key LIMIT 1)
                UNION ALL
                SELECT (SELECT w.partition_key FROM geste_instances AS w
                        WHERE w.queue = 'seeded' AND w.queued_at IS NOT NULL AND w.status = 'pending'
                          AND w.partition_key > parts.k
                        ORDER BY w.partition_key LIMIT 1)
                FROM parts WHERE parts.k IS NOT NULL)
            SELECT count(*) FROM parts WHERE k IS NOT NULL"""
        assert await conn.fetchval(loose) == SEED_PARTITIONS
        plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {loose}"))
        text = str(plan)
        assert "geste_instances_queued_partition" in text and "Seq Scan" not in text, text
    finally:
        await conn.close()
    # and the claim itself, through the function: 5 partitions' heads for a batch of 5, among 200
    storage = create_storage(db_url)
    await storage.open()
    try:
        await raw_query(
            db_url,
            "INSERT INTO geste_queues (name, partition_concurrency, updated_at) VALUES ('seeded', 1, 0)",
        )
        taken = await claim(storage, "seeded", 5, 1e9)
        assert len({i.split("-")[1] for i in ids_of(taken)}) == 5
    finally:
        await storage.close()


async def nested_plans(db_url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    """Run ``query`` and return the plans (EXPLAIN ANALYZE, JSON) of every statement it ran, those of
    the plpgsql functions it called included (auto_explain, loaded in this session only)."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(db_url)
    conn = await asyncpg.connect(dsn)
    plans: list[dict[str, Any]] = []

    def logged(_conn: Any, message: Any) -> None:
        _, found, text = message.message.partition("plan:\n")
        if found:
            plans.append(json.loads(text))

    try:
        await conn.execute(f'SET search_path = "{options["schema"]}"')
        await conn.execute("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_nested_statements = on", "log_analyze = on"):
            await conn.execute(f"SET auto_explain.{setting}")
        await conn.execute("SET auto_explain.log_format = json")
        await conn.execute("SET client_min_messages = log")
        conn.add_log_listener(logged)
        await conn.fetch(query, *args)
        await asyncio.sleep(0)  # the notices are dispatched by the event loop
    finally:
        await conn.close()
    return plans


@pytest.mark.parametrize("partitioned", [False, True], ids=["plain", "partitioned"])
async def test_the_claim_admits_its_picks_by_key_whatever_the_statistics(
    make_app: Any, db_url: str, partitioned: bool
) -> None:
    """A claim of 50 from a line of 10,000 queued instances, the table's statistics taken while it was
    empty (right after a burst of starts): the admitting UPDATE finds the 50 by primary key, and the
    whole claim reads rows proportional to what it takes. Before schema 28 it read the whole line through
    a partial index, filtered by id (8 ms a claim instead of 2 with 3,000 queued); on SQLite the
    partitioned admission searched the status index (every pending instance)."""
    from .support import instances_read, plan_nodes

    async with make_app(run_worker=False):
        pass  # the schema
    if db_url.startswith("sqlite"):
        queries = load_queries("sqlite")
        params = {"ids": "[]", "worker_id": "w", "lease_prefix": "p/", "lock_expires_at": 1.0, "now": 1.0}
        params |= {"queue": "seeded", "n": 50}
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            for name in ("queue_take", "queue_take_ids"):
                plan = [r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {queries[name]}", params)]
                assert "(instance_id=?)" in plan[0], (name, plan)  # the UPDATE's rows: by key
                assert not any("geste_instances_by_status" in step for step in plan), (name, plan)
        conn.close()
        return
    await seed(db_url, keyed=partitioned, statistics="before")
    limits = "partition_concurrency" if partitioned else "concurrency"
    row = f"INSERT INTO geste_queues (name, {limits}, updated_at) VALUES ('seeded', 1000, 0)"
    await raw_query(db_url, row)
    plans = await nested_plans(
        db_url, "SELECT * FROM geste_queue_claim('seeded', 50, 'w', 'p/', 1e9, 1e9 + 60)"
    )
    updates = [p for p in plans if p["Query Text"].lstrip().startswith("UPDATE")]
    assert len(updates) == 1, [p["Query Text"] for p in plans]
    update = updates[0]["Plan"]
    assert update["Actual Rows"] == 50, update
    nodes = plan_nodes(update)
    assert "geste_instances_pkey" in {n.get("Index Name") for n in nodes}, nodes
    assert instances_read(nodes) <= 2 * 50, nodes  # the pick or the lookups (50), and the 50 updated
    read = [(p["Query Text"][:60], instances_read(plan_nodes(p["Plan"]))) for p in plans]
    # plain: the pick and the update, the busy count and the emptiness probe; partitioned: also the scan
    # of the partitions by head (two entries each, whatever their backlog) and the 50 keyset probes
    bound = 4 * 50 + 10 + (2 * SEED_PARTITIONS + 10 if partitioned else 0)
    assert sum(n for _, n in read) <= bound, read


async def test_an_upgrade_from_schema_20_puts_unfinished_queue_rows_in_the_key_less_partition(
    db_url: str,
) -> None:
    """Queue rows written by schema 20 (one admitted and running, one queued) are in their queue's
    key-less partition once upgraded: with 1 per partition, the queued one waits for the running one."""
    from geste.storage.base import QueueRow

    from .support import database_at_version

    insert = "INSERT INTO {t}geste_instances "
    insert += "(instance_id, workflow_name, status, input, created_at, updated_at, queue, queued_at) VALUES "
    await database_at_version(
        db_url,
        20,
        [
            insert + "('held', 'w', 'running', 'null', 1, 1, 'up', NULL)",
            insert + "('line', 'w', 'pending', 'null', 2, 2, 'up', 2)",
            "INSERT INTO {t}geste_queues (name, updated_at) VALUES ('up', 0)",
        ],
    )
    storage = create_storage(db_url)
    await storage.open()
    try:
        rows = await raw_query(db_url, "SELECT instance_id, partition_key FROM geste_instances ORDER BY 1")
        assert [(r["instance_id"], r["partition_key"]) for r in rows] == [("held", ""), ("line", "")]
        await storage.queue_upsert(QueueRow("up", partition_concurrency=1), 0.0)
        assert await claim(storage, "up", 5, 1e9) == []  # the running one holds the partition's slot
        await raw_query(db_url, "UPDATE geste_instances SET status = 'completed' WHERE instance_id = 'held'")
        assert ids_of(await claim(storage, "up", 5, 1e9)) == ["line"]
    finally:
        await storage.close()


async def test_a_worker_wakes_when_a_partitions_rate_window_has_room(tmp_path: Path) -> None:
    """Under the virtual clock: 1 admission per partition a minute, two partitions of 3. The claim that
    found both windows full told the worker when one has room again; ``advance`` stops there (no real
    time, no poll would ring it), and each minute admits one more of each."""
    from datetime import timedelta

    from geste.testing import WorkflowEnvironment

    app = geste.App(f"sqlite:///{tmp_path / 'unused.db'}")
    mail = app.queue("mail", partition_rate_limit=1, rate_period=60)

    @app.workflow
    async def send(ctx: geste.WorkflowContext, x: int) -> int:
        return x

    async with WorkflowEnvironment(app) as env:
        handles = [await send.options(queue=mail, partition_key=k).start(x) for x in range(3) for k in "ab"]

        async def completed() -> int:
            done = [(await app.get_instance(h.instance_id)).status for h in handles]
            return done.count(geste.Status.COMPLETED)

        await env.advance(timedelta(seconds=30))
        assert await completed() == 2  # one of each partition in the first window
        await env.advance(timedelta(seconds=60))
        assert await completed() == 4
        await env.advance(timedelta(seconds=60))
        assert await completed() == 6
        assert [await h.result() for h in handles] == [0, 0, 1, 1, 2, 2]


async def test_start_with_id_takes_the_partition_key(make_app: Any, db_url: str) -> None:
    async with make_app(run_worker=False, queues=[geste.Queue("ids", partition_concurrency=1)]) as app:

        @app.workflow
        async def noop(ctx: geste.WorkflowContext) -> None:
            return None

        first = await noop.options(queue="ids", partition_key="customer-7").start_with_id("order-1")
        again = await noop.options(queue="ids", partition_key="customer-7").start_with_id("order-1")
        assert first.created and not again.created
    rows = await raw_query(db_url, "SELECT partition_key FROM geste_instances WHERE instance_id = 'order-1'")
    assert rows == [{"partition_key": "customer-7"}]
