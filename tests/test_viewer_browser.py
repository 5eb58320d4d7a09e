"""The web viewer in a real browser: Debian's Chromium (``/usr/bin/chromium``) driven by Playwright, against
a real ``geste serve`` with a token, over the demo shop of ``tests/viewer_demo.py``.

It signs in, reads the list, filters it, follows an instance, opens a traceback, checks that hostile
values stay text (no dialog ever opens) and that the Content-Security-Policy lets the stylesheet in and
reports nothing; it saves screenshots into ``test-output/`` (printed). Chromium comes from
``.ci/ensure-chromium``; Playwright never downloads a browser. Without Chromium or Playwright the test
skips, except under CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import geste

from .conftest import die_with_parent
from .viewer_demo import seed

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "test-output"
CHROMIUM = "/usr/bin/chromium"
TOKEN = "browser-test-token"
HOSTILE_ID = '<script>alert("id")</script>'
HOSTILE_INPUT = "<img src=x onerror=alert(document.domain)>"


def _missing() -> str | None:
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"{CHROMIUM} is not installed (bash .ci/ensure-chromium installs Debian's chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture
def browser_ready() -> None:
    missing = _missing()
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the viewer's browser test cannot run under CI: {missing}")
    pytest.skip(missing)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def server(tmp_path: Path, browser_ready: None) -> Iterator[tuple[str, str]]:
    """``geste serve`` with a token over the demo shop's SQLite database: (base URL, database URL)."""
    db_url = f"sqlite:///{tmp_path / 'shop.db'}"
    asyncio.run(seed(db_url))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "GESTE_HTTP_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "geste.cli",
                "serve",
                "--database-url",
                db_url,
                "--no-worker",
                *("--port", str(port), "--token", TOKEN),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"geste serve did not answer: {log.read_text()}"
            time.sleep(0.05)
        assert f"web viewer: {base}/ui" in log.read_text()  # where to point a browser
        yield base, db_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def _add_hostile(db_url: str) -> None:
    app = geste.App(db_url, run_worker=False)

    @app.workflow(name="import")
    async def hostile(ctx: geste.WorkflowContext, value: str) -> None: ...

    async with app:
        await app.start_workflow("import", HOSTILE_INPUT, instance_id=HOSTILE_ID)


