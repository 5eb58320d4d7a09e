"""The storage interface: the domain operations the engine needs, each one transaction.

Every write that runs under a lease names the lease (its ``Commit``); a backend applies it only while that
lease is still held (``LeaseLost`` otherwise), so a worker that lost an instance can never write into its
history.
Timestamps are Unix seconds (float) supplied by the caller, so a test clock drives the whole engine.
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

from .._models import Status
from .._schedules import QUEUE_LIMIT
from .._status import QueueStats
from ..errors import TransactionUnusableError
from ._listen import Listening


class LeaseLost(Exception):
    """The instance's lease is no longer ours (expired and taken over); stop without writing."""


@dataclass(frozen=True, slots=True)
class Lease:
    instance_id: str
    lease_id: str


@dataclass(frozen=True, slots=True)
class InstanceRow:
    instance_id: str
    workflow_name: str
    status: Status
    input: str
    result: str | None
    error: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    run_at: float | None
    locked_by: str | None
    lock_expires_at: float | None
    cancel_requested: bool
    steps: int
    run: int = 1
    """The number of its current run: 1, then one more at each ``continue_as_new`` (schema 15)."""
    last_worker: str | None = None
    """The worker that last gave its lease back (schema 13), where the query reads it (``get_instance``):
    a worker tells a lease taken over from one its own run gave back by it."""
    parent_id: str | None = None
    """The instance that started it with ``ctx.start_child`` (schema 16), where the query reads it."""
    parent_close: str | None = None
    """A child's parent-close policy (schema 16), ``"cancelled"`` once its parent's end cancelled it
    (``get_instance``)."""
    deadline: float | None = None
    """When the instance is cancelled for its deadline (schema 17; None: none), where the query reads it
    (``get_instance``, ``list_instances``, ``list_children``)."""


class HistoryRow(NamedTuple):
    """One recorded step (``_steps`` says what its ``payload`` holds by ``kind``). A named tuple, not a
    frozen dataclass: a replay builds one per recorded step, four times sooner so."""

    seq: int
    kind: str
    name: str
    payload: str | None
    is_error: bool = False
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Commit:
    """The rows a run writes under its lease, at ``now``, renewing the lease until ``lock_expires_at``
    (None where the write ends the lease: ``suspend``, ``finish``).

    Every step-writing method takes one: what such a write carries is said in one place, so what it must
    carry later (a fencing token, a sequence number) is added once, not to each method of each backend.
    """

    lease: Lease
    records: Sequence[HistoryRow]
    now: float
    lock_expires_at: float | None = None


class Renewed(set[str]):
    """What ``Storage.renew`` returns: the instance ids whose lease is still ours (a set of them), and in
    ``cancel_requested`` those of them a cancel was requested for: the renewal is how a worker learns of
    a cancel of what it runs on every backend (PostgreSQL also notifies the holder at once)."""

    def __init__(self, kept: Iterable[str] = (), cancel_requested: Iterable[str] = ()) -> None:
        super().__init__(kept)
        self.cancel_requested = frozenset(cancel_requested)


@dataclass(frozen=True, slots=True)
class Claim:
    """An instance this worker now holds: what the engine needs to run it."""

    lease: Lease
    workflow_name: str
    input: str
    status: Status
    created_at: float
    cancel_requested: bool
    history: tuple[HistoryRow, ...] | None = None
    """The instance's history, when the backend read it in the claim's own round trip."""
    run_at: float | None = None
    """When it became (or becomes: claimed a little early, see ``due_before``) runnable."""
    lease_expired_at: float | None = None
    """When the previous lease ran out, if the claim took over an expired lease (its worker died or
    stalled) rather than a free instance; None otherwise."""
    history_after: int = 0
    """``history`` holds the rows after this step only: the claim was told the worker knows the rows up
    to it (``known``: a run it keeps in memory, ``engine.cache``); 0: the whole history."""
    run: int = 1
    """The number of the instance's current run (schema 15): ``input`` and ``history`` are that run's."""
    deadline: float | None = None
    """When the instance's deadline passes (schema 17; None: none): then its run cancels it."""
    awaited: tuple[str, ChildState] | None = None
    """The id and end of the child whose end the instance's suspension awaited, when the claim read it
    (schema 21): the child had ended, and the parent goes on without reading it. None otherwise."""
    runner: str | None = None
    """Its ``runner`` (schema 27): the name and the version of a pinned instance, None for the others (and
    in a queue's claim, which does not read it). A wake-up of the instance is routed by ``route_key``."""

    @property
    def route_key(self) -> str:
        """What its wake-ups are routed by, as the notifications name it: ``coalesce(runner, workflow_name)``
        (only the workers of a pinned instance's version register its runner)."""
        return self.runner or self.workflow_name


class Claims(list[Claim]):
    """The instances one claim took, and when the next one becomes runnable.

    ``next_run_at`` is the earliest ``run_at`` after the claim's ``due_before`` among instances nobody
    holds (None: none), read in the claim's own round trip, so that a worker that took less than it asked
    for knows how long it may sleep without a second query. A claim by ids (``claim_ids``) reads no other
    instance: its ``later`` gives, for each instance named that nobody holds and that is not due yet, its
    ``run_at`` (a clock behind the database's, a timer rung early): the worker's local timer for it.
    """

    __slots__ = ("later", "next_run_at")

    def __init__(
        self,
        claims: Sequence[Claim] = (),
        next_run_at: float | None = None,
        later: dict[str, float] | None = None,
    ) -> None:
        super().__init__(claims)
        self.next_run_at = next_run_at
        self.later = {} if later is None else later


@dataclass(frozen=True, slots=True)
class NewInstance:
    instance_id: str
    workflow_name: str
    input: str
    now: float
    deadline: float | None = None
    """When the instance is cancelled for its deadline (``start(timeout=... / deadline=...)``)."""
    queue: str | None = None
    """The queue it is started onto (schema 20): it waits, queued, until a claim of the queue admits it."""
    priority: int = 0
    """Its place in the queue's line: lower first, then first come first served."""
    dedup_id: str | None = None
    """At most one unfinished instance of the queue holds it: a second start returns the first."""
    partition_key: str = ""
    """Its partition of the queue (schema 22): the queue's per-partition limits count it with the others
    of this key; "" is the partition of the starts that give none."""
    version: str | None = None
    """The version of the code that starts it (schema 27: ``App(version=...)``, the starting App's)."""
    pinned: bool = False
    """Only workers of ``version`` claim it (its workflow's ``versioning="pinned"``, schema 27)."""
    trace_context: str | None = None
    """The W3C trace context of the span that started it (schema 30; docs/tracing.md); None: no tracing."""


@dataclass(frozen=True, slots=True)
class PatchRow:
    """A patch id of a workflow as ``patches`` reads it (schema 27): the markers of it in the current runs'
    histories, when the first was recorded, and the unfinished instances of the workflow that started
    before it and lack it (its old runs)."""

    workflow_name: str
    patch_id: str
    first_at: float
    marked: int
    old_runs: int


