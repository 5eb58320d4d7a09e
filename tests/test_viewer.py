"""The web viewer (``/ui``), in process through httpx's ASGI transport, on both backends: filters, keyset
paging while instances are added, what each kind of wait shows, the timeline, escaping of hostile values,
404s, the token and the session cookie, and the indexes behind the list (EXPLAIN on 100,000 rows)."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import geste
from geste.http import _viewer
from geste.storage.base import InstanceFilter

from .conftest import POSTGRES_URL, die_with_parent
from .support import MovableClock, wait_status
from .viewer_demo import seed

MakeApp = Callable[..., geste.App]
BROWSER = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
TOKEN = "s3cret-viewer-token"
HOSTILE = '<script>alert("pwned")</script>'


@pytest.fixture(autouse=True)
def _no_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GESTE_HTTP_TOKEN", raising=False)


def client(app: geste.App, *, base_url: str = "http://127.0.0.1:8000", **options: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app.asgi(**options))
    return httpx.AsyncClient(transport=transport, base_url=base_url)


@contextlib.asynccontextmanager
async def serving(app: geste.App, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app, client(app, **options) as http:
        yield http


async def page(http: httpx.AsyncClient, url: str, status: int = 200, **kwargs: Any) -> str:
    answer = await http.get(url, headers={**BROWSER, **kwargs.pop("headers", {})}, **kwargs)
    assert answer.status_code == status, (url, answer.status_code, answer.text[:500])
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert_safe_page(answer)
    return answer.text


def assert_safe_page(answer: httpx.Response) -> None:
    """No script, no inline handler, and the headers that keep it so."""
    csp = answer.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "unsafe" not in csp
    assert "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["referrer-policy"] == "same-origin"
    body = answer.text
    assert "<script" not in body.lower()
    assert not re.search(r"<[^>]*\son[a-z]+\s*=", body, re.IGNORECASE), "an inline event handler"
    assert "javascript:" not in body.lower()


def ids_on(text: str) -> list[str]:
    """The instance ids of a list page's rows, in order."""
    return [
        unquote(html.unescape(m))
        for m in re.findall(r'<td class="id mono"><a href="/ui/instances/([^"]*)">', text)
    ]


def counts_on(text: str) -> dict[str, str]:
    return dict(re.findall(r'<span class="dot s-(\w+)"></span>\w+<b>([\d,+]+)</b>', text))


def pager_link(text: str, rel: str) -> str | None:
    found = re.search(rf'<a href="([^"]*)" rel="{rel}">', text)
    return html.unescape(found.group(1)) if found else None


def now_panel(text: str) -> str:
    found = re.search(r'<section class="panel now[^"]*">(.*?)</section>', text, re.DOTALL)
    assert found, "no Now panel"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1)))


