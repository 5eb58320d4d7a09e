"""Durable pydantic-ai agents: each model request and each tool call of an agent run inside a geste
workflow is an activity, so a run killed halfway resumes without repeating what it already did
(docs/pydantic-ai.md).

Built on pydantic-ai's own extension point for durable engines (``pydantic_ai.durable_exec``), as its
Temporal, DBOS and Prefect integrations are: a capability attached to the agent,
``Agent(..., capabilities=[GesteDurability()])``. Inside a geste workflow, ``await agent.run(...)`` is
durable; outside one the capability steps aside and the run is an ordinary one.

- A model request, a tool call, a toolset's discovery: one activity each, named after the agent and the
  operation (``<agent>__model.request``, ``<agent>__function_toolset__<id>.call_tool:<tool>``), its outcome
  recorded as JSON. A replay returns the recorded outcome without calling the model or the tool.
- A tool whose metadata says ``{"geste": False}`` runs in the workflow's own code instead, where it may
  use the workflow's durable waits: ``workflow_context().wait_event(...)`` for a human's approval.
- ``{"geste": geste.RetryPolicy(...)}`` in a tool's metadata sets its activity's retries; the
  capability's ``model_retry`` and ``tool_retry`` set the defaults.
- The agent's waits between polls of a model's background job are durable sleeps (``ctx.sleep``); its
  run id and start time are recorded once (``ctx.uuid4``, ``ctx.now``), the same on every replay.
- ``event_stream_handler`` runs inside the model request's activity; ``activity_context()`` gives it
  the activity's context, whose ``write_stream`` appends to a durable stream that any process reads
  (``handle.read_stream``) while the agent runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Literal, cast

try:
    from pydantic_ai.agent import EventStreamHandler
    from pydantic_ai.durable_exec import (
        JSON_CODEC,
        BaseDurabilityCapability,
        DurabilityEngineSpec,
        DurableOperationId,
        JournalCallableOperationBackend,
        RoleBasedOperationConfig,
        ToolsetCallToolId,
        ToolsetKind,
        ToolsetValidateToolArgumentsId,
        conversation_id_from_run_id,
    )
    from pydantic_ai.models import Model
    from pydantic_ai.tools import AgentDepsT
    from pydantic_ai.toolsets import ToolsetTool
except ImportError as exc:  # pragma: no cover - the extra is installed where this module is imported
    raise ImportError(
        "geste.integrations.pydantic_ai needs pydantic-ai: pip install 'geste[pydantic-ai]'"
    ) from exc

from .._definitions import Activity
from .._retry import RetryPolicy
from ..engine.activities import CURRENT_ACTIVITY, ActivityContext
from ..engine.context import CURRENT_WORKFLOW, WorkflowContext
from ..engine.journal import Abandon, ContinuedAsNew, Suspended
from ..errors import GesteError, NonDeterminismError, SerializationError, WorkflowCancelled

__all__ = ["GesteDurability", "activity_context", "workflow_context"]

UnitConfig = RetryPolicy | Literal[False]
"""What configures one durable unit: its activity's retry policy, or False (a tool run in the workflow)."""


def workflow_context() -> WorkflowContext:
    """The context of the geste workflow whose code runs now: for a tool that runs in the workflow
    (``metadata={"geste": False}``) and waits durably. ``GesteError`` outside a workflow's code."""
    ctx = CURRENT_WORKFLOW.get()
    if ctx is None or CURRENT_ACTIVITY.get() is not None:
        raise GesteError("no geste workflow's code runs here (outside a workflow, or inside an activity)")
    return ctx


def activity_context() -> ActivityContext:
    """The context of the geste activity running now: for an event stream handler, which runs inside
    the model request's activity (``activity_context().write_stream(key, item)``). ``GesteError``
    outside an activity."""
    actx = CURRENT_ACTIVITY.get()
    if actx is None:
        raise GesteError("no geste activity runs here")
    return actx


def _serialization_failure(exc: Exception) -> BaseException:
    """A value the JSON codec cannot encode fails its activity at once: retrying cannot mend it."""
    return SerializationError(f"pydantic-ai value not storable as JSON: {exc}")


