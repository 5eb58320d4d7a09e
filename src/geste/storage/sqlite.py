"""The SQLite backend: one file in WAL mode, one connection driven from one thread.

Each operation is one transaction run whole in that thread (one hop from the event loop). Writes start
with ``BEGIN IMMEDIATE``, so the write lock is taken before anything is read and claims can never race
between processes sharing the file; ``busy_timeout`` makes a second process wait its turn.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, quote

from .._matching import event_keys, wait_key
from .._models import Status
from .._schedules import QUEUE_LIMIT
from .._status import QueueStats
from ..errors import ConfigurationError, NotAGesteDatabaseError, StorageError
from . import _decisions as decide
from . import _migrations, base
from . import _read_only as read_only
from . import _rows as rows
from ._read_only import StoredHistory
from ._sql import load_queries

Q = load_queries("sqlite")
MIGRATIONS = _migrations.load("sqlite")
SCHEMA_VERSION = MIGRATIONS[-1].version
PRUNE_DELETES = (
    "prune_delete_history",
    "prune_delete_runs",
    "prune_delete_run_history",
    "prune_delete_timers",
    "prune_delete_event_waits",
    "prune_delete_event_deliveries",
    "prune_delete_channel_subscriptions",
    "prune_delete_outbox",
    "prune_delete_retries",
    "prune_delete_state",
    "prune_delete_streams",
    "prune_delete_stream_heads",
)
"""The rows of the instances a retention batch deletes, table by table (``prune_instances``)."""
_T = TypeVar("_T")
_FOREIGN_TABLES = "the database holds tables that are not geste's ({}); point geste at its own file"
_SYNCHRONOUS = {"off", "normal", "full", "extra"}


def explain(exc: sqlite3.Error) -> str:
    """sqlite3's message, with what it means for geste where the raw text says little: a failed write
    (``SQLITE_FULL``, ``SQLITE_IOERR_*``: a full disk gives either, an ``RLIMIT_FSIZE`` gives
    ``SQLITE_IOERR_WRITE``) and a lock held past ``busy_timeout``."""
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    if name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR"):
        return (
            f"{exc} ({name}: the disk is full or a file-size limit was reached, or the device failed); "
            "the transaction was rolled back and nothing of it was written; the workers retry by "
            "themselves once space returns"
        )
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return (
            f"{exc} ({name}: another connection held the database's write lock longer than busy_timeout; "
            "nothing was written)"
        )
    return f"{exc} ({name})" if name else str(exc)


def parse_sqlite_url(url: str) -> tuple[str, dict[str, str]]:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db`` or ``sqlite:///:memory:`` → path, options."""
    if not url.startswith("sqlite://"):
        raise ConfigurationError(f"not a SQLite URL: {url!r}")
    rest = url[len("sqlite://") :]
    rest, _, query = rest.partition("?")
    if rest.startswith("/"):
        rest = rest[1:]
    if not rest:
        raise ConfigurationError(f"SQLite URL without a file name: {url!r}")
    options = dict(parse_qsl(query))
    unknown = set(options) - {"synchronous", "busy_timeout"}
    if unknown:
        raise ConfigurationError(f"unknown SQLite URL options: {sorted(unknown)}")
    if options.get("synchronous", "normal").lower() not in _SYNCHRONOUS:
        raise ConfigurationError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}")
    return rest, options


def _child_state(row: sqlite3.Row | None) -> base.ChildState | None:
    if row is None:
        return None
    return base.ChildState(
        row["workflow_name"], Status.stored(row["status"]), row["result"], row["error"], row["parent_id"]
    )