@dataclass(frozen=True, slots=True)
class QueueRow:
    """A declared queue's limits (schema 20; docs/design.md "Queues"): ``concurrency``, its admitted and
    unfinished instances at most across the cluster; ``worker_concurrency``, those one worker admitted
    and runs now, at most; ``rate_limit``, admissions at most in any window of ``rate_period`` seconds,
    across the cluster; ``partition_concurrency`` and ``partition_rate_limit`` (schema 22), the same two
    per partition key. None: no limit."""

    name: str
    concurrency: int | None = None
    worker_concurrency: int | None = None
    rate_limit: int | None = None
    rate_period: float | None = None
    partition_concurrency: int | None = None
    partition_rate_limit: int | None = None


@dataclass(frozen=True, slots=True)
class QueueState:
    """A queue as ``list_queues`` reads it (schema 20): its stored limits (None, ``declared`` False, when
    only instances name it), its queued and admitted instances counted up to the cap asked, the admissions
    of its current rate window, and the start of its oldest queued instance."""

    name: str
    declared: bool
    concurrency: int | None
    worker_concurrency: int | None
    rate_limit: int | None
    rate_period: float | None
    queued: int
    admitted: int
    rate_used: int
    oldest_queued_at: float | None


@dataclass(frozen=True, slots=True)
class ChildState:
    """What a parent reads of a child (``start_child``, ``take_child_or_suspend``; schema 16)."""

    workflow_name: str
    status: Status
    result: str | None
    error: str | None
    parent_id: str | None


@dataclass(frozen=True, slots=True)
class DedupHeld:
    """A child start onto a queue refused (``start_child``, schema 20): the unfinished instance
    ``instance_id`` of the queue holds the child's dedup id."""

    instance_id: str


@dataclass(frozen=True, slots=True)
class NewEvent:
    event_id: str
    event_type: str
    data: str
    source: str | None
    target_instance_id: str | None
    extensions: str | None
    now: float


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    event_id: str
    event_type: str
    data: str
    source: str | None
    extensions: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class EventWait:
    """Take the oldest matching event not yet delivered to the instance, or wait for one.

    The events it may take are those sent after the instance was created, as the database orders them
    (above the instance's ``event_floor``), never by comparing clocks."""

    event_type: str
    match: dict[str, Any] | None
    deadline: float | None
    outcome_seq: int


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A worker's row in the registry (``geste_workers``); ``listener`` is JSON text."""

    worker_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    running: int
    concurrency: int
    listener: str | None
    stopped_at: float | None = None
    lock_timeout: float | None = None
    """The worker's own ``lock_timeout`` (None in rows written before schema version 7)."""
    workflows: str | None = None
    """The workflow names it registers, a JSON array (None in rows written before schema version 9)."""
    health: str | None = None
    """None while all its background loops run; else why one ended (schema version 9)."""
    relay: bool = False
    """Whether it runs an outbox relay (schema version 13: outbox notifications go to one relay)."""
    queues: str | None = None
    """The queues it serves, a JSON array (None in rows written before schema version 23): a start onto a
    queue is routed to one of the live workers that serve it."""
    version: str | None = None
    """The version of its code (schema 27, ``App(version=...)``); ``workflows`` then holds its claim keys
    (``runner_key``): each workflow's name, and the name with this version for a pinned one."""


@dataclass(frozen=True, slots=True)
class RetryRow:
    """One operator retry of an instance (``geste_retries``): the rows it removed, the error it cleared."""

    instance_id: str
    retry: int
    retried_at: float
    from_seq: int
    error: str | None
    failed_at: float | None
    removed: tuple[HistoryRow, ...]


@dataclass(frozen=True, slots=True)
class RunRow:
    """A run of an instance that ended by continuing (``geste_runs``, schema 15); its history rows are
    read apart (``get_run_history``)."""

    instance_id: str
    run: int
    input: str
    started_at: float
    ended_at: float
    steps: int
    ended_as: str
    """``continued``: the one way a run ends while its instance goes on."""


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    """What ``retry_instance`` found and did: ``instance`` as it is afterwards (None: no such instance),
    ``record`` the retry, None when refused (not ``failed``, or ``compensated``: compensations ran)."""

    instance: InstanceRow | None
    record: RetryRow | None = None
    compensated: bool = False
    last_retry: tuple[int, float] | None = None
    """When refused: the number and time of the instance's latest retry, if any (a concurrent one)."""


@dataclass(frozen=True, slots=True)
class ResumeOutcome:
    """What ``resume_instance`` found (``before``; None: no such instance) and did (``after``; None when
    refused: the instance is finished, or a live worker holds its lease and ``force`` was not given)."""

    before: InstanceRow | None
    after: InstanceRow | None = None
    holder_alive: bool = False
    """The lease was held (unexpired) by a worker heard from recently and not stopped."""
    lease_broken: bool = False


@dataclass(frozen=True, slots=True)
class MigrationStep:
    """A schema migration being applied (``Storage.on_migration``): the ``index``-th of ``total`` pending,
    announced before (``done`` False) and after it ran."""

    version: int
    name: str
    index: int
    total: int
    done: bool


class Suspension(Enum):
    SUSPENDED = "suspended"
    CANCEL_REQUESTED = "cancel_requested"


@dataclass(frozen=True, slots=True)
class StepResult:
    cancel_requested: bool


@dataclass(frozen=True, slots=True)
class NewOutboxEvent:
    """An event a workflow emits (``ctx.send_event``), stored with the step that emits it."""

    event_id: str
    step_seq: int
    event_type: str
    source: str
    subject: str | None
    data: str | None  # JSON text; None: no data


@dataclass(frozen=True, slots=True)
class OutboxClaim:
    """An outbox event a relay claimed for one delivery attempt (``attempts`` counts this one)."""

    event_id: str
    instance_id: str
    step_seq: int
    event_type: str
    source: str
    subject: str | None
    data: str | None
    attempts: int
    created_at: float
    claim_id: str


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An outbox event as the operator sees it (``app.outbox()``)."""

    event_id: str
    instance_id: str
    step_seq: int
    event_type: str
    source: str
    subject: str | None
    data: str | None
    status: str
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    created_at: float
    updated_at: float
    delivered_at: float | None
    claimed_by: str | None


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to publish on a channel; with ``target_instance_id`` (``send_to``) for that one only."""

    message_id: str
    channel: str
    data: str
    sender_instance_id: str | None
    target_instance_id: str | None
    now: float


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    message_id: str
    channel: str
    data: str
    sender_instance_id: str | None
    target_instance_id: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class MessageWait:
    """Take the next message of ``channel`` for the instance (subscribed in ``mode``), or wait for one."""

    channel: str
    mode: str
    deadline: float | None
    outcome_seq: int


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What ``channel_publish`` did: ``stored`` False when the message id existed already or the target
    does not exist (``target_missing``: nothing was written); ``woken``: the receivers made runnable."""

    stored: bool
    woken: list[str]
    target_missing: bool = False
    cancel_requested: bool = False


@dataclass(frozen=True, slots=True)
class StreamWrite:
    """One item of a write batch to a stream (schema 26): ``writer`` is its idempotency key, unique in
    the stream (a second write of it writes nothing); ``item`` the stored JSON, None to close the stream."""

    instance_id: str
    key: str
    writer: str
    item: str | None


@dataclass(frozen=True, slots=True)
class StreamHead:
    """A stream of an instance as the viewer lists it: its key, how many positions it used, closed."""

    key: str
    length: int
    closed: bool


@dataclass(frozen=True, slots=True)
class InstanceFilter:
    """Which instances a page or a count covers; ``created_from`` is inclusive, ``created_to`` exclusive."""

    workflow_name: str | None = None
    status: Status | None = None
    created_from: float | None = None
    created_to: float | None = None


@dataclass(frozen=True, slots=True)
class InstanceSummary:
    """One line of a list of instances: no result or error, only the head of the input."""

    instance_id: str
    workflow_name: str
    status: Status
    created_at: float
    updated_at: float
    finished_at: float | None
    locked_by: str | None
    cancel_requested: bool
    steps: int
    input_head: str
    """The first ``INPUT_HEAD`` characters of the input's JSON text."""


