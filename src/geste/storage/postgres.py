"""The PostgreSQL backend, on asyncpg: a pool, prepared statements, one round trip per step commit.

asyncpg prepares and caches every statement per connection, so each query below is parsed once per
connection. Step commits (``record``) and claims are single statements (their own transaction);
operations that need several statements run in one explicit transaction. Driver errors become
``StorageError`` at this boundary; the pool replaces broken connections by itself, so a restarted server
costs the operations in flight, not the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import operator
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import islice
from operator import attrgetter
from typing import Any, TypeVar, cast, overload
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._matching import event_keys, wait_key
from .._models import Status
from .._schedules import QUEUE_LIMIT
from .._status import QueueStats
from .._steps import event_history_payload
from ..errors import ConfigurationError, StorageError, StorageTimeout, TransactionUnusableError
from . import _decisions as decide
from . import _hosts, _migrations, base
from . import _read_only as read_only
from . import _rows as rows
from ._group_commit import GroupCommit
from ._listen import Listening
from ._read_only import StoredHistory
from ._sql import load_queries

try:
    import asyncpg
except ImportError:  # pragma: no cover - depends on the installation
    asyncpg = None

_QUERIES = load_queries("postgres")
DEDUP_ATTEMPTS = 5
"""A queued start meets a dedup id taken, then finds its holder ended: it inserts again, this many times."""
SCHEMA_VERSION = _migrations.load("postgres")[-1].version
FINISH_DEADLOCK_TRIES = 3
"""How many times an end aborted to break a deadlock is written (``PostgresStorage._finish_one``)."""
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
MIGRATION_TIMEOUT = 24 * 3600.0
"""How long a migration (and a process waiting for another's) may take: no ``command_timeout``."""
MIN_COMMAND_TIMEOUT = 5.0
"""The shortest ``command_timeout`` derived from a worker's ``lock_timeout``."""


MAX_SETTING_MS = 2**31 - 1
"""The largest value of a PostgreSQL setting in milliseconds (an int): about 24.8 days."""


def derived_command_timeout(lock_timeout: float | None) -> float:
    """The ``command_timeout`` of an App that sets none in its URL: twice its ``lock_timeout`` (at
    least ``MIN_COMMAND_TIMEOUT``), 60 s for a storage opened without one (the CLI). A statement not
    answered within a lease is most likely on a dead connection (a half-open one after a partition
    never answers): the renewals it holds up have failed by then anyway, and the step commits queued
    behind it wait for it (docs/design.md, "Dead connections")."""
    return 60.0 if lock_timeout is None else max(MIN_COMMAND_TIMEOUT, 2 * lock_timeout)


_OPTIONS = {
    "schema",
    "pool_min_size",
    "pool_max_size",
    "command_timeout",
    "connect_timeout",
    "application_name",
    "pooler",
}
POOLERS = ("none", "transaction")
"""What stands between geste and the server (the ``pooler`` option): nothing (or a pooler in session mode,
which keeps one server session per client connection), or a pooler in transaction mode (PgBouncer's
``pool_mode = transaction``, RDS Proxy), which gives each transaction whichever server session is free."""
POOL_CLOSE_TIMEOUT = 5.0
"""Seconds closing the pool may take before its connections are dropped without a goodbye."""
CONNECT_TIMEOUT = 10.0
"""Seconds a new connection may take, per host of a multi-host URL (the URL's ``connect_timeout``)."""
_T = TypeVar("_T")

Conn = Any  # asyncpg.Connection / pool proxy; asyncpg ships no type hints


def parse_postgres_url(url: str) -> tuple[str, dict[str, str]]:
    """Split geste's own options (``schema``, ``pool_min_size``, ...) off a ``postgresql://`` URL.

    A URL naming several hosts (``postgresql://user@h1:5432,h2:5432/db``, or ``?host=h1,h2``: a primary
    and its standbys)
    connects only to the one that takes writes unless it says otherwise (``target_session_attrs``, or
    the ``PGTARGETSESSIONATTRS`` variable): geste writes, and a standby takes no LISTEN. Left to the
    driver's default (``any``), the pool and the listener would take the first host that answers,
    which after a failover may be the old primary come back as a standby: every write would fail there.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a PostgreSQL URL: {url!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = {k: v for k, v in query if k in _OPTIONS}
    rest = [(k, v) for k, v in query if k not in _OPTIONS]
    hosts = [parts.netloc.rpartition("@")[2], *(v for k, v in rest if k == "host")]
    if (
        any("," in h for h in hosts)
        and not any(k == "target_session_attrs" for k, _ in rest)
        and not os.environ.get("PGTARGETSESSIONATTRS")
    ):
        rest.append(("target_session_attrs", "read-write"))
    schema = options.setdefault("schema", "public")
    if not _IDENTIFIER.fullmatch(schema):
        raise ConfigurationError(f"schema must be a plain identifier (letters, digits, _), not {schema!r}")
    name = options.setdefault("application_name", "geste")
    if not name or len(name) > 50 or not name.isprintable() or not name.isascii():
        raise ConfigurationError(f"application_name must be 1-50 printable ASCII characters, not {name!r}")
    pooler = options.setdefault("pooler", "none")
    if pooler not in POOLERS:
        raise ConfigurationError(f"pooler must be one of {', '.join(POOLERS)}, not {pooler!r}")
    for key in ("pool_min_size", "pool_max_size"):
        if key in options and (not options[key].isdigit() or int(options[key]) < 1):
            raise ConfigurationError(f"{key} must be a positive integer, not {options[key]!r}")
    if "connect_timeout" in options:
        connect_timeout(options)
    return urlunsplit(parts._replace(query=urlencode(rest))), options


def connect_timeout(options: dict[str, str]) -> float:
    """The URL's ``connect_timeout`` in seconds (``CONNECT_TIMEOUT`` if absent), checked."""
    text = options.get("connect_timeout")
    try:
        value = CONNECT_TIMEOUT if text is None else float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ConfigurationError(f"connect_timeout must be a positive number of seconds, not {text!r}")
    return value


ROWS_PER_TURN = 4096
"""Rows of a claimed history built between two turns of the event loop: asyncpg decoded its arrays (in C,
as the bytes came); building the rows of a long history in one piece would hold up every other instance
of the process (a 100,000-step history: about 40 ms)."""


def _child_state(row: Any) -> base.ChildState | None:
    if row is None:
        return None
    return base.ChildState(
        row["workflow_name"], Status.stored(row["status"]), row["result"], row["error"], row["parent_id"]
    )


def _in_order(seqs: Sequence[int]) -> bool:
    return all(map(operator.lt, seqs, islice(seqs, 1, None)))


async def _histories(found: Sequence[Any]) -> list[tuple[base.HistoryRow, ...]]:
    """The histories of a claim's rows: the claim's arrays of columns (``h_seq``... ``h_at``, NULL for no
    row) zipped into rows, in seq order, a turn of the event loop given every ``ROWS_PER_TURN`` rows."""
    histories: list[tuple[base.HistoryRow, ...]] = []
    row = base.HistoryRow
    for r in found:
        seqs = r["h_seq"]
        if seqs is None:
            histories.append(())
            continue
        columns = (seqs, r["h_kind"], r["h_name"], r["h_payload"], r["h_error"], r["h_at"])
        if len(seqs) <= ROWS_PER_TURN:
            history = tuple(map(row, *columns))
        else:
            built: list[base.HistoryRow] = []
            for start in range(0, len(seqs), ROWS_PER_TURN):
                if start:
                    await asyncio.sleep(0)
                built += map(row, *(c[start : start + ROWS_PER_TURN] for c in columns))
            history = tuple(built)
        if not _in_order(seqs):  # the sorted subquery's order, which PostgreSQL does not promise
            history = tuple(sorted(history, key=attrgetter("seq")))
        histories.append(history)
    return histories


async def _keep_session(_conn: Any) -> None:
    """The pool's reset: geste leaves no session state on pooled connections (no LISTEN, no session
    advisory lock, no SET but ``SET LOCAL``, no temporary table), so the default reset query — one
    more round trip on every release, half of an idle worker's statements — is skipped. asyncpg still
    rolls back any open transaction before calling this."""


def _is_driver_error(exc: BaseException) -> bool:
    return asyncpg is not None and isinstance(
        exc,
        asyncpg.PostgresError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | OSError
        | ConnectionError,
    )


def _driver_message(exc: BaseException) -> str:
    """The ``StorageError`` text of a driver error; a prepared statement lost or found twice is what a
    transaction pooler does to asyncpg's statement cache: the message says which option fixes it."""
    text = f"PostgreSQL error: {type(exc).__name__}: {exc}"
    if asyncpg is not None and isinstance(
        exc, asyncpg.InvalidSQLStatementNameError | asyncpg.DuplicatePreparedStatementError
    ):
        text += " (behind a pooler in transaction mode, such as PgBouncer? add pooler=transaction to the URL)"
    return text


def _is_connection_loss(exc: BaseException) -> bool:
    """The connection broke (killed backend, restarted server): a read may simply be tried again."""
    return asyncpg is not None and isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.OperatorInterventionError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | OSError
        | ConnectionError,
    )


def _timed_out(exc: BaseException) -> bool:
    """A statement (or the rollback after it) timed out: ``exc`` is, or was raised handling, a
    ``TimeoutError``."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, TimeoutError):
            return True
        seen = seen.__context__
    return False


READ_ATTEMPTS = 3

DEADLOCK = "40P01"
"""SQLSTATE of a transaction PostgreSQL aborted to break a deadlock: nothing of it was written."""


GROUP_COMMIT_MAX = 100
"""At most this many instances' step commits in one statement."""


@dataclass(frozen=True, slots=True)
class _Queued:
    """One instance's write, waiting for its batch (its rows a tuple: the caller's list may change)."""

    commit: base.Commit

    @property
    def lease(self) -> base.Lease:
        return self.commit.lease


@dataclass(frozen=True, slots=True)
class _Record(_Queued):
    """A step commit."""

    status: Status | None


@dataclass(frozen=True, slots=True)
class _Finish(_Queued):
    """An end."""

    status: Status
    result: str | None
    error: str | None
    children: tuple[str, ...] = ()
    """The children whose cancellation the end requests (``Storage.finish``'s ``cancel_children``)."""


def _queued(commit: base.Commit) -> base.Commit:
    """The commit as a batch item keeps it: its rows copied into a tuple."""
    return base.Commit(commit.lease, tuple(commit.records), commit.now, commit.lock_expires_at)


