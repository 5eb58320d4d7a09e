"""Durable streams: a workflow or an activity appends items to a named stream of its instance, any process
reads them in order from any position (docs/streams.md; docs/design.md "Streams").

Writes. ``ctx.write_stream`` returns once its item committed. The writes of one process share
transactions (``GroupCommit``, one batch in flight at a time, so that a process's writes keep their
order): concurrent writers' items become one statement and one commit. Each write carries an idempotency
key, its *writer*, unique in its stream: ``<run>:<n>`` for the n-th write of a workflow's run to that
stream (a replay counts again from 0 and rewrites the same keys: nothing written), ``<run>.<step>:<n>``
for the n-th write of an activity's attempt (a retried attempt's n-th write is a no-op when an earlier
attempt wrote it: the stream holds each write of the step once). Positions are the stream's own, given at
the commit (``geste_stream_heads``), dense unless two processes raced on one writer.

Notifications. A commit never notifies. The write statement returns the streams written that a reader of
another process registered for (``geste_stream_readers``, PostgreSQL; one probe of a primary key per
stream and batch, nothing when nobody reads), and a notifier sends them in its own statement after the
commit: one ``geste_stream_written`` for every write batch that committed while the previous one was being
sent. Readers in the writer's process are woken in memory.

Reads. A reader reads from its position (a range of the primary key), yields, and when it has read
everything waits: on PostgreSQL it registers once (its row in ``geste_stream_readers``, renewed while it
reads, deleted when it stops), reads again, then sleeps until notified, reading again every
``notify_fallback_interval`` as the net for a lost notification; elsewhere (SQLite, or the listener down)
it polls, after 5 ms, then twice as long each time up to ``poll_interval``, back to 5 ms after each item.
A stream ends for its readers at its close, or when the instance has ended and everything is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from ._models import StreamEntry
from ._serde import decode, encode
from ._validation import check_position, check_stream_key
from .errors import InstanceNotFoundError, StorageError
from .storage._group_commit import GroupCommit
from .storage.base import Storage, StreamWrite

logger = logging.getLogger("geste.streams")

MAX_BATCH = 2000
"""Items at most per write statement."""
GATHER_TICKS = 4
"""Event-loop turns a write batch waits for before it leaves (after the first of a drain): the writers the
last batch resumed write again meanwhile and join it (a token loop takes about three turns)."""
READ_BATCH = 500
"""Items at most per read."""
FIRST_POLL = 0.005
"""A polling reader's first wait after it read everything (then twice as long, up to poll_interval)."""
READER_TTL = 600.0
"""Seconds a reader's registration lives unless renewed (it renews it every half of this while it reads);
the cleanup chore deletes those of readers that died."""
PAYLOAD_BYTES = 7000
"""Bytes at most per notification payload (PostgreSQL refuses 8000 and more): more streams, more payloads."""


def encode_item(item: Any, *, key: str, limit: int) -> str:
    return encode(item, what=f"an item of stream {key!r:.80}", limit=limit)


