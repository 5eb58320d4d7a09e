"""``geste`` commands on instances: list, show, start, cancel, retry, resume, send-event, publish."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import click

from .._app import App
from .._client import CANCELLABLE
from .._models import HistoryEntry, InstanceInfo, RunInfo, Status
from .._operations import ResumeResult, RetryRecord
from .._progress import Progress
from ..errors import UnknownWorkflowError
from . import (
    BadInputError,
    CommandError,
    _age,
    _client,
    _dump,
    _entry_line,
    _error_line,
    _js,
    _json_arg,
    _load_app,
    _outcome,
    _run,
    _stamp,
    database_url_option,
    main,
)


@main.command("list")
@database_url_option
@click.option("--workflow", default=None, help="Only instances of this workflow name.")
@click.option(
    "--status", type=click.Choice([s.value for s in Status]), default=None, help="Only this status."
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_(database_url: str, workflow: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """List instances, newest first."""

    async def go() -> list[InstanceInfo]:
        async with _client(database_url) as app:
            return await app.list_instances(workflow=workflow, status=status, limit=limit)

    infos = _run(go())
    if as_json:
        click.echo(_dump(infos))
        return
    if not infos:
        click.echo("no instances")
        return
    header = ("ID", "WORKFLOW", "STATUS", "STEPS", "CREATED", "UPDATED")
    rows = [
        (
            i.instance_id,
            i.workflow_name,
            i.status.value,
            str(i.steps),
            _stamp(i.created_at),
            _stamp(i.updated_at),
        )
        for i in infos
    ]
    widths = [max(len(row[n]) for row in [header, *rows]) for n in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@main.command()
@click.argument("instance_id", metavar="ID")
@database_url_option
@click.option(
    "--run",
    "run",
    type=click.IntRange(min=1),
    default=None,
    help="Show run N, one the instance ended with continue_as_new (default: its current run).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with error tracebacks).")
def show(instance_id: str, database_url: str, run: int | None, as_json: bool) -> None:
    """Show an instance and its history as a timeline (its current run, or its kept run --run N)."""

    async def go() -> tuple[
        InstanceInfo, list[HistoryEntry], list[RetryRecord], list[RunInfo], list[InstanceInfo]
    ]:
        async with _client(database_url) as app:
            info = await app.get_instance(instance_id)
            history = await app.history(instance_id, run=run)
            retries, runs = await app.retries(instance_id), await app.runs(instance_id)
            return info, history, retries, runs, await app.children(instance_id)

    info, history, retries, runs, children = _run(go())
    kept = next((r for r in runs if r.run == run), None)
    if kept is not None:
        _show_run(info, kept, history, runs, as_json)
        return
    if as_json:
        document = {"instance": info, "history": history, "retries": retries, "runs": runs}
        if children:
            document["children"] = [_child_summary(child) for child in children]
        click.echo(_dump(document))
        return
    fields = [
        ("instance", info.instance_id),
        ("workflow", info.workflow_name),
        ("status", info.status.value + (" (cancel requested)" if info.cancel_requested else "")),
        ("created", _stamp(info.created_at)),
        ("updated", _stamp(info.updated_at)),
        ("finished", _stamp(info.finished_at)),
        ("steps", str(info.steps)),
        ("input", _js(info.input, 200)),
    ]
    if runs:
        fields.insert(3, ("run", f"{info.run} (runs before it: geste show {info.instance_id} --run N)"))
    if info.parent_id is not None:
        fields.append(("parent", f"{info.parent_id} (geste show {info.parent_id})"))
    if info.deadline is not None:
        fields.append(("deadline", _deadline_text(info)))
    if info.locked_by:
        fields.append(("locked by", f"{info.locked_by} until {_stamp(info.lock_expires_at)}"))
    if info.status == Status.COMPLETED:
        fields.append(("result", _js(info.result, 200)))
    if info.error:
        fields.append(("error", _error_line(info.error)))
        for failure in info.error.get("compensation_errors", []):
            fields.append(("", f"compensation {failure.get('activity')} failed: {_error_line(failure)}"))
    for label, value in fields:
        click.echo(f"{label:<10} {value}")
    click.echo("history:" if history else "history:  (empty)")
    for entry in history:
        click.echo(_entry_line(entry, info.created_at))
    if retries:
        click.echo("retries:")
    for record in retries:
        removed = ", ".join(f"{e.seq} {e.name} ({_outcome(e)})" for e in record.removed) or "nothing"
        click.echo(
            f"  {record.retry:>3}  {_stamp(record.retried_at)}  from step {record.from_seq}; "
            f"had failed with {_error_line(record.error)}; removed {removed}"
        )
    if runs:
        click.echo("runs before:")
    for kept_run in runs:
        click.echo(_run_line(kept_run))
    if children:
        click.echo("children:")
    for child in children:
        click.echo(f"  {child.instance_id}  {child.workflow_name}  {child.status.value}")


def _deadline_text(info: InstanceInfo) -> str:
    """When the instance is cancelled for its deadline, and how far that is (or that it passed)."""
    assert info.deadline is not None
    left = info.deadline.timestamp() - time.time()
    return f"{_stamp(info.deadline)} ({'in ' + _age(left) if left > 0 else 'passed'})"


def _child_summary(child: InstanceInfo) -> dict[str, str]:
    """A child in ``geste show --json``: enough to find it (``geste show <id>``)."""
    return {
        "instance_id": child.instance_id,
        "workflow_name": child.workflow_name,
        "status": child.status.value,
    }


def _run_line(run: RunInfo) -> str:
    return (
        f"  {run.run:>3}  {_stamp(run.started_at)} to {_stamp(run.ended_at)}  {run.steps} steps, "
        f"{run.ended_as}; input {_js(run.input, 120)}"
    )


def _show_run(
    info: InstanceInfo, run: RunInfo, history: list[HistoryEntry], runs: list[RunInfo], as_json: bool
) -> None:
    """``geste show ID --run N``: a run the instance ended with ``continue_as_new``. Its JSON's
    ``instance`` describes that run (its input, start, end and steps), as ``export_history(run=N)`` does,
    so that ``geste replay-check`` reads it as that run's history."""
    if as_json:
        described = dataclasses.replace(
            info,
            input=run.input,
            result=None,
            error=None,
            created_at=run.started_at,
            finished_at=run.ended_at,
            steps=run.steps,
            run=run.run,
        )
        click.echo(_dump({"instance": described, "run": run, "history": history}))
        return
    later = f"run {run.run + 1}" if run.run + 1 < info.run else f"run {info.run}, the current one"
    fields = [
        ("instance", info.instance_id),
        ("workflow", info.workflow_name),
        ("run", f"{run.run} of {info.run} ({len(runs)} kept); {run.ended_as}: {later}"),
        ("started", _stamp(run.started_at)),
        ("ended", _stamp(run.ended_at)),
        ("steps", str(run.steps)),
        ("input", _js(run.input, 200)),
    ]
    for label, value in fields:
        click.echo(f"{label:<10} {value}")
    click.echo("history:")
    for entry in history:
        click.echo(_entry_line(entry, run.started_at))


