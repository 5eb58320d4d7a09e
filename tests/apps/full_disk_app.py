"""A process that fills its "disk": an App on a SQLite file under a small file-size limit.

Run from the repository root (tests/test_sqlite_stress.py does it)::

    python -m tests.apps.full_disk_app PATH

It runs one workflow with room to spare, then lowers ``RLIMIT_FSIZE`` (with ``SIGXFSZ`` ignored, so a
write past the limit fails with ``EFBIG`` instead of killing the process: what a full disk looks like
to SQLite) to a little above the database's files, and starts workflows whose activities return large
results until a call fails. Then it raises the limit again ("space returns") and waits for everything
to complete. It prints one JSON line: what failed, with which error type and message, and how the
workflows ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
from typing import Any

import geste

BIG = 60_000
"""Characters in an activity's result: a few such rows fill the margin left under the limit."""
MARGIN = 256 * 1024
"""Bytes left above the largest database file when the limit is lowered."""


def _largest(path: str) -> int:
    """The size of the database's largest file (the main file or its WAL)."""
    return max(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


async def main(path: str) -> dict[str, Any]:
    app = geste.App(f"sqlite:///{path}", poll_interval=0.05, lock_timeout=2.0, shutdown_grace=2.0)

    @app.activity
    async def fill(ctx: geste.ActivityContext, n: int) -> str:
        return f"{n}:" + "x" * BIG

    @app.workflow
    async def filler(ctx: geste.WorkflowContext, n: int) -> int:
        for _ in range(3):
            await fill(ctx, n)
        return n

    out: dict[str, Any] = {"errors": [], "started": []}
    async with app:
        await (await filler.start_with_id("before", 0)).result(timeout=30)
        limit = _largest(path) + MARGIN
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        out["limit"] = limit
        for n in range(1, 200):
            try:
                await filler.start_with_id(f"full-{n}", n)
                out["started"].append(f"full-{n}")
                await asyncio.sleep(0.02)  # the worker writes the activities' results meanwhile
            except geste.errors.StorageError as exc:
                out["errors"].append([type(exc).__module__ + "." + type(exc).__qualname__, str(exc)])
                if len(out["errors"]) == 3:
                    break
            except Exception as exc:  # the test reports any other type as a failure
                out["errors"].append([type(exc).__module__ + "." + type(exc).__qualname__, str(exc)])
                break
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space returns
        after = await filler.start_with_id("after", 1000)
        out["after"] = await after.result(timeout=60)
        for instance_id in out["started"]:
            await app.get_handle(instance_id).result(timeout=60)
        statuses = [i.status for i in await app.list_instances(limit=1000)]
        out["statuses"] = {s: statuses.count(s) for s in set(statuses)}
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    print(json.dumps(asyncio.run(main(sys.argv[1]))), flush=True)
