"""The read-only web viewer (``/ui``): the list of instances, one instance's page, the cron schedules
(``/ui/schedules``), the queues (``/ui/queues``) and the versions (``/ui/versions``), served as HTML.

It reads only (no page changes an instance), through the App's storage, and escapes everything it shows
(``_html``). Every page is sent with a strict Content-Security-Policy: no script at all, its one
stylesheet allowed by hash, no frames, forms posting to this origin only.

Authentication. With no token configured the viewer is open, like the API. With a token, a request to
``/ui`` needs either the API's header (``Authorization: Bearer <token>``) or the viewer's cookie. A
browser has no way to send the header, so ``/ui`` answers it with a sign-in form (status 401); the form
posts the token to ``/ui/login``, which sets the cookie and sends the browser back where it was. The
cookie is not the token: it holds an expiry and an HMAC of it keyed by the token, so it opens the
viewer's pages only (read-only, never the API), for ``SESSION_SECONDS``, and no server-side state is
kept. It is ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no other site's page sends it),
scoped to ``/ui``, and ``Secure`` over HTTPS. Changing the token ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode

from .._models import Status, StepKind
from .._steps import PublishStep, SendEventStep, step_or_none
from .._validation import storable_text
from ..errors import AppNotOpenError, InstanceNotFoundError, StorageError
from ..storage.base import InstanceExtras, InstanceFilter, InstanceSummary, RunRow, Storage, StreamHead
from . import _pages, _timeline
from ._html import Html
from ._routing import HTTPError, Request, Response, Send, bad_request, error_response, local_path

if TYPE_CHECKING:
    from .._app import App

_T = TypeVar("_T")
logger = logging.getLogger("geste.http")

COOKIE = "geste_viewer"
SESSION_SECONDS = 12 * 3600
"""How long a sign-in lasts."""
PAGE_SIZES = (20, 50, 100, 200)
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
COUNT_CAP = 1_000
"""Counts per status stop here (shown as "1,000+"): each costs at most this many index entries, so the
counts cost the same on a million instances as on a thousand (`geste status` counts them all)."""
MAX_WORKFLOW_NAMES = 200
MAX_SCHEDULES = 1000
"""The most schedules the schedules page lists (by name)."""
MAX_STATE_KEYS = 100
"""Keys an instance's page shows at most in its State section (their latest values), by key."""


@dataclass(frozen=True, slots=True)
class PageResponse(Response):
    """An HTML page, with the headers that keep a browser from running or framing anything in it."""

    async def send(self, send: Send) -> None:
        headers = [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-length", str(len(self.body)).encode("ascii")),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            (b"content-security-policy", _pages.CSP.encode("ascii")),
            (b"x-frame-options", b"DENY"),
            # not no-referrer: with it a browser sends the sign-in form with `Origin: null`, which the
            # cross-site check refuses; same-origin still tells other sites nothing
            (b"referrer-policy", b"same-origin"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def page(status: int, markup: Html, headers: Sequence[tuple[str, str]] = ()) -> PageResponse:
    # "replace": a stored string may hold a lone surrogate (JSON allows "\ud800"), which UTF-8 cannot.
    return PageResponse(status, markup.encode("utf-8", "replace"), headers)


class PageError(HTTPError):
    """An error answered with an HTML page to a browser, and with the API's JSON error otherwise."""

    def __init__(self, status: int, type_: str, message: str, markup: Html | None, **kwargs: Any) -> None:
        super().__init__(status, type_, message, **kwargs)
        self.markup = markup

    def response(self) -> Response:
        if self.markup is None:
            return error_response(self.status, self.type, self.message, headers=self.headers)
        return page(self.status, self.markup, self.headers)


def _wants_html(request: Request) -> bool:
    return any(b"text/html" in value for value in request.header_values(b"accept"))


@dataclass(frozen=True, slots=True)
class Link:
    """Where the viewer's links point: its pages under the ASGI ``root_path``."""

    root: str

    def list(self, **query: str) -> str:
        params = {k: v for k, v in query.items() if v}
        return f"{self.root}/ui" + (f"?{urlencode(params)}" if params else "")

    def instance(self, instance_id: str, *, run: int | None = None) -> str:
        """An instance's page: its current run, or (``run``) one it ended with ``continue_as_new``."""
        page = f"{self.root}/ui/instances/{quote(instance_id, safe='')}"
        return page if run is None else f"{page}?run={run}"

    def stream(self, instance_id: str, key: str) -> str:
        """A stream's Server-Sent Events (the API's: a token, if set, as a bearer)."""
        return f"{self.root}/instances/{quote(instance_id, safe='')}/streams/{quote(key, safe='')}"

    def schedules(self) -> str:
        return f"{self.root}/ui/schedules"

    def queues(self) -> str:
        return f"{self.root}/ui/queues"

    def versions(self) -> str:
        return f"{self.root}/ui/versions"

    def login(self) -> str:
        return f"{self.root}/ui/login"

    def logout(self) -> str:
        return f"{self.root}/ui/logout"


STREAMS_SHOWN = 20
"""Streams at most on an instance's page (by key), each with its last ``STREAM_TAIL`` items."""
STREAM_TAIL = 5


async def _stream_tails(storage: Storage, instance_id: str) -> list[tuple[StreamHead, list[tuple[int, Any]]]]:
    """The instance's streams and the last items of each: one read of the heads (by the primary key),
    one range of each stream's primary key."""
    shown = []
    for head in await storage.stream_list(instance_id, limit=STREAMS_SHOWN):
        rows = await storage.stream_read(instance_id, head.key, max(0, head.length - STREAM_TAIL - 1), 10)
        shown.append((head, [(at, _decode_item(item)) for at, item in rows if item is not None]))
    return shown


def _decode_item(item: str) -> Any:
    try:
        return json.loads(item)
    except ValueError:
        return item


class Viewer:
    """The viewer's handlers, for ``GesteASGI`` to route, and its authentication (``admits``)."""

    def __init__(self, app: App, *, token: bytes | None) -> None:
        self.app = app
        self._token = token
        self._clock: Callable[[], float] = app.clock  # "now" on the pages, and the sessions' expiry

    # -- authentication ----------------------------------------------------------------------------
    def admits(self, request: Request, segments: tuple[str, ...]) -> bool:
        """Whether this request is the viewer's to authorize, and may go on: False for paths outside
        ``/ui`` (the API's check applies); True for a viewer page the request may see, and for the
        sign-in (which checks the token it is given). Otherwise a 401: the sign-in form for a browser,
        the API's JSON error for anything else."""
        if segments[:1] != ("ui",):
            return False
        if self._token is None:
            return True
        if segments == ("ui", "login") and request.method == "POST":
            return True
        if self._has_bearer(request) or self._has_session(request):
            return True
        raise self._sign_in_required(request, failed=False)

    def _has_bearer(self, request: Request) -> bool:
        assert self._token is not None
        values = request.header_values(b"authorization")
        scheme, _, credentials = (values[0] if len(values) == 1 else b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._token)

    def _session_value(self, expires: int) -> str:
        assert self._token is not None
        mac = hmac.new(self._token, f"geste-viewer:{expires}".encode("ascii"), hashlib.sha256).hexdigest()
        return f"{expires}.{mac}"

    def _has_session(self, request: Request) -> bool:
        for header in request.header_values(b"cookie"):
            for pair in header.decode("latin-1").split(";"):
                name, _, value = pair.strip().partition("=")
                if name != COOKIE:
                    continue
                expires, _, _ = value.partition(".")
                if not expires.isascii() or not expires.isdigit() or len(expires) > 12:
                    continue
                if int(expires) <= self._clock():
                    continue
                if hmac.compare_digest(value.encode("latin-1"), self._session_value(int(expires)).encode()):
                    return True
        return False

    def _sign_in_required(self, request: Request, *, failed: bool, next_url: str | None = None) -> PageError:
        message = "this endpoint needs the header `Authorization: Bearer <token>` with the server's token"
        markup = None
        if _wants_html(request):
            back = next_url if next_url is not None else _current_url(request)
            markup = _pages.sign_in(_link(request), next_url=back, failed=failed)
        return PageError(
            401, "Unauthorized", message, markup, headers=[("www-authenticate", 'Bearer realm="geste"')]
        )

    def _cookie(self, request: Request, value: str, max_age: int) -> tuple[str, str]:
        secure = "; Secure" if request.scope.get("scheme") == "https" else ""
        path = f"{request.scope.get('root_path', '')}/ui"
        return (
            "set-cookie",
            f"{COOKIE}={value}; Max-Age={max_age}; Path={path}; HttpOnly; SameSite=Strict{secure}",
        )

    # -- sign-in and sign-out ----------------------------------------------------------------------
    async def login(self, request: Request, params: dict[str, str]) -> Response:
        """``POST /ui/login`` with the form field ``token`` (or the API's header): the session cookie,
        and a redirect to ``next`` (a viewer page)."""
        request.query()
        link = _link(request)
        form: dict[str, str] = {}
        content_type = request.content_type()
        body = await request.body()
        if content_type is not None and content_type.essence == "application/x-www-form-urlencoded":
            form = _form(body)
        next_url = _safe_next(form.get("next"), link)
        if self._token is None:
            return _redirect(next_url)
        given = form.get("token", "")
        ok = self._has_bearer(request) or (
            given.isascii() and hmac.compare_digest(given.encode("ascii"), self._token)
        )
        if not ok:
            raise self._sign_in_required(request, failed=bool(given), next_url=next_url)
        expires = int(self._clock()) + SESSION_SECONDS
        return _redirect(next_url, self._cookie(request, self._session_value(expires), SESSION_SECONDS))

    async def logout(self, request: Request, params: dict[str, str]) -> Response:
        """``POST /ui/logout``: the cookie is dropped; back to the list (the sign-in form)."""
        request.query()
        return _redirect(_link(request).list(), self._cookie(request, "", 0))

    # -- pages -------------------------------------------------------------------------------------
    async def instances(self, request: Request, params: dict[str, str]) -> Response:
        """``GET /ui``: instances, newest first, filtered, a keyset page at a time."""
        started = time.perf_counter()
        link = _link(request)
        try:
            view = _list_query(request.query("workflow", "status", "from", "to", "limit", "before", "after"))
        except HTTPError as exc:
            return self._error_page(request, exc.status, exc.message)
        now = self._clock()
        try:
            rows, has_newer, has_older = await self._page(view)
            counts = await self.app.storage.count_instances(view.filter_without_status(), cap=COUNT_CAP + 1)
            names = await self.app.storage.workflow_names(limit=MAX_WORKFLOW_NAMES)
        except (StorageError, AppNotOpenError) as exc:
            return self._unavailable(request, exc)
        markup = _pages.instance_list(
            link,
            view=view,
            rows=rows,
            counts=counts,
            count_cap=COUNT_CAP,
            workflow_names=names,
            has_newer=has_newer,
            has_older=has_older,
            now=now,
            page_sizes=PAGE_SIZES,
            signed_in=self._signed_in_by_cookie(request),
            elapsed=time.perf_counter() - started,
        )
        return page(200, markup)

    async def schedules(self, request: Request, params: dict[str, str]) -> Response:
        """``GET /ui/schedules``: the cron schedules by name, each with its next tick and a link to the
        instance its last tick started."""
        return await self._listing(
            request,
            lambda: self.app.storage.list_schedules(limit=MAX_SCHEDULES),
            lambda link, rows, **common: _pages.schedule_list(link, rows=rows, **common),
        )

    async def queues(self, request: Request, params: dict[str, str]) -> Response:
        """``GET /ui/queues``: the queues by name, each with its queued and admitted instances, its limits,
        its rate window and since when its oldest queued instance waits (``app.list_queues``: counts
        stopped at ``QUEUE_COUNT_CAP``, as the list's are at ``COUNT_CAP``)."""
        return await self._listing(
            request,
            self.app.list_queues,
            lambda link, queues, **common: _pages.queue_list(link, queues=queues, **common),
        )

    async def versions(self, request: Request, params: dict[str, str]) -> Response:
        """``GET /ui/versions``: the live workers by version, and the runnable instances pinned to a
        version no live worker of it runs (``app.status()``: the cost of ``geste status``)."""
        return await self._listing(
            request,
            self.app.status,
            lambda link, status, **common: _pages.version_list(link, status=status, **common),
        )

    async def _listing(
        self, request: Request, read: Callable[[], Awaitable[_T]], render: Callable[..., Html]
    ) -> Response:
        """A page of one read and no query parameter (schedules, queues, versions): a bad query is a 400
        page, a database that does not answer the "unavailable" page."""
        started = time.perf_counter()
        try:
            request.query()
        except HTTPError as exc:
            return self._error_page(request, exc.status, exc.message)
        try:
            found = await read()
        except (StorageError, AppNotOpenError) as exc:
            return self._unavailable(request, exc)
        markup = render(
            _link(request),
            found,
            now=self._clock(),
            signed_in=self._signed_in_by_cookie(request),
            elapsed=time.perf_counter() - started,
        )
        return page(200, markup)

    async def _page(self, view: ListQuery) -> tuple[list[InstanceSummary], bool, bool]:
        """The rows of the page and whether there are newer and older ones."""
        storage = self.app.storage
        which = view.filter
        if view.workflow is not None and not storable_text(view.workflow):
            return [], False, False
        if view.after is not None:
            rows = await storage.page_instances(which, after=view.after, limit=view.limit + 1)
            if len(rows) > view.limit:
                return rows[1:], True, True
            # the newest page, however short this one is: "newer" from the second page lands on the first
        elif view.before is not None:
            rows = await storage.page_instances(which, before=view.before, limit=view.limit + 1)
            return rows[: view.limit], True, len(rows) > view.limit
        rows = await storage.page_instances(which, limit=view.limit + 1)
        return rows[: view.limit], False, len(rows) > view.limit

    async def instance(self, request: Request, params: dict[str, str]) -> Response:
        """``GET /ui/instances/{id}``: the instance, what it waits for, its history as a timeline;
        ``?run=n``: its run ``n``, one it ended with ``continue_as_new`` (kept)."""
        started = time.perf_counter()
        try:
            asked = _run_query(request.query("run"))
        except HTTPError as exc:
            return self._error_page(request, exc.status, exc.message)
        instance_id = params["id"]
        link = _link(request)
        storage = self.app.storage
        runs: list[RunRow] = []
        try:
            if not storable_text(instance_id):
                raise InstanceNotFoundError(instance_id)
            row = await storage.get_instance(instance_id)
            if row is None:
                raise InstanceNotFoundError(instance_id)
            if row.run > 1:
                runs = await storage.list_runs(instance_id)
            shown = next((run for run in runs if run.run == asked), None)
            if asked is not None and asked != row.run and shown is None:
                return self._error_page(
                    request, 404, f"Instance {instance_id!r} has no kept run {asked}.", title="Not found"
                )
            if shown is not None:
                history = await storage.get_run_history(instance_id, shown.run)
            else:
                history = await storage.get_history(instance_id)
            event_ids, message_ids = _emitted_ids(history)
            extras = await storage.instance_extras(instance_id, event_ids=event_ids, message_ids=message_ids)
            children = [] if shown is not None else await storage.list_children(instance_id, limit=100)
            state = [] if shown is not None else await storage.list_state(instance_id, limit=MAX_STATE_KEYS)
            streams = [] if shown is not None else await _stream_tails(storage, instance_id)
        except InstanceNotFoundError:
            return self._error_page(request, 404, f"There is no instance {instance_id!r}.", title="Not found")
        except (StorageError, AppNotOpenError) as exc:
            return self._unavailable(request, exc)
        if shown is not None:  # what the instance waits for now is its current run's: not this one's
            kept = InstanceExtras((), None, (), extras.outbox, extras.messages)
            markup = _timeline.run_page(
                link,
                row=row,
                run=shown,
                runs=runs,
                history=history,
                extras=kept,
                now=self._clock(),
                signed_in=self._signed_in_by_cookie(request),
                elapsed=time.perf_counter() - started,
            )
            return page(200, markup)
        markup = _timeline.instance_page(
            link,
            row=row,
            history=history,
            extras=extras,
            now=self._clock(),
            signed_in=self._signed_in_by_cookie(request),
            elapsed=time.perf_counter() - started,
            runs=runs,
            children=children,
            state=state,
            streams=streams,
        )
        return page(200, markup)

    # -- helpers -----------------------------------------------------------------------------------
    def _signed_in_by_cookie(self, request: Request) -> bool:
        return self._token is not None and self._has_session(request)

    def _error_page(self, request: Request, status: int, message: str, *, title: str = "") -> Response:
        if not _wants_html(request):
            kind = {400: "BadRequest", 404: "InstanceNotFoundError", 503: "Unavailable"}.get(status, "Error")
            return error_response(status, kind, message)
        markup = _pages.error_page(
            _link(request),
            status=status,
            title=title or {400: "Bad request", 503: "Unavailable"}.get(status, "Error"),
            message=message,
            signed_in=self._signed_in_by_cookie(request),
        )
        return page(status, markup)

    def _unavailable(self, request: Request, exc: Exception) -> Response:
        logger.warning("viewer: storage error answered with 503: %s", exc)
        return self._error_page(request, 503, "The database is not available; try again later.")


# -- the list's query -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ListQuery:
    """The list page's filters and position, as read from its query string (and written back into its
    links and its form)."""

    workflow: str | None
    status: Status | None
    created_from: float | None
    created_to: float | None
    limit: int
    before: tuple[float, str] | None
    after: tuple[float, str] | None
    from_text: str
    to_text: str

    @property
    def filter(self) -> InstanceFilter:
        return InstanceFilter(
            workflow_name=self.workflow,
            status=self.status,
            created_from=self.created_from,
            created_to=self.created_to,
        )

    def filter_without_status(self) -> InstanceFilter:
        return InstanceFilter(
            workflow_name=self.workflow, created_from=self.created_from, created_to=self.created_to
        )

    def params(self, **changes: str) -> dict[str, str]:
        """The query string of this list with ``changes`` (paging keys are dropped unless given)."""
        params = {
            "workflow": self.workflow or "",
            "status": self.status.value if self.status else "",
            "from": self.from_text,
            "to": self.to_text,
            "limit": "" if self.limit == DEFAULT_PAGE_SIZE else str(self.limit),
        }
        params.update(changes)
        return params


def _list_query(query: dict[str, str]) -> ListQuery:
    workflow = query.get("workflow", "").strip() or None
    status_text = query.get("status", "")
    try:
        status = Status(status_text) if status_text else None
    except ValueError:
        known = ", ".join(s.value for s in Status)
        raise bad_request(f"unknown status {status_text!r}; one of {known}") from None
    created_from, from_text = _moment(query.get("from", ""), "from")
    created_to, to_text = _moment(query.get("to", ""), "to")
    limit_text = query.get("limit", "")
    if not limit_text:
        limit = DEFAULT_PAGE_SIZE
    elif limit_text.isascii() and limit_text.isdigit() and 1 <= int(limit_text[:4]) <= MAX_PAGE_SIZE:
        limit = int(limit_text)
    else:
        raise bad_request(f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}, not {limit_text!r}")
    before = _key(query.get("before", ""), "before")
    after = _key(query.get("after", ""), "after")
    if before is not None and after is not None:
        raise bad_request("a page is either before a key or after one, not both")
    return ListQuery(workflow, status, created_from, created_to, limit, before, after, from_text, to_text)


def _run_query(query: dict[str, str]) -> int | None:
    """The run an instance's page shows (``?run=n``); None: its current one."""
    text = query.get("run", "")
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 9 or int(text) < 1:
        raise bad_request(f"run must be a run number (1, 2, ...), not {text[:100]!r}")
    return int(text)


def _moment(text: str, name: str) -> tuple[float | None, str]:
    """A date and time (``YYYY-MM-DDTHH:MM[:SS]``, UTC unless it says otherwise) as Unix seconds, and its
    text as a ``datetime-local`` field shows it."""
    text = text.strip()
    if not text:
        return None, ""
    try:
        moment = datetime.fromisoformat(text.replace(" ", "T", 1))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)  # OverflowError past year 1 or 9999 once in UTC
        stamp = moment.timestamp()
    except (ValueError, OverflowError):
        raise bad_request(
            f"{name} must be a date and time like 2026-05-01T12:00 (UTC), not {text!r}"
        ) from None
    shown = moment.strftime("%Y-%m-%dT%H:%M:%S" if moment.second or moment.microsecond else "%Y-%m-%dT%H:%M")
    return stamp, shown


def key_text(row: InstanceSummary) -> str:
    """A page key in a link: ``<created_at>:<instance_id>`` (a float's repr has no colon)."""
    return f"{row.created_at!r}:{row.instance_id}"


def _key(text: str, name: str) -> tuple[float, str] | None:
    if not text:
        return None
    at, sep, instance_id = text.partition(":")
    try:
        created_at = float(at)
    except ValueError:
        created_at = math.nan
    if not sep or not instance_id or not math.isfinite(created_at):
        raise bad_request(f"{name} must be a page key from a link of this list, not {text[:100]!r}")
    return created_at, instance_id


# -- small parts ----------------------------------------------------------------------------------------
def _link(request: Request) -> Link:
    return Link(str(request.scope.get("root_path", "")))


def _current_url(request: Request) -> str:
    """The page asked for, as the browser has it (its prefix once, its escapes kept: an id's ``%2F``)."""
    path = f"{request.scope.get('root_path', '')}{local_path(request.scope)}"
    query = request.scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{query}" if query else path


def _form(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=10
        )
    except (UnicodeDecodeError, ValueError):
        raise bad_request("the form is not valid URL-encoded UTF-8") from None
    return dict(pairs)


def _safe_next(value: str | None, link: Link) -> str:
    """Where to go after signing in: a viewer page of this server, never anywhere else."""
    home = link.list()
    if not value or any(c in value for c in "\\\r\n\t\x00") or not value.isprintable():
        return home
    if any(part in (".", "..") for part in unquote(value.split("?", 1)[0]).split("/")):
        return home  # "/ui/../instances": a browser resolves the dots
    viewer = f"{link.root}/ui"
    if value == viewer or value.startswith((f"{viewer}/", f"{viewer}?")):
        return quote(value, safe="/?=&%:+,;@!$'()*-._~")
    return home


def _redirect(location: str, *headers: tuple[str, str]) -> Response:
    return PageResponse(303, b"", [("location", location), *headers])


def _emitted_ids(history: Sequence[Any]) -> tuple[list[str], list[str]]:
    """The ids of the events (``send_event``) and messages (``publish``, ``send_to``) in a history."""
    events: list[str] = []
    messages: list[str] = []
    for row in history:
        if row.kind not in (StepKind.SEND_EVENT, StepKind.PUBLISH, StepKind.SEND_TO):
            continue
        try:
            step = step_or_none(row.kind, json.loads(row.payload or "null"), is_error=bool(row.is_error))
        except (ValueError, RecursionError):
            continue
        value = step.message_id if isinstance(step, PublishStep) else None  # or a send_to
        if isinstance(step, SendEventStep):
            value = step.event_id
        if isinstance(value, str) and storable_text(value):
            (events if row.kind == StepKind.SEND_EVENT else messages).append(value)
    return events, messages