_CANCEL_STATUSES = [s.value for s in (Status.PENDING, Status.RUNNING, Status.WAITING, Status.COMPENSATING)]


@main.command()
@click.argument("instance_id", metavar="[ID]", required=False)
@database_url_option
@click.option("--wait", type=click.FloatRange(min=0), default=0, help="Seconds to wait for ID to end.")
@click.option("--workflow", default=None, help="Cancel the unfinished instances of this workflow name.")
@click.option(
    "--status",
    type=click.Choice(_CANCEL_STATUSES),
    default=None,
    help="Cancel the instances in this status (default: pending, running and waiting ones).",
)
@click.option("--all", "every", is_flag=True, help="Cancel every unfinished instance (no ID, no filter).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (what was cancelled) and no progress.")
def cancel(
    instance_id: str | None,
    database_url: str,
    wait: float,
    workflow: str | None,
    status: str | None,
    every: bool,
    as_json: bool,
) -> None:
    """Cancel instance ID, or every unfinished instance --workflow/--status select (or --all).

    An instance that never ran ends at once; the others end at their next step, after their
    compensations. The filters select the instances matching when the command lists them.
    """
    if instance_id is None:
        if workflow is None and status is None and not every:
            raise BadInputError("give an instance ID, or select instances with --workflow/--status, or --all")
        if wait:
            raise BadInputError("--wait goes with one instance ID")
        _run(_cancel_many(database_url, workflow, status, as_json))
        return
    if workflow is not None or status is not None or every:
        raise BadInputError("give an instance ID or the filters --workflow/--status/--all, not both")

    async def go() -> InstanceInfo:
        async with _client(database_url) as app:
            info = await app.cancel(instance_id)
            deadline = time.monotonic() + wait
            while not info.status.is_finished and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                info = await app.get_instance(instance_id)
            return info

    info = _run(go())
    if as_json:
        click.echo(_dump(info))
        return
    note = "" if info.status.is_finished else " (cancel requested: a worker ends it at its next step)"
    click.echo(f"{info.instance_id}: {info.status.value}{note}")