def _row_columns(batch: Sequence[_Record | _Finish]) -> tuple[list[Any], ...]:
    """The history rows of a batch (one item per instance), as the arrays that follow the per-instance
    ones."""
    written = [(item.lease.instance_id, r) for item in batch for r in item.commit.records]
    return (
        [instance_id for instance_id, _ in written],
        [r.seq for _, r in written],
        [r.kind for _, r in written],
        [r.name for _, r in written],
        [r.payload for _, r in written],
        [r.is_error for _, r in written],
        [r.created_at for _, r in written],
    )


def _record_columns(batch: Sequence[_Record]) -> tuple[list[Any], ...]:
    """The arrays of ``record_batch``: one entry per instance, then one per history row."""
    return (
        [item.lease.instance_id for item in batch],
        [item.lease.lease_id for item in batch],
        [item.commit.lock_expires_at for item in batch],
        [item.commit.now for item in batch],
        [None if item.status is None else str(item.status) for item in batch],
        [len(item.commit.records) for item in batch],
        *_row_columns(batch),
    )


def _finish_columns(batch: Sequence[_Finish]) -> tuple[list[Any], ...]:
    """The arrays of ``finish_batch``: one entry per instance, then one per history row."""
    return (
        [item.lease.instance_id for item in batch],
        [item.lease.lease_id for item in batch],
        [str(item.status) for item in batch],
        [item.result for item in batch],
        [item.error for item in batch],
        [item.commit.now for item in batch],
        [len(item.commit.records) for item in batch],
        *_row_columns(batch),
    )


_BatchItem = TypeVar("_BatchItem", _Record, _Finish)


def _merge_records(first: _Record, then: _Record) -> _Record:
    """Two step commits of one instance under one lease (the branches of a gather) as one, applied in
    turn: the rows of both, the later expiry and time, the last status given."""
    a, b = first.commit, then.commit
    assert a.lock_expires_at is not None and b.lock_expires_at is not None  # a step commit renews its lease
    merged = base.Commit(
        a.lease, (*a.records, *b.records), max(a.now, b.now), max(a.lock_expires_at, b.lock_expires_at)
    )
    return _Record(merged, then.status if then.status is not None else first.status)


async def _outcome(call: Awaitable[_T]) -> _T | BaseException:
    """The value of ``call``, or the error it raised (for one item of a batch)."""
    try:
        return await call
    except (base.LeaseLost, StorageError) as exc:
        return exc


def schema_queries(schema: str) -> dict[str, str]:
    """Every named query with the schema (an identifier checked by ``parse_postgres_url``) filled in:
    the one place query text is completed, for the storage and the read-only replay check alike."""
    quoted, literal = f'"{schema}"', f"'{schema}'"
    return {
        name: sql.replace("{schema}", quoted).replace("{schema_name}", literal)
        for name, sql in _QUERIES.items()
    }


