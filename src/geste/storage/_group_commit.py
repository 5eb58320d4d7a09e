"""Group commit: concurrent callers' writes share transactions, with no added wait.

A call that finds fewer than ``max_in_flight`` batches running goes at once (alone, if it is alone); calls
made while the batches are busy queue up and leave together with the next one. So a lone step pays no
latency for batching, and under load many instances' step commits become one statement and one commit,
each caller still resuming only once its own write committed (durability unchanged). The batch function
returns one outcome per item: a value, or the exception that item's caller gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        flush: Callable[[Sequence[Item]], Awaitable[Sequence[Result | BaseException]]],
        *,
        max_in_flight: int,
        max_batch: int,
        gather_ticks: int = 0,
    ) -> None:
        self._flush = flush
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._gather_ticks = gather_ticks
        """Event-loop turns a drain lets pass before each batch after its first: the callers its last batch
        resumed submit again meanwhile and join the next (a writer in a loop), rather than each leaving
        almost alone. 0: none (a caller resumed by a commit has other work to do first)."""
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        """Batches sent so far (for tests and benchmarks: items per commit)."""
        self.items = 0
        self.on_batch: Callable[[int], None] | None = None
        """Called with the size of each batch as it is sent (the App's metrics)."""

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)  # a task nobody references may be collected mid-run
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        """Send batches until the queue is empty; at most ``max_in_flight`` of these run at once."""
        try:
            first = True
            while self._queue:
                if not first:
                    for _ in range(self._gather_ticks):
                        await asyncio.sleep(0)
                first = False
                batch = [(item, f) for item, f in self._queue[: self._max_batch] if not f.cancelled()]
                del self._queue[: self._max_batch]
                if not batch:
                    continue
                self.batches += 1
                self.items += len(batch)
                if self.on_batch is not None:
                    self.on_batch(len(batch))
                try:
                    outcomes = await self._flush([item for item, _ in batch])
                except Exception as exc:  # the whole batch failed: every caller gets the error
                    outcomes = [exc] * len(batch)
                except BaseException:  # cancelled (the loop is closing): so are the callers
                    for _, future in batch:
                        future.cancel()
                    raise
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    _settle(future, outcome)
        finally:
            self._in_flight -= 1


def _settle(future: asyncio.Future[Result], outcome: Result | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
