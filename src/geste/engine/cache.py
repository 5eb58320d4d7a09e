"""The cache of suspended runs: a run that suspends at a wait stays in memory, parked, so that its wake-up
here continues it from the wait instead of reading and replaying its whole history.

Without it, a run is a coroutine that lives from a claim to the next suspension: each wake-up reads the
history (the claim ships it) and replays every step from the top, so the n-th wake-up of a long-lived
workflow costs O(n), and its life O(n²). With it (``workflow_cache_size`` > 0), each run's coroutine runs
in a task of its own; at a wait, once the suspension committed, the journal parks it here
(``CachedRun.park``) and the claim that took it returns. The worker's next claim of the instance tells
the database the last step it holds (``known``) and receives the rows after it only: the wait's outcome
(the event, the message) or nothing (a timer rang, a spurious wake-up); the run takes them and goes on
from the wait (``Journal.resumed``), as a replay of the whole history would, without it.

The cache is never needed for correctness. A run is dropped, and its instance replays as before, on any
doubt: evicted (least recently parked beyond ``workflow_cache_size``), claimed with rows other than its
wait's outcome after the step it holds (another worker ran it meanwhile, an operator changed it), its
task ended, the worker stopping. What it trusts: that the rows up to the step it holds are unchanged
(geste never changes them; a hand-edit of them is found at the next replay, after an eviction or a
restart). Dropping throws ``Suspended`` into the parked coroutine, the signal a
suspension raised before: its ``finally`` blocks run, its ``except Exception`` blocks do not.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from ..storage.base import Claim, HistoryRow
from .journal import Journal, Suspended

if TYPE_CHECKING:
    from .._metrics import Metrics


class Parked:
    """What ``CachedRun.stopped`` holds when the run parked at a wait (not an end, not a signal)."""

    __slots__ = ()


PARKED = Parked()


class CachedRun:
    """A run whose coroutine lives in its own task (``task``), between claims of its instance: parked at
    a wait (``known``: the last step it holds) or running under the claim that continued it."""

    __slots__ = ("_resume", "journal", "known", "stopped", "task")

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.task: asyncio.Task[None] | None = None
        self.stopped: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        """Done when the run stops under its current claim: ``PARKED``, its stored result (or None), or
        the signal that stopped it (``Suspended``, ``Abandon``)."""
        self.known = 0
        self._resume: asyncio.Future[None] | None = None

    async def park(self, journal: Journal, known: int) -> None:
        """``Journal.park``: hand the claim back (``stopped``) and wait for a wake-up here (``resume``) or
        the cache's eviction (``Suspended``)."""
        journal.forget_replayed()
        self.known = known
        self._resume = resume = asyncio.get_running_loop().create_future()
        if not self.stopped.done():
            self.stopped.set_result(PARKED)
        await resume

    def new_rows(self, claim: Claim, history: Sequence[HistoryRow]) -> list[HistoryRow] | None:
        """The rows ``claim`` continues this run with, or None if it may not: the run must be parked,
        the instance still on its run (not continued as new meanwhile), and the rows after the step it
        holds (the claim read those only, or the whole history, when it was made before the run
        parked) at most its wait's outcome, at the step it waits at. Anything else means another worker
        ran the instance or an operator changed it: the run is dropped and the instance replays."""
        resume = self._resume
        if resume is None or resume.done() or self.task is None or self.task.done():
            return None
        known = self.known
        if claim.run != self.journal.run or claim.history_after > known:  # another run's rows
            return None
        rows = [r for r in history if type(r.seq) is not int or r.seq > known]
        at = self.journal.seq
        if len(rows) > 1 or any(r.seq != at for r in rows):
            return None
        return rows

    def resume(self, claim: Claim, rows: Sequence[HistoryRow]) -> None:
        """Continue the parked run under ``claim`` with ``rows`` (``new_rows``)."""
        assert self._resume is not None
        self.journal.resumed(claim.lease, rows, claim.cancel_requested, claim.awaited)
        self.stopped = asyncio.get_running_loop().create_future()
        self._resume.set_result(None)

    def drop(self) -> None:
        """Unwind the parked coroutine (``Suspended`` at its wait); nothing is written."""
        resume = self._resume
        if resume is not None and not resume.done():
            resume.set_exception(Suspended())


class WorkflowCache:
    """At most ``size`` parked runs of this worker, by instance id, the least recently parked dropped
    first (``size`` 0: no cache; every suspension unwinds its run)."""

    def __init__(self, size: int, metrics: Metrics) -> None:
        self.size = size
        self.metrics = metrics
        self._runs: OrderedDict[str, CachedRun] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    def put(self, instance_id: str, run: CachedRun) -> None:
        """Keep ``run``, parked; drop the least recently parked beyond the size."""
        old = self._runs.pop(instance_id, None)
        if old is not None and old is not run:
            self._drop(old, "replaced")
        self._runs[instance_id] = run
        while len(self._runs) > self.size:
            _, oldest = self._runs.popitem(last=False)
            self._drop(oldest, "evicted")

    def take(self, instance_id: str) -> CachedRun | None:
        """The parked run of ``instance_id``, out of the cache (a claim continues it or drops it)."""
        return self._runs.pop(instance_id, None)

    def known(self, instance_ids: Collection[str] | None = None) -> dict[str, int]:
        """For a claim: the last step held, by instance id, of the parked runs (of ``instance_ids``)."""
        runs = self._runs
        if instance_ids is None:
            return {iid: run.known for iid, run in runs.items()}
        return {iid: runs[iid].known for iid in instance_ids if iid in runs}

    def discard(self, instance_id: str, run: CachedRun) -> None:
        """Forget ``run`` if it is still the one kept (its task ended while parked)."""
        if self._runs.get(instance_id) is run:
            del self._runs[instance_id]

    def drop(self, run: CachedRun, why: str) -> None:
        """Drop a run taken out of the cache that a claim cannot continue."""
        self._drop(run, why)

    def tasks(self) -> list[asyncio.Task[None]]:
        """The parked runs' tasks."""
        return [run.task for run in self._runs.values() if run.task is not None]

    def clear(self) -> None:
        """Drop every parked run (the worker stops)."""
        runs, self._runs = self._runs, OrderedDict()
        for run in runs.values():
            self._drop(run, "stopped")

    def _drop(self, run: CachedRun, why: str) -> None:
        self.metrics.workflow_cache_drops.values[why] += 1
        run.drop()
