"""Retry policies for activities: how often, how long to wait between attempts, what not to retry."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .errors import ConfigurationError


def seconds(value: float | timedelta, *, what: str, allow_zero: bool = True) -> float:
    """A duration given as seconds or a ``timedelta``, checked to be a finite non-negative number."""
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    else:
        raise ConfigurationError(f"{what} must be a number of seconds or a timedelta, not {value!r}")
    if result != result or result in (float("inf"), float("-inf")) or result < 0:
        raise ConfigurationError(f"{what} must be a finite duration >= 0, not {value!r}")
    if not allow_zero and result == 0:
        raise ConfigurationError(f"{what} must be greater than 0")
    return result


def workflow_deadline(
    timeout: float | timedelta | None, deadline: datetime | None, now: float
) -> float | None:
    """When a workflow started at ``now`` with ``timeout`` (a duration > 0) and/or ``deadline`` (an aware
    datetime) is cancelled for it: the earlier of the two (Unix seconds), None for neither. Bad values
    raise ``ConfigurationError`` before anything is written."""
    at: float | None = None
    if timeout is not None:
        at = now + seconds(timeout, what="workflow timeout", allow_zero=False)
    if deadline is not None:
        if not isinstance(deadline, datetime):
            raise ConfigurationError(f"workflow deadline must be a datetime, not {deadline!r:.80}")
        if deadline.tzinfo is None or deadline.utcoffset() is None:
            raise ConfigurationError(
                f"workflow deadline must be an aware datetime (with a tzinfo, e.g. UTC), not {deadline!r}"
            )
        moment = deadline.timestamp()
        at = moment if at is None else min(at, moment)
    return at


def positive_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{what} must be a positive int, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When an activity attempt fails, whether and when to try again.

    The delay before attempt ``n + 1`` is ``initial_interval * backoff ** (n - 1)``, capped at
    ``max_interval``. ``timeout`` bounds each attempt (``geste.errors.ActivityTimeout``, retried like any
    other error). Errors whose type is in ``non_retryable`` (classes, or dotted or plain type names) fail
    the activity at once.
    """

    max_attempts: int = 3
    initial_interval: float | timedelta = 1.0
    backoff: float = 2.0
    max_interval: float | timedelta = 60.0
    timeout: float | timedelta | None = None
    non_retryable: Sequence[type[BaseException] | str] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or isinstance(self.max_attempts, bool):
            raise ConfigurationError(f"max_attempts must be an int, not {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        seconds(self.initial_interval, what="initial_interval")
        seconds(self.max_interval, what="max_interval")
        if self.timeout is not None:
            seconds(self.timeout, what="timeout", allow_zero=False)
        if (
            not isinstance(self.backoff, int | float)
            or isinstance(self.backoff, bool)
            or not 1 <= self.backoff < float("inf")
        ):
            raise ConfigurationError(f"backoff must be a finite number >= 1, not {self.backoff!r}")
        if isinstance(self.non_retryable, str | type) or not isinstance(self.non_retryable, Collection):
            raise ConfigurationError(
                f"non_retryable must be a list of exception classes or names, not {self.non_retryable!r}"
            )
        for item in self.non_retryable:
            if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, BaseException))):
                raise ConfigurationError(f"non_retryable holds {item!r}: give exception classes or names")

    @property
    def timeout_seconds(self) -> float | None:
        return None if self.timeout is None else seconds(self.timeout, what="timeout")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = seconds(self.initial_interval, what="initial_interval")
        return min(base * self.backoff ** (attempt - 1), seconds(self.max_interval, what="max_interval"))

    def is_retryable(self, exc: BaseException) -> bool:
        for item in self.non_retryable:
            if isinstance(item, str):
                for cls in type(exc).__mro__:
                    if item in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
                        return False
            elif isinstance(exc, item):
                return False
        return True


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)
