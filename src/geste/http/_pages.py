"""The web viewer's pages but the instance's own (``_timeline``): the frame, the list, sign-in, errors."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from .._models import Status
from ._html import Child, Html, duration, raw, short, tag, utc, when

if TYPE_CHECKING:
    from .._queues import QueueInfo
    from .._status import SystemStatus
    from ..storage.base import InstanceSummary, ScheduleRow
    from ._viewer import Link, ListQuery

STYLESHEET = resources.files("geste.http").joinpath("viewer.css").read_text(encoding="utf-8")
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLESHEET.encode("utf-8")).digest()).decode("ascii")
CSP = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
"""No script runs, the one inline stylesheet is allowed by its hash, forms post to this origin only."""


def frame(link: Link, title: str, body: Child, *, signed_in: bool = False, footer: Child = None) -> Html:
    """A whole page: the bar on top (with a sign-out button for a cookie session), ``body``, a footer."""
    sign_out = None
    if signed_in:
        sign_out = tag("form", tag("button", "Sign out", type="submit"), method="post", action=link.logout())
    bar = tag(
        "header",
        tag("a", "geste ", tag("span", "viewer"), class_="brand", href=link.list()),
        tag(
            "nav",
            tag("a", "Instances", href=link.list()),
            " ",
            tag("a", "Schedules", href=link.schedules()),
            " ",
            tag("a", "Queues", href=link.queues()),
            " ",
            tag("a", "Versions", href=link.versions()),
        ),
        tag("span", class_="spacer"),
        tag("span", "read-only", class_="meta"),
        sign_out,
        class_="top",
    )
    return Html(
        "<!doctype html>"
        + tag(
            "html",
            tag(
                "head",
                raw('<meta charset="utf-8">'),
                raw('<meta name="viewport" content="width=device-width, initial-scale=1">'),
                raw('<meta name="referrer" content="same-origin">'),
                raw('<link rel="icon" href="data:,">'),  # no request for /favicon.ico
                tag("title", f"{title} · geste"),
                tag("style", raw(STYLESHEET)),
            ),
            tag("body", bar, tag("main", body), tag("footer", footer)),
            lang="en",
        )
    )


def status_badge(status: Status | str) -> Html:
    value = str(status)
    known = value in {s.value for s in Status}
    return tag("span", value, class_=f"status s-{value}" if known else "status")


def sign_in(link: Link, *, next_url: str, failed: bool) -> Html:
    notice = tag("p", "That is not the server's token.", class_="notice") if failed else None
    form = tag(
        "form",
        tag("label", "Token", for_="token"),
        tag(
            "input", id="token", name="token", type="password", autocomplete="current-password", required=True
        ),
        tag("input", type="hidden", name="next", value=next_url),
        tag("button", "Open the viewer", type="submit"),
        method="post",
        action=link.login(),
    )
    body = tag(
        "div",
        tag("h1", "Sign in"),
        tag(
            "p",
            "This geste server needs its token (",
            tag("code", "geste serve --token"),
            " or ",
            tag("code", "GESTE_HTTP_TOKEN"),
            "). The viewer keeps a session cookie for 12 hours; it opens these read-only pages only.",
            class_="muted",
        ),
        notice,
        form,
        class_="panel login",
    )
    return frame(link, "Sign in", body)


def error_page(link: Link, *, status: int, title: str, message: str, signed_in: bool) -> Html:
    body = tag(
        "div",
        tag("h1", f"{status} · {title}"),
        tag("p", message),
        tag("p", tag("a", "Back to the instances", href=link.list())),
        class_="panel",
    )
    return frame(link, title, body, signed_in=signed_in)


# -- the list -----------------------------------------------------------------------------------------
def instance_list(
    link: Link,
    *,
    view: ListQuery,
    rows: Sequence[InstanceSummary],
    counts: dict[Status, int],
    count_cap: int,
    workflow_names: Sequence[str],
    has_newer: bool,
    has_older: bool,
    now: float,
    page_sizes: Sequence[int],
    signed_in: bool,
    elapsed: float,
) -> Html:
    body = [
        tag("h1", "Instances" if view.workflow is None else f"Instances of {view.workflow}"),
        _filters(link, view, workflow_names, page_sizes),
        _counts(link, view, counts, count_cap),
        _table(link, rows, now) if rows else tag("div", "No instance matches.", class_="empty tablewrap"),
        _pager(link, view, rows, has_newer=has_newer, has_older=has_older),
    ]
    footer = f"{utc(now)} · rendered in {duration(elapsed)}"
    return frame(link, "Instances", body, signed_in=signed_in, footer=footer)


def _filters(link: Link, view: ListQuery, names: Sequence[str], page_sizes: Sequence[int]) -> Html:
    statuses = [tag("option", "any status", value="")]
    statuses += [tag("option", s.value, value=s.value, selected=view.status == s) for s in Status]
    sizes = [
        tag("option", str(n), value="" if n == 50 else str(n), selected=view.limit == n) for n in page_sizes
    ]
    if view.limit not in page_sizes:
        sizes.append(tag("option", str(view.limit), value=str(view.limit), selected=True))
    return tag(
        "form",
        tag(
            "label",
            "Workflow",
            tag(
                "input", name="workflow", value=view.workflow or "", list="workflow-names", placeholder="any"
            ),
        ),
        tag("datalist", [tag("option", value=name) for name in names], id="workflow-names"),
        tag("label", "Status", tag("select", statuses, name="status")),
        tag("label", "Created from (UTC)", _moment_input("from", view.from_text)),
        tag("label", "Created before (UTC)", _moment_input("to", view.to_text)),
        tag("label", "Per page", tag("select", sizes, name="limit")),
        tag("button", "Filter", type="submit"),
        tag("a", "Reset", href=link.list(), class_="reset"),
        method="get",
        action=link.list(),
        class_="panel filters",
    )


def _moment_input(name: str, value: str) -> Html:
    return tag("input", type="datetime-local", name=name, value=value, step=1)


def _counts(link: Link, view: ListQuery, counts: dict[Status, int], cap: int) -> Html:
    chips = []
    for status in Status:
        n = counts.get(status, 0)
        shown = f"{cap:,}+" if n > cap else f"{n:,}"
        chips.append(
            tag(
                "a",
                tag("span", class_=f"dot s-{status.value}"),
                status.value,
                tag("b", shown),
                href=link.list(**view.params(status="" if view.status == status else status.value)),
                class_="on" if view.status == status else None,
                title=f"{'all statuses' if view.status == status else 'only ' + status.value}",
            )
        )
    return tag("div", chips, class_="counts")


def _table(link: Link, rows: Sequence[InstanceSummary], now: float) -> Html:
    head = tag(
        "tr",
        [
            tag("th", name, class_=cls)
            for name, cls in (
                ("Instance", None),
                ("Workflow", None),
                ("Status", None),
                ("Created", None),
                ("Last change", None),
                ("Duration", None),
                ("Steps", "num"),
                ("Input", None),
            )
        ],
    )
    lines = []
    for row in rows:
        end = row.finished_at if row.finished_at is not None else now
        took = duration(end - row.created_at)
        if row.finished_at is None:
            took = f"{took} so far"
        status_cell: list[Child] = [status_badge(row.status)]
        if row.cancel_requested and not row.status.is_finished:
            status_cell.append(tag("div", "cancel requested", class_="muted"))
        if row.locked_by and row.status in (Status.RUNNING, Status.COMPENSATING):
            status_cell.append(tag("div", f"on {short(row.locked_by, 40)}", class_="muted"))
        lines.append(
            tag(
                "tr",
                tag("td", tag("a", row.instance_id, href=link.instance(row.instance_id)), class_="id mono"),
                tag("td", tag("a", row.workflow_name, href=link.list(workflow=row.workflow_name))),
                tag("td", status_cell),
                tag("td", when(row.created_at, now)),
                tag("td", when(row.finished_at or row.updated_at, now)),
                tag("td", took),
                tag("td", str(row.steps), class_="num"),
                tag("td", short(_input_preview(row.input_head), 90) or "—", class_="input mono"),
            )
        )
    return tag(
        "div", tag("table", tag("thead", head), tag("tbody", lines), class_="list"), class_="tablewrap"
    )


# -- the schedules ------------------------------------------------------------------------------------
def _schedule_queue(row: ScheduleRow) -> Html | str:
    """The queue a schedule's ticks are started onto, with their priority there when it is not 0."""
    if row.queue is None:
        return raw('<span class="muted">—</span>')
    return row.queue if not row.priority else f"{row.queue} (priority {row.priority})"


