"""``geste`` commands that run or watch the system: demo, worker, serve, migrate, status, replay-check."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from .._app import App
from .._demo import run_demo
from .._models import Status
from .._progress import Progress
from .._status import SystemStatus, WorkerInfo
from ..errors import ConfigurationError
from ..storage.base import MigrationStep
from . import (
    BadInputError,
    CommandError,
    _age,
    _client,
    _configure_logging,
    _dump,
    _entry_line,
    _error_line,
    _js,
    _load_app,
    _run,
    _safe_url,
    _stamp,
    database_url_option,
    log_level_option,
    main,
)


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
    "--queues",
    default=None,
    metavar="A,B",
    help="Serve only these of the App's declared queues (comma-separated; default: every one).",
)
@click.option(
    "--unqueued/--no-unqueued",
    default=None,
    help="Also run the instances outside any queue (default: as the App says, which is yes).",
)
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
    queues: str | None,
    unqueued: bool | None,
    metrics_port: int | None,
    metrics_host: str,
    metrics_token: str | None,
    log_level: str,
) -> None:
    """Run a worker for MODULE:APP until SIGTERM/SIGINT.

    On the signal it stops claiming, lets running instances finish (up to the App's
    ``shutdown_grace``), releases the rest and exits 0. With --metrics-port it also serves its
    metrics for Prometheus. --queues a,b: it admits from those of the App's declared queues only;
    --no-unqueued: it runs no instance outside a queue (docs/queues.md).
    """
    app = _load_app(app_spec)
    _configure_logging(log_level)
    app.run_worker = True
    if concurrency is not None:
        app.concurrency = concurrency
    if queues is not None:
        names = [name.strip() for name in queues.split(",")]
        if not all(names):
            raise BadInputError(f"--queues takes queue names separated by commas, not {queues!r}")
        app.serve_queues = frozenset(names)
    if unqueued is not None:
        app.serve_unqueued = unqueued
    try:
        app.check_served_queues()
    except ConfigurationError as exc:
        raise BadInputError(str(exc)) from None
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
    from ..engine import replay as _replay

    if (database_url is None) == (not files):
        raise BadInputError("give either --database-url URL or history FILES")
    app = _load_app(app_spec)

    async def go() -> _replay.ReplayReport:
        histories = await _replay.load_histories(
            database_url=database_url, files=files or None, workflow=workflow, limit=limit
        )
        results, workflows = [], app.workflows
        with Progress("replaying", total=len(histories), enabled=not as_json) as progress:
            for history in histories:
                result = await _replay.replay_history(
                    workflows, history, max_payload_bytes=app.max_payload_bytes
                )
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
        worker.version or "-",
    )


@main.command()
@database_url_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def status(database_url: str, as_json: bool) -> None:
    """Show the queue (instances per status, runnable, leases, oldest wait; the outbox's pending and dead
    events and its oldest pending one), the workers, the leases, the cron schedules and the queues (queued,
    admitted, limits, rate, oldest queued; counts stop at 1,000).

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
    known = {state: n for state, n in queue.counts.items() if state.is_known}
    unknown = {state: n for state, n in queue.counts.items() if not state.is_known}
    click.echo("  " + "  ".join(f"{state.value} {n}" for state, n in known.items()))
    click.echo(
        f"  runnable now {queue.runnable}  held leases {queue.held_leases}"
        f"  oldest waiting {_age(queue.oldest_waiting_age)}"
    )
    click.echo(
        f"  outbox: pending {queue.outbox_pending}  dead {queue.outbox_dead}"
        f"  oldest pending {_age(queue.outbox_oldest_pending_age)}"
    )
    if unknown:
        shown = ", ".join(f"{state.value!r} {n}" for state, n in sorted(unknown.items()))
        click.echo(
            f"  statuses this version of geste does not know (a newer version wrote them?): {shown}; "
            "no worker of this version claims those instances"
        )
    if found.unserved:
        shown = ", ".join(f"{name} {n}" for name, n in sorted(found.unserved.items()))
        click.echo(f"  runnable, but no live worker registers the workflow: {shown}")
    for version, names in sorted(found.unserved_versions.items()):
        shown = ", ".join(f"{name} {n}" for name, n in sorted(names.items()))
        click.echo(
            f"  runnable, pinned to version {version}, but no live worker of it registers them: {shown}"
        )
    if not found.workers:
        click.echo("workers: none registered")
    else:
        _print_workers(found)
        for worker in found.workers:
            if worker.health is not None and worker.stopped_at is None:
                click.echo(f"  {worker.worker_id} is unhealthy: {worker.health}")
    if found.leases:
        _print_leases(found)
    if found.schedules:
        _print_schedules(found)
    if found.queues:
        _print_queues(found)


def _print_queues(found: SystemStatus) -> None:
    from ._queues import UNDECLARED, queue_row, table

    click.echo(f"queues ({len(found.queues)}):")
    for line in table([queue_row(queue) for queue in found.queues], indent="  "):
        click.echo(line)
    if not all(queue.declared for queue in found.queues):
        click.echo(f"  {UNDECLARED}")


def _print_schedules(found: SystemStatus) -> None:
    click.echo(f"schedules ({len(found.schedules)}):")
    header = (
        "SCHEDULE",
        "WORKFLOW",
        "CRON",
        "TIMEZONE",
        "PAUSED",
        "NEXT TICK",
        "LAST INSTANCE",
        "QUEUE",
        "WAITING",
    )
    rows = [
        (
            s.name,
            s.workflow_name,
            s.cron,
            s.timezone,
            "yes" if s.paused else "no",
            "-" if s.paused else _stamp(s.next_tick),
            s.last_instance_id or "-",
            s.queue or "-",
            str(s.waiting),
        )
        for s in found.schedules
    ]
    _table(header, rows)


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
        "VERSION",
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
    from ..http._serve import bind
    from ..http._serve import serve as serve_http

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
