"""The ``geste`` command: run workers, start and inspect workflow instances, try the demo.

Commands that need no user code open ``App(--database-url, run_worker=False)``; ``worker`` and ``start``
import the user's App (``module:attribute``). Every ``geste.errors.GesteError`` ends the command with a
one-line message on stderr and exit code 1; invalid arguments are usage errors (exit code 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click

from . import __version__, _operations
from ._app import DEFAULT_URL, App
from ._demo import run_demo
from ._models import HistoryEntry, InstanceInfo, Status, StepKind
from ._operations import ResumeResult, RetryRecord
from ._progress import Progress
from ._status import SystemStatus, WorkerInfo
from .errors import GesteError, UnknownWorkflowError
from .storage.base import MigrationStep

T = TypeVar("T")


class CommandError(click.ClickException):
    """A one-line error message, and exit code 1."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class BadInputError(CommandError):
    """A one-line error about what the user typed, and exit code 2."""

    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GesteError as exc:
            raise CommandError(str(exc) or type(exc).__name__) from None


def _run(main: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(main)


@contextlib.asynccontextmanager
async def _client(url: str) -> AsyncIterator[App]:
    async with App(url, run_worker=False) as app:
        yield app


def _json_arg(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})") from None


def _load_app(spec: str) -> App:
    """Import ``module:attribute`` (the current directory first on ``sys.path``) and check it is an App."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise BadInputError(f"expected MODULE:APP (like myapp:app), not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise BadInputError(f"cannot import {module_name!r}: no module named {exc.name!r}") from None
        raise BadInputError(f"error while importing {module_name!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise BadInputError(f"error while importing {module_name!r}: {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise BadInputError(f"{module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, App):
        raise BadInputError(f"{spec} is a {type(obj).__name__}, not a geste.App")
    return obj


# -- formatting -------------------------------------------------------------------------------------
def _safe_url(url: str) -> str:
    """``url`` without its password, fit for logs and output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _js(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def _error_line(error: dict[str, Any] | None) -> str:
    if not error:
        return ""
    return f"{str(error.get('type', 'Error')).rpartition('.')[2]}: {error.get('message', '')}"


def _outcome(entry: HistoryEntry) -> str:
    """A short human description of what a history entry recorded."""
    p = entry.payload
    if entry.kind in (StepKind.ACTIVITY, StepKind.COMPENSATION):
        if entry.is_error:
            text = "error " + _error_line(p.get("error"))
        else:
            text = "done" if p.get("result") is None else "→ " + _js(p.get("result"))
        attempts = p.get("attempts", 1)
        return text + (f" ({attempts} attempts)" if attempts > 1 else "")
    if entry.kind == StepKind.SLEEP:
        return f"{p['seconds']:g}s, until {_clock(p['expires_at'])}"
    if entry.kind == StepKind.WAIT_EVENT:
        parts = ["waiting"]
        if p.get("match"):
            parts.append(f"for {_js(p['match'])}")
        if p.get("timeout") is not None:
            parts.append(f"(timeout {p['timeout']:g}s)")
        return " ".join(parts)
    if entry.kind == StepKind.EVENT:
        return "received " + _js(p.get("data"))
    if entry.kind == StepKind.EVENT_TIMEOUT:
        return "timed out"
    if entry.kind == StepKind.CANCELLED:
        return "cancellation delivered here"
    if entry.kind == StepKind.SUBSCRIBE:
        return str(p.get("mode", ""))
    if entry.kind == StepKind.RECEIVE:
        return "waiting" + ("" if p.get("timeout") is None else f" (timeout {p['timeout']:g}s)")
    if entry.kind == StepKind.MESSAGE:
        return "received " + _js(p.get("data")) + (" (direct)" if p.get("direct") else "")
    if entry.kind == StepKind.RECEIVE_TIMEOUT:
        return "timed out"
    if entry.kind in (StepKind.PUBLISH, StepKind.SEND_TO):
        if entry.is_error:
            return f"no instance {p.get('target_instance_id')!r}"
        to = "" if p.get("target_instance_id") is None else f" to {p['target_instance_id']}"
        return f"message {p.get('message_id')}{to}"
    return _js(p)


def _entry_line(entry: HistoryEntry, started: datetime) -> str:
    offset = (entry.created_at - started).total_seconds()
    since = f"+{offset:.3f}s"
    return f"  {entry.seq:>3}  {since:>9}  {entry.kind.value:<12}  {entry.name:<20}  {_outcome(entry)}"


def _stamp(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _dump(value: Any) -> str:
    def default(obj: Any) -> Any:
        if isinstance(obj, datetime):
            return obj.isoformat()
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        return str(obj)

    return json.dumps(value, default=default, indent=2, ensure_ascii=False)


# -- commands ---------------------------------------------------------------------------------------
database_url_option = click.option(
    "--database-url",
    envvar="GESTE_DATABASE_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="Database to use (env GESTE_DATABASE_URL).",
)
log_level_option = click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Logging level (to stderr).",
)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geste")
def main() -> None:
    """geste: durable workflows for asyncio Python."""


@main.command()
@click.option("--database-url", default=None, help="Database to use (default: a temporary SQLite file).")
@click.option("--decline", is_flag=True, help="Have the bank decline the payment, to see compensations run.")
def demo(database_url: str | None, decline: bool) -> None:
    """Run the order demo, printing its history as it is recorded."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="  [%(levelname)s] %(message)s")
    with tempfile.TemporaryDirectory(prefix="geste-demo-") as folder:
        url = database_url or f"sqlite:///{os.path.join(folder, 'demo.db')}"
        click.echo(f"database: {_safe_url(url)}")
        info = _run(run_demo(url, approved=not decline, echo=click.echo, describe=_entry_line))
    click.echo(f"status: {info.status}")
    if info.status == Status.COMPLETED:
        click.echo(f"result: {_js(info.result, 200)}")
    else:
        click.echo(f"error: {_error_line(info.error)} (compensations ran, newest first)")


@main.command()
@click.argument("app_spec", metavar="MODULE:APP")
@click.option("--concurrency", type=click.IntRange(min=1), default=None, help="Instances run at once.")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (and nothing else).",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of --metrics-port.")
@click.option(
    "--metrics-token",
    default=None,
    help="Bearer token the metrics endpoint requires (default: $GESTE_HTTP_TOKEN).",
)
@log_level_option
def worker(
    app_spec: str,
    concurrency: int | None,
    metrics_port: int | None,
    metrics_host: str,
    metrics_token: str | None,
    log_level: str,
) -> None:
    """Run a worker for MODULE:APP until SIGTERM/SIGINT.

    On the signal it stops claiming, lets running instances finish (up to the App's
    ``shutdown_grace``), releases the rest and exits 0. With --metrics-port it also serves its
    metrics for Prometheus.
    """
    app = _load_app(app_spec)
    _configure_logging(log_level)
    app.run_worker = True
    if concurrency is not None:
        app.concurrency = concurrency
    metrics = None if metrics_port is None else (metrics_host, metrics_port, metrics_token)
    _run(_work(app, metrics=metrics))


async def _work(app: App, *, metrics: tuple[str, int, str | None] | None = None) -> None:
    log = logging.getLogger("geste.cli")
    server = None
    if metrics is not None:  # before open(): a port in use fails the command at once
        host, port, token = metrics
        server = await app.metrics.serve(host=host, port=port, token=token)
    loop = asyncio.get_running_loop()
    stopping = False

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if stopping:
            log.warning("%s again: still draining", signal.Signals(signum).name)
        else:
            log.info("%s received: shutting down", signal.Signals(signum).name)
        stopping = True
        app.shutdown()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        log.info(
            "opening %s with workflows %s", _safe_url(app.url), ", ".join(sorted(app.workflows)) or "(none)"
        )
        await app.open()
        if stopping:  # a signal during open() came before run() could hear it
            app.shutdown()
        await app.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if server is not None:
            await server.close()


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
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with error tracebacks).")
def show(instance_id: str, database_url: str, as_json: bool) -> None:
    """Show an instance and its history as a timeline."""

    async def go() -> tuple[InstanceInfo, list[HistoryEntry], list[RetryRecord]]:
        async with _client(database_url) as app:
            info = await app.get_instance(instance_id)
            return info, await app.history(instance_id), await app.retries(instance_id)

    info, history, retries = _run(go())
    if as_json:
        click.echo(_dump({"instance": info, "history": history, "retries": retries}))
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
    statuses = [Status(status)] if status is not None else list(_operations.CANCELLABLE)
    outcomes: dict[str, list[str]] = {"cancelled": [], "cancel_requested": [], "finished_before": []}
    async with _client(database_url) as app:
        ids = await _operations.cancellable(app, workflow=workflow, statuses=statuses)
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

            await _operations.cancel_each(app, ids, on_done=done)
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
def start(
    name: str, args: Any, instance_id: str | None, app_spec: str, database_url: str | None, wait: float | None
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
            handle = await client.start_workflow(name, *positional, instance_id=instance_id, **keywords)
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


@main.command("replay-check")
@click.argument("app_spec", metavar="MODULE:APP")
@click.argument("files", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--database-url", default=None, help="Replay this database's instances; it is only read.")
@click.option("--workflow", default=None, help="Only instances of this workflow name.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Instances read from the database at most, the unfinished ones first.",
)
@click.option("--verbose", "-v", is_flag=True, help="Print a line for each history, not only the failures.")
@click.option("--json", "as_json", is_flag=True, help="Print every verdict as JSON.")
def replay_check(
    app_spec: str,
    files: tuple[Path, ...],
    database_url: str | None,
    workflow: str | None,
    limit: int,
    verbose: bool,
    as_json: bool,
) -> None:
    """Replay recorded histories against MODULE:APP's current code; exit 1 if any diverges.

    The histories come from --database-url (a copy of production, say: read-only, never written) or from
    FILES exported with geste.testing.export_history (a folder stands for its *.json files). Nothing is
    run but the workflows' code up to the end of each history: no activity, no write.
    """
    from . import _replay

    if (database_url is None) == (not files):
        raise BadInputError("give either --database-url URL or history FILES")
    app = _load_app(app_spec)

    async def go() -> _replay.ReplayReport:
        histories = await _replay.load_histories(
            database_url=database_url, files=files or None, workflow=workflow, limit=limit
        )
        results = []
        with Progress("replaying", total=len(histories), enabled=not as_json) as progress:
            for history in histories:
                result = await _replay.replay_history(app, history)
                results.append(result)
                if verbose or not result.ok:
                    progress.note(result.describe())
                progress.advance()
        return _replay.ReplayReport(tuple(results))

    report = _run(go())
    if as_json:
        click.echo(_dump({"ok": report.ok, "results": [result.as_dict() for result in report.results]}))
    else:
        click.echo(report.summary())
    if not report.ok:
        raise click.exceptions.Exit(1)


@main.command()
@database_url_option
def migrate(database_url: str) -> None:
    """Create or upgrade the schema, showing each migration applied, and print its version."""
    app = App(database_url, run_worker=False)
    progress: Progress | None = None

    def announce(step: MigrationStep) -> None:  # called by the storage, maybe from its own thread
        nonlocal progress
        if progress is None:
            progress = Progress("migrating", total=step.total).__enter__()
        if step.done:
            progress.advance(label=step.name)

    app.storage.on_migration = announce

    async def go() -> int:
        try:
            async with app:
                return await app.storage.schema_version()
        finally:
            if progress is not None:
                progress.__exit__(None, None, None)

    click.echo(f"schema version {_run(go())} ({_safe_url(database_url)})")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)  # clocks of two hosts may disagree a little
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs}s"


def _notifications(counts: Any) -> str:
    if not isinstance(counts, dict):
        return "-"
    shown = [f"{str(channel).removeprefix('geste_')}={n}" for channel, n in sorted(counts.items()) if n]
    return " ".join(shown) or "-"


def _worker_row(worker: WorkerInfo, checked_at: datetime) -> tuple[str, ...]:
    listener = {} if worker.stopped_at is not None else worker.listener  # a stopped one listens no more
    last = listener.get("last_notification_at")
    try:
        last_age = _age((checked_at - datetime.fromisoformat(last)).total_seconds()) + " ago" if last else "-"
    except (TypeError, ValueError):
        last_age = str(last)
    return (
        worker.worker_id,
        worker.host,
        str(worker.pid),
        worker.state,
        f"{worker.running}/{worker.concurrency}",
        str(worker.leases),
        str(listener.get("state", "-")),
        str(listener.get("reconnects", "-")),
        last_age,
        _notifications(listener.get("notifications")),
        _age(worker.heartbeat_age) + " ago",
    )


@main.command()
@database_url_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def status(database_url: str, as_json: bool) -> None:
    """Show the queue (instances per status, runnable, leases, oldest wait), the workers and the leases.

    A worker is stale when not heard from within 3 x its lock_timeout (it heartbeats every lock_timeout /
    3), at least 45 s (3 x the default of 15 s); stopped when it shut down gracefully.
    """

    async def go() -> SystemStatus:
        async with _client(database_url) as app:
            return await app.status()

    found = _run(go())
    if as_json:
        click.echo(json.dumps(found.as_dict(), indent=2, ensure_ascii=False))
        return
    queue = found.queue
    click.echo(f"queue ({_safe_url(database_url)}):")
    click.echo("  " + "  ".join(f"{state.value} {n}" for state, n in queue.counts.items()))
    click.echo(
        f"  runnable now {queue.runnable}  held leases {queue.held_leases}"
        f"  oldest waiting {_age(queue.oldest_waiting_age)}"
    )
    if not found.workers:
        click.echo("workers: none registered")
    else:
        _print_workers(found)
    if found.leases:
        _print_leases(found)


def _print_workers(found: SystemStatus) -> None:
    click.echo("workers:")
    header = (
        "WORKER",
        "HOST",
        "PID",
        "STATE",
        "RUNNING",
        "LEASES",
        "LISTENER",
        "RECONNECTS",
        "LAST NOTIFICATION",
        "NOTIFICATIONS",
        "HEARTBEAT",
    )
    rows = [_worker_row(worker, found.checked_at) for worker in found.workers]
    _table(header, rows)


def _print_leases(found: SystemStatus) -> None:
    held = found.queue.held_leases
    shown = "" if held <= len(found.leases) else f", the {len(found.leases)} expiring soonest"
    click.echo(f"leases ({held} held{shown}):")
    header = ("INSTANCE", "WORKFLOW", "WORKER", "WORKER STATE", "EXPIRES IN")
    rows = [
        (lease.instance_id, lease.workflow_name, lease.worker_id, lease.worker_state, _age(lease.expires_in))
        for lease in found.leases
    ]
    _table(header, rows)
    if any(lease.worker_state != "alive" for lease in found.leases):
        click.echo(
            "  a lease of a worker that is not alive holds its instance until it expires; "
            "`geste resume ID` frees it now"
        )


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[n]) for row in [header, *rows]) for n in range(len(header))]
    for row in [header, *rows]:
        click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@main.command()
@click.argument("app_spec", metavar="[MODULE:APP]", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any).")
@click.option(
    "--token",
    envvar="GESTE_HTTP_TOKEN",
    default=None,
    help="Require `Authorization: Bearer TOKEN` on every endpoint but /health (env GESTE_HTTP_TOKEN).",
)
@click.option(
    "--database-url",
    default=None,
    help="Without MODULE:APP, the database to serve (default: $GESTE_DATABASE_URL, else sqlite:///geste.db).",
)
@click.option("--no-worker", is_flag=True, help="Do not run MODULE:APP's worker in this process.")
@log_level_option
def serve(
    app_spec: str | None,
    host: str,
    port: int,
    token: str | None,
    database_url: str | None,
    no_worker: bool,
    log_level: str,
) -> None:
    """Serve CloudEvents (POST /events) and the instance API over HTTP until SIGTERM/SIGINT.

    With MODULE:APP its workflows can be started by name and, unless --no-worker, its worker runs in this
    process. Without it, a client App on --database-url takes events, shows and cancels instances.
    """
    import importlib.util

    if importlib.util.find_spec("uvicorn") is None:
        raise CommandError("geste serve needs uvicorn: pip install 'geste[http]'")
    from .http._serve import bind
    from .http._serve import serve as serve_http

    if app_spec is not None:
        if database_url is not None:
            raise BadInputError("--database-url serves without MODULE:APP; an App has its own database")
        app = _load_app(app_spec)
        if no_worker:
            app.run_worker = False
    else:
        app = App(database_url, run_worker=False)
    asgi = app.asgi(token=token)
    _configure_logging(log_level)
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    _run(serve_http(app, asgi, sock))


if __name__ == "__main__":
    main()
