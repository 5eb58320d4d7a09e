"""The registry of an App's workflows and activities: what ``@app.workflow`` and ``@app.activity`` fill.

The client looks a workflow up to start it and to decode its results, the engine to run an instance, the
replay check to replay one. A core module: it imports only the definitions and the core below them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from ._definitions import Activity, Owner, Workflow
from ._retry import RetryPolicy, seconds
from ._versions import Versioning, check_versioning, source_version
from .errors import ConfigurationError


class Registry:
    """Workflows and activities by name; ``workflows`` and ``activities`` are live read-only views."""

    def __init__(self, owner: Owner, *, default_retry: RetryPolicy) -> None:
        if not isinstance(default_retry, RetryPolicy):
            raise ConfigurationError("default_retry must be a geste.RetryPolicy")
        self.owner = owner
        """What the registered workflows start their instances through (the App)."""
        self.default_retry = default_retry
        self._workflows: dict[str, Workflow[Any, Any]] = {}
        self._activities: dict[str, Activity[Any, Any]] = {}
        self.workflows: Mapping[str, Workflow[Any, Any]] = MappingProxyType(self._workflows)
        self.version: str | None = None
        """The version of the code (``App(version=...)``); None: derived from the workflows' source."""
        self._derived: tuple[tuple[int, ...], str] | None = None
        self.activities: Mapping[str, Activity[Any, Any]] = MappingProxyType(self._activities)

    def workflow(
        self,
        fn: Any = None,
        /,
        *,
        name: str | None = None,
        versioning: Versioning | str = Versioning.UPGRADING,
    ) -> Any:
        """``@app.workflow``: register ``fn`` (or return the decorator that does, when ``fn`` is None)."""
        policy = check_versioning(versioning)

        def register(f: Callable[..., Any]) -> Workflow[Any, Any]:
            return self.add_workflow(Workflow(self.owner, f, name=name or f.__name__, versioning=policy))

        return register if fn is None else register(fn)

    def activity(
        self,
        fn: Any = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        heartbeat_timeout: float | timedelta | None = None,
    ) -> Any:
        """``@app.activity``: its options are checked at once, even before the function is given."""
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError("retry must be a geste.RetryPolicy")
        beat = None
        if heartbeat_timeout is not None:
            beat = seconds(heartbeat_timeout, what="heartbeat_timeout", allow_zero=False)
        policy = retry or self.default_retry
        if timeout is not None:
            seconds(timeout, what="timeout", allow_zero=False)
            policy = RetryPolicy(
                max_attempts=policy.max_attempts,
                initial_interval=policy.initial_interval,
                backoff=policy.backoff,
                max_interval=policy.max_interval,
                timeout=timeout,
                non_retryable=policy.non_retryable,
            )

        def register(f: Callable[..., Any]) -> Activity[Any, Any]:
            return self.add_activity(
                Activity(f, name=name or f.__name__, retry=policy, heartbeat_timeout=beat)
            )

        return register if fn is None else register(fn)

    def add_workflow(self, workflow: Workflow[Any, Any]) -> Workflow[Any, Any]:
        if workflow.name in self._workflows:
            raise ConfigurationError(f"a workflow named {workflow.name!r} is registered already")
        self._workflows[workflow.name] = workflow
        return workflow

    def add_activity(self, activity: Activity[Any, Any]) -> Activity[Any, Any]:
        if activity.name in self._activities:
            raise ConfigurationError(f"an activity named {activity.name!r} is registered already")
        self._activities[activity.name] = activity
        return activity

    def include(self, other: Registry) -> None:
        """Register here everything ``other`` holds (the same objects): a ``WorkflowEnvironment``'s copy
        of the App's registry."""
        self._workflows.update(other._workflows)
        self._activities.update(other._activities)

    def code_version(self) -> str:
        """The version of this code: the one declared, else ``source_version`` of the workflows registered
        (computed again only when they change)."""
        if self.version is not None:
            return self.version
        key = tuple(id(w) for w in self._workflows.values())
        if self._derived is None or self._derived[0] != key:
            self._derived = key, source_version(self._workflows.values())
        return self._derived[1]

    def registered(self, workflow: Workflow[Any, Any]) -> bool:
        """Whether this very object is registered (not another workflow of the same name)."""
        return self._workflows.get(workflow.name) is workflow

    def load_result(self, workflow_name: str, value: Any) -> Any:
        """A decoded result, typed as its workflow's return annotation when that workflow is known here."""
        workflow = self._workflows.get(workflow_name)
        return value if workflow is None else workflow.signature.load_result(value)
