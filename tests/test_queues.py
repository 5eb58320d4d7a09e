"""Queues (schema 20; docs/queues.md, docs/design.md "Queues"), on each backend.

The global limit is checked where it can break: worker processes racing on one queue (each run logs its
start and end; the most runs that ever overlapped is computed from the log) and claimers racing at the
storage level (separate connections, one batch each). Priority order with one worker, deduplication, and a
dead worker's slot coming back once its lease ran out. Every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

import geste
from geste.errors import ConfigurationError, InstanceAlreadyExistsError, QueueDeduplicated
from geste.runtime.routing import score
from geste.storage import create_storage

from .processes import WorkerProcesses
from .support import raw_query, wait_until

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `tests.apps` is importable however pytest was started
    sys.path.insert(0, str(ROOT))

from tests.apps.queue_app import QUEUE, build_app  # noqa: E402
from tests.conftest import POSTGRES_URL, _admin  # noqa: E402


class Workers(WorkerProcesses):
    """Worker processes of ``tests/apps/queue_app.py`` on one database: a log of every run's ``start`` and
    ``end`` and of every admitting claim (``admit``)."""

    def __init__(self, folder: Path, url: str) -> None:
        super().__init__(folder, url, "queue_app")


@pytest.fixture
def workers(tmp_path: Path, db_url: str) -> Iterator[Workers]:
    with Workers(tmp_path, db_url) as group:
        yield group


def most_at_once(entries: Iterable[dict[str, Any]]) -> int:
    """The most runs in progress at one moment: +1 at each start, -1 at each end (an end first on a tie:
    a run that ended as another started did not overlap it)."""
    moves = sorted((e["t"], 0 if e["event"] == "end" else 1) for e in entries)
    running = peak = 0
    for _, move in moves:
        running += 1 if move else -1
        peak = max(peak, running)
    return peak


async def all_completed(app: geste.App, ids: list[str]) -> bool:
    for iid in ids:
        if (await app.get_instance(iid)).status != geste.Status.COMPLETED:
            return False
    return True


async def test_four_worker_processes_never_run_more_than_the_global_limit(workers: Workers) -> None:
    async with build_app(workers.url, run_worker=False) as client:  # creates the schema and the queue
        for n in range(4):
            await workers.spawn(f"w{n}", queue_concurrency=3, hold=0.2)
        handles = [await client.workflows["job"].options(queue=QUEUE).start(i) for i in range(24)]
        ids = [h.instance_id for h in handles]
        await wait_until(lambda: all_completed(client, ids), "every queued job to complete", timeout=90)
        assert [await h.result() for h in handles] == list(range(24))
    runs = workers.entries(event="start") + workers.entries(event="end")
    peak = most_at_once(runs)
    assert peak <= 3, f"{peak} runs of a queue limited to 3 at once"
    assert peak >= 2  # the measure measured something: the queue did run instances side by side
    assert {e["instance"] for e in workers.entries(event="end")} == set(ids)


async def test_concurrent_claimers_admit_no_more_than_the_limit(make_app: Any, db_url: str) -> None:
    """Eight claimers on eight connections race for one queue of limit 3 with 20 instances waiting: the
    batches they took add up to 3, and once those end, the next round admits 3 more."""
    async with make_app(run_worker=False, queues=[geste.Queue("race", concurrency=3)]) as app:

        @app.workflow
        async def noop(ctx: geste.WorkflowContext) -> None:
            return None

        for _ in range(20):
            await noop.options(queue="race").start()
    # the App is closed: its workflow is registered on it only; the storages below claim by queue
    storages = [create_storage(db_url) for _ in range(8)]
    for storage in storages:
        await storage.open()
    try:

        async def claim(n: int) -> int:
            now = app.clock()
            return len(await storages[n].queue_claim(f"c{n}", now, now + 60, 10, queue="race"))

        for _ in range(3):
            taken = await asyncio.gather(*(claim(n) for n in range(8)))
            assert sum(taken) == 3, taken
            busy = await raw_query(
                db_url,
                "SELECT instance_id FROM geste_instances WHERE queue = $1 AND queued_at IS NULL "
                "AND status = 'running'",
                "race",
            )
            assert len(busy) == 3
            for row in busy:  # the admitted ones end: their slots are free again
                await raw_query(
                    db_url,
                    "UPDATE geste_instances SET status = 'completed' WHERE instance_id = $1",
                    row["instance_id"],
                )
    finally:
        for storage in storages:
            await storage.close()


async def test_priority_then_start_order_with_one_worker(make_app: Any) -> None:
    order: list[int] = []
    queues = [geste.Queue("line", concurrency=1)]

    def declare(app: geste.App) -> geste.Workflow[[int], int]:
        @app.activity
        async def note(ctx: geste.ActivityContext, x: int) -> int:
            order.append(x)
            return x

        @app.workflow
        async def job(ctx: geste.WorkflowContext, x: int) -> int:
            return await note(ctx, x)

        return job

    starter = make_app(run_worker=False, queues=queues)
    job = declare(starter)
    async with starter:  # started while no worker runs: the line's order decides, not the start's timing
        handles = []
        for x, priority in [(1, 5), (2, 1), (3, 3), (4, 1), (5, 0), (6, 5)]:
            handles.append(await job.options(queue="line", priority=priority).start(x))
    runner = make_app(queues=queues)
    job = declare(runner)
    async with runner:
        for handle in handles:
            await runner.get_handle(handle.instance_id).result(timeout=30)
    assert order == [5, 2, 4, 3, 1, 6]


async def test_a_dedup_id_returns_the_unfinished_instance_holding_it(make_app: Any) -> None:
    queues = [geste.Queue("once", concurrency=5)]

    def declare(app: geste.App) -> geste.Workflow[[int], int]:
        @app.workflow
        async def job(ctx: geste.WorkflowContext, x: int) -> int:
            return x

        return job

    starter = make_app(run_worker=False, queues=queues)
    job = declare(starter)
    async with starter:
        first = await job.options(queue="once", dedup_id="order-1").start(1)
        again = await job.options(queue="once", dedup_id="order-1").start(2)
        other = await job.options(queue="once", dedup_id="order-2").start(3)
        assert first.created and not again.created and other.created
        assert again.instance_id == first.instance_id != other.instance_id
        with pytest.raises(ConfigurationError):
            job.options(dedup_id="order-1")  # a dedup id means something on a queue only
    runner = make_app(queues=queues)
    job = declare(runner)
    async with runner:
        assert await runner.get_handle(first.instance_id).result(timeout=30) == 1
        later = await job.options(queue="once", dedup_id="order-1").start(4)  # ended: the id is free
        assert later.created and later.instance_id != first.instance_id
        assert await later.result(timeout=30) == 4


async def test_a_dead_workers_slot_comes_back_when_its_lease_runs_out(workers: Workers) -> None:
    async with build_app(workers.url, run_worker=False, queue_concurrency=1) as client:
        first = await workers.spawn("first", queue_concurrency=1, lock_timeout=1.0)
        held = await client.workflows["blocked"].options(queue=QUEUE).start(1)
        started = lambda: workers.entries(event="start", instance=held.instance_id)  # noqa: E731
        await wait_until(started, "the first to run")
        waiting = await client.workflows["job"].options(queue=QUEUE).start(2)
        rows = await raw_query(
            workers.url, "SELECT queued_at FROM geste_instances WHERE instance_id = $1", waiting.instance_id
        )
        assert rows[0]["queued_at"] is not None  # the one slot is held: still queued
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
        (workers.markers / f"go-{held.instance_id}").touch()
        await workers.spawn("second", queue_concurrency=1, lock_timeout=1.0)
        assert await held.result(timeout=60) == 1  # taken over once its lease ran out
        assert await waiting.result(timeout=60) == 2
    taken_over = workers.entries(event="end", instance=held.instance_id, worker="second")
    ran = workers.entries(event="start", instance=waiting.instance_id)
    assert taken_over and ran and ran[0]["t"] >= taken_over[0]["t"]
    assert [e["worker"] for e in ran] == ["second"]


async def test_a_queued_instance_cancelled_never_runs_and_frees_its_dedup_id(make_app: Any) -> None:
    ran: list[int] = []
    queues = [geste.Queue("once", concurrency=1)]

    def declare(app: geste.App) -> geste.Workflow[[int], int]:
        @app.workflow
        async def job(ctx: geste.WorkflowContext, x: int) -> int:
            ran.append(x)
            return x

        return job

    starter = make_app(run_worker=False, queues=queues)
    job = declare(starter)
    async with starter:
        first = await job.options(queue="once", dedup_id="d").start(1)
        await starter.cancel(first.instance_id)
        assert (await starter.get_instance(first.instance_id)).status == geste.Status.CANCELLED
        second = await job.options(queue="once", dedup_id="d").start(2)
        assert second.created and second.instance_id != first.instance_id
    runner = make_app(queues=queues)
    declare(runner)
    async with runner:
        assert await runner.get_handle(second.instance_id).result(timeout=30) == 2
    assert ran == [2]


async def test_a_worker_admits_no_more_than_its_worker_concurrency(make_app: Any) -> None:
    running: list[int] = []
    most = 0
    app = make_app(queues=[geste.Queue("per-worker", worker_concurrency=2)])

    @app.activity
    async def work(ctx: geste.ActivityContext, x: int) -> int:
        nonlocal most
        running.append(x)
        most = max(most, len(running))
        await asyncio.sleep(0.05)  # room for the others to start, were they admitted
        running.remove(x)
        return x

    @app.workflow
    async def job(ctx: geste.WorkflowContext, x: int) -> int:
        return await work(ctx, x)

    async with app:
        handles = [await job.options(queue="per-worker").start(x) for x in range(8)]
        assert [await h.result(timeout=30) for h in handles] == list(range(8))
    assert most == 2


async def test_four_worker_processes_never_admit_more_than_the_rate_in_any_window(workers: Workers) -> None:
    """A queue of 4 admissions per second, and no concurrency limit: whatever window of one second is
    looked at, the admissions the claims made in it (the times their rate window records) add up to 4 at
    most; and the queue goes on at its rate (a full window wakes the workers when it has room again)."""
    options: dict[str, Any] = {"queue_concurrency": None, "rate_limit": 4, "rate_period": 1.0}
    async with build_app(workers.url, run_worker=False, **options) as client:
        for n in range(4):
            await workers.spawn(f"w{n}", queue_concurrency=0, rate_limit=4, rate_period=1.0)
        handles = [await client.workflows["job"].options(queue=QUEUE).start(i) for i in range(12)]
        ids = [h.instance_id for h in handles]
        await wait_until(lambda: all_completed(client, ids), "every queued job to complete", timeout=90)
    admissions = sorted((e["t"], e["n"]) for e in workers.entries(event="admit"))
    assert sum(n for _, n in admissions) == 12
    for start, _ in admissions:
        in_window = sum(n for t, n in admissions if start <= t < start + 1.0)
        assert in_window <= 4, (start, admissions)
    assert admissions[-1][0] - admissions[0][0] >= 2.0  # 12 at 4 a second: three windows at least


async def test_a_queued_instance_resumed_stays_queued(make_app: Any, db_url: str) -> None:
    """``app.resume`` makes an instance runnable now; a queued one waits for its queue's claim, whatever
    an operator does: made runnable, the ordinary claims would run it outside the queue's limits."""
    async with make_app(run_worker=False, queues=[geste.Queue("held", concurrency=1)]) as app:

        @app.workflow
        async def job(ctx: geste.WorkflowContext) -> None:
            return None

        handle = await job.options(queue="held").start()
        await app.resume(handle.instance_id, force=True)
        rows = await raw_query(
            db_url, "SELECT run_at, queued_at FROM geste_instances WHERE instance_id = $1", handle.instance_id
        )
        assert rows[0]["run_at"] is None and rows[0]["queued_at"] is not None