INPUT_HEAD = 200


@dataclass(frozen=True, slots=True)
class EventWaitRow:
    """An instance's registered wait for an event (``match`` as JSON text); ``since``: when it was
    registered (the registering worker's clock: for operators, not for matching)."""

    event_type: str
    match: str | None
    since: float
    deadline: float | None


@dataclass(frozen=True, slots=True)
class SubscriptionRow:
    """An instance's subscription to a channel; ``waiting_since`` is set while it waits in ``receive``."""

    channel: str
    mode: str
    cursor_seq: int
    waiting_since: float | None
    created_at: float


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A channel message as stored, with the instance that took it (direct and competing messages)."""

    message_id: str
    channel: str
    data: str
    sender_instance_id: str | None
    target_instance_id: str | None
    created_at: float
    claimed_by: str | None


@dataclass(frozen=True, slots=True)
class InstanceExtras:
    """What an instance's history does not hold: what it waits for now, and what became of the
    messages it published and the events it emitted (those still stored)."""

    timers: tuple[tuple[int, float], ...]
    """``(seq, expires_at)`` of its timers, soonest first."""
    event_wait: EventWaitRow | None
    subscriptions: tuple[SubscriptionRow, ...]
    outbox: tuple[OutboxRow, ...]
    messages: tuple[MessageRow, ...]


@dataclass(frozen=True, slots=True)
class ChoreTurn:
    """What ``chore_take`` found: whether this worker took the chore's round, when the next round is
    due (``next_at``) and who holds the chore (took the last round; None: given back)."""

    taken: bool
    next_at: float
    holder: str | None


@dataclass(frozen=True, slots=True)
class CleanupPosition:
    """Where a bounded cleanup stopped, so that the next goes on from there: the last subscription read
    (``(channel, instance_id)``) and the last message read (``(created_at, seq)``), in the order each is
    walked; the start (the default) before the first."""

    subscription: tuple[str, str] = ("", "")
    message: tuple[float, int] = (-math.inf, 0)


CLEANUP_START = CleanupPosition()
"""A cleanup's position before its first round: every walk from the start."""


@dataclass(frozen=True, slots=True)
class Cleanup:
    """What one ``channel_cleanup`` did: the rows it deleted, whether a statement read a full batch (more
    may be due at once), and where the next one goes on."""

    deleted: int
    full: bool
    position: CleanupPosition


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one batch of ``prune_instances`` did: the instances it read (at most its limit), those
    nothing still needed (``free``), the instances it deleted and the rows it deleted in all (theirs
    included), and where the next batch goes on: after the last instance read, ``(finished_at,
    instance_id)``, or ``PRUNE_START`` once it read fewer than its limit (the end was reached)."""

    examined: int
    free: int
    instances: int
    deleted: int
    position: tuple[float, str]

    @property
    def full(self) -> bool:
        """Whether the batch stopped at its limit rather than at the end of what is due."""
        return self.position != PRUNE_START


PRUNE_START: tuple[float, str] = (-math.inf, "")
"""The retention's position before its first batch: before every finished instance."""


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """A row of ``geste_schedules`` (schema 19): a schedule's definition and where it stands."""

    name: str
    workflow_name: str
    cron: str
    timezone: str
    missed: str
    overlap: str
    pass_tick: bool
    paused: bool
    next_tick: float
    last_tick: float | None = None
    last_instance_id: str | None = None
    queue: str | None = None
    """(schema 24) The queue each tick's instance is started onto, and its ``priority`` there."""
    priority: int = 0
    waiting: int = 0
    """(schema 24) Its ticks waiting for its last run to end (``overlap="queue"``)."""


@dataclass(frozen=True, slots=True)
class ScheduleStart:
    """An instance a schedule's tick starts: the tick (Unix seconds) and the instance."""

    tick: float
    instance: NewInstance


@dataclass(frozen=True, slots=True)
class Fired:
    """What ``schedule_fire`` wrote: the instances it created, and the ticks it put to wait for the
    schedule's last run to end (``overlap="queue"``). The other ticks of its ``starts`` were skipped."""

    created: list[str]
    waiting: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WaitingTick:
    """A schedule with ticks waiting (schema 24): its row, its oldest waiting tick, and whether its last
    run has ended (the tick can be released: ``schedule_release``)."""

    schedule: ScheduleRow
    tick: float
    ready: bool


@dataclass(frozen=True, slots=True)
class StateRow:
    """One value of a key an instance published (``geste_state``, schema 25)."""

    key: str
    version: int
    value: str
    run: int
    seq: int
    created_at: float


@dataclass(frozen=True, slots=True)
class StateSet:
    """What a ``state_set`` wrote: the value's version, and whether a cancel was requested meanwhile."""

    version: int
    cancel_requested: bool


class TransactionWrites(abc.ABC):
    """The writes geste can make on a user's own connection inside the user's transaction
    (``Storage.in_transaction``): a start, an event, a message, and the read a send to one instance
    needs. They commit, notifications and all, with the user's transaction, or vanish with its rollback;
    nothing here commits or rolls back."""

    @abc.abstractmethod
    async def create_instance(self, new: NewInstance) -> tuple[InstanceRow, bool]:
        """``Storage.create_instance`` without a lease: the instance is left for a worker to claim once
        the transaction commits (its notification goes out with that commit)."""

    @abc.abstractmethod
    async def get_instance(self, instance_id: str) -> InstanceRow | None:
        """The instance as the user's transaction sees it (one it started itself included)."""

    @abc.abstractmethod
    async def send_event(self, event: NewEvent) -> tuple[bool, list[str]]:
        """``Storage.send_event``."""

    @abc.abstractmethod
    async def channel_publish(self, message: NewMessage) -> PublishResult:
        """``Storage.channel_publish`` from outside a workflow."""


