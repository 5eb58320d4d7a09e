"""geste in a FastAPI application: one process serves the shop's routes and geste's own API and viewer
(mounted at /geste), and runs the workflows (docs/fastapi.md).

    pip install 'geste[http]' fastapi
    uvicorn fastapi_app:create_api --factory    # the database: $GESTE_DATABASE_URL, else ./geste.db
    python fastapi_app.py                       # a demo: serves on a free port, orders a lamp, pays it
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

import geste
from geste.errors import InstanceNotFoundError, ResultTimeout, WorkflowCancelled, WorkflowFailed


class NewOrder(BaseModel):
    item: str = Field(min_length=1, max_length=100)
    amount: float = Field(gt=0)


def define_workflows(workflows: geste.App) -> geste.Workflow[[str, float], dict[str, Any]]:
    """The shop's activity and workflow, registered on ``workflows``."""

    @workflows.activity
    async def reserve(ctx: geste.ActivityContext, item: str) -> str:
        return f"R-{item}"  # the warehouse's API, retried if it fails

    @workflows.workflow
    async def order(ctx: geste.WorkflowContext, item: str, amount: float) -> dict[str, Any]:
        reservation = await reserve(ctx, item)
        # waits durably (no memory held, survives restarts) for the bank's CloudEvent, posted to /geste/events
        payment = await ctx.wait_event("payment.confirmed", match={"order_id": ctx.instance_id}, timeout=3600)
        return {"item": item, "reservation": reservation, "paid": payment.data["amount"]}

    return order


def create_api(workflows: geste.App | None = None) -> FastAPI:
    """The FastAPI application around ``workflows`` (default: ``geste.App()``)."""
    workflows = geste.App() if workflows is None else workflows
    order = define_workflows(workflows)

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        # A mounted application hears no lifespan events: this opens geste (its database, and its worker
        # in the background of this event loop) before the first request, and drains it at shutdown.
        async with workflows:
            yield

    api = FastAPI(lifespan=lifespan)
    # geste's own routes: CloudEvents (/geste/events), the API (/geste/instances/...), the viewer (/geste/ui)
    api.mount("/geste", workflows.asgi())

    @api.post("/orders", status_code=201)
    async def create_order(new: NewOrder) -> dict[str, str]:
        handle = await order.start(new.item, new.amount)  # committed: it runs even if this process dies now
        return {"order_id": handle.instance_id}

    @api.get("/orders/{order_id}")
    async def get_order(order_id: str, wait: Annotated[float, Query(ge=0, le=30)] = 0) -> Any:
        """The order's result, waited for up to ``wait`` seconds; 202 while it runs."""
        handle = workflows.get_handle(order_id)
        try:
            if (await handle.info()).workflow_name != order.name:
                raise InstanceNotFoundError(order_id)  # an instance of another workflow is no order
            result = await handle.result(timeout=wait)  # an await: the server serves others meanwhile
        except InstanceNotFoundError:
            raise HTTPException(404, f"no order {order_id!r}") from None
        except ResultTimeout:
            status = await handle.status()
            return JSONResponse({"order_id": order_id, "status": status}, status_code=202)
        except (WorkflowFailed, WorkflowCancelled) as exc:
            status = await handle.status()
            return JSONResponse({"order_id": order_id, "status": status, "error": str(exc)}, status_code=409)
        return {"order_id": order_id, "status": "completed", "result": result}

    return api


async def demo() -> None:
    """Serve the application with uvicorn on a free port, and play a customer and a bank against it."""
    import httpx
    import uvicorn

    listening = socket.create_server(("127.0.0.1", 0))  # listens now: connections wait for the server
    port = listening.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_api(geste.App("sqlite:///shop.db")), log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        created = await http.post("/orders", json={"item": "lamp", "amount": 30.0})
        order_id = created.json()["order_id"]
        print("ordered:", created.status_code)
        now = await http.get(f"/orders/{order_id}")
        print("at once:", now.status_code)  # 202: still running, its status pending, running or waiting
        # a customer waits for the result (up to 30 s) while the bank confirms the payment to geste's API
        result = asyncio.create_task(http.get(f"/orders/{order_id}", params={"wait": 30}))
        bank = {"ce-specversion": "1.0", "ce-id": f"pay-{order_id}", "ce-source": "/bank"}
        paid = await http.post(
            "/geste/events",
            headers={**bank, "ce-type": "payment.confirmed"},
            json={"order_id": order_id, "amount": 30.0},
        )
        print("bank:", paid.status_code, paid.json()["duplicate"])
        done = await result
        print("waited:", done.status_code, done.json()["result"])
        shown = await http.get(f"/geste/instances/{order_id}")
        print("geste says:", shown.json()["status"])
    server.should_exit = True
    await serving


if __name__ == "__main__":
    asyncio.run(demo())
