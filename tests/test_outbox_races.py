"""The outbox's claim round against concurrent marks, discards and claims on PostgreSQL (READ COMMITTED),
made deterministic: a transaction left open on a second connection holds a round (or a stand-in lock)
while another statement starts and waits. These are the interleavings docs/design.md argues about ("No
held row is left behind"): whoever ends an event makes the one held behind it due, and a row behind an
event being sent is never held (moved to the end of the claim), as that sender may mark from a snapshot
that does not see it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from geste.storage.postgres import PostgresStorage

NOW = 1_800_000_000.0
LEASE = 10.0


@dataclass
class Db:
    storage: PostgresStorage
    table: str
    conns: list[Any]

    async def connect(self) -> Any:
        conn = await asyncpg.connect(self.storage.url.split("?")[0])
        self.conns.append(conn)
        return conn

    async def add(self, event_id: str, seq: int, *, status: str = "pending", at: float | None = NOW) -> None:
        """An event of instance ``i`` (step ``seq``), as ``ctx.send_event`` records it (or as it became)."""
        await self.conns[0].execute(
            f"INSERT INTO {self.table} (event_id, instance_id, step_seq, event_type, source, status,"
            " attempts, next_attempt_at, created_at, updated_at)"
            " VALUES ($1, 'i', $2, 't', 's', $3, 0, $4, $5, $5)",
            event_id,
            seq,
            status,
            at,
            NOW,
        )

    async def claim(self, event_id: str, claim_id: str, now: float) -> None:
        """A claim round of relay ``claim_id`` at ``now`` that takes ``event_id`` and nothing else."""
        claims = await self.storage.outbox_claim(claim_id, claim_id, now, now + LEASE, 10, 1000)
        assert [c.event_id for c in claims] == [event_id]

    async def row(self, event_id: str) -> tuple[str, float | None, str | None]:
        status, at, claim = await self.conns[0].fetchrow(
            f"SELECT status, next_attempt_at, claim_id FROM {self.table} WHERE event_id = $1", event_id
        )
        return status, at, claim

    async def round_in(self, conn: Any, relay: str, now: float) -> Any:
        """A claim round in an open transaction on ``conn``: its locks held until the caller commits."""
        tx = conn.transaction()
        await tx.start()
        claimed = await conn.fetch(self.storage._q["outbox_claim"], relay, relay, now, now + LEASE, 10, 1000)
        assert claimed == []
        return tx

    async def waiting(self, conn: Any) -> None:
        """Until ``conn``'s statement waits for a lock (its snapshot is taken by then)."""
        for _ in range(1000):
            state = await self.conns[0].fetchval(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", conn.get_server_pid()
            )
            if state == "Lock":
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the statement never waited for a lock")

    async def blocking(self, conn: Any) -> None:
        """Until a statement of another connection (the storage's pool) waits for a lock ``conn`` holds."""
        for _ in range(3000):
            blocked = await self.conns[0].fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                conn.get_server_pid(),
            )
            if blocked:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no statement waited for the lock")


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[Db]:
    storage = PostgresStorage(pg_url)
    await storage.open()
    db = Db(storage, f'"{storage.schema}".geste_outbox', [])
    await db.connect()
    try:
        yield db
    finally:
        for conn in db.conns:
            await conn.close()
        await storage.close()


async def test_a_mark_waiting_for_the_round_that_moved_the_next_event_makes_it_due(db: Db) -> None:
    """The round moves ``o`` behind ``b`` (being sent) and locks ``b``; the mark of ``b`` starts then, from
    a snapshot where ``o`` is still due, and waits: its write of ``o`` reads the round's value again."""
    await db.add("b", 1)
    await db.claim("b", "cb", NOW)
    await db.add("o", 2, at=NOW + 1)
    round_conn, mark_conn = await db.connect(), await db.connect()
    tx = await db.round_in(round_conn, "A", NOW + 1)
    assert await db.row("o") == ("pending", NOW + 1, None)  # not committed yet
    mark = asyncio.create_task(mark_conn.fetchrow(db.storage._q["outbox_mark_delivered"], "b", "cb", NOW + 2))
    await db.waiting(mark_conn)
    await tx.commit()
    assert tuple(await mark) == (True, True)
    assert await db.row("o") == ("pending", NOW + 2, None)  # due at once, not at the end of A's claim