class Storage(abc.ABC):
    """One database holding instances, their histories, timers, event waits and events."""

    url: str
    on_migration: Callable[[MigrationStep], None] | None = None
    """Called before and after each migration ``open`` applies (``geste migrate`` shows them)."""

    def _announce(self, step: MigrationStep) -> None:
        if self.on_migration is not None:
            self.on_migration(step)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, check the schema is geste's and not newer, apply pending migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def terminate(self) -> None:
        """Close at once, waiting for nothing (a cancelled ``App.close``): connections are dropped, a
        transaction in flight is rolled back by the database."""

    @abc.abstractmethod
    async def schema_version(self) -> int: ...

    async def listen(
        self,
        channels: Sequence[str],
        on_notification: Callable[[str, str], None],
        on_lost: Callable[[], None],
        *,
        url: str | None = None,
    ) -> Listening:
        """LISTEN on ``channels`` over a dedicated connection (to ``url``, default this database's);
        ``on_notification(channel, payload)`` for each notification, ``on_lost()`` if the server closes
        it. Only PostgreSQL has LISTEN/NOTIFY."""
        from ..errors import ConfigurationError

        raise ConfigurationError(f"{type(self).__name__} has no LISTEN/NOTIFY")

    # -- instances ---------------------------------------------------------------------------------
    @abc.abstractmethod
    async def create_instance(
        self, new: NewInstance, *, lease: Lease | None, worker_id: str | None, lock_expires_at: float | None
    ) -> tuple[InstanceRow, bool]:
        """Insert the instance unless its id exists; return the row and whether it was created.

        With ``lease`` the new instance is created already claimed by ``worker_id`` (a local start).
        """

    @abc.abstractmethod
    async def get_instance(self, instance_id: str) -> InstanceRow | None: ...

    def in_transaction(self, connection: object) -> TransactionWrites:
        """The writes of a start, an event or a message on ``connection``, a connection of the user's
        inside the user's transaction (docs/transactions.md); ``TransactionUnusableError`` when this
        backend offers none (SQLite) or the connection cannot be used."""
        raise TransactionUnusableError(
            f"{type(self).__name__} offers no writes in a transaction of the caller's (connection=): "
            "only PostgreSQL does (docs/transactions.md)"
        )

    async def database_clock(self) -> float | None:
        """The database's own time in Unix seconds (``statement_timestamp()`` on PostgreSQL, the host's
        time on SQLite), to compare a process's clock with; None where a storage cannot tell."""
        return None

    # -- result() waiters of another process (schema 14) -------------------------------------------
    async def watch_result(self, instance_id: str, *, waiter: str, process: str, expires_at: float) -> bool:
        """Register the ``result()`` call ``waiter`` of the App whose worker id is ``process``, so that the
        instance's end notifies it (``geste_workflow_resumable`` with a ``finished`` field), until
        ``expires_at`` (a second call renews it). Written only while the instance has not ended; returns
        whether it was. Locks nothing but its own row. The caller reads the instance again afterwards: an
        end that committed before this did is seen by that read, one that commits after is notified.
        Only PostgreSQL notifies: elsewhere ``result()`` reads the instance and never calls this."""
        from ..errors import ConfigurationError

        raise ConfigurationError(f"{type(self).__name__} has no LISTEN/NOTIFY: result() reads the instance")

    async def unwatch_results(self, waits: Sequence[tuple[str, str]]) -> None:  # noqa: B027
        """Forget the registrations ``(instance_id, waiter)`` of ``result()`` calls that stopped waiting
        (the end of an instance forgets its own). Nothing to do without LISTEN/NOTIFY."""

    async def result_waiters_cleanup(self, now: float, *, limit: int) -> int:
        """Delete at most ``limit`` registrations of ``result()`` calls that expired before ``now`` (their
        waiter died without forgetting them), oldest first; return how many. None without LISTEN/NOTIFY."""
        return 0

    # -- streams (schema 26) -------------------------------------------------------------------------
    @abc.abstractmethod
    async def stream_write(self, writes: Sequence[StreamWrite], now: float) -> list[tuple[str, str]]:
        """Append ``writes`` in one transaction, in order (each stream's new items take its next
        positions): an item whose writer its stream holds already, or whose stream is closed, is dropped.
        Returns the streams written that a reader of another process waits for (``stream_watch``): the
        caller notifies them (``stream_notify``) after this returned. Empty without LISTEN/NOTIFY."""

    @abc.abstractmethod
    async def stream_read(
        self, instance_id: str, key: str, start: int, limit: int
    ) -> list[tuple[int, str | None]]:
        """At most ``limit`` items of the stream from position ``start`` on, in order, as (position,
        stored JSON; None for the close)."""

    @abc.abstractmethod
    async def stream_instance_status(self, instance_id: str) -> Status | None:
        """The status of the instance a reader reads (an ended one closed its streams), None if none."""

    @abc.abstractmethod
    async def stream_list(self, instance_id: str, *, limit: int = 100) -> list[StreamHead]:
        """The streams of an instance, by key."""

    async def stream_watch(  # noqa: B027
        self, instance_id: str, key: str, *, reader: str, process: str, expires_at: float
    ) -> None:
        """Register the reader ``reader`` of the process ``process`` as waiting for the stream until
        ``expires_at`` (a second call renews it): writes to it then notify. Only with LISTEN/NOTIFY."""

    async def stream_unwatch(self, readers: Sequence[tuple[str, str, str]]) -> None:  # noqa: B027
        """Forget the registrations ``(instance_id, key, reader)`` of readers that stopped waiting."""

    async def stream_readers_cleanup(self, now: float, *, limit: int) -> int:
        """Delete at most ``limit`` reader registrations that expired before ``now``; return how many."""
        return 0

    async def stream_notify(self, payloads: Sequence[str]) -> None:  # noqa: B027
        """Send one ``geste_stream_written`` notification per payload (each names streams written)."""

    @abc.abstractmethod
    async def list_instances(
        self,
        *,
        workflow_name: str | None = None,
        status: Status | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[InstanceRow]: ...

    @abc.abstractmethod
    async def get_history(self, instance_id: str) -> list[HistoryRow]: ...

    @abc.abstractmethod
    async def request_cancel(self, instance_id: str, now: float) -> InstanceRow | None:
        """Cancel an instance that never ran at once; otherwise flag it and make it runnable."""

    # -- operator actions --------------------------------------------------------------------------
    @abc.abstractmethod
    async def retry_instance(self, instance_id: str, now: float) -> RetryOutcome:
        """Make a failed instance run again from its failed step, in one transaction: the history rows
        from ``retry_cut`` on are removed (and kept in ``geste_retries`` with the error), its outcome
        is cleared and it is runnable now (notified).
        Refused, writing nothing, unless it is ``failed`` and none of its compensations ran. Concurrent
        retries serialise on the instance's row: exactly one of them applies."""

    @abc.abstractmethod
    async def list_retries(self, instance_id: str) -> list[RetryRow]:
        """The retries of an instance, oldest first."""

    @abc.abstractmethod
    async def list_runs(self, instance_id: str) -> list[RunRow]:
        """The runs of an instance that ended by continuing, oldest first (not its current run)."""

    @abc.abstractmethod
    async def get_run_history(self, instance_id: str, run: int) -> list[HistoryRow]:
        """The history rows of run ``run`` of an instance, ended by continuing (none: no such run)."""

    @abc.abstractmethod
    async def resume_instance(
        self, instance_id: str, now: float, *, lock_timeout: float, force: bool
    ) -> ResumeOutcome:
        """Make an unfinished instance runnable now, in one transaction (notified): its ``run_at`` moves
        to ``now``, and a lease still held is broken when its worker is not alive (stopped, unknown, or
        not heard from recently: ``_status.is_alive`` with the reader's ``lock_timeout``) or ``force``
        is given. Refused, writing nothing, for a
        finished instance and for a lease held by a live worker without ``force``."""

    # -- leases ------------------------------------------------------------------------------------
    @abc.abstractmethod
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
    ) -> Claims:
        """Atomically take up to ``limit`` instances of the named ``workflows`` (those the worker
        registers; none: nothing is read), runnable by ``due_before`` (default ``now``), of a status this
        version knows, whose lease is free or expired at ``now``; with them, the next ``run_at`` after
        ``due_before`` among those workflows' free instances. Reads at most ``limit`` rows of each of two
        index ranges per name (the free instances due, the leases that ran out), never a lease still
        held. A claimed instance's ``run_at`` becomes its lease's expiry (its take-over time); the claim
        reports the ``run_at`` it had. Each claim carries its history, or, for an instance in ``known``
        (instance id: the last step the worker holds in memory), the rows after that step only
        (``Claim.history_after``): a cached run's wake-up reads one row, not its whole history."""

    @abc.abstractmethod
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
    ) -> Claims:
        """``claim`` restricted to the named instances (a routed wake-up: a notification, a local timer):
        of those, the ones of the named ``workflows`` that ``claim`` could take, by primary key, whatever
        else is due; ``Claims.later`` holds the run_at of those nobody holds that are not due yet. Reads
        the rows named, no other."""

    @abc.abstractmethod
    async def queue_upsert(self, queue: QueueRow, now: float) -> None:
        """Write a declared queue's limits (App open, before its worker claims)."""

    @abc.abstractmethod
    async def queue_claim(
        self, worker_id: str, now: float, lock_expires_at: float, limit: int, *, queue: str
    ) -> Claims:
        """Admit and claim up to ``limit`` queued instances of ``queue``, in its line's order (priority,
        then start), never more than its global limit and its rate leave free: exact under concurrent
        claimers (the count of the slots in use and the rate's window are read under the queue's row
        lock, in a snapshot taken after it; on SQLite, inside the one writer's transaction). On a queue
        with partition limits, each partition's too (under its own row lock), the partitions taking turns
        (docs/design.md "Queues", "Partitions"). Reads one probe of the line when it is empty.
        ``Claims.next_run_at``: when the rate (or a partition's) has room again, if it is what stopped
        the claim (None otherwise)."""

    @abc.abstractmethod
    async def queue_runnable(
        self,
        queues: Sequence[str],
        now: float,
        limit: int,
        *,
        due_before: float | None = None,
        workflows: Sequence[str],
    ) -> tuple[list[str], float | None]:
        """For a worker that serves no instance outside a queue (``serve_unqueued=False``): the ids of at
        most ``limit`` instances admitted by ``queues`` and unfinished, of the named ``workflows``, that
        ``claim`` could take (free and due by ``due_before``, default ``now``, or held by a lease that ran
        out at ``now``), earliest first, and the earliest ``run_at`` after ``due_before`` among the free
        ones (None: none). Reads the queues' admitted entries (their slots in use); locks nothing: the
        worker takes them with ``claim_ids``."""

    async def route_wakeups(self, wakeups: Sequence[tuple[str, str]], *, avoid: str) -> int:
        """Hand wake-ups routed to this worker (``(instance_id, workflow_name)``) on to the other workers,
        naming this one as the worker to ``avoid`` (it is full or stopping); return how many were sent.
        Without LISTEN/NOTIFY nothing can be handed on: the other workers' polls find them."""
        return 0

    async def hand_on_queue(self, queue: str, key: str, *, avoid: str) -> bool:
        """Hand a queue's backlog on to another live worker serving it (this one, ``avoid``, is full): one
        notification, routed by ``key``. False without LISTEN/NOTIFY: the other workers' polls find it."""
        return False

    @abc.abstractmethod
    async def renew(
        self,
        leases: Sequence[Lease],
        lock_expires_at: float,
        *,
        now: float | None = None,
        heartbeats: Mapping[str, str] | None = None,
    ) -> Renewed:
        """Extend the given leases; return the instance ids whose lease is still ours, and (in the same
        statement: no extra round trip) which of them have a cancel requested. An instance's
        take-over time (its ``run_at`` while held: when a claim may look at it) moves to the new expiry
        too when it is less than half a lease ahead of ``now`` (always without ``now``), so that the
        claims never read a lease its worker keeps renewing (``_decisions.takeover_threshold``).

        ``heartbeats`` (schema 18): by instance id, the activity heartbeat details to store (a JSON object,
        ``heartbeat_details`` reads it back), written in the same statement where the lease holds."""

    @abc.abstractmethod
    async def heartbeat_details(self, instance_id: str) -> str | None:
        """The heartbeat details ``renew`` stored for an instance (a JSON object by step key; None: none):
        one read by primary key."""

    @abc.abstractmethod
    async def trace_context(self, instance_id: str) -> str | None:
        """The W3C trace context recorded at the instance's start (schema 30; None: none, or no such
        instance): one read by primary key, at the start of a run when tracing is on (docs/tracing.md)."""

    @abc.abstractmethod
    async def release(self, leases: Sequence[Lease], now: float, *, run_at: float | None = None) -> None:
        """Give leases back; the instances are runnable again at ``run_at`` (default: at once)."""

    # -- steps under a lease -----------------------------------------------------------------------
    @abc.abstractmethod
    async def record(self, commit: Commit, *, status: Status | None = None) -> StepResult:
        """Append the commit's rows and renew its lease (to ``lock_expires_at``), in one transaction."""

    @abc.abstractmethod
    async def suspend(
        self, commit: Commit, *, run_at: float | None, timer: tuple[int, float] | None = None
    ) -> Suspension:
        """Append the commit's rows, register the timer, mark the instance waiting and release it.

        Refuses (``CANCEL_REQUESTED``, lease kept) when a cancellation is pending, so it is delivered.
        """

    @abc.abstractmethod
    async def continue_as_new(self, commit: Commit, *, input: str, last_seq: int) -> Suspension:
        """End the instance's current run and start the next under the same id, in one transaction: the
        run's history rows and the commit's (its last, the ``continue_as_new`` row) move to
        ``geste_run_history`` with a summary in ``geste_runs``; the instance gets ``input``, the next run
        number, an empty history, and is released, runnable now (``pending``). Its timers and event wait
        go; its subscriptions stay with their cursors (not waiting); its event deliveries and event floor
        stay; its outbox events not yet sent are renumbered below the next run's steps (``step_seq`` minus
        ``last_seq``, the run's last step), so that they still go first. Costs O(rows of the run).

        Refuses (``CANCEL_REQUESTED``, nothing written, lease kept) when a cancellation is pending, so it
        is delivered at the continue instead.
        """

    @abc.abstractmethod
    async def take_event_or_suspend(self, commit: Commit, wait: EventWait) -> StoredEvent | Suspension | None:
        """Deliver the oldest matching event (recorded at ``wait.outcome_seq``) after the commit's rows, or
        suspend until one (the lease released rather than renewed).

        ``None`` (nothing written) when no event is there and the deadline has passed.

        Checking for the event and registering the wait are one transaction, so an event sent in
        between is never missed.
        """

    @abc.abstractmethod
    async def finish(
        self,
        commit: Commit,
        *,
        status: Status,
        result: str | None = None,
        error: str | None = None,
        cancel_children: Sequence[str] = (),
    ) -> None:
        """Append the commit's rows, store the outcome, release the instance and forget its waits.

        ``cancel_children``: children of the instance whose cancellation its end requests (the
        parent-close policies, docs/child-workflows.md), in the same transaction: those still running
        and not asked already are flagged as ``flag_cancel`` flags one (a free one made runnable, a held
        one's holder told) and their ``parent_close`` set to ``'cancelled'``. None: nothing more is
        written or read."""

    # -- child workflows (schema 16) ------------------------------------------------------------------
    made_runnable: Callable[[], None] | None = None
    """Set by the App: called after a write of this process made an instance runnable that no
    notification announces (SQLite: a child's end waking its parent), so the local worker looks now."""

    @abc.abstractmethod
    async def start_child(
        self, commit: Commit, child: NewInstance, *, parent_close: str
    ) -> ChildState | DedupHeld | StepResult:
        """Create ``child`` (free, runnable; queued when it names a queue) as a child of the commit's
        instance and append the commit's rows, in one transaction; a ``StepResult`` when done (whether a
        cancel of the parent is requested, as every commit says). When ``child``'s id is taken, nothing
        is written and the instance that has it is returned; when its queue's dedup id is held by an
        unfinished instance, nothing is written and that instance's id is (``DedupHeld``)."""

    @abc.abstractmethod
    async def take_child_or_suspend(self, commit: Commit, child_id: str) -> ChildState | Suspension:
        """The child's state if it has ended (nothing written: the caller records it), else the commit
        suspends the instance (no timer) until the child's end wakes it. The check and the suspension
        are ordered against the child's end (docs/design.md, "Child workflows"): no end is missed."""

    @abc.abstractmethod
    async def list_children(self, instance_id: str, *, limit: int = 1000) -> list[InstanceRow]:
        """The children of an instance, oldest first (``geste_instances_by_parent``)."""

    # -- events ------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def send_event(self, event: NewEvent) -> tuple[bool, list[str]]:
        """Store an event (once per ``event_id``) and wake the instances waiting for it.

        Returns whether it was new and the ids of the woken instances.
        """

    def observe_group_commits(self, observe: Callable[[str, int], None]) -> None:  # noqa: B027
        """Have ``observe(kind, size)`` called for each group-commit batch sent (kind ``step``: step
        commits, ``end``: ends); a backend without group commit (SQLite) never calls it."""

    # -- wake-ups ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def next_run_at(self) -> float | None:
        """The earliest time an unlocked instance becomes runnable (for a precise poller)."""

    # -- workers and status ------------------------------------------------------------------------
    @abc.abstractmethod
    async def upsert_worker(self, worker: WorkerRow) -> None:
        """Register a worker or refresh its heartbeat (one statement); clears ``stopped_at``."""

    @abc.abstractmethod
    async def heartbeat(self, worker: WorkerRow, *, peers_since: float) -> list[WorkerRow]:
        """``upsert_worker``, and in the same transaction the other workers heard from since
        ``peers_since`` and not stopped, by id: what a worker routes its wake-ups over."""

    @abc.abstractmethod
    async def mark_worker_stopped(self, worker_id: str, now: float) -> None:
        """Record a graceful stop (``stopped_at``; running 0)."""

    @abc.abstractmethod
    async def prune_workers(self, before: float) -> int:
        """Forget workers not heard from since ``before``; return how many."""

    @abc.abstractmethod
    async def list_workers(self, limit: int = 1000) -> list[WorkerRow]:
        """Registered workers, most recent heartbeat first."""

    @abc.abstractmethod
    async def runnable_workflows(self, now: float, *, cap: int, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` workflow names with instances runnable at ``now``, each with how many (counted
        up to ``cap``), by name: one index probe per distinct name with a ``run_at``, then at most ``cap``
        index entries per name."""

    @abc.abstractmethod
    async def list_leases(self, now: float, limit: int) -> list[tuple[str, str, str, float]]:
        """``(instance_id, workflow_name, locked_by, lock_expires_at)`` of up to ``limit`` leases held
        at ``now``, soonest to expire first."""

    @abc.abstractmethod
    async def queue_stats(self, now: float) -> QueueStats:
        """Counts per status, runnable now, held leases (per worker), age of the oldest waiting instance;
        the outbox's pending and dead events and the age of its oldest pending one.

        Read in one snapshot; every query goes through an index of ``geste_instances`` (its cost grows
        with the instances of the statuses counted, the finished ones included) or a partial index of
        ``geste_outbox`` (its cost grows with the pending and dead events, not the delivered ones).
        """

    @abc.abstractmethod
    async def list_queues(self, now: float, *, cap: int, limit: int, levels: int) -> list[QueueState]:
        """Up to ``limit`` queues by name: those declared (``geste_queues``) and those that queued or
        admitted instances name. Each count reads at most ``cap`` entries of its partial index
        (``geste_instances_queued``, ``geste_instances_queue_admitted``); the queue names of instances
        come from a loose scan of both (one probe per distinct name); the oldest queued instance is the
        oldest of the first ``levels`` priorities of the line (one probe per priority). Read in one
        statement: the cost grows with the queues and the cap, never with the instances."""

    # -- published state (schema 25) ---------------------------------------------------------------
    @abc.abstractmethod
    async def state_set(self, commit: Commit, *, key: str, value: str, run: int, seq: int) -> StateSet:
        """``record`` plus the next version of ``key``'s value (stored JSON), in one transaction; on
        PostgreSQL a ``geste_workflow_resumable`` with a ``state`` field too, only when a ``wait_state``
        call of another process than the writer's is registered for the key (``watch_state``)."""

    @abc.abstractmethod
    async def get_state(
        self, instance_id: str, key: str, *, version: int | None = None
    ) -> tuple[Status, StateRow | None] | None:
        """The instance's status and the latest value of ``key`` (or its value ``version``; None: no such
        value), in one read by primary key; None when the instance does not exist."""

    @abc.abstractmethod
    async def list_state(self, instance_id: str, *, limit: int) -> list[StateRow]:
        """The latest value of each of the instance's keys (at most ``limit`` keys, by key): for the
        viewer and the HTTP API. Reads every value of the instance's keys (the primary key's prefix)."""

    async def watch_state(
        self, instance_id: str, key: str, *, waiter: str, process: str, expires_at: float
    ) -> bool:
        """Register the ``wait_state`` call ``waiter`` of the App whose worker id is ``process`` for the
        values of ``key`` (a row of ``geste_result_waiters`` with its ``state_key``): a ``set_state`` of
        the key notifies it, and so does the instance's end, which deletes it. As ``watch_result``:
        written only while the instance has not ended (returns whether it was), renewed by a second call,
        forgotten by ``unwatch_results``, expired rows deleted by ``result_waiters_cleanup``. Only
        PostgreSQL notifies: elsewhere ``wait_state`` reads and never calls this."""
        from ..errors import ConfigurationError

        raise ConfigurationError(f"{type(self).__name__} has no LISTEN/NOTIFY: wait_state() reads")

    # -- the transactional outbox ------------------------------------------------------------------
    @abc.abstractmethod
    async def outbox_record(
        self, commit: Commit, event: NewOutboxEvent, *, status: Status | None = None
    ) -> StepResult:
        """``record`` plus the outbox row of ``event``, in one transaction (notified when it is new)."""

    @abc.abstractmethod
    async def outbox_claim(
        self, relay_id: str, claim_id: str, now: float, claim_expires_at: float, limit: int, window: int
    ) -> list[OutboxClaim]:
        """Of the first ``window`` due events (soonest first), take up to ``limit`` whose claim is free or
        expired and that are the first of their instance not done (no earlier pending or dead event);
        count the attempt. The others of the window leave the due range: held (``next_attempt_at``
        None) behind an event nobody sends, or moved to ``claim_expires_at`` behind one being sent."""

    @abc.abstractmethod
    async def outbox_mark_delivered(self, event_id: str, claim_id: str, now: float) -> tuple[bool, bool]:
        """Mark a claimed event delivered, and make the next pending event of its instance due if it was
        held. Returns whether the claim was still ours, and whether the instance has a later pending
        event (which this may have made claimable)."""

    @abc.abstractmethod
    async def outbox_mark_failed(
        self, event_id: str, claim_id: str, now: float, error: str, next_attempt_at: float | None
    ) -> tuple[bool, bool]:
        """Record a failed attempt: pending again at ``next_attempt_at``, or dead when it is None; the
        next pending event of its instance is held behind it. Returns what ``outbox_mark_delivered``
        returns."""

    @abc.abstractmethod
    async def outbox_release(self, claims: Sequence[tuple[str, str]], now: float) -> None:
        """Give back ``(event_id, claim_id)`` claims (a relay stopping): claimable again at once."""

    @abc.abstractmethod
    async def outbox_next_attempt_at(self) -> float | None:
        """The earliest ``next_attempt_at`` of a pending event nobody sends (held events left out; one
        waiting behind another but not held yet counts: a claim round holds it), or the expiry of a
        claim, if sooner."""

    @abc.abstractmethod
    async def outbox_list(
        self, *, status: str | None = None, instance_id: str | None = None, limit: int = 100
    ) -> list[OutboxRow]:
        """Outbox events, newest first."""

    @abc.abstractmethod
    async def outbox_retry(self, event_id: str, now: float) -> bool:
        """Make a dead event pending again (attempts from zero); False when no dead event has that id."""

    @abc.abstractmethod
    async def outbox_discard(self, event_id: str, now: float) -> bool:
        """Give a pending or dead event up (``discarded``: never sent again) and make the next pending
        event of its instance due; False when no pending or dead event has that id."""

    # -- channels ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def channel_subscribe(self, commit: Commit, *, channel: str, mode: str) -> StepResult:
        """Subscribe the instance to ``channel`` from its last message on, with the commit (the step's
        rows), in one transaction (a subscription left by an unrecorded attempt is replaced)."""

    @abc.abstractmethod
    async def channel_publish(self, message: NewMessage, *, commit: Commit | None = None) -> PublishResult:
        """Store a message (once per ``message_id``) and make its waiting receivers runnable: every
        broadcast subscriber, one idle competing subscriber, or the target of a direct message.

        With ``commit`` (a workflow's ``ctx.publish``) its lease is renewed (at the message's ``now``) and
        its rows (the step) written in the same transaction; without, it is a publish from outside a
        workflow. A ``target_instance_id`` that does not exist writes nothing.
        """

    @abc.abstractmethod
    async def channel_take_or_suspend(
        self, commit: Commit, wait: MessageWait
    ) -> StoredMessage | Suspension | None:
        """Take the instance's next message on the channel (recorded at ``wait.outcome_seq``, after the
        commit's rows) or suspend until one is published; subscribes the instance in ``wait.mode`` if it
        is not yet.

        ``None`` (only the waiting mark cleared) when no message is there and the deadline has passed.
        Looking for the message and registering the wait are one transaction, serialised with publishes
        on the same channel, so a message published in between is never missed.
        """

    @abc.abstractmethod
    async def channel_rewake(self, now: float, *, published_before: float, limit: int) -> list[str]:
        """Make runnable the idle competing receivers for which a message older than ``published_before``
        is still unclaimed (a woken receiver that did not take it: cancelled, failed)."""

    @abc.abstractmethod
    async def channel_cleanup(
        self,
        *,
        messages_before: float,
        events_before: float,
        limit: int,
        position: CleanupPosition = CLEANUP_START,
    ) -> Cleanup:
        """One bounded round of retention: of the ``limit`` subscriptions after ``position`` (key order),
        those of finished instances; of the ``limit`` messages published before ``messages_before`` after
        ``position`` (age order), those no subscriber still needs; the ``limit`` oldest events sent before
        ``events_before``, with their deliveries. Each statement reads at most ``limit`` rows of its
        table (and a few index probes per row), whatever the tables hold; the position returned goes on
        after the last subscription and message read, or from the start once the end was reached."""

    # -- the retention of finished instances (schema 29) ------------------------------------------
    @abc.abstractmethod
    async def prune_instances(
        self, before: float, *, limit: int, position: tuple[float, str] = PRUNE_START, apply: bool = True
    ) -> Pruned:
        """One bounded batch of the retention: of the ``limit`` finished instances (completed, failed,
        cancelled) that ended before ``before``, after ``position`` in (finished_at, instance_id) order,
        delete those nothing still needs with every row of theirs (history, runs, timers, waits, event
        deliveries, subscriptions, delivered or discarded outbox rows, retries, result waiters, state,
        streams). Kept: an instance whose parent or one of whose children is unfinished, or whose outbox
        holds a pending or dead event. ``apply`` False: nothing is deleted (a dry run; ``free`` counts
        what would be). One transaction, reading ``limit`` instances and a few index probes each, whatever
        the tables hold."""

    # -- chores ------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def chore_take(
        self, chore: str, worker_id: str, now: float, *, interval: float, grace: float
    ) -> ChoreTurn:
        """Take the round of ``chore`` due at ``now`` for ``worker_id`` (the next then due at ``now +
        interval``), if it is due and this worker holds the chore, nobody does, or its holder is ``grace``
        late; one statement on the chore's row, by key. Returns the row as it is (taken or not)."""

    @abc.abstractmethod
    async def chore_release(self, worker_id: str) -> None:
        """Give back the chores ``worker_id`` holds (it stops): another worker takes each at its next
        round, without waiting for it to be late."""

    # -- cron schedules (schema 19) ----------------------------------------------------------------
    @abc.abstractmethod
    async def schedule_upsert(self, row: ScheduleRow, now: float) -> None:
        """Write a schedule's definition; keep its next tick while its cron and time zone are the same
        (``row.next_tick`` otherwise, and for a new one); a paused schedule stays paused."""

    @abc.abstractmethod
    async def schedules_due(self, now: float, *, limit: int) -> list[ScheduleRow]:
        """The unpaused schedules whose next tick is at or before ``now``, earliest first: one range scan
        of the due index, reading only those due."""

    @abc.abstractmethod
    async def schedule_next_tick(self) -> float | None:
        """The earliest next tick of the unpaused schedules (None: none): the first entry of the index."""

    @abc.abstractmethod
    async def schedule_fire(
        self,
        name: str,
        *,
        expected: float,
        next_tick: float,
        starts: Sequence[ScheduleStart],
        overlap: str,
        now: float,
        queue_limit: int = QUEUE_LIMIT,
    ) -> Fired | None:
        """One transaction: move the schedule's next tick from ``expected`` to ``next_tick`` and create
        the ``starts`` (ids derived from the ticks: an existing one is left as it is), in order. None: the
        next tick had moved already (another worker's round did it), nothing written. ``overlap``:
        ``"skip"``, nothing is created while the last instance the schedule started has not finished
        (the ticks are skipped, the next tick moved all the same); ``"queue"``, while it has not
        finished, or ticks wait already, each tick is put to wait (``geste_schedule_waiting``, at most
        ``queue_limit``: the others are skipped), and at most one is created (it becomes the last run);
        ``"alongside"``, each is created."""

    @abc.abstractmethod
    async def schedules_waiting(self, *, limit: int) -> list[WaitingTick]:
        """The unpaused schedules with ticks waiting (``geste_schedules_waiting``), those whose last run has
        ended first, then by name; at most ``limit``."""

    @abc.abstractmethod
    async def schedule_release(self, name: str, *, tick: float, start: NewInstance, now: float) -> bool:
        """One transaction, under the schedule's row lock: if the schedule is not paused, its last run has
        ended and ``tick`` waits, take the tick off the waiting ones and create ``start`` (its instance),
        which becomes the schedule's last. False: nothing written (another worker released it, or the
        last run is unfinished again)."""

    @abc.abstractmethod
    async def get_schedule(self, name: str) -> ScheduleRow | None: ...

    @abc.abstractmethod
    async def list_schedules(self, *, limit: int) -> list[ScheduleRow]:
        """The schedules by name, at most ``limit``."""

    @abc.abstractmethod
    async def schedule_pause(self, name: str, now: float) -> bool:
        """Pause the schedule; False: there is none of that name."""

    @abc.abstractmethod
    async def schedule_resume(self, name: str, next_tick: float, now: float) -> bool:
        """Unpause the schedule, its next tick ``next_tick``; False: there is none of that name."""

    @abc.abstractmethod
    async def schedule_delete(self, name: str) -> bool:
        """Delete the schedule and its waiting ticks (its instances stay); False: there was none of that
        name."""

    # -- the web viewer ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def page_instances(
        self,
        which: InstanceFilter,
        *,
        before: tuple[float, str] | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[InstanceSummary]:
        """Up to ``limit`` instances, newest first (by ``created_at``, then ``instance_id``): those just
        older than the key ``before``, or just newer than the key ``after``, or the newest.

        A keyset page: one index range scan of ``limit`` rows however deep it is (an index per filter
        combination, migration 6), and no instance is skipped or shown twice when others are added.
        """

    @abc.abstractmethod
    async def count_instances(self, which: InstanceFilter, *, cap: int) -> dict[Status, int]:
        """Instances per status (``which.status`` ignored), each count stopping at ``cap``: at most
        ``cap`` index entries read per status, however many instances there are."""

    @abc.abstractmethod
    async def patches(self, *, limit: int) -> list[PatchRow]:
        """Up to ``limit`` patch ids (by workflow, then id) with their markers and old runs (``PatchRow``):
        reads every marker of the current runs (``geste_history_patches``) and, per patch, the unfinished
        instances of its workflow started before it (``geste patches``; docs/design.md "Versions")."""

    @abc.abstractmethod
    async def workflow_names(self, *, limit: int) -> list[str]:
        """The distinct workflow names of the instances, sorted (one index probe per name)."""

    @abc.abstractmethod
    async def instance_extras(
        self, instance_id: str, *, event_ids: Sequence[str] = (), message_ids: Sequence[str] = ()
    ) -> InstanceExtras:
        """The instance's timers, event wait and subscriptions, and the outbox rows and channel messages
        of the given ids (the events it emitted and the messages it published)."""


RETRY_SAFE_KINDS = frozenset({"activity", "now", "uuid", "random", "patch"})
"""Rows a retry may remove to have them taken again: activities (at least once, as after a crash) and the
deterministic helpers. A received event or message, a publication, an outbox event or a subscription left
traces outside the history (a delivery, a cursor, a claim, a stored message) that a re-run would not find
as it left them."""


def retry_cut(rows: Sequence[HistoryRow]) -> int:
    """The first ``seq`` a retry of a failed instance runs again (one past the last row: none).

    A failed activity (``is_error``: its last attempt failed) runs again with every row after it when all
    those rows are activities or helpers that started before it ended: they ran alongside it (a
    ``gather``), so none of them can be the workflow's handling of its error. The earliest such activity
    is the cut; at the end of a history, a failed activity always is. One after which the workflow went
    on (it caught the error) is kept: its code handled it, and the failure is the workflow's own, so
    nothing is cut and the replay runs the workflow's current code from the end of its history.
    """
    numbered = sorted((r for r in rows if type(r.seq) is int), key=lambda r: r.seq)
    cut = numbered[-1].seq + 1 if numbered else 1
    if len(numbered) < len(rows):  # a step number changed by hand (SQLite): the replay reports it
        return cut
    latest = -math.inf  # the latest start among the rows after the one looked at
    safe = True  # the rows after it are all activities or helpers
    for row in reversed(numbered):
        if row.kind == "activity" and row.is_error and safe:
            end = _activity_end(row)
            if end is not None and latest < end:
                cut = row.seq
        safe = safe and row.kind in RETRY_SAFE_KINDS
        latest = max(latest, row.created_at)
    return cut


def _activity_end(row: HistoryRow) -> float | None:
    """When an activity's last attempt ended (its row's start plus duration); None if unreadable."""
    try:
        body = json.loads(row.payload or "")
        end = float(body["started_at"]) + float(body["duration"])
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    return end if math.isfinite(end) else None
