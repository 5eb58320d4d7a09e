"""The retention of finished instances (issue 21; docs/retention.md): ``App.prune``, ``geste prune`` and the
workers' chore (``App(retention=...)``) delete the finished instances past the age with every row of
theirs, in bounded batches, and keep what something still needs.

Each seeded instance has one row in every table that holds rows of an instance (written by SQL, so that
every table is covered whatever workflows would write); the tests count the rows of each instance in
each table before and after. Kept whatever their age: an unfinished instance, a recent one, the
finished child of an unfinished parent, the finished parent of an unfinished child, and an instance
whose outbox holds an event not delivered yet (pending or dead). Channel messages are not an instance's
(the channel cleanup deletes them once no subscriber needs them): the retention leaves them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import pytest

import geste
from geste.errors import ConfigurationError

from .support import raw_query, run_cli, wait_until

MakeApp = Callable[..., geste.App]

DAY = 86400.0

PER_INSTANCE = {  # every table holding rows of an instance, and a row of it
    "geste_history": "INSERT INTO geste_history (instance_id, seq, kind, name, created_at) "
    "VALUES ($1, 1, 'activity', 'a', $2)",
    "geste_runs": "INSERT INTO geste_runs (instance_id, run, input, started_at, ended_at, steps, ended_as) "
    "VALUES ($1, 1, '{}', $2, $2, 1, 'continued')",
    "geste_run_history": "INSERT INTO geste_run_history (instance_id, run, seq, kind, name, created_at) "
    "VALUES ($1, 1, 1, 'continue_as_new', 'c', $2)",
    "geste_timers": "INSERT INTO geste_timers (instance_id, seq, expires_at) VALUES ($1, 1, $2)",
    "geste_event_waits": "INSERT INTO geste_event_waits (instance_id, event_type, since) "
    "VALUES ($1, 't', $2)",
    "geste_event_deliveries": "INSERT INTO geste_event_deliveries (instance_id, event_seq) VALUES ($1, 7)",
    "geste_channel_subscriptions": "INSERT INTO geste_channel_subscriptions "
    "(channel, instance_id, mode, cursor_seq, created_at) VALUES ('c', $1, 'broadcast', 0, $2)",
    "geste_outbox": "INSERT INTO geste_outbox (event_id, instance_id, step_seq, event_type, source, status, "
    "created_at, updated_at, delivered_at) VALUES ('ev-' || $1, $1, 1, 't', 's', 'delivered', $2, $2, $2)",
    "geste_retries": "INSERT INTO geste_retries (instance_id, retry, retried_at, from_seq, removed) "
    "VALUES ($1, 1, $2, 1, '[]')",
    "geste_result_waiters": "INSERT INTO geste_result_waiters (instance_id, waiter, process, expires_at) "
    "VALUES ($1, 'w', 'p', $2)",
    "geste_state": "INSERT INTO geste_state (instance_id, key, version, value, run, seq, created_at) "
    "VALUES ($1, 'k', 1, '1', 1, 1, $2)",
    "geste_streams": "INSERT INTO geste_streams (instance_id, key, position, writer, item, written_at) "
    "VALUES ($1, 'k', 1, 'w', '1', $2)",
    "geste_stream_heads": "INSERT INTO geste_stream_heads (instance_id, key, next_position) "
    "VALUES ($1, 'k', 2)",
    "geste_stream_readers": "INSERT INTO geste_stream_readers "
    "(instance_id, key, reader, process, expires_at) VALUES ($1, 'k', 'r', 'p', $2)",
}
TABLES = ["geste_instances", *PER_INSTANCE]
PG_ONLY = {"geste_result_waiters", "geste_stream_readers"}  # SQLite has no process waiting by registration


def tables(url: str) -> list[str]:
    return [t for t in TABLES if not (url.startswith("sqlite") and t in PG_ONLY)]


FUTURE = {"geste_timers", "geste_result_waiters", "geste_stream_readers"}

# (instance id, status, days since its end (None: unfinished), parent id): the kept ones ended first, so
# that a small batch reads only kept instances before it reaches those it deletes
SEEDED: list[tuple[str, str, float | None, str | None]] = [
    ("running-parent", "running", None, None),
    ("child-of-running", "completed", 4, "running-parent"),  # its parent still reads its outcome
    ("parent-of-waiting", "completed", 4, None),
    ("waiting-child", "waiting", None, "parent-of-waiting"),  # it reports to its parent at its end
    ("pending-outbox", "completed", 4, None),  # an event still to be sent
    ("dead-outbox", "failed", 4, None),  # an event an operator may send again
    ("old-completed", "completed", 3, None),
    ("old-failed", "failed", 3, None),
    ("old-cancelled", "cancelled", 3, None),
    ("done-parent", "completed", 3, None),
    ("done-child", "completed", 2.5, "done-parent"),  # both finished: each goes at its own age
    ("orphan", "completed", 2, "deleted-long-ago"),
    ("recent", "completed", 0.5, None),
    ("waiting", "waiting", None, None),
]
DELETED = {"old-completed", "old-failed", "old-cancelled", "done-parent", "done-child", "orphan"}
KEPT = {row[0] for row in SEEDED} - DELETED


async def seed(url: str, now: float) -> None:
    for instance_id, status, days, parent in SEEDED:
        ended = None if days is None else now - days * DAY
        await raw_query(
            url,
            "INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, "
            "finished_at, parent_id) VALUES ($1, 'w', $2, '{}', $3, $4, $5, $6)",
            instance_id,
            status,
            now - 5 * DAY,
            ended if ended is not None else now,
            ended,
            parent,
        )
        for table, insert in PER_INSTANCE.items():
            if table not in tables(url):
                continue
            # expiries ahead (else the timer loop and the cleanup of expired registrations take them)
            at = now + 5 * DAY if table in FUTURE else now - 5 * DAY
            await raw_query(url, insert, *((instance_id, at) if "$2" in insert else (instance_id,)))
    for instance_id, status in (("pending-outbox", "pending"), ("dead-outbox", "dead")):
        await raw_query(
            url,
            "INSERT INTO geste_outbox (event_id, instance_id, step_seq, event_type, source, status, "
            "created_at, updated_at) VALUES ($1, $2, 2, 't', 's', $3, $4, $4)",
            f"undelivered-{instance_id}",
            instance_id,
            status,
            now,
        )
    # a message an old instance sent, which a waiting subscriber still needs: the channel's, not the
    # instance's (the channel cleanup decides)
    await raw_query(
        url,
        "INSERT INTO geste_channel_messages (message_id, channel, data, sender_instance_id, created_at) "
        "VALUES ('m1', 'c', '1', 'old-completed', $1)",
        now - 5 * DAY,
    )


async def rows_of(url: str) -> dict[str, dict[str, int]]:
    """Per table, the rows of each instance."""
    counts: dict[str, dict[str, int]] = {}
    for table in tables(url):
        rows = await raw_query(url, f"SELECT instance_id, count(*) AS n FROM {table} GROUP BY instance_id")
        counts[table] = {r["instance_id"]: int(r["n"]) for r in rows}
    return counts


def check_pruned(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], ignore: tuple[str, ...] = ()
) -> None:
    for table in before:
        if table in ignore:
            assert not set(after[table]) & DELETED, table
            continue
        assert set(before[table]) >= {row[0] for row in SEEDED}, table  # every instance had rows there
        kept = {k: v for k, v in before[table].items() if k not in DELETED}
        assert after[table] == kept, table  # the deleted ones have none left, the others all theirs


async def test_prune_deletes_old_finished_instances_with_all_their_rows(
    make_app: MakeApp, db_url: str
) -> None:
    async with make_app(run_worker=False) as app:
        now = app.clock()
        await seed(db_url, now)
        before = await rows_of(db_url)
        assert before["geste_outbox"]["pending-outbox"] == 2
        dry = await app.prune(DAY, dry_run=True)
        assert (dry.instances, dry.rows, dry.dry_run) == (len(DELETED), 0, True)
        assert await rows_of(db_url) == before  # a dry run deletes nothing
        done = await app.prune(timedelta_days(1))
        after = await rows_of(db_url)
        check_pruned(before, after)
        assert done.instances == len(DELETED)
        assert done.rows == len(DELETED) * len(tables(db_url))  # one row per table each
        assert done.kept == 4  # the finished ones past the age something still needs
        assert after["geste_outbox"]["pending-outbox"] == 2  # its delivered event too: it stays whole
        messages = await raw_query(db_url, "SELECT message_id FROM geste_channel_messages")
        assert [m["message_id"] for m in messages] == ["m1"]
        again = await app.prune(DAY)
        assert (again.instances, again.rows, again.kept) == (0, 0, 4)
        # once the child's parent ended and the event was delivered, they go as well
        await raw_query(
            db_url,
            "UPDATE geste_instances SET status = 'completed', finished_at = $1 WHERE instance_id = $2",
            now - 2 * DAY,
            "running-parent",
        )
        await raw_query(
            db_url, "UPDATE geste_outbox SET status = 'delivered' WHERE instance_id = 'pending-outbox'"
        )
        await raw_query(
            db_url, "UPDATE geste_outbox SET status = 'discarded' WHERE instance_id = 'dead-outbox'"
        )
        last = await app.prune(DAY, batch=1)
        assert last.instances == 4  # running-parent, child-of-running, pending-outbox, dead-outbox
        assert last.kept == 1  # parent-of-waiting: its child is still waiting
        left = {r["instance_id"] for r in await raw_query(db_url, "SELECT instance_id FROM geste_instances")}
        assert left == {"parent-of-waiting", "waiting-child", "recent", "waiting"}
        for table in tables(db_url)[1:]:  # no row of a deleted instance anywhere
            ids = {
                r["instance_id"] for r in await raw_query(db_url, f"SELECT DISTINCT instance_id FROM {table}")
            }
            assert ids == left, table


def timedelta_days(days: float) -> Any:
    from datetime import timedelta

    return timedelta(days=days)


@pytest.mark.parametrize("batch", [1, 2, 3, 1000])
async def test_prune_in_small_batches_steps_over_what_it_keeps(
    make_app: MakeApp, db_url: str, batch: int
) -> None:
    """The kept instances ended first: a batch of 1 or 2 reads only kept ones at first, and the walk goes
    on after them rather than reading them again and stopping."""
    async with make_app(run_worker=False) as app:
        await seed(db_url, app.clock())
        before = await rows_of(db_url)
        done = await app.prune(DAY, batch=batch)
        check_pruned(before, await rows_of(db_url))
        finished_old = len(DELETED) + 4
        assert done.batches == finished_old // batch + 1  # the last batch reads fewer than its size
        assert (done.instances, done.kept) == (len(DELETED), 4)


async def test_a_storage_batch_is_bounded_and_returns_where_to_go_on(make_app: MakeApp, db_url: str) -> None:
    async with make_app(run_worker=False) as app:
        now = app.clock()
        await seed(db_url, now)
        first = await app.storage.prune_instances(now - DAY, limit=4)
        assert (first.examined, first.free, first.instances) == (4, 0, 0)  # the four kept ones
        assert first.full and first.position[1] == "pending-outbox"
        second = await app.storage.prune_instances(now - DAY, limit=4, position=first.position)
        assert (second.examined, second.instances) == (4, 4) and second.full
        third = await app.storage.prune_instances(now - DAY, limit=4, position=second.position)
        assert (third.examined, third.instances) == (2, 2) and not third.full
        assert third.position == (-math.inf, "")


async def test_prune_refuses_bad_input(make_app: MakeApp) -> None:
    async with make_app(run_worker=False) as app:
        for age in (-1, float("nan"), "30d", None):
            with pytest.raises(ConfigurationError):
                await app.prune(age)  # type: ignore[arg-type]
        for batch in (0, -5, 1.5):
            with pytest.raises(ConfigurationError):
                await app.prune(DAY, batch=batch)  # type: ignore[arg-type]
    for retention in (0, -1, "7d"):
        with pytest.raises(ConfigurationError):
            geste.App("sqlite:///:memory:", retention=retention)  # type: ignore[arg-type]


async def test_the_chore_prunes_with_the_retention_set(make_app: MakeApp, db_url: str) -> None:
    """A worker with ``retention`` deletes what ``prune`` would, on its own (its first round at start);
    without it, the chore is not there."""
    from geste.runtime.chores import PRUNE, ChannelMaintenance

    def chores(retention: float | None) -> list[str]:
        maintenance = ChannelMaintenance(
            None,  # type: ignore[arg-type]
            clock=time.time,
            message_retention=DAY,
            event_retention=DAY,
            on_woken=lambda: None,
            retention=retention,
        )
        return [chore.name for chore in maintenance.chores]

    assert PRUNE not in chores(None) and PRUNE in chores(DAY)
    async with make_app(run_worker=False) as client:
        await seed(db_url, client.clock())
        before = await rows_of(db_url)
    async with make_app(retention=timedelta_days(1)):

        async def pruned() -> bool:
            rows = await raw_query(db_url, "SELECT count(*) AS n FROM geste_instances")
            return int(rows[0]["n"]) == len(SEEDED) - len(DELETED)

        await wait_until(pruned, "the retention chore's round")
    # the channel cleanup deleted the subscriptions of the finished instances it kept meanwhile
    check_pruned(before, await rows_of(db_url), ignore=("geste_channel_subscriptions",))
    # the message the old instance sent stays: the waiting instance's subscription has not taken it yet
    messages = await raw_query(db_url, "SELECT message_id FROM geste_channel_messages")
    assert [m["message_id"] for m in messages] == ["m1"]
    chores = await raw_query(db_url, "SELECT chore FROM geste_chores ORDER BY chore")
    assert "instance_retention" in [c["chore"] for c in chores]


def test_geste_prune_command(db_url: str) -> None:
    async def prepare() -> None:
        async with geste.App(db_url, run_worker=False):
            await seed(db_url, time.time())

    import asyncio

    asyncio.run(prepare())
    url = ["--database-url", db_url]
    dry = run_cli(["prune", "--older-than", "1d", "--dry-run", "--json", *url])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output) == {
        "instances": len(DELETED),
        "rows": 0,
        "kept": 4,
        "batches": 1,
        "dry_run": True,
    }
    done = run_cli(["prune", "--older-than", "1d12h", "--batch", "4", *url])
    assert done.exit_code == 0, done.output
    assert done.output.splitlines() == [
        f"deleted {len(DELETED)} finished instance(s) ({len(DELETED) * len(tables(db_url))} rows in all)",
        "kept 4 still needed (an unfinished parent or child, an undelivered event)",
    ]
    left = asyncio.run(raw_query(db_url, "SELECT count(*) AS n FROM geste_instances"))
    assert int(left[0]["n"]) == len(SEEDED) - len(DELETED)
    for bad in ("soon", "-3d", "3x", "d", "1d-2h", ""):
        refused = run_cli(["prune", "--older-than", bad, *url])
        assert refused.exit_code == 2, (bad, refused.output)
        assert "--older-than" in refused.output
    assert run_cli(["prune", *url]).exit_code == 2  # --older-than is required
    assert run_cli(["prune", "--older-than", "1d", "--batch", "0", *url]).exit_code == 2


async def test_real_instances_go_with_every_row_they_wrote(make_app: MakeApp, db_url: str) -> None:
    """Workflows that write history, state, a stream, an outbox event (delivered) and children: a parent
    that abandoned a child still waiting is kept, and so is the child; once the child ends, both go, and
    no row of any of them is left in any table."""
    delivered: list[str] = []

    async def deliver(event: geste.OutboxEvent) -> None:
        delivered.append(event.event_id)

    app = make_app(outbox_handler=deliver)

    @app.activity
    async def double(ctx: geste.ActivityContext, n: int) -> int:
        return 2 * n

    @app.workflow
    async def child(ctx: geste.WorkflowContext, n: int) -> int:
        await ctx.set_state("n", n)
        return await double(ctx, n)

    @app.workflow
    async def waiting_child(ctx: geste.WorkflowContext) -> str:
        await ctx.wait_event("go")
        return "went"

    @app.workflow
    async def parent(ctx: geste.WorkflowContext) -> int:
        await ctx.write_stream("s", "item")
        await ctx.send_event("t", {"x": 1})
        await ctx.start_child(waiting_child, child_id="left", parent_close=geste.ParentClose.ABANDON)
        return await ctx.run_child(child, 21, child_id="helper")

    async with app:
        handle = await parent.start_with_id("P")
        assert await handle.result(timeout=10) == 42
        await wait_until(lambda: delivered, "the outbox event's delivery")
        await wait_until(
            lambda: raw_query(db_url, "SELECT 1 FROM geste_outbox WHERE status = 'delivered'"), "delivered"
        )
        before = await rows_of(db_url)
        ids = {"P", "helper", "left"}
        assert {k for t in before.values() for k in t} == ids
        # every finished one is past an age of 0; the parent has an unfinished child, the child is waiting
        done = await app.prune(0)
        assert (done.instances, done.kept) == (1, 1)  # helper went; P is kept for its child "left"
        after = await rows_of(db_url)
        assert {k for t in after.values() for k in t} == {"P", "left"}
        assert after["geste_history"]["P"] == before["geste_history"]["P"]
        await app.send_event("go", {})
        assert await app.get_handle("left").result(timeout=10) == "went"
        done = await app.prune(0)
        assert (done.instances, done.kept) == (2, 0)
        assert {k for t in (await rows_of(db_url)).values() for k in t} == set()