async def test_a_mark_whose_snapshot_misses_the_next_event_leaves_it_due_at_the_claims_end(db: Db) -> None:
    """The mark of ``b`` takes its snapshot, then waits (a lock on ``b``); ``o`` is recorded and a round
    sees it behind ``b``, being sent: it is moved, not held, since the mark cannot see it. It is due at the
    end of the round's claim (a delay of at most a claim), never left held behind a delivered event."""
    await db.add("b", 1)
    await db.claim("b", "cb", NOW)
    blocker, mark_conn = await db.connect(), await db.connect()
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute(f"SELECT 1 FROM {db.table} WHERE event_id = 'b' FOR SHARE")
    mark = asyncio.create_task(mark_conn.fetchrow(db.storage._q["outbox_mark_delivered"], "b", "cb", NOW + 2))
    await db.waiting(mark_conn)
    await db.add("o", 2, at=NOW + 1)
    assert await db.storage.outbox_claim("A", "ca", NOW + 1, NOW + 1 + LEASE, 10, 1000) == []
    await tx.commit()
    assert tuple(await mark) == (True, False)  # it saw no later event
    assert await db.row("o") == ("pending", NOW + 1 + LEASE, None)
    await db.claim("o", "ca2", NOW + 1 + LEASE)


async def test_a_round_holding_an_event_keeps_the_one_before_it_from_being_claimed(db: Db) -> None:
    """The round holds ``o`` behind ``b`` (pending, unclaimed: its back-off) and locks ``b`` FOR SHARE: a
    claim of ``b`` skips it until the round commits, so the mark of ``b``, later, sees ``o`` held."""
    await db.add("b", 1, at=NOW + 1)  # in its back-off
    await db.add("o", 2)
    round_conn = await db.connect()
    tx = await db.round_in(round_conn, "A", NOW)
    assert await db.storage.outbox_claim("B", "cb", NOW + 1, NOW + 1 + LEASE, 10, 1000) == []  # skipped
    await tx.commit()
    assert await db.row("o") == ("pending", None, None)  # held
    await db.claim("b", "cb", NOW + 1)
    assert await db.storage.outbox_mark_delivered("b", "cb", NOW + 2) == (True, True)
    assert await db.row("o") == ("pending", NOW + 2, None)


async def test_a_round_meeting_the_event_before_locked_by_its_mark_leaves_the_next_one_due(db: Db) -> None:
    """The mark of ``b`` runs in a transaction not committed yet: the round skips ``b`` (locked) and so
    neither holds nor moves ``o``, which stays due for the next round."""
    await db.add("b", 1)
    await db.claim("b", "cb", NOW)
    await db.add("o", 2, at=NOW + 1)
    mark_conn = await db.connect()
    tx = mark_conn.transaction()
    await tx.start()
    assert tuple(await mark_conn.fetchrow(db.storage._q["outbox_mark_delivered"], "b", "cb", NOW + 1)) == (
        True,
        True,
    )
    assert await db.storage.outbox_claim("A", "ca", NOW + 1, NOW + 1 + LEASE, 10, 1000) == []
    await tx.commit()
    assert await db.row("o") == ("pending", NOW + 1, None)
    await db.claim("o", "ca", NOW + 2)


@pytest.mark.parametrize("status", ["dead", "pending"])
async def test_a_discard_waits_for_the_round_holding_the_next_event_then_makes_it_due(
    db: Db, status: str
) -> None:
    await db.add("b", 1, status=status, at=None if status == "dead" else NOW + 5)
    await db.add("o", 2)
    round_conn = await db.connect()
    tx = await db.round_in(round_conn, "A", NOW)
    discard = asyncio.create_task(db.storage.outbox_discard("b", NOW + 1))
    await db.blocking(round_conn)  # it waits for the round's lock on b (without it, o was left held)
    await tx.commit()
    assert await discard is True
    assert await db.row("o") == ("pending", NOW + 1, None)


async def test_a_retry_racing_a_round_sends_the_retried_event_first(db: Db) -> None:
    """A dead ``b`` is re-queued while a round holds ``o`` behind it: the retry waits for the round, ``o``
    stays held, ``b`` goes out, and its delivery makes ``o`` due."""
    await db.add("b", 1, status="dead", at=None)
    await db.add("o", 2)
    round_conn = await db.connect()
    tx = await db.round_in(round_conn, "A", NOW)
    retry = asyncio.create_task(db.storage.outbox_retry("b", NOW + 1))
    await db.blocking(round_conn)  # it waits for the round's lock on b
    await tx.commit()
    assert await retry is True
    assert await db.row("o") == ("pending", None, None)
    await db.claim("b", "cb", NOW + 1)
    assert await db.storage.outbox_mark_delivered("b", "cb", NOW + 2) == (True, True)
    await db.claim("o", "co", NOW + 2)