async def test_the_test_environment_moves_its_clock_to_a_rate_window_with_room(tmp_path: Path) -> None:
    """Under ``geste.testing``'s virtual clock, ``advance`` stops when a full rate window has room again
    (the worker's timer for it, which no real time would ring)."""
    from datetime import timedelta

    from geste.testing import WorkflowEnvironment

    app = geste.App(f"sqlite:///{tmp_path / 'unused.db'}")
    mail = app.queue("mail", rate_limit=2, rate_period=60)

    @app.workflow
    async def send(ctx: geste.WorkflowContext, x: int) -> int:
        return x

    async with WorkflowEnvironment(app) as env:
        handles = [await send.options(queue=mail).start(x) for x in range(5)]
        await env.advance(timedelta(seconds=30))
        done = [(await app.get_instance(h.instance_id)).status for h in handles]
        assert done.count(geste.Status.COMPLETED) == 2  # the first window's two
        await env.advance(timedelta(seconds=100))  # two more windows
        done = [(await app.get_instance(h.instance_id)).status for h in handles]
        assert done == [geste.Status.COMPLETED] * 5
        assert [await h.result() for h in handles] == list(range(5))


async def test_a_dedup_id_held_raises_with_the_raise_policy(make_app: Any) -> None:
    """``on_duplicate="raise"``: a start whose dedup id an unfinished instance of the queue holds starts
    nothing and raises ``QueueDeduplicated`` naming the queue, the id and the holder; a start of the
    holder's own id again is no duplicate (it returns it, as any start of an existing id does)."""
    async with make_app(run_worker=False, queues=[geste.Queue("strict", concurrency=1)]) as app:

        @app.workflow
        async def job(ctx: geste.WorkflowContext, x: int) -> int:
            return x

        strict = job.options(queue="strict", dedup_id="cart-7", on_duplicate="raise")
        first = await strict.start(1)
        assert first.created
        with pytest.raises(QueueDeduplicated) as raised:
            await strict.start(2)
        assert isinstance(raised.value, InstanceAlreadyExistsError)
        error = raised.value
        assert (error.queue, error.dedup_id, error.instance_id) == ("strict", "cart-7", first.instance_id)
        again = await strict.start_with_id(first.instance_id, 1)  # its own id: not a duplicate
        assert again.instance_id == first.instance_id and not again.created
        rows = await app.list_instances(workflow="job")
        assert [r.instance_id for r in rows] == [first.instance_id]  # the refused start wrote nothing
        await app.cancel(first.instance_id)  # ended: the id is free again
        later = await strict.start(3)
        assert later.created and later.instance_id != first.instance_id
        with pytest.raises(ConfigurationError):
            job.options(queue="strict", on_duplicate="raise")  # nothing to deduplicate
        with pytest.raises(ConfigurationError):
            job.options(queue="strict", dedup_id="x", on_duplicate="ignore")  # type: ignore[arg-type]


