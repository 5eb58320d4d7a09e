"""Failover to a promoted standby: geste's multi-host URLs, its pool and listener carrying on on the new
primary, and what synchronous replication keeps that asynchronous replication loses.

Each test makes a primary and a standby of its own (``tests/chaos/replica.py``: initdb, pg_basebackup, on
free ports), never touching the shared server. The chaos suite's ``failover`` fault is the load test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

import geste
from geste.cli import _safe_url
from geste.storage import listen_dsn
from geste.storage._hosts import split_hosts
from geste.storage._read_only import without_password
from geste.storage.postgres import parse_postgres_url

from .chaos.replica import HOST, ReplicatedPair
from .support import wait_status, wait_until

SLOW = 300.0
"""Poll interval and fallback of a worker that only a notification may wake within the test."""


def build(url: str, **options: Any) -> geste.App:
    options.setdefault("lock_timeout", 2.0)
    options.setdefault("shutdown_grace", 1.0)
    app = geste.App(url, **options)

    @app.workflow
    async def paid(ctx: geste.WorkflowContext, n: int) -> int:
        event = await ctx.wait_event("paid", match={"n": n})
        return int(event.data["amount"])

    return app


@pytest.fixture
async def pair() -> AsyncIterator[ReplicatedPair]:
    replicas = ReplicatedPair()
    await asyncio.to_thread(replicas.start)
    try:
        yield replicas
    finally:
        await asyncio.to_thread(replicas.close)


async def fail_over(pair: ReplicatedPair) -> None:
    await asyncio.to_thread(pair.kill_primary)
    await asyncio.to_thread(pair.promote)


# -- URLs ------------------------------------------------------------------------------------------------
def test_a_multi_host_url_connects_to_the_primary_unless_it_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PGTARGETSESSIONATTRS", raising=False)
    url = "postgresql://geste:secret@db1:5432,db2:5433/shop?schema=s&application_name=api"
    dsn, options = parse_postgres_url(url)
    assert dsn == "postgresql://geste:secret@db1:5432,db2:5433/shop?target_session_attrs=read-write"
    assert options == {"schema": "s", "application_name": "api", "pooler": "none"}
    assert listen_dsn(url) == (dsn, "api-listener")
    assert parse_postgres_url("postgresql:///shop?host=db1,db2")[0].endswith(
        "target_session_attrs=read-write"
    )
    explicit = "postgresql://geste@db1,db2/shop?target_session_attrs=prefer-standby"
    assert parse_postgres_url(explicit)[0] == explicit
    assert parse_postgres_url("postgresql://geste@db1:5432/shop")[0] == "postgresql://geste@db1:5432/shop"
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "any")  # the driver reads it: the user chose
    assert parse_postgres_url("postgresql://geste@db1,db2/shop")[0] == "postgresql://geste@db1,db2/shop"
    for hide in (_safe_url, without_password):
        assert hide(url) == url.replace("secret", "***")
    assert split_hosts(dsn) == [
        "postgresql://geste:secret@db1:5432/shop?target_session_attrs=read-write",
        "postgresql://geste:secret@db2:5433/shop?target_session_attrs=read-write",
    ]
    assert split_hosts("postgresql://db1,db2/shop") == ["postgresql://db1/shop", "postgresql://db2/shop"]
    paired = "postgresql:///shop?host=db1,db2&port=5432,5433"  # the driver pairs hosts and ports itself
    assert split_hosts(paired) == [paired]
    with pytest.raises(geste.errors.ConfigurationError, match="connect_timeout"):
        parse_postgres_url("postgresql://db1/shop?connect_timeout=0")


class SilentHost:
    """A TCP server on 127.0.0.1 that takes connections and never answers: a hung primary, or one whose
    machine is gone while its address still takes connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> SilentHost:
        self._server = await asyncio.start_server(self._take, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        await reader.read()  # until the client gives up

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        self._server.close()


async def test_a_silent_host_first_in_the_url_is_waited_for_once(pg_url: str) -> None:
    """The driver's one timeout for all hosts would be spent on the silent one (60 s for the pool, 10 s
    for the listener), the live one never tried; geste tries each host within ``connect_timeout`` and
    the one that answered first from then on: the pool's first connection waits 1 s, nothing else."""
    async with SilentHost() as silent:
        parts = urlsplit(pg_url)
        user, _, host = parts.netloc.rpartition("@")
        netloc = f"{user}@{HOST}:{silent.port},{host}"
        url = urlunsplit(parts._replace(netloc=netloc, query=parts.query + "&connect_timeout=1"))
        async with build(url, listen_notify=True) as app:
            handle = await app.start_workflow("paid", 7, instance_id="p-7")
            await app.send_event("paid", {"n": 7, "amount": 3})
            assert await handle.result(timeout=30) == 3
            await wait_until(lambda: app.listener_status().state == "listening", "the listener")
        assert silent.accepted == 1


async def test_geste_opens_on_the_primary_whichever_host_comes_first(pair: ReplicatedPair) -> None:
    """The standby first in the URL (the old primary come back as a standby after a failover): without
    ``target_session_attrs`` geste makes the URL go to the primary; the driver alone would take the
    standby, where the migration fails (a read-only transaction)."""
    url = f"postgresql://postgres@{HOST}:{pair.standby.port},{HOST}:{pair.primary.port}/postgres?schema=s"
    async with build(url, listen_notify=True) as app:
        handle = await app.start_workflow("paid", 1, instance_id="p-1")
        await app.send_event("paid", {"n": 1, "amount": 7})
        assert await handle.result(timeout=15) == 7
        assert app.listener_status().state == "listening"


# -- a failover under a running worker -----------------------------------------------------------------
async def listeners_on(pair: ReplicatedPair) -> str:
    return await asyncio.to_thread(
        pair.query,
        pair.standby,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'geste-listener'",
    )


async def test_the_pool_and_the_listener_carry_on_on_the_promoted_standby(pair: ReplicatedPair) -> None:
    """A worker waiting for an event when the primary dies: its pool and its listener reconnect through
    the URL's other host; the event, sent by another process after the failover, wakes it by
    notification (it polls only every 300 s), and the result is read from the new primary."""
    url = pair.url(schema="s")
    worker = build(url, poll_interval=SLOW, notify_fallback_interval=SLOW, notify_reconnect_delay=0.1)
    client = build(url, run_worker=False, listen_notify=False)
    async with worker, client:
        handle = await client.start_workflow("paid", 2, instance_id="p-2")
        await wait_status(client, "p-2", geste.Status.WAITING)
        await fail_over(pair)

        def reconnected() -> bool:
            status = worker.listener_status()
            return status.state == "listening" and status.reconnects >= 1

        await wait_until(reconnected, "the listener to reconnect", timeout=30)
        assert await listeners_on(pair) == "1"  # on the new primary
        await client.send_event("paid", {"n": 2, "amount": 9})
        assert await handle.result(timeout=30) == 9


# -- what asynchronous replication loses -------------------------------------------------------------------
async def test_asynchronous_replication_loses_an_acknowledged_start() -> None:
    """The standby cut off (the extreme of a lag): an asynchronous primary acknowledges a start that then
    dies with it; the promoted standby has never heard of the instance."""
    with ReplicatedPair(synchronous=False) as pair:
        async with build(pair.url(schema="s"), run_worker=False, listen_notify=False) as app:
            await app.start_workflow("paid", 3, instance_id="before")
            await wait_until(
                lambda: pair.query(pair.standby, "SELECT count(*) FROM s.geste_instances") == "1",
                "the standby to replay the first start",
            )
            await asyncio.to_thread(pair.stop_standby)
            await app.start_workflow("paid", 4, instance_id="acknowledged")  # returned: acknowledged
            await asyncio.to_thread(pair.kill_primary)
            await asyncio.to_thread(pair.start_standby)
            await asyncio.to_thread(pair.promote)
            assert (await app.get_instance("before")).status == geste.Status.PENDING
            with pytest.raises(geste.errors.InstanceNotFoundError):
                await app.get_instance("acknowledged")


async def test_synchronous_replication_acknowledges_only_what_the_standby_has(pair: ReplicatedPair) -> None:
    """The same cut: the synchronous primary holds the start's commit until the standby has it, so the
    caller never hears it acknowledged; killed, the call fails, and the caller's retry with the same
    instance id, on the promoted standby, starts it once."""
    async with build(pair.url(schema="s"), run_worker=False, listen_notify=False) as app:
        await app.start_workflow("paid", 5, instance_id="before")
        await asyncio.to_thread(pair.stop_standby)
        start = asyncio.create_task(app.start_workflow("paid", 6, instance_id="held"))
        sync_wait = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        await wait_until(lambda: int(pair.query(pair.primary, sync_wait)) >= 1, "the commit to wait")
        assert not start.done()
        await asyncio.to_thread(pair.kill_primary)
        with pytest.raises(geste.errors.StorageError):
            await start
        await asyncio.to_thread(pair.start_standby)
        await asyncio.to_thread(pair.promote)
        for _ in range(2):  # the caller's retry, and a second one (idempotent)
            await app.start_workflow("paid", 6, instance_id="held")
        infos = await app.list_instances()
        assert sorted(i.instance_id for i in infos) == ["before", "held"]