class SQLiteStorage(base.Storage):
    def __init__(self, url: str) -> None:
        self.url = url
        self.path, options = parse_sqlite_url(url)
        self._synchronous = options.get("synchronous", "normal").upper()
        self._busy_timeout_ms = int(options.get("busy_timeout", "30000"))
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- plumbing ----------------------------------------------------------------------------------
    async def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._executor is None or self._conn is None:
            raise StorageError("the SQLite storage is not open")
        conn = self._conn

        def run() -> _T:
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.rollback()
                raise StorageError(f"SQLite error on {self.path}: {explain(exc)}") from exc
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``."""

        def tx(conn: sqlite3.Connection) -> _T:
            conn.execute("BEGIN IMMEDIATE")
            result = fn(conn)
            conn.execute("COMMIT")
            return result

        return await self._call(tx)

    # -- life cycle --------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._conn is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geste-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(self._executor, self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _connect(self) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(self.path))
        if self.path != ":memory:" and not os.path.isdir(directory):
            raise StorageError(f"cannot create {self.path}: directory {directory} does not exist")
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row  # rows read by column name (_rows)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open SQLite database {self.path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            self._read_version(conn)  # refuse a foreign file before WAL mode rewrites its header
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()["journal_mode"]
            if self.path != ":memory:" and str(mode).lower() != "wal":
                raise StorageError(f"cannot put {self.path} in WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise NotAGesteDatabaseError(f"{self.path} is not a geste database: {exc}") from exc
            raise StorageError(f"cannot open SQLite database {self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for write in _migrations.migrate(self._read_version(conn), MIGRATIONS, self._announce):
                if isinstance(write, _migrations.Migration):
                    for statement in _statements(write.script):
                        conn.execute(statement)
                    if write.name.endswith(decide.EVENT_KEYS_MIGRATION):  # its part in Python
                        keyed = decide.keyed_waits(conn.execute(Q["unkeyed_waits"]).fetchall())
                        conn.executemany(Q["key_wait"], [(i, key.key) for i, key in keyed])
                else:
                    conn.execute(Q["set_meta"], write)
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise

    @staticmethod
    def _read_version(conn: sqlite3.Connection) -> int:
        tables = {row["name"] for row in conn.execute(Q["list_tables"])}
        if _migrations.is_new(tables, _FOREIGN_TABLES.format):
            return 0
        app = conn.execute(Q["get_meta"], ("application",)).fetchone()
        version = conn.execute(Q["get_meta"], ("schema_version",)).fetchone()
        return _migrations.meta_version(app and app["value"], version and version["value"])

    async def close(self) -> None:
        conn, executor = self._conn, self._executor
        self._conn = self._executor = None
        if conn is not None and executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        if executor is not None:
            executor.shutdown(wait=True)

    def terminate(self) -> None:
        conn, executor = self._conn, self._executor
        self._conn = self._executor = None
        if conn is not None and executor is not None:
            executor.submit(conn.close)  # after what the thread is running now: it owns the connection
        if executor is not None:
            executor.shutdown(wait=False)

    async def schema_version(self) -> int:
        return await self._call(self._read_version)

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
            return await self._create_queued(new)
        starts = decide.new_row(lease, worker_id, lock_expires_at)
        params = {
            "instance_id": new.instance_id,
            "workflow_name": new.workflow_name,
            "status": starts.status,
            "input": new.input,
            "now": new.now,
            "locked_by": starts.locked_by,
            "lease_id": starts.lease_id,
            "lock_expires_at": starts.lock_expires_at,
            "deadline": new.deadline,
            "version": new.version,
            "pinned": new.pinned,
            "trace_context": new.trace_context,
        }

        def tx(conn: sqlite3.Connection) -> tuple[base.InstanceRow, bool]:
            created = conn.execute(Q["insert_instance"], params).rowcount == 1
            row = conn.execute(Q["get_instance"], (new.instance_id,)).fetchone()
            return rows.instance_row(row), created

        return await self._write(tx)

    async def _create_queued(self, new: base.NewInstance) -> tuple[base.InstanceRow, bool]:
        """A start onto a queue (schema 20): inserted queued, or, when its id or its dedup id is taken by
        an unfinished instance, that instance (not created). One transaction: nothing ends in between."""
        params = {
            "instance_id": new.instance_id,
            "workflow_name": new.workflow_name,
            "input": new.input,
            "now": new.now,
            "deadline": new.deadline,
            "queue": new.queue,
            "priority": new.priority,
            "dedup_id": new.dedup_id,
            "partition_key": new.partition_key,
            "version": new.version,
            "pinned": new.pinned,
            "trace_context": new.trace_context,
        }

        def tx(conn: sqlite3.Connection) -> tuple[base.InstanceRow, bool]:
            created = conn.execute(Q["insert_queued"], params).rowcount == 1
            row = conn.execute(Q["get_instance"], (new.instance_id,)).fetchone()
            if row is None:  # not inserted, and not its id: its dedup id, held by an unfinished instance
                holder = conn.execute(Q["find_dedup"], params).fetchone()
                row = conn.execute(Q["get_instance"], (holder["instance_id"],)).fetchone()
            return rows.instance_row(row), created

        return await self._write(tx)

    async def database_clock(self) -> float | None:
        return float(await self._call(lambda conn: conn.execute(Q["database_clock"]).fetchone()["now"]))

    async def get_instance(self, instance_id: str) -> base.InstanceRow | None:
        def read(conn: sqlite3.Connection) -> base.InstanceRow | None:
            return rows.maybe_instance(conn.execute(Q["get_instance"], (instance_id,)).fetchone())

        return await self._call(read)

    # -- streams (schema 26) -------------------------------------------------------------------------
    async def stream_write(self, writes: Sequence[base.StreamWrite], now: float) -> list[tuple[str, str]]:
        if not writes:
            return []

        def tx(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            heads: dict[tuple[str, str], list[int]] = {}  # stream -> [next position, closed]
            for write in writes:
                stream = (write.instance_id, write.key)
                head = heads.get(stream)
                if head is None:
                    row = conn.execute(Q["stream_head"], stream).fetchone()
                    head = heads[stream] = [0, 0] if row is None else [row[0], row[1]]
                if head[1]:
                    continue  # closed: dropped
                cursor = conn.execute(Q["stream_insert"], (*stream, head[0], write.writer, write.item, now))
                if cursor.rowcount:
                    head[0] += 1
                    head[1] = int(write.item is None)
            conn.executemany(Q["stream_set_head"], [(*k, v[0], v[1]) for k, v in heads.items()])
            return []

        return await self._write(tx)

    async def stream_read(
        self, instance_id: str, key: str, start: int, limit: int
    ) -> list[tuple[int, str | None]]:
        def read(conn: sqlite3.Connection) -> list[tuple[int, str | None]]:
            found = conn.execute(Q["stream_read"], (instance_id, key, start, limit)).fetchall()
            return [(int(r[0]), r[1]) for r in found]

        return await self._call(read)

    async def stream_instance_status(self, instance_id: str) -> Status | None:
        def read(conn: sqlite3.Connection) -> Status | None:
            row = conn.execute(Q["stream_instance_status"], (instance_id,)).fetchone()
            return None if row is None else Status.stored(row[0])

        return await self._call(read)

    async def stream_list(self, instance_id: str, *, limit: int = 100) -> list[base.StreamHead]:
        def read(conn: sqlite3.Connection) -> list[base.StreamHead]:
            found = conn.execute(Q["stream_list"], (instance_id, limit)).fetchall()
            return [base.StreamHead(r[0], int(r[1]), bool(r[2])) for r in found]

        return await self._call(read)

    async def list_instances(
        self,
        *,
        workflow_name: str | None = None,
        status: Status | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[base.InstanceRow]:
        params = {
            "workflow_name": workflow_name,
            "status": None if status is None else str(status),
            "limit": limit,
            "offset": offset,
        }
        return await self._call(
            lambda c: [rows.instance_row(r) for r in c.execute(Q["list_instances"], params)]
        )

    @staticmethod
    def _history(conn: sqlite3.Connection, instance_id: str, after: int = 0) -> tuple[base.HistoryRow, ...]:
        # plain tuples, not sqlite3.Row read by name: a replay of 6,000 rows reads them 3x sooner
        cursor = conn.cursor()
        cursor.row_factory = None
        found = cursor.execute(Q["get_history"], (instance_id, after)).fetchall()
        row = base.HistoryRow
        return tuple(row(seq, kind, name, body, bool(err), at) for seq, kind, name, body, err, at in found)

    async def get_history(self, instance_id: str) -> list[base.HistoryRow]:
        return await self._call(lambda conn: list(self._history(conn, instance_id)))

    async def request_cancel(self, instance_id: str, now: float) -> base.InstanceRow | None:
        params = {"instance_id": instance_id, "now": now}

        woke: list[bool] = []

        def tx(conn: sqlite3.Connection) -> base.InstanceRow | None:
            if conn.execute(Q["cancel_unstarted"], params).rowcount == 0:
                conn.execute(Q["flag_cancel"], params)
            else:  # a child that never ran: its waiting parent is woken (16)
                woke.append(conn.execute(Q["wake_parent"], params).rowcount > 0)
            return rows.maybe_instance(conn.execute(Q["get_instance"], (instance_id,)).fetchone())

        found = await self._write(tx)
        if any(woke):
            self._made_runnable()
        return found

    # -- operator actions --------------------------------------------------------------------------
    async def retry_instance(self, instance_id: str, now: float) -> base.RetryOutcome:
        def tx(conn: sqlite3.Connection) -> base.RetryOutcome:
            row = rows.maybe_instance(conn.execute(Q["get_instance"], (instance_id,)).fetchone())
            if row is None:
                return base.RetryOutcome(None)
            if row.status != Status.FAILED:
                return decide.retry_refused(row, conn.execute(Q["last_retry"], (instance_id,)).fetchone())
            history = self._history(conn, instance_id)
            from_seq = decide.retry_from(row, history)
            if isinstance(from_seq, base.RetryOutcome):
                return from_seq
            removed = decide.retry_removed(history, from_seq)
            params = {"instance_id": instance_id, "now": now, "from_seq": from_seq}
            retry = conn.execute(Q["retry_archive"], {**params, "removed": rows.history_arrays_json(removed)})
            number = retry.fetchone()["retry"]
            conn.executemany(Q["retry_delete_row"], [(instance_id, r.seq) for r in removed])
            conn.execute(Q["retry_reopen"], {**params, "removed": len(removed)})
            after = rows.instance_row(conn.execute(Q["get_instance"], (instance_id,)).fetchone())
            return decide.retried(row, after, number, now, from_seq, removed)

        return await self._write(tx)

    async def list_retries(self, instance_id: str) -> list[base.RetryRow]:
        return await self._call(
            lambda conn: [rows.retry_row(r) for r in conn.execute(Q["list_retries"], (instance_id,))]
        )

    async def list_runs(self, instance_id: str) -> list[base.RunRow]:
        return await self._call(
            lambda conn: [rows.run_row(r) for r in conn.execute(Q["list_runs"], (instance_id,))]
        )

    async def get_run_history(self, instance_id: str, run: int) -> list[base.HistoryRow]:
        return await self._call(
            lambda conn: [rows.history_row(r) for r in conn.execute(Q["get_run_history"], (instance_id, run))]
        )

    async def resume_instance(
        self, instance_id: str, now: float, *, lock_timeout: float, force: bool
    ) -> base.ResumeOutcome:
        def tx(conn: sqlite3.Connection) -> base.ResumeOutcome:
            found = conn.execute(Q["get_instance"], (instance_id,)).fetchone()
            before = decide.resumable(rows.maybe_instance(found))
            if isinstance(before, base.ResumeOutcome):
                return before
            held = decide.lease_held(before, now)
            holder = conn.execute(Q["worker_liveness"], (before.locked_by,)).fetchone() if held else None
            alive = rows.worker_alive(holder, now=now, lock_timeout=lock_timeout)
            if alive and not force:
                return base.ResumeOutcome(before, holder_alive=True)
            conn.execute(Q["resume"], {"instance_id": instance_id, "now": now, "break": held})
            after = rows.instance_row(conn.execute(Q["get_instance"], (instance_id,)).fetchone())
            return base.ResumeOutcome(before, after, holder_alive=alive, lease_broken=held)

        return await self._write(tx)

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
        names = sorted(set(workflows))
        if not names:
            return base.Claims()
        params = {
            "due": now if due_before is None else due_before,
            "worker_id": worker_id,
            "lease_prefix": f"{uuid.uuid4().hex[:12]}/",
            "lock_expires_at": lock_expires_at,
            "now": now,
            "limit": limit,
        }

        after = known or {}

        def tx(conn: sqlite3.Connection) -> base.Claims:
            # per name, the leases that ran out and the free instances due: the earliest `limit` of all
            heads = [r for name in names for r in conn.execute(Q["claim_pick"], {**params, "name": name})]
            picked = {r["instance_id"]: r for r in heapq.nsmallest(limit, heads, key=lambda r: r["run_at"])}
            ids = json.dumps(list(picked))
            taken = conn.execute(Q["claim_picked"], {**params, "ids": ids}).fetchall() if picked else []
            claims = [  # each with its history, read in the same hop to the SQLite thread; with the run_at
                # it had (the claim made it the lease's expiry) and, taken over, when the lease ran out
                rows.claim(
                    {**dict(r), "run_at": picked[r["instance_id"]]["run_at"]},
                    self._history(conn, r["instance_id"], after.get(r["instance_id"], 0)),
                    picked[r["instance_id"]]["expired_at"],
                    after.get(r["instance_id"], 0),
                )
                for r in taken
            ]
            claims.sort(key=lambda c: c.run_at or 0.0)
            later = None
            if len(claims) < limit:
                found = [
                    conn.execute(Q["next_run_after"], {**params, "name": n}).fetchone()["run_at"]
                    for n in names
                ]
                later = min((t for t in found if t is not None), default=None)
            return base.Claims(claims, later)

        return await self._write(tx)

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
        params = {
            "due": now if due_before is None else due_before,
            "worker_id": worker_id,
            "lease_prefix": f"{uuid.uuid4().hex[:12]}/",
            "lock_expires_at": lock_expires_at,
            "now": now,
            "limit": len(ids),
            "ids": json.dumps(ids),
            "names": json.dumps(names),
        }

        after = known or {}

        def tx(conn: sqlite3.Connection) -> base.Claims:
            picked = {r["instance_id"]: r for r in conn.execute(Q["claim_ids_pick"], params)}
            chosen = {**params, "ids": json.dumps(list(picked))}
            taken = conn.execute(Q["claim_picked"], chosen).fetchall() if picked else []
            claims = [  # with the run_at it had (claim_picked made it the lease's expiry), as `claim` does
                rows.claim(
                    {**dict(r), "run_at": picked[r["instance_id"]]["run_at"]},
                    self._history(conn, r["instance_id"], after.get(r["instance_id"], 0)),
                    picked[r["instance_id"]]["expired_at"],
                    after.get(r["instance_id"], 0),
                )
                for r in taken
            ]
            claims.sort(key=lambda c: c.run_at or 0.0)
            later = {r["instance_id"]: r["run_at"] for r in conn.execute(Q["claim_ids_later"], params)}
            return base.Claims(claims, later=later)

        return await self._write(tx)

    async def queue_upsert(self, queue: base.QueueRow, now: float) -> None:
        params = {
            "name": queue.name,
            "concurrency": queue.concurrency,
            "worker_concurrency": queue.worker_concurrency,
            "rate_limit": queue.rate_limit,
            "rate_period": queue.rate_period,
            "partition_concurrency": queue.partition_concurrency,
            "partition_rate_limit": queue.partition_rate_limit,
            "now": now,
        }
        await self._write(lambda conn: conn.execute(Q["queue_upsert"], params))

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
        params = {
            "queues": json.dumps(sorted(set(queues))),
            "names": json.dumps(sorted(set(workflows))),
            "now": now,
            "due": now if due_before is None else due_before,
            "limit": limit,
        }

        def read(conn: sqlite3.Connection) -> tuple[list[str], float | None]:
            found = conn.execute(Q["queue_runnable"], params).fetchall()
            ids = [r["instance_id"] for r in found if r["instance_id"] is not None]
            return ids, next((r["run_at"] for r in found if r["instance_id"] is None), None)

        return await self._call(read)

    async def queue_claim(
        self, worker_id: str, now: float, lock_expires_at: float, limit: int, *, queue: str
    ) -> base.Claims:
        if limit <= 0:
            return base.Claims()
        params: dict[str, Any] = {
            "queue": queue,
            "worker_id": worker_id,
            "lease_prefix": f"{uuid.uuid4().hex[:12]}/",
            "lock_expires_at": lock_expires_at,
            "now": now,
        }

        def tx(conn: sqlite3.Connection) -> base.Claims:
            # one writer (BEGIN IMMEDIATE): the count read here holds until the take below commits
            if conn.execute(Q["queue_waiting"], params).fetchone() is None:
                return base.Claims()
            row = conn.execute(Q["queue_limit"], params).fetchone()
            n = limit
            if row is not None and row["concurrency"] is not None:
                busy = conn.execute(Q["queue_busy"], {**params, "limit": row["concurrency"]}).fetchone()
                n = min(n, row["concurrency"] - busy["busy"])
            rate = None if row is None else row["rate_limit"]
            starts: list[float] = []
            if rate is not None:  # the admission times of the last window: rate_limit at most
                starts = sorted(t for t in json.loads(row["starts"]) if t > now - row["rate_period"])
                if len(starts) >= rate:
                    return base.Claims(next_run_at=starts[len(starts) - rate] + row["rate_period"])
                n = min(n, rate - len(starts))
            if n <= 0:
                return base.Claims()
            wait = None
            if row is not None and (row["partition_concurrency"] or row["partition_rate_limit"]):
                taken, wait = self._partition_take(conn, params, row, n)
            else:
                taken = conn.execute(Q["queue_take"], {**params, "n": n}).fetchall()
            claims = base.Claims([rows.claim(r, (), None) for r in taken])
            if wait is not None and len(taken) < n:  # a partition's window was full: when it has room
                claims.next_run_at = wait
            if rate is not None and taken:
                starts += [now] * len(taken)
                conn.execute(Q["queue_started"], {"queue": queue, "starts": json.dumps(starts)})
                if len(starts) >= rate:
                    moment = starts[len(starts) - rate] + row["rate_period"]
                    claims.next_run_at = min(moment, claims.next_run_at or moment)
            return claims

        return await self._write(tx)

    @staticmethod
    def _partition_take(
        conn: sqlite3.Connection, params: dict[str, Any], row: sqlite3.Row, n: int
    ) -> tuple[list[sqlite3.Row], float | None]:
        """A partitioned queue's take (schema 22), as ``geste_queue_claim`` does it on PostgreSQL: the
        partitions holding queued work in the order of their heads, each one's room (its limit minus its
        slots in use, its rate minus its window), until as many have room as the claim may admit; then
        turns, one instance of each per turn. Returns the admitted rows and, if a partition's window was
        full, when the first such has room again."""
        queue, now = params["queue"], params["now"]
        limit, rate, period = row["partition_concurrency"], row["partition_rate_limit"], row["rate_period"]
        rooms: dict[str, int] = {}
        windows: dict[str, list[float]] = {}
        waits: list[float] = []
        for part in conn.execute(Q["queue_partitions"], params).fetchall():
            if len(rooms) >= n:
                break
            key, room = part["partition_key"], n
            if limit is not None:
                busy = conn.execute(Q["queue_partition_busy"], {"queue": queue, "key": key, "limit": limit})
                room = min(room, limit - busy.fetchone()["busy"])
            if rate is not None:
                found = conn.execute(Q["queue_partition_window"], {"queue": queue, "key": key}).fetchone()
                window = sorted(t for t in json.loads(found["starts"] if found else "[]") if t > now - period)
                if len(window) >= rate:
                    waits.append(window[len(window) - rate] + period)
                windows[key] = window
                room = min(room, rate - len(window))
            if room > 0:
                rooms[key] = room
        picked: dict[str, str] = {}  # instance id: its partition, in the order picked
        last = {key: (-(2**31), float("-inf"), "") for key in rooms}
        while rooms and len(picked) < n:
            for key in list(rooms):
                if len(picked) >= n:
                    break
                priority, queued_at, instance_id = last[key]
                nxt = conn.execute(
                    Q["queue_partition_next"],
                    {
                        "queue": queue,
                        "key": key,
                        "priority": priority,
                        "queued_at": queued_at,
                        "instance_id": instance_id,
                    },
                ).fetchone()
                if nxt is None:
                    del rooms[key]
                    continue
                picked[nxt["instance_id"]] = key
                last[key] = (nxt["priority"], nxt["queued_at"], nxt["instance_id"])
                rooms[key] -= 1
                if rooms[key] <= 0:
                    del rooms[key]
        if not picked:
            return [], min(waits, default=None)
        taken = conn.execute(Q["queue_take_ids"], {**params, "ids": json.dumps(list(picked))}).fetchall()
        if rate is not None:  # each partition's window: its admissions now
            admitted: dict[str, int] = {}
            for r in taken:
                key = picked[r["instance_id"]]
                admitted[key] = admitted.get(key, 0) + 1
            for key, count in admitted.items():
                window = windows[key] + [now] * count
                started = {"queue": queue, "key": key, "starts": json.dumps(window)}
                conn.execute(Q["queue_partition_started"], started)
                if len(window) >= rate:
                    waits.append(window[len(window) - rate] + period)
        return taken, min(waits, default=None)

    async def renew(
        self,
        leases: Sequence[base.Lease],
        lock_expires_at: float,
        *,
        now: float | None = None,
        heartbeats: Mapping[str, str] | None = None,
    ) -> base.Renewed:
        params = {
            "lock_expires_at": lock_expires_at,
            "threshold": decide.takeover_threshold(lock_expires_at, now),
        }
        details = heartbeats or {}

        def tx(conn: sqlite3.Connection) -> base.Renewed:
            kept, cancelled = [], []
            for lease in leases:
                found = conn.execute(
                    Q["renew"],
                    {
                        **params,
                        "instance_id": lease.instance_id,
                        "lease_id": lease.lease_id,
                        "heartbeats": details.get(lease.instance_id),
                    },
                ).fetchone()
                if found is not None:
                    kept.append(lease.instance_id)
                    if found["cancel_requested"]:
                        cancelled.append(lease.instance_id)
            return base.Renewed(kept, cancelled)

        return await self._write(tx)

    async def heartbeat_details(self, instance_id: str) -> str | None:
        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(Q["heartbeats"], (instance_id,)).fetchone()
            return None if row is None else cast(str | None, row["heartbeats"])

        return await self._call(read)

    async def trace_context(self, instance_id: str) -> str | None:
        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(Q["trace_context"], (instance_id,)).fetchone()
            return None if row is None else cast(str | None, row["trace_context"])

        return await self._call(read)

    async def release(self, leases: Sequence[base.Lease], now: float, *, run_at: float | None = None) -> None:
        when = now if run_at is None else run_at

        def tx(conn: sqlite3.Connection) -> None:
            conn.executemany(Q["release"], [(when, now, x.instance_id, x.lease_id) for x in leases])

        await self._write(tx)

    # -- steps under a lease -----------------------------------------------------------------------
    @staticmethod
    def _insert_history(
        conn: sqlite3.Connection, instance_id: str, records: Sequence[base.HistoryRow]
    ) -> None:
        if records:
            conn.executemany(
                Q["insert_history"],
                [
                    (instance_id, r.seq, r.kind, r.name, r.payload, int(r.is_error), r.created_at)
                    for r in records
                ],
            )

    @staticmethod
    def _touch(
        conn: sqlite3.Connection, commit: base.Commit, *, steps: int, status: Status | None = None
    ) -> bool:
        """Renew the commit's lease (raising ``LeaseLost`` if it is gone), counting ``steps`` more steps;
        return whether cancel is requested."""
        row = conn.execute(
            Q["touch_lease"],
            {
                "instance_id": commit.lease.instance_id,
                "lease_id": commit.lease.lease_id,
                "lock_expires_at": commit.lock_expires_at,
                "now": commit.now,
                "steps": steps,
                "status": None if status is None else str(status),
            },
        ).fetchone()
        if row is None:
            raise base.LeaseLost(commit.lease.instance_id)
        return bool(row["cancel_requested"])

    @classmethod
    def _append(cls, conn: sqlite3.Connection, commit: base.Commit, *, status: Status | None = None) -> bool:
        """Renew the commit's lease and append its rows (``_touch``); return whether cancel is requested."""
        cancel = cls._touch(conn, commit, steps=len(commit.records), status=status)
        cls._insert_history(conn, commit.lease.instance_id, commit.records)
        return cancel

    async def record(self, commit: base.Commit, *, status: Status | None = None) -> base.StepResult:
        def tx(conn: sqlite3.Connection) -> base.StepResult:
            return base.StepResult(cancel_requested=self._append(conn, commit, status=status))

        return await self._write(tx)

    def _suspend_tx(
        self,
        conn: sqlite3.Connection,
        commit: base.Commit,
        *,
        run_at: float | None,
        awaits: str | None = None,
    ) -> base.Suspension:
        lease, records = commit.lease, commit.records
        params = {
            "instance_id": lease.instance_id,
            "lease_id": lease.lease_id,
            "run_at": run_at,
            "now": commit.now,
            "steps": len(records),
            "awaits": awaits,
        }
        if conn.execute(Q["suspend"], params).rowcount == 0:
            state = conn.execute(Q["lease_state"], params).fetchone()
            if state is None or not state["ours"]:
                raise base.LeaseLost(lease.instance_id)
            return base.Suspension.CANCEL_REQUESTED
        self._insert_history(conn, lease.instance_id, records)
        conn.execute(Q["clear_timers"], (lease.instance_id,))
        conn.execute(Q["clear_event_wait"], (lease.instance_id,))
        return base.Suspension.SUSPENDED

    async def suspend(
        self, commit: base.Commit, *, run_at: float | None, timer: tuple[int, float] | None = None
    ) -> base.Suspension:
        def tx(conn: sqlite3.Connection) -> base.Suspension:
            outcome = self._suspend_tx(conn, commit, run_at=run_at)
            if outcome is base.Suspension.SUSPENDED and timer is not None:
                conn.execute(Q["insert_timer"], (commit.lease.instance_id, timer[0], timer[1]))
            return outcome

        return await self._write(tx)

    async def continue_as_new(self, commit: base.Commit, *, input: str, last_seq: int) -> base.Suspension:
        lease, records = commit.lease, commit.records
        params = {
            "instance_id": lease.instance_id,
            "lease_id": lease.lease_id,
            "input": input,
            "now": commit.now,
            "added": len(records),
            "last_seq": last_seq,
        }

        def tx(conn: sqlite3.Connection) -> base.Suspension:
            state = conn.execute(Q["lease_state"], params).fetchone()
            if state is None or not state["ours"]:
                raise base.LeaseLost(lease.instance_id)
            if state["cancel_requested"]:
                return base.Suspension.CANCEL_REQUESTED
            conn.execute(Q["continue_archive_run"], params)
            self._insert_history(conn, lease.instance_id, records)
            conn.execute(Q["continue_archive_history"], params)
            conn.execute(Q["continue_clear_history"], params)
            conn.execute(Q["continue_reopen"], params)
            conn.execute(Q["clear_timers"], (lease.instance_id,))
            conn.execute(Q["clear_event_wait"], (lease.instance_id,))
            conn.execute(Q["continue_stop_listening"], params)
            conn.execute(Q["continue_outbox"], params)
            return base.Suspension.SUSPENDED

        return await self._write(tx)

    async def take_event_or_suspend(
        self, commit: base.Commit, wait: base.EventWait
    ) -> base.StoredEvent | base.Suspension | None:
        lease, records, now = commit.lease, commit.records, commit.now

        key = wait_key(wait.event_type, wait.match)

        def tx(conn: sqlite3.Connection) -> base.StoredEvent | base.Suspension | None:
            params = {"event_type": wait.event_type, "instance_id": lease.instance_id, "match_key": key.key}
            query = "candidate_events" if key.indexed is None else "candidate_events_by_key"
            found = decide.first_match(wait, conn.execute(Q[query], params))
            if found is None and decide.timed_out(wait.deadline, now):
                return None
            if found is None:
                outcome = self._suspend_tx(conn, commit, run_at=wait.deadline)
                if outcome is base.Suspension.SUSPENDED:
                    conn.execute(
                        Q["insert_event_wait"], rows.event_wait_columns(lease.instance_id, wait, now, key.key)
                    )
                    if wait.deadline is not None:
                        conn.execute(Q["insert_timer"], (lease.instance_id, wait.outcome_seq, wait.deadline))
                return outcome
            taken = decide.event_outcome(wait.outcome_seq, found, now)
            self._touch(conn, commit, steps=len(records) + 1)
            self._insert_history(conn, lease.instance_id, [*records, taken])
            conn.execute(Q["insert_delivery"], (lease.instance_id, found.seq))
            return found

        return await self._write(tx)

    async def finish(
        self,
        commit: base.Commit,
        *,
        status: Status,
        result: str | None = None,
        error: str | None = None,
        cancel_children: Sequence[str] = (),
    ) -> None:
        lease, records = commit.lease, commit.records
        params = {
            "instance_id": lease.instance_id,
            "lease_id": lease.lease_id,
            "status": str(status),
            "result": result,
            "error": error,
            "now": commit.now,
            "steps": len(records),
        }

        def tx(conn: sqlite3.Connection) -> bool:
            if conn.execute(Q["finish"], params).rowcount == 0:
                raise base.LeaseLost(lease.instance_id)
            self._insert_history(conn, lease.instance_id, records)
            conn.execute(Q["clear_timers"], (lease.instance_id,))
            conn.execute(Q["clear_event_wait"], (lease.instance_id,))
            woken = conn.execute(Q["wake_parent"], params).rowcount > 0  # a child's end (16)
            if cancel_children:  # the parent-close policies (16), in the end's transaction
                closing = {**params, "children": json.dumps(list(cancel_children))}
                woken = conn.execute(Q["cancel_children"], closing).rowcount > 0 or woken
            return woken

        if await self._write(tx):
            self._made_runnable()

    # -- child workflows (schema 16) ------------------------------------------------------------------
    async def start_child(
        self, commit: base.Commit, child: base.NewInstance, *, parent_close: str
    ) -> base.ChildState | base.DedupHeld | base.StepResult:
        params = {
            "instance_id": child.instance_id,
            "workflow_name": child.workflow_name,
            "input": child.input,
            "now": child.now,
            "parent_id": commit.lease.instance_id,
            "parent_close": parent_close,
            "deadline": child.deadline,
            "queue": child.queue,
            "priority": child.priority,
            "dedup_id": child.dedup_id,
            "partition_key": child.partition_key,
            "version": child.version,
            "pinned": child.pinned,
            "trace_context": child.trace_context,
        }

        def tx(conn: sqlite3.Connection) -> base.ChildState | base.DedupHeld | base.StepResult:
            if conn.execute(Q["start_child"], params).rowcount != 1:
                state = _child_state(conn.execute(Q["child_state"], (child.instance_id,)).fetchone())
                if state is not None:
                    return state
                # not its id: its queue's dedup id (20), held by an unfinished instance (this transaction)
                holder = conn.execute(Q["find_dedup"], params).fetchone()
                return base.DedupHeld(holder["instance_id"])
            return base.StepResult(cancel_requested=self._append(conn, commit))

        return await self._write(tx)

    async def take_child_or_suspend(
        self, commit: base.Commit, child_id: str
    ) -> base.ChildState | base.Suspension:
        def tx(conn: sqlite3.Connection) -> base.ChildState | base.Suspension:
            # one BEGIN IMMEDIATE transaction: a child's end comes before it (read here) or after (wakes us)
            state = _child_state(conn.execute(Q["child_state"], (child_id,)).fetchone())
            if state is not None and state.status.is_finished:
                return state
            return self._suspend_tx(conn, commit, run_at=None, awaits=child_id)

        return await self._write(tx)

    async def list_children(self, instance_id: str, *, limit: int = 1000) -> list[base.InstanceRow]:
        return await self._call(
            lambda c: [rows.instance_row(r) for r in c.execute(Q["list_children"], (instance_id, limit))]
        )

    def _made_runnable(self) -> None:
        if self.made_runnable is not None:
            self.made_runnable()

    # -- events ------------------------------------------------------------------------------------
    async def send_event(self, event: base.NewEvent) -> tuple[bool, list[str]]:
        data = json.loads(event.data)
        keys = event_keys(event.event_type, data)

        def tx(conn: sqlite3.Connection) -> tuple[bool, list[str]]:
            cursor = conn.execute(Q["insert_event"], rows.event_columns(event))
            if not cursor.rowcount:
                return False, []
            stored = decide.stored_event(event, cursor.lastrowid or 0)
            if keys.keys:
                conn.execute(Q["insert_event_keys"], {"seq": stored.seq, "keys": json.dumps(keys.keys)})
            params = {"event_type": event.event_type, "seq": stored.seq, "target": event.target_instance_id}
            if event.target_instance_id is None:  # by key: the waits that may accept it
                waits = conn.execute(Q["waits_for_event"], {**params, "keys": json.dumps(keys.lookup)})
            else:
                waits = conn.execute(Q["waits_for_event_target"], params)
            woken = []
            for wait in decide.waits_matched(waits.fetchall(), data):
                instance_id, outcome_seq = wait["instance_id"], wait["outcome_seq"]
                if outcome_seq is not None and self._deliver(conn, instance_id, outcome_seq, stored):
                    woken.append(instance_id)
                elif conn.execute(Q["wake"], {"instance_id": instance_id, "now": event.now}).rowcount:
                    woken.append(instance_id)  # held by a worker: it takes the event itself
            return True, woken

        return await self._write(tx)

    @staticmethod
    def _deliver(
        conn: sqlite3.Connection, instance_id: str, outcome_seq: int, event: base.StoredEvent
    ) -> bool:
        """Write the event into a waiting, unheld instance's history at its wait's outcome position."""
        params = {"instance_id": instance_id, "now": event.created_at}
        if conn.execute(Q["deliver_event"], params).fetchone() is None:
            return False
        SQLiteStorage._insert_history(
            conn, instance_id, [decide.event_outcome(outcome_seq, event, event.created_at)]
        )
        conn.execute(Q["insert_delivery"], (instance_id, event.seq))
        conn.execute(Q["clear_event_wait"], (instance_id,))
        conn.execute(Q["clear_timers"], (instance_id,))
        return True

    async def next_run_at(self) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            value = conn.execute(Q["next_run_at"]).fetchone()["run_at"]
            return None if value is None else float(value)

        return await self._call(read)

    # -- workers and status ------------------------------------------------------------------------
    @staticmethod
    def _worker_params(worker: base.WorkerRow) -> dict[str, Any]:
        return {
            "worker_id": worker.worker_id,
            "host": worker.host,
            "pid": worker.pid,
            "started_at": worker.started_at,
            "heartbeat_at": worker.heartbeat_at,
            "running": worker.running,
            "concurrency": worker.concurrency,
            "listener": worker.listener,
            "lock_timeout": worker.lock_timeout,
            "workflows": worker.workflows,
            "health": worker.health,
            "relay": int(worker.relay),
            "queues": worker.queues,
            "version": worker.version,
        }

    async def upsert_worker(self, worker: base.WorkerRow) -> None:
        params = self._worker_params(worker)
        await self._write(lambda c: c.execute(Q["upsert_worker"], params))

    async def heartbeat(self, worker: base.WorkerRow, *, peers_since: float) -> list[base.WorkerRow]:
        params = {**self._worker_params(worker), "since": peers_since}

        def tx(conn: sqlite3.Connection) -> list[base.WorkerRow]:
            conn.execute(Q["upsert_worker"], params)
            return [rows.worker_row(r) for r in conn.execute(Q["worker_peers"], params).fetchall()]

        return await self._write(tx)

    async def mark_worker_stopped(self, worker_id: str, now: float) -> None:
        params = {"worker_id": worker_id, "now": now}
        await self._write(lambda c: c.execute(Q["mark_worker_stopped"], params))

    async def prune_workers(self, before: float) -> int:
        return await self._write(lambda c: c.execute(Q["prune_workers"], (before,)).rowcount)

    async def list_workers(self, limit: int = 1000) -> list[base.WorkerRow]:
        return await self._call(
            lambda c: [rows.worker_row(r) for r in c.execute(Q["list_workers"], (limit,)).fetchall()]
        )

    async def list_leases(self, now: float, limit: int) -> list[tuple[str, str, str, float]]:
        params = {"now": now, "limit": limit}
        return await self._call(
            lambda conn: [rows.lease_info(r) for r in conn.execute(Q["list_leases"], params)]
        )

    async def queue_stats(self, now: float) -> QueueStats:
        def read(conn: sqlite3.Connection) -> QueueStats:
            conn.execute("BEGIN")  # one read snapshot for the five queries
            stats = decide.queue_stats(
                now,
                conn.execute(Q["count_by_status"]).fetchall(),
                conn.execute(Q["count_runnable"], {"now": now}).fetchone()["n"],
                conn.execute(Q["held_leases"], {"now": now}).fetchall(),
                conn.execute(Q["oldest_waiting"]).fetchone()["oldest"],
                conn.execute(Q["outbox_stats"]).fetchone(),
            )
            conn.execute("COMMIT")
            return stats

        return await self._call(read)

    async def list_queues(self, now: float, *, cap: int, limit: int, levels: int) -> list[base.QueueState]:
        params = {"now": now, "cap": cap, "limit": limit, "levels": levels}
        return await self._call(lambda c: [rows.queue_state(r) for r in c.execute(Q["list_queues"], params)])

    # -- the transactional outbox ------------------------------------------------------------------
    async def outbox_record(
        self, commit: base.Commit, event: base.NewOutboxEvent, *, status: Status | None = None
    ) -> base.StepResult:
        params = {
            "event_id": event.event_id,
            "instance_id": commit.lease.instance_id,
            "step_seq": event.step_seq,
            "event_type": event.event_type,
            "source": event.source,
            "subject": event.subject,
            "data": event.data,
            "now": commit.now,
        }

        def tx(conn: sqlite3.Connection) -> base.StepResult:
            cancel = self._append(conn, commit, status=status)
            conn.execute(Q["outbox_insert"], params)
            return base.StepResult(cancel_requested=cancel)

        return await self._write(tx)

    async def outbox_claim(
        self, relay_id: str, claim_id: str, now: float, claim_expires_at: float, limit: int, window: int
    ) -> list[base.OutboxClaim]:
        params = {
            "relay_id": relay_id,
            "claim_id": claim_id,
            "claim_expires_at": claim_expires_at,
            "now": now,
            "limit": limit,
            "window": window,
        }

        def tx(conn: sqlite3.Connection) -> list[base.OutboxClaim]:
            conn.execute(Q["outbox_hold"], params)
            return [
                rows.outbox_claim(r, claim_id) for r in conn.execute(Q["outbox_claim"], params).fetchall()
            ]

        return await self._write(tx)

    async def outbox_mark_delivered(self, event_id: str, claim_id: str, now: float) -> tuple[bool, bool]:
        params = {"event_id": event_id, "claim_id": claim_id, "now": now}
        return await self._write(lambda c: self._outbox_mark(c, "outbox_mark_delivered", params, done=True))

    @staticmethod
    def _outbox_mark(
        conn: sqlite3.Connection, query: str, params: dict[str, object], *, done: bool
    ) -> tuple[bool, bool]:
        if conn.execute(Q[query], params).rowcount != 1:
            return False, False
        if done:  # the next event of the instance, if held behind this one, is due now
            conn.execute(Q["outbox_promote"], params)
        else:  # it waits behind this one
            conn.execute(Q["outbox_hold_next"], params)
        return True, bool(conn.execute(Q["outbox_has_later"], params).fetchone()["later"])

    async def outbox_mark_failed(
        self, event_id: str, claim_id: str, now: float, error: str, next_attempt_at: float | None
    ) -> tuple[bool, bool]:
        params = {
            "event_id": event_id,
            "claim_id": claim_id,
            "now": now,
            "error": error,
            "next_attempt_at": next_attempt_at,
        }
        return await self._write(lambda c: self._outbox_mark(c, "outbox_mark_failed", params, done=False))

    async def outbox_release(self, claims: Sequence[tuple[str, str]], now: float) -> None:
        params = [{"event_id": e, "claim_id": c, "now": now} for e, c in claims]
        if params:
            await self._write(lambda c: c.executemany(Q["outbox_release"], params))

    async def outbox_next_attempt_at(self) -> float | None:
        def read(conn: sqlite3.Connection) -> float | None:
            value = conn.execute(Q["outbox_next_attempt_at"]).fetchone()["at"]
            return None if value is None else float(value)

        return await self._call(read)

    async def outbox_list(
        self, *, status: str | None = None, instance_id: str | None = None, limit: int = 100
    ) -> list[base.OutboxRow]:
        params = {"status": status, "instance_id": instance_id, "limit": limit}
        return await self._call(lambda c: [rows.outbox_row(r) for r in c.execute(Q["outbox_list"], params)])

    async def outbox_retry(self, event_id: str, now: float) -> bool:
        params = {"event_id": event_id, "now": now}
        return await self._write(lambda c: c.execute(Q["outbox_retry"], params).rowcount == 1)

    async def outbox_discard(self, event_id: str, now: float) -> bool:
        params = {"event_id": event_id, "now": now}

        def tx(conn: sqlite3.Connection) -> bool:
            if conn.execute(Q["outbox_discard"], params).rowcount != 1:
                return False
            conn.execute(Q["outbox_promote"], params)
            return True

        return await self._write(tx)

    # -- channels (every write inside BEGIN IMMEDIATE: publishes and receives never interleave) -------
    # -- published state (schema 25) ---------------------------------------------------------------
    async def state_set(
        self, commit: base.Commit, *, key: str, value: str, run: int, seq: int
    ) -> base.StateSet:
        params = {
            "instance_id": commit.lease.instance_id,
            "key": key,
            "value": value,
            "run": run,
            "seq": seq,
            "now": commit.now,
        }

        def tx(conn: sqlite3.Connection) -> base.StateSet:
            cancel = self._append(conn, commit)
            version = conn.execute(Q["state_insert"], params).fetchone()["version"]
            return base.StateSet(version=int(version), cancel_requested=cancel)

        return await self._write(tx)

    async def get_state(
        self, instance_id: str, key: str, *, version: int | None = None
    ) -> tuple[Status, base.StateRow | None] | None:
        params = {"instance_id": instance_id, "key": key, "version": version}

        def read(conn: sqlite3.Connection) -> tuple[Status, base.StateRow | None] | None:
            return rows.instance_state(conn.execute(Q["get_state"], params).fetchone())

        return await self._call(read)

    async def list_state(self, instance_id: str, *, limit: int) -> list[base.StateRow]:
        params = {"instance_id": instance_id, "limit": limit}

        def read(conn: sqlite3.Connection) -> list[base.StateRow]:
            return [rows.state(r) for r in conn.execute(Q["list_state"], params).fetchall()]

        return await self._call(read)

    # -- channels ----------------------------------------------------------------------------------
    async def channel_subscribe(self, commit: base.Commit, *, channel: str, mode: str) -> base.StepResult:
        params = {
            "channel": channel,
            "instance_id": commit.lease.instance_id,
            "mode": mode,
            "now": commit.now,
        }

        def tx(conn: sqlite3.Connection) -> base.StepResult:
            cancel = self._append(conn, commit)
            conn.execute(Q["channel_subscribe"], params)
            return base.StepResult(cancel_requested=cancel)

        return await self._write(tx)

    async def channel_publish(
        self, message: base.NewMessage, *, commit: base.Commit | None = None
    ) -> base.PublishResult:
        target = message.target_instance_id
        if commit is not None:  # the lease renewed at the message's time (until then, if no expiry is given)
            expires = message.now if commit.lock_expires_at is None else commit.lock_expires_at
            commit = replace(commit, now=message.now, lock_expires_at=expires)

        def tx(conn: sqlite3.Connection) -> base.PublishResult:
            exists = target is None or conn.execute(Q["channel_instance_exists"], (target,)).fetchone()
            if not exists:
                return base.PublishResult(stored=False, woken=[], target_missing=True)
            cancel = False
            if commit is not None:
                cancel = self._append(conn, commit)
            inserted = conn.execute(Q["channel_insert_message"], rows.message_columns(message)).rowcount
            if not inserted:
                return base.PublishResult(stored=False, woken=[], cancel_requested=cancel)
            params = {"channel": message.channel, "target": target, "now": message.now}
            woken = [r["instance_id"] for r in conn.execute(Q["channel_wake_receivers"], params).fetchall()]
            return base.PublishResult(stored=True, woken=woken, cancel_requested=cancel)

        return await self._write(tx)

    async def channel_take_or_suspend(
        self, commit: base.Commit, wait: base.MessageWait
    ) -> base.StoredMessage | base.Suspension | None:
        records, now = commit.records, commit.now
        instance_id = commit.lease.instance_id
        key = {"channel": wait.channel, "instance_id": instance_id}

        def tx(conn: sqlite3.Connection) -> base.StoredMessage | base.Suspension | None:
            # the lease first: a worker whose lease was taken over neither subscribes nor stops waiting
            state = conn.execute(
                Q["lease_state"], {"instance_id": instance_id, "lease_id": commit.lease.lease_id}
            ).fetchone()
            if state is None or not state["ours"]:
                raise base.LeaseLost(instance_id)
            conn.execute(Q["channel_ensure_subscription"], {**key, "mode": wait.mode, "now": now})
            sub = conn.execute(Q["channel_subscription"], key).fetchone()
            mode, cursor = sub["mode"], sub["cursor_seq"]
            row = conn.execute(Q["channel_next_message"], {**key, "mode": mode, "cursor": cursor}).fetchone()
            if row is None and decide.timed_out(wait.deadline, now):
                conn.execute(Q["channel_stop_waiting"], key)
                return None
            if row is None:
                outcome = self._suspend_tx(conn, commit, run_at=wait.deadline)
                if outcome is base.Suspension.SUSPENDED:
                    conn.execute(Q["channel_set_waiting"], {**key, "now": now})
                    if wait.deadline is not None:
                        conn.execute(Q["insert_timer"], (instance_id, wait.outcome_seq, wait.deadline))
                return outcome
            found = rows.stored_message(row)
            direct = found.target_instance_id is not None
            self._touch(conn, commit, steps=len(records) + 1)
            if decide.claims_message(found, mode):
                claim = {"instance_id": instance_id, "seq": found.seq}
                if conn.execute(Q["channel_claim"], claim).rowcount != 1:  # the write lock makes it so
                    raise StorageError(f"message {found.message_id} was taken by another instance")
            conn.execute(Q["channel_advance"], {**key, "direct": direct, "seq": found.seq})
            self._insert_history(conn, instance_id, [*records, decide.message_outcome(wait, found, now)])
            return found

        return await self._write(tx)

    async def channel_rewake(self, now: float, *, published_before: float, limit: int) -> list[str]:
        def tx(conn: sqlite3.Connection) -> list[str]:
            woken: list[str] = []
            for left in conn.execute(
                Q["channel_leftovers"], {"published_before": published_before}
            ).fetchall():
                if len(woken) >= limit:
                    break
                params = {
                    "now": now,
                    "channel": left["channel"],
                    "seq": left["seq"],
                    "limit": limit - len(woken),
                }
                woken += [r["instance_id"] for r in conn.execute(Q["channel_rewake"], params).fetchall()]
            return woken

        return await self._write(tx)

    async def channel_cleanup(
        self,
        *,
        messages_before: float,
        events_before: float,
        limit: int,
        position: base.CleanupPosition = base.CLEANUP_START,
    ) -> base.Cleanup:
        channel, instance_id = position.subscription
        at, seq = position.message

        def tx(conn: sqlite3.Connection) -> base.Cleanup:
            subs = conn.execute(
                Q["channel_cleanup_subscriptions"],
                {"channel": channel, "instance_id": instance_id, "limit": limit},
            ).fetchall()
            gone = [[r["channel"], r["instance_id"]] for r in subs if r["gone"]]
            if gone:
                conn.execute(Q["channel_delete_subscriptions"], {"keys": json.dumps(gone)})
            messages = conn.execute(
                Q["channel_cleanup_messages"],
                {"before": messages_before, "at": at, "seq": seq, "limit": limit},
            ).fetchall()
            old = [r["seq"] for r in messages if r["gone"]]
            if old:
                conn.execute(Q["channel_delete_messages"], {"seqs": json.dumps(old)})
            events = {"before": events_before, "limit": limit}
            deliveries = conn.execute(Q["channel_cleanup_event_deliveries"], events).rowcount
            conn.execute(Q["channel_cleanup_event_keys"], events)  # not counted: the rounds stay as before
            deleted_events = conn.execute(Q["channel_cleanup_events"], events).rowcount
            return decide.cleanup(
                limit,
                len(gone),
                len(subs),
                (subs[-1]["channel"], subs[-1]["instance_id"]) if subs else ("", ""),
                len(old),
                len(messages),
                (messages[-1]["created_at"], messages[-1]["seq"]) if messages else (at, seq),
                deleted_events,
                deleted_events + deliveries,
            )

        return await self._write(tx)

    # -- the retention of finished instances (schema 29) ------------------------------------------
    async def prune_instances(
        self,
        before: float,
        *,
        limit: int,
        position: tuple[float, str] = base.PRUNE_START,
        apply: bool = True,
    ) -> base.Pruned:
        at, after = position

        def tx(conn: sqlite3.Connection) -> base.Pruned:
            rows = conn.execute(
                Q["prune_instances_examine"], {"before": before, "at": at, "id": after, "limit": limit}
            ).fetchall()
            free = [r["instance_id"] for r in rows if r["free"]]
            instances = deleted = 0
            if free and apply:
                ids = {"ids": json.dumps(free)}
                instances = conn.execute(Q["prune_delete_instances"], ids).rowcount
                deleted = instances + sum(conn.execute(Q[name], ids).rowcount for name in PRUNE_DELETES)
            last = (rows[-1]["finished_at"], rows[-1]["instance_id"]) if rows else (None, None)
            return decide.pruned(limit, len(rows), len(free), instances, deleted, last)

        return await self._write(tx)

    # -- chores ------------------------------------------------------------------------------------
    async def chore_take(
        self, chore: str, worker_id: str, now: float, *, interval: float, grace: float
    ) -> base.ChoreTurn:
        params = {"chore": chore, "worker": worker_id, "now": now, "interval": interval, "grace": grace}

        def tx(conn: sqlite3.Connection) -> base.ChoreTurn:
            taken = conn.execute(Q["chore_take"], params).fetchone()
            if taken is not None:
                return base.ChoreTurn(True, taken["next_at"], taken["holder"])
            row = conn.execute(Q["chore_state"], params).fetchone()
            return base.ChoreTurn(False, row["next_at"], row["holder"])

        return await self._write(tx)

    async def chore_release(self, worker_id: str) -> None:
        await self._write(lambda conn: conn.execute(Q["chore_release"], {"worker": worker_id}))

    # -- cron schedules (schema 19) ----------------------------------------------------------------
    async def schedule_upsert(self, row: base.ScheduleRow, now: float) -> None:
        params = {
            "name": row.name,
            "workflow_name": row.workflow_name,
            "cron": row.cron,
            "timezone": row.timezone,
            "missed": row.missed,
            "overlap": row.overlap,
            "pass_tick": int(row.pass_tick),
            "next_tick": row.next_tick,
            "now": now,
            "queue": row.queue,
            "priority": row.priority,
        }
        await self._write(lambda conn: conn.execute(Q["schedule_upsert"], params))

    async def schedules_due(self, now: float, *, limit: int) -> list[base.ScheduleRow]:
        found = await self._call(
            lambda conn: conn.execute(Q["schedules_due"], {"now": now, "limit": limit}).fetchall()
        )
        return [rows.schedule_row(r) for r in found]

    async def schedule_next_tick(self) -> float | None:
        row = await self._call(lambda conn: conn.execute(Q["schedule_next_tick"]).fetchone())
        return None if row["next_tick"] is None else float(row["next_tick"])

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
        advance = {"name": name, "expected": expected, "next_tick": next_tick, "now": now}

        def tx(conn: sqlite3.Connection) -> base.Fired | None:
            moved = conn.execute(Q["schedule_advance"], advance).fetchone()
            if moved is None:
                return None
            last, waiting = moved["last_instance_id"], moved["waiting"]
            busy = False
            if overlap != "alongside" and last is not None and not (overlap == "queue" and waiting):
                busy = _unfinished(conn, last)
            if busy and overlap == "skip":
                return base.Fired([])
            created: list[str] = []
            wait: list[float] = []
            for start in starts:
                if overlap == "queue" and (busy or waiting):
                    if waiting + len(wait) < queue_limit:
                        wait.append(start.tick)
                    continue
                if _insert_scheduled(conn, start.instance):
                    created.append(start.instance.instance_id)
                started = {"name": name, "tick": start.tick, "instance_id": start.instance.instance_id}
                conn.execute(Q["schedule_started"], started)
                busy = True
            added = sum(conn.execute(Q["schedule_wait"], {"name": name, "tick": t}).rowcount for t in wait)
            if added:
                conn.execute(Q["schedule_waiting_add"], {"name": name, "added": added})
            return base.Fired(created, wait)

        fired = await self._write(tx)
        if fired is not None and fired.created:
            self._made_runnable()
        return fired

    async def schedules_waiting(self, *, limit: int) -> list[base.WaitingTick]:
        found = await self._call(
            lambda conn: conn.execute(Q["schedules_waiting"], {"limit": limit}).fetchall()
        )
        return [
            base.WaitingTick(rows.schedule_row(r), float(r["first_tick"]), bool(r["ready"]))
            for r in found
            if r["first_tick"] is not None
        ]

    async def schedule_release(self, name: str, *, tick: float, start: base.NewInstance, now: float) -> bool:
        params = {"name": name, "tick": tick, "instance_id": start.instance_id, "now": now}

        def tx(conn: sqlite3.Connection) -> bool:
            locked = conn.execute(Q["schedule_lock"], params).fetchone()
            if locked is None or locked["paused"]:
                return False
            last = locked["last_instance_id"]
            if last is not None and _unfinished(conn, last):
                return False
            if conn.execute(Q["schedule_unwait_tick"], params).rowcount == 0:
                return False
            conn.execute(Q["schedule_unwait"], params)
            _insert_scheduled(conn, start)
            return True

        released = await self._write(tx)
        if released:
            self._made_runnable()
        return released

    async def get_schedule(self, name: str) -> base.ScheduleRow | None:
        row = await self._call(lambda conn: conn.execute(Q["get_schedule"], {"name": name}).fetchone())
        return None if row is None else rows.schedule_row(row)

    async def list_schedules(self, *, limit: int) -> list[base.ScheduleRow]:
        found = await self._call(lambda conn: conn.execute(Q["list_schedules"], {"limit": limit}).fetchall())
        return [rows.schedule_row(r) for r in found]

    async def schedule_pause(self, name: str, now: float) -> bool:
        params = {"name": name, "now": now}
        return bool(await self._write(lambda conn: conn.execute(Q["schedule_pause"], params).rowcount))

    async def schedule_resume(self, name: str, next_tick: float, now: float) -> bool:
        params = {"name": name, "next_tick": next_tick, "now": now}
        return bool(await self._write(lambda conn: conn.execute(Q["schedule_resume"], params).rowcount))

    async def schedule_delete(self, name: str) -> bool:
        params = {"name": name}

        def tx(conn: sqlite3.Connection) -> bool:
            conn.execute(Q["schedule_delete_waiting"], params)
            return bool(conn.execute(Q["schedule_delete"], params).rowcount)

        return await self._write(tx)

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
        params = {
            "key_at": plan.key[0],
            "key_id": plan.key[1],
            "bound": plan.bound,
            "limit": limit,
            "head": base.INPUT_HEAD,
            **dict(zip(("f1", "f2"), plan.filters, strict=False)),
        }

        return await self._call(lambda c: plan.page(c.execute(Q[plan.query], params)))

    async def count_instances(self, which: base.InstanceFilter, *, cap: int) -> dict[Status, int]:
        lo, hi = decide.created_range(which)
        params = {
            "lo": lo,
            "hi": hi,
            "cap": cap,
            "statuses": json.dumps([str(status) for status in Status]),
            "workflow_name": which.workflow_name,
        }
        name = "count_instances_all" if which.workflow_name is None else "count_instances_workflow"
        return await self._call(lambda c: decide.counts_by_status(c.execute(Q[name], params)))

    async def runnable_workflows(self, now: float, *, cap: int, limit: int) -> list[tuple[str, int]]:
        params = {"now": now, "cap": cap, "limit": limit}
        return await self._call(lambda c: decide.runnable_by_name(c.execute(Q["runnable_workflows"], params)))

    async def patches(self, *, limit: int) -> list[base.PatchRow]:
        return await self._call(
            lambda c: [base.PatchRow(*r) for r in c.execute(Q["patches"], {"limit": limit}).fetchall()]
        )

    async def workflow_names(self, *, limit: int) -> list[str]:
        return await self._call(
            lambda c: [r["name"] for r in c.execute(Q["workflow_names"], {"limit": limit})]
        )

    async def instance_extras(
        self, instance_id: str, *, event_ids: Sequence[str] = (), message_ids: Sequence[str] = ()
    ) -> base.InstanceExtras:
        def read(conn: sqlite3.Connection) -> base.InstanceExtras:
            conn.execute("BEGIN")  # one snapshot for the five reads
            try:
                timers = conn.execute(Q["extras_timers"], (instance_id,)).fetchall()
                wait = conn.execute(Q["extras_event_wait"], (instance_id,)).fetchone()
                subscriptions = conn.execute(Q["extras_subscriptions"], (instance_id,)).fetchall()
                outbox = conn.execute(Q["extras_outbox"], (json.dumps(list(event_ids)),)).fetchall()
                messages = conn.execute(Q["extras_messages"], (json.dumps(list(message_ids)),)).fetchall()
            finally:
                conn.execute("COMMIT")
            return rows.instance_extras(timers, wait, subscriptions, outbox, messages)

        return await self._call(read)


