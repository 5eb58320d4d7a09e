"""The web viewer's page of one instance: its facts, what it waits for now, input and outcome, and its
history as a timeline; and the page of one of its runs ended by ``continue_as_new`` (kept), with the list
of those runs on both.

Each history row is shown by its kind, from its typed step (``_steps``): an activity's
timing, attempts, arguments and outcome; a timer's due time; the wait for an event or a message and what
ended it; channel publications with who took them; events emitted through the outbox with their delivery.
A row that cannot be read (changed by hand: not JSON, or not its step's shape) is shown as such, never a
failed page; a row of a kind this version does not know shows its payload.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._models import Status, StepKind
from .._steps import (
    ActivityStep,
    CancelledStep,
    ChildStep,
    ContinueAsNewStep,
    EventStep,
    MessageStep,
    NowStep,
    PublishStep,
    ReceiveStep,
    SendEventStep,
    SleepStep,
    StartChildStep,
    SubscribeStep,
    WaitEventStep,
    step_or_none,
)
from ._html import Child, Html, code_block, duration, join, short, tag, utc, when
from ._pages import arguments, frame, status_badge

if TYPE_CHECKING:
    from ..storage.base import (
        HistoryRow,
        InstanceExtras,
        InstanceRow,
        MessageRow,
        OutboxRow,
        RunRow,
        StateRow,
        StreamHead,
    )
    from ._viewer import Link

_UNREADABLE = object()
MAX_STEPS_SHOWN = 2000
"""A longer history shows its first and last thousand steps (a page of megabytes helps nobody)."""
_WAITS = (StepKind.WAIT_EVENT, StepKind.RECEIVE)
_OUTCOMES = (
    StepKind.EVENT,
    StepKind.EVENT_TIMEOUT,
    StepKind.MESSAGE,
    StepKind.RECEIVE_TIMEOUT,
    StepKind.CANCELLED,
)
_CSS_KIND: dict[str, str] = {
    StepKind.ACTIVITY: "activity",
    StepKind.COMPENSATION: "compensation",
    StepKind.SLEEP: "timer",
    StepKind.WAIT_EVENT: "event",
    StepKind.EVENT: "event",
    StepKind.EVENT_TIMEOUT: "event",
    StepKind.SUBSCRIBE: "channel",
    StepKind.RECEIVE: "channel",
    StepKind.MESSAGE: "channel",
    StepKind.RECEIVE_TIMEOUT: "channel",
    StepKind.PUBLISH: "channel",
    StepKind.SEND_TO: "channel",
    StepKind.NOW: "helper",
    StepKind.UUID: "helper",
    StepKind.RANDOM: "helper",
    StepKind.CANCELLED: "cancel",
    StepKind.SEND_EVENT: "outbox",
    StepKind.CONTINUE_AS_NEW: "continue",
    StepKind.START_CHILD: "helper",
    StepKind.CHILD: "helper",
    StepKind.SET_STATE: "state",
    StepKind.PATCH: "helper",
}


@dataclass(frozen=True, slots=True)
class Step:
    """A history row with its payload decoded (``_UNREADABLE`` when it is not JSON) and its typed step
    (None when the payload is not its kind's shape, or the kind is unknown)."""

    seq: int
    kind: str
    name: str
    body: Any
    typed: Any
    is_error: bool
    at: float


def _step(row: HistoryRow) -> Step:
    body = _decode(row.payload)
    typed = None if body is _UNREADABLE else step_or_none(row.kind, body, is_error=bool(row.is_error))
    return Step(row.seq, row.kind, row.name, body, typed, bool(row.is_error), row.created_at)


def _decode(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _UNREADABLE


def _field(body: Any, key: str) -> Any:
    return body.get(key) if isinstance(body, dict) else None


def instance_page(
    link: Link,
    *,
    row: InstanceRow,
    history: Sequence[HistoryRow],
    extras: InstanceExtras,
    now: float,
    signed_in: bool,
    elapsed: float,
    runs: Sequence[RunRow] = (),
    children: Sequence[InstanceRow] = (),
    state: Sequence[StateRow] = (),
    streams: Sequence[tuple[StreamHead, Sequence[tuple[int, Any]]]] = (),
) -> Html:
    """The instance's page: its current run (``runs``: those it ended with ``continue_as_new``; its
    ``children``: the child workflows it started, linked, as its parent is in its facts; ``state``: the
    latest value of each key it published with ``ctx.set_state``; its ``streams`` with their last items)."""
    steps = [_step(r) for r in history]
    started = runs[-1].ended_at if runs else row.created_at  # the current run began as the last ended
    title = f"History · {len(steps)} step{'s' if len(steps) != 1 else ''}"
    body = [
        _back(link, row),
        tag("h1", row.instance_id, " ", status_badge(row.status)),
        _facts(link, row, extras, now),
        _now_panel(link, row, steps, extras, now, children),
        tag(
            "div",
            tag("section", tag("h2", "Input"), code_block(_decode(row.input)), class_="panel"),
            tag("section", tag("h2", _outcome_title(row.status)), _outcome(link, row), class_="panel"),
            class_="cols",
        ),
        tag(
            "section",
            tag("h2", f"{title} (run {row.run})" if runs else title),
            _timeline(link, steps, extras, now, started_at=started, waiting=row.status == Status.WAITING)
            if steps
            else tag("p", "Nothing recorded yet.", class_="muted"),
            class_="panel",
        ),
        _state_panel(state, now),
        _runs_panel(link, row, runs, shown=row.run),
        _children_panel(link, children),
        _streams_panel(link, row, streams),
    ]
    footer = f"{utc(now)} · rendered in {duration(elapsed)}"
    return frame(link, row.instance_id, body, signed_in=signed_in, footer=footer)


def _state_panel(state: Sequence[StateRow], now: float) -> Html | None:
    """The latest value of each key the instance published (``ctx.set_state``), by key; None: none."""
    if not state:
        return None
    head = tag("tr", [tag("th", name) for name in ("Key", "Version", "Set", "Value")])
    lines = [
        tag(
            "tr",
            tag("td", tag("code", value.key)),
            tag("td", str(value.version)),
            tag("td", when(value.created_at, now), tag("div", f"run {value.run}", class_="muted")),
            tag("td", code_block(_decode(value.value))),
            class_="state",
        )
        for value in state
    ]
    table = tag(
        "div", tag("table", tag("thead", head), tag("tbody", lines), class_="list"), class_="tablewrap"
    )
    return tag(
        "section",
        tag("h2", f"State · {len(state)} key{'s' if len(state) != 1 else ''}"),
        table,
        class_="panel",
    )


def _streams_panel(
    link: Link, row: InstanceRow, streams: Sequence[tuple[StreamHead, Sequence[tuple[int, Any]]]]
) -> Html | None:
    """The instance's durable streams (``ctx.write_stream``): each key, its length, open or closed, its
    last items and the path of its Server-Sent Events; None: none."""
    if not streams:
        return None
    items = []
    for head, tail in streams:
        closed = head.closed or row.status.is_finished
        count = head.length - (1 if head.closed else 0)  # the close takes a position
        items.append(
            tag(
                "li",
                tag("strong", head.key),
                f" · {count} item{'s' if count != 1 else ''} · ",
                tag("span", "closed" if closed else "open", class_="muted" if closed else None),
                " · ",
                tag("code", link.stream(row.instance_id, head.key)),
                tag(
                    "ol",
                    *(tag("li", tag("code", _preview(item)), value=str(at)) for at, item in tail),
                    start=str(tail[0][0]) if tail else "0",
                )
                if tail
                else None,
            )
        )
    return tag("section", tag("h2", f"Streams · {len(streams)}"), tag("ul", *items), class_="panel")


def _preview(item: Any) -> str:
    text = json.dumps(item, ensure_ascii=False)
    return text if len(text) <= 200 else text[:199] + "…"


def _children_panel(link: Link, children: Sequence[InstanceRow]) -> Html | None:
    """The child workflows the instance started (``ctx.start_child``), oldest first; None: none."""
    if not children:
        return None
    items = [
        tag(
            "li",
            tag("a", child.instance_id, href=link.instance(child.instance_id)),
            f" {child.workflow_name} ",
            status_badge(child.status),
        )
        for child in children
    ]
    return tag("section", tag("h2", f"Children · {len(children)}"), tag("ul", *items), class_="panel")


def run_page(
    link: Link,
    *,
    row: InstanceRow,
    run: RunRow,
    runs: Sequence[RunRow],
    history: Sequence[HistoryRow],
    extras: InstanceExtras,
    now: float,
    signed_in: bool,
    elapsed: float,
) -> Html:
    """The page of run ``run`` of the instance, one it ended with ``continue_as_new`` (kept): its input,
    its timeline to the continue, and the runs before and after it. ``extras``: the outbox rows and
    messages of its steps (what it waits for now is the current run's, not shown here)."""
    steps = [_step(r) for r in history]
    facts: list[tuple[str, Child]] = [
        ("Workflow", tag("a", row.workflow_name, href=link.list(workflow=row.workflow_name))),
        ("Run", f"{run.run} of {row.run}"),
        ("Started", [when(run.started_at, now), tag("div", utc(run.started_at), class_="muted")]),
        ("Ended", [when(run.ended_at, now), tag("div", utc(run.ended_at), class_="muted")]),
        ("Duration", duration(run.ended_at - run.started_at)),
        ("Steps recorded", str(run.steps)),
        ("Instance now", status_badge(row.status)),
    ]
    following = link.instance(row.instance_id, run=None if run.run + 1 == row.run else run.run + 1)
    ended = tag("p", "Continued as new: ", tag("a", f"run {run.run + 1}", href=following), ".")
    body = [
        _back(link, row),
        tag("h1", row.instance_id, " ", tag("span", f"run {run.run}", class_="status s-continued")),
        tag("section", _facts_list(facts), class_="panel"),
        tag(
            "div",
            tag("section", tag("h2", "Input"), code_block(_decode(run.input)), class_="panel"),
            tag("section", tag("h2", "End"), ended, class_="panel"),
            class_="cols",
        ),
        tag(
            "section",
            tag("h2", f"History · {len(steps)} step{'s' if len(steps) != 1 else ''} (run {run.run})"),
            _timeline(link, steps, extras, now, started_at=run.started_at, waiting=False, continued=following)
            if steps
            else tag("p", "Nothing recorded.", class_="muted"),
            class_="panel",
        ),
        _runs_panel(link, row, runs, shown=run.run),
    ]
    footer = f"{utc(now)} · rendered in {duration(elapsed)}"
    return frame(link, f"{row.instance_id} · run {run.run}", body, signed_in=signed_in, footer=footer)


def _back(link: Link, row: InstanceRow) -> Html:
    return tag(
        "p",
        tag("a", "← Instances", href=link.list()),
        " · ",
        tag("a", f"all {row.workflow_name}", href=link.list(workflow=row.workflow_name)),
        class_="muted",
    )


def _runs_panel(link: Link, row: InstanceRow, runs: Sequence[RunRow], *, shown: int) -> Html | None:
    """The instance's runs: those it ended with ``continue_as_new`` (kept), oldest first, then its
    current one; the run shown is not a link. None for an instance never continued."""
    if not runs:
        return None
    items: list[Html] = []
    for run in runs:
        label = f"run {run.run}"
        name: Child = (
            tag("strong", label)
            if run.run == shown
            else tag("a", label, href=link.instance(row.instance_id, run=run.run))
        )
        items.append(
            tag(
                "li",
                name,
                f": {utc(run.started_at)} to {utc(run.ended_at)}, {run.steps} steps, {run.ended_as}; input ",
                tag("code", short(json.dumps(_decode(run.input), ensure_ascii=False), 160)),
            )
        )
    current = f"run {row.run}"
    here = shown == row.run
    name = tag("strong", current) if here else tag("a", current, href=link.instance(row.instance_id))
    items.append(tag("li", name, ": the current run, ", status_badge(row.status)))
    heading = tag("h2", f"Runs · {len(runs) + 1}")
    return tag("section", heading, tag("ol", items, class_="runs"), class_="panel")


# -- facts, now, outcome ----------------------------------------------------------------------------------
def _facts(link: Link, row: InstanceRow, extras: InstanceExtras, now: float) -> Html:
    end = row.finished_at if row.finished_at is not None else now
    took = duration(end - row.created_at) + ("" if row.finished_at is not None else " so far")
    facts: list[tuple[str, Child]] = [
        ("Workflow", tag("a", row.workflow_name, href=link.list(workflow=row.workflow_name))),
        ("Status", status_badge(row.status)),
        ("Created", [when(row.created_at, now), tag("div", utc(row.created_at), class_="muted")]),
        ("Last change", when(row.updated_at, now)),
        ("Finished", when(row.finished_at, now) if row.finished_at is not None else "not yet"),
        ("Duration", took),
        ("Steps recorded", str(row.steps)),
    ]
    if row.parent_id is not None:
        facts.append(("Parent", tag("a", row.parent_id, href=link.instance(row.parent_id), class_="mono")))
    if row.deadline is not None:
        facts.append(("Deadline", _deadline(row.deadline, now)))
    if row.run > 1:
        facts.append(("Run", f"{row.run} (continued as new {row.run - 1} times)"))
    if row.locked_by:
        facts.append(
            ("Lease", [tag("span", row.locked_by, class_="mono"), " until ", when(row.lock_expires_at, now)])
        )
    if row.cancel_requested:
        facts.append(("Cancellation", "requested"))
    if extras.subscriptions:
        facts.append(
            (
                "Channels",
                join(tag("span", tag("code", s.channel), f" ({s.mode})") for s in extras.subscriptions),
            )
        )
    return tag("section", _facts_list(facts), class_="panel")


def _deadline(deadline: float, now: float) -> Html:
    """``<UTC time> (in 3 s)``, or ``(passed 2 min ago)``: when the deadline cancels the instance."""
    ahead: Child = when(deadline, now) if deadline > now else ["passed ", when(deadline, now)]
    return tag("span", utc(deadline), " (", ahead, ")", class_="deadline")


def _facts_list(facts: Sequence[tuple[str, Child]]) -> Html:
    return tag("dl", [tag("div", tag("dt", name), tag("dd", value)) for name, value in facts], class_="facts")


def _now_panel(
    link: Link,
    row: InstanceRow,
    steps: Sequence[Step],
    extras: InstanceExtras,
    now: float,
    children: Sequence[InstanceRow] = (),
) -> Html:
    items: list[Child] = []
    state = "waiting"
    if row.status.is_finished:
        state = "finished"
        items.append(["Finished ", when(row.finished_at, now), ": it waits for nothing."])
    elif row.status in (Status.RUNNING, Status.COMPENSATING):
        state = row.status.value
        doing = "Running its compensations" if row.status == Status.COMPENSATING else "Running"
        if row.locked_by and row.lock_expires_at is not None and row.lock_expires_at > now:
            items.append(
                [
                    f"{doing} on worker ",
                    tag("code", row.locked_by),
                    "; its lease runs until ",
                    when(row.lock_expires_at, now),
                    ".",
                ]
            )
        elif row.locked_by:
            items.append(
                [
                    f"{doing} on worker ",
                    tag("code", row.locked_by),
                    " whose lease expired ",
                    when(row.lock_expires_at, now),
                    ": another worker will take it over.",
                ]
            )
        else:
            items.append(f"{doing}.")
    elif row.status == Status.PENDING:
        what = "Not started" if row.run == 1 else f"Continued as new: run {row.run} not started yet"
        items.append([what, ": ready for a worker to claim it", _runnable(row, now), "."])
    else:
        items.extend(_waits(link, row, steps, extras, now, children))
    if row.cancel_requested and not row.status.is_finished:
        items.append("Cancellation requested: it is delivered when the instance next runs.")
    elif row.deadline is not None and not row.status.is_finished:
        if row.deadline > now:
            items.append(["Its deadline cancels it ", when(row.deadline, now), f", {utc(row.deadline)}."])
        else:
            passed = ": it is cancelled when it next runs."
            items.append(["Its deadline passed ", when(row.deadline, now), passed])
    return tag(
        "section",
        tag("h2", "Now"),
        tag("ul", [tag("li", item) for item in items]),
        class_=f"panel now st-{state}",
    )


def _runnable(row: InstanceRow, now: float) -> Child:
    if row.run_at is None:
        return None
    return [" (runnable ", when(row.run_at, now), ")"]


def _waits(
    link: Link,
    row: InstanceRow,
    steps: Sequence[Step],
    extras: InstanceExtras,
    now: float,
    children: Sequence[InstanceRow] = (),
) -> list[Child]:
    """What a waiting instance waits for: its registered event wait, the channels it waits on, its
    timers (a sleep's, or a wait's timeout); with none of those, the end of a child it started and has
    not seen end (``_awaited_children``)."""
    items: list[Child] = []
    by_seq = {step.seq: step for step in steps}
    wait = extras.event_wait
    if wait is not None:
        match = _decode(wait.match)
        items.append(
            [
                "An event of type ",
                tag("code", wait.event_type),
                [" whose data has ", tag("code", short(json.dumps(match, ensure_ascii=False), 300))]
                if match
                else None,
                ", since ",
                when(_waiting_since(steps, wait.event_type, wait.since), now),
                ["; it times out ", when(wait.deadline, now)] if wait.deadline is not None else None,
                ".",
            ]
        )
    for sub in extras.subscriptions:
        if sub.waiting_since is None:
            continue
        deadline = _receive_deadline(steps, sub.channel)
        items.append(
            [
                "A message on channel ",
                tag("code", sub.channel),
                f" ({sub.mode}), since ",
                when(sub.waiting_since, now),
                ["; it times out ", when(deadline, now)] if deadline is not None else None,
                ".",
            ]
        )
    for seq, expires_at in extras.timers:
        step = by_seq.get(seq)
        if step is not None and step.kind == StepKind.SLEEP:
            secs = step.typed.seconds if isinstance(step.typed, SleepStep) else None
            items.append(
                [
                    "Its timer",
                    f" of {duration(secs)}" if secs is not None else None,
                    " (step ",
                    str(seq),
                    "): due ",
                    when(expires_at, now),
                    f", {utc(expires_at)}.",
                ]
            )
        elif wait is None and not any(s.waiting_since is not None for s in extras.subscriptions):
            items.append(["A timer (step ", str(seq), ") due ", when(expires_at, now), "."])
    if not items:
        items.extend(_child_waits(link, steps, children))
        if row.run_at is not None and row.run_at <= now:
            items.append(["Woken: ready for a worker to resume it (runnable ", when(row.run_at, now), ")."])
        elif row.run_at is not None and row.run_at != row.deadline:  # the deadline has a line of its own
            items.append(["Resumes ", when(row.run_at, now), f", {utc(row.run_at)}."])
        elif not items:
            items.append("Nothing is registered for it to wait for.")
    return items


def _awaited_children(steps: Sequence[Step]) -> dict[str, str]:
    """The children the run started (``start_child``) whose end it has not recorded (no ``child`` row):
    child id -> workflow, in the order started. A parent suspended at ``handle.result()`` (or, its code
    done, at its ``ParentClose.WAIT`` children) waits for one of them; which one is not stored (a child
    wait registers nothing: the child's end wakes its parent), so the page names them all."""
    started: dict[str, str] = {}
    for step in steps:
        if isinstance(step.typed, StartChildStep) and step.typed.error is None:
            started[step.typed.child_id] = step.name
        elif isinstance(step.typed, ChildStep):
            started.pop(step.name, None)
    return started


def _child_waits(link: Link, steps: Sequence[Step], children: Sequence[InstanceRow]) -> list[Child]:
    """A waiting instance that waits for nothing registered waits for a child's end: the children it
    started and has not seen end, linked, with their status (read with the page's list of children)."""
    awaited = _awaited_children(steps)
    if not awaited:
        return []
    status = {child.instance_id: child.status for child in children}

    def one(child_id: str, workflow: str) -> Child:
        badge = status_badge(status[child_id]) if child_id in status else None
        return [tag("a", child_id, href=link.instance(child_id), class_="mono"), f" ({workflow}) ", badge]

    if len(awaited) == 1:
        [(child_id, workflow)] = awaited.items()
        return [["The end of its child ", one(child_id, workflow), "."]]
    return [
        [
            f"The end of one of the {len(awaited)} children it started and has not seen end: ",
            join((one(child_id, workflow) for child_id, workflow in awaited.items()), "; "),
            ".",
        ]
    ]


def _waiting_since(steps: Sequence[Step], event_type: str, default: float) -> float:
    """When the instance began its wait for ``event_type`` (the registered wait's ``since`` is its
    start: it takes the events sent since then)."""
    for step in reversed(steps):
        if step.kind == StepKind.WAIT_EVENT and step.name == event_type:
            return step.at
    return default


def _receive_deadline(steps: Sequence[Step], channel: str) -> float | None:
    for step in reversed(steps):
        if step.kind == StepKind.RECEIVE and step.name == channel:
            return step.typed.deadline if isinstance(step.typed, ReceiveStep) else None
    return None


def _outcome_title(status: Status) -> str:
    if status == Status.COMPLETED:
        return "Result"
    if status in (Status.FAILED, Status.CANCELLED):
        return "Error"
    return "Result"


def _outcome(link: Link, row: InstanceRow) -> Html:
    if row.status == Status.COMPLETED:
        return code_block(_decode(row.result))
    if row.status in (Status.FAILED, Status.CANCELLED):
        error = _decode(row.error)
        by_parent = _field(error, "cancelled_by_parent")
        if isinstance(by_parent, str):  # a child its parent's end cancelled (ParentClose.CANCEL)
            return tag("div", _by_parent(link, by_parent), error_block(error))
        if isinstance(error, dict):
            return error_block(error)
        if row.status == Status.CANCELLED:
            return tag("p", "Cancelled.", class_="muted")
        return code_block(error)
    return tag("p", "Not finished yet.", class_="muted")


def _by_parent(link: Link, parent_id: str) -> Html:
    """A child cancelled by its parent's end (``ParentClose.CANCEL``), the parent linked."""
    parent = tag("a", parent_id, href=link.instance(parent_id), class_="mono")
    return tag("p", "Cancelled by its parent ", parent, " (parent close: cancel).", class_="by-parent")


def error_block(error: Any) -> Html:
    """A recorded error: its type and message, its traceback folded, the compensations that failed."""
    if not isinstance(error, dict):
        return code_block(error)
    kind = str(error.get("type") or "error")
    message = str(error.get("message") or "")
    parts: list[Child] = [
        tag(
            "div",
            short(kind.rpartition(".")[2], 120),
            ": " if message else "",
            message,
            class_="error-title",
            title=kind,
        )
    ]
    traceback = error.get("traceback")
    if isinstance(traceback, str) and traceback:
        parts.append(tag("details", tag("summary", "Traceback"), tag("pre", traceback)))
    others = error.get("compensation_errors")
    if isinstance(others, list) and others:
        parts.append(
            tag(
                "details",
                tag("summary", f"{len(others)} compensation{'s' if len(others) != 1 else ''} failed too"),
                [tag("div", tag("code", str(_field(e, "activity") or "")), error_block(e)) for e in others],
                open=True,
            )
        )
    return tag("div", parts)


# -- the timeline -------------------------------------------------------------------------------------------
def _timeline(
    link: Link,
    steps: Sequence[Step],
    extras: InstanceExtras,
    now: float,
    *,
    started_at: float,
    waiting: bool,
    continued: str | None = None,
) -> Html:
    """The steps of one run, offsets from ``started_at``; ``waiting``: the instance waits at the last
    one now; ``continued``: the link to the run a ``continue_as_new`` step started."""
    by_seq = {step.seq: step for step in steps}
    pending_timers = {seq for seq, _ in extras.timers}
    outbox = {entry.event_id: entry for entry in extras.outbox}
    messages = {message.message_id: message for message in extras.messages}
    last_seq = steps[-1].seq
    items: list[Html] = []
    compensating = False
    for position, step in enumerate(steps):
        if (
            len(steps) > MAX_STEPS_SHOWN
            and MAX_STEPS_SHOWN // 2 <= position < len(steps) - MAX_STEPS_SHOWN // 2
        ):
            if position == MAX_STEPS_SHOWN // 2:
                left_out = len(steps) - MAX_STEPS_SHOWN
                items.append(_divider(f"… {left_out:,} steps not shown (geste show --json has them all) …"))
            continue
        if step.kind == StepKind.COMPENSATION and not compensating:
            compensating = True
            items.append(_divider("compensating, newest first"))
        waiting_here = waiting and step.seq == last_seq and step.kind in (*_WAITS, StepKind.SLEEP)
        title, chips, details = _describe(
            link, step, by_seq, pending_timers, outbox, messages, waiting, now, continued
        )
        if waiting_here:
            chips.insert(0, tag("span", "waiting now", class_="chip warn"))
        css = ["k-" + _CSS_KIND.get(_kind(step.kind), "helper")]
        if isinstance(step.typed, ActivityStep) and step.typed.cancelled:
            css.append("cancelled")  # no failure of the activity: the workflow was cancelled
        elif step.is_error:
            css.append("error")
        if waiting_here:
            css.append("current")
        offset = step.at - started_at
        items.append(
            tag(
                "li",
                tag(
                    "div",
                    f"+{duration(offset)}" if offset >= 0 else f"-{duration(offset)}",
                    class_="at",
                    title=utc(step.at),
                ),
                tag("div", tag("div", class_="marker")),
                tag(
                    "div",
                    tag("div", title, tag("span", chips, class_="chips") if chips else None, class_="title"),
                    details,
                    class_="body",
                ),
                class_=" ".join(css),
                id=f"step-{step.seq}",
            )
        )
    return tag("ol", items, class_="timeline")


def _divider(text: str) -> Html:
    return tag("li", tag("div", class_="at"), tag("div"), tag("div", text, class_="body"), class_="divider")


def _kind(kind: str) -> StepKind | str:
    try:
        return StepKind(kind)
    except ValueError:
        return kind


def _label(text: str) -> Html:
    return tag("span", text, class_="kind")


def _chip(text: str, tone: str | None = None) -> Html:
    return tag("span", text, class_=f"chip {tone}" if tone else "chip")


def _call(name: str, recorded_input: Any) -> str:
    """``name(arg, key=value)`` from an activity's recorded ``{"args": [...], "kwargs": {...}}``."""
    return f"{name}({arguments(recorded_input)})"


def _value_line(label: str, value: Any) -> Html:
    """A short value on one line (``→ "ok"``); a long one folded under ``label``."""
    text = json.dumps(value, ensure_ascii=False)
    if len(text) <= 100 and "\n" not in text:
        return tag("div", "→ ", tag("code", text), class_="line")
    return tag("details", tag("summary", label), code_block(value))


def _describe(
    link: Link,
    step: Step,
    by_seq: dict[int, Step],
    pending_timers: set[int],
    outbox: dict[str, OutboxRow],
    messages: dict[str, MessageRow],
    waiting: bool,
    now: float,
    continued: str | None = None,
) -> tuple[Child, list[Html], Child]:
    """The title line, the chips beside it and the details below of one step."""
    body, typed = step.body, step.typed
    kind = _kind(step.kind)
    label = _label
    if typed is None:
        if body is _UNREADABLE or isinstance(kind, StepKind):  # not JSON, or not its step's shape
            return [label(str(step.kind)), step.name], [_chip("unreadable row", "bad")], None
        return [label(str(step.kind)), step.name], [], code_block(body)  # a kind of a newer version
    if isinstance(typed, ActivityStep):  # or a compensation
        if typed.cancelled:  # ActivityCancelled: the workflow's cancel (or deadline) cut it short
            why = "cancelled: deadline" if _field(typed.error, "deadline") is True else "cancelled"
            chips = [_chip(why, "cancel")]
        else:
            chips = [_chip("failed", "bad") if step.is_error else _chip("ok", "good")]
        chips.append(_chip(duration(typed.duration)))
        attempts = typed.attempts
        chips.append(
            _chip(f"{attempts} attempt{'s' if attempts != 1 else ''}", "warn" if attempts > 1 else None)
        )
        details: list[Child] = []
        if typed.cancelled:
            details.append(tag("div", str(_field(typed.error, "message") or ""), class_="line"))
        elif step.is_error:
            details.append(error_block(typed.error))
        else:
            details.append(_value_line("Result", typed.result))
        call = _call(step.name, typed.input)
        if len(call) > 160:
            details.append(tag("details", tag("summary", "Arguments"), code_block(typed.input)))
        what = "compensation" if kind == StepKind.COMPENSATION else "activity"
        return [label(what), tag("code", short(call, 160))], chips, details
    if isinstance(typed, SleepStep):
        secs, due = typed.seconds, typed.expires_at
        chips = []
        if step.seq in pending_timers:
            if step.seq != max(by_seq):  # the last step is marked "waiting now" already
                chips.append(_chip("pending", "warn"))
        elif _next_is(by_seq, step.seq, StepKind.CANCELLED):
            chips.append(_chip("interrupted by the cancellation", "bad"))
        elif any(seq > step.seq for seq in by_seq) or not waiting:
            chips.append(_chip("fired", "good"))
        line = tag("div", "due ", when(due, now), f" · {utc(due)}", class_="line")
        return [label("timer"), f"sleep {duration(secs)}"], chips, line
    if isinstance(typed, WaitEventStep | ReceiveStep):
        timeout, deadline = typed.timeout, typed.deadline
        chips = [_chip(f"timeout {duration(timeout)}")] if timeout is not None else []
        lines: list[Child] = []
        if isinstance(typed, WaitEventStep):
            match = typed.match
            if match:
                lines.append(
                    tag(
                        "div",
                        "whose data has ",
                        tag("code", short(json.dumps(match, ensure_ascii=False), 300)),
                        class_="line",
                    )
                )
            title = [label("waits for event"), tag("code", step.name)]
        else:
            title = [label("waits for a message on"), tag("code", step.name)]
        if deadline is not None and step.seq + 1 not in by_seq:  # still waiting: when it gives up
            lines.append(tag("div", "times out ", when(deadline, now), f" · {utc(deadline)}", class_="line"))
        return title, chips, lines
    if isinstance(typed, EventStep):
        chips = _waited(step, by_seq)
        source = typed.source
        line = tag(
            "div",
            "id ",
            tag("code", typed.event_id),
            [" from ", tag("code", source)] if source else None,
            class_="line",
        )
        data = _value_line("Data", typed.data)
        extensions = typed.extensions
        more = tag("details", tag("summary", "Attributes"), code_block(extensions)) if extensions else None
        return [label("event received"), tag("code", step.name)], chips, [line, data, more]
    if kind in (StepKind.EVENT_TIMEOUT, StepKind.RECEIVE_TIMEOUT):
        missing = "no event" if kind == StepKind.EVENT_TIMEOUT else "no message on"
        chips = [_chip("timeout", "bad"), *_waited(step, by_seq)]
        return [label("timed out:"), f"{missing} ", tag("code", step.name)], chips, None
    if isinstance(typed, MessageStep):
        chips = _waited(step, by_seq)
        sender = typed.sender_instance_id
        line = tag(
            "div",
            "id ",
            tag("code", typed.message_id),
            [" from ", tag("a", sender, href=link.instance(sender))] if sender else None,
            " (sent to this instance)" if typed.direct else None,
            class_="line",
        )
        data = _value_line("Data", typed.data)
        return [label("message received on"), tag("code", step.name)], chips, [line, data]
    if isinstance(typed, SubscribeStep):
        implicit = " (by its first receive)" if typed.implicit else ""
        return [label("subscribed to"), tag("code", step.name)], [_chip(typed.mode + implicit)], None
    if isinstance(typed, PublishStep):  # or a send_to
        return _publication(link, step, typed, messages)
    if isinstance(typed, SendEventStep):
        return _emitted(step, typed, outbox, now)
    if kind in (StepKind.NOW, StepKind.UUID, StepKind.RANDOM):
        value = body
        if isinstance(typed, NowStep):
            value = utc(float(typed.value))
        return [label(f"ctx.{'uuid4' if kind == StepKind.UUID else kind}()"), f"→ {value}"], [], None
    if kind == StepKind.PATCH:
        return [label("patch marker"), tag("code", step.name)], [], None
    if kind == StepKind.CANCELLED:
        if step.name == "deadline":  # the workflow's deadline passed (start(timeout=... / deadline=...))
            return [label("deadline passed: cancellation delivered")], [], None
        if isinstance(typed, CancelledStep) and typed.by_parent is not None:  # ParentClose.CANCEL
            parent = tag("a", typed.by_parent, href=link.instance(typed.by_parent), class_="mono")
            return [label("cancellation delivered:"), " cancelled by its parent ", parent], [], None
        return [label("cancellation delivered")], [], None
    if isinstance(typed, StartChildStep):
        child = tag("a", typed.child_id, href=link.instance(typed.child_id), class_="mono")
        if typed.error is not None:
            return [label("child not started"), tag("code", step.name)], [_chip("failed", "bad")], typed.error
        chips = [_chip(f"parent close: {typed.parent_close}")]
        return [label("starts child"), tag("code", step.name), " ", child], chips, None
    if isinstance(typed, ChildStep):
        child = tag("a", step.name, href=link.instance(step.name), class_="mono")
        tone = "good" if typed.status == Status.COMPLETED else "bad"
        outcome: Child = (
            _value_line("Result", typed.result)
            if typed.status == Status.COMPLETED
            else error_block(typed.error or {})
        )
        return (
            [label("child ended"), tag("code", typed.workflow), " ", child],
            [_chip(typed.status, tone)],
            outcome,
        )
    if isinstance(typed, ContinueAsNewStep):
        call = _call(step.name, typed.input)
        after: list[Child] = []
        if len(call) > 160:
            after.append(tag("details", tag("summary", "Arguments"), code_block(typed.input)))
        if continued is not None:
            after.append(tag("div", tag("a", "the next run", href=continued), class_="line"))
        return [label("continued as new:"), tag("code", short(call, 160))], [_chip("run ended")], after
    return [label(str(step.kind)), step.name], [], code_block(body)


def _next_is(by_seq: dict[int, Step], seq: int, kind: StepKind) -> bool:
    following = by_seq.get(seq + 1)
    return following is not None and following.kind == kind


def _waited(step: Step, by_seq: dict[int, Step]) -> list[Html]:
    """How long the wait before an outcome row lasted."""
    wait = by_seq.get(step.seq - 1)
    if wait is None or wait.kind not in _WAITS or wait.name != step.name:
        return []
    return [_chip(f"after {duration(step.at - wait.at)}")]


def _publication(
    link: Link, step: Step, typed: PublishStep, messages: dict[str, MessageRow]
) -> tuple[Child, list[Html], Child]:
    target = typed.target_instance_id
    label = tag("span", "published on" if step.kind == StepKind.PUBLISH else "sent on", class_="kind")
    title: list[Child] = [label, tag("code", step.name)]
    if target:
        title += [" to ", tag("a", target, href=link.instance(target))]
    if step.is_error:
        return title, [_chip("no such instance", "bad")], None
    message_id = typed.message_id
    chips: list[Html] = []
    details: list[Child] = [tag("div", "id ", tag("code", str(message_id)), class_="line")]
    message = messages.get(message_id) if isinstance(message_id, str) else None
    if message is not None:
        if message.claimed_by:
            details.append(
                tag(
                    "div",
                    "taken by ",
                    tag("a", message.claimed_by, href=link.instance(message.claimed_by)),
                    class_="line",
                )
            )
            chips.append(_chip("taken", "good"))
        elif message.target_instance_id:
            chips.append(_chip("not taken yet", "warn"))
        details.append(_value_line("Data", _decode(message.data)))
    else:
        details.append(tag("div", "the message is no longer stored (retention)", class_="line"))
    return title, chips, details


def _emitted(
    step: Step, typed: SendEventStep, outbox: dict[str, OutboxRow], now: float
) -> tuple[Child, list[Html], Child]:
    event_id = typed.event_id
    title: list[Child] = [tag("span", "event emitted", class_="kind"), tag("code", step.name)]
    line = tag(
        "div",
        "id ",
        tag("code", event_id),
        " from ",
        tag("code", typed.source),
        [" about ", tag("code", typed.subject)] if typed.subject else None,
        class_="line",
    )
    entry = outbox.get(event_id)
    if entry is None:
        return title, [_chip("outbox row deleted")], line
    tries = f"{entry.attempts} attempt{'s' if entry.attempts != 1 else ''}"
    details: list[Child] = [line]
    if entry.status == "delivered":
        chips = [_chip("delivered", "good"), _chip(tries)]
        details.append(tag("div", "delivered ", when(entry.delivered_at, now), class_="line"))
    elif entry.status == "dead":
        chips = [_chip("dead: gave up", "bad"), _chip(tries)]
    elif entry.status == "discarded":
        chips = [_chip("discarded by an operator", "bad"), _chip(tries)]
    else:
        chips = [_chip("pending", "warn"), _chip(tries)]
        if entry.next_attempt_at is not None:
            details.append(tag("div", "next attempt ", when(entry.next_attempt_at, now), class_="line"))
        else:
            details.append(tag("div", "waits for an earlier event of this instance", class_="line"))
    if entry.last_error:
        details.append(tag("details", tag("summary", "Last error"), tag("pre", entry.last_error)))
    if entry.data is not None:
        details.append(_value_line("Data", _decode(entry.data)))
    return title, chips, details
