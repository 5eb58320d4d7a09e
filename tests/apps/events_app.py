"""A sample app for the event-matching race (``tests/test_event_matching.py``): a worker process that also
sends events, at the same moment as another process does.

Run from the repository root::

    python -m tests.apps.events_app DATABASE_URL --folder DIR --name NAME --events SPEC [SPEC ...]

It opens its App (a worker that runs ``collector`` instances), writes ``DIR/ready-NAME``, waits for the
file ``DIR/go`` (polled every millisecond: the two processes start sending within a few milliseconds of
each other), sends its events in waves (SPEC is ``WAVE:EVENT_ID=JSON``: the events of a wave all at once,
``asyncio.gather``, then the next wave), then writes ``DIR/sent-NAME`` (or ``DIR/failed-NAME`` with the
error) and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import geste

EVENT_TYPE = "race.paid"


def build_app(url: str, **options: Any) -> geste.App:
    app = geste.App(url, **options)

    @app.workflow
    async def collector(ctx: geste.WorkflowContext, match: dict[str, Any] | None, count: int) -> list[str]:
        """Take ``count`` events of the race's type accepted by ``match``: their ids, in the order taken."""
        taken = []
        for _ in range(count):
            event = await ctx.wait_event(EVENT_TYPE, match=match)
            taken.append(event.event_id)
        return taken

    @app.workflow
    async def chain(ctx: geste.WorkflowContext, key: str, steps: int) -> list[str]:
        """Take one event per step, each matching only that step: an event whose wake-up is lost is never
        made up for by a later one, so the instance stays waiting."""
        taken = []
        for step in range(steps):
            event = await ctx.wait_event(EVENT_TYPE, match={"id": key, "step": step})
            taken.append(event.event_id)
        return taken

    return app


def parse(specs: list[str]) -> list[tuple[int, str, Any]]:
    """``WAVE:EVENT_ID=JSON`` specs as ``(wave, event id, data)``."""
    found = []
    for spec in specs:
        wave, _, rest = spec.partition(":")
        event_id, _, data = rest.partition("=")
        found.append((int(wave), event_id, json.loads(data)))
    return found


async def send_all(app: geste.App, events: list[tuple[int, str, Any]]) -> None:
    """Wave by wave, the events of a wave at once: each ``send_event`` is its own transaction, racing
    the others and the waits."""
    for wave in sorted({w for w, _, _ in events}):
        await asyncio.gather(
            *(app.send_event(EVENT_TYPE, data, event_id=eid) for w, eid, data in events if w == wave)
        )


async def _serve(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    app = build_app(args.url, worker_id=f"race-{args.name}", poll_interval=0.05, lock_timeout=30.0)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, app.shutdown)
    events = parse(args.events)
    await app.open()
    (folder / f"ready-{args.name}").write_text("ready")
    while not (folder / "go").exists():
        await asyncio.sleep(0.001)
    try:
        await send_all(app, events)
    except Exception:
        (folder / f"failed-{args.name}").write_text(traceback.format_exc())
    else:
        (folder / f"sent-{args.name}").write_text(str(len(events)))
    await app.run()  # already open: runs until shutdown(), then drains and closes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.apps.events_app")
    parser.add_argument("url")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--events", nargs="*", default=[], help="WAVE:EVENT_ID=JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
