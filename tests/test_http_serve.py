"""``geste serve`` end to end: a real uvicorn subprocess, driven over HTTP (httpx), stopped with signals.

Also the HTTP guide's example (docs/http.md), run as written (its ``curl`` commands, read as curl reads
them and sent with httpx, against ``geste serve shop:app``: no curl needed), and the command's one-line
errors.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import Result

from .conftest import die_with_parent
from .support import run_cli, wait_for

ROOT = Path(__file__).resolve().parents[1]
HTTP_GUIDE = ROOT / "docs" / "http.md"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def call(
    url: str, *, headers: dict[str, str] | None = None, body: Any = None, method: str = ""
) -> tuple[int, Any]:
    """One request (a POST when there is a body, a JSON one unless it is text); return the HTTP status
    and the JSON body (None when empty)."""
    content = body if body is None or isinstance(body, str) else json.dumps(body)
    headers = dict(headers or {})
    if content is not None and not isinstance(body, str):
        headers.setdefault("Content-Type", "application/json")
    response = httpx.request(
        method or ("GET" if content is None else "POST"), url, headers=headers, content=content, timeout=30
    )
    return response.status_code, response.json() if response.content else None


def curl_command(command: str) -> tuple[str, str, dict[str, str], str | None]:
    """A ``curl`` command of the HTTP guide read as curl reads it: (method, URL, headers, data). An option
    this test does not know fails it (the guide would then need checking by hand)."""
    words = shlex.split(command.replace("\\\n", " "))
    assert words[0] == "curl", command
    method, url, headers, data = "", "", {}, None
    rest = iter(words[1:])
    for word in rest:
        if word == "-s":
            continue
        if word == "-H":
            name, _, value = next(rest).partition(":")
            headers[name.strip()] = value.strip()
        elif word == "-d":
            data = next(rest)
        elif word == "-X":
            method = next(rest)
        else:
            assert not word.startswith("-") and not url, f"a curl option this test does not know: {word}"
            url = word if "://" in word else f"http://{word}"
    if data is not None:  # curl -d: a POST, form-encoded unless the command says otherwise
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    return method or ("GET" if data is None else "POST"), url, headers, data


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    log: Path
    url: str

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=20)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``geste serve ARGS... --port <free>`` and wait until ``/health`` answers."""
    started: list[Server] = []

    def start(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> Server:
        port = free_port()
        log = tmp_path / f"serve-{len(started)}.log"
        environment = {k: v for k, v in os.environ.items() if k != "GESTE_HTTP_TOKEN"}
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "geste.cli", "serve", *args, "--port", str(port)],
                cwd=cwd,
                env={**environment, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        server = Server(process, log, f"http://127.0.0.1:{port}")
        started.append(server)

        def healthy() -> bool:
            assert process.poll() is None, server.text()
            try:
                return call(f"{server.url}/health")[0] == 200
            except httpx.TransportError:  # not listening yet
                return False

        wait_for(healthy, "geste serve to answer /health", timeout=20.0)
        return server

    try:
        yield start
    finally:
        for server in started:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait(timeout=10)


def test_an_event_sent_over_http_completes_the_waiting_workflow(
    serve: Callable[..., Server], db_url: str
) -> None:
    server = serve("tests.apps.http_app:app", env={"GESTE_DATABASE_URL": db_url})
    status, body = call(f"{server.url}/workflows/payment", body={"args": ["ORD-7"], "instance_id": "ORD-7"})
    assert (status, body) == (201, {"instance_id": "ORD-7", "created": True})

    def waiting() -> bool:
        return call(f"{server.url}/instances/ORD-7")[1]["status"] == "waiting"

    wait_for(waiting, "the workflow to wait for its event", timeout=20.0)
    attributes = {
        "ce-specversion": "1.0",
        "ce-id": "bank-123",
        "ce-source": "/bank",
        "ce-type": "payment.confirmed",
    }
    event = {"order_id": "ORD-7", "amount": 12.5}
    sent = call(f"{server.url}/events", headers=attributes, body=event)
    assert sent == (202, {"event_id": "bank-123", "duplicate": False})
    status, body = call(f"{server.url}/instances/ORD-7/result?wait=20")
    assert status == 200, body
    assert body["result"] == {"order_id": "ORD-7", "amount": 12.5, "by": "/bank"}
    sent = call(f"{server.url}/events", headers=attributes, body=event)
    assert sent == (202, {"event_id": "bank-123", "duplicate": True})

    assert server.stop(signal.SIGTERM) == 0, server.text()
    log = server.text()
    assert "SIGTERM received" in log and "stopped" in log
    assert "Traceback" not in log


def test_the_http_guide_example_runs_as_written(serve: Callable[..., Server], tmp_path: Path) -> None:
    section = HTTP_GUIDE.read_text(encoding="utf-8")  # docs/http.md, the guide (the README's section once)
    (code,) = re.findall(r"```py\n(.*?)```", section, re.DOTALL)
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    assert "geste serve shop:app" in blocks[0]
    (tmp_path / "shop.py").write_text(code, encoding="utf-8")
    server = serve("shop:app", cwd=tmp_path)

    steps = [step.strip() for step in blocks[1].split("\n\n") if step.strip()]
    assert len(steps) == 4
    for step in steps:
        command, _, expected = step.rpartition("\n# ")
        method, url, headers, data = curl_command(command)
        assert url.startswith("http://localhost:8000/"), command
        url = url.replace("http://localhost:8000", server.url)
        response = httpx.request(method, url, headers=headers, content=data, timeout=30)
        assert response.json() == json.loads(expected), command

    assert server.stop(signal.SIGINT) == 0, server.text()


def test_without_an_app_it_serves_a_client_behind_a_token(serve: Callable[..., Server], db_url: str) -> None:
    server = serve("--database-url", db_url, env={"GESTE_HTTP_TOKEN": "t0ken"})
    status, body = call(f"{server.url}/instances")
    assert status == 401 and body["error"]["type"] == "Unauthorized"
    auth = {"Authorization": "Bearer t0ken"}
    assert call(f"{server.url}/instances", headers=auth) == (200, {"instances": []})
    status, body = call(f"{server.url}/workflows/payment", headers=auth, body={})
    assert status == 404 and body["error"]["type"] == "UnknownWorkflowError"
    attributes = {"ce-specversion": "1.0", "ce-id": "e1", "ce-source": "/s", "ce-type": "nobody.waits"}
    status, body = call(f"{server.url}/events", headers=auth | attributes, method="POST")  # no data
    assert (status, body) == (202, {"event_id": "e1", "duplicate": False})
    assert "token required" in server.text()
    assert server.stop(signal.SIGTERM) == 0, server.text()


# -- one-line errors ----------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("GESTE_HTTP_TOKEN", raising=False)

    def invoke(*args: str) -> Result:
        result: Result = run_cli(["serve", *args])
        return result

    return invoke


def one_line_error(result: Result, exit_code: int, fragment: str) -> None:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0], errors[0]


def test_a_taken_port_is_a_one_line_error(cli: Callable[..., Result], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = cli("--database-url", f"sqlite:///{tmp_path / 'x.db'}", "--port", port)
    one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port}")


def test_a_database_that_cannot_open_is_a_one_line_error(cli: Callable[..., Result], tmp_path: Path) -> None:
    result = cli("--database-url", f"sqlite:///{tmp_path / 'missing' / 'x.db'}", "--port", "0")
    one_line_error(result, 1, "does not exist")


def test_bad_arguments_are_usage_errors(cli: Callable[..., Result]) -> None:
    result = cli("tests.apps.http_app:app", "--database-url", "sqlite:///x.db")
    one_line_error(result, 2, "--database-url")
    one_line_error(cli("tests.apps.nope:app"), 2, "cannot import")
    one_line_error(cli("--token", "two words", "--port", "0"), 1, "token")


def test_without_uvicorn_it_says_what_to_install(
    cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    one_line_error(cli(), 1, "pip install 'geste[http]'")
