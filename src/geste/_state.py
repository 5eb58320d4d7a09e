"""Published state, read from outside: ``handle.get_state`` and ``handle.wait_state`` (docs/state.md).

A workflow publishes values under keys with ``ctx.set_state`` (a step: ``engine.context``); every value
is kept in ``geste_state`` with its version, 1, 2, ... per key. ``get_state`` reads the latest (or one
version) by primary key. ``wait_state(key, after=n)`` returns the first value whose version is past
``n``: a ``set_state`` in this process wakes it in memory (the engine's ``on_state``); on PostgreSQL one
elsewhere is notified to the calls that registered for the key (``Storage.watch_state``), so that a
``set_state`` nobody waits for sends nothing; otherwise, and as the net for a lost notification, the call
reads again, as ``result()`` does (docs/design.md, "Published state").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING

from ._models import StateValue, to_datetime
from ._retry import seconds
from ._serde import decode
from ._validation import check_state_key, findable
from .errors import ConfigurationError, InstanceNotFoundError, StateEndedError, StateTimeout
from .storage.base import StateRow

if TYPE_CHECKING:
    from ._client import Client

MAX_KEYS_LISTED = 1_000
"""Keys ``list_state`` returns at most (the viewer's section, the HTTP API's list)."""


def state_value(row: StateRow) -> StateValue:
    """The public form of a stored value."""
    at = to_datetime(row.created_at)
    assert at is not None
    return StateValue(key=row.key, value=decode(row.value), version=row.version, set_at=at, run=row.run)


def _version(value: object, what: str, *, least: int) -> int:
    if type(value) is not int or value < least:
        raise ConfigurationError(f"{what} must be an integer of at least {least}, not {value!r:.80}")
    return value


class StateWaits:
    """The ``wait_state`` calls of one App waiting, by instance and key, and the reads of state."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._waiters: dict[str, dict[str, list[asyncio.Future[bool]]]] = {}
        """Each future is set when something may have changed (True: the instance ended, and its end
        deleted the registrations it saw)."""

    # -- reads -----------------------------------------------------------------------------------------
    async def get(self, instance_id: str, key: str, *, version: int | None = None) -> StateValue | None:
        """The latest value of ``key`` (or its value ``version``); None when there is none."""
        client = self._client
        client._require_open()
        check_state_key(key)
        if version is not None:
            _version(version, "version", least=1)
        if not findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        found = await client.storage.get_state(instance_id, key, version=version)
        if found is None:
            raise InstanceNotFoundError(instance_id)
        row = found[1]
        return None if row is None else state_value(row)

    async def list(self, instance_id: str, *, limit: int = MAX_KEYS_LISTED) -> list[StateValue]:
        """The latest value of each key of the instance, by key (at most ``limit``)."""
        client = self._client
        client._require_open()
        _version(limit, "limit", least=1)
        if not findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        rows = await client.storage.list_state(instance_id, limit=limit)
        if not rows and await client.storage.get_instance(instance_id) is None:
            raise InstanceNotFoundError(instance_id)
        return [state_value(row) for row in rows]

    # -- waits -----------------------------------------------------------------------------------------
    async def wait(
        self, instance_id: str, key: str, *, after: int = 0, timeout: float | timedelta | None = None
    ) -> StateValue:
        """The first value of ``key`` whose version is past ``after`` (``handle.wait_state``).

        The wait of ``result()`` (``Client.wait_loop``): each round registers a future first, then reads
        (a value committed after the read wakes the future). On PostgreSQL, once the listener listens,
        the call registers for the key (``Storage.watch_state``), reads again at once, ``SETTLE_READ``
        later, and then every ``poll_interval`` only; otherwise it reads after 10 ms, then twice as long
        each time up to ``poll_interval``. It deletes its registration when it stops waiting."""
        from ._client import Done  # (at the call: the client module imports this one)

        client = self._client
        client._require_open()
        check_state_key(key)
        _version(after, "after", least=0)
        if not findable(instance_id, "instance_id"):
            raise InstanceNotFoundError(instance_id)
        limit = None if timeout is None else seconds(timeout, what="timeout")
        deadline = None if limit is None else time.monotonic() + limit

        async def read() -> Done[StateValue] | bool:
            found = await client.storage.get_state(instance_id, key)
            if found is None:
                raise InstanceNotFoundError(instance_id)
            status, row = found
            if row is not None and row.version > after:
                return Done(state_value(row))
            if status.is_finished:
                raise StateEndedError(instance_id, key, str(status))
            return deadline is None or time.monotonic() < deadline  # else it times out now: no registration

        def add(future: asyncio.Future[bool]) -> None:
            self._waiters.setdefault(instance_id, {}).setdefault(key, []).append(future)

        def timed_out() -> StateTimeout:
            return StateTimeout(
                f"no value of {key!r} newer than version {after} from instance {instance_id} within {limit}s"
            )

        return await client.wait_loop(
            instance_id,
            what=f"state {key!r} of {instance_id}",
            read=read,
            register=partial(client.storage.watch_state, instance_id, key),
            add=add,
            drop=partial(self._drop, instance_id, key),
            deadline=deadline,
            timed_out=timed_out,
        )

    def _drop(self, instance_id: str, key: str, future: asyncio.Future[bool]) -> None:
        keys = self._waiters.get(instance_id)
        if keys is None:
            return
        futures = keys.get(key)
        if futures is not None and future in futures:
            futures.remove(future)
            if not futures:
                del keys[key]
                if not keys:
                    del self._waiters[instance_id]

    # -- wake-ups ----------------------------------------------------------------------------------------
    def on_state(self, instance_id: str, key: str) -> None:
        """A value of ``key`` was committed (here, or elsewhere and notified): its waiters read now."""
        keys = self._waiters.get(instance_id)
        if keys is not None:
            _wake(keys.get(key, ()))

    def on_instance(self, instance_id: str, *, ended: bool = False) -> None:
        """The instance ended (``ended``: its end deleted the registrations) or was released here: every
        waiter of it reads now."""
        for futures in self._waiters.get(instance_id, {}).values():
            _wake(futures, ended=ended)

    def wake_all(self) -> None:
        """Every waiter reads now (the listener (re)connected, or the App closed)."""
        for keys in self._waiters.values():
            for futures in keys.values():
                _wake(futures)


def _wake(futures: Sequence[asyncio.Future[bool]], *, ended: bool = False) -> None:
    for future in futures:
        if not future.done():
            future.set_result(ended)