class _GesteBackend(JournalCallableOperationBackend[RetryPolicy]):
    """Runs each durable operation as an activity of the current workflow."""

    def execution_attempt(self) -> int:
        actx = CURRENT_ACTIVITY.get()
        return 1 if actx is None else actx.attempt

    async def execute(
        self,
        *,
        operation_id: DurableOperationId,
        name: str,
        body: Callable[[], Awaitable[object]],
        cache_key: tuple[object, ...],
        config: RetryPolicy,
    ) -> object:
        async def unit(actx: ActivityContext) -> Any:
            return await body()

        # An activity made for this call: its name is what the history records and a replay checks; its
        # function is this call's body (an activity runs in the workflow's own process and task).
        step: Activity[[], Any] = Activity(unit, name=name, retry=config)
        return await step(workflow_context())


class GesteDurability(BaseDurabilityCapability[AgentDepsT]):
    """Makes an agent durable inside geste workflows: its model requests and tool calls are activities.

    ``GesteDurability(name="support")`` (the agent's ``name`` by default: it names the activities, so
    it must not change while runs of it are in flight). ``model_retry`` and ``tool_retry``: the retry
    policies of the model requests' and the tool calls' activities (geste's default policy if None;
    a tool's metadata ``{"geste": RetryPolicy(...)}`` overrides it, ``{"geste": False}`` runs the tool
    in the workflow). ``models``: further models a run may switch to, by id.
    """

    engine_spec = DurabilityEngineSpec(
        engine_name="geste",
        durable_unit_noun="activity",
        durable_unit_plural="activities",
        durable_container_noun="workflow",
        codec=JSON_CODEC,  # activity outcomes are stored as JSON
        serialization_failure=_serialization_failure,
        wrapped_toolset_kinds=frozenset({"function", "mcp", "dynamic"}),
        toolset_lifecycles={
            "function": "enter-always",
            "mcp": "enter-in-durable-unit",  # activities run in the workflow's process: one session a run
            "dynamic": "enter-never",
        },
        journal_discovery=True,
        sequential_tools_in_durable_context=False,
        unsupported_runtime_toolset_kinds=frozenset({"function", "mcp", "dynamic"}),
        tool_config_key="geste",
        cancellation_error_types=(WorkflowCancelled,),
        # the engine's signals (a suspension at a durable sleep, a lost lease): never a failure
        control_flow_error_types=(Suspended, Abandon, ContinuedAsNew),
        nondeterminism_error_types=(NonDeterminismError,),
    )

    def __init__(
        self,
        *,
        name: str | None = None,
        models: Mapping[str, Model] | None = None,
        event_stream_handler: EventStreamHandler[AgentDepsT] | None = None,
        model_retry: RetryPolicy | None = None,
        tool_retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(models=models, event_stream_handler=event_stream_handler, name=name)
        self._model_retry = model_retry or RetryPolicy()
        self._tool_retry = tool_retry or RetryPolicy()

    @property
    def in_durable_context(self) -> bool:
        return CURRENT_WORKFLOW.get() is not None and CURRENT_ACTIVITY.get() is None

    @property
    def in_durable_unit(self) -> bool:
        return CURRENT_ACTIVITY.get() is not None or bool(super().in_durable_unit)

    def get_default_run_id(self) -> str | None:
        if not self.in_durable_context:
            return None
        return str(workflow_context().uuid4())  # recorded: the same id on every replay

    def get_default_conversation_id(self, run_id: str) -> str | None:
        return conversation_id_from_run_id(run_id) if self.in_durable_context else None

    async def get_run_start_time(self, run_id: str) -> datetime | None:
        if not self.in_durable_context:
            return None
        return workflow_context().now()  # recorded: a replay counts the run's timeout from its start

    async def durable_sleep(self, seconds: float) -> None:
        await workflow_context().sleep(seconds)

    def _toolset_base_config(self, kind: ToolsetKind) -> Any:
        return self._tool_retry

    def get_durable_operation_backend(self) -> _GesteBackend:
        def tool_config(operation_id: DurableOperationId, tool: object | None, tool_name: str) -> UnitConfig:
            assert isinstance(operation_id, ToolsetCallToolId | ToolsetValidateToolArgumentsId)
            resolve = self._build_resolve_tool_config(self._toolset_base_config(operation_id.toolset_kind))
            return cast(UnitConfig, resolve(cast(ToolsetTool[Any] | None, tool), tool_name))

        return _GesteBackend(
            agent_name=self.name,
            config=RoleBasedOperationConfig[RetryPolicy](
                model=self._model_retry,
                event=self._model_retry,
                capability=self._tool_retry,
                tool=self._tool_retry,
                resolve_tool=tool_config,
            ),
        )
