"""HTML for the web viewer, built in Python with every value escaped: no template engine, no raw strings.

A page is made of ``tag(...)`` calls. A child that is a plain ``str`` (or any other value) is text and is
escaped; only ``Html`` (what ``tag`` and ``raw`` return) is taken as markup. Attribute values are always
escaped and quoted; attribute names come from the code, never from data. So whatever a workflow stored —
an id, an event type, an input holding ``<script>`` — reaches the browser as text.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TypeAlias

Child: TypeAlias = "Html | str | int | float | Iterable[Child] | None"

_VOID = frozenset({"br", "hr", "img", "input", "link", "meta", "wbr"})
MAX_SHOWN = 64 * 1024
"""The most characters of one value (an input, a result, a payload) a page shows; the rest is cut."""


class Html(str):
    """Markup that is safe as it is: made by ``tag`` from escaped parts, or by ``raw`` from constants."""

    __slots__ = ()


def raw(markup: str) -> Html:
    """Trusted markup written in geste's own code (never data)."""
    return Html(markup)


def escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def render(child: Child) -> str:
    kind = type(child)
    if kind is Html:
        return child  # type: ignore[return-value]
    if kind is str:
        return escape(child)
    if child is None:
        return ""
    if isinstance(child, str):  # Html, or another str subclass: text unless it is Html
        return str(child) if isinstance(child, Html) else escape(child)
    if isinstance(child, int | float):
        return escape(child)
    return "".join([render(item) for item in child])


_ATTRIBUTES: dict[str, str] = {}
"""Keyword to attribute name (``class_`` → ``class``, ``data_x`` → ``data-x``), as met."""


def tag(element: str, /, *children: Child, **attrs: str | int | bool | None) -> Html:
    """``<element attrs>children</element>``. ``class_`` is ``class``, ``data_x`` is ``data-x``; ``True``
    writes a bare attribute, ``None`` and ``False`` leave it out."""
    opening = "<" + element
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        attribute = _ATTRIBUTES.get(key)
        if attribute is None:
            attribute = _ATTRIBUTES[key] = key.rstrip("_").replace("_", "-")
        opening += f" {attribute}" if value is True else f' {attribute}="{escape(value)}"'
    if element in _VOID:
        return Html(opening + ">")
    return Html(f"{opening}>{render(children)}</{element}>")


def join(children: Iterable[Child], separator: Child = ", ") -> Html:
    items = list(children)
    out: list[Child] = []
    for i, item in enumerate(items):
        if i:
            out.append(separator)
        out.append(item)
    return Html(render(out))


# -- values -------------------------------------------------------------------------------------------
def json_text(value: Any) -> str:
    """A value as indented JSON, cut after ``MAX_SHOWN`` characters (saying how much was left out)."""
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return clip(text)


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n… {len(text) - limit:,} more characters not shown"


def short(text: str, limit: int = 80) -> str:
    """One line of at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def code_block(value: Any, *, class_: str = "json") -> Html:
    return tag("pre", json_text(value), class_=class_)


# -- times --------------------------------------------------------------------------------------------
def _moment(ts: float) -> datetime | None:
    try:
        return datetime.fromtimestamp(ts, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _utc_text(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d} UTC"


def utc(ts: float | None) -> str:
    """``2026-11-26 14:03:12.345 UTC``; an empty string for None."""
    if ts is None or not math.isfinite(ts):
        return ""
    moment = _moment(ts)
    return f"{ts!r} (Unix seconds)" if moment is None else _utc_text(moment)


def duration(seconds: float) -> str:
    """``412 ms``, ``3.2 s``, ``5 min 3 s``, ``2 h 5 min``, ``3 d 4 h``."""
    if not math.isfinite(seconds):
        return "∞"
    seconds = abs(seconds)
    if seconds < 0.001:
        return f"{seconds * 1_000_000:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.3g} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def relative(ts: float, now: float) -> str:
    """``3 min ago`` or ``in 5 s``, as seen at ``now``."""
    delta = ts - now
    if abs(delta) < 1:
        return "just now"
    shown = duration(round(delta) if abs(delta) < 60 else delta)  # "7 s ago", not "7.26 s ago"
    return f"in {shown}" if delta > 0 else f"{shown} ago"


def when(ts: float | None, now: float) -> Html:
    """A ``<time>``: relative to ``now``, with the UTC time as its tooltip."""
    if ts is None:
        return raw('<span class="muted">—</span>')
    moment = _moment(ts) if math.isfinite(ts) else None
    if moment is None:
        return tag("time", utc(ts))
    return tag("time", relative(ts, now), datetime=moment.isoformat(), title=_utc_text(moment))
