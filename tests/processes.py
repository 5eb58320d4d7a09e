"""Worker processes for the tests that need more than one process: one harness for every app of
``tests/apps`` (``crash_app``, ``cancel_app``, ``child_app``, ...), so that starting, waiting for, reading
and stopping them is written once.

A group of workers shares one database, one marker folder and one side-effect log. Each worker runs
``python -m tests.apps.<app>`` (``tests/apps/worker.py``): ``spawn`` starts it and waits for its ready
marker (a worker that exits first fails the test with its output), ``entries`` reads the side-effect log,
``output`` a worker's own output, ``go`` lets a ``block``/``hold`` activity return. Every process is killed
at the end (or stopped with SIGTERM where the group says so), and dies with the test process anyway.

The apps with command lines of their own (notify, routing, channels, operations, events) are started with
the two steps ``spawn`` is made of: ``start_process`` and ``wait_ready``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import geste

from .apps.worker import read_log
from .conftest import die_with_parent
from .support import raw_query, wait_until

ROOT = Path(__file__).resolve().parents[1]
"""The repository root: the workers' working directory, where ``tests.apps`` is importable."""

READY_TIMEOUT = 30.0


def start_process(
    args: list[str], *, output: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Run ``python -m ARGS`` from the repository root (``env`` added to this process's environment), its
    stdout and stderr in ``output``; it is killed if the test process dies."""
    with output.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env},
            preexec_fn=die_with_parent,
        )


async def wait_ready(
    proc: subprocess.Popen[bytes],
    ready: Path,
    *,
    output: Path,
    what: str,
    timeout: float = READY_TIMEOUT,
    exits_on_its_own: bool = False,
) -> None:
    """Wait until the process writes ``ready``; one that exits first fails the test with its ``output``
    (unless ``exits_on_its_own`` and it wrote ``ready`` before it exited)."""

    def started() -> bool:
        exited = proc.poll() is not None
        if exited and not (exits_on_its_own and ready.exists()):
            raise AssertionError(
                f"{what} exited with {proc.returncode}:\n{output.read_text(errors='replace')}"
            )
        return ready.exists()

    await wait_until(started, f"{what} to be ready", timeout)


class WorkerProcesses:
    """Worker processes of ``tests.apps.<app>`` on one database.

    ``options`` are passed to every worker (``lock_timeout=2.0`` gives ``--lock-timeout=2.0``, a bool 0 or
    1), before those of ``spawn``. ``exits_on_its_own``: a worker may exit as soon as it is ready (one that
    kills itself on purpose); otherwise one that exits while ``spawn`` waits fails the test.
    ``stop_gracefully``: ``stop_all`` sends SIGTERM and waits (killing only what does not stop), instead of
    killing them all."""

    def __init__(
        self,
        folder: Path,
        url: str,
        app: str,
        *,
        options: dict[str, Any] | None = None,
        exits_on_its_own: bool = False,
        stop_gracefully: bool = False,
    ) -> None:
        self.folder = folder
        self.url = url
        self.module = f"tests.apps.{app}"
        self.options = dict(options or {})
        self.exits_on_its_own = exits_on_its_own
        self.stop_gracefully = stop_gracefully
        self.log = folder / "side-effects.jsonl"
        self.markers = folder / "markers"
        self.markers.mkdir()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.by_id: dict[str, subprocess.Popen[bytes]] = {}
        """The last process started for each worker id."""
        self.outputs: dict[int, Path] = {}

    async def spawn(self, worker_id: str, **options: Any) -> subprocess.Popen[bytes]:
        """Start worker ``worker_id`` and wait until it is ready."""
        ready = self.markers / f"ready-{worker_id}"
        ready.unlink(missing_ok=True)
        cmd = [
            self.module,
            self.url,
            f"--worker-id={worker_id}",
            f"--log={self.log}",
            f"--markers={self.markers}",
            *(
                f"--{key.replace('_', '-')}={int(value) if isinstance(value, bool) else value}"
                for key, value in {**self.options, **options}.items()
            ),
        ]
        output = self.folder / f"worker-{worker_id}-{len(self.procs)}.out"
        proc = start_process(cmd, output=output)
        self.procs.append(proc)
        self.by_id[worker_id] = proc
        self.outputs[proc.pid] = output
        what = f"worker {worker_id}"
        await wait_ready(proc, ready, output=output, what=what, exits_on_its_own=self.exits_on_its_own)
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        """What the worker wrote (stdout and stderr) so far."""
        return self.outputs[proc.pid].read_text(errors="replace")

    def entries(self, **where: Any) -> list[dict[str, Any]]:
        """The side-effect log's lines whose fields have the values of ``where``."""
        return [e for e in read_log(self.log) if all(e[key] == value for key, value in where.items())]

    def go(self, instance_id: str) -> None:
        """Let the activity of ``instance_id`` that waits for its ``go`` marker return."""
        (self.markers / f"go-{instance_id}").touch()

    async def row(self, instance_id: str) -> dict[str, Any]:
        """The instance's row, read straight from the database."""
        found = await raw_query(self.url, "SELECT * FROM geste_instances WHERE instance_id = $1", instance_id)
        assert len(found) == 1, instance_id
        return found[0]

    def client(self, **options: Any) -> geste.App:
        """An App of the test process on the workers' database and workflows, with no worker: it starts,
        queries and cancels (and, opened before any worker, creates the schema)."""
        import importlib

        build = importlib.import_module(self.module).build_app
        options.setdefault("poll_interval", 0.05)
        app: geste.App = build(self.url, markers=str(self.markers), run_worker=False, **options)
        return app

    def stop_all(self) -> None:
        if self.stop_gracefully:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in self.procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def __enter__(self) -> WorkerProcesses:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop_all()


class Cluster(WorkerProcesses):
    """Workers of ``tests/apps/crash_app.py`` (leases of 1 s unless told), whose log has a ``start`` and an
    ``end`` line for every activity run: ``entries`` reads the starts unless told."""

    def __init__(self, folder: Path, url: str) -> None:
        super().__init__(folder, url, "crash_app", options={"lock_timeout": 1.0})

    def entries(self, *, event: str = "start", **where: Any) -> list[dict[str, Any]]:
        return super().entries(event=event, **where)


def worker_processes(app: str, *, name: str = "workers", **settings: Any) -> Any:
    """A fixture ``name``: a ``WorkerProcesses`` of ``tests.apps.<app>`` (``settings`` as its own) on the
    test's database, every process stopped at the end."""

    @pytest.fixture(name=name)
    def fixture(tmp_path: Path, db_url: str) -> Iterator[WorkerProcesses]:
        with WorkerProcesses(tmp_path, db_url, app, **settings) as group:
            yield group

    return fixture


def workers_client(of: str = "workers") -> Any:
    """A fixture ``client``: the opened ``client()`` App of the group the fixture ``of`` gives."""

    @pytest.fixture(name="client")
    async def fixture(request: pytest.FixtureRequest) -> AsyncIterator[geste.App]:
        group: WorkerProcesses = request.getfixturevalue(of)
        async with group.client() as app:
            yield app

    return fixture
