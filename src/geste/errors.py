"""Every error geste raises, in one tree, so callers can catch exactly what they mean.

```
GesteError
├── ConfigurationError          bad options given to App / RetryPolicy / a decorator
│   ├── InvalidScheduleError    a bad cron expression, time zone or policy of a schedule
│   └── TransactionUnusableError  connection= that geste cannot write in (not asyncpg, no transaction,
│                                  SQLite)
├── AppNotOpenError             an operation that needs the database before `async with app:`
├── UnknownWorkflowError        no workflow registered under that name
├── SerializationError          a value that cannot be stored as JSON (or read back)
│   └── PayloadTooLargeError    an encoded value larger than App(max_payload_bytes=...)
├── StorageError                the database failed or is not usable
│   ├── StorageTimeout          a statement got no answer within command_timeout (connection dropped)
│   ├── NotAGesteDatabaseError  the file / schema holds something that is not geste's
│   └── SchemaVersionError      written by a newer geste than this one
├── ScheduleNotFoundError       no schedule of that name (pause / resume / delete_schedule)
├── InstanceNotFoundError       no instance with that id
│   └── RunNotFoundError        no kept run of that number (runs end with ctx.continue_as_new)
├── InstanceStateError          an operator action its status refuses (retry of an instance not failed)
│   └── InstanceLeasedError     resume of an instance a live worker holds, without force=True
├── InstanceAlreadyExistsError  reserved for callers that ask start() to refuse an existing id
│   └── QueueDeduplicated       a start onto a queue whose dedup id an unfinished instance holds
├── ResultTimeout               handle.result(timeout=...) ran out (also a builtins.TimeoutError)
├── StateTimeout                handle.wait_state(timeout=...) ran out (also a builtins.TimeoutError)
├── StateEndedError             handle.wait_state() of an instance that ended: no newer value will come
├── IdleTimeout                 geste.testing: instances still busy when the wait for them ran out
├── WorkflowFailed              handle.result() of a failed instance; .error describes the cause
├── WorkflowCancelled           handle.result() of a cancelled instance
│   └── WorkflowTimeout         its deadline passed (start(timeout=... / deadline=...)): cancelled for it
├── NonDeterminismError         replay met a step that differs from the recorded history
│   └── HistoryCorruptedError   a recorded row geste cannot read (not JSON, wrong shape, a gap)
├── ActivityError               a recorded activity error whose exception type cannot be rebuilt
├── ActivityTimeout             one attempt of an activity ran past RetryPolicy(timeout=...)
│   └── ActivityHeartbeatTimeout  an attempt gave no ctx.heartbeat() within its heartbeat_timeout
├── ActivityCancelled           the recorded outcome of an activity attempt a cancel (or deadline) cut short
├── EventTimeout                ctx.wait_event(..., timeout=...) ran out
├── ReceiveTimeout              ctx.receive(..., timeout=...) ran out
└── ChildWorkflowError          a child workflow awaited by its parent failed or was cancelled
```

Driver exceptions never escape raw: storage backends map them at their boundary with ``raise ... from``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActivityCancelled",
    "ActivityError",
    "ActivityHeartbeatTimeout",
    "ActivityTimeout",
    "AppNotOpenError",
    "ChildWorkflowError",
    "ConfigurationError",
    "EventTimeout",
    "GesteError",
    "HistoryCorruptedError",
    "IdleTimeout",
    "InstanceAlreadyExistsError",
    "InstanceLeasedError",
    "InstanceNotFoundError",
    "InstanceStateError",
    "InvalidScheduleError",
    "NonDeterminismError",
    "NotAGesteDatabaseError",
    "PayloadTooLargeError",
    "QueueDeduplicated",
    "ReceiveTimeout",
    "ResultTimeout",
    "RunNotFoundError",
    "ScheduleNotFoundError",
    "SchemaVersionError",
    "SerializationError",
    "StateEndedError",
    "StateTimeout",
    "StorageError",
    "StorageTimeout",
    "StreamClosedError",
    "TransactionUnusableError",
    "UnknownWorkflowError",
    "WorkflowCancelled",
    "WorkflowFailed",
    "WorkflowTimeout",
]


class GesteError(Exception):
    """Base class of every error raised by geste itself."""


class ConfigurationError(GesteError, ValueError):
    """An option has a value geste cannot work with; raised at construction, never later."""


class InvalidScheduleError(ConfigurationError):
    """A schedule cannot be made as given: a bad cron expression, an unknown time zone, an unknown
    ``missed`` or ``overlap`` policy, or a workflow that takes arguments other than the tick."""


class TransactionUnusableError(ConfigurationError):
    """A start, event or message given ``connection=`` cannot be written in that connection's
    transaction: it is not an asyncpg connection (a ``Pool.acquire()`` one is), it is closed, it is not
    inside a transaction (geste never commits a user's connection: outside one, each statement would
    commit on its own), or the App is on SQLite, which offers no writes in a user's transaction
    (docs/transactions.md). Nothing was written."""


class ScheduleNotFoundError(GesteError, LookupError):
    """No schedule of this name exists in the database."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no schedule named {name!r}")
        self.name = name