async def _cancel_many(database_url: str, workflow: str | None, status: str | None, as_json: bool) -> None:
    statuses = [Status(status)] if status is not None else list(CANCELLABLE)
    outcomes: dict[str, list[str]] = {"cancelled": [], "cancel_requested": [], "finished_before": []}
    async with _client(database_url) as app:
        ids = await app.client.cancellable(workflow=workflow, statuses=statuses)
        what = ", ".join(
            part
            for part in (
                f"workflow {workflow}" if workflow is not None else "",
                f"status {status}" if status is not None else "",
            )
            if part
        )
        with Progress("cancelling", total=len(ids), enabled=not as_json) as progress:
            progress.note(f"{len(ids)} instance(s) to cancel" + (f" ({what})" if what else ""))

            def done(info: InstanceInfo) -> None:
                if info.status == Status.CANCELLED:
                    outcomes["cancelled"].append(info.instance_id)
                elif info.status.is_finished:
                    outcomes["finished_before"].append(info.instance_id)
                else:
                    outcomes["cancel_requested"].append(info.instance_id)
                progress.advance()

            await app.client.cancel_each(ids, on_done=done)
    if as_json:
        click.echo(_dump({"matched": len(ids), **outcomes}))
        return
    click.echo(
        f"{len(ids)} instance(s): {len(outcomes['cancelled'])} cancelled, "
        f"{len(outcomes['cancel_requested'])} cancel requested (a worker ends each at its next step), "
        f"{len(outcomes['finished_before'])} finished before the cancel"
    )


@main.command()
@click.argument("instance_id", metavar="ID")
@database_url_option
@click.option("--wait", type=click.FloatRange(min=0), default=None, help="Seconds to wait for its result.")
@click.option("--json", "as_json", is_flag=True, help="Print the retry (what it removed) as JSON.")
def retry(instance_id: str, database_url: str, wait: float | None, as_json: bool) -> None:
    """Run failed instance ID again from its failed step.

    The activity whose last attempt failed at the end of its history runs again (with those of its
    gather); the steps before it are replayed from the history, not run again. What the retry removed
    is kept (geste show ID). An instance whose compensations ran is not retried.
    """

    async def go() -> tuple[RetryRecord, Any]:
        async with _client(database_url) as app:
            record = await app.retry(instance_id)
            if wait is None:
                return record, None
            return record, await app.get_handle(instance_id).result(timeout=wait)

    record, result = _run(go())
    if as_json:
        click.echo(_dump({"retry": record, **({} if wait is None else {"result": result})}))
        return
    removed = ", ".join(entry.name for entry in record.removed) or "none"
    click.echo(
        f"{record.instance_id}: retry {record.retry}, runs again from step {record.from_seq} "
        f"(failed steps removed: {removed}; it had failed with {_error_line(record.error)})"
    )
    if wait is not None:
        click.echo(f"result: {_js(result, 10_000)}")