def _statements(script: str) -> list[str]:
    """Split a migration script into statements, the way SQLite itself sees their ends."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip() and not all(x.strip().startswith("--") for x in current.strip().splitlines()):
        raise RuntimeError(f"incomplete statement at the end of a migration: {current.strip()[:80]}")
    return statements


def read_histories(url: str, workflow: str | None, limit: int) -> list[StoredHistory]:
    """The replay check's read (``_read_only.read_histories``), on a connection that cannot write: read-only,
    and immutable when no write-ahead log is there, so nothing is created next to the file (a read-only
    connection to a WAL database otherwise makes its -shm and -wal files)."""
    path, _ = parse_sqlite_url(url)
    if path == ":memory:" or not os.path.isfile(path):
        raise StorageError(f"no SQLite database at {path!r}")
    immutable = "" if os.path.exists(path + "-wal") else "&immutable=1"
    try:
        conn = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro{immutable}", uri=True)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open SQLite database {path} read-only: {exc}") from exc
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA query_only = ON")
        read_only.check_tables(row["name"] for row in conn.execute(Q["list_tables"]))
        read_only.check_version(conn.execute(Q["get_meta"], ("schema_version",)).fetchone(), SCHEMA_VERSION)
        conn.execute("BEGIN")  # one snapshot for the whole read
        by_status = [
            conn.execute(
                Q["replay_instances"],
                {"workflow_name": workflow, "status": status.value, "limit": limit, "offset": 0},
            ).fetchall()
            for status in (*read_only.UNFINISHED, *read_only.FINISHED)
        ]
        found = [
            read_only.stored_history(row, conn.execute(Q["get_history"], (row["instance_id"], 0)), url)
            for row in read_only.picked(by_status, limit)
        ]
        conn.execute("COMMIT")
        return found
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc) or "malformed" in str(exc):
            raise NotAGesteDatabaseError(f"{path} is not a geste database: {exc}") from exc
        raise StorageError(f"cannot read SQLite database {path}: {exc}") from exc
    finally:
        conn.close()


def _unfinished(conn: sqlite3.Connection, instance_id: str) -> bool:
    """Whether a schedule's last instance has not ended (overlap skip and queue)."""
    return conn.execute(Q["schedule_last_unfinished"], {"instance_id": instance_id}).fetchone() is not None


def _insert_scheduled(conn: sqlite3.Connection, new: base.NewInstance) -> bool:
    """Insert a tick's instance, runnable or queued onto the schedule's queue; False: its id exists."""
    params = {
        "instance_id": new.instance_id,
        "workflow_name": new.workflow_name,
        "status": str(Status.PENDING),
        "input": new.input,
        "now": new.now,
        "locked_by": None,
        "lease_id": None,
        "lock_expires_at": None,
        "deadline": new.deadline,
        "queue": new.queue,
        "priority": new.priority,
        "dedup_id": None,
        "partition_key": new.partition_key,
        "version": new.version,
        "pinned": new.pinned,
        "trace_context": new.trace_context,
    }
    return bool(conn.execute(Q["insert_queued" if new.queue else "insert_instance"], params).rowcount == 1)