class AppNotOpenError(GesteError, RuntimeError):
    """The App is not open: use ``async with app:`` (or ``await app.open()``) first."""


class UnknownWorkflowError(GesteError, LookupError):
    """No workflow is registered under this name in this App."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no workflow named {name!r} is registered")
        self.name = name


class SerializationError(GesteError, TypeError):
    """A value could not be encoded as JSON, or decoded into the declared type."""


class PayloadTooLargeError(SerializationError):
    """An encoded value is larger than the configured limit; nothing was written."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(what, size, limit)  # the args rebuild it from a recorded step (and unpickle it)
        self.what = what
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        return f"{self.what} is {self.size} bytes once encoded, over the limit of {self.limit} bytes"


class StorageError(GesteError):
    """The database failed, went away, or cannot be used."""


class StorageTimeout(StorageError):
    """A statement got no answer within the storage's ``command_timeout``: the server is overloaded,
    or the connection is dead without a word (a half-open TCP connection after a network partition).
    geste drops that connection at once; the operation's outcome is unknown, as after any lost
    connection (a step commit not acknowledged is not assumed done: the lease decides)."""


class NotAGesteDatabaseError(StorageError):
    """The database holds tables that geste did not create; geste refuses to touch it."""


class SchemaVersionError(StorageError):
    """The schema was written by a newer geste; upgrade geste rather than risk the data."""

    def __init__(self, found: int, supported: int) -> None:
        super().__init__(
            f"database schema version {found} is newer than this geste supports ({supported}); upgrade geste"
        )
        self.found = found
        self.supported = supported


class InstanceNotFoundError(GesteError, LookupError):
    """No workflow instance has this id."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"no workflow instance with id {instance_id!r}")
        self.instance_id = instance_id


class RunNotFoundError(InstanceNotFoundError):
    """The instance has no kept run of this number: the runs kept are those it ended with
    ``ctx.continue_as_new`` (``app.runs``); its current run is read without a number."""

    def __init__(self, instance_id: str, run: int) -> None:
        GesteError.__init__(self, instance_id, run)  # the args rebuild it from a recorded error
        self.instance_id = instance_id
        self.run = run

    def __str__(self) -> str:
        return f"workflow instance {self.instance_id!r} has no kept run {self.run}"


class InstanceStateError(GesteError):
    """The instance's state does not allow this operator action: a retry of an instance that is not
    ``failed`` (or whose compensations ran), a resume of a finished one. Nothing was written."""

    def __init__(self, instance_id: str, status: str, message: str) -> None:
        super().__init__(message)
        self.instance_id = instance_id
        self.status = status


class InstanceLeasedError(InstanceStateError):
    """A live worker holds the instance's lease (it is running it): ``resume`` leaves it alone unless
    given ``force=True``. ``worker_id`` names the holder."""

    def __init__(self, instance_id: str, status: str, worker_id: str) -> None:
        super().__init__(
            instance_id,
            status,
            f"workflow instance {instance_id!r} is held by worker {worker_id!r}, which is alive; "
            "force=True (geste resume --force) breaks its lease",
        )
        self.worker_id = worker_id


class InstanceAlreadyExistsError(GesteError):
    """An instance with this id exists already (raised only when the caller asked to refuse)."""


class QueueDeduplicated(InstanceAlreadyExistsError):
    """A start onto ``queue`` with ``dedup_id`` (``options(..., on_duplicate="raise")``, or a child
    start) found an unfinished instance of the queue holding that id, ``instance_id``: nothing was
    started. Once that instance ends, the id is free again."""

    def __init__(self, queue: str, dedup_id: str, instance_id: str) -> None:
        super().__init__(queue, dedup_id, instance_id)  # the args rebuild it from a recorded error
        self.queue = queue
        self.dedup_id = dedup_id
        self.instance_id = instance_id

    def __str__(self) -> str:
        return (
            f"queue {self.queue!r}: dedup id {self.dedup_id!r} is held by the unfinished instance "
            f"{self.instance_id!r}"
        )


class ResultTimeout(GesteError, TimeoutError):
    """The instance did not finish within the time given to ``handle.result()``."""


class StateTimeout(GesteError, TimeoutError):
    """No value of the key newer than ``after`` was published within the time given to
    ``handle.wait_state()``."""


class StateEndedError(GesteError):
    """``handle.wait_state()`` of an instance that has ended (completed, failed or cancelled) with no value
    of the key newer than ``after``: none will come. Its last value, if any, is still read by
    ``get_state``."""

    def __init__(self, instance_id: str, key: str, status: str) -> None:
        super().__init__(instance_id, key, status)
        self.instance_id = instance_id
        self.key = key
        self.status = status

    def __str__(self) -> str:
        return f"instance {self.instance_id} ended ({self.status}) with no newer value of {self.key!r}"


class IdleTimeout(GesteError, TimeoutError):
    """``geste.testing``: instances were still running when the (real-time) wait for them to wait again,
    finish or fail ran out: an activity that does not return, a workflow awaiting something outside
    geste. The message names them."""


class WorkflowFailed(GesteError):
    """The workflow ended with an error; ``error`` holds its recorded type, message and traceback."""

    def __init__(self, instance_id: str, error: dict[str, Any]) -> None:
        super().__init__(
            f"workflow instance {instance_id!r} failed: {error.get('type')}: {error.get('message')}"
        )
        self.instance_id = instance_id
        self.error = error


class WorkflowCancelled(GesteError):
    """The workflow was cancelled; raised inside it at a step boundary, and by ``handle.result()``."""


class WorkflowTimeout(WorkflowCancelled, TimeoutError):
    """The workflow's deadline (``start(..., timeout=...)`` or ``deadline=...``) passed: the instance was
    cancelled for it (its status is ``cancelled``, its compensations ran) and this is its recorded error.
    Raised inside the workflow where the cancel is delivered, and by ``handle.result()``. A subclass of
    ``WorkflowCancelled``: code that handles a cancel handles a deadline the same way."""


class NonDeterminismError(GesteError):
    """Replaying the workflow reached a step that differs from the one recorded at this position.

    The code changed under a running instance (or depends on something that is not recorded). The
    instance is left as it is, for an operator to decide.
    """

    def __init__(self, seq: int, expected: str, found: str) -> None:
        super().__init__(seq, expected, found)  # the args rebuild it from a recorded error
        self.seq = seq
        self.expected = expected
        self.found = found

    def __str__(self) -> str:
        return (
            f"non-deterministic replay at step {self.seq}: history has {self.expected}, "
            f"the code now asks for {self.found}"
        )


class HistoryCorruptedError(NonDeterminismError):
    """A recorded history row cannot be what geste wrote: its payload is not JSON or not of its step's
    shape, its kind is unknown, or a step is missing below later ones (a row removed by hand).

    Handled like its base: the instance ends ``failed`` with this error and its history as it is; the
    row is never rewritten. ``seq`` is the position of the row (or of the missing one).
    """

    def __init__(self, instance_id: str, seq: int, problem: str) -> None:
        GesteError.__init__(self, instance_id, seq, problem)  # the args rebuild it from a recorded error
        self.instance_id = instance_id
        self.seq = seq
        self.problem = problem
        self.expected = "a row geste can read"
        self.found = problem

    def __str__(self) -> str:
        return (
            f"history of workflow instance {self.instance_id!r} is corrupted at step {self.seq}: "
            f"{self.problem}"
        )


class ActivityError(GesteError):
    """An activity error recorded in history whose original exception type cannot be rebuilt."""

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback


class ActivityTimeout(GesteError, TimeoutError):
    """One attempt of an activity ran longer than its policy's ``timeout``."""