# -- routed queue wake-ups (schema 23), PostgreSQL --------------------------------------------------------
@pytest.fixture
def own_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own, for the tests that count claims: channels are per
    database, and other test runs in a shared one send notifications an older geste formats without a
    schema (each makes every worker here run a whole claim round)."""
    name = f"geste_queues_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def views_settled(url: str, worker_ids: list[str]) -> None:
    """Wait until every worker's row says it listens and serves the queue, then until each has heartbeated
    since (its heartbeat reads the others' rows: from then on every view holds every worker)."""

    async def all_listed() -> float | None:
        rows = await raw_query(url, "SELECT worker_id, listener, queues FROM geste_workers")
        ready = {
            r["worker_id"]
            for r in rows
            if r["listener"]
            and json.loads(r["listener"]).get("state") == "listening"
            and QUEUE in json.loads(r["queues"] or "[]")
        }
        return time.time() if ready >= set(worker_ids) else None

    since: float = await wait_until(all_listed, "every worker to listen and list its queues", timeout=30)

    async def all_beat() -> bool:
        rows = await raw_query(url, "SELECT worker_id, heartbeat_at FROM geste_workers")
        return all(r["heartbeat_at"] > since for r in rows if r["worker_id"] in worker_ids)

    await wait_until(all_beat, "every worker to heartbeat again", timeout=30)


async def test_a_start_onto_a_queue_costs_one_claim_whatever_the_workers(
    tmp_path: Path, own_database: str
) -> None:
    """Four worker processes serve the queue; starts one at a time, each awaited. Each start costs the
    cluster one claim of the queue (the routed one, which admits it) plus one at its end (the slot freed:
    the admitting worker claims the queue again, an index probe when nothing waits): 2 per start, whatever
    the workers. Before routing, every serving worker ran a whole claim round at each start: 4 + 1."""
    starts = 12
    with Workers(tmp_path, own_database) as workers:
        async with build_app(own_database, run_worker=False) as client:
            ids = [f"w{n}" for n in range(4)]
            for worker_id in ids:
                await workers.spawn(worker_id, queue_concurrency=3, hold=0.01, lock_timeout=3.0)
            await views_settled(own_database, ids)
            before = len(workers.entries(event="claim"))
            for n in range(starts):
                handle = await client.workflows["job"].options(queue=QUEUE).start(n)
                assert await handle.result(timeout=30) == n
            claims = lambda: workers.entries(event="claim")[before:]  # noqa: E731
            await wait_until(lambda: len(claims()) >= 2 * starts, "each run's end to claim the queue")
            found = claims()
    admitting = [e for e in found if e["n"]]
    print(
        f"{len(found)} queue claims for {starts} starts with 4 workers; admitted by",
        Counter(e["worker"] for e in admitting),
    )
    assert len(admitting) == starts and all(e["n"] == 1 for e in admitting)
    assert len(found) <= 2 * starts + 2, found  # a view changing mid-test may cost one more
    assert len({e["worker"] for e in admitting}) >= 2  # spread by the instance id, not one worker's


async def test_a_start_routed_to_a_frozen_worker_is_admitted_by_the_poll_net(
    tmp_path: Path, own_database: str
) -> None:
    """The worker a start is routed to is frozen (SIGSTOP) when its notification comes: the other worker
    does not claim for it, but its poll net (a whole round claims its queues) admits the instance."""
    with Workers(tmp_path, own_database) as workers:
        async with build_app(own_database, run_worker=False) as client:
            frozen = await workers.spawn("w0", lock_timeout=3.0, notify_fallback_interval=1.0)
            await workers.spawn("w1", lock_timeout=3.0, notify_fallback_interval=1.0)
            await views_settled(own_database, ["w0", "w1"])
            key = next(
                k for n in range(1000) if score(k := f"q-{n}", "w0") > score(k, "w1")
            )  # its start is routed to w0
            frozen.send_signal(signal.SIGSTOP)
            try:
                handle = await client.workflows["job"].options(queue=QUEUE).start_with_id(key, 7)
                assert await handle.result(timeout=30) == 7
            finally:
                frozen.send_signal(signal.SIGCONT)
    assert [e["worker"] for e in workers.entries(event="end", instance=key)] == ["w1"]


async def test_a_backlog_that_fills_its_worker_is_handed_on_to_another(
    tmp_path: Path, own_database: str
) -> None:
    """A backlog of 4 with one notification, routed to w0, whose 2 slots it fills: w0's claim took all it
    asked for and left it full, so it hands the queue on (one notification, avoiding itself), and w1
    admits the other 2 after it (its poll net, every lock_timeout here, would take them later)."""
    with Workers(tmp_path, own_database) as workers:
        async with build_app(own_database, run_worker=False) as client:
            for worker_id in ("w0", "w1"):
                await workers.spawn(worker_id, queue_concurrency=0, concurrency=2, lock_timeout=3.0)
            await views_settled(own_database, ["w0", "w1"])
            handles = [await client.workflows["blocked"].options(queue="gate").start(n) for n in range(4)]
            key = next(k for n in range(1000) if score(k := f"b-{n}", "w0") > score(k, "w1"))
            payload = json.dumps({"queue": QUEUE, "instance_id": key, "schema": "public"})
            await raw_query(
                own_database,
                "WITH moved AS (UPDATE geste_instances SET queue = $1 WHERE queue = 'gate' RETURNING 1) "
                "SELECT pg_notify('geste_workflow_resumable', $2), (SELECT count(*) FROM moved)",
                QUEUE,
                payload,
            )
            started = lambda: len(workers.entries(event="start")) == 4  # noqa: E731
            await wait_until(started, "the 4 to start on the 2 workers", timeout=15)
            for handle in handles:
                workers.go(handle.instance_id)
            assert [await h.result(timeout=30) for h in handles] == list(range(4))
    assert Counter(e["worker"] for e in workers.entries(event="start")) == {"w0": 2, "w1": 2}
    hand_on = min(workers.entries(event="hand_on"), key=lambda e: e["t"])  # (a stop hands on its rest)
    assert hand_on["worker"] == "w0" and hand_on["queue"] == QUEUE
    (taken,) = [e for e in workers.entries(event="claim", worker="w1") if e["n"]]
    assert taken["n"] == 2 and taken["t"] >= hand_on["t"]


async def test_the_registry_lists_the_queues_a_worker_serves(make_app: Any, db_url: str) -> None:
    """Schema 23, both backends: each worker's row lists its queues (sorted), what the listeners route a
    queue's starts over; a worker serving none lists none."""
    queues = [geste.Queue("mail", rate_limit=5), geste.Queue("alpha", concurrency=2)]
    async with make_app(worker_id="served", queues=queues) as app:

        @app.workflow
        async def noop(ctx: geste.WorkflowContext) -> None:
            return None

        rows = await raw_query(db_url, "SELECT queues FROM geste_workers WHERE worker_id = $1", "served")
        assert [json.loads(r["queues"]) for r in rows] == [["alpha", "mail"]]
        rows = await app.storage.list_workers(10)
        assert [json.loads(r.queues or "null") for r in rows if r.worker_id == "served"] == [
            ["alpha", "mail"]
        ]
    async with make_app(worker_id="none") as plain:
        rows = await raw_query(db_url, "SELECT queues FROM geste_workers WHERE worker_id = $1", "none")
        assert [json.loads(r["queues"]) for r in rows] == [[]]
        assert plain.queues == {}