def schedule_list(
    link: Link, *, rows: Sequence[ScheduleRow], now: float, signed_in: bool, elapsed: float
) -> Html:
    """The cron schedules by name: definition, paused, next tick, last tick and the instance it started."""
    head = tag(
        "tr",
        [
            tag("th", name)
            for name in (
                "Schedule",
                "Workflow",
                "Cron",
                "Time zone",
                "Missed",
                "Overlap",
                "Queue",
                "State",
                "Next tick",
                "Last tick",
                "Last instance",
            )
        ],
    )
    lines = [
        tag(
            "tr",
            tag("td", row.name, class_="mono"),
            tag("td", tag("a", row.workflow_name, href=link.list(workflow=row.workflow_name))),
            tag("td", row.cron, class_="mono"),
            tag("td", row.timezone),
            tag("td", row.missed),
            tag("td", row.overlap if not row.waiting else f"{row.overlap} ({row.waiting} waiting)"),
            tag("td", _schedule_queue(row), class_="mono"),
            tag("td", "paused" if row.paused else "active", class_="paused" if row.paused else None),
            tag("td", raw('<span class="muted">—</span>') if row.paused else when(row.next_tick, now)),
            tag("td", when(row.last_tick, now)),
            tag(
                "td",
                tag("a", row.last_instance_id, href=link.instance(row.last_instance_id))
                if row.last_instance_id is not None
                else raw('<span class="muted">—</span>'),
                class_="id mono",
            ),
        )
        for row in rows
    ]
    table = (
        tag("div", tag("table", tag("thead", head), tag("tbody", lines), class_="list"), class_="tablewrap")
        if rows
        else tag("div", "No schedule.", class_="empty tablewrap")
    )
    body = [tag("h1", "Schedules"), table]
    footer = f"{utc(now)} · rendered in {duration(elapsed)}"
    return frame(link, "Schedules", body, signed_in=signed_in, footer=footer)