class PostgresStorage(base.Storage):
    def __init__(
        self,
        url: str,
        *,
        pool_size: int | None = None,
        notify: bool = True,
        lock_timeout: float | None = None,
    ) -> None:
        if asyncpg is None:
            raise ConfigurationError("PostgreSQL needs asyncpg: pip install 'geste[postgres]'")
        self.url = url
        self.notify = notify
        """Send NOTIFYs where another process may be waiting (off with ``listen_notify=False``)."""
        self._dsn, options = parse_postgres_url(url)
        self.schema = options["schema"]
        self._min_size = int(options.get("pool_min_size", "1"))
        self._max_size = int(options.get("pool_max_size", str(pool_size or 10)))
        if self._min_size > self._max_size:
            raise ConfigurationError("pool_min_size must not exceed pool_max_size")
        given = options.get("command_timeout")
        self._command_timeout = float(given) if given else derived_command_timeout(lock_timeout)
        """Seconds a statement may go unanswered (``StorageTimeout``); 0: no limit."""
        self._application_name = options["application_name"]
        self.pooler = options["pooler"]
        """``transaction``: a transaction pooler in front (``POOLERS``): no statement cache."""
        self._connect_timeout = connect_timeout(options)
        quoted = f'"{self.schema}"'
        self._q = schema_queries(self.schema)
        self._migrations = _migrations.load("postgres", lambda script: script.replace("{schema}", quoted))
        self._pool: Any = None
        self._records: GroupCommit[_Record, base.StepResult] = GroupCommit(
            self._record_batch, max_in_flight=1, max_batch=GROUP_COMMIT_MAX
        )
        self._finishes: GroupCommit[_Finish, None] = GroupCommit(
            self._finish_batch, max_in_flight=1, max_batch=GROUP_COMMIT_MAX
        )
        """Step commits and ends of concurrent instances share statements and commits
        (``_group_commit.py``)."""
        self.step_commits = 0
        """Step-commit and end statements run (each one commit): fewer than steps when batches form."""

    def observe_group_commits(self, observe: Callable[[str, int], None]) -> None:
        self._records.on_batch = lambda size: observe("step", size)
        self._finishes.on_batch = lambda size: observe("end", size)

    # -- plumbing ----------------------------------------------------------------------------------
    @asynccontextmanager
    async def _conn(self, *, bounded: bool = True) -> AsyncIterator[Conn]:
        """A pooled connection for one operation. ``bounded``: the operation (all its statements, the
        rollback after a failure) has ``command_timeout`` in all, not only each statement: asyncpg runs
        some round trips without a limit (closing statements its cache evicted), and on a half-open
        connection such a round trip never ends."""
        if self._pool is None:
            raise StorageError("the PostgreSQL storage is not open")
        limit = self._command_timeout or None if bounded else None
        try:
            async with self._pool.acquire() as conn:
                try:
                    async with asyncio.timeout(limit):
                        yield conn
                except Exception as exc:
                    if _is_connection_loss(exc):
                        # Dropped at once: after a timeout, asyncpg would send a cancel request and the
                        # release would wait for it another command_timeout, over a link that may be
                        # dead (a half-open connection answers nothing, the cancel neither).
                        with contextlib.suppress(Exception):  # released already if it broke
                            conn.terminate()
                    raise
        except (base.LeaseLost, StorageError):
            raise
        except Exception as exc:
            if _timed_out(exc):
                raise StorageTimeout(
                    f"PostgreSQL did not answer within command_timeout ({self._command_timeout:g}s); "
                    "the connection was dropped"
                ) from exc
            if _is_driver_error(exc):
                raise StorageError(_driver_message(exc)) from exc
            raise

    async def _run(self, fn: Callable[[Conn], Awaitable[_T]], *, bounded: bool = True) -> _T:
        async with self._conn(bounded=bounded) as conn:
            return await fn(conn)

    async def _read(self, fn: Callable[[Conn], Awaitable[_T]]) -> _T:
        """A read-only operation: on a broken connection, tried again on another (reads are idempotent)."""
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                return await self._run(fn)
            except StorageError as exc:
                if attempt == READ_ATTEMPTS or not _is_connection_loss(exc.__cause__ or exc):
                    raise
                await asyncio.sleep(0.05 * attempt)
        raise AssertionError("unreachable")

    async def _tx(self, fn: Callable[[Conn], Awaitable[_T]]) -> _T:
        async with self._conn() as conn, conn.transaction():
            return await fn(conn)

    # -- life cycle --------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        limit = self._command_timeout or None
        settings = {"application_name": self._application_name}
        if limit is not None and self.pooler != "transaction":
            # A session left in a transaction by a client that vanished (a partition) holds the rows it
            # locked, an instance's among them, which claims skip: the server ends it after this long.
            # Half the limit: those waiting for its locks get them before their own limit runs out.
            # (Not through a transaction pooler: PgBouncer refuses startup parameters it does not know;
            # PgBouncer's idle_transaction_timeout does the same when set.)
            # (At most PostgreSQL's largest value: a lease of weeks would otherwise open no connection.)
            settings["idle_in_transaction_session_timeout"] = str(min(int(limit * 500), MAX_SETTING_MS))
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                command_timeout=limit,  # connecting is bounded by connect_timeout, per host (_hosts)
                server_settings=settings,
                reset=_keep_session,
                # Behind a transaction pooler a statement prepared on one server session is unknown to
                # the next: asyncpg then prepares each one unnamed, in the round trip that runs it.
                **({"statement_cache_size": 0} if self.pooler == "transaction" else {}),
                connect=functools.partial(_hosts.connect, timeout=self._connect_timeout),
            )
        except Exception as exc:
            if _is_driver_error(exc):
                raise StorageError(f"cannot connect to PostgreSQL: {type(exc).__name__}: {exc}") from exc
            raise
        try:
            await self._run(self._migrate, bounded=False)
        except BaseException:
            await self.close()
            raise

    async def _migrate(self, conn: Conn) -> None:
        """Apply pending migrations under an advisory lock, so workers starting together migrate once.

        The lock is the transaction's (``pg_advisory_xact_lock``), released by its commit or rollback: a
        session lock taken and released by two statements is, behind a transaction pooler, taken on one
        server session and "released" on another, and held by the first until the pooler closes it."""
        key = f"geste_migrate:{self.schema}"
        async with conn.transaction():
            # Not under command_timeout: an index build on a big table (migration 6) takes minutes, and
            # the workers starting meanwhile wait for this lock; cut off, the upgrade would roll back and
            # start over.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key, timeout=MIGRATION_TIMEOUT
            )
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            found = await self._read_version(conn)
            for write in _migrations.migrate(found, self._migrations, self._announce):
                if isinstance(write, _migrations.Migration):
                    script = write.script  # one simple-protocol call runs the whole file
                    await conn.execute(script, timeout=MIGRATION_TIMEOUT)
                    if write.name.endswith(decide.EVENT_KEYS_MIGRATION):
                        await self._key_waits(conn)
                else:
                    await conn.execute(self._q["set_meta"], *write)

    async def _key_waits(self, conn: Conn) -> None:
        """Migration 12's part in Python: the match keys of the waits registered before it."""
        keyed = decide.keyed_waits(await conn.fetch(self._q["unkeyed_waits"]))
        if keyed:
            params = [(instance_id, key.key, list(key.pairs)) for instance_id, key in keyed]
            await conn.executemany(self._q["key_wait"], params, timeout=MIGRATION_TIMEOUT)

    async def _read_version(self, conn: Conn) -> int:
        tables = {row["name"] for row in await conn.fetch(self._q["list_tables"], self.schema)}
        if _migrations.is_new(tables, self._foreign_tables):
            return 0
        app = await conn.fetchval(self._q["get_meta"], "application")
        return _migrations.meta_version(app, await conn.fetchval(self._q["get_meta"], "schema_version"))

    def _foreign_tables(self, names: str) -> str:
        return (
            f"schema {self.schema!r} holds tables named like geste's ({names}) "
            "but no geste_meta: they are not geste's; use another schema"
        )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                # bounded, as the listener's: a connection on a half-open link (a partition) never
                # answers the goodbye that asyncpg's graceful close waits for
                async with asyncio.timeout(POOL_CLOSE_TIMEOUT):  # not wait_for: it can drop a cancel
                    await pool.close()
            except Exception:
                pool.terminate()

    def terminate(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def listen(
        self,
        channels: Sequence[str],
        on_notification: Callable[[str, str], None],
        on_lost: Callable[[], None],
        *,
        url: str | None = None,
    ) -> Listening:
        from ._listen import listen_postgres

        dsn, application_name = listen_dsn(url or self.url)
        timeout = connect_timeout(parse_postgres_url(url or self.url)[1])
        return await listen_postgres(
            dsn, application_name, channels, on_notification, on_lost, connect_timeout=timeout
        )

    async def schema_version(self) -> int:
        return await self._read(self._read_version)

    # -- instances ---------------------------------------------------------------------------------
    async def create_instance(
        self,
        new: base.NewInstance,
        *,
        lease: base.Lease | None,
        worker_id: str | None,
        lock_expires_at: float | None,
    ) -> tuple[base.InstanceRow, bool]:
        if new.queue is not None:
            return await self._run(functools.partial(self._insert_queued, new=new))
        starts = decide.new_row(lease, worker_id, lock_expires_at)
        return await self._run(functools.partial(self._insert_instance, new=new, starts=starts))

    async def _insert_instance(
        self, conn: Conn, *, new: base.NewInstance, starts: decide.NewRow
    ) -> tuple[base.InstanceRow, bool]:
        row = await conn.fetchrow(
            self._q["insert_instance"],
            new.instance_id,
            new.workflow_name,
            str(starts.status),
            new.input,
            new.now,
            starts.locked_by,
            starts.lease_id,
            starts.lock_expires_at,
            self.notify,
            new.deadline,
            new.version,
            new.pinned,
            new.trace_context,
        )
        if row is None:  # a concurrent insert of this id committed after the statement's snapshot:
            existing = await conn.fetchrow(self._q["get_instance"], new.instance_id)  # a new one sees it
            if existing is None:  # (only in a user's transaction, whose snapshot may be older)
                raise StorageError(f"instance {new.instance_id} is being started by another transaction")
            return rows.instance_row(existing), False
        return rows.instance_row(row), bool(row["created"])

    async def _insert_queued(self, conn: Conn, *, new: base.NewInstance) -> tuple[base.InstanceRow, bool]:
        """A start onto a queue (schema 20): inserted queued, or, when its id or its dedup id is taken by
        an unfinished instance, that instance (not created). An instance holding the dedup id that ends
        between the insert and the read frees it: the insert is tried again."""
        for _ in range(DEDUP_ATTEMPTS):
            inserted = await conn.fetchrow(
                self._q["insert_queued"],
                new.instance_id,
                new.workflow_name,
                new.input,
                new.now,
                new.deadline,
                new.queue,
                new.priority,
                new.dedup_id,
                self.notify,
                new.partition_key,
                new.version,
                new.pinned,
                new.trace_context,
            )
            existing = await conn.fetchrow(self._q["get_instance"], new.instance_id)
            if inserted is not None:
                return rows.instance_row(existing), True
            if existing is not None:
                return rows.instance_row(existing), False
            holder = await conn.fetchval(self._q["find_dedup"], new.queue, new.dedup_id)
            if holder is not None:
                found = await conn.fetchrow(self._q["get_instance"], holder)
                if found is not None:
                    return rows.instance_row(found), False
        raise StorageError(f"instance {new.instance_id}: its dedup id was taken and freed repeatedly")

    def in_transaction(self, connection: object) -> base.TransactionWrites:
        return UserTransaction(self, _checked_connection(connection))

    async def database_clock(self) -> float | None:
        async def go(conn: Conn) -> float:
            return float(await conn.fetchval(self._q["database_clock"]))

        return await self._read(go)

    async def get_instance(self, instance_id: str) -> base.InstanceRow | None:
        async def go(conn: Conn) -> base.InstanceRow | None:
            return rows.maybe_instance(await conn.fetchrow(self._q["get_instance"], instance_id))

        return await self._read(go)

    async def watch_result(self, instance_id: str, *, waiter: str, process: str, expires_at: float) -> bool:
        async def go(conn: Conn) -> bool:
            found = await conn.fetchval(self._q["watch_result"], instance_id, waiter, process, expires_at)
            return bool(found)

        return await self._run(go)

    async def unwatch_results(self, waits: Sequence[tuple[str, str]]) -> None:
        if not waits:
            return

        async def go(conn: Conn) -> None:
            await conn.execute(self._q["unwatch_results"], [w[0] for w in waits], [w[1] for w in waits])

        await self._run(go)

    async def result_waiters_cleanup(self, now: float, *, limit: int) -> int:
        async def go(conn: Conn) -> int:
            return int(await conn.fetchval(self._q["result_waiters_cleanup"], now, limit))

        return await self._run(go)

    # -- streams (schema 26) -------------------------------------------------------------------------
    async def stream_write(self, writes: Sequence[base.StreamWrite], now: float) -> list[tuple[str, str]]:
        if not writes:
            return []
        # As SQLite does: a writer twice in one batch is written once (the statement counts each item it
        # does not find stored: a second copy would take a position its ON CONFLICT then leaves empty), and
        # the items after a close of their stream in the batch are dropped (the statement checks the heads
        # before the batch only).
        kept: dict[tuple[str, str, str], base.StreamWrite] = {}
        closing: set[tuple[str, str]] = set()
        for w in writes:
            if (w.instance_id, w.key) not in closing:
                kept.setdefault((w.instance_id, w.key, w.writer), w)
                if w.item is None:
                    closing.add((w.instance_id, w.key))
        if len(kept) < len(writes):
            writes = list(kept.values())

        async def go(conn: Conn) -> list[tuple[str, str]]:
            found = await conn.fetch(
                self._q["stream_write"],
                [w.instance_id for w in writes],
                [w.key for w in writes],
                [w.writer for w in writes],
                [w.item for w in writes],
                now,
            )
            return [(r["instance_id"], r["key"]) for r in found]

        return await self._run(go)

    async def stream_read(
        self, instance_id: str, key: str, start: int, limit: int
    ) -> list[tuple[int, str | None]]:
        async def go(conn: Conn) -> list[tuple[int, str | None]]:
            found = await conn.fetch(self._q["stream_read"], instance_id, key, start, limit)
            return [(int(r["position"]), r["item"]) for r in found]

        return await self._read(go)

    async def stream_instance_status(self, instance_id: str) -> Status | None:
        async def go(conn: Conn) -> Status | None:
            found = await conn.fetchval(self._q["stream_instance_status"], instance_id)
            return None if found is None else Status.stored(found)

        return await self._read(go)

    async def stream_list(self, instance_id: str, *, limit: int = 100) -> list[base.StreamHead]:
        async def go(conn: Conn) -> list[base.StreamHead]:
            found = await conn.fetch(self._q["stream_list"], instance_id, limit)
            return [base.StreamHead(r["key"], int(r["next_position"]), bool(r["closed"])) for r in found]

        return await self._read(go)

    async def stream_watch(
        self, instance_id: str, key: str, *, reader: str, process: str, expires_at: float
    ) -> None:
        async def go(conn: Conn) -> None:
            await conn.execute(self._q["stream_watch"], instance_id, key, reader, process, expires_at)

        await self._run(go)

    async def stream_unwatch(self, readers: Sequence[tuple[str, str, str]]) -> None:
        if not readers:
            return

        async def go(conn: Conn) -> None:
            await conn.execute(
                self._q["stream_unwatch"],
                [r[0] for r in readers],
                [r[1] for r in readers],
                [r[2] for r in readers],
            )

        await self._run(go)

    async def stream_readers_cleanup(self, now: float, *, limit: int) -> int:
        async def go(conn: Conn) -> int:
            return int(await conn.fetchval(self._q["stream_readers_cleanup"], now, limit))

        return await self._run(go)

    async def stream_notify(self, payloads: Sequence[str]) -> None:
        if not payloads:
            return

        async def go(conn: Conn) -> None:
            await conn.execute(self._q["stream_notify"], list(payloads))

        await self._run(go)

    async def list_instances(
        self,
        *,
        workflow_name: str | None = None,
        status: Status | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[base.InstanceRow]:
        async def go(conn: Conn) -> list[base.InstanceRow]:
            wanted = None if status is None else str(status)
            found = await conn.fetch(self._q["list_instances"], workflow_name, wanted, limit, offset)
            return [rows.instance_row(row) for row in found]

        return await self._read(go)

    async def get_history(self, instance_id: str) -> list[base.HistoryRow]:
        async def go(conn: Conn) -> list[base.HistoryRow]:
            return [rows.history_row(r) for r in await conn.fetch(self._q["get_history"], instance_id)]

        return await self._read(go)

    async def request_cancel(self, instance_id: str, now: float) -> base.InstanceRow | None:
        async def go(conn: Conn) -> base.InstanceRow | None:
            if not await conn.fetchval(self._q["cancel_unstarted"], instance_id, now, self.notify):
                await conn.execute(self._q["flag_cancel"], instance_id, now, self.notify)
            return rows.maybe_instance(await conn.fetchrow(self._q["get_instance"], instance_id))

        return await self._tx(go)

    # -- operator actions --------------------------------------------------------------------------
    async def retry_instance(self, instance_id: str, now: float) -> base.RetryOutcome:
        async def go(conn: Conn) -> base.RetryOutcome:
            row = rows.maybe_instance(await conn.fetchrow(self._q["lock_instance"], instance_id))
            if row is None:
                return base.RetryOutcome(None)
            if row.status != Status.FAILED:
                return decide.retry_refused(row, await conn.fetchrow(self._q["last_retry"], instance_id))
            history = [rows.history_row(r) for r in await conn.fetch(self._q["get_history"], instance_id)]
            from_seq = decide.retry_from(row, history)
            if isinstance(from_seq, base.RetryOutcome):
                return from_seq
            # the rows from from_seq on are deleted, archived and counted by the statement itself
            done = await conn.fetchrow(self._q["retry_instance"], instance_id, now, self.notify, from_seq)
            after = rows.instance_row(await conn.fetchrow(self._q["get_instance"], instance_id))
            removed = rows.history_from_arrays(json.loads(done["removed"]))
            return decide.retried(row, after, done["retry"], now, done["from_seq"], removed)

        return await self._tx(go)

    async def list_retries(self, instance_id: str) -> list[base.RetryRow]:
        async def go(conn: Conn) -> list[base.RetryRow]:
            return [rows.retry_row(r) for r in await conn.fetch(self._q["list_retries"], instance_id)]

        return await self._read(go)

    async def list_runs(self, instance_id: str) -> list[base.RunRow]:
        async def go(conn: Conn) -> list[base.RunRow]:
            return [rows.run_row(r) for r in await conn.fetch(self._q["list_runs"], instance_id)]

        return await self._read(go)

    async def get_run_history(self, instance_id: str, run: int) -> list[base.HistoryRow]:
        async def go(conn: Conn) -> list[base.HistoryRow]:
            found = await conn.fetch(self._q["get_run_history"], instance_id, run)
            return [rows.history_row(r) for r in found]

        return await self._read(go)

    async def resume_instance(
        self, instance_id: str, now: float, *, lock_timeout: float, force: bool
    ) -> base.ResumeOutcome:
        async def go(conn: Conn) -> base.ResumeOutcome:
            found = await conn.fetchrow(self._q["lock_instance"], instance_id)
            before = decide.resumable(rows.maybe_instance(found))
            if isinstance(before, base.ResumeOutcome):
                return before
            held = decide.lease_held(before, now)
            holder = await conn.fetchrow(self._q["worker_liveness"], before.locked_by) if held else None
            alive = rows.worker_alive(holder, now=now, lock_timeout=lock_timeout)
            if alive and not force:
                return base.ResumeOutcome(before, holder_alive=True)
            await conn.execute(self._q["resume"], instance_id, now, held, self.notify)
            after = rows.instance_row(await conn.fetchrow(self._q["get_instance"], instance_id))
            return base.ResumeOutcome(before, after, holder_alive=alive, lease_broken=held)

        return await self._tx(go)

    # -- leases ------------------------------------------------------------------------------------
    async def claim(
        self,
        worker_id: str,
        now: float,
        lock_expires_at: float,
        limit: int,
        *,
        due_before: float | None = None,
        workflows: Sequence[str],
        known: Mapping[str, int] | None = None,
    ) -> base.Claims:
        due = now if due_before is None else due_before
        names = sorted(set(workflows))
        if not names:
            return base.Claims()

        async def go(conn: Conn) -> base.Claims:
            found = await conn.fetch(
                self._q["claim" if len(names) == 1 else "claim_names"],
                worker_id,
                f"{uuid.uuid4().hex[:12]}/",
                now,
                lock_expires_at,
                limit,
                due,
                names[0] if len(names) == 1 else names,
                json.dumps(known) if known else None,
            )
            claims, later = base.Claims(), None
            for r, history in zip(found, await _histories(found), strict=True):
                if r["instance_id"] is None:  # not a claim: the row that carries the next run_at
                    later = r["run_at"]
                    continue
                after = known.get(r["instance_id"], 0) if known else 0
                history = await self._caught_up(conn, r, history, after)
                claims.append(rows.claim(r, history, r["expired_at"], after))
            claims.next_run_at = later
            return claims

        return await self._run(go)

    async def _caught_up(
        self, conn: Conn, r: Any, history: tuple[base.HistoryRow, ...], after: int
    ) -> tuple[base.HistoryRow, ...]:
        """``history`` with the rows a claim's snapshot missed. A claim's lock on an instance's row can wait
        for a concurrent commit that appended steps (the holder of a lease the claimer, its clock ahead, saw
        run out; a send handing an event to an instance already due): the claim then updates the row as that
        commit left it (its ``steps``), but reads the history in the snapshot the statement began with, before
        those rows. Replaying that would redo a recorded step; the rows are read again instead (a second
        statement, only then)."""
        last = history[-1].seq if history else after
        if r["steps"] is None or r["steps"] <= last:
            return history
        return history + tuple(
            rows.history_row(x) for x in await conn.fetch(self._q["history_after"], r["instance_id"], last)
        )

    async def claim_ids(
        self,
        worker_id: str,
        now: float,
        lock_expires_at: float,
        instance_ids: Sequence[str],
        *,
        due_before: float | None = None,
        workflows: Sequence[str],
        known: Mapping[str, int] | None = None,
    ) -> base.Claims:
        ids, names = list(dict.fromkeys(instance_ids)), sorted(set(workflows))
        if not ids or not names:
            return base.Claims()

        async def go(conn: Conn) -> base.Claims:
            found = await conn.fetch(
                self._q["claim_ids"],
                worker_id,
                f"{uuid.uuid4().hex[:12]}/",
                now,
                lock_expires_at,
                len(ids),
                now if due_before is None else due_before,
                ids,
                names,
                json.dumps(known) if known else None,
            )
            claims = base.Claims()
            for r, history in zip(found, await _histories(found), strict=True):
                if r["lease_id"] is None:  # named, free, not due yet: when it is
                    claims.later[r["instance_id"]] = r["run_at"]
                else:
                    after = known.get(r["instance_id"], 0) if known else 0
                    history = await self._caught_up(conn, r, history, after)
                    claims.append(rows.claim(r, history, r["expired_at"], after))
            return claims

        return await self._run(go)

    async def queue_upsert(self, queue: base.QueueRow, now: float) -> None:
        async def go(conn: Conn) -> None:
            await conn.execute(
                self._q["queue_upsert"],
                queue.name,
                queue.concurrency,
                queue.worker_concurrency,
                now,
                queue.rate_limit,
                queue.rate_period,
                queue.partition_concurrency,
                queue.partition_rate_limit,
            )

        await self._run(go)

    async def queue_runnable(
        self,
        queues: Sequence[str],
        now: float,
        limit: int,
        *,
        due_before: float | None = None,
        workflows: Sequence[str],
    ) -> tuple[list[str], float | None]:
        if not queues or not workflows or limit <= 0:
            return [], None

        async def go(conn: Conn) -> tuple[list[str], float | None]:
            found = await conn.fetch(
                self._q["queue_runnable"],
                sorted(set(queues)),
                now,
                now if due_before is None else due_before,
                limit,
                sorted(set(workflows)),
            )
            ids = [r["instance_id"] for r in found if r["instance_id"] is not None]
            return ids, next((r["run_at"] for r in found if r["instance_id"] is None), None)

        return await self._read(go)

    async def queue_claim(
        self, worker_id: str, now: float, lock_expires_at: float, limit: int, *, queue: str
    ) -> base.Claims:
        if limit <= 0:
            return base.Claims()

        async def go(conn: Conn) -> base.Claims:
            found = await conn.fetch(
                self._q["queue_claim"],
                queue,
                limit,
                worker_id,
                f"{uuid.uuid4().hex[:12]}/",
                now,
                lock_expires_at,
            )
            claims = base.Claims([rows.claim(r, (), None) for r in found if r["instance_id"] is not None])
            claims.next_run_at = min((r["run_at"] for r in found if r["instance_id"] is None), default=None)
            return claims

        return await self._run(go)

    async def route_wakeups(self, wakeups: Sequence[tuple[str, str]], *, avoid: str) -> int:
        if not self.notify or not wakeups:
            return 0

        async def go(conn: Conn) -> int:
            sent = await conn.fetchval(
                self._q["route_wakeups"], [w[0] for w in wakeups], [w[1] for w in wakeups], avoid
            )
            return int(sent)

        return await self._run(go)

    async def hand_on_queue(self, queue: str, key: str, *, avoid: str) -> bool:
        if not self.notify:
            return False

        async def go(conn: Conn) -> bool:
            await conn.execute(self._q["hand_on_queue"], queue, key, avoid)
            return True

        return await self._run(go)

    async def renew(
        self,
        leases: Sequence[base.Lease],
        lock_expires_at: float,
        *,
        now: float | None = None,
        heartbeats: Mapping[str, str] | None = None,
    ) -> base.Renewed:
        details = heartbeats or {}

        async def go(conn: Conn) -> base.Renewed:
            kept = await conn.fetch(
                self._q["renew"],
                lock_expires_at,
                [x.instance_id for x in leases],
                [x.lease_id for x in leases],
                decide.takeover_threshold(lock_expires_at, now),
                [details.get(x.instance_id) for x in leases],
            )
            return base.Renewed(
                (row["instance_id"] for row in kept),
                (row["instance_id"] for row in kept if row["cancel_requested"]),
            )

        return await self._run(go)

    async def heartbeat_details(self, instance_id: str) -> str | None:
        async def go(conn: Conn) -> str | None:
            return cast(str | None, await conn.fetchval(self._q["heartbeats"], instance_id))

        return await self._read(go)

    async def trace_context(self, instance_id: str) -> str | None:
        async def go(conn: Conn) -> str | None:
            return cast(str | None, await conn.fetchval(self._q["trace_context"], instance_id))

        return await self._read(go)

    async def release(self, leases: Sequence[base.Lease], now: float, *, run_at: float | None = None) -> None:
        async def go(conn: Conn) -> None:
            await conn.execute(
                self._q["release"],
                now if run_at is None else run_at,
                now,
                [x.instance_id for x in leases],
                [x.lease_id for x in leases],
                self.notify,
            )

        await self._run(go)

    # -- steps under a lease -----------------------------------------------------------------------
    @staticmethod
    def _columns(records: Sequence[base.HistoryRow]) -> tuple[list[Any], ...]:
        return (
            [r.seq for r in records],
            [r.kind for r in records],
            [r.name for r in records],
            [r.payload for r in records],
            [r.is_error for r in records],
            [r.created_at for r in records],
        )

    @classmethod
    def _lease_columns(cls, commit: base.Commit) -> tuple[Any, ...]:
        """The parameters that open every statement of a step commit that renews the lease: instance,
        lease id, new expiry, time, then the history columns."""
        lease = commit.lease
        return (
            lease.instance_id,
            lease.lease_id,
            commit.lock_expires_at,
            commit.now,
            *cls._columns(commit.records),
        )

    async def _insert_history(self, conn: Conn, instance_id: str, records: Sequence[base.HistoryRow]) -> None:
        if records:
            await conn.execute(self._q["insert_history"], instance_id, *self._columns(records))

    async def record(self, commit: base.Commit, *, status: Status | None = None) -> base.StepResult:
        return await self._records.submit(_Record(_queued(commit), status))

    async def _record_batch(self, batch: Sequence[_Record]) -> list[base.StepResult | BaseException]:
        """Step commits: alone (``record``) or several instances' together (``record_batch``)."""
        return await self._in_one_statement(
            batch,
            self._record_one,
            "record_batch",
            _record_columns,
            lambda row: base.StepResult(cancel_requested=row["cancel_requested"]),
            _merge_records,
        )

    async def _in_one_statement(
        self,
        batch: Sequence[_BatchItem],
        one: Callable[[_BatchItem], Awaitable[_T]],
        query: str,
        columns: Callable[[Sequence[_BatchItem]], tuple[Any, ...]],
        outcome: Callable[[Any], _T],
        merge: Callable[[_BatchItem, _BatchItem], _BatchItem] | None = None,
    ) -> list[_T | BaseException]:
        """A group commit's batch: one item goes alone (``one``), several in the statement ``query``, which
        returns a row (instance id and lease id first) for each lease that held. The statement takes each
        instance once (an ``UPDATE ... FROM`` applies one input row per target row): an instance's items
        under one lease are ``merge``d first; one under another lease (a lease lost and taken again) goes
        alone after it. A batch that fails for any other reason than a lost connection (a deadlock, say)
        is split up, so one instance's trouble never fails its neighbours' writes."""
        if len(batch) == 1:
            return [await _outcome(one(batch[0]))]
        by_instance: dict[str, _BatchItem] = {}
        alone: list[int] = []
        for n, item in enumerate(batch):
            seen = by_instance.get(item.lease.instance_id)
            if seen is None:
                by_instance[item.lease.instance_id] = item
            elif merge is not None and seen.lease == item.lease:
                by_instance[item.lease.instance_id] = merge(seen, item)
            else:
                alone.append(n)
        together = list(by_instance.values())
        try:
            self.step_commits += 1
            found = await self._run(lambda conn: conn.fetch(self._q[query], *columns(together)))
        except StorageError as exc:
            if _is_connection_loss(exc.__cause__ or exc):
                raise
            return [await _outcome(one(item)) for item in batch]
        held = {base.Lease(row["instance_id"], row["lease_id"]): row for row in found}
        results: list[_T | BaseException] = [
            outcome(held[item.lease]) if item.lease in held else base.LeaseLost(item.lease.instance_id)
            for item in batch
        ]
        for n in alone:
            results[n] = await _outcome(one(batch[n]))
        return results

    async def _record_one(self, item: _Record) -> base.StepResult:
        self.step_commits += 1
        commit = item.commit

        async def go(conn: Conn) -> base.StepResult:
            row = await conn.fetchrow(
                self._q["record"],
                *self._lease_columns(commit),
                None if item.status is None else str(item.status),
            )
            if row is None:
                raise base.LeaseLost(commit.lease.instance_id)
            return base.StepResult(cancel_requested=row["cancel_requested"])

        return await self._run(go)

    @overload
    async def _suspend(
        self, conn: Conn, commit: base.Commit, *, run_at: float | None, timer: tuple[int, float] | None
    ) -> base.Suspension: ...
    @overload
    async def _suspend(
        self,
        conn: Conn,
        commit: base.Commit,
        *,
        run_at: float | None,
        timer: tuple[int, float] | None,
        awaits: str,
    ) -> base.Suspension | base.ChildState: ...
    async def _suspend(
        self,
        conn: Conn,
        commit: base.Commit,
        *,
        run_at: float | None,
        timer: tuple[int, float] | None,
        awaits: str | None = None,
    ) -> base.Suspension | base.ChildState:
        """The suspension, in one statement; at a child wait (``awaits``), the child's end instead when it
        has ended (nothing written)."""
        lease = commit.lease
        row = await conn.fetchrow(
            self._q["suspend"],
            lease.instance_id,
            lease.lease_id,
            run_at,
            commit.now,
            *self._columns(commit.records),
            None if timer is None else timer[0],
            None if timer is None else timer[1],
            self.notify,
            awaits,
        )
        if row["suspended"]:
            return base.Suspension.SUSPENDED
        if not row["ours"]:
            raise base.LeaseLost(lease.instance_id)
        ended = rows.ended_child(row)
        return base.Suspension.CANCEL_REQUESTED if ended is None else ended

    async def suspend(
        self, commit: base.Commit, *, run_at: float | None, timer: tuple[int, float] | None = None
    ) -> base.Suspension:
        return await self._run(lambda conn: self._suspend(conn, commit, run_at=run_at, timer=timer))

    async def continue_as_new(self, commit: base.Commit, *, input: str, last_seq: int) -> base.Suspension:
        lease = commit.lease

        async def go(conn: Conn) -> base.Suspension:
            row = await conn.fetchrow(
                self._q["continue_as_new"],
                lease.instance_id,
                lease.lease_id,
                input,
                commit.now,
                *self._columns(commit.records),
                last_seq,
            )
            if row["continued"]:
                return base.Suspension.SUSPENDED
            if not row["ours"]:
                raise base.LeaseLost(lease.instance_id)
            return base.Suspension.CANCEL_REQUESTED

        return await self._run(go)

    async def take_event_or_suspend(
        self, commit: base.Commit, wait: base.EventWait
    ) -> base.StoredEvent | base.Suspension | None:
        lease, records, now = commit.lease, commit.records, commit.now

        key = wait_key(wait.event_type, wait.match)

        async def go(conn: Conn) -> base.StoredEvent | base.Suspension | None:
            # the type's lock shared, the wait's key exclusively: a send that may match waits for us
            await conn.execute(self._q["lock_event_keys"], wait.event_type, [key.key], False, [True])
            if key.indexed is None:  # no match: the first event of the type
                candidates = await conn.fetch(self._q["candidate_events"], wait.event_type, lease.instance_id)
            else:  # the events that have the wait's indexed pair (and those stored without keys)
                candidates = await conn.fetch(
                    self._q["candidate_events_by_key"], wait.event_type, lease.instance_id, key.key
                )
            found = decide.first_match(wait, candidates)
            if found is None and decide.timed_out(wait.deadline, now):
                return None
            if found is None:
                timer = None if wait.deadline is None else (wait.outcome_seq, wait.deadline)
                outcome = await self._suspend(conn, commit, run_at=wait.deadline, timer=timer)
                if outcome is base.Suspension.SUSPENDED:
                    waiting = rows.event_wait_columns(lease.instance_id, wait, now, key.key)
                    await conn.execute(self._q["insert_event_wait"], *waiting, list(key.pairs))
                return outcome
            taken = decide.event_outcome(wait.outcome_seq, found, now)
            touched = await conn.fetchrow(
                self._q["touch_lease"],
                lease.instance_id,
                lease.lease_id,
                commit.lock_expires_at,
                now,
                len(records) + 1,
            )
            if touched is None:
                raise base.LeaseLost(lease.instance_id)
            await self._insert_history(conn, lease.instance_id, [*records, taken])
            await conn.execute(self._q["insert_delivery"], lease.instance_id, found.seq)
            return found

        return await self._tx(go)

    async def finish(
        self,
        commit: base.Commit,
        *,
        status: Status,
        result: str | None = None,
        error: str | None = None,
        cancel_children: Sequence[str] = (),
    ) -> None:
        await self._finishes.submit(_Finish(_queued(commit), status, result, error, tuple(cancel_children)))

    async def _finish_batch(self, batch: Sequence[_Finish]) -> list[BaseException | None]:
        """Ends of instances: alone (``finish``) or several together (``finish_batch``)."""
        return await self._in_one_statement(
            batch, self._finish_one, "finish_batch", self._finish_params, lambda row: None
        )

    def _finish_params(self, batch: Sequence[_Finish]) -> tuple[Any, ...]:
        """``finish_batch``'s parameters: the arrays, whether it may notify, then the children to cancel
        (of all the batch's ends: each is flagged only where its parent's end held)."""
        return (*_finish_columns(batch), self.notify, [cid for item in batch for cid in item.children])

    async def _finish_one(self, item: _Finish) -> None:
        """One end in its own statement; written once more if PostgreSQL aborted it to break a deadlock
        (nothing of it was written): an end that flags its children locks them after its own row when
        its id sorts first, while a child's end at that moment locks the child, then the parent
        (docs/design.md, "Parent close"): the end goes through once the child's has, not a second
        later through an abandoned run. Written up to ``FINISH_DEADLOCK_TRIES`` times: the end written
        again can take its own row back before the child's end, which waited for it, gets it, and
        deadlock once more (seen under load)."""
        for attempt in range(1, FINISH_DEADLOCK_TRIES + 1):
            try:
                await self._finish_once(item)
                return
            except StorageError as exc:
                if getattr(exc.__cause__, "sqlstate", None) != DEADLOCK or attempt == FINISH_DEADLOCK_TRIES:
                    raise

    async def _finish_once(self, item: _Finish) -> None:
        self.step_commits += 1
        commit = item.commit

        async def go(conn: Conn) -> None:
            done = await conn.fetchval(
                self._q["finish"],
                commit.lease.instance_id,
                commit.lease.lease_id,
                str(item.status),
                item.result,
                item.error,
                commit.now,
                *self._columns(commit.records),
                self.notify,
                list(item.children),
            )
            if not done:
                raise base.LeaseLost(commit.lease.instance_id)

        await self._run(go)

    # -- child workflows (schema 16) ------------------------------------------------------------------
    async def start_child(
        self, commit: base.Commit, child: base.NewInstance, *, parent_close: str
    ) -> base.ChildState | base.DedupHeld | base.StepResult:
        lease = commit.lease

        async def go(conn: Conn) -> base.ChildState | base.DedupHeld | base.StepResult:
            for _ in range(DEDUP_ATTEMPTS):
                started = await conn.fetchrow(
                    self._q["start_child"],
                    child.instance_id,
                    child.workflow_name,
                    child.input,
                    child.now,
                    lease.instance_id,
                    lease.lease_id,
                    commit.lock_expires_at,
                    *self._columns(commit.records),
                    parent_close,
                    self.notify,
                    child.deadline,
                    child.queue,
                    child.priority,
                    child.dedup_id,
                    child.partition_key,
                    child.version,
                    child.pinned,
                    child.trace_context,
                )
                if started["created"]:
                    if not started["touched"]:
                        raise base.LeaseLost(lease.instance_id)
                    return base.StepResult(cancel_requested=bool(started["cancel_requested"]))
                state = _child_state(await conn.fetchrow(self._q["child_state"], child.instance_id))
                if state is not None:
                    return state
                if child.dedup_id is not None:  # refused for its dedup id (20): who holds it
                    holder = await conn.fetchval(self._q["find_dedup"], child.queue, child.dedup_id)
                    if holder is not None:
                        return base.DedupHeld(holder)
                    continue  # the holder ended in between: the id is free, try again
                # refused, yet gone at the read (no instance is deleted today): never report it created;
                raise base.LeaseLost(lease.instance_id)  # the run is retried
            raise StorageError(f"instance {child.instance_id}: its dedup id was taken and freed repeatedly")

        return await self._run(go)

    async def take_child_or_suspend(
        self, commit: base.Commit, child_id: str
    ) -> base.ChildState | base.Suspension:
        # One statement (`suspend` with the awaited child, schema 21): it locks the parent's row, then
        # reads the child in a fresh snapshot, and suspends only if the child has not ended; a child's
        # end that has not reached the parent's row waits for it and then wakes the parent.
        async def go(conn: Conn) -> base.ChildState | base.Suspension:
            return await self._suspend(conn, commit, run_at=None, timer=None, awaits=child_id)

        return await self._run(go)

    async def list_children(self, instance_id: str, *, limit: int = 1000) -> list[base.InstanceRow]:
        async def go(conn: Conn) -> list[base.InstanceRow]:
            return [
                rows.instance_row(r) for r in await conn.fetch(self._q["list_children"], instance_id, limit)
            ]

        return await self._read(go)

    # -- events ------------------------------------------------------------------------------------
    async def send_event(self, event: base.NewEvent) -> tuple[bool, list[str]]:
        return await self._tx(functools.partial(self._send_event, event=event))

    async def _send_event(self, conn: Conn, *, event: base.NewEvent) -> tuple[bool, list[str]]:
        """The event's two statements, in the caller's transaction: its keys' locks, then the send."""
        keys = event_keys(event.event_type, json.loads(event.data))
        payload = event_history_payload(decide.stored_event(event, 0))
        # each key shared (the type's lock exclusively for a wide event): waits of those keys wait for us
        lock = (
            (event.event_type, [], True, [])
            if keys.wide
            else (event.event_type, keys.lookup, False, [False] * len(keys.lookup))
        )
        await conn.execute(self._q["lock_event_keys"], *lock)
        row = await conn.fetchrow(
            self._q["send_event"],
            *rows.event_columns(event),
            list(keys.keys),
            keys.lookup,
            list(keys.pairs),
            payload,
            self.notify,
        )
        return row["stored"], list(row["woken"])

    async def next_run_at(self) -> float | None:
        async def go(conn: Conn) -> float | None:
            value = await conn.fetchval(self._q["next_run_at"])
            return None if value is None else float(value)

        return await self._read(go)

    # -- workers and status ------------------------------------------------------------------------
    @staticmethod
    def _worker_columns(worker: base.WorkerRow) -> tuple[Any, ...]:
        return (
            worker.worker_id,
            worker.host,
            worker.pid,
            worker.started_at,
            worker.heartbeat_at,
            worker.running,
            worker.concurrency,
            worker.listener,
            worker.lock_timeout,
            worker.workflows,
            worker.health,
            worker.relay,
            worker.version,
        )

    async def upsert_worker(self, worker: base.WorkerRow) -> None:
        async def go(conn: Conn) -> None:
            await conn.execute(self._q["upsert_worker"], *self._worker_columns(worker), worker.queues)

        await self._run(go)

    async def heartbeat(self, worker: base.WorkerRow, *, peers_since: float) -> list[base.WorkerRow]:
        async def go(conn: Conn) -> list[base.WorkerRow]:
            found = await conn.fetch(
                self._q["heartbeat"], *self._worker_columns(worker), peers_since, worker.queues
            )
            return [rows.worker_row(r) for r in found]

        return await self._run(go)

    async def mark_worker_stopped(self, worker_id: str, now: float) -> None:
        async def go(conn: Conn) -> None:
            await conn.execute(self._q["mark_worker_stopped"], worker_id, now)

        await self._run(go)

    async def prune_workers(self, before: float) -> int:
        async def go(conn: Conn) -> int:
            done = await conn.execute(self._q["prune_workers"], before)
            return int(done.rpartition(" ")[2])

        return await self._run(go)

    async def list_workers(self, limit: int = 1000) -> list[base.WorkerRow]:
        async def go(conn: Conn) -> list[base.WorkerRow]:
            return [rows.worker_row(r) for r in await conn.fetch(self._q["list_workers"], limit)]

        return await self._read(go)

    async def list_leases(self, now: float, limit: int) -> list[tuple[str, str, str, float]]:
        async def go(conn: Conn) -> list[tuple[str, str, str, float]]:
            return [rows.lease_info(r) for r in await conn.fetch(self._q["list_leases"], now, limit)]

        return await self._read(go)

    async def queue_stats(self, now: float) -> QueueStats:
        async def go(conn: Conn) -> QueueStats:
            async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot
                return decide.queue_stats(
                    now,
                    await conn.fetch(self._q["count_by_status"]),
                    await conn.fetchval(self._q["count_runnable"], now),
                    await conn.fetch(self._q["held_leases"], now),
                    await conn.fetchval(self._q["oldest_waiting"]),
                    await conn.fetchrow(self._q["outbox_stats"]),
                )

        return await self._read(go)

    async def list_queues(self, now: float, *, cap: int, limit: int, levels: int) -> list[base.QueueState]:
        async def go(conn: Conn) -> list[base.QueueState]:
            return [
                rows.queue_state(r) for r in await conn.fetch(self._q["list_queues"], now, cap, limit, levels)
            ]

        return await self._read(go)

    # -- published state (schema 25) ---------------------------------------------------------------
    async def state_set(
        self, commit: base.Commit, *, key: str, value: str, run: int, seq: int
    ) -> base.StateSet:
        async def go(conn: Conn) -> base.StateSet:
            row = await conn.fetchrow(
                self._q["state_set"], *self._lease_columns(commit), None, key, value, run, seq, self.notify
            )
            if row is None:
                raise base.LeaseLost(commit.lease.instance_id)
            return base.StateSet(version=row["version"], cancel_requested=row["cancel_requested"])

        return await self._run(go)

    async def get_state(
        self, instance_id: str, key: str, *, version: int | None = None
    ) -> tuple[Status, base.StateRow | None] | None:
        async def go(conn: Conn) -> tuple[Status, base.StateRow | None] | None:
            return rows.instance_state(await conn.fetchrow(self._q["get_state"], instance_id, key, version))

        return await self._read(go)

    async def list_state(self, instance_id: str, *, limit: int) -> list[base.StateRow]:
        async def go(conn: Conn) -> list[base.StateRow]:
            return [rows.state(r) for r in await conn.fetch(self._q["list_state"], instance_id, limit)]

        return await self._read(go)

    async def watch_state(
        self, instance_id: str, key: str, *, waiter: str, process: str, expires_at: float
    ) -> bool:
        async def go(conn: Conn) -> bool:
            return bool(
                await conn.fetchval(self._q["watch_state"], instance_id, key, waiter, process, expires_at)
            )

        return await self._run(go)

    # -- the transactional outbox ------------------------------------------------------------------
    async def outbox_record(
        self, commit: base.Commit, event: base.NewOutboxEvent, *, status: Status | None = None
    ) -> base.StepResult:
        async def go(conn: Conn) -> base.StepResult:
            row = await conn.fetchrow(
                self._q["outbox_record"],
                *self._lease_columns(commit),
                None if status is None else str(status),
                event.event_id,
                event.step_seq,
                event.event_type,
                event.source,
                event.subject,
                event.data,
                self.notify,
            )
            if row is None:
                raise base.LeaseLost(commit.lease.instance_id)
            return base.StepResult(cancel_requested=row["cancel_requested"])

        return await self._run(go)

    async def outbox_claim(
        self, relay_id: str, claim_id: str, now: float, claim_expires_at: float, limit: int, window: int
    ) -> list[base.OutboxClaim]:
        async def go(conn: Conn) -> list[base.OutboxClaim]:
            claimed = await conn.fetch(
                self._q["outbox_claim"], relay_id, claim_id, now, claim_expires_at, limit, window
            )
            return [rows.outbox_claim(r, claim_id) for r in claimed]

        return await self._run(go)

    async def outbox_mark_delivered(self, event_id: str, claim_id: str, now: float) -> tuple[bool, bool]:
        async def go(conn: Conn) -> tuple[bool, bool]:
            row = await conn.fetchrow(self._q["outbox_mark_delivered"], event_id, claim_id, now)
            return bool(row["ours"]), bool(row["later"])

        return await self._run(go)

    async def outbox_mark_failed(
        self, event_id: str, claim_id: str, now: float, error: str, next_attempt_at: float | None
    ) -> tuple[bool, bool]:
        async def go(conn: Conn) -> tuple[bool, bool]:
            row = await conn.fetchrow(
                self._q["outbox_mark_failed"], event_id, claim_id, now, error, next_attempt_at
            )
            return bool(row["ours"]), bool(row["later"])

        return await self._run(go)

    async def outbox_release(self, claims: Sequence[tuple[str, str]], now: float) -> None:
        async def go(conn: Conn) -> None:
            await conn.executemany(self._q["outbox_release"], [(e, c, now) for e, c in claims])

        if claims:
            await self._run(go)

    async def outbox_next_attempt_at(self) -> float | None:
        async def go(conn: Conn) -> float | None:
            value = await conn.fetchval(self._q["outbox_next_attempt_at"])
            return None if value is None else float(value)

        return await self._read(go)

    async def outbox_list(
        self, *, status: str | None = None, instance_id: str | None = None, limit: int = 100
    ) -> list[base.OutboxRow]:
        async def go(conn: Conn) -> list[base.OutboxRow]:
            return [
                rows.outbox_row(r)
                for r in await conn.fetch(self._q["outbox_list"], status, instance_id, limit)
            ]

        return await self._read(go)

    async def outbox_retry(self, event_id: str, now: float) -> bool:
        async def go(conn: Conn) -> bool:
            row = await conn.fetchrow(self._q["outbox_retry"], event_id, now, self.notify)
            return bool(row["found"])

        return await self._run(go)

    async def outbox_discard(self, event_id: str, now: float) -> bool:
        async def go(conn: Conn) -> bool:
            row = await conn.fetchrow(self._q["outbox_discard"], event_id, now)
            if row is None:
                return False
            # a statement of its own: a snapshot taken after the discard got its row (see outbox_promote)
            await conn.fetchrow(
                self._q["outbox_promote"], row["instance_id"], row["step_seq"], now, self.notify
            )
            return True

        return await self._tx(go)

    # -- channels ----------------------------------------------------------------------------------
    async def channel_subscribe(self, commit: base.Commit, *, channel: str, mode: str) -> base.StepResult:
        # No channel lock: publishes on a channel commit in seq order (they hold it), so the last
        # message this statement sees is a correct starting point.
        async def go(conn: Conn) -> base.StepResult:
            row = await conn.fetchrow(
                self._q["channel_subscribe"], *self._lease_columns(commit), channel, mode
            )
            if row is None:
                raise base.LeaseLost(commit.lease.instance_id)
            return base.StepResult(cancel_requested=row["cancel_requested"])

        return await self._run(go)

    async def channel_publish(
        self, message: base.NewMessage, *, commit: base.Commit | None = None
    ) -> base.PublishResult:
        return await self._tx(functools.partial(self._publish, message=message, commit=commit))

    async def _publish(
        self, conn: Conn, *, message: base.NewMessage, commit: base.Commit | None
    ) -> base.PublishResult:
        """The publish's two statements, in the caller's transaction: the channel's lock, then the write."""
        await conn.execute(self._q["channel_lock"], message.channel)
        row = await conn.fetchrow(
            self._q["channel_publish"],
            *rows.message_columns(message),
            self.notify,
            None if commit is None else commit.lease.instance_id,
            None if commit is None else commit.lease.lease_id,
            None if commit is None else commit.lock_expires_at,
            *self._columns(() if commit is None else commit.records),
        )
        if not row["target_ok"]:
            return base.PublishResult(stored=False, woken=[], target_missing=True)
        if commit is not None and row["cancel_requested"] is None:
            raise base.LeaseLost(commit.lease.instance_id)
        return base.PublishResult(
            stored=row["stored"], woken=list(row["woken"]), cancel_requested=bool(row["cancel_requested"])
        )

    async def channel_take_or_suspend(
        self, commit: base.Commit, wait: base.MessageWait
    ) -> base.StoredMessage | base.Suspension | None:
        lease, records, now = commit.lease, commit.records, commit.now
        instance_id = lease.instance_id

        async def go(conn: Conn) -> base.StoredMessage | base.Suspension | None:
            await conn.execute(self._q["channel_lock"], wait.channel)
            row = await conn.fetchrow(
                self._q["channel_find"], wait.channel, instance_id, wait.mode, now, lease.lease_id
            )
            if not row["ours"]:
                raise base.LeaseLost(instance_id)
            if row["mode"] is None:
                raise StorageError(f"no subscription of {instance_id} to channel {wait.channel!r}")
            if row["seq"] is None and decide.timed_out(wait.deadline, now):
                await conn.execute(self._q["channel_stop_waiting"], wait.channel, instance_id, lease.lease_id)
                return None
            if row["seq"] is None:
                timer = None if wait.deadline is None else (wait.outcome_seq, wait.deadline)
                outcome = await self._suspend(conn, commit, run_at=wait.deadline, timer=timer)
                if outcome is base.Suspension.SUSPENDED:
                    await conn.execute(self._q["channel_set_waiting"], wait.channel, instance_id, now)
                return outcome
            found = rows.stored_message(row)
            took = await conn.fetchrow(
                self._q["channel_take"],
                instance_id,
                lease.lease_id,
                commit.lock_expires_at,
                now,
                *self._columns([*records, decide.message_outcome(wait, found, now)]),
                wait.channel,
                found.seq,
                found.target_instance_id is not None,
                decide.claims_message(found, row["mode"]),
            )
            if not took["taken"]:
                if took["cancel_requested"] is None:
                    raise base.LeaseLost(instance_id)
                raise StorageError(f"message {found.message_id} was taken by another instance")
            return found

        return await self._tx(go)

    async def channel_rewake(self, now: float, *, published_before: float, limit: int) -> list[str]:
        async def go(conn: Conn) -> list[str]:
            # Its generic plan is costed on a guess of the subscribers per channel (a third of the
            # table): above jit_above_cost once the table is large, and JIT compilation then took 60 ms
            # of a round that reads a few rows. One more round trip, by one worker every 5 s.
            await conn.execute("SET LOCAL jit = off")
            return [
                r["instance_id"]
                for r in await conn.fetch(self._q["channel_rewake"], now, published_before, limit)
            ]

        return await self._tx(go)

    async def channel_cleanup(
        self,
        *,
        messages_before: float,
        events_before: float,
        limit: int,
        position: base.CleanupPosition = base.CLEANUP_START,
    ) -> base.Cleanup:
        async def go(conn: Conn) -> base.Cleanup:
            subs = await conn.fetchrow(
                self._q["channel_cleanup_subscriptions"], *position.subscription, limit
            )
            at, seq = position.message
            messages = await conn.fetchrow(
                self._q["channel_cleanup_messages"], messages_before, at, seq, limit
            )
            events = await conn.fetchrow(self._q["channel_cleanup_events"], events_before, limit)
            return decide.cleanup(
                limit,
                subs["deleted"],
                subs["examined"],
                (subs["last_channel"], subs["last_instance"]),
                messages["deleted"],
                messages["examined"],
                (messages["last_at"], messages["last_seq"]),
                events["events"],
                events["deleted"],
            )

        return await self._run(go)

    # -- the retention of finished instances (schema 29) ------------------------------------------
    async def prune_instances(
        self,
        before: float,
        *,
        limit: int,
        position: tuple[float, str] = base.PRUNE_START,
        apply: bool = True,
    ) -> base.Pruned:
        async def go(conn: Conn) -> base.Pruned:
            row = await conn.fetchrow(self._q["prune_instances"], before, *position, limit, apply)
            return decide.pruned(
                limit,
                row["examined"],
                row["free"],
                row["instances"],
                row["deleted"],
                (row["last_at"], row["last_id"]),
            )

        return await self._run(go)

    # -- chores ------------------------------------------------------------------------------------
    async def chore_take(
        self, chore: str, worker_id: str, now: float, *, interval: float, grace: float
    ) -> base.ChoreTurn:
        async def go(conn: Conn) -> base.ChoreTurn:
            row = await conn.fetchrow(self._q["chore_take"], chore, worker_id, now, interval, grace)
            return base.ChoreTurn(row["taken"], row["next_at"], row["holder"])

        return await self._run(go)

    async def chore_release(self, worker_id: str) -> None:
        async def go(conn: Conn) -> None:
            await conn.execute(self._q["chore_release"], worker_id)

        await self._run(go)

    # -- cron schedules (schema 19) ----------------------------------------------------------------
    async def schedule_upsert(self, row: base.ScheduleRow, now: float) -> None:
        async def go(conn: Conn) -> None:
            await conn.execute(
                self._q["schedule_upsert"],
                row.name,
                row.workflow_name,
                row.cron,
                row.timezone,
                row.missed,
                row.overlap,
                row.pass_tick,
                row.next_tick,
                now,
                row.queue,
                row.priority,
            )

        await self._run(go)

    async def schedules_due(self, now: float, *, limit: int) -> list[base.ScheduleRow]:
        async def go(conn: Conn) -> list[base.ScheduleRow]:
            return [rows.schedule_row(r) for r in await conn.fetch(self._q["schedules_due"], now, limit)]

        return await self._read(go)

    async def schedule_next_tick(self) -> float | None:
        async def go(conn: Conn) -> float | None:
            found = await conn.fetchval(self._q["schedule_next_tick"])
            return None if found is None else float(found)

        return await self._read(go)

    async def schedule_fire(
        self,
        name: str,
        *,
        expected: float,
        next_tick: float,
        starts: Sequence[base.ScheduleStart],
        overlap: str,
        now: float,
        queue_limit: int = QUEUE_LIMIT,
    ) -> base.Fired | None:
        async def go(conn: Conn) -> base.Fired | None:
            moved = await conn.fetchrow(self._q["schedule_advance"], name, next_tick, expected, now)
            if moved is None:
                return None
            last, waiting = moved["last_instance_id"], moved["waiting"]
            busy = False
            if overlap != "alongside" and last is not None and not (overlap == "queue" and waiting):
                busy = await conn.fetchval(self._q["schedule_last_unfinished"], last) is not None
            if busy and overlap == "skip":
                return base.Fired([])
            created: list[str] = []
            wait: list[float] = []
            for start in starts:
                if overlap == "queue" and (busy or waiting):
                    if waiting + len(wait) < queue_limit:
                        wait.append(start.tick)
                    continue
                if await self._insert_scheduled(conn, start.instance):
                    created.append(start.instance.instance_id)
                await conn.execute(self._q["schedule_started"], name, start.tick, start.instance.instance_id)
                busy = True
            if wait:
                await conn.fetchval(self._q["schedule_wait"], name, wait)
            return base.Fired(created, wait)

        return await self._tx(go)

    async def _insert_scheduled(self, conn: Conn, new: base.NewInstance) -> bool:
        """Insert a tick's instance, runnable or queued onto the schedule's queue; False: its id exists."""
        if new.queue is not None:
            inserted = await conn.fetchrow(
                self._q["insert_queued"],
                new.instance_id,
                new.workflow_name,
                new.input,
                new.now,
                new.deadline,
                new.queue,
                new.priority,
                None,
                self.notify,
                new.partition_key,
                new.version,
                new.pinned,
                new.trace_context,
            )
            return inserted is not None
        row = await conn.fetchrow(
            self._q["insert_instance"],
            new.instance_id,
            new.workflow_name,
            str(Status.PENDING),
            new.input,
            new.now,
            None,
            None,
            None,
            self.notify,
            new.deadline,
            new.version,
            new.pinned,
            new.trace_context,
        )
        return row is not None and bool(row["created"])

    async def schedules_waiting(self, *, limit: int) -> list[base.WaitingTick]:
        async def go(conn: Conn) -> list[base.WaitingTick]:
            found = await conn.fetch(self._q["schedules_waiting"], limit)
            return [
                base.WaitingTick(rows.schedule_row(r), float(r["first_tick"]), bool(r["ready"]))
                for r in found
                if r["first_tick"] is not None
            ]

        return await self._read(go)

    async def schedule_release(self, name: str, *, tick: float, start: base.NewInstance, now: float) -> bool:
        async def go(conn: Conn) -> bool:
            locked = await conn.fetchrow(self._q["schedule_lock"], name)
            if locked is None or locked["paused"]:
                return False
            last = locked["last_instance_id"]
            if last is not None and await conn.fetchval(self._q["schedule_last_unfinished"], last):
                return False
            if await conn.fetchval(self._q["schedule_unwait"], name, tick, start.instance_id, now) is None:
                return False
            await self._insert_scheduled(conn, start)
            return True

        return await self._tx(go)

    async def get_schedule(self, name: str) -> base.ScheduleRow | None:
        async def go(conn: Conn) -> base.ScheduleRow | None:
            row = await conn.fetchrow(self._q["get_schedule"], name)
            return None if row is None else rows.schedule_row(row)

        return await self._read(go)

    async def list_schedules(self, *, limit: int) -> list[base.ScheduleRow]:
        async def go(conn: Conn) -> list[base.ScheduleRow]:
            return [rows.schedule_row(r) for r in await conn.fetch(self._q["list_schedules"], limit)]

        return await self._read(go)

    async def schedule_pause(self, name: str, now: float) -> bool:
        async def go(conn: Conn) -> bool:
            return str(await conn.execute(self._q["schedule_pause"], name, now)) != "UPDATE 0"

        return await self._run(go)

    async def schedule_resume(self, name: str, next_tick: float, now: float) -> bool:
        async def go(conn: Conn) -> bool:
            return str(await conn.execute(self._q["schedule_resume"], name, next_tick, now)) != "UPDATE 0"

        return await self._run(go)

    async def schedule_delete(self, name: str) -> bool:
        async def go(conn: Conn) -> bool:
            return str(await conn.execute(self._q["schedule_delete"], name)) != "DELETE 0"

        return await self._run(go)

    # -- the web viewer ----------------------------------------------------------------------------
    async def page_instances(
        self,
        which: base.InstanceFilter,
        *,
        before: tuple[float, str] | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[base.InstanceSummary]:
        plan = decide.plan_page(which, before, after)

        async def go(conn: Conn) -> list[base.InstanceSummary]:
            return plan.page(
                await conn.fetch(
                    self._q[plan.query], *plan.key, plan.bound, limit, base.INPUT_HEAD, *plan.filters
                )
            )

        return await self._read(go)

    async def count_instances(self, which: base.InstanceFilter, *, cap: int) -> dict[Status, int]:
        lo, hi = decide.created_range(which)
        statuses = [str(status) for status in Status]

        async def go(conn: Conn) -> dict[Status, int]:
            if which.workflow_name is None:
                found = await conn.fetch(self._q["count_instances_all"], lo, hi, cap, statuses)
            else:
                name = which.workflow_name
                found = await conn.fetch(self._q["count_instances_workflow"], lo, hi, cap, statuses, name)
            return decide.counts_by_status(found)

        return await self._read(go)

    async def runnable_workflows(self, now: float, *, cap: int, limit: int) -> list[tuple[str, int]]:
        async def go(conn: Conn) -> list[tuple[str, int]]:
            return decide.runnable_by_name(await conn.fetch(self._q["runnable_workflows"], now, cap, limit))

        return await self._read(go)

    async def patches(self, *, limit: int) -> list[base.PatchRow]:
        async def go(conn: Conn) -> list[base.PatchRow]:
            return [base.PatchRow(*r) for r in await conn.fetch(self._q["patches"], limit)]

        return await self._read(go)

    async def workflow_names(self, *, limit: int) -> list[str]:
        async def go(conn: Conn) -> list[str]:
            return [r["name"] for r in await conn.fetch(self._q["workflow_names"], limit)]

        return await self._read(go)

    async def instance_extras(
        self, instance_id: str, *, event_ids: Sequence[str] = (), message_ids: Sequence[str] = ()
    ) -> base.InstanceExtras:
        async def go(conn: Conn) -> base.InstanceExtras:
            async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot
                timers = await conn.fetch(self._q["extras_timers"], instance_id)
                wait = await conn.fetchrow(self._q["extras_event_wait"], instance_id)
                subscriptions = await conn.fetch(self._q["extras_subscriptions"], instance_id)
                outbox = await conn.fetch(self._q["extras_outbox"], list(event_ids)) if event_ids else []
                messages = (
                    await conn.fetch(self._q["extras_messages"], list(message_ids)) if message_ids else []
                )
            return rows.instance_extras(timers, wait, subscriptions, outbox, messages)

        return await self._read(go)


def through_transaction_pooler(url: str) -> bool:
    """Whether ``url`` (a ``postgresql://`` URL) says it goes through a pooler in transaction mode
    (``pooler=transaction``), where LISTEN cannot work: each statement may run on another server session."""
    return parse_postgres_url(url)[1]["pooler"] == "transaction"


def listen_dsn(url: str) -> tuple[str, str]:
    """The connection string and the application name (``<application_name>-listener``) of the LISTEN
    connection for ``url`` (a ``postgresql://`` URL, geste's options checked)."""
    dsn, options = parse_postgres_url(url)
    return dsn, f"{options['application_name']}-listener"


async def read_histories(url: str, workflow: str | None, limit: int) -> list[StoredHistory]:
    """The replay check's read (``_read_only.read_histories``), on a connection of its own whose every
    transaction is read-only: PostgreSQL itself refuses any write. One repeatable-read snapshot (its
    transaction declared read-only too: behind a transaction pooler, the only guard)."""
    if asyncpg is None:  # pragma: no cover - the postgres extra is not installed
        raise ConfigurationError("reading PostgreSQL needs asyncpg: pip install 'geste[postgres]'")
    dsn, options = parse_postgres_url(url)
    Q = schema_queries(options["schema"])
    safe = read_only.without_password(url)
    try:
        settings = {"application_name": "geste-replay-check"}
        transaction_pooler = options["pooler"] == "transaction"
        if not transaction_pooler:  # a pooler refuses startup parameters it does not know (PgBouncer does)
            settings["default_transaction_read_only"] = "on"
        conn = await _hosts.connect(
            dsn,
            timeout=connect_timeout(options),
            server_settings=settings,
            statement_cache_size=0 if transaction_pooler else 100,
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise StorageError(f"cannot connect to {safe}: {exc}") from exc
    try:
        async with conn.transaction(readonly=True, isolation="repeatable_read"):
            tables = {row["name"] for row in await conn.fetch(Q["list_tables"], options["schema"])}
            read_only.check_tables(tables)
            read_only.check_version(await conn.fetchrow(Q["get_meta"], "schema_version"), SCHEMA_VERSION)
            by_status = [
                await conn.fetch(Q["replay_instances"], workflow, status.value, limit, 0)
                for status in (*read_only.UNFINISHED, *read_only.FINISHED)
            ]
            found = []
            for row in read_only.picked(by_status, limit):
                history = await conn.fetch(Q["get_history"], row["instance_id"])
                found.append(read_only.stored_history(row, history, safe))
            return found
    except asyncpg.PostgresError as exc:
        raise StorageError(f"cannot read {safe}: {exc}") from exc
    finally:
        await conn.close()


# -- writes in a user's transaction (docs/transactions.md) ------------------------------------------------
def _checked_connection(connection: object) -> Conn:
    """``connection`` if geste can write in its transaction, else ``TransactionUnusableError``: an
    asyncpg connection (a pool's proxy passes ``isinstance``), open, inside a transaction. Outside one
    each statement would commit on its own, and a start's instance would run whatever the caller's
    later statements do: geste refuses rather than commit anything of the caller's."""
    if asyncpg is None or not isinstance(connection, asyncpg.Connection):
        raise TransactionUnusableError(
            "connection= takes an asyncpg connection (or one acquired from an asyncpg pool), "
            f"not {type(connection).__name__}"
        )
    try:
        closed = connection.is_closed()
        in_transaction = connection.is_in_transaction()
    except asyncpg.InterfaceError as exc:  # a pool's proxy released back to its pool
        raise TransactionUnusableError(f"connection= cannot be used: {exc}") from exc
    if closed:
        raise TransactionUnusableError("connection= is closed")
    if not in_transaction:
        raise TransactionUnusableError(
            "connection= is not inside a transaction: open one (async with connection.transaction(): ...); "
            "geste writes in the caller's transaction and commits nothing itself"
        )
    return connection


async def _in_user_transaction(call: Awaitable[_T]) -> _T:
    """``call``'s value, a driver error raised as ``StorageError`` (as ``_conn`` does for the pool's
    connections, but the connection is the caller's: it is neither timed out nor dropped here)."""
    try:
        return await call
    except (base.LeaseLost, StorageError):
        raise
    except Exception as exc:
        if not _is_driver_error(exc):
            raise
        text = _driver_message(exc)
        if isinstance(exc, asyncpg.UndefinedTableError):
            text += " (is connection= on the App's database, and the App open, its schema migrated?)"
        if isinstance(exc, asyncpg.PostgresError):
            text += "; the caller's transaction is aborted: roll it back"
        raise StorageError(text) from exc


class UserTransaction(base.TransactionWrites):
    """``PostgresStorage``'s statements of a start, an event and a message run on a caller's connection,
    inside the caller's transaction: the same statements as on the pool (schema-qualified, so the
    connection's ``search_path`` does not matter), their ``pg_notify`` sent with the caller's commit.
    A start is never made claimed (no local run at once): a worker claims it once it committed."""

    def __init__(self, storage: PostgresStorage, connection: Conn) -> None:
        self._storage = storage
        self._conn = connection
        self._q = storage._q  # the storage's named queries (its schema filled in)

    async def create_instance(self, new: base.NewInstance) -> tuple[base.InstanceRow, bool]:
        storage, conn = self._storage, self._conn
        if new.queue is not None:
            return await _in_user_transaction(storage._insert_queued(conn, new=new))
        starts = decide.new_row(None, None, None)
        return await _in_user_transaction(storage._insert_instance(conn, new=new, starts=starts))

    async def get_instance(self, instance_id: str) -> base.InstanceRow | None:
        row = await _in_user_transaction(self._conn.fetchrow(self._q["get_instance"], instance_id))
        return None if row is None else rows.instance_row(row)

    async def send_event(self, event: base.NewEvent) -> tuple[bool, list[str]]:
        await self._read_committed("an event")
        return await _in_user_transaction(self._storage._send_event(self._conn, event=event))

    async def channel_publish(self, message: base.NewMessage) -> base.PublishResult:
        await self._read_committed("a message")
        return await _in_user_transaction(self._storage._publish(self._conn, message=message, commit=None))

    async def _read_committed(self, what: str) -> None:
        """An event or a message finds its receivers with the statement after its lock, which must see
        every wait committed before the lock was granted: a snapshot taken at the transaction's start
        (repeatable read, serializable) would miss a wait registered meanwhile, a wake-up lost."""
        level = await _in_user_transaction(self._conn.fetchval(self._q["transaction_isolation"]))
        if level != "read committed":
            raise TransactionUnusableError(
                f"{what} is written only in a read committed transaction, not {level}: a snapshot older "
                "than its lock could miss a workflow that began waiting meanwhile"
            )
