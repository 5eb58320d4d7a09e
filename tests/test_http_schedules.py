"""The schedules over HTTP (``app.asgi()``, in process through httpx's ASGI transport), on each backend:
list, get, create or update, pause, resume, delete; bad input gets the API's typed JSON errors (400, 404,
415) and writes nothing; the token rule holds for these endpoints as for the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

import geste

MakeApp = Callable[..., geste.App]


@pytest.fixture(autouse=True)
def _no_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("GESTE_HTTP_TOKEN", raising=False)
    yield


def build(make_app: MakeApp) -> geste.App:
    app = make_app()

    @app.workflow
    async def report(ctx: geste.WorkflowContext, tick: datetime) -> str:
        return tick.isoformat()

    @app.workflow
    async def two(ctx: geste.WorkflowContext, a: int, b: int) -> int:
        return a + b

    return app


@contextlib.asynccontextmanager
async def serving(app: geste.App, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app.asgi(**options))
    async with app, httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        yield http


def error_of(response: httpx.Response, status: int, type_: str, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_ and fragment in error["message"], error


async def test_create_list_pause_resume_delete(make_app: MakeApp) -> None:
    app = build(make_app)
    async with serving(app) as http:
        assert (await http.get("/schedules")).json() == {"schedules": []}
        body = {"workflow": "report", "cron": "0 2 * * *", "timezone": "Europe/Paris", "missed": "all"}
        created = await http.post("/schedules/nightly", json=body)
        assert created.status_code == 201, created.text
        assert created.headers["location"] == "/schedules/nightly"
        shown = created.json()
        assert {k: shown[k] for k in ("name", "workflow_name", "cron", "timezone", "missed", "overlap")} == {
            "name": "nightly",
            "workflow_name": "report",
            "cron": "0 2 * * *",
            "timezone": "Europe/Paris",
            "missed": "all",
            "overlap": "skip",
        }
        assert shown["paused"] is False and shown["last_instance_id"] is None
        (info,) = await app.list_schedules()
        assert shown["next_tick"] == info.next_tick.isoformat()
        assert (await http.get("/schedules")).json() == {"schedules": [shown]}
        assert (await http.get("/schedules/nightly")).json() == shown

        paused = await http.post("/schedules/nightly/pause")
        assert paused.status_code == 200 and paused.json()["paused"] is True
        assert [s.paused for s in await app.list_schedules()] == [True]
        assert (shown["queue"], shown["priority"], shown["waiting"]) == (None, 0, 0)
        body = {
            "workflow": "report",
            "cron": "0 3 * * *",
            "overlap": "queue",
            "queue": "reports",
            "priority": -2,
        }
        updated = await http.post("/schedules/nightly", json=body)
        assert updated.status_code == 200  # an update: paused still
        assert (updated.json()["cron"], updated.json()["paused"]) == ("0 3 * * *", True)
        assert {k: updated.json()[k] for k in ("overlap", "queue", "priority", "waiting")} == {
            "overlap": "queue",
            "queue": "reports",
            "priority": -2,
            "waiting": 0,
        }
        (info,) = await app.list_schedules()
        assert (info.overlap, info.queue, info.priority) == ("queue", "reports", -2)
        resumed = await http.post("/schedules/nightly/resume")
        assert resumed.status_code == 200 and resumed.json()["paused"] is False
        deleted = await http.delete("/schedules/nightly")
        assert deleted.status_code == 200 and deleted.json() == {"name": "nightly", "deleted": True}
        assert await app.list_schedules() == []


async def test_an_unknown_schedule_is_a_404(make_app: MakeApp) -> None:
    async with serving(build(make_app)) as http:
        error_of(await http.get("/schedules/nope"), 404, "ScheduleNotFoundError", "no schedule named 'nope'")
        for path in ("/schedules/nope/pause", "/schedules/nope/resume"):
            error_of(await http.post(path), 404, "ScheduleNotFoundError")
        error_of(await http.delete("/schedules/nope"), 404, "ScheduleNotFoundError")
        error_of(await http.put("/schedules/nope"), 405, "MethodNotAllowed")


@pytest.mark.parametrize(
    ("body", "status", "type_", "fragment"),
    [
        ({"workflow": "report", "cron": "not a cron"}, 400, "InvalidScheduleError", "bad cron expression"),
        ({"workflow": "report", "cron": "0 * * * *", "timezone": "Mars/Olympus"}, 400, "InvalidScheduleError",
         "unknown time zone"),
        ({"workflow": "report", "cron": "0 * * * *", "missed": "sometimes"}, 400, "InvalidScheduleError",
         "missed must be one of"),
        ({"workflow": "report", "cron": "0 * * * *", "overlap": "sometimes"}, 400, "InvalidScheduleError",
         "overlap must be one of"),
        ({"workflow": "report", "cron": "0 * * * *", "queue": 3}, 400, "BadRequest",
         "queue must be a string or null"),
        ({"workflow": "report", "cron": "0 * * * *", "queue": "q", "priority": "1"}, 400, "BadRequest",
         "priority must be an integer"),
        ({"workflow": "report", "cron": "0 * * * *", "priority": 1}, 400, "InvalidScheduleError",
         "apply to a start onto a queue"),
        ({"workflow": "two", "cron": "0 * * * *"}, 400, "InvalidScheduleError", "takes 2 arguments"),
        ({"workflow": "nope", "cron": "0 * * * *"}, 404, "UnknownWorkflowError", "no workflow named 'nope'"),
        ({"cron": "0 * * * *"}, 400, "BadRequest", "workflow is required"),
        ({"workflow": "report"}, 400, "BadRequest", "cron is required"),
        ({"workflow": "report", "cron": 5}, 400, "BadRequest", "cron must be a string"),
        ({"workflow": "report", "cron": "0 * * * *", "every": 1}, 400, "BadRequest",
         "unknown field(s) every"),
        (["report"], 400, "BadRequest", "the body must be a JSON object"),
        (None, 400, "BadRequest", "the body must be a JSON object"),
    ],
)  # fmt: skip
async def test_bad_input_is_refused_and_writes_nothing(
    make_app: MakeApp, body: Any, status: int, type_: str, fragment: str
) -> None:
    app = build(make_app)
    async with serving(app) as http:
        sent = await http.post("/schedules/job", **({} if body is None else {"json": body}))
        error_of(sent, status, type_, fragment)
        assert await app.list_schedules() == []


async def test_a_body_that_is_not_json(make_app: MakeApp) -> None:
    app = build(make_app)
    async with serving(app) as http:
        sent = await http.post("/schedules/job", content=b"cron", headers={"content-type": "text/plain"})
        error_of(sent, 415, "UnsupportedMediaType")
        assert await app.list_schedules() == []


async def test_the_token_guards_the_schedules(make_app: MakeApp) -> None:
    app = build(make_app)
    async with serving(app, token="s3cret") as http:
        body = {"workflow": "report", "cron": "0 * * * *"}
        error_of(await http.post("/schedules/job", json=body), 401, "Unauthorized")
        error_of(await http.get("/schedules"), 401, "Unauthorized")
        assert await app.list_schedules() == []
        auth = {"authorization": "Bearer s3cret"}
        assert (await http.post("/schedules/job", json=body, headers=auth)).status_code == 201
        error_of(await http.delete("/schedules/job"), 401, "Unauthorized")
        assert (await http.delete("/schedules/job", headers=auth)).status_code == 200
