"""``geste prune``: delete the finished instances older than an age, with every row of theirs, by hand
(``App.prune``; the workers do it on their own with ``App(retention=...)``: docs/retention.md). A client
App on ``--database-url``, no user code; bounded batches, one transaction each."""

from __future__ import annotations

import re

import click

from .._status import PruneResult
from . import BadInputError, _client, _dump, _run, database_url_option, main

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_age(text: str) -> float:
    """An age such as ``30d``, ``12h``, ``1d12h``, ``90m``, ``2w`` or a number of seconds, in seconds;
    ``BadInputError`` (exit code 2) for anything else."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = PART.findall(value)
        if not parts or "".join(number + unit for number, unit in parts) != value:
            raise BadInputError(
                f"--older-than takes an age such as 30d, 12h, 1d12h, 90m, 2w or seconds, not {text!r:.40}"
            ) from None
        seconds = sum(float(number) * UNITS[unit] for number, unit in parts)
    if not seconds >= 0 or seconds == float("inf"):
        raise BadInputError(f"--older-than must be a finite age >= 0, not {text!r:.40}")
    return seconds


@main.command("prune")
@database_url_option
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Delete the instances that finished longer ago than this: 30d, 12h, 1d12h, 90m, 2w, or seconds.",
)
@click.option(
    "--batch",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Instances read per transaction.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a sentence.")
def prune(database_url: str, older_than: str, batch: int, dry_run: bool, as_json: bool) -> None:
    """Delete the finished instances (completed, failed, cancelled) that ended longer ago than
    --older-than, each with its history, runs, timers, waits, event deliveries, subscriptions, delivered
    outbox events, retry records, state and streams. Kept whatever their age: those whose parent or one
    of whose children is unfinished, and those whose outbox holds an event not delivered yet."""
    age = parse_age(older_than)

    async def go() -> PruneResult:
        async with _client(database_url) as app:
            return await app.prune(age, batch=batch, dry_run=dry_run)

    result = _run(go())
    if as_json:
        click.echo(_dump(result.as_dict()))
        return
    verb = "would delete" if dry_run else "deleted"
    rows = "" if dry_run else f" ({result.rows:,} rows in all)"
    click.echo(f"{verb} {result.instances:,} finished instance(s){rows}")
    if result.kept:
        click.echo(f"kept {result.kept:,} still needed (an unfinished parent or child, an undelivered event)")
