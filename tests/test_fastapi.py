"""The FastAPI example (``examples/fastapi_app.py``, shown whole in ``docs/fastapi.md``), on both backends,
in process: httpx's ASGI transport, and asgi-lifespan to send the lifespan events a server sends.

FastAPI's lifespan opens the App (worker included) and closes it; orders start and are waited for
concurrently, a long wait holding up no other request; geste's API and viewer answer under /geste.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

import geste

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `examples` is importable however pytest was started
    sys.path.insert(0, str(ROOT))

from examples.fastapi_app import create_api  # noqa: E402

from .support import wait_until  # noqa: E402

MakeApp = Callable[..., geste.App]
BROWSER = {"accept": "text/html"}


@contextlib.asynccontextmanager
async def running(app: geste.App, *, root_path: str = "") -> AsyncIterator[httpx.AsyncClient]:
    """The example's FastAPI application around ``app``, started as a server starts it (the lifespan's
    startup), a client to it, and its shutdown at the end; ``root_path``: served under a proxy's prefix."""
    async with LifespanManager(create_api(app), startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            yield http


@pytest.fixture
def awaiting(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """How many requests await each id's result at this moment (in ``WorkflowHandle.result``)."""
    inside: Counter[str] = Counter()
    original = geste.WorkflowHandle.result

    async def result(self: geste.WorkflowHandle[Any], timeout: Any = None) -> Any:
        inside[self.instance_id] += 1
        try:
            return await original(self, timeout)
        finally:
            inside[self.instance_id] -= 1
            if not inside[self.instance_id]:
                del inside[self.instance_id]

    monkeypatch.setattr(geste.WorkflowHandle, "result", result)
    return inside


def payment(order_id: str, amount: float) -> dict[str, Any]:
    """The bank's CloudEvent (binary mode) for ``POST /geste/events``."""
    return {
        "headers": {
            "ce-specversion": "1.0",
            "ce-id": f"pay-{order_id}",
            "ce-source": "/bank",
            "ce-type": "payment.confirmed",
        },
        "json": {"order_id": order_id, "amount": amount},
    }


async def test_orders_are_awaited_together_and_a_long_wait_holds_up_no_request(
    make_app: MakeApp, awaiting: Counter[str]
) -> None:
    app = make_app()
    async with running(app) as http:
        created = await asyncio.gather(
            *(http.post("/orders", json={"item": f"item-{n}", "amount": n + 0.5}) for n in range(5))
        )
        assert [answer.status_code for answer in created] == [201] * 5
        orders = [answer.json()["order_id"] for answer in created]
        assert len(set(orders)) == 5

        waits = [
            asyncio.create_task(http.get(f"/orders/{order_id}", params={"wait": 30})) for order_id in orders
        ]
        # all five requests are in their route's await at once: none holds the event loop
        await wait_until(lambda: awaiting == Counter(orders), "the five requests awaiting their results")

        # meanwhile every other request is served
        assert (await http.get("/geste/health")).json() == {"status": "ok"}
        now = await http.get(f"/orders/{orders[0]}")
        assert now.status_code == 202
        assert now.json()["status"] in ("pending", "running", "waiting")
        late = await http.post("/orders", json={"item": "late", "amount": 1.0})
        assert late.status_code == 201
        listed = await http.get("/geste/instances", params={"workflow": "order"})
        assert len(listed.json()["instances"]) == 6
        assert awaiting == Counter(orders) and not any(wait.done() for wait in waits)

        # the bank pays the five (through geste's mounted API): each wait ends with its own order
        paid = await asyncio.gather(
            *(http.post("/geste/events", **payment(order_id, n + 0.5)) for n, order_id in enumerate(orders))
        )
        assert [answer.status_code for answer in paid] == [202] * 5
        for n, (order_id, answer) in enumerate(zip(orders, await asyncio.gather(*waits), strict=True)):
            assert answer.status_code == 200, answer.text
            assert answer.json() == {
                "order_id": order_id,
                "status": "completed",
                "result": {"item": f"item-{n}", "reservation": f"R-item-{n}", "paid": n + 0.5},
            }
        assert (await http.get(f"/orders/{late.json()['order_id']}")).status_code == 202  # not paid


async def test_the_lifespan_opens_the_app_with_its_worker_and_closes_it(make_app: MakeApp) -> None:
    app = make_app()
    api = create_api(app)
    assert not app.is_open
    async with LifespanManager(api, startup_timeout=60, shutdown_timeout=60) as manager:
        assert app.is_open
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            order_id = (await http.post("/orders", json={"item": "lamp", "amount": 3.0})).json()["order_id"]
            await http.post("/geste/events", **payment(order_id, 3.0))
            done = await http.get(f"/orders/{order_id}", params={"wait": 30})  # the worker ran it
            assert done.json()["result"]["reservation"] == "R-lamp"
    assert not app.is_open
    with pytest.raises(geste.errors.AppNotOpenError):
        await app.get_instance(order_id)


async def test_geste_answers_under_its_prefix_and_the_routes_map_its_outcomes(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def other(ctx: geste.WorkflowContext) -> str:
        return "not an order"

    async with running(app) as http:
        # geste's API under /geste, its Location there too
        started = await http.post(
            "/geste/workflows/order", json={"args": ["desk", 12.5], "instance_id": "desk-1"}
        )
        assert started.status_code == 201, started.text
        assert started.headers["location"] == "/geste/instances/desk-1"
        assert (await http.get(started.headers["location"])).json()["workflow_name"] == "order"
        assert (await http.get("/instances/desk-1")).status_code == 404  # nothing of geste's at the root

        # the viewer's pages and links, under /geste/ui
        text = (await http.get("/geste/ui", headers=BROWSER)).text
        assert 'href="/geste/ui/instances/desk-1"' in text
        hrefs = re.findall(r'(?:href|action)="([^"]*)"', text)
        assert hrefs and all(h.startswith(("/geste/ui", "data:")) for h in hrefs), hrefs
        assert (await http.get("/geste/ui/instances/desk-1", headers=BROWSER)).status_code == 200

        # an order cancelled through geste's API: 409 and its status
        cancel = await http.post("/geste/instances/desk-1/cancel")
        assert cancel.status_code == 202, cancel.text
        ended = await http.get("/orders/desk-1", params={"wait": 30})
        assert ended.status_code == 409
        assert ended.json()["status"] == "cancelled"
        assert "cancelled" in ended.json()["error"]

        # no such order: neither an unknown id nor an instance of another workflow
        assert (await http.get("/orders/nope")).status_code == 404
        handle = await other.start()
        assert await handle.result(timeout=30) == "not an order"
        assert (await http.get(f"/orders/{handle.instance_id}")).status_code == 404

        # FastAPI checks what it is given
        assert (await http.get("/orders/desk-1", params={"wait": 31})).status_code == 422
        assert (await http.post("/orders", json={"item": "", "amount": 1})).status_code == 422
        assert (await http.post("/orders", json={"item": "x", "amount": -1})).status_code == 422


async def test_behind_a_proxy_prefix_too_geste_keeps_both_prefixes(make_app: MakeApp) -> None:
    """The FastAPI application itself served under /shop (uvicorn's ``--root-path`` behind a proxy), geste
    mounted at /geste in it: geste routes below /shop/geste and writes that prefix into what it sends."""
    app = make_app()
    async with running(app, root_path="/shop") as http:
        started = await http.post(
            "/shop/geste/workflows/order", json={"args": ["mat", 2.0], "instance_id": "m"}
        )
        assert started.status_code == 201, started.text
        assert started.headers["location"] == "/shop/geste/instances/m"
        assert (await http.get("/shop/orders/m")).status_code == 202
        text = (await http.get("/shop/geste/ui", headers=BROWSER)).text
        assert 'href="/shop/geste/ui/instances/m"' in text
        hrefs = re.findall(r'(?:href|action)="([^"]*)"', text)
        assert hrefs and all(h.startswith(("/shop/geste/ui", "data:")) for h in hrefs), hrefs


def test_the_guide_shows_the_example_as_it_is() -> None:
    """docs/fastapi.md runs (tests/test_docs_examples.py) the very file this module tests."""
    guide = (ROOT / "docs" / "fastapi.md").read_text(encoding="utf-8")
    example = (ROOT / "examples" / "fastapi_app.py").read_text(encoding="utf-8")
    assert f"```python\n{example}```" in guide