# -- versions ------------------------------------------------------------------------------------------
def version_list(link: Link, *, status: SystemStatus, now: float, signed_in: bool, elapsed: float) -> Html:
    """The live workers by version (docs/versioning.md), and the runnable instances pinned to a version no
    live worker of it runs (``SystemStatus.unserved_versions``)."""
    live = [worker for worker in status.workers if worker.alive]
    head = tag("tr", [tag("th", name) for name in ("Version", "Worker", "Host", "Workflows", "Pinned")])
    lines = [
        tag(
            "tr",
            tag("td", worker.version or "—", class_="mono"),
            tag("td", worker.worker_id, class_="mono"),
            tag("td", worker.host),
            tag("td", ", ".join(worker.workflows or ()) or "—"),
            tag("td", ", ".join(worker.pinned) or "—"),
        )
        for worker in sorted(live, key=lambda w: (w.version or "", w.worker_id))
    ]
    workers = (
        tag("div", tag("table", tag("thead", head), tag("tbody", lines), class_="list"), class_="tablewrap")
        if lines
        else tag("div", "No live worker.", class_="empty tablewrap")
    )
    stuck = [
        tag(
            "tr",
            tag("td", version, class_="mono"),
            tag("td", tag("a", name, href=link.list(workflow=name))),
            tag("td", f"{n:,}"),
        )
        for version, names in sorted(status.unserved_versions.items())
        for name, n in sorted(names.items())
    ]
    unserved = (
        tag(
            "div",
            tag(
                "table",
                tag("thead", tag("tr", [tag("th", h) for h in ("Pinned to", "Workflow", "Runnable")])),
                tag("tbody", stuck),
                class_="list",
            ),
            class_="tablewrap",
        )
        if stuck
        else tag(
            "div",
            "Every runnable pinned instance has a live worker of its version.",
            class_="empty tablewrap",
        )
    )
    body = [
        tag("h1", "Versions"),
        tag("h2", "Live workers"),
        workers,
        tag("h2", "Runnable, pinned to a version no live worker runs"),
        unserved,
    ]
    footer = f"{utc(now)} · rendered in {duration(elapsed)}"
    return frame(link, "Versions", body, signed_in=signed_in, footer=footer)


