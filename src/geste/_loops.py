"""What every background loop of geste shares: surviving any error, saying so, and stopping cleanly.

A loop (claim, heartbeat, listener, relay, chores) must never end because of one bad row or one
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

from .errors import StorageError

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
