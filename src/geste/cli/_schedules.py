"""``geste`` commands on cron schedules: ``schedules`` (the list) and ``schedule create / pause / resume /
delete``.

``create`` imports the user's App (``--app MODULE:APP``, as ``start`` does): a schedule starts a
registered workflow, and whether that workflow takes the tick is read from its signature. The others
need no user code: a client App on ``--database-url``. An unknown name is a ``ScheduleNotFoundError``
(exit code 1), a bad expression, time zone or policy an ``InvalidScheduleError`` (exit code 1, as every
``GesteError``); a policy outside its choices is refused by click before (exit code 2).
"""

from __future__ import annotations

from typing import Any

import click

from .._app import App
from .._schedules import MISSED, OVERLAP, ScheduleInfo
from ..errors import UnknownWorkflowError
from . import CommandError, _client, _dump, _load_app, _run, _stamp, database_url_option, main


def _row(info: ScheduleInfo) -> tuple[str, ...]:
    return (
        info.name,
        info.workflow_name,
        info.cron,
        info.timezone,
        "yes" if info.paused else "no",
        "-" if info.paused else _stamp(info.next_tick),
        _stamp(info.last_tick),
        info.last_instance_id or "-",
        info.queue or "-",
        str(info.waiting),
    )


@main.command("schedules")
@database_url_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def schedules(database_url: str, as_json: bool) -> None:
    """List the cron schedules by name: workflow, expression, time zone, paused, next tick, last tick and
    the instance it started (times in local time), the queue its ticks start onto, and its ticks waiting
    for the previous run to end (--overlap queue)."""

    async def go() -> list[ScheduleInfo]:
        async with _client(database_url) as app:
            return await app.list_schedules()

    infos = _run(go())
    if as_json:
        click.echo(_dump(infos))
        return
    if not infos:
        click.echo("no schedules")
        return
    header = (
        "NAME",
        "WORKFLOW",
        "CRON",
        "TIMEZONE",
        "PAUSED",
        "NEXT TICK",
        "LAST TICK",
        "LAST INSTANCE",
        "QUEUE",
        "WAITING",
    )
    rows = [header, *(_row(info) for info in infos)]
    widths = [max(len(row[n]) for row in rows) for n in range(len(header))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@main.group("schedule")
def schedule() -> None:
    """Create, pause, resume or delete a cron schedule (docs/schedules.md)."""


@schedule.command("create")
@click.argument("name")
@click.option("--workflow", "workflow_name", required=True, help="The workflow NAME starts (registered).")
@click.option("--cron", required=True, help="The cron expression (5 fields, or 6 with seconds first).")
@click.option("--timezone", default="UTC", show_default=True, help="IANA time zone the expression reads.")
@click.option("--missed", type=click.Choice(MISSED), default="latest", show_default=True)
@click.option("--overlap", type=click.Choice(OVERLAP), default="skip", show_default=True)
@click.option("--queue", default=None, help="The queue each tick's instance is started onto.")
@click.option(
    "--priority", type=int, default=0, show_default=True, help="Its place in the queue's line (lower first)."
)
@click.option(
    "--app",
    "app_spec",
    metavar="MODULE:APP",
    envvar="GESTE_APP",
    required=True,
    help="The App that registers the workflow (env GESTE_APP).",
)
@click.option("--database-url", default=None, help="Database to use (default: the App's).")
@click.option("--json", "as_json", is_flag=True, help="Print the schedule as JSON.")
def create(
    name: str,
    workflow_name: str,
    cron: str,
    timezone: str,
    missed: str,
    overlap: str,
    queue: str | None,
    priority: int,
    app_spec: str,
    database_url: str | None,
    as_json: bool,
) -> None:
    """Create schedule NAME of a workflow, or update the one of that name (a paused one stays paused).

    Its first tick is the first after now; --missed says what happens to ticks no worker started in time,
    --overlap to a tick while the previous run is unfinished (queue: it starts once that run ended);
    --queue starts each tick's instance onto that queue, at --priority.
    """
    user_app = _load_app(app_spec)
    if workflow_name not in user_app.workflows:
        known = ", ".join(sorted(user_app.workflows)) or "none"
        raise CommandError(f"{UnknownWorkflowError(workflow_name)} in {app_spec} (known: {known})")
    # A client App of our own: the user's App stays as configured (its worker, its declared schedules).
    client = App(database_url or user_app.url, run_worker=False)
    for registered, workflow in user_app.workflows.items():
        client.workflow(name=registered)(workflow.fn)

    async def go() -> ScheduleInfo:
        async with client:
            return await client.create_schedule(
                name,
                workflow_name,
                cron,
                timezone=timezone,
                missed=missed,
                overlap=overlap,
                queue=queue,
                priority=priority,
            )

    info = _run(go())
    if as_json:
        click.echo(_dump(info))
        return
    paused = " (paused)" if info.paused else ""
    onto = "" if info.queue is None else f" onto queue {info.queue}"
    click.echo(
        f"schedule {info.name}: {info.workflow_name} at {info.cron!r} in {info.timezone}{onto}{paused}"
    )
    click.echo(f"next tick {_stamp(info.next_tick)}")


def _change(name: str, database_url: str, what: str) -> ScheduleInfo | None:
    async def go() -> ScheduleInfo | None:
        async with _client(database_url) as app:
            call: Any = {
                "pause": app.pause_schedule,
                "resume": app.resume_schedule,
                "delete": app.delete_schedule,
            }[what]
            await call(name)
            if what == "delete":
                return None
            return await app.get_schedule(name)

    return _run(go())


@schedule.command("pause")
@click.argument("name")
@database_url_option
def pause(name: str, database_url: str) -> None:
    """Pause schedule NAME: no tick starts until it is resumed."""
    _change(name, database_url, "pause")
    click.echo(f"schedule {name}: paused")


@schedule.command("resume")
@click.argument("name")
@database_url_option
def resume(name: str, database_url: str) -> None:
    """Resume schedule NAME from its next tick to come (the ticks that passed while paused never start)."""
    info = _change(name, database_url, "resume")
    assert info is not None
    click.echo(f"schedule {name}: resumed, next tick {_stamp(info.next_tick)}")


@schedule.command("delete")
@click.argument("name")
@database_url_option
def delete(name: str, database_url: str) -> None:
    """Delete schedule NAME (the instances it started stay; one declared in code comes back at the next
    open of its App)."""
    _change(name, database_url, "delete")
    click.echo(f"schedule {name}: deleted")
