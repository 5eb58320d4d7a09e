"""``geste queues``: each queue with its queued and admitted instances, its limits, its rate window and
the age of its oldest queued instance (also a section of ``geste status``). Reads only: a client App on
``--database-url``, no user code."""

from __future__ import annotations

from collections.abc import Sequence

import click

from .._queues import QueueInfo
from . import _age, _client, _dump, _run, database_url_option, main

HEADER = ("QUEUE", "QUEUED", "ADMITTED", "LIMIT", "PER WORKER", "RATE", "OLDEST QUEUED")


def _count(n: int, capped: bool) -> str:
    return f"{n:,}+" if capped else f"{n:,}"


def _limit(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _rate(info: QueueInfo) -> str:
    """``used/limit per period``: the admissions of the current window against the budget."""
    if info.rate_limit is None:
        return "-"
    return f"{info.rate_used or 0}/{info.rate_limit} per {info.rate_period:g}s"


def queue_row(info: QueueInfo) -> tuple[str, ...]:
    """A queue as a row of ``HEADER`` (an undeclared queue: its name marked with ``*``)."""
    return (
        info.name if info.declared else f"{info.name} *",
        _count(info.queued, info.queued_capped),
        _count(info.admitted, info.admitted_capped),
        _limit(info.concurrency),
        _limit(info.worker_concurrency),
        _rate(info),
        _age(info.oldest_age),
    )


def table(rows: Sequence[tuple[str, ...]], indent: str = "") -> list[str]:
    widths = [max(len(row[n]) for row in [HEADER, *rows]) for n in range(len(HEADER))]
    return [
        (indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))).rstrip()
        for row in [HEADER, *rows]
    ]


UNDECLARED = "* not declared by any App: instances were started onto it by name (no limits)"


@main.command("queues")
@database_url_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def queues(database_url: str, as_json: bool) -> None:
    """List the queues by name: queued and admitted instances (the slots in use), the global and per-worker
    limits, the rate window's admissions against its budget, and how long the oldest queued instance has
    waited. Counts stop at 1,000 (shown as 1,000+)."""

    async def go() -> list[QueueInfo]:
        async with _client(database_url) as app:
            return await app.list_queues()

    infos = _run(go())
    if as_json:
        click.echo(_dump([info.as_dict() for info in infos]))
        return
    if not infos:
        click.echo("no queues")
        return
    for line in table([queue_row(info) for info in infos]):
        click.echo(line)
    if not all(info.declared for info in infos):
        click.echo(UNDECLARED)
