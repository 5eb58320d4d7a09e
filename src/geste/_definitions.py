"""What ``@app.workflow`` and ``@app.activity`` turn a user's function into.

A core module: a workflow reaches the client that starts its instances through ``Owner`` (the App), an
activity the workflow context that runs it through ``ActivityCaller``; neither is imported here."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar

from ._queues import (
    OnDuplicate,
    Queue,
    check_on_duplicate,
    check_partition_key,
    check_queue_start,
    queue_name,
)
from ._retry import RetryPolicy, workflow_deadline
from ._serde import Signature
from ._validation import check_name
from ._versions import SEPARATOR, Versioning, check_versioning
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._handle import WorkflowHandle

P = ParamSpec("P")
R = TypeVar("R")


def _check_coroutine_function(fn: Callable[..., Any], what: str) -> None:
    if not inspect.iscoroutinefunction(fn):
        raise ConfigurationError(
            f"{what} {getattr(fn, '__qualname__', fn)!r} must be an `async def` function"
        )
    _check_context_parameter(fn, what)


def _check_context_parameter(fn: Callable[..., Any], what: str) -> None:
    if not callable(fn):
        raise ConfigurationError(f"{what} {fn!r} is not a function")
    if not list(inspect.signature(fn).parameters):
        raise ConfigurationError(f"{what} {fn.__qualname__!r} must take the context as first parameter")


class ActivityCaller(Protocol):
    """What an activity is called with: the calling workflow's context (``geste.WorkflowContext``),
    which records the call as the workflow's next step."""

    def _activity(
        self, activity: Activity[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Coroutine[Any, Any, Any]: ...


class Starter(Protocol):
    """What starts instances of a workflow: the client of the App that registered it."""

    def start_instance(
        self,
        workflow: Workflow[Any, R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        instance_id: str | None,
        timeout: float | timedelta | None = None,
        deadline: datetime | None = None,
        queue: str | None = None,
        priority: int = 0,
        dedup_id: str | None = None,
        partition_key: str = "",
        on_duplicate: OnDuplicate = "return",
        connection: object = None,
    ) -> Awaitable[WorkflowHandle[R]]: ...


class Owner(Protocol):
    """What a workflow is registered with (the App): its ``client`` is read at each start, so that a
    ``WorkflowEnvironment`` re-binding the App to its test database is followed."""

    @property
    def client(self) -> Starter: ...


class Activity(Generic[P, R]):
    """A step with side effects: run at least once, its outcome recorded exactly once.

    Call it from a workflow with the workflow's context first: ``await charge(ctx, order_id)``.

    An ``async def`` function runs on the event loop; a plain ``def`` one (``is_async`` False) in the App's
    thread pool (``App(activity_threads=...)``), so that its blocking calls stall neither the loop nor the
    lease renewal. ``heartbeat_timeout`` (seconds, None: none): an attempt that goes that long without
    ``ctx.heartbeat()`` is failed with ``ActivityHeartbeatTimeout`` and retried by ``retry``.
    """

    def __init__(
        self,
        fn: Callable[Concatenate[Any, P], Awaitable[R]] | Callable[Concatenate[Any, P], R],
        *,
        name: str,
        retry: RetryPolicy,
        heartbeat_timeout: float | None = None,
    ) -> None:
        _check_context_parameter(fn, "activity")
        self.fn = fn
        self.name = check_name(name, "activity")
        self.retry = retry
        self.heartbeat_timeout = heartbeat_timeout
        self.signature = Signature(fn, skip_first=True)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @property
    def fn(self) -> Callable[..., Any]:
        """The function it runs (``geste.testing`` swaps a fake in for a while)."""
        return self._fn

    @fn.setter
    def fn(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self.is_async = inspect.iscoroutinefunction(fn)
        """Whether it runs on the event loop (``async def``), rather than in the thread pool."""

    def __call__(self, ctx: ActivityCaller, /, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        call = getattr(ctx, "_activity", None)  # a WorkflowContext (which this core module does not import)
        if call is None:
            raise TypeError(
                f"activity {self.name!r} is called from a workflow with its context first: "
                f"`await {self.name}(ctx, ...)`"
            )
        coroutine: Coroutine[Any, Any, R] = call(self, args, kwargs)
        return coroutine

    def __repr__(self) -> str:
        return f"<geste.Activity {self.name}>"


class Workflow(Generic[P, R]):
    """A durable function: replayed from its recorded history wherever and whenever it resumes."""

    def __init__(
        self,
        app: Owner,
        fn: Callable[Concatenate[Any, P], Awaitable[R]],
        *,
        name: str,
        versioning: Versioning | str = Versioning.UPGRADING,
    ) -> None:
        _check_coroutine_function(fn, "workflow")
        self.app = app
        self.fn = fn
        self.name = check_name(name, "workflow")
        if SEPARATOR in self.name:
            raise ConfigurationError("a workflow name cannot hold U+001F (it separates a pinned version)")
        self.versioning = check_versioning(versioning)
        """Which workers may run its instances (docs/versioning.md): any (``upgrading``), or only those of
        the version each instance started on (``pinned``)."""
        self.signature = Signature(fn, skip_first=True)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    async def start(self, *args: P.args, **kwargs: P.kwargs) -> WorkflowHandle[R]:
        """Start a new instance with a generated id."""
        return await self.app.client.start_instance(self, args, kwargs, instance_id=None)

    async def start_with_id(
        self, instance_id: str, /, *args: P.args, **kwargs: P.kwargs
    ) -> WorkflowHandle[R]:
        """Start the instance ``instance_id``, or return the existing one: it never runs twice."""
        return await self.app.client.start_instance(self, args, kwargs, instance_id=instance_id)

    def options(
        self,
        *,
        timeout: float | timedelta | None = None,
        deadline: datetime | None = None,
        queue: Queue | str | None = None,
        priority: int = 0,
        dedup_id: str | None = None,
        partition_key: str | None = None,
        on_duplicate: OnDuplicate = "return",
        connection: object = None,
    ) -> WorkflowStarter[P, R]:
        """Start options: ``timeout`` (a duration from the start) and/or ``deadline`` (an aware datetime;
        with both, the earlier counts). When it passes, the instance is cancelled as by ``app.cancel``
        (its compensations run) and ends with ``geste.errors.WorkflowTimeout``. Options are a call of
        their own because the workflow's arguments take every other keyword:
        ``await order.options(timeout=30).start(order_id)``.

        ``queue`` (a ``geste.Queue`` or its name): the instance waits, queued, until a worker serving the
        queue admits it within the queue's limits (docs/queues.md); ``priority``: its place in the line
        (lower first, then first come first served); ``dedup_id``: while an instance of the queue holding
        it is unfinished, a start with it starts nothing and, by ``on_duplicate``, returns that instance's
        handle (``"return"``, the default: ``handle.created`` is False) or raises
        ``geste.errors.QueueDeduplicated`` (``"raise"``), which names the instance holding it. A child
        start (``ctx.start_child``) always raises on a held dedup id: the holder is not its child.
        ``partition_key`` (a customer, a tenant): the queue's per-partition limits count it with the
        other instances of that key (without one, with the others started without one).

        ``connection`` (PostgreSQL: an asyncpg connection inside a transaction of yours, e.g. one from
        your pool in ``async with conn.transaction():``): the instance is written in that transaction,
        so it exists exactly when your transaction commits (the transactional-outbox pattern), and a
        rollback leaves nothing; it is never run before the commit (docs/transactions.md). A connection
        geste cannot use (not asyncpg, not in a transaction, an App on SQLite) raises
        ``geste.errors.TransactionUnusableError`` at the start."""
        workflow_deadline(timeout, deadline, 0.0)  # bad values fail here, before any start
        name = queue_name(queue)
        priority, dedup_id = check_queue_start(name, priority, dedup_id)
        key = check_partition_key(name, partition_key)
        policy = check_on_duplicate(on_duplicate, dedup_id)
        return WorkflowStarter(self, timeout, deadline, name, priority, dedup_id, key, policy, connection)

    def __repr__(self) -> str:
        return f"<geste.Workflow {self.name}>"


class WorkflowStarter(Generic[P, R]):
    """A workflow with start options (``Workflow.options``): its ``start`` and ``start_with_id``."""

    __slots__ = (
        "connection",
        "deadline",
        "dedup_id",
        "on_duplicate",
        "partition_key",
        "priority",
        "queue",
        "timeout",
        "workflow",
    )

    def __init__(
        self,
        workflow: Workflow[P, R],
        timeout: float | timedelta | None,
        deadline: datetime | None,
        queue: str | None = None,
        priority: int = 0,
        dedup_id: str | None = None,
        partition_key: str = "",
        on_duplicate: OnDuplicate = "return",
        connection: object = None,
    ) -> None:
        self.workflow = workflow
        self.timeout = timeout
        self.deadline = deadline
        self.queue = queue
        self.priority = priority
        self.dedup_id = dedup_id
        self.partition_key = partition_key
        self.on_duplicate: OnDuplicate = on_duplicate
        self.connection = connection

    async def start(self, *args: P.args, **kwargs: P.kwargs) -> WorkflowHandle[R]:
        """Start a new instance with a generated id, with these options."""
        workflow = self.workflow
        return await workflow.app.client.start_instance(
            workflow,
            args,
            kwargs,
            instance_id=None,
            timeout=self.timeout,
            deadline=self.deadline,
            queue=self.queue,
            priority=self.priority,
            dedup_id=self.dedup_id,
            partition_key=self.partition_key,
            on_duplicate=self.on_duplicate,
            connection=self.connection,
        )

    async def start_with_id(
        self, instance_id: str, /, *args: P.args, **kwargs: P.kwargs
    ) -> WorkflowHandle[R]:
        """Start the instance ``instance_id`` with these options, or return the existing one (whose
        deadline stays what its start set)."""
        workflow = self.workflow
        return await workflow.app.client.start_instance(
            workflow,
            args,
            kwargs,
            instance_id=instance_id,
            timeout=self.timeout,
            deadline=self.deadline,
            queue=self.queue,
            priority=self.priority,
            dedup_id=self.dedup_id,
            partition_key=self.partition_key,
            on_duplicate=self.on_duplicate,
            connection=self.connection,
        )
