"""The replay check: run recorded histories against the workflows' current code, report what diverges.

Each history is replayed by the engine's own ``WorkflowContext`` and ``Journal``, the ones a worker uses,
so a step is matched exactly as a real resume would match it. The replay stops at the end of the recorded
history: a step the history does not hold raises ``_EndOfHistory`` before anything of it runs (no
activity, no timer, no message, no event; the journal's ``live`` hook), and the journal's storage is a
stand-in that has no database behind it and takes no write. The histories themselves were read
beforehand, read-only (``_histories``). The check needs no App: the workflows and the payload limit.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NoReturn, cast

from .._models import Status, StepKind
from .._retry import seconds
from .._serde import decode, encode
from ..errors import ConfigurationError, HistoryCorruptedError, NonDeterminismError, WorkflowCancelled
from ..storage.base import Commit, HistoryRow, Lease, StepResult, Storage
from .context import WorkflowContext
from .histories import RecordedHistory, Unreadable, history_files, read_database, read_history_file
from .journal import Abandon, ContinuedAsNew, Journal, Suspended
from .run import Engine

if TYPE_CHECKING:
    from .._definitions import Workflow

_DIVERGENCE_TYPES = ("geste.errors.NonDeterminismError", "geste.errors.HistoryCorruptedError")
"""Recorded errors of instances stopped by a divergence: their history ends there, not at their end."""
CONTINUED = "continued as new"
"""How a run kept by ``continue_as_new`` ended (its last row), and how a replay that reaches it ends."""


class ReplayStatus(StrEnum):
    """The verdict on one recorded history."""

    OK = "ok"
    """The current code takes every recorded step (and, for a finished instance, ends as it did)."""
    DIVERGED = "diverged"
    """The code takes another step than the recorded one, or ends elsewhere: a resume would fail."""
    CORRUPTED = "corrupted"
    """The history holds a row geste cannot read (changed by hand, a damaged file)."""
    UNKNOWN_WORKFLOW = "unknown_workflow"
    """An unfinished instance of a workflow the App does not register: nothing could resume it."""
    SKIPPED = "skipped"
    """A finished instance of a workflow the App no longer registers: nothing will run it again."""
    ERROR = "error"
    """The replay itself could not run to a verdict (it did not end within its time limit)."""


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What replaying one recorded history found."""

    instance_id: str
    workflow_name: str
    status: ReplayStatus
    source: str
    """Where the history was read (``<database URL>#<instance id>`` or a file's path)."""
    instance_status: Status | None = None
    """The recorded status of the instance (None when its history could not be read)."""
    steps: int = 0
    """Rows in the recorded history."""
    seq: int | None = None
    """The step where the replay diverged (or the corrupted row's position)."""
    expected: str | None = None
    """What the history holds at ``seq``."""
    found: str | None = None
    """What the current code does at ``seq``."""
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether this history is no reason to hold a deploy (``ok`` or ``skipped``)."""
        return self.status in (ReplayStatus.OK, ReplayStatus.SKIPPED)

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values (what ``geste replay-check --json`` prints)."""
        return {
            "instance_id": self.instance_id,
            "workflow_name": self.workflow_name,
            "status": self.status.value,
            "source": self.source,
            "instance_status": None if self.instance_status is None else self.instance_status.value,
            "steps": self.steps,
            "seq": self.seq,
            "expected": self.expected,
            "found": self.found,
            "message": self.message,
        }

    def describe(self) -> str:
        """One line for a person: the verdict, the instance, and what differs."""
        head = f"{self.status.value.upper():<16} {self.instance_id} ({self.workflow_name})"
        return f"{head}: {self.message}" if self.message else head


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """The verdicts of a replay check, one per history, in the order they were checked."""

    results: tuple[ReplayResult, ...]

    @property
    def ok(self) -> bool:
        """True when no history diverged, was corrupted, failed to replay or lost its workflow."""
        return all(result.ok for result in self.results)

    @property
    def failures(self) -> list[ReplayResult]:
        return [result for result in self.results if not result.ok]

    def counts(self) -> dict[ReplayStatus, int]:
        counts = dict.fromkeys(ReplayStatus, 0)
        for result in self.results:
            counts[result.status] += 1
        return counts

    def summary(self) -> str:
        shown = ", ".join(f"{n} {status.value}" for status, n in self.counts().items() if n)
        count = len(self.results)
        return f"{count} histor{'y' if count == 1 else 'ies'} replayed: {shown or 'none'}"


