"""The ``geste`` command: run workers, start and inspect workflow instances, try the demo.

This module holds the command group and what every command shares; ``_instances`` the commands on
instances (list, show, start, cancel, retry, resume, send-event, publish), ``_operate`` those that run or
watch the system (demo, worker, serve, migrate, status, replay-check), ``_schedules`` those on cron
schedules (schedules, schedule create/pause/resume/delete).

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
import sys
from collections.abc import AsyncIterator, Coroutine
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click

from .. import __version__
from .._app import DEFAULT_URL, App
from .._models import HistoryEntry
from .._steps import (
    ActivityStep,
    CancelledStep,
    ChildStep,
    ContinueAsNewStep,
    EventStep,
    EventTimeoutStep,
    MessageStep,
    PublishStep,
    ReceiveStep,
    ReceiveTimeoutStep,
    SleepStep,
    StartChildStep,
    SubscribeStep,
    WaitEventStep,
    entry_step,
)
from ..errors import GesteError

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
    """A short human description of what a history entry recorded (its payload as it is when the row
    is not its kind's shape)."""
    step = entry_step(entry)
    if isinstance(step, ActivityStep):  # or a compensation
        if step.error is not None:
            text = "error " + _error_line(step.error)
        else:
            text = "done" if step.result is None else "→ " + _js(step.result)
        return text + (f" ({step.attempts} attempts)" if step.attempts > 1 else "")
    if isinstance(step, SleepStep):
        return f"{step.seconds:g}s, until {_clock(step.expires_at)}"
    if isinstance(step, WaitEventStep):
        parts = ["waiting"]
        if step.match:
            parts.append(f"for {_js(step.match)}")
        if step.timeout is not None:
            parts.append(f"(timeout {step.timeout:g}s)")
        return " ".join(parts)
    if isinstance(step, EventStep):
        return "received " + _js(step.data)
    if isinstance(step, EventTimeoutStep | ReceiveTimeoutStep):
        return "timed out"
    if isinstance(step, CancelledStep):
        by = "" if step.by_parent is None else f" (by its parent {step.by_parent})"
        return "cancellation delivered here" + by
    if isinstance(step, ContinueAsNewStep):
        return "continued as new with " + _js(step.input)
    if isinstance(step, StartChildStep):
        if step.error is not None:
            return "not started: " + step.error
        return (
            f"started child {step.child_id} (parent close: {step.parent_close}; geste show {step.child_id})"
        )
    if isinstance(step, ChildStep):
        if step.status == "completed":
            return f"child {step.workflow} completed → " + _js(step.result)
        error = "" if step.error is None else ": " + _error_line(step.error)
        return f"child {step.workflow} {step.status}{error}"
    if isinstance(step, SubscribeStep):
        return step.mode
    if isinstance(step, ReceiveStep):
        return "waiting" + ("" if step.timeout is None else f" (timeout {step.timeout:g}s)")
    if isinstance(step, MessageStep):
        return "received " + _js(step.data) + (" (direct)" if step.direct else "")
    if isinstance(step, PublishStep):  # or a send_to
        if entry.is_error:
            return f"no instance {step.target_instance_id!r}"
        to = "" if step.target_instance_id is None else f" to {step.target_instance_id}"
        return f"message {step.message_id}{to}"
    return _js(entry.payload)


def _entry_line(entry: HistoryEntry, started: datetime) -> str:
    offset = (entry.created_at - started).total_seconds()
    since = f"+{offset:.3f}s"
    return f"  {entry.seq:>3}  {since:>9}  {entry.kind.value:<12}  {entry.name:<20}  {_outcome(entry)}"


def _age(seconds: float | None) -> str:
    """A duration in seconds, short: ``4.2s``, ``3m 5s``, ``2h 7m``, ``3d 4h``."""
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


# The commands register themselves on ``main`` when imported (they need it defined first).
from . import _instances, _operate, _patches, _prune, _queues, _schedules  # noqa: E402,F401