@main.command()
@click.argument("instance_id", metavar="ID")
@database_url_option
@click.option("--force", is_flag=True, help="Break the lease even if the worker holding it is alive.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def resume(instance_id: str, database_url: str, force: bool, as_json: bool) -> None:
    """Make stuck instance ID runnable now.

    For an instance put back with a delay after an error, held by a dead worker (stopped, or not heard
    from within 3 x its lock_timeout, at least 45 s), or waiting and to look at its wait again. It never
    cuts a sleep or a timeout short. The lease of a live worker is broken only with --force.
    """

    async def go() -> ResumeResult:
        async with _client(database_url) as app:
            return await app.resume(instance_id, force=force)

    result = _run(go())
    if as_json:
        click.echo(_dump(result))
        return
    if result.lease_broken_from is not None:
        note = f"lease of worker {result.lease_broken_from} broken"
    elif result.already_runnable:
        note = "it was runnable already: nothing held it back"
    elif result.was_due_at is None:
        note = "it waited with no deadline: it looks at its wait again"
    else:
        note = f"it was due at {_stamp(result.was_due_at)}"
    click.echo(f"{result.instance_id}: {result.status.value}, runnable now ({note})")


@main.command()
@click.argument("name")
@click.argument("args", metavar="[ARGS_JSON]", required=False, callback=_json_arg)
@click.option("--id", "instance_id", default=None, help="Instance id (default: a random one).")
@click.option(
    "--app",
    "app_spec",
    metavar="MODULE:APP",
    envvar="GESTE_APP",
    required=True,
    help="The App that registers NAME (env GESTE_APP).",
)
@click.option("--database-url", default=None, help="Database to use (default: the App's).")
@click.option("--wait", type=click.FloatRange(min=0), default=None, help="Seconds to wait for the result.")
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Seconds from now after which the instance is cancelled (WorkflowTimeout).",
)
def start(
    name: str,
    args: Any,
    instance_id: str | None,
    app_spec: str,
    database_url: str | None,
    wait: float | None,
    timeout: float | None,
) -> None:
    """Start workflow NAME. ARGS_JSON: a list of arguments, an object of keyword arguments, or one value."""
    user_app = _load_app(app_spec)
    if name not in user_app.workflows:
        known = ", ".join(sorted(user_app.workflows)) or "none"
        raise CommandError(f"{UnknownWorkflowError(name)} in {app_spec} (known: {known})")
    positional: list[Any] = [] if args is None else args if isinstance(args, list) else [args]
    keywords: dict[str, Any] = {}
    if isinstance(args, dict):
        positional, keywords = [], args
    # A client App of our own: the user's App stays as configured (its worker, its URL).
    client = App(database_url or user_app.url, run_worker=False, max_payload_bytes=user_app.max_payload_bytes)
    for registered, workflow in user_app.workflows.items():
        client.workflow(name=registered)(workflow.fn)

    async def go() -> None:
        async with client:
            handle = await client.start_workflow(
                name, *positional, instance_id=instance_id, timeout=timeout, **keywords
            )
            if handle.created:
                click.echo(f"started {name} instance {handle.instance_id}")
            else:
                info = await handle.info()
                click.echo(f"instance {handle.instance_id} exists already ({info.status.value}); not started")
            if wait is not None:
                click.echo(f"result: {_js(await handle.result(timeout=wait), 10_000)}")

    _run(go())


@main.command("send-event")
@click.argument("event_type", metavar="TYPE")
@click.argument("data", metavar="[DATA_JSON]", required=False, callback=_json_arg)
@database_url_option
@click.option("--instance", "instance_id", default=None, help="Deliver to this instance only.")
@click.option("--id", "event_id", default=None, help="Event id; an id sent twice is stored once.")
def send_event(
    event_type: str, data: Any, database_url: str, instance_id: str | None, event_id: str | None
) -> None:
    """Send an event of TYPE to the workflows waiting for it.

    DATA_JSON is its data (any JSON value). Instances started before it keep it until they wait for it.
    """

    async def go() -> str:
        async with _client(database_url) as app:
            return await app.send_event(event_type, data, instance_id=instance_id, event_id=event_id)

    click.echo(f"sent {event_type} event {_run(go())}")


@main.command()
@click.argument("channel")
@click.argument("data", metavar="[DATA_JSON]", required=False, callback=_json_arg)
@database_url_option
@click.option("--to", "instance_id", default=None, help="Send to this instance only (send_to).")
@click.option("--id", "message_id", default=None, help="Message id; an id published twice is stored once.")
def publish(
    channel: str, data: Any, database_url: str, instance_id: str | None, message_id: str | None
) -> None:
    """Publish a message on CHANNEL (or, with --to, send it to one instance).

    DATA_JSON is its data (any JSON value). Broadcast subscribers each get it, one competing subscriber
    takes it; a subscriber that is not waiting keeps it until it receives.
    """

    async def go() -> str:
        async with _client(database_url) as app:
            if instance_id is None:
                return await app.publish(channel, data, message_id=message_id)
            return await app.send_to(instance_id, channel, data, message_id=message_id)

    mid = _run(go())
    to = "" if instance_id is None else f" to {instance_id}"
    click.echo(f"published message {mid} on {channel}{to}")