async def check_replay(
    workflows: Mapping[str, Workflow[Any, Any]],
    *,
    max_payload_bytes: int,
    database_url: str | None = None,
    files: Iterable[str | os.PathLike[str]] | None = None,
    workflow: str | None = None,
    limit: int = 1000,
    timeout: float = 30.0,
    on_result: Callable[[ReplayResult], None] | None = None,
) -> ReplayReport:
    """Replay recorded histories against the current code of ``workflows`` (by name); report each verdict.

    Give either ``database_url`` (a copy of production, say: it is only read, never written; at most
    ``limit`` instances, of ``workflow`` if given, the unfinished ones first) or ``files`` (exported with
    ``export_history``; a folder stands for its ``*.json`` files). Activities are never run: a replay
    stops where its history ends. A result larger than ``max_payload_bytes`` fails as it would in a run.
    ``timeout`` (seconds) bounds each replay; ``on_result`` is called after each one (progress).
    ``geste.testing.check_replay`` calls it with an App's workflows and settings.
    """
    limit_seconds = seconds(timeout, what="timeout", allow_zero=False)
    histories = await load_histories(database_url=database_url, files=files, workflow=workflow, limit=limit)
    results = []
    for history in histories:
        result = await replay_history(
            workflows, history, max_payload_bytes=max_payload_bytes, timeout=limit_seconds
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return ReplayReport(tuple(results))


async def load_histories(
    *,
    database_url: str | None = None,
    files: Iterable[str | os.PathLike[str]] | None = None,
    workflow: str | None = None,
    limit: int = 1000,
) -> Sequence[RecordedHistory | Unreadable]:
    """The histories ``check_replay`` replays (its arguments of the same names)."""
    if (database_url is None) == (files is None):
        raise ConfigurationError("check_replay takes either database_url or files")
    if database_url is not None:
        return await read_database(database_url, workflow=workflow, limit=limit)
    assert files is not None
    histories = [read_history_file(path) for path in history_files(files)]
    return [h for h in histories if workflow is None or h.workflow_name == workflow]


async def replay_history(
    workflows: Mapping[str, Workflow[Any, Any]],
    history: RecordedHistory | Unreadable,
    *,
    max_payload_bytes: int,
    timeout: float = 30.0,
) -> ReplayResult:
    """Replay one recorded history against the current code of ``workflows`` (by name)."""
    if isinstance(history, Unreadable):
        return ReplayResult(
            history.instance_id,
            history.workflow_name,
            ReplayStatus.CORRUPTED,
            history.source,
            message=f"unreadable history: {history.problem}",
        )
    base: dict[str, Any] = {
        "instance_id": history.instance_id,
        "workflow_name": history.workflow_name,
        "source": history.source,
        "instance_status": history.status,
        "steps": len(history.rows),
    }
    workflow = workflows.get(history.workflow_name)
    if workflow is None:
        if history.status.is_finished:
            return ReplayResult(
                **base, status=ReplayStatus.SKIPPED, message="finished; its workflow is not registered"
            )
        return ReplayResult(
            **base,
            status=ReplayStatus.UNKNOWN_WORKFLOW,
            message=f"{history.status.value}, and no workflow named {history.workflow_name!r} is registered",
        )
    try:
        async with asyncio.timeout(timeout):
            verdict = await _Replay(workflow, history, max_payload_bytes=max_payload_bytes).run()
    except TimeoutError:
        return ReplayResult(
            **base,
            status=ReplayStatus.ERROR,
            message=f"the replay did not end within {timeout:g}s (does the workflow await something "
            "outside geste?)",
        )
    return ReplayResult(**base, **verdict)


class _EndOfHistory(BaseException):
    """The code asks for a step the history does not hold: the replay stops before it does anything.

    A ``BaseException``, like the engine's own signals, so the workflow's ``except Exception`` lets it by.
    """

    def __init__(self, seq: int, step: str) -> None:
        super().__init__(seq, step)
        self.seq = seq
        self.step = step


class _ReplayJournal(Journal):
    """The worker's journal, stopped at the first step past the recorded history (its two hooks)."""

    _asked: tuple[int, StepKind | None, str] = (0, None, "")
    """The last step asked for (said only when the replay stops past the history)."""

    def replay(self, seq: int, kind: StepKind, name: str) -> HistoryRow | None:
        self._asked = (seq, kind, name)
        return super().replay(seq, kind, name)

    def patched(self, patch_id: str) -> bool:
        if patch_id not in self.patches:
            self._asked = (self.seq + 1, StepKind.PATCH, patch_id)
        return super().patched(patch_id)

    def live(self, seq: int, *, ordered: bool = True) -> None:
        super().live(seq, ordered=ordered)  # a step missing below later ones is corruption
        asked, kind, name = self._asked
        if asked == seq and kind is not None:
            raise _EndOfHistory(seq, f"{kind.value} {name!r}")
        raise _EndOfHistory(seq, f"the outcome of the wait at step {asked}")

    async def continue_as_new(self, seq: int, input: str, *, recorded: bool) -> NoReturn:
        """A run kept by ``continue_as_new`` ends at its recorded row, as it did: nothing is written."""
        if not recorded:  # pragma: no cover - live() stopped the replay before
            raise _EndOfHistory(seq, f"continue_as_new {self.workflow_name!r}")
        raise ContinuedAsNew(input)


class _NoDatabase:
    """The storage of a replay: it takes no write. A step that would write is past the history."""

    def __init__(self, journal: Callable[[], Journal]) -> None:
        self._journal = journal

    async def record(self, commit: Commit, **_: Any) -> StepResult:
        if commit.records:  # pragma: no cover - a recorded row is only ever new after live, which stops
            self._stop()
        return StepResult(cancel_requested=False)  # the status change at compensations' start

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
            self._stop()

        return refuse

    def _stop(self) -> NoReturn:
        seq = self._journal().seq
        raise _EndOfHistory(seq, f"the wait at step {seq}")


class _Replay:
    """One replay: the workflow run on a ``_ReplayJournal`` to its end or to the end of its history."""

    def __init__(
        self, workflow: Workflow[Any, Any], history: RecordedHistory, *, max_payload_bytes: int
    ) -> None:
        self.workflow = workflow
        self.history = history
        self.max_payload_bytes = max_payload_bytes
        storage = _NoDatabase(lambda: self.journal)
        self.engine = Engine(
            storage=cast(Storage, storage),
            workflows={workflow.name: workflow},
            clock=time.time,
            lock_timeout=3600.0,
            max_payload_bytes=max_payload_bytes,
            on_suspended=lambda _instance_id, _run_at: None,
            on_finished=lambda _instance_id: None,
        )
        self.journal = _ReplayJournal(
            self.engine,
            lease=Lease(history.instance_id, "replay-check"),
            workflow_name=workflow.name,
            history=history.rows,
            cancel_requested=False,
            run=history.run or 1,
        )
        self.journal.complete = self._recorded_end() is not None
        self.ctx = WorkflowContext(self.journal, self.engine.activities)

    async def run(self) -> dict[str, Any]:
        """The verdict's fields: status, and where and how it diverged."""
        journal, history = self.journal, self.history
        try:
            try:
                args, kwargs = self.workflow.signature.load_args(decode(history.input))
                self.workflow.signature.bind(tuple(args), kwargs, what=f"input of {self.workflow.name}")
            except Exception as exc:
                return _diverged(
                    None,
                    "the recorded input",
                    f"a workflow that does not accept it ({type(exc).__name__}: {exc!s:.200})",
                )
            ending = await self._drive(args, kwargs)
        except _EndOfHistory as end:
            if journal.divergence is not None:  # raised inside a gather's other branch first
                return _divergence(journal.divergence)
            expected = self._recorded_end()
            if expected is not None:
                return _diverged(end.seq, f"the end of the workflow ({expected})", end.step)
            return {"status": ReplayStatus.OK, "message": f"replays its {len(history.rows)} steps"}
        except (Suspended, Abandon) as signal:  # pragma: no cover - nothing here suspends or abandons
            return {"status": ReplayStatus.ERROR, "message": f"unexpected {type(signal).__name__}"}
        if journal.divergence is not None:
            return _divergence(journal.divergence)
        leftover = sorted(row.seq for row in history.rows if type(row.seq) is int and row.seq > journal.seq)
        if leftover:
            row = next(r for r in history.rows if r.seq == leftover[0])
            return _diverged(row.seq, f"{row.kind} {row.name!r}", f"the end of the workflow ({ending})")
        expected = self._recorded_end()
        if expected is not None and not ending.startswith(expected):
            return _diverged(journal.seq + 1, f"the end of the workflow ({expected})", f"{ending}")
        return {
            "status": ReplayStatus.OK,
            "message": f"replays its {len(history.rows)} steps and ends {ending}",
        }

    def _recorded_end(self) -> str | None:
        """How the history says its run ended, if it holds the whole run: ``continued as new`` (a run kept
        by ``continue_as_new``: its last row), or the status of a finished instance not stopped by a
        divergence; None for a run not over."""
        history = self.history
        if any(row.kind == StepKind.CONTINUE_AS_NEW for row in history.rows):
            return CONTINUED
        if history.status.is_finished and history.error_type not in _DIVERGENCE_TYPES:
            return history.status.value
        return None

    def _cancelled_unstarted(self) -> bool:
        """The run was cancelled before its code started (``Engine._drive``: a cancel pending when a run
        begins with nothing recorded): its history is that one ``cancelled`` row, and it ended cancelled.
        A history that goes on after it (code that caught the cancel at its first step, recorded before
        the engine delivered it so) replays through the code as before."""
        rows = self.history.rows
        return (
            len(rows) == 1
            and rows[0].seq == 1
            and rows[0].kind == StepKind.CANCELLED
            and self.history.status == Status.CANCELLED
        )

    async def _drive(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
        """Run the workflow as the engine does (its compensations too, on failure); say how it ended."""
        journal, workflow = self.journal, self.workflow
        try:
            if self._cancelled_unstarted():  # as the engine does: the code never started
                journal.cancelled_here()
            result = await workflow.fn(self.ctx, *args, **kwargs)
            if journal.children:  # as the engine does: the ParentClose.WAIT children not awaited
                await self.ctx._wait_for_children()
            encode(result, what=f"result of workflow {workflow.name}", limit=self.max_payload_bytes)
        except ContinuedAsNew:
            return CONTINUED
        except Exception as failure:
            if journal.divergence is not None:
                return "diverged"
            try:  # as the engine does: the ParentClose.WAIT children not awaited, before the failure
                exc = await self.ctx._wait_for_children_after(failure)
            except NonDeterminismError:  # kept in journal.divergence
                return "diverged"
            if journal.compensations:
                try:
                    await self.engine.activities.compensate(journal)
                except NonDeterminismError:  # kept in journal.divergence
                    return "diverged"
            if isinstance(exc, WorkflowCancelled):
                return Status.CANCELLED.value
            return f"{Status.FAILED.value}: {type(exc).__name__}: {exc!s:.200}"
        return Status.COMPLETED.value


def _diverged(seq: int | None, expected: str, found: str) -> dict[str, Any]:
    where = "" if seq is None else f"at step {seq}: "
    return {
        "status": ReplayStatus.DIVERGED,
        "seq": seq,
        "expected": expected,
        "found": found,
        "message": f"{where}history has {expected}, the code now does {found}",
    }


def _divergence(error: NonDeterminismError) -> dict[str, Any]:
    if isinstance(error, HistoryCorruptedError):
        return {
            "status": ReplayStatus.CORRUPTED,
            "seq": error.seq,
            "expected": error.expected,
            "found": error.problem,
            "message": f"at step {error.seq}: {error.problem}",
        }
    return _diverged(error.seq, error.expected, error.found)
