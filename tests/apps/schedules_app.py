"""A worker process for the schedules crash test (``tests/test_schedules_crash.py``).

Run from the repository root (``tests/apps/worker.py``, ``tests/processes.py``)::

    python -m tests.apps.schedules_app DATABASE_URL --worker-id W --markers DIR \
        [--hang-at N --hang before|inside|after]

Its App declares the schedule ``every-second`` (``* * * * * *``: a tick each second of the real clock,
``missed="all"`` and ``overlap="alongside"``, so that every tick must start whatever the load) and runs
a worker, until SIGTERM/SIGINT or a SIGKILL.

``--overlap queue --run-seconds S`` (``tests/test_schedules_queue.py``): the schedule's overlap policy,
and each run an activity that logs its ``start``, sleeps S seconds and logs its ``end`` (a run longer
than the period; without it, a run does nothing).

With ``--hang-at N`` it is the victim: its ``N``-th schedule write that carries a tick (``before``: as it
is about to write it; ``inside``: the first such write from the N-th on whose transaction moved the
tick and inserted its instance, before its commit; ``after``: the first such write from the N-th on that
created the tick's instance, once committed) writes ``DIR/hung-W`` (the instance ids) and never returns,
so that the test can kill it with SIGKILL right at a tick. ``inside`` hangs in the transaction's last
statement (``schedule_started``): on SQLite in a function of the connection that writes the marker and
sleeps, the write lock held; on PostgreSQL in a ``pg_sleep`` (the marker is written as the statement is
sent: the test waits for the server to run it), the schedule's row locked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import geste
from geste.storage import sqlite as sqlite_storage
from geste.storage.postgres import PostgresStorage

from .worker import activity_log, serve

SCHEDULE = "every-second"


def build_app(
    url: str,
    *,
    log: str | None = None,
    markers: str | None = None,
    worker_id: str | None = None,
    hang_at: int | None = None,
    hang: str = "after",
    overlap: str = "alongside",
    run_seconds: float = 0.0,
    **options: Any,
) -> geste.App:
    """The App with its schedule; ``hang_at`` and ``hang``: the victim's hang point, ``overlap`` and
    ``run_seconds``: its policy and how long a run takes (module docstring)."""
    options.setdefault("poll_interval", 0.1)
    options.setdefault("lock_timeout", 1.0)
    app = geste.App(url, worker_id=worker_id, **options)
    note = activity_log(log, worker_id)

    @app.activity
    async def work(ctx: geste.ActivityContext) -> None:
        note(ctx, "start")
        await asyncio.sleep(run_seconds)
        note(ctx, "end")

    @app.schedule("* * * * * *", name=SCHEDULE, missed="all", overlap=overlap)
    @app.workflow
    async def tick(ctx: geste.WorkflowContext) -> str:
        if run_seconds:
            await work(ctx)
        return "ticked"

    if hang_at is not None:
        assert markers is not None and hang in ("before", "inside", "after")
        marker = Path(markers) / f"hung-{worker_id}"
        if hang == "inside":
            hang_inside(app, marker, hang_at)
        else:
            hang_at_point(app, marker, hang_at, hang)
    return app


def mark(marker: Path, instance_ids: list[str]) -> None:
    """Tell the test where this process hangs: the ids of the ticks it was writing."""
    marker.write_text(json.dumps(instance_ids))


def hang_at_point(app: geste.App, marker: Path, count: int, point: str) -> None:
    """Make the ``count``-th tick write of this process hang (module docstring)."""
    storage = app.storage
    fire = storage.schedule_fire
    calls = 0

    async def schedule_fire(name: str, **kwargs: Any) -> Any:
        nonlocal calls
        if not kwargs["starts"]:
            return await fire(name, **kwargs)
        calls += 1
        if calls >= count and point == "before":
            mark(marker, [start.instance.instance_id for start in kwargs["starts"]])
            await asyncio.Event().wait()  # killed here, about to write
        fired = await fire(name, **kwargs)
        if calls >= count and point == "after" and fired is not None and fired.created:
            mark(marker, fired.created)
            await asyncio.Event().wait()  # killed here, the tick committed
        return fired

    storage.schedule_fire = schedule_fire  # type: ignore[method-assign]


HANG_SQL = "pg_sleep(3600)"


def hang_inside(app: geste.App, marker: Path, count: int) -> None:
    """The ``inside`` hang point (module docstring): the transaction's ``schedule_started`` hangs."""
    storage: Any = app.storage
    if isinstance(storage, PostgresStorage):
        queries = storage._q
        hanging = queries["schedule_started"].rstrip().rstrip(";") + f" AND (SELECT true FROM {HANG_SQL})"
        fire = storage.schedule_fire
        calls = 0

        async def schedule_fire(name: str, **kwargs: Any) -> Any:
            nonlocal calls
            if kwargs["starts"]:
                calls += 1
                if calls == count:
                    queries["schedule_started"] = hanging
                    mark(marker, [s.instance.instance_id for s in kwargs["starts"]])
            return await fire(name, **kwargs)

        storage.schedule_fire = schedule_fire  # type: ignore[method-assign]
        return
    ticks = 0

    def hang(instance_id: str) -> int:
        nonlocal ticks
        ticks += 1
        if ticks >= count:
            mark(marker, [instance_id])
            time.sleep(3600)  # the writer thread, in the transaction: killed here
        return 1

    connect = storage._connect

    def connect_with_hang() -> Any:
        conn = connect()
        conn.create_function("geste_test_hang", 1, hang)
        return conn

    storage._connect = connect_with_hang
    sqlite_storage.Q["schedule_started"] = (
        sqlite_storage.Q["schedule_started"].rstrip().rstrip(";") + " AND geste_test_hang(:instance_id) = 1"
    )


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--hang", choices=["before", "inside", "after"], default="after")
    parser.add_argument("--overlap", default="alongside")
    parser.add_argument("--run-seconds", type=float, default=0.0)


def main(argv: list[str] | None = None) -> None:
    serve(build_app, argv, prog="python -m tests.apps.schedules_app", arguments=_arguments)


if __name__ == "__main__":
    main()