class ActivityHeartbeatTimeout(ActivityTimeout):
    """One attempt of an activity declared with ``heartbeat_timeout`` went that long without calling
    ``ctx.heartbeat()``: taken for stuck, it is failed (its task cancelled; a ``def`` activity's thread is
    left to finish, its result ignored) and retried by the activity's policy, like any ``ActivityTimeout``."""


class ActivityCancelled(GesteError):
    """A cancel of the workflow (or its deadline) reached a running attempt of this activity: the attempt's
    task was cancelled (``asyncio.CancelledError`` inside it), no further attempt runs, and this is the
    step's recorded outcome. The workflow itself sees ``WorkflowCancelled`` (``WorkflowTimeout``) there."""


class EventTimeout(GesteError, TimeoutError):
    """No matching event arrived before the wait's timeout."""


class ReceiveTimeout(GesteError, TimeoutError):
    """No message arrived on the channel before the receive's timeout."""


class ChildWorkflowError(GesteError):
    """A child workflow (``ctx.start_child``) that its parent awaited failed or was cancelled.

    Raised in the parent by ``handle.result()`` / ``ctx.run_child``, recorded in the parent's history, so
    a replay raises it again. ``child_id`` and ``workflow_name`` name the child; ``status`` is
    ``"failed"`` or ``"cancelled"``; ``error`` is the child's recorded error (``type``, ``message``, ...),
    ``error_type`` and ``error_message`` its two main fields. A parent may catch it and go on.
    """

    def __init__(self, child_id: str, workflow_name: str, status: str, error: dict[str, Any] | None) -> None:
        self.child_id = child_id
        self.workflow_name = workflow_name
        self.status = status
        self.error = dict(error or {})
        self.error_type = str(self.error.get("type", "WorkflowCancelled" if status == "cancelled" else ""))
        self.error_message = str(self.error.get("message", ""))
        super().__init__(
            f"child workflow {workflow_name!r} ({child_id!r}) {status}: "
            f"{self.error_type}: {self.error_message}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.child_id, self.workflow_name, self.status, self.error))


class StreamClosedError(GesteError):
    """``ctx.write_stream`` to a stream this workflow closed with ``ctx.close_stream``: nothing after the
    close is read, so the write is refused rather than lost (docs/streams.md)."""
