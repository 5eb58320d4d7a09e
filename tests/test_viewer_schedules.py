"""The viewer's schedules page (``/ui/schedules``), on each backend: every schedule with its definition,
paused or not, its next tick, and a link to the instance its last tick started; values escaped; the
token rule of the viewer's other pages.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import geste

from .test_viewer import BROWSER, page, serving

MakeApp = Callable[..., geste.App]
T0 = datetime(2026, 6, 1, 0, 30, tzinfo=UTC)


class FrozenClock:
    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now


async def test_the_schedules_page_lists_them_and_links_their_last_instances(make_app: MakeApp) -> None:
    clock = FrozenClock(T0)
    app = make_app(clock=clock, lock_timeout=1e6)

    @app.schedule("0 * * * *", name="hourly<b>")
    @app.workflow
    async def report(ctx: geste.WorkflowContext) -> str:
        return "done"

    async with serving(app) as http:
        assert "No schedule." not in await page(http, "/ui/schedules")
        await app.create_schedule("nightly", report, "30 2 * * *", timezone="Europe/Paris")
        await app.pause_schedule("nightly")
        loop = app.runtime.schedules
        assert loop is not None
        await loop.stop()  # the test drives the rounds
        clock.now += 3600  # 01:30: hourly starts 01:00
        await loop.catch_up()
        started = "sched:hourly<b>:2026-06-01T01:00:00Z"
        await app.get_handle(started).result(timeout=30)

        body = await page(http, "/ui/schedules")
        assert "<h1>Schedules</h1>" in body
        assert "hourly&lt;b&gt;" in body and "hourly<b>" not in body  # escaped
        assert '<a href="/ui/instances/sched%3Ahourly%3Cb%3E%3A2026-06-01T01%3A00%3A00Z">' in body
        assert "sched:hourly&lt;b&gt;:2026-06-01T01:00:00Z</a>" in body
        assert '<a href="/ui?workflow=report">report</a>' in body
        assert "Europe/Paris" in body and "30 2 * * *" in body
        hourly, nightly = body.split("<tbody>")[1].split("</tr>")[:2]
        assert "active" in hourly and 'datetime="2026-06-01T02:00:00+00:00"' in hourly  # its next tick
        assert "paused" in nightly and "sched:" not in nightly  # never started
        assert '<a href="/ui/schedules">Schedules</a>' in await page(http, "/ui")  # in the bar of every page
        assert (await http.get("/ui/schedules?x=1", headers=BROWSER)).status_code == 400


async def test_no_schedule(make_app: MakeApp) -> None:
    async with serving(make_app()) as http:
        assert "No schedule." in await page(http, "/ui/schedules")


async def test_with_a_token_the_page_needs_a_sign_in(make_app: MakeApp) -> None:
    async with serving(make_app(), token="s3cret") as http:
        answer = await http.get("/ui/schedules", headers=BROWSER)
        assert answer.status_code == 401 and "Sign in" in answer.text
        assert (
            await http.get("/ui/schedules", headers={"authorization": "Bearer s3cret"})
        ).status_code == 200
