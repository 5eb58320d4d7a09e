"""What every background loop of geste shares: surviving any error, saying so, and stopping cleanly.

``Loop`` is the one base of the background loops (the claim loop and the heartbeat of the worker, the
outbox relay, the channel chores, the listener's reconnect loop): it starts the task, runs rounds until
asked to stop, backs off after failures, reports a loop that ends by itself, and stops at a boundary.

A loop must never end because of one bad row or one
unexpected exception: ``failed`` logs it (a ``StorageError`` at WARNING: the database went away, which is
expected; anything else at ERROR with its traceback) and gives the back-off before the next try. A loop
that still ends by itself is reported by ``watch`` (CRITICAL, and the App marks its worker unhealthy in the
registry, where ``geste status`` shows it).

Stopping: a loop is asked to stop at a boundary (between two rounds, never in the middle of a claim whose
rows would stay leased), and only cancelled if it does not stop within its grace. ``cancel_and_wait`` and
``stop_within`` never swallow the caller's own cancellation: a cancelled ``App.close()`` ends at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..errors import StorageError

logger = logging.getLogger("geste.loops")

BACKOFF_CAP = 30.0
"""The longest a failing loop waits before it tries again."""


def backoff(failures: int, base: float, cap: float = BACKOFF_CAP) -> float:
    """``base`` doubled for each failure in a row after the first, at most ``cap``."""
    return float(min(base * 2 ** min(failures, 30), cap))


def failed(log: logging.Logger, what: str, exc: BaseException, retry_in: float) -> None:
    """Say that one round of a loop failed and when it tries again."""
    if isinstance(exc, StorageError):
        log.warning("%s failed (%s); retrying in %.1fs", what, exc, retry_in)
    else:
        log.error("%s failed unexpectedly; retrying in %.1fs", what, retry_in, exc_info=exc)


def watch(
    task: asyncio.Task[None], what: str, on_death: Callable[[str], None], stopping: Callable[[], bool]
) -> None:
    """Have ``on_death(reason)`` called if ``task`` ends by itself (an exception escaped it, or it
    returned while not ``stopping()``) rather than by being cancelled or stopped; the loops are written
    never to, so this is a last resort."""

    def done(finished: asyncio.Task[None]) -> None:
        if finished.cancelled() or (stopping() and finished.exception() is None):
            return
        exc = finished.exception()
        reason = f"{what} ended" if exc is None else f"{what} ended: {type(exc).__name__}: {exc}"
        logger.critical("%s; this process no longer does that work until it restarts", reason, exc_info=exc)
        on_death(reason)

    task.add_done_callback(done)


async def cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it has really ended (a cancel that arrives as the task's own
    awaitable completes can be dropped by code it runs, as 3.11's ``wait_for`` does: cancel again). A
    cancellation of the caller propagates."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.1)
    if not task.cancelled() and task.exception() is not None:
        logger.debug("%s ended with %r", task.get_name(), task.exception())


async def stop_within(task: asyncio.Task[None], grace: float) -> None:
    """Wait for a loop asked to stop (its stop flag set, its sleep interrupted) to end at its next
    boundary; cancel it if it has not within ``grace`` seconds. A cancellation of the caller propagates
    (and cancels the loop: nobody will wait for it)."""
    try:
        await asyncio.wait([task], timeout=grace)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.done():
        logger.warning("%s did not stop within %.1fs; cancelling it", task.get_name(), grace)
    await cancel_and_wait(task)


class Loop:
    """A background loop: rounds until ``stop``, each surviving any exception (logged by ``recover``,
    then a back-off), its end by itself reported to ``on_death``.

    A subclass gives ``round`` (one round; returns how long to pause before the next) and may change
    ``pause`` (how the pause waits: by default until ``wake`` or the time is up), ``recover`` (what a
    failed round does and how long the loop then waits) or ``run`` (the whole loop)."""

    log: logging.Logger = logger
    doing = "a background loop"
    """What a round does, for the log (``"<doing> failed ...; retrying in 1.0s"``)."""
    retry_base = 1.0
    """The back-off after the first failure in a row (doubled for each next one, at most ``BACKOFF_CAP``)."""

    def __init__(self, *, name: str, what: str, on_death: Callable[[str], None] | None = None) -> None:
        self.name = name
        """The task's name."""
        self.what = what
        """What the loop is, for the CRITICAL line if it ends by itself (``"<what> ended"``)."""
        self.on_death = on_death
        """Told why if the loop ends by itself (the worker marks itself unhealthy)."""
        self.stopping = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self.stopping = False
        self._task = asyncio.create_task(self.run(), name=self.name)
        if self.on_death is not None:
            watch(self._task, self.what, self.on_death, lambda: self.stopping)

    async def stop(self, grace: float | None = None) -> None:
        """Ask the loop to stop at its next boundary and wait for it: cancelled at once with no
        ``grace`` (a loop whose rounds leave nothing half done), else after ``grace`` seconds. A
        cancellation of the caller propagates."""
        self.stopping = True
        self.wake()
        task, self._task = self._task, None
        if task is None:
            return
        if grace is None:
            await cancel_and_wait(task)
        else:
            await stop_within(task, grace)

    def abort(self) -> None:
        """End at once, waiting for nothing (a cancelled ``App.close``)."""
        self.stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """End the current pause now."""
        self._wake.set()

    # -- the rounds --------------------------------------------------------------------------------
    async def run(self) -> None:
        failures = 0
        while not self.stopping:
            try:
                pause = await self.round()
                failures = 0
            except Exception as exc:
                failures += 1
                pause = await self.recover(exc, failures)
            if self.stopping:
                break
            await self.pause(pause)

    async def round(self) -> float:
        raise NotImplementedError

    async def recover(self, exc: Exception, failures: int) -> float:
        """After a failed round (``failures`` in a row): say so; return the pause before the next."""
        retry_in = backoff(failures, self.retry_base)
        failed(self.log, self.doing, exc, retry_in)
        return retry_in

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if woken; at least one turn of the event loop (a loop whose rounds
        ask for no pause must not keep it from everything else)."""
        if seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
        else:
            await asyncio.sleep(0)
        self._wake.clear()