class Streams:
    """One App's streams: its writes (batched), its notifier, its waiting readers and their listener.

    ``listen()`` returns whether notifications reach this process (True: listening; False: not now; None:
    never, SQLite or ``listen_notify=False``), starting the listener on first call; ``is_open`` whether the
    App is open.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        clock: Callable[[], float],
        process: str,
        poll_interval: float,
        fallback_interval: float,
        max_payload_bytes: int,
        is_open: Callable[[], bool],
        listen: Callable[[], bool | None] = lambda: None,
        wait_end: Callable[[str], Awaitable[Any]] | None = None,
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.process = process
        self.poll_interval = poll_interval
        self.fallback_interval = fallback_interval
        self.max_payload_bytes = max_payload_bytes
        self.is_open = is_open
        self.listen = listen
        self.wait_end = wait_end
        """Returns (or raises) once the instance ended: ``result()``, woken by the end's notification
        (schema 14). A notified reader waits for it too, the end of an instance closing its streams."""
        self.commits: GroupCommit[StreamWrite, None] = GroupCommit(
            self._flush, max_in_flight=1, max_batch=MAX_BATCH, gather_ticks=GATHER_TICKS
        )
        self.notifications = 0
        """Notifications sent so far (tests and benchmarks: notifications per write batch)."""
        self._pending: set[tuple[str, str]] = set()
        self._notifier: asyncio.Task[None] | None = None
        self._waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- writing ---------------------------------------------------------------------------------------
    async def write(self, instance_id: str, key: str, writer: str, item: str | None) -> None:
        """Append ``item`` (stored JSON; None closes the stream) under the idempotency key ``writer``;
        return once it committed (or was found written)."""
        await self.commits.submit(StreamWrite(instance_id, key, writer, item))

    async def _flush(self, writes: Sequence[StreamWrite]) -> Sequence[None]:
        read_elsewhere = await self.storage.stream_write(writes, self.clock())
        self._wake({(w.instance_id, w.key) for w in writes})
        if read_elsewhere:
            self._pending.update(read_elsewhere)
            if self._notifier is None or self._notifier.done():
                self._notifier = asyncio.get_running_loop().create_task(self._notify())
        return [None] * len(writes)

    async def _notify(self) -> None:
        """Send what is pending, one statement at a time: the batches that commit meanwhile share the next."""
        schema = getattr(self.storage, "schema", None)
        while self._pending:
            streams, self._pending = sorted(self._pending), set()
            payloads = _payloads(schema, streams)
            try:
                await self.storage.stream_notify(payloads)
                self.notifications += len(payloads)
            except StorageError as exc:  # the readers' polling net finds the items
                logger.info("could not notify the readers of %d stream(s): %s", len(streams), exc)

    # -- waking ----------------------------------------------------------------------------------------
    def _wake(self, streams: set[tuple[str, str]]) -> None:
        for stream in streams:
            for future in self._waiters.pop(stream, ()):
                if not future.done():
                    future.set_result(None)

    def notified(self, body: dict[str, Any]) -> None:
        """A ``geste_stream_written`` heard: wake this process's readers of the streams it names."""
        if body.get("schema") not in (None, getattr(self.storage, "schema", None)):
            return
        streams = body.get("streams")
        if isinstance(streams, list):
            self._wake({(s[0], s[1]) for s in streams if isinstance(s, list) and len(s) == 2})

    def wake_all(self) -> None:
        """Every waiting reader reads now (the listener connected, reconnected or was lost)."""
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    # -- reading ---------------------------------------------------------------------------------------
    async def entries(self, instance_id: str, key: str, start: int = 0) -> AsyncIterator[StreamEntry]:
        """The stream's items from ``start`` on, in order, waiting for more until the stream is closed
        or the instance ended (see the module's docstring)."""
        from .errors import AppNotOpenError

        key, position = check_stream_key(key), check_position(start)
        stream = (instance_id, key)
        loop = asyncio.get_running_loop()
        reader: str | None = None  # this reader's registration, once written
        end_watch: asyncio.Task[None] | None = None  # wakes this reader when the instance ends
        renew_at = 0.0
        delay = FIRST_POLL
        ended = False
        try:
            while True:
                if not self.is_open():
                    raise AppNotOpenError("the App closed while reading a stream")
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.setdefault(stream, []).append(future)  # before the read: no write unseen
                try:
                    try:
                        rows = await self.storage.stream_read(instance_id, key, position, READ_BATCH)
                        if len(rows) < READ_BATCH and not (rows and rows[-1][1] is None) and not ended:
                            status = await self.storage.stream_instance_status(instance_id)
                        else:
                            status = None
                    except StorageError as exc:
                        if not self.is_open():
                            raise AppNotOpenError("the App closed while reading a stream") from exc
                        logger.warning("reading stream %r of %s: %s; trying again", key, instance_id, exc)
                        with contextlib.suppress(TimeoutError):  # a wake-up (the App closing) ends it
                            async with asyncio.timeout(self.poll_interval):
                                await asyncio.shield(future)
                        continue
                    for at, item in rows:
                        if item is None:
                            return  # closed
                        position = at + 1
                        yield StreamEntry(at, decode(item))
                    if len(rows) == READ_BATCH:
                        continue
                    if rows:
                        delay = FIRST_POLL
                    if ended:
                        return  # read everything after the end
                    if status is None:
                        raise InstanceNotFoundError(instance_id)
                    if status.is_finished:
                        ended = True  # an end closes its streams: one more read finds what came before it
                        continue
                    listening = self.listen()
                    if listening and (reader is None or self.clock() >= renew_at):
                        first = reader is None
                        reader = reader or uuid.uuid4().hex
                        try:
                            await self.storage.stream_watch(
                                instance_id,
                                key,
                                reader=reader,
                                process=self.process,
                                expires_at=self.clock() + READER_TTL,
                            )
                        except StorageError as exc:  # not registered: poll this round
                            logger.info("a stream reader could not register: %s", exc)
                            listening = False
                        renew_at = self.clock() + READER_TTL / 2
                        if first and listening:
                            continue  # read again: an item committed before the registration is seen
                    if listening and end_watch is None and self.wait_end is not None:
                        end_watch = loop.create_task(self._await_end(instance_id, stream))
                    if listening:
                        wait = self.fallback_interval
                    else:
                        wait, delay = delay, min(delay * 2, self.poll_interval)
                    try:
                        async with asyncio.timeout(wait):
                            await asyncio.shield(future)
                    except TimeoutError:
                        pass
                finally:
                    waiters = self._waiters.get(stream)
                    if waiters is not None and future in waiters:
                        waiters.remove(future)
                        if not waiters:
                            del self._waiters[stream]
        finally:
            if end_watch is not None:
                end_watch.cancel()
            if reader is not None:
                self._forget(instance_id, key, reader)

    async def _await_end(self, instance_id: str, stream: tuple[str, str]) -> None:
        assert self.wait_end is not None
        with contextlib.suppress(Exception):  # failed, cancelled, the App closing: the reader reads now
            await self.wait_end(instance_id)
        self._wake({stream})

    def _forget(self, instance_id: str, key: str, reader: str) -> None:
        """A reader stopped: its registration is deleted in the background (it expires otherwise)."""
        if not self.is_open():
            return
        try:
            task = asyncio.get_running_loop().create_task(self._unwatch([(instance_id, key, reader)]))
        except RuntimeError:  # no running loop: a generator collected after its loop closed
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unwatch(self, readers: list[tuple[str, str, str]]) -> None:
        try:
            await self.storage.stream_unwatch(readers)
        except StorageError as exc:
            logger.info("could not forget %d stream reader(s): %s", len(readers), exc)

    async def close(self) -> None:
        """The runtime closes: finish the notifier and the unwatches (the App wakes the readers once it is
        closed: they see it then)."""
        pending = [t for t in (self._notifier, *self._tasks) if t is not None and not t.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def _payloads(schema: str | None, streams: Sequence[tuple[str, str]]) -> list[str]:
    """The notification payloads naming ``streams``, each under ``PAYLOAD_BYTES``."""
    payloads: list[str] = []
    chunk: list[list[str]] = []
    size = 0
    for instance_id, key in streams:
        entry = [instance_id, key]
        length = len(json.dumps(entry).encode()) + 1
        if chunk and size + length > PAYLOAD_BYTES:
            payloads.append(json.dumps({"schema": schema, "streams": chunk}, separators=(",", ":")))
            chunk, size = [], 0
        chunk.append(entry)
        size += length
    if chunk:
        payloads.append(json.dumps({"schema": schema, "streams": chunk}, separators=(",", ":")))
    return payloads
