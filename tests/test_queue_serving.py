"""Which queues a worker serves (``App(serve_queues=..., serve_unqueued=...)``, ``geste worker --queues A,B
--no-unqueued``), on each backend: a worker never admits from a queue it does not serve, and one that
serves no instance outside a queue runs none, yet resumes the instances of its queues (after a timer,
after an event). "Never" is checked after the worker has shown it goes on claiming: a later instance of
a queue it serves, started after the others, completed while they stayed where they were.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import geste
from geste.errors import ConfigurationError

from .conftest import die_with_parent
from .support import raw_query, run_cli, wait_for, wait_until

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `tests.apps` is importable however pytest was started
    sys.path.insert(0, str(ROOT))

from tests.apps.served_app import build_app  # noqa: E402

APP = "tests.apps.served_app:app"


async def row(url: str, instance_id: str) -> dict[str, Any]:
    (found,) = await raw_query(
        url,
        "SELECT status, queued_at, locked_by, last_worker FROM geste_instances WHERE instance_id = $1",
        instance_id,
    )
    return found


async def assert_untouched(url: str, queued: list[str], unqueued: list[str]) -> None:
    for iid in queued:  # still in its queue's line: never admitted
        found = await row(url, iid)
        assert found["status"] == "pending" and found["queued_at"] is not None, (iid, found)
    for iid in unqueued:  # never claimed
        found = await row(url, iid)
        assert found["status"] == "pending" and found["locked_by"] is None and found["last_worker"] is None


async def test_a_worker_admits_only_from_the_queues_it_serves(db_url: str) -> None:
    async with build_app(db_url, serve_queues=["a"]) as app:
        b = await app.workflows["job"].options(queue="b").start(1)
        a = await app.workflows["job"].options(queue="a").start(2)
        free = await app.workflows["job"].start(3)  # outside any queue: served by default
        assert await a.result(timeout=30) == 2 and await free.result(timeout=30) == 3
        later = await app.workflows["job"].options(queue="a").start(4)
        assert await later.result(timeout=30) == 4
        await assert_untouched(db_url, [b.instance_id], [])
    async with build_app(db_url, run_worker=True) as every:  # serving every declared queue: b runs
        assert await every.get_handle(b.instance_id).result(timeout=30) == 1


async def test_a_worker_without_unqueued_runs_its_queues_only(db_url: str) -> None:
    async with build_app(db_url, serve_queues=["a"], serve_unqueued=False) as app:
        free = await app.workflows["job"].start(1)
        b = await app.workflows["job"].options(queue="b").start(2)
        slept = await app.workflows["job"].options(queue="a").start(3)
        waiting = await app.workflows["waits"].options(queue="a").start()
        assert await slept.result(timeout=30) == 3  # resumed by its timer, here

        async def waits() -> bool:
            return (await app.get_instance(waiting.instance_id)).status == geste.Status.WAITING

        await wait_until(waits, "the queued instance to wait for its event")
        await app.send_event("go", "now", instance_id=waiting.instance_id)
        assert await waiting.result(timeout=30) == "now"  # resumed by its event, here
        later = await app.workflows["job"].options(queue="a").start(4)
        assert await later.result(timeout=30) == 4
        await assert_untouched(db_url, [b.instance_id], [free.instance_id])


async def test_a_worker_without_unqueued_takes_over_its_queues_instances_from_a_dead_worker(
    db_url: str,
) -> None:
    """An instance of a served queue admitted by a worker that died at once (its lease runs out in half
    a second, nothing ran): a worker serving no unqueued instance takes it over and runs it."""
    async with build_app(db_url, run_worker=False) as client:
        handle = await client.workflows["job"].options(queue="a").start(5)
        now = client.clock()
        storage: Any = client.storage
        assert len(await storage.queue_claim("dead", now, now + 0.5, 1, queue="a")) == 1
    async with build_app(db_url, serve_queues=["a"], serve_unqueued=False) as app:
        assert await app.get_handle(handle.instance_id).result(timeout=30) == 5
    found = await row(db_url, handle.instance_id)
    assert found["status"] == "completed" and found["last_worker"] == app.worker_id


async def test_serving_options_are_checked(db_url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"'c'.*declared: a, b"):
        async with build_app(db_url, serve_queues=["a", "c"]):
            pass
    with pytest.raises(ConfigurationError, match="would run nothing"):
        async with build_app(db_url, serve_queues=[], serve_unqueued=False):
            pass
    with pytest.raises(ConfigurationError):
        build_app(db_url, serve_queues=[1])
    with pytest.raises(ConfigurationError):
        build_app(db_url, serve_unqueued="no")


# -- geste worker --queues -----------------------------------------------------------------------------
@pytest.fixture
def queue_worker(db_url: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``geste worker tests.apps.served_app:app --queues a --no-unqueued`` on the test database."""
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "geste.cli", "worker", APP, "--queues", "a", "--no-unqueued"],
            cwd=ROOT,
            env={**os.environ, "GESTE_DATABASE_URL": db_url},
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    try:
        wait_for(lambda: "started" in log.read_text() or process.poll() is not None, "the worker to start")
        assert process.poll() is None, log.read_text()
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


async def test_the_cli_worker_serves_the_queues_it_is_given(
    queue_worker: subprocess.Popen[bytes], db_url: str
) -> None:
    async with build_app(db_url, run_worker=False) as client:
        free = await client.workflows["job"].start(1)
        b = await client.workflows["job"].options(queue="b").start(2)
        a = await client.workflows["job"].options(queue="a").start(3)
        assert await a.result(timeout=30) == 3
        later = await client.workflows["job"].options(queue="a").start(4)
        assert await later.result(timeout=30) == 4
        await assert_untouched(db_url, [b.instance_id], [free.instance_id])
    queue_worker.terminate()
    assert queue_worker.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--queues", "a,nope"], ["'nope'", "declared: a, b"]),
        (["--queues", "a,,b"], ["--queues takes queue names"]),
        (["--queues", "", "--no-unqueued"], ["--queues takes queue names"]),
    ],
)
def test_the_cli_worker_refuses_a_queue_the_app_does_not_declare(
    args: list[str], fragments: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    result = run_cli(["worker", APP, *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr
