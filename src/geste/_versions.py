"""Versions of an App's code (schema 27; docs/versioning.md).

A worker declares the version of its code (``App(version=...)``), or it is derived from the source of
the workflows it registers (``source_version``). An instance records the version of the App that started
it; a workflow registered with ``versioning="pinned"`` is pinned to it: only workers of that version
claim it. A claim matches an instance's ``coalesce(runner, workflow_name)`` (``runner``, a generated
column, is the name and the version of a pinned instance, NULL for the others): its workflow's name, or,
pinned, the name and its version (``runner_key``). A worker claims its ``claim_keys``: the name of each
workflow it registers, and, for a pinned one, the name with its own version too; the claim indexes are
keyed on that expression, so a claim never reads a pinned instance of another version.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from types import CodeType
from typing import TYPE_CHECKING, Any

from ._validation import storable_text
from .errors import ConfigurationError

if TYPE_CHECKING:
    from ._definitions import Workflow

SEPARATOR = "\x1f"
"""Between a pinned instance's workflow name and its version in its runner (no registered name holds it)."""
MAX_VERSION_LENGTH = 100


class Versioning(StrEnum):
    """Which workers may run an instance of a workflow (``@app.workflow(versioning=...)``)."""

    UPGRADING = "upgrading"
    """Any worker that registers the workflow, whatever its version: a deploy's new code resumes the
    running instances (change their steps with ``ctx.patched``). The default."""
    PINNED = "pinned"
    """Only workers of the version the instance started on: a deploy's old workers finish the instances
    they started, the new ones run the new instances."""


def check_versioning(value: object) -> Versioning:
    try:
        return Versioning(value)  # type: ignore[arg-type]
    except ValueError:
        raise ConfigurationError(f"versioning must be 'upgrading' or 'pinned', not {value!r:.80}") from None


def check_version(value: object) -> str:
    """A version: a non-empty string of at most 100 characters, storable, without U+001F."""
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_VERSION_LENGTH
        or SEPARATOR in value
        or not storable_text(value)
    ):
        raise ConfigurationError(
            f"version must be a non-empty string of at most {MAX_VERSION_LENGTH} characters "
            f"(no NUL, no U+001F), not {value!r:.80}"
        )
    return value


def source_version(workflows: Iterable[Workflow[Any, Any]]) -> str:
    """``src-`` and 12 hex digits of a SHA-256 over the registered workflows' names and source code
    (their compiled code where the source cannot be read): the same code gives the same version in
    every process, a changed workflow another. Activities are not part of it: changing one's body
    changes no history."""
    digest = hashlib.sha256()
    for workflow in sorted(workflows, key=lambda w: w.name):
        digest.update(workflow.name.encode())
        digest.update(b"\0")
        fn = inspect.unwrap(workflow.fn)
        try:
            digest.update(inspect.getsource(fn).encode())
        except (OSError, TypeError):  # no source file (exec, a REPL): its compiled code
            code = getattr(fn, "__code__", None)
            if code is not None:
                _digest_code(digest, code)
        digest.update(b"\0")
    return f"src-{digest.hexdigest()[:12]}"


def _digest_code(digest: Any, code: CodeType) -> None:
    """A code object's instructions, names and constants (nested code objects alike, never their
    addresses), into ``digest``."""
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, CodeType):
            _digest_code(digest, const)
        else:
            digest.update(repr(const).encode())


def runner_key(workflow_name: str, version: str | None, pinned: bool) -> str:
    """What a claim matches of an instance (``coalesce(runner, workflow_name)``, as the database computes
    it)."""
    return f"{workflow_name}{SEPARATOR}{version or ''}" if pinned else workflow_name


def claim_keys(workflows: Mapping[str, Workflow[Any, Any]], version: str | None) -> list[str]:
    """The runners a worker of ``version`` claims: every workflow's name, and, for a pinned one, the name
    with this version too (the instances started upgrading before it was pinned go on running)."""
    keys = []
    for name, workflow in workflows.items():
        keys.append(name)
        if workflow.versioning is Versioning.PINNED:
            keys.append(runner_key(name, version, True))
    return sorted(keys)


@dataclass(frozen=True, slots=True)
class PatchInfo:
    """A patch id (``ctx.patched``) of a workflow, as ``app.patches()`` and ``geste patches`` list it."""

    workflow_name: str
    patch_id: str
    first_marked_at: datetime
    """When the first marker of it still held by a current run's history was recorded."""
    marked: int
    """Instances whose current run's history holds the marker (finished ones too, until purged)."""
    old_runs: int
    """Unfinished instances of the workflow whose current run started before that first marker and whose
    history lacks it: they may still take the old branch. At 0, the patch can be deprecated
    (``ctx.deprecate_patch``); while some remain, the old branch must stay."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "workflow_name": self.workflow_name,
            "patch_id": self.patch_id,
            "first_marked_at": self.first_marked_at.isoformat(),
            "marked": self.marked,
            "old_runs": self.old_runs,
        }


def split_runner(key: str) -> tuple[str, str | None]:
    """A runner's workflow name, and its version for a pinned one (None: upgrading)."""
    name, separator, version = key.partition(SEPARATOR)
    return (name, version) if separator else (name, None)
