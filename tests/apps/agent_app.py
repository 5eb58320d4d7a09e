"""A sample app for the pydantic-ai tests: a durable agent run by a workflow (``ask``), whose model
(pydantic-ai's ``FunctionModel``, no network) asks for one tool call and then answers.

Run as a worker process from the repository root (``tests/apps/worker.py``, ``tests/processes.py``)::

    python -m tests.apps.agent_app DATABASE_URL --worker-id W --markers DIR --log LOG

Every model request and tool call appends a line to ``LOG`` (``{"event": "model 1", "worker": W}``...).
The second model request of worker ``first`` never returns: the test kills that worker there.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

import geste
from geste.integrations.pydantic_ai import GesteDurability

from .worker import append_line, serve


def build_app(
    url: str,
    *,
    log: str | None = None,
    markers: str | None = None,
    worker_id: str | None = None,
    **options: Any,
) -> geste.App:
    def note(event: str) -> None:
        if log is not None:
            append_line(log, {"event": event, "worker": worker_id, "pid": os.getpid()})

    async def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:  # the user's prompt alone: ask for the weather
            note("model 1")
            return ModelResponse(parts=[ToolCallPart("forecast", {"city": "Paris"})])
        note("model 2 start")
        if worker_id == "first":
            await asyncio.Event().wait()  # killed here
        note("model 2")
        return ModelResponse(parts=[TextPart("sunny in Paris, says the forecast")])

    agent = Agent(FunctionModel(model), name="weather", capabilities=[GesteDurability()])

    @agent.tool_plain
    def forecast(city: str) -> str:
        note("tool")
        return f"sunny in {city}"

    app = geste.App(url, worker_id=worker_id, **options)

    @app.workflow
    async def ask(ctx: geste.WorkflowContext, question: str) -> str:
        result = await agent.run(question)
        return result.output

    return app


def main(argv: list[str] | None = None) -> None:
    serve(build_app, argv, prog="python -m tests.apps.agent_app", poll_interval=0.05, lock_timeout=1.0)


if __name__ == "__main__":
    main()
