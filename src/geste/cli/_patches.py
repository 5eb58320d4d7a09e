"""``geste patches``: the patch ids (``ctx.patched``) the histories hold, by workflow, with their old runs
(unfinished instances started before the patch whose history lacks its marker): when a patch has none, its
old branch can go (``ctx.deprecate_patch``). Reads only: a client App on ``--database-url``, no user code.
Its cost is written in docs/design.md ("Versions"): every marker of the current runs, and per patch the
unfinished instances of its workflow started before it; it is not part of ``geste status``."""

from __future__ import annotations

import click

from .._versions import PatchInfo
from . import _client, _dump, _run, database_url_option, main

HEADER = ("WORKFLOW", "PATCH", "FIRST MARKED", "MARKED", "OLD RUNS")


@main.command("patches")
@database_url_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(min=1), help="Patches listed.")
def patches(database_url: str, as_json: bool, limit: int) -> None:
    """List the patch ids (ctx.patched) by workflow: when the first marker was recorded, how many current
    histories hold it, and the old runs (unfinished instances started before it, without the marker). A
    patch with no old run can be deprecated (ctx.deprecate_patch)."""

    async def go() -> list[PatchInfo]:
        async with _client(database_url) as app:
            return await app.patches(limit=limit)

    infos = _run(go())
    if as_json:
        click.echo(_dump([info.as_dict() for info in infos]))
        return
    if not infos:
        click.echo("no patch markers")
        return
    rows = [
        (
            info.workflow_name,
            info.patch_id,
            info.first_marked_at.isoformat(timespec="seconds"),
            f"{info.marked:,}",
            f"{info.old_runs:,}",
        )
        for info in infos
    ]
    widths = [max(len(row[n]) for row in [HEADER, *rows]) for n in range(len(HEADER))]
    for row in [HEADER, *rows]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
