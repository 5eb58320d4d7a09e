"""Durable pydantic-ai agents (``geste.integrations.pydantic_ai``, docs/pydantic-ai.md), with pydantic-ai's
own test models (``FunctionModel``: no network), on each backend.

A worker killed in the middle of an agent's run: another worker resumes it without calling the model or
the tool again for what the history holds. A tool that waits for a human's approval (``wait_event`` in the
workflow's code), its model request not repeated by the wait, with or without the cache of suspended runs.
The agent's output streamed through a durable stream while it runs. Outside a workflow, an ordinary run.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import (
    AgentStreamEvent,
    ModelMessage,
    ModelResponse,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ToolCallPart,
)
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

import geste
from geste.errors import GesteError
from geste.integrations.pydantic_ai import GesteDurability, activity_context, workflow_context

from .processes import WorkerProcesses, worker_processes, workers_client
from .support import wait_status, wait_until

workers = worker_processes("agent_app")
client = workers_client()


async def test_a_worker_killed_mid_run_is_resumed_elsewhere_without_repeating_model_calls_or_tools(
    workers: WorkerProcesses, client: geste.App
) -> None:
    """The first worker asks the model (1), runs the tool, and is killed in the second model request.
    The second worker takes the instance over: the first request and the tool come from the history."""
    first = await workers.spawn("first")
    handle = await client.workflows["ask"].start("weather in Paris?")
    await wait_until(lambda: workers.entries(event="model 2 start"), what="the second model request")
    first.send_signal(signal.SIGKILL)
    first.wait()
    await workers.spawn("second")
    assert await handle.result(timeout=30) == "sunny in Paris, says the forecast"
    done = [(e["event"], e["worker"]) for e in workers.entries()]
    assert done.count(("model 1", "first")) == 1 and ("tool", "first") in done
    assert [e for e in done if e[1] == "second"] == [("model 2 start", "second"), ("model 2", "second")]
    names = [e.name for e in await client.history(handle.instance_id) if e.kind == geste.StepKind.ACTIVITY]
    assert names == [
        "weather__model.request",
        "weather__function_toolset__<agent>.call_tool:forecast",
        "weather__model.request",
    ]


def refund_agent(calls: list[int]) -> Agent[None, str]:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls.append(len(messages))
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("approve_refund", {"amount": 30})])
        return ModelResponse(parts=[TextPart("refund done")])

    async def streamed(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        calls.append(len(messages))
        if len(messages) == 1:
            yield {0: DeltaToolCall(name="approve_refund", json_args='{"amount": 30}')}
            return
        for chunk in ("refund ", "is ", "done"):
            yield chunk

    async def to_stream(ctx: RunContext[None], events: AsyncIterator[AgentStreamEvent]) -> None:
        async for event in events:  # in the model request's activity: its context writes the stream
            if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart) and event.part.content:
                await activity_context().write_stream("tokens", event.part.content)
            elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                await activity_context().write_stream("tokens", event.delta.content_delta)

    durability = GesteDurability[None](event_stream_handler=to_stream)
    agent = Agent(FunctionModel(model, stream_function=streamed), name="refunds", capabilities=[durability])

    @agent.tool_plain(metadata={"geste": False})  # in the workflow's code: it may wait durably
    async def approve_refund(amount: int) -> str:
        ctx = workflow_context()
        approval = await ctx.wait_event("approval", match={"id": ctx.instance_id})
        return f"{amount} approved by {approval.data['by']}"

    return agent


def register(app: geste.App, agent: Agent[None, str]) -> None:
    @app.workflow
    async def refund(ctx: geste.WorkflowContext, question: str) -> str:
        result = await agent.run(question)
        return result.output


async def test_a_tool_waits_for_a_human_approval_and_the_output_streams_durably(make_app: Any) -> None:
    calls: list[int] = []
    agent = refund_agent(calls)
    async with make_app() as app:
        register(app, agent)
        handle = await app.workflows["refund"].start("refund order 7?")
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        assert calls == [1]
        await app.send_event("approval", {"id": handle.instance_id, "by": "ada"})
        assert await handle.result(timeout=20) == "refund is done"
        tokens = [item async for item in handle.read_stream("tokens")]  # closed by the workflow's end
        history = await app.history(handle.instance_id)
    assert calls == [1, 3], "each model request made once: the wait did not repeat the first"
    assert tokens == ["refund ", "is ", "done"]
    kinds = [(e.kind, e.name) for e in history]
    assert (geste.StepKind.WAIT_EVENT, "approval") in kinds
    assert kinds.count((geste.StepKind.ACTIVITY, "refunds__model.request_stream")) == 2


async def test_a_second_worker_replays_the_approval_wait_from_the_history(make_app: Any) -> None:
    """The first App stops while the tool waits; another resumes at the approval: the first model request
    and its stream items come from the history (no model call, no item written twice)."""
    calls: list[int] = []
    async with make_app() as first:
        register(first, refund_agent(calls))
        handle = await first.workflows["refund"].start("refund order 8?")
        await wait_status(first, handle.instance_id, geste.Status.WAITING)
    async with make_app() as second:
        register(second, refund_agent(calls))
        await second.send_event("approval", {"id": handle.instance_id, "by": "bob"})
        assert await second.get_handle(handle.instance_id).result(timeout=20) == "refund is done"
        tokens = [item async for item in second.get_handle(handle.instance_id).read_stream("tokens")]
    assert calls == [1, 3]
    assert tokens == ["refund ", "is ", "done"]


async def test_outside_a_workflow_the_agent_runs_as_an_ordinary_agent() -> None:
    calls: list[int] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls.append(len(messages))
        return ModelResponse(parts=[TextPart("plain")])

    agent = Agent(FunctionModel(model), name="plain", capabilities=[GesteDurability()])
    assert (await agent.run("hi")).output == "plain" and calls == [1]
    with pytest.raises(GesteError, match="no geste workflow"):
        workflow_context()
    with pytest.raises(GesteError, match="no geste activity"):
        activity_context()


async def test_the_run_id_and_start_time_are_recorded_once(make_app: Any) -> None:
    """A replayed run gets the same run id as the first (recorded with ``ctx.uuid4``)."""
    seen: list[str] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("ok")])

    agent = Agent(FunctionModel(model), name="ids", capabilities=[GesteDurability()])

    def build(app: geste.App) -> None:
        @app.workflow
        async def twice(ctx: geste.WorkflowContext) -> str:
            result = await agent.run("hi")
            seen.append(result.run_id)
            await ctx.wait_event("again", match={"id": ctx.instance_id})
            return result.run_id

    async with make_app() as first:
        build(first)
        handle = await first.workflows["twice"].start()
        await wait_status(first, handle.instance_id, geste.Status.WAITING)
    async with make_app(workflow_cache_size=0) as second:  # a replay, whatever the default cache
        build(second)
        await second.send_event("again", {"id": handle.instance_id})
        run_id = await second.get_handle(handle.instance_id).result(timeout=20)
    assert len(seen) == 2 and seen[0] == seen[1] == run_id