def plain(text: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", text))


# -- seeding rows straight into the table -------------------------------------------------------------
async def insert_instances(db_url: str, rows: list[tuple[str, str, str, float]]) -> None:
    """``(instance_id, workflow_name, status, created_at)`` rows, inserted past geste (in one go)."""
    finished = ("completed", "failed", "cancelled")
    values = [
        (
            iid,
            name,
            status,
            json.dumps({"args": [iid], "kwargs": {}}),
            at,
            at + 1,
            at + 1 if status in finished else None,
        )
        for iid, name, status, at in rows
    ]
    query = (
        "INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at, "
        "finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
    )
    if db_url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(db_url.removeprefix("sqlite:///"))) as conn, conn:
            conn.executemany(re.sub(r"\$\d", "?", query), values)
        return
    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(db_url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
    try:
        await conn.executemany(query, values)
    finally:
        await conn.close()


STATUSES = ["completed", "failed", "waiting", "running", "cancelled", "pending"]


def catalogue(n: int, *, start: float = 1_000_000.0) -> list[tuple[str, str, str, float]]:
    """``n`` instances: two workflows, statuses in turn, created one second apart, three at a time
    sharing a created_at (the ties the instance id breaks)."""
    return [
        (f"i-{i:04d}", "alpha" if i % 3 else "beta", STATUSES[i % len(STATUSES)], start + (i // 3))
        for i in range(n)
    ]


def newest_first(rows: list[tuple[str, str, str, float]]) -> list[str]:
    return [r[0] for r in sorted(rows, key=lambda r: (r[3], r[0]), reverse=True)]


# -- the list -----------------------------------------------------------------------------------------
def utc_field(ts: float) -> str:
    """A ``datetime-local`` value (UTC) for Unix seconds."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S")


async def test_the_list_filters_by_workflow_status_and_created_range(make_app: MakeApp, db_url: str) -> None:
    rows = catalogue(90)
    t0 = rows[0][3]
    app = make_app(run_worker=False, clock=lambda: t0 + 100)
    async with serving(app) as http:
        await insert_instances(db_url, rows)
        # (workflow, status, created from, created before)
        cases: list[tuple[str | None, str | None, float | None, float | None]] = [
            (None, None, None, None),
            ("beta", None, None, None),
            (None, "failed", None, None),
            ("alpha", "waiting", None, None),
            (None, None, t0 + 5, t0 + 12),
            ("alpha", "completed", t0 + 3, t0 + 25),
            ("nope", None, None, None),
        ]
        for workflow, status, lo, hi in cases:
            params = {"limit": "200"}
            if workflow:
                params["workflow"] = workflow
            if status:
                params["status"] = status
            if lo is not None and hi is not None:
                params |= {"from": utc_field(lo), "to": utc_field(hi)}

            def kept(
                r: tuple[str, str, str, float], workflow: str | None = workflow, lo: Any = lo, hi: Any = hi
            ) -> bool:
                return workflow in (None, r[1]) and (lo is None or lo <= r[3] < hi)

            text = await page(http, "/ui", params=params)
            assert ids_on(text) == newest_first([r for r in rows if kept(r) and status in (None, r[2])]), (
                params
            )
            # the counts per status follow the workflow and the time range, not the status filter
            shown = counts_on(text)
            assert {s: int(shown[s]) for s in STATUSES} == {
                s: sum(1 for r in rows if kept(r) and r[2] == s) for s in STATUSES
            }, params
            if not ids_on(text):
                assert "No instance matches." in text
        # the filters are written back into the form, and the workflow names offered
        text = await page(
            http, "/ui", params={"workflow": "alpha", "status": "failed", "from": utc_field(t0)}
        )
        assert 'name="workflow" value="alpha"' in text
        assert '<option value="failed" selected>failed</option>' in text
        assert f'name="from" value="{utc_field(t0)}"' in text
        assert '<option value="alpha"></option><option value="beta"></option>' in text


async def test_counts_stop_at_the_cap(
    make_app: MakeApp, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_viewer, "COUNT_CAP", 10)
    app = make_app(run_worker=False)
    async with serving(app) as http:
        await insert_instances(
            db_url, [(f"c-{i}", "w", "completed" if i < 15 else "failed", 1e6 + i) for i in range(25)]
        )
        shown = counts_on(await page(http, "/ui"))
        assert shown["completed"] == "10+" and shown["failed"] == "10" and shown["waiting"] == "0"


async def test_keyset_pages_have_no_duplicate_and_no_gap_while_instances_are_added(
    make_app: MakeApp, db_url: str
) -> None:
    present = catalogue(47)
    app = make_app(run_worker=False)
    async with serving(app) as http:
        await insert_instances(db_url, present)
        for round_, params in enumerate(({}, {"workflow": "alpha"}, {"status": "completed"})):
            wanted = [
                r[0]
                for r in sorted(present, key=lambda r: (r[3], r[0]), reverse=True)
                if params.get("workflow") in (None, r[1]) and params.get("status") in (None, r[2])
            ]
            first = "/ui?" + "&".join([*(f"{k}={v}" for k, v in params.items()), "limit=5"])
            seen: list[str] = []
            url: str | None = first
            while url is not None:
                text = await page(http, url)
                seen += ids_on(text)
                # newer instances arrive between two pages (completed, of both workflows: every filter
                # tried here takes some of them)
                new = [
                    (
                        f"new-{round_}-{len(seen)}-{k}",
                        "alpha" if k % 2 else "beta",
                        "completed",
                        2e6 + len(present),
                    )
                    for k in range(2)
                ]
                await insert_instances(db_url, new)
                present += new
                url = pager_link(text, "next")
            assert seen == wanted, params  # every one, in order, once: nothing added shifted a page

            # back up from the oldest page with "Newer", page by page, to the newest
            text = await page(http, first)
            while (url := pager_link(text, "next")) is not None:
                text = await page(http, url)
            back = [ids_on(text)]
            while (url := pager_link(text, "prev")) is not None:
                text = await page(http, url)
                back.append(ids_on(text))
            flat = [i for part in reversed(back) for i in part]
            assert len(set(flat)) == len(flat)
            assert [i for i in flat if i in wanted] == wanted, params
            assert ids_on(text) == ids_on(await page(http, first))  # the last "Newer" is the first page


async def test_the_storage_pages_by_key_in_both_directions(make_app: MakeApp, db_url: str) -> None:
    rows = catalogue(40)
    app = make_app(run_worker=False)
    async with app:
        await insert_instances(db_url, rows)
        storage = app.storage
        for which in (
            InstanceFilter(),
            InstanceFilter(workflow_name="alpha"),
            InstanceFilter(status=geste.Status.FAILED),
            InstanceFilter(workflow_name="beta", status=geste.Status.COMPLETED),
            InstanceFilter(created_from=1_000_002.0, created_to=1_000_009.0),
        ):
            every = await storage.page_instances(which, limit=1000)
            keys = [(s.created_at, s.instance_id) for s in every]
            assert keys == sorted(keys, reverse=True) and len(set(keys)) == len(keys)
            assert all(
                (which.workflow_name in (None, s.workflow_name)) and (which.status in (None, s.status))
                for s in every
            )
            for size in (1, 3, 7):
                walked, key = [], None
                while True:
                    part = await storage.page_instances(which, before=key, limit=size)
                    if not part:
                        break
                    walked += part
                    key = (part[-1].created_at, part[-1].instance_id)
                assert walked == every, (which, size)
                if every:  # after the oldest key: the newer ones, newest first, the nearest last
                    older = every[-1]
                    above = await storage.page_instances(
                        which, after=(older.created_at, older.instance_id), limit=size
                    )
                    assert above == every[-1 - size : -1] if len(every) > size else every[:-1]
        counts = await storage.count_instances(InstanceFilter(workflow_name="beta"), cap=1000)
        assert counts[geste.Status.COMPLETED] == sum(
            1 for r in rows if r[1] == "beta" and r[2] == "completed"
        )
        assert await storage.workflow_names(limit=10) == ["alpha", "beta"]
        assert await storage.workflow_names(limit=1) == ["alpha"]
        summary = (await storage.page_instances(InstanceFilter(), limit=1))[0]
        assert json.loads(summary.input_head) == {"args": [summary.instance_id], "kwargs": {}}


async def test_bad_list_parameters_get_a_400_page(make_app: MakeApp) -> None:
    app = make_app(run_worker=False)
    async with serving(app) as http:
        for params, says in [
            ({"status": "sleeping"}, "unknown status"),
            ({"limit": "0"}, "limit must be"),
            ({"limit": "100000"}, "limit must be"),
            ({"from": "yesterday"}, "from must be a date"),
            ({"from": "0001-01-01T00:00+05:00"}, "from must be a date"),  # before year 1 in UTC
            ({"to": "9999-12-31T23:59-05:00"}, "to must be a date"),  # after year 9999 in UTC
            ({"before": "nope"}, "page key"),
            ({"before": "inf:x"}, "page key"),
            ({"before": "1.0:a", "after": "2.0:b"}, "not both"),
        ]:
            assert says in plain(await page(http, "/ui", 400, params=params)), params
        answer = await http.get("/ui", params={"status": "sleeping"})  # not a browser: the JSON error
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "BadRequest"
        answer = await http.get("/ui", params={"nope": "1"}, headers=BROWSER)
        assert answer.status_code == 400


# -- one instance -------------------------------------------------------------------------------------
async def test_each_kind_of_wait_and_the_timeline_are_shown(make_app: MakeApp, db_url: str) -> None:
    ids = await seed(db_url)
    app = make_app(run_worker=False)
    async with serving(app) as http:
        now = now_panel(await page(http, f"/ui/instances/{ids['waiting_event']}"))
        assert 'An event of type parcel.shipped whose data has {"order_id": "ORD-1043"}' in now
        assert "it times out in 6 d 23 h" in now

        now = now_panel(await page(http, f"/ui/instances/{ids['waiting_timer']}"))
        assert re.search(r"Its timer of 3 d \(step 2\): due in 2 d 23 h, \d{4}-\d\d-\d\d [\d:.]+ UTC", now), (
            now
        )

        text = await page(http, f"/ui/instances/{ids['waiting_channel']}")
        now = now_panel(text)
        assert "A message on channel ledger (competing), since" in now and "it times out in 23 h" in now
        timeline = plain(text)
        assert "message received on  ledger" in timeline and "bookkeeper-1" in timeline
        assert 'href="/ui/instances/bookkeeper-1"' in text  # the sender, linked
        assert "waiting now" in timeline

        text = await page(http, f"/ui/instances/{ids['sender']}")
        assert re.search(r"sent on\s*</span><code>ledger</code> to <a href=\"/ui/instances/ledger-1\">", text)
        assert "taken by" in plain(text)

        text = await page(http, f"/ui/instances/{ids['completed']}")
        assert "it waits for nothing" in now_panel(text)
        timeline = plain(text)
        for shown in (
            'reserve_stock("ORD-1041", 2)',
            'charge_card("ORD-1041", 18.5)',
            "2 attempts",
            "waits for event  parcel.shipped",
            "event received  parcel.shipped",
            "published on  orders",
            "event emitted  order.shipped",
            "delivered",
            '"tracking": "JD0142"',
        ):
            assert shown in timeline, shown

        text = await page(http, f"/ui/instances/{ids['failed']}")
        timeline = plain(text)
        assert "PaymentDeclined: card declined for ORD-1044" in timeline
        assert "compensating, newest first" in timeline
        assert 'compensation  release_stock("rsv-ORD-1044-2")' in timeline
        assert "<summary>Traceback</summary>" in text and "Traceback (most recent call last)" in text
        assert re.search(r"<details><summary>Traceback</summary>", text)  # folded: no `open`


async def test_a_running_instance_shows_its_lease_holder_and_a_pending_one_its_queue(
    make_app: MakeApp, db_url: str
) -> None:
    gate = asyncio.Event()
    app = make_app()

    @app.activity
    async def slow(ctx: geste.ActivityContext) -> str:
        await gate.wait()
        return "done"

    @app.workflow
    async def busy(ctx: geste.WorkflowContext) -> str:
        return await slow(ctx)

    async with serving(app) as http:
        await busy.start_with_id("busy-1")
        await wait_status(app, "busy-1", geste.Status.RUNNING)
        now = now_panel(await page(http, "/ui/instances/busy-1"))
        assert f"Running on worker {app.worker_id}; its lease runs until in " in now
        text = await page(http, "/ui", params={"status": "running"})
        assert ids_on(text) == ["busy-1"] and f"on {app.worker_id}"[:40] in plain(text)
        gate.set()
        await app.get_handle("busy-1").result(timeout=10)
        assert "it waits for nothing" in now_panel(await page(http, "/ui/instances/busy-1"))

    client_app = make_app(run_worker=False)
    client_app.workflow(name="busy")(busy.fn)
    async with serving(client_app) as http:
        await client_app.start_workflow("busy", instance_id="queued-1")
        assert "Not started: ready for a worker to claim it (runnable" in now_panel(
            await page(http, "/ui/instances/queued-1")
        )


async def test_an_unknown_instance_is_a_404(make_app: MakeApp) -> None:
    app = make_app(run_worker=False)
    async with serving(app) as http:
        text = await page(http, "/ui/instances/nobody", 404)
        assert "There is no instance 'nobody'." in plain(text)
        answer = await http.get("/ui/instances/nobody")
        assert answer.status_code == 404 and answer.json()["error"]["type"] == "InstanceNotFoundError"
        assert (await http.get("/ui/instances/a%00b")).status_code == 400
        assert (await http.get("/ui/nope", headers=BROWSER)).status_code == 404
        assert (await http.post("/ui", headers=BROWSER)).status_code == 405


async def test_hostile_values_are_shown_escaped_everywhere(make_app: MakeApp, db_url: str) -> None:
    app = make_app()

    @app.activity
    async def echo(ctx: geste.ActivityContext, value: str) -> str:
        return value

    @app.activity(retry=geste.RetryPolicy(max_attempts=1))
    async def explode(ctx: geste.ActivityContext, value: str) -> None:
        raise ValueError(value)

    @app.workflow(name=f"wf{HOSTILE}")
    async def hostile(ctx: geste.WorkflowContext, value: str) -> str:
        await echo(ctx, value)
        await ctx.publish(f"ch{HOSTILE}", {"html": value})
        await ctx.send_event(f"type{HOSTILE}", {"html": value}, subject=HOSTILE)
        event = await ctx.wait_event(f"ev{HOSTILE}", match={"k": value})
        await explode(ctx, str(event.data))
        return value

    iid = f"id{HOSTILE}&'\"/?#%"
    escaped = html.escape(HOSTILE, quote=True)
    async with serving(app) as http:
        await hostile.start_with_id(iid, HOSTILE)
        await wait_status(app, iid, geste.Status.WAITING)
        instance_page = f"/ui/instances/{quote(iid, safe='')}"
        texts = [
            await page(http, "/ui"),
            await page(http, "/ui", params={"workflow": HOSTILE}),
            await page(http, "/ui", params={"workflow": f"wf{HOSTILE}"}),
            await page(http, instance_page),
        ]
        assert ids_on(texts[2]) == [iid]  # its link leads to it
        assert f"An event of type ev{HOSTILE} whose data has" in now_panel(texts[3])
        await app.send_event(f"ev{HOSTILE}", {"k": HOSTILE, "more": HOSTILE})
        await wait_status(app, iid, geste.Status.FAILED)
        texts.append(await page(http, instance_page))
        texts.append(await page(http, f"/ui/instances/{quote(HOSTILE, safe='')}", 404))
        for text in texts:
            assert "<script>" not in text and HOSTILE not in text
            assert escaped in text
        failed = plain(texts[4])
        assert f"ValueError: {{'k': '{HOSTILE}'" in failed  # the error, its message as text
        for shown in (f"ch{HOSTILE}", f"type{HOSTILE}", f"ev{HOSTILE}", f"wf{HOSTILE}", iid):
            assert shown in failed, shown
        assert HOSTILE in plain(texts[1])  # the filter written back, as text


async def test_unreadable_history_rows_are_shown_not_a_500(make_app: MakeApp, db_url: str) -> None:
    app = make_app(run_worker=False)
    async with serving(app) as http:
        await insert_instances(db_url, [("broken", "w", "failed", 1e6)])
        query = (
            "INSERT INTO geste_history (instance_id, seq, kind, name, payload, is_error, created_at) "
            "VALUES ('broken', 1, 'activity', 'a', 'not json', false, 1000000.5), "
            "('broken', 2, 'weird', 'b', '[1, 2]', false, 1000000.6), "
            "('broken', 3, 'sleep', 'sleep', '{\"seconds\": \"x\"}', false, 1000000.7)"
        )
        if db_url.startswith("sqlite"):
            with contextlib.closing(sqlite3.connect(db_url.removeprefix("sqlite:///"))) as conn, conn:
                conn.execute(query.replace("false", "0"))
        else:
            from .support import raw_query

            await raw_query(db_url, query)
        text = plain(await page(http, "/ui/instances/broken"))
        assert "unreadable row" in text and "weird" in text and "sleep" in text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    params=st.dictionaries(
        st.sampled_from(["workflow", "status", "from", "to", "limit", "before", "after", "x"]),
        st.one_of(
            st.sampled_from(["", "1", "-1", "nan", "1e999", "waiting", "2026-01-01T00:00", "1.5:a", "inf:b"]),
            st.text(max_size=12).filter(lambda t: "\x00" not in t),
        ),
        max_size=4,
    )
)
def test_fuzzed_list_queries_are_answered_with_a_page_never_a_500(
    tmp_path: Any, params: dict[str, str]
) -> None:
    async def go() -> None:
        app = geste.App(f"sqlite:///{tmp_path / 'fuzz.db'}", run_worker=False)
        async with serving(app) as http:
            answer = await http.get("/ui", params=params, headers=BROWSER)
            assert answer.status_code in (200, 400), (params, answer.text[:300])
            assert_safe_page(answer)

    asyncio.run(go())


# -- the token and the session cookie -----------------------------------------------------------------
def cookie_of(answer: httpx.Response) -> tuple[str, str]:
    header = answer.headers["set-cookie"]
    value = header.split(";", 1)[0]
    return value, header


async def test_without_a_token_the_viewer_is_open(make_app: MakeApp) -> None:
    app = make_app(run_worker=False)
    async with serving(app) as http:
        await page(http, "/ui")
        answer = await http.post("/ui/login", data={"next": "/ui?status=failed"})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui?status=failed"
        assert "set-cookie" not in answer.headers
        assert "Sign out" not in await page(http, "/ui")


async def test_with_a_token_a_browser_signs_in_and_its_cookie_opens_the_viewer_only(
    make_app: MakeApp,
) -> None:
    clock = MovableClock()
    app = make_app(run_worker=False, clock=clock)
    async with serving(app, token=TOKEN) as http:
        # no credentials: the sign-in form for a browser, the API's JSON 401 for anything else
        answer = await http.get("/ui/instances/x?y=1", headers=BROWSER)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == 'Bearer realm="geste"'
        assert_safe_page(answer)
        assert 'action="/ui/login"' in answer.text and 'type="password"' in answer.text
        assert 'name="next" value="/ui/instances/x?y=1"' in answer.text
        answer = await http.get("/ui")
        assert answer.status_code == 401 and answer.json()["error"]["type"] == "Unauthorized"
        # the API's header works on the viewer too
        assert (
            await http.get("/ui", headers={**BROWSER, "authorization": f"Bearer {TOKEN}"})
        ).status_code == 200

        # a wrong token: the form again, no cookie
        answer = await http.post("/ui/login", data={"token": "wrong", "next": "/ui"}, headers=BROWSER)
        assert answer.status_code == 401 and "set-cookie" not in answer.headers
        assert "That is not the server's token." in plain(answer.text)
        answer = await http.post("/ui/login", data={"token": "é", "next": "/ui"})
        assert answer.status_code == 401

        # the right one: a cookie that is not the token, and back where the browser was
        answer = await http.post(
            "/ui/login", data={"token": TOKEN, "next": "/ui?status=failed"}, headers=BROWSER
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/ui?status=failed"
        cookie, header = cookie_of(answer)
        assert TOKEN not in header
        attributes = [part.strip() for part in header.split(";")[1:]]
        assert attributes == ["Max-Age=43200", "Path=/ui", "HttpOnly", "SameSite=Strict"]
        signed_in = {**BROWSER, "cookie": cookie}
        text = await page(http, "/ui", headers=signed_in)
        assert "Sign out" in text
        assert (await http.get("/ui/instances/x", headers=signed_in)).status_code == 404
        # the cookie opens the viewer, never the API
        for method, path in [("GET", "/instances"), ("GET", "/instances/x"), ("POST", "/instances/x/cancel")]:
            answer = await http.request(method, path, headers={"cookie": cookie})
            assert answer.status_code == 401, (method, path)

        # a forged or altered cookie is refused; so is one past its 12 hours
        expires, _, mac = cookie.partition("=")[2].partition(".")
        for forged in [f"{int(expires) + 10}.{mac}", f"{expires}.{'0' * len(mac)}", f"{expires}.", TOKEN, ""]:
            answer = await http.get("/ui", headers={**BROWSER, "cookie": f"geste_viewer={forged}"})
            assert answer.status_code == 401, forged
        assert (
            await http.get("/ui", headers={**BROWSER, "cookie": f"a=b; {cookie}; c=d"})
        ).status_code == 200
        clock.advance(12 * 3600 + 1)
        assert (await http.get("/ui", headers=signed_in)).status_code == 401

        # signing out drops the cookie
        answer = await http.post("/ui/logout", headers={"authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui"
        assert "Max-Age=0" in answer.headers["set-cookie"]


async def test_sign_in_goes_back_to_viewer_pages_only_and_refuses_other_sites(make_app: MakeApp) -> None:
    app = make_app(run_worker=False)
    async with serving(app, token=TOKEN) as http:
        for next_url, location in [
            ("//evil.example/ui", "/ui"),
            ("https://evil.example/ui", "/ui"),
            ("/uix", "/ui"),
            ("/ui\\@evil", "/ui"),
            ("/instances", "/ui"),
            ("/ui/../instances", "/ui"),
            ("/ui/%2e%2E/instances", "/ui"),
            ("/ui/instances/.x.", "/ui/instances/.x."),
            ("", "/ui"),
            ("/ui/instances/a b", "/ui/instances/a%20b"),
            ("/ui?workflow=é", "/ui?workflow=%C3%A9"),
        ]:
            answer = await http.post("/ui/login", data={"token": TOKEN, "next": next_url})
            assert answer.status_code == 303 and answer.headers["location"] == location, next_url
        # a sign-in posted by another site's page is refused before the token is even looked at
        answer = await http.post(
            "/ui/login", data={"token": TOKEN}, headers={"origin": "http://evil.example", **BROWSER}
        )
        assert answer.status_code == 403 and "set-cookie" not in answer.headers
    async with app, client(app, base_url="https://127.0.0.1:8443", token=TOKEN) as https:
        answer = await https.post("/ui/login", data={"token": TOKEN})
        assert answer.headers["set-cookie"].endswith("; Secure")


# -- the indexes ---------------------------------------------------------------------------------------
SEED_100K = """
INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at)
SELECT 'inst-' || lpad(i::text, 6, '0'),
       (ARRAY['checkout', 'refund', 'ledger', 'reminder'])[1 + i % 4],
       (ARRAY['completed', 'completed', 'completed', 'failed', 'waiting', 'cancelled', 'running'])[1 + i % 7],
       '{"args": [], "kwargs": {}}', 1.7e9 + i * 0.5, 1.7e9 + i * 0.5
FROM generate_series(1, 100000) AS i
"""


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += _plan_nodes(child)
    return nodes


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_each_list_query_is_an_index_range_scan_on_postgres(pg_url: str, plan_cache_mode: str) -> None:
    """EXPLAIN on 100,000 instances: every page query (each filter combination, both directions) reads
    its own index in the sort's order, with no sort, no filter and no sequential scan, with the plans
    asyncpg's prepared statements may get (custom or generic); so do the capped counts."""
    import asyncpg

    from geste.storage.postgres import _QUERIES, parse_postgres_url

    app = geste.App(pg_url, run_worker=False)
    async with app:
        pass  # migrated
    dsn, options = parse_postgres_url(pg_url)
    schema = options["schema"]
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        await conn.execute(SEED_100K)
        await conn.execute("ANALYZE geste_instances")
        await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
        key = (1.7e9 + 60_000.0, "inst-060000")
        indexes = {
            "all": "geste_instances_by_created",
            "workflow": "geste_instances_by_name",
            "status": "geste_instances_by_status",
            "workflow_status": "geste_instances_by_name_status",
        }
        for combo, index in indexes.items():
            filters = {
                "all": [],
                "workflow": ["ledger"],
                "status": ["failed"],
                "workflow_status": ["ledger", "failed"],
            }[combo]
            for direction, bound in (("older", 1.7e9), ("newer", float("inf"))):
                name = f"page_instances_{combo}_{direction}"
                sql = _QUERIES[name].replace("{schema}", f'"{schema}"')
                statement = await conn.prepare(f"EXPLAIN (FORMAT JSON) {sql}")
                for _ in range(6):  # past the point where a prepared statement may switch to a generic plan
                    found = await statement.fetchval(*key, bound, 50, 200, *filters)
                nodes = _plan_nodes(json.loads(found)[0]["Plan"])
                types = [node["Node Type"] for node in nodes]
                assert "Seq Scan" not in types and "Sort" not in types and "Incremental Sort" not in types, (
                    name,
                    types,
                )
                scans = [node for node in nodes if node["Node Type"] in ("Index Scan", "Index Only Scan")]
                assert [node["Index Name"] for node in scans] == [index], (name, types)
                assert "Index Cond" in scans[0] and "created_at" in scans[0]["Index Cond"], name
                assert "Filter" not in scans[0], (name, scans[0].get("Filter"))
        # The capped counts, once the table is vacuumed (as autovacuum keeps it): an index-only scan of
        # each status's entries, stopped at the cap, for the frequent statuses and the absent ones alike.
        await conn.execute("VACUUM ANALYZE geste_instances")
        for name, index, workflow in (
            ("count_instances_all", "geste_instances_by_status", []),
            ("count_instances_workflow", "geste_instances_by_name_status", ["ledger"]),
        ):
            sql = _QUERIES[name].replace("{schema}", f'"{schema}"')
            statuses = [s.value for s in geste.Status]  # compensating and pending have no row at all
            statement = await conn.prepare(f"EXPLAIN (FORMAT JSON) {sql}")
            for _ in range(6):
                found = await statement.fetchval(-float("inf"), float("inf"), 10_001, statuses, *workflow)
            nodes = _plan_nodes(json.loads(found)[0]["Plan"])
            types = [node["Node Type"] for node in nodes]
            assert "Seq Scan" not in types and "Sort" not in types, (name, types)
            scans = [node["Index Name"] for node in nodes if "Index Name" in node]
            assert scans == [index], (name, types)
    finally:
        await conn.close()


def test_each_list_query_uses_its_index_on_sqlite(tmp_path: Any) -> None:
    from geste.storage.sqlite import Q

    async def migrate() -> None:
        async with geste.App(f"sqlite:///{tmp_path / 'plan.db'}", run_worker=False):
            pass

    asyncio.run(migrate())
    with contextlib.closing(sqlite3.connect(tmp_path / "plan.db")) as conn:
        params = {
            "key_at": 1.0,
            "key_id": "",
            "bound": 0.0,
            "limit": 50,
            "head": 200,
            "f1": "a",
            "f2": "failed",
        }
        for combo, index in (
            ("all", "geste_instances_by_created"),
            ("workflow", "geste_instances_by_name"),
            ("status", "geste_instances_by_status"),
            ("workflow_status", "geste_instances_by_name_status"),
        ):
            for direction in ("older", "newer"):
                plan = " / ".join(
                    r[3]
                    for r in conn.execute(
                        "EXPLAIN QUERY PLAN " + Q[f"page_instances_{combo}_{direction}"], params
                    )
                )
                assert f"USING INDEX {index} (" in plan and "TEMP B-TREE" not in plan, (
                    combo,
                    direction,
                    plan,
                )
                assert "(created_at,instance_id)" in plan, plan


async def test_the_viewer_pages_100000_instances_on_postgres(pg_url: str) -> None:
    """The list over the seeded table, filtered, and the next page by its key (the EXPLAIN test above
    says why it is fast; this one that it is right)."""
    app = geste.App(pg_url, run_worker=False)
    async with app:
        from .support import raw_query

        await raw_query(pg_url, SEED_100K)
        matching = [i for i in range(1, 100_001) if i % 4 == 2 and i % 7 == 3]  # ledger, failed
        async with client(app) as http:
            text = await page(http, "/ui", params={"workflow": "ledger", "status": "failed"})
            assert ids_on(text) == [f"inst-{i:06d}" for i in matching[::-1][:50]]
            assert (
                len(matching) > _viewer.COUNT_CAP and counts_on(text)["failed"] == f"{_viewer.COUNT_CAP:,}+"
            )
            older = pager_link(text, "next")
            assert older is not None
            text = await page(http, older)
            assert ids_on(text) == [f"inst-{i:06d}" for i in matching[::-1][50:100]]


def test_the_viewer_benchmark_runs_at_a_tiny_size() -> None:
    """benchmarks/viewer.py end to end on both backends, 300 instances, one run: it seeds, renders every
    page (each answered 200) and prints its table."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "viewer.py"), "--instances", "300", "--runs", "1"],
        env={**os.environ, "GESTE_BENCH_POSTGRES_URL": POSTGRES_URL},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=die_with_parent,
    )
    assert done.returncode == 0, done.stderr
    assert "| page | sqlite | postgres |" in done.stdout
    for row in ("first page", "deep page (key, 90 % down)", "filtered page", "API ?offset="):
        assert f"| {row}" in done.stdout, row


async def test_under_a_root_path_the_links_and_the_cookie_keep_the_prefix(make_app: MakeApp) -> None:
    """Mounted at /geste behind a proxy (ASGI ``root_path``): every link and the cookie's path say so."""
    app = make_app(run_worker=False)
    async with app:
        await insert_instances(app.url, [("r-1", "w", "completed", 1e6)])
        transport = httpx.ASGITransport(app=app.asgi(token=TOKEN), root_path="/geste")
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            answer = await http.post(
                "/geste/ui/login", data={"token": TOKEN, "next": "/geste/ui?status=completed"}
            )
            assert answer.headers["location"] == "/geste/ui?status=completed"
            cookie, header = cookie_of(answer)
            assert "Path=/geste/ui;" in header
            text = await page(http, "/geste/ui", headers={"cookie": cookie})
            assert ids_on(text.replace('href="/geste/ui/', 'href="/ui/')) == ["r-1"]
            hrefs = re.findall(r'(?:href|action)="([^"]*)"', text)
            assert hrefs and all(h.startswith("/geste/ui") or h.startswith("data:") for h in hrefs), hrefs
            # signed out, a page asked for comes back after the sign-in: its prefix once, its id's %2F kept
            asked = "/geste/ui/instances/a%2Fb?run=1"
            http.cookies.clear()
            answer = await http.get(asked, headers=BROWSER)
            assert answer.status_code == 401
            assert f'name="next" value="{html.escape(asked)}"' in answer.text, answer.text[-600:]
            answer = await http.post("/geste/ui/login", data={"token": TOKEN, "next": asked})
            assert answer.headers["location"] == asked


async def test_signed_out_a_page_of_an_id_with_a_slash_comes_back_after_the_sign_in(
    make_app: MakeApp,
) -> None:
    app = make_app(run_worker=False)
    async with serving(app, token=TOKEN) as http:
        answer = await http.get("/ui/instances/a%2Fb", headers=BROWSER)
        assert answer.status_code == 401
        assert 'name="next" value="/ui/instances/a%2Fb"' in answer.text


async def test_a_cancelled_instance_shows_the_interrupted_timer_and_the_failed_compensations(
    make_app: MakeApp,
) -> None:
    app = make_app()

    @app.activity
    async def book(ctx: geste.ActivityContext, what: str) -> str:
        return what

    @app.activity(retry=geste.RetryPolicy(max_attempts=2, initial_interval=0.01))
    async def unbook(ctx: geste.ActivityContext, what: str) -> None:
        raise RuntimeError(f"cannot unbook {what}")

    @app.workflow
    async def trip(ctx: geste.WorkflowContext) -> None:
        for what in ("flight", "hotel"):
            await book(ctx, what)
            ctx.on_failure(unbook, what)
        await ctx.sleep(3600)

    async with serving(app) as http:
        await trip.start_with_id("trip-1")
        await wait_status(app, "trip-1", geste.Status.WAITING)
        assert re.search(
            r"Its timer of 1 h \(step 3\): due in (59 min|1 h)",
            now_panel(await page(http, "/ui/instances/trip-1")),
        )
        await app.cancel("trip-1")
        await wait_status(app, "trip-1", geste.Status.CANCELLED)
        text = await page(http, "/ui/instances/trip-1")
        shown = plain(text)
        assert "WorkflowCancelled: workflow instance trip-1 was cancelled" in shown
        assert "2 compensations failed too" in shown
        assert "RuntimeError: cannot unbook hotel" in shown and "RuntimeError: cannot unbook flight" in shown
        assert "interrupted by the cancellation" in shown and "cancellation delivered" in shown
        assert shown.index('compensation  unbook("hotel")') < shown.index('compensation  unbook("flight")')
        assert "2 attempts" in shown


async def test_a_long_history_shows_its_first_and_last_steps(
    make_app: MakeApp, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from geste.http import _timeline

    monkeypatch.setattr(_timeline, "MAX_STEPS_SHOWN", 4)
    app = make_app(run_worker=False)
    async with serving(app) as http:
        await insert_instances(db_url, [("long", "w", "completed", 1e6)])
        values = ", ".join(
            f"('long', {seq}, 'random', 'random', '0.{seq}', false, {1e6 + seq})" for seq in range(1, 11)
        )
        columns = "instance_id, seq, kind, name, payload, is_error, created_at"
        query = f"INSERT INTO geste_history ({columns}) VALUES {values}"
        if db_url.startswith("sqlite"):
            with contextlib.closing(sqlite3.connect(db_url.removeprefix("sqlite:///"))) as conn, conn:
                conn.execute(query.replace("false", "0"))
        else:
            from .support import raw_query

            await raw_query(db_url, query)
        text = await page(http, "/ui/instances/long")
        assert re.findall(r'id="step-(\d+)"', text) == ["1", "2", "9", "10"]
        assert "… 6 steps not shown" in plain(text) and "History · 10 steps" in plain(text)


def now_markup(text: str) -> str:
    found = re.search(r'<section class="panel now[^"]*">(.*?)</section>', text, re.DOTALL)
    assert found, "no Now panel"
    return found.group(1)


async def test_a_parent_shows_the_child_it_waits_for_and_a_child_the_parent_that_cancelled_it(
    make_app: MakeApp,
) -> None:
    """A parent waiting at ``handle.result()`` registers no wait (the child's end wakes it): its Now panel
    names the child (linked), or the children it started and has not seen end. A child its parent's end
    cancelled says so, the parent linked: at its ``cancelled`` row and in its outcome; an activity a
    cancel cut short (``ActivityCancelled``) shows as cancelled, not failed."""
    app = make_app()

    @app.activity
    async def hang(ctx: geste.ActivityContext) -> None:
        await asyncio.Event().wait()

    @app.workflow
    async def waits(ctx: geste.WorkflowContext) -> str:
        return str((await ctx.wait_event("go")).data)

    @app.workflow
    async def hangs(ctx: geste.WorkflowContext) -> None:
        await hang(ctx)

    @app.workflow
    async def one(ctx: geste.WorkflowContext) -> str:
        return await ctx.run_child(waits)

    @app.workflow
    async def two(ctx: geste.WorkflowContext) -> list[object]:
        first = await ctx.start_child(waits)
        second = await ctx.start_child(hangs)
        return [await first.result(), await second.result()]

    async with serving(app) as http:
        await one.start_with_id("p1")
        await two.start_with_id("p2")
        for instance_id, status in [
            ("p1", geste.Status.WAITING),
            ("p1:1", geste.Status.WAITING),
            ("p2", geste.Status.WAITING),
            ("p2:1", geste.Status.WAITING),
            ("p2:2", geste.Status.RUNNING),
        ]:
            await wait_status(app, instance_id, status)
        text = await page(http, "/ui/instances/p1")
        assert "The end of its child p1:1 (waits) waiting." in now_panel(text), now_panel(text)
        assert 'href="/ui/instances/p1%3A1"' in now_markup(text)
        assert "Nothing is registered" not in now_panel(text)
        text = await page(http, "/ui/instances/p2")
        assert (
            "The end of one of the 2 children it started and has not seen end: "
            "p2:1 (waits) waiting; p2:2 (hangs) running." in now_panel(text)
        ), now_panel(text)
        assert 'href="/ui/instances/p2%3A2"' in now_markup(text)

        await app.cancel("p1")  # the child waits for an event: cancelled between two steps
        await app.cancel("p2")  # the second child runs an activity: the cancel cuts it short
        for instance_id in ("p1:1", "p2:1", "p2:2"):
            await wait_status(app, instance_id, geste.Status.CANCELLED, timeout=30)

        text = await page(http, "/ui/instances/p1:1")
        shown = plain(text)
        assert re.search(r"cancellation delivered:\s+cancelled by its parent\s+p1", shown), shown
        assert re.search(r"Cancelled by its parent\s+p1\s+\(parent close: cancel\)", shown)
        assert text.count('href="/ui/instances/p1"') == 3  # the Parent fact, the row, the outcome

        text = await page(http, "/ui/instances/p2:2")
        shown = plain(text)
        assert re.search(r"Cancelled by its parent\s+p2\s+\(parent close: cancel\)", shown), shown
        row = re.search(r'<li class="k-activity[^"]*" id="step-1">.*?</li>', text, re.DOTALL)
        assert row is not None, text
        assert row.group(0).startswith('<li class="k-activity cancelled"'), row.group(0)[:80]
        assert '<span class="chip cancel">cancelled</span>' in row.group(0)
        assert "failed" not in plain(row.group(0))
        assert "attempt 1 of activity hang was cancelled: the workflow was cancelled" in plain(row.group(0))