# -- the queues ---------------------------------------------------------------------------------------
def _rate(queue: QueueInfo) -> str:
    """The admissions of the rate's current window against its budget: ``3 / 10 per 1 min``."""
    return f"{queue.rate_used or 0} / {queue.rate_limit or 0:,} per {duration(queue.rate_period or 0.0)}"


def queue_list(
    link: Link, *, queues: Sequence[QueueInfo], now: float, signed_in: bool, elapsed: float
) -> Html:
    """The queues by name: queued and admitted instances (counted up to ``QUEUE_COUNT_CAP``), limits, the rate
    window's admissions against its budget, and since when the oldest queued instance waits (a count
    that stopped at the cap is shown with a ``+``)."""
    head = tag(
        "tr",
        [
            tag("th", name)
            for name in ("Queue", "Queued", "Admitted", "Limit", "Per worker", "Rate", "Oldest queued")
        ],
    )
    none = raw('<span class="muted">—</span>')

    def count(n: int, capped: bool) -> Html:
        return tag("td", f"{n:,}+" if capped else f"{n:,}", class_="num")

    def limit(value: int | None) -> Html:
        return tag("td", none if value is None else f"{value:,}", class_="num")

    lines = [
        tag(
            "tr",
            tag(
                "td",
                queue.name,
                None if queue.declared else tag("span", " (not declared)", class_="muted"),
                class_="mono",
            ),
            count(queue.queued, queue.queued_capped),
            count(queue.admitted, queue.admitted_capped),
            limit(queue.concurrency),
            limit(queue.worker_concurrency),
            tag("td", none if queue.rate_limit is None else _rate(queue)),
            tag(
                "td",
                when(None if queue.oldest_queued_at is None else queue.oldest_queued_at.timestamp(), now),
            ),
        )
        for queue in queues
    ]
    table = (
        tag("div", tag("table", tag("thead", head), tag("tbody", lines), class_="list"), class_="tablewrap")
        if queues
        else tag("div", "No queue.", class_="empty tablewrap")
    )
    body = [tag("h1", "Queues"), table]
    footer = f"{utc(now)} · rendered in {duration(elapsed)}"
    return frame(link, "Queues", body, signed_in=signed_in, footer=footer)


def _input_preview(head: str) -> str:
    """``{"args": [...], "kwargs": {...}}`` shown as the arguments of a call, when the head is whole."""
    try:
        recorded = json.loads(head)
    except (ValueError, RecursionError):
        return head  # cut at INPUT_HEAD characters
    return arguments(recorded)


def arguments(recorded: Any) -> str:
    """``"a", 2, key=3`` from a recorded ``{"args": [...], "kwargs": {...}}`` (anything else as JSON)."""
    if not isinstance(recorded, dict) or set(recorded) != {"args", "kwargs"}:
        return json.dumps(recorded, ensure_ascii=False)
    args, kwargs = recorded["args"], recorded["kwargs"]
    parts = [json.dumps(a, ensure_ascii=False) for a in args] if isinstance(args, list) else []
    if isinstance(kwargs, dict):
        parts += [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def _pager(
    link: Link, view: ListQuery, rows: Sequence[InstanceSummary], *, has_newer: bool, has_older: bool
) -> Html:
    from ._viewer import key_text

    def button(label: str, href: str | None, rel: str | None = None) -> Html:
        if href is None:
            return tag("span", label, class_="off")
        return tag("a", label, href=href, rel=rel)

    newest = link.list(**view.params()) if has_newer else None
    newer = link.list(**view.params(after=key_text(rows[0]))) if has_newer and rows else None
    older = link.list(**view.params(before=key_text(rows[-1]))) if has_older and rows else None
    return tag(
        "nav",
        button("« Newest", newest),
        button("← Newer", newer, "prev"),
        button("Older →", older, "next"),
        tag("span", f"{len(rows)} shown", class_="muted"),
        class_="pager",
    )