def _shot(page: Any, name: str) -> Path:
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / f"viewer-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_a_browser_signs_in_lists_filters_and_follows_an_instance(server: tuple[str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, db_url = server
    problems: list[str] = []
    console: list[tuple[str, str]] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 660})
            page = context.new_page()
            page.on("console", lambda message: console.append((message.type, message.text)))
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))

            # the token, once, in the sign-in form; then an HttpOnly, SameSite=Strict session cookie
            answer = page.goto(f"{base}/ui")
            assert answer is not None and answer.status == 401
            expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            page.get_by_label("Token").fill("not the token")
            page.get_by_role("button", name="Open the viewer").click()
            expect(page.get_by_text("That is not the server's token.")).to_be_visible()
            page.get_by_label("Token").fill(TOKEN)
            page.get_by_role("button", name="Open the viewer").click()
            expect(page.get_by_role("heading", name="Instances")).to_be_visible()
            (cookie,) = context.cookies()
            assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (
                "geste_viewer",
                True,
                "Strict",
                "/ui",
            )
            assert TOKEN not in cookie["value"]
            assert page.evaluate("document.cookie") == ""  # no script can read it

            # the list: every demo instance, newest first, with its status; the stylesheet applied
            rows = page.locator("table.list tbody tr")
            expect(rows).to_have_count(7)
            expect(rows.first).to_contain_text("bookkeeper-1")
            expect(page.locator("tr", has_text="ORD-1044").locator(".status")).to_have_text("failed")
            expect(page.locator("tr", has_text="ORD-1043").locator(".status")).to_have_text("waiting")
            header = page.locator("header.top")
            assert header.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(21, 26, 38)"
            expect(page.locator(".counts a", has_text="completed")).to_contain_text("3")
            _shot(page, "list")

            # a status chip filters the list; the workflow field too
            page.locator(".counts a", has_text="failed").click()
            expect(rows).to_have_count(1)
            expect(rows.first).to_contain_text("ORD-1044")
            page.get_by_role("link", name="Reset").click()
            page.locator("input[name=workflow]").fill("checkout")
            page.get_by_role("button", name="Filter").click()
            expect(rows).to_have_count(4)

            # follow an instance: its facts, its error with the traceback folded, its compensation
            page.get_by_role("link", name="ORD-1044", exact=True).click()
            expect(page.get_by_role("heading", name="ORD-1044")).to_be_visible()
            expect(page.locator(".error-title").first).to_contain_text("PaymentDeclined: card declined")
            traceback = page.locator("section.panel", has_text="Error").locator("details").first
            assert traceback.get_attribute("open") is None
            expect(traceback.locator("pre")).to_be_hidden()
            traceback.locator("summary").click()
            expect(traceback.locator("pre")).to_contain_text("Traceback (most recent call last)")
            expect(page.locator("ol.timeline")).to_contain_text("compensating, newest first")
            expect(page.locator("ol.timeline")).to_contain_text('release_stock("rsv-ORD-1044-2")')
            _shot(page, "failed")

            # a completed instance's timeline, and what a waiting one waits for
            page.goto(f"{base}/ui/instances/ORD-1041")
            timeline = page.locator("ol.timeline")
            for shown in ("2 attempts", "event received", "published on", "event emitted", "delivered"):
                expect(timeline).to_contain_text(shown)
            _shot(page, "instance")
            page.goto(f"{base}/ui/instances/ORD-1043")
            expect(page.locator("section.now")).to_contain_text("An event of type parcel.shipped")
            page.get_by_role("link", name="all checkout").click()
            expect(rows).to_have_count(4)

            # hostile values are text: shown as written, nothing runs
            with ThreadPoolExecutor(1) as pool:  # Playwright's sync API holds this thread's loop
                pool.submit(asyncio.run, _add_hostile(db_url)).result()
            page.goto(f"{base}/ui")
            expect(page.get_by_role("link", name=HOSTILE_ID)).to_be_visible()
            expect(page.locator("tr", has_text=HOSTILE_ID)).to_contain_text(HOSTILE_INPUT)
            page.get_by_role("link", name=HOSTILE_ID).click()
            expect(page.get_by_role("heading", name=HOSTILE_ID)).to_be_visible()
            expect(page.locator("section.panel", has_text="Input")).to_contain_text(HOSTILE_INPUT)
            assert page.locator("img[src=x]").count() == 0 and page.locator("body script").count() == 0

            # signing out ends the session
            page.get_by_role("button", name="Sign out").click()
            expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            assert context.cookies() == []
        finally:
            browser.close()
    # the browser said nothing of the Content-Security-Policy (nothing was refused), and reported no
    # error but the 401 answers it was given on purpose (the sign-in form, the wrong token, after signing out)
    problems += [f"{kind}: {text}" for kind, text in console if "Content Security Policy" in text]
    problems += [f"{kind}: {text}" for kind, text in console if kind == "error" and "of 401" not in text]
    assert sum("status of 401" in text for _, text in console) == 3, console
    assert problems == [], problems


def test_the_viewer_guide_shows_the_viewer_with_screenshots() -> None:
    """Taken from this test's views of the demo (test-output/viewer-list.png, viewer-instance.png)."""
    guide = (ROOT / "docs" / "viewer.md").read_text(encoding="utf-8")
    for name in ("viewer.png", "viewer-instance.png"):
        assert f"]({name})" in guide, name
        assert (ROOT / "docs" / name).read_bytes().startswith(b"\x89PNG"), name
