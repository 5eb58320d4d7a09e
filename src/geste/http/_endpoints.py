"""The HTTP endpoints of a geste App, as one ASGI application: CloudEvents in, and the instance API.

Every endpoint goes through the App's public calls (``send_event``, ``start_workflow``, ``get_instance``,
``list_instances``, ``history``, ``runs``, ``cancel``, ``retry``, ``resume``, a handle's ``result``, the
schedule calls, ``list_queues``), which take values as parameters: no request text ever becomes SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from .._access import bearer_matches, is_address_or_localhost, resolve_token
from .._models import InstanceInfo, RunInfo, StateValue, Status, StreamEntry
from .._status import schedule_dict
from .._validation import check_stream_key
from ..errors import (
    AppNotOpenError,
    ConfigurationError,
    GesteError,
    HistoryCorruptedError,
    InstanceAlreadyExistsError,
    InstanceNotFoundError,
    InstanceStateError,
    PayloadTooLargeError,
    ResultTimeout,
    ScheduleNotFoundError,
    SerializationError,
    StateEndedError,
    StateTimeout,
    StorageError,
    UnknownWorkflowError,
    WorkflowCancelled,
    WorkflowFailed,
)
from ._cloudevents import check_binary_content_type, is_structured, parse_binary, parse_structured
from ._routing import (
    ClientDisconnected,
    HTTPError,
    Receive,
    Request,
    Response,
    Router,
    Scope,
    Send,
    bad_request,
    error_response,
    is_utf8,
    json_response,
    load_json,
    path_segments,
    unsupported_media_type,
)
from ._viewer import Viewer

if TYPE_CHECKING:
    from .._app import App
    from .._models import HistoryEntry

logger = logging.getLogger("geste.http")

BODY_MARGIN = 64 * 1024
"""Room above the App's ``max_payload_bytes`` for a structured event's attributes and JSON quoting."""
MAX_RESULT_WAIT = 30.0
"""The longest ``GET /instances/{id}/result?wait=`` holds a request open, in seconds."""

_STATUS_OF_ERROR: tuple[tuple[type[GesteError], int], ...] = (
    (InstanceNotFoundError, 404),
    (UnknownWorkflowError, 404),
    (ScheduleNotFoundError, 404),
    (PayloadTooLargeError, 413),
    (InstanceAlreadyExistsError, 409),
    (InstanceStateError, 409),  # a retry of an instance that did not fail, a resume a live worker holds
    (StateEndedError, 409),  # a wait for a value of an instance that ended: none will come
    (WorkflowFailed, 409),
    (WorkflowCancelled, 409),
    (AppNotOpenError, 503),
    (StorageError, 503),
    (HistoryCorruptedError, 500),  # the stored data is damaged: the server's problem, not the request's
)


class GesteASGI:
    """An App served over HTTP (``app.asgi()``); see docs/http.md, "HTTP: CloudEvents and the API".

    ``token`` (default: ``$GESTE_HTTP_TOKEN``) makes every endpoint but ``GET /health`` require
    ``Authorization: Bearer <token>``. Request bodies over ``max_body_bytes`` (default: the App's
    ``max_payload_bytes`` plus 64 KiB) are refused with 413. Under an ASGI server with lifespan events,
    the App is opened at startup unless it is open already, and closed at shutdown if it was opened then.
    """

    def __init__(self, app: App, *, token: str | None = None, max_body_bytes: int | None = None) -> None:
        token_bytes = resolve_token(token)
        if max_body_bytes is None:
            max_body_bytes = app.max_payload_bytes + BODY_MARGIN
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ConfigurationError("max_body_bytes must be a positive integer")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._token = token_bytes
        self._opened_app = False
        router = Router()
        router.add("GET", "/health", self._health)
        router.add("POST", "/events", self._event)
        router.add("POST", "/workflows/{name}", self._start)
        router.add("GET", "/instances", self._list)
        router.add("GET", "/instances/{id}", self._instance)
        router.add("GET", "/instances/{id}/history", self._history)
        router.add("GET", "/instances/{id}/runs", self._runs)
        router.add("GET", "/instances/{id}/result", self._result)
        router.add("GET", "/instances/{id}/state", self._states)
        router.add("GET", "/instances/{id}/state/{key}", self._state)
        router.add("GET", "/instances/{id}/streams/{key}", self._stream)
        router.add("POST", "/instances/{id}/cancel", self._cancel)
        router.add("POST", "/instances/{id}/retry", self._retry)
        router.add("POST", "/instances/{id}/resume", self._resume)
        router.add("GET", "/metrics", self._metrics)
        router.add("POST", "/schedules/{name}", self._create_schedule)  # (first: a walk of the table
        router.add("GET", "/schedules", self._schedules)  # in order creates before it reads or deletes)
        router.add("GET", "/schedules/{name}", self._schedule)
        router.add("POST", "/schedules/{name}/pause", self._pause_schedule)
        router.add("POST", "/schedules/{name}/resume", self._resume_schedule)
        router.add("DELETE", "/schedules/{name}", self._delete_schedule)
        router.add("GET", "/queues", self._queues)
        self._viewer = Viewer(app, token=self._token)  # the read-only web viewer (HTML), /ui
        router.add("GET", "/ui", self._viewer.instances)
        router.add("GET", "/ui/instances/{id}", self._viewer.instance)
        router.add("GET", "/ui/schedules", self._viewer.schedules)
        router.add("GET", "/ui/queues", self._viewer.queues)
        router.add("GET", "/ui/versions", self._viewer.versions)
        router.add("POST", "/ui/login", self._viewer.login)
        router.add("POST", "/ui/logout", self._viewer.logout)
        self._router = router

    @property
    def token_required(self) -> bool:
        return self._token is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":  # refused: closed before being accepted
            await send({"type": "websocket.close", "code": 1003})
            return
        if scope["type"] != "http":
            return
        request = Request(scope, receive, max_body_bytes=self.max_body_bytes)
        try:
            response = await self._dispatch(request)
        except ClientDisconnected:
            return
        except HTTPError as exc:
            response = exc.response()
        except GesteError as exc:
            response = _error_response(exc)
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            response = error_response(500, "InternalError", "the server failed to handle the request")
        if request.body_left_unread() and scope.get("http_version", "1.1") in ("1.0", "1.1"):
            # Else the server reads (and drops) the rest of the body to keep the connection, all of it:
            # uvicorn went on reading a declared terabyte after the 413, as long as the client sent it.
            # (HTTP/2 has no such header: a server resets the stream instead.)
            response = dataclasses.replace(response, headers=[*response.headers, ("connection", "close")])
        await response.send(send)

    async def _dispatch(self, request: Request) -> Response:
        segments = path_segments(request.scope)
        _refuse_cross_site(request, token_set=self._token is not None)
        if segments != ("health",) and not self._viewer.admits(request, segments):
            self._authorize(request)
        handler, params = self._router.resolve(request.method, segments)
        return await handler(request, params)

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        values = request.header_values(b"authorization")
        if not bearer_matches(values[0].strip() if len(values) == 1 else b"", self._token):
            raise HTTPError(
                401,
                "Unauthorized",
                "this endpoint needs the header `Authorization: Bearer <token>` with the server's token",
                headers=[("www-authenticate", 'Bearer realm="geste"')],
            )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if not self.app.is_open:
                        await self.app.open()
                        self._opened_app = True
                except Exception as exc:
                    logger.exception("cannot open the App")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    if self._opened_app:
                        self._opened_app = False
                        await self.app.close()
                except Exception as exc:
                    logger.exception("cannot close the App")
                    await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- endpoints ---------------------------------------------------------------------------------
    async def _health(self, request: Request, params: dict[str, str]) -> Response:
        return json_response(200, {"status": "ok"})

    async def _event(self, request: Request, params: dict[str, str]) -> Response:
        content_type = request.content_type()
        has_ce_headers = any(name.startswith(b"ce-") for name, _ in request.raw_headers)
        structured = is_structured(content_type, has_ce_headers)
        if not structured:
            check_binary_content_type(content_type)
        body = await request.body()
        event = (
            parse_structured(body) if structured else parse_binary(request.raw_headers, content_type, body)
        )
        sent = await self.app.client.send_event(
            event.type,
            event.data,
            source=event.source,
            event_id=event.id,
            instance_id=event.instance_id,
            extensions=event.attributes,
        )
        return json_response(202, {"event_id": sent.event_id, "duplicate": not sent.stored})

    async def _start(self, request: Request, params: dict[str, str]) -> Response:
        body = await self._json_body(request)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise bad_request('the body must be a JSON object: {"args": [...], "kwargs": {...}}')
        unknown = sorted(set(body) - {"args", "kwargs", "instance_id", "timeout", "deadline"})
        if unknown:
            raise bad_request(
                f"unknown field(s) {', '.join(unknown)}: "
                "expected args, kwargs, instance_id, timeout, deadline"
            )
        args = body.get("args", [])
        kwargs = body.get("kwargs", {})
        instance_id = body.get("instance_id")
        if not isinstance(args, list):
            raise bad_request("args must be a JSON array")
        if not isinstance(kwargs, dict):
            raise bad_request("kwargs must be a JSON object")
        if "instance_id" in kwargs:
            raise bad_request("kwargs cannot hold instance_id: give that argument in args")
        if instance_id is not None and not isinstance(instance_id, str):
            raise bad_request("instance_id must be a string")
        if "timeout" in kwargs or "deadline" in kwargs:
            raise bad_request("kwargs cannot hold timeout or deadline: give those as fields of the body")
        timeout = body.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or isinstance(timeout, bool)):
            raise bad_request("timeout must be a number of seconds")
        deadline = _deadline(body.get("deadline"))
        handle = await self.app.start_workflow(
            params["name"], *args, instance_id=instance_id, timeout=timeout, deadline=deadline, **kwargs
        )
        return json_response(
            201 if handle.created else 200,
            {"instance_id": handle.instance_id, "created": handle.created},
            headers=[("location", f"{request.mount}/instances/{quote(handle.instance_id, safe='')}")],
        )

    async def _list(self, request: Request, params: dict[str, str]) -> Response:
        query = request.query("workflow", "status", "limit", "offset")
        infos = await self.app.list_instances(
            workflow=query.get("workflow"),
            status=query.get("status"),
            limit=_integer(query, "limit", 100),
            offset=_integer(query, "offset", 0),
        )
        return json_response(200, {"instances": [_instance(info) for info in infos]})

    async def _instance(self, request: Request, params: dict[str, str]) -> Response:
        request.query()
        shown = _instance(await self.app.get_instance(params["id"]))
        shown["children"] = [  # (its parent is parent_id) one range of geste_instances_by_parent
            {"instance_id": c.instance_id, "workflow_name": c.workflow_name, "status": c.status.value}
            for c in await self.app.children(params["id"])
        ]
        return json_response(200, shown)

    async def _history(self, request: Request, params: dict[str, str]) -> Response:
        """The current run's steps; ``?run=n``: those of its run ``n``, kept by ``continue_as_new``."""
        query = request.query("run")
        run = None if "run" not in query else _run_number(query["run"])
        entries = await self.app.history(params["id"], run=run)
        body: dict[str, Any] = {"instance_id": params["id"], "history": [_entry(e) for e in entries]}
        if run is not None:
            body["run"] = run
        return json_response(200, body)

    async def _runs(self, request: Request, params: dict[str, str]) -> Response:
        """The runs the instance ended with ``continue_as_new``, oldest first, and its current run."""
        request.query()
        info = await self.app.get_instance(params["id"])
        runs = await self.app.runs(info.instance_id)
        return json_response(
            200, {"instance_id": info.instance_id, "run": info.run, "runs": [_run(r) for r in runs]}
        )

    async def _result(self, request: Request, params: dict[str, str]) -> Response:
        wait = _wait(request.query("wait").get("wait"))
        info = await self.app.get_instance(params["id"])
        if not info.status.is_finished and wait > 0:
            # The outcome is read back below, as stored, whichever way it ended.
            with contextlib.suppress(ResultTimeout, WorkflowFailed, WorkflowCancelled, SerializationError):
                await self.app.get_handle(info.instance_id).result(timeout=wait)
            info = await self.app.get_instance(info.instance_id)
        body: dict[str, Any] = {"instance_id": info.instance_id, "status": info.status.value}
        if info.status == Status.COMPLETED:
            return json_response(200, {**body, "result": info.result})
        if info.status.is_finished:
            return json_response(409, {**body, "error": _outcome_error(info)})
        return json_response(202, body)

    async def _states(self, request: Request, params: dict[str, str]) -> Response:
        """The latest value of each key the instance published (``ctx.set_state``), by key."""
        request.query()
        values = await self.app.list_state(params["id"])
        return json_response(200, {"instance_id": params["id"], "state": [_state_value(v) for v in values]})

    async def _state(self, request: Request, params: dict[str, str]) -> Response:
        """A value the instance published under ``key``: the latest, or ``?version=n``; with ``?after=n``
        and/or ``?wait=s`` (at most 30 s), the first value whose version is past ``after`` (default 0),
        waited for: 200 with it, 202 when none came within the wait (ask again), 409 when the instance
        ended without one. A plain read of a key never set is a 404."""
        query = request.query("version", "after", "wait")
        instance_id, key = params["id"], params["key"]
        if "version" in query:
            if "after" in query or "wait" in query:
                raise bad_request("version cannot be combined with after or wait")
            version = _whole(query["version"], "version", least=1)
            found = await self.app.get_state(instance_id, key, version=version)
        elif "after" in query or "wait" in query:
            after = _whole(query.get("after", "0"), "after", least=0)
            wait = _wait(query.get("wait"))
            try:
                found = await self.app.wait_state(instance_id, key, after=after, timeout=wait)
            except StateTimeout:
                return json_response(202, {"instance_id": instance_id, "key": key, "after": after})
        else:
            found = await self.app.get_state(instance_id, key)
        if found is None:
            return error_response(
                404, "StateNotFound", f"instance {instance_id} has no such value of {key!r}"
            )
        return json_response(200, {"instance_id": instance_id, **_state_value(found)})

    async def _stream(self, request: Request, params: dict[str, str]) -> Response:
        """A durable stream as Server-Sent Events (docs/streams.md): one ``item`` event per item, its
        position as the event's id, from ``?start=n`` or after the ``Last-Event-ID`` a reconnecting
        browser sends; an ``end`` event once the stream is closed or the instance ended; a comment every
        ``SSE_KEEPALIVE`` seconds while nothing comes. A missing instance is a 404 before the stream."""
        start = _integer(request.query("start"), "start", 0)
        last = request.header("last-event-id")
        if last is not None:
            if not last.isascii() or not last.isdigit() or len(last) > 18:
                raise bad_request(f"Last-Event-ID must be a stream position, not {last!r:.40}")
            start = int(last) + 1
        key = check_stream_key(params["key"])
        await self.app.get_instance(params["id"])  # a 404 now, not an error event later
        entries = self.app.get_handle(params["id"]).stream_entries(key, start)

        async def stream(send: Send) -> None:
            await _send_events(entries, send, request.disconnected)

        return Response(
            200, b"", [("x-accel-buffering", "no")], content_type="text/event-stream", stream=stream
        )

    async def _cancel(self, request: Request, params: dict[str, str]) -> Response:
        request.query()
        info = await self.app.cancel(params["id"])
        return json_response(
            202,
            {
                "instance_id": info.instance_id,
                "status": info.status.value,
                "cancel_requested": info.cancel_requested,
            },
        )

    async def _metrics(self, request: Request, params: dict[str, str]) -> Response:
        """Prometheus text exposition of ``app.metrics`` (the queue gauges cost one query); a query
        string is ignored, as scrapers may add one."""
        text = await self.app.metrics.exposition()
        return Response(200, text.encode("utf-8"), content_type=self.app.metrics.CONTENT_TYPE)

    async def _retry(self, request: Request, params: dict[str, str]) -> Response:
        request.query()
        record = await self.app.retry(params["id"])
        return json_response(
            202,
            {
                "instance_id": record.instance_id,
                "retry": record.retry,
                "from_seq": record.from_seq,
                "retried_at": record.retried_at,
                "error": _public_error(record.error),
                "removed": [_entry(entry) for entry in record.removed],
            },
        )

    async def _resume(self, request: Request, params: dict[str, str]) -> Response:
        force = request.query("force").get("force", "false").lower()
        if force not in ("true", "false", "1", "0"):
            raise bad_request(f"force must be true or false, not {force!r}")
        result = await self.app.resume(params["id"], force=force in ("true", "1"))
        return json_response(
            202,
            {
                "instance_id": result.instance_id,
                "status": result.status.value,
                "was_due_at": result.was_due_at,
                "lease_broken_from": result.lease_broken_from,
                "already_runnable": result.already_runnable,
            },
        )

    # -- queues --------------------------------------------------------------------------------------
    async def _queues(self, request: Request, params: dict[str, str]) -> Response:
        """The queues by name (``app.list_queues``): limits, queued, admitted, rate window, oldest age."""
        request.query()
        return json_response(200, {"queues": [queue.as_dict() for queue in await self.app.list_queues()]})

    # -- schedules -----------------------------------------------------------------------------------
    async def _schedules(self, request: Request, params: dict[str, str]) -> Response:
        request.query()
        return json_response(200, {"schedules": [schedule_dict(s) for s in await self.app.list_schedules()]})

    async def _schedule(self, request: Request, params: dict[str, str]) -> Response:
        request.query()
        return json_response(200, schedule_dict(await self.app.get_schedule(params["name"])))

    async def _create_schedule(self, request: Request, params: dict[str, str]) -> Response:
        """Create the schedule, or update the one of that name (201, or 200 for an update)."""
        request.query()
        body = await self._json_body(request)
        if not isinstance(body, dict):
            raise bad_request(
                'the body must be a JSON object: {"workflow": ..., "cron": ..., "timezone": ..., '
                '"missed": ..., "overlap": ..., "queue": ..., "priority": ...}'
            )
        unknown = sorted(set(body) - set(SCHEDULE_FIELDS))
        if unknown:
            raise bad_request(f"unknown field(s) {', '.join(unknown)}: expected {', '.join(SCHEDULE_FIELDS)}")
        for name in SCHEDULE_FIELDS:
            if name in ("workflow", "cron") and name not in body:
                raise bad_request(f"{name} is required")
            if name == "priority":
                if name in body and (isinstance(body[name], bool) or not isinstance(body[name], int)):
                    raise bad_request("priority must be an integer")
            elif (
                name in body
                and not isinstance(body[name], str)
                and not (name == "queue" and body[name] is None)
            ):
                raise bad_request(f"{name} must be a string" + (" or null" if name == "queue" else ""))
        try:
            existed = bool(await self.app.get_schedule(params["name"]))
        except ScheduleNotFoundError:
            existed = False
        info = await self.app.create_schedule(
            params["name"],
            body["workflow"],
            body["cron"],
            timezone=body.get("timezone", "UTC"),
            missed=body.get("missed", "latest"),
            overlap=body.get("overlap", "skip"),
            queue=body.get("queue"),
            priority=body.get("priority", 0),
        )
        return json_response(
            200 if existed else 201,
            schedule_dict(info),
            headers=[("location", f"{request.mount}/schedules/{quote(info.name, safe='')}")],
        )

    async def _pause_schedule(self, request: Request, params: dict[str, str]) -> Response:
        request.query()
        await self.app.pause_schedule(params["name"])
        return json_response(200, schedule_dict(await self.app.get_schedule(params["name"])))

    async def _resume_schedule(self, request: Request, params: dict[str, str]) -> Response:
        request.query()
        await self.app.resume_schedule(params["name"])
        return json_response(200, schedule_dict(await self.app.get_schedule(params["name"])))

    async def _delete_schedule(self, request: Request, params: dict[str, str]) -> Response:
        request.query()
        await self.app.delete_schedule(params["name"])
        return json_response(200, {"name": params["name"], "deleted": True})

    async def _json_body(self, request: Request) -> Any:
        """The request's JSON body, None when it has none; a 415 unless it says it is JSON."""
        content_type = request.content_type()
        body = await request.body()
        if not body:
            return None
        if content_type is None or not content_type.is_json or not is_utf8(content_type.charset):
            raise unsupported_media_type("the body must be JSON, sent with Content-Type: application/json")
        return load_json(body, "the body")


SCHEDULE_FIELDS = ("workflow", "cron", "timezone", "missed", "overlap", "queue", "priority")
"""The fields of ``POST /schedules/{name}``'s body (``workflow`` and ``cron`` required)."""


def _refuse_cross_site(request: Request, *, token_set: bool) -> None:
    """Refuse what a web page in a browser could send here behind the user's back.

    A cross-site request carries an ``Origin`` (or ``Sec-Fetch-Site: cross-site``) that does not match
    the ``Host``: refused, so a page cannot POST a cancel to a local server. Without a token, the
    ``Host`` must also be an IP address or ``localhost``: a DNS name pointed at 127.0.0.1 (DNS
    rebinding) would otherwise make a hostile page same-origin.
    """
    host = (request.header("host") or "").strip().lower()
    origin = request.header("origin")
    if request.header("sec-fetch-site") == "cross-site" or (
        origin is not None and origin.strip().lower() != "null" and _origin_netloc(origin) != host
    ):
        raise HTTPError(403, "Forbidden", "cross-site requests are refused")
    if origin is not None and origin.strip().lower() == "null":
        raise HTTPError(403, "Forbidden", "requests from an opaque origin are refused")
    if not token_set and host and not is_address_or_localhost(host):
        raise HTTPError(
            403,
            "Forbidden",
            f"Host {host!r} refused: without a token only IP addresses and localhost are served",
        )


def _origin_netloc(origin: str) -> str | None:
    """An ``Origin``'s host and port; None for one ``urlsplit`` cannot parse (``http://[::1``), which
    matches no ``Host``: refused as cross-site rather than a ValueError answered with 500."""
    try:
        return urlsplit(origin.strip().lower()).netloc
    except ValueError:
        return None


def _deadline(value: object) -> datetime | None:
    """A start's ``deadline`` field: an ISO 8601 date and time with its UTC offset (``start_workflow``
    refuses one without)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request("deadline must be an ISO 8601 date and time with its offset, as a string")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise bad_request(f"deadline {value[:80]!r} is not an ISO 8601 date and time") from None


SSE_KEEPALIVE = 15.0
"""Seconds without an item after which a Server-Sent Events stream sends a comment (proxies close idle
connections)."""


async def _send_events(
    entries: AsyncIterator[StreamEntry], send: Send, disconnected: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Send ``entries`` as Server-Sent Events until the stream ends or the client goes away. The reader
    runs in a task of its own feeding a queue: the keepalive never interrupts a read."""
    queue: asyncio.Queue[StreamEntry | BaseException | None] = asyncio.Queue(maxsize=100)

    async def read() -> None:
        try:
            async for entry in entries:
                await queue.put(entry)
            await queue.put(None)
        except Exception as exc:
            await queue.put(exc)

    async def pump() -> None:
        while True:
            try:
                async with asyncio.timeout(SSE_KEEPALIVE):
                    got = await queue.get()
            except TimeoutError:
                await send({"type": "http.response.body", "body": b": keepalive\n\n", "more_body": True})
                continue
            if isinstance(got, StreamEntry):
                data = json.dumps(got.item, separators=(",", ":"))
                chunk = f"id: {got.position}\nevent: item\ndata: {data}\n\n"
            elif got is None:
                chunk = "event: end\ndata: {}\n\n"
            else:
                logger.warning("a stream read over HTTP failed: %s", got)
                error = {"type": type(got).__name__, "message": "the stream could not be read"}
                chunk = f"event: error\ndata: {json.dumps(error)}\n\n"
            await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            if not isinstance(got, StreamEntry):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return

    tasks = [asyncio.create_task(read()), asyncio.create_task(pump()), asyncio.create_task(disconnected())]
    try:
        await asyncio.wait(tasks[1:], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        aclose = getattr(entries, "aclose", None)
        if aclose is not None:
            await aclose()


def _error_response(exc: GesteError) -> Response:
    status = next((code for cls, code in _STATUS_OF_ERROR if isinstance(exc, cls)), 400)
    message = str(exc) or type(exc).__name__
    if isinstance(exc, StorageError):  # its text may name hosts and paths: it goes to the log only
        logger.warning("storage error answered with 503: %s", exc)
        message = "the database is not available; try again later"
    return error_response(status, type(exc).__name__, " ".join(message.split()))


def _integer(query: dict[str, str], name: str, default: int) -> int:
    value = query.get(name)
    if value is None:
        return default
    if not value.isascii() or not value.isdigit() or len(value) > 9:
        raise bad_request(f"{name} must be a non-negative integer, not {value!r}")
    return int(value)


def _run_number(value: str) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 9 or int(value) < 1:
        raise bad_request(f"run must be a run number (1, 2, ...), not {value!r}")
    return int(value)


def _wait(value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise bad_request(f"wait must be a number of seconds >= 0, not {value!r}")
    return min(seconds, MAX_RESULT_WAIT)


def _whole(value: str, what: str, *, least: int) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 9 or int(value) < least:
        raise bad_request(f"{what} must be a whole number >= {least}, not {value!r:.80}")
    return int(value)


def _state_value(value: StateValue) -> dict[str, Any]:
    return {
        "key": value.key,
        "value": value.value,
        "version": value.version,
        "set_at": value.set_at.isoformat(),
        "run": value.run,
    }


def _public_error(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recorded error without its tracebacks: they stay in the database (``geste show --json``)."""
    if error is None:
        return None
    shown = {key: value for key, value in error.items() if key != "traceback"}
    if isinstance(shown.get("compensation_errors"), list):
        shown["compensation_errors"] = [
            _public_error(item) if isinstance(item, dict) else item for item in shown["compensation_errors"]
        ]
    return shown


def _outcome_error(info: InstanceInfo) -> dict[str, Any]:
    default = (
        "geste.errors.WorkflowCancelled" if info.status == Status.CANCELLED else "geste.errors.WorkflowFailed"
    )
    error = _public_error(info.error) or {}
    return {
        **error,
        "type": error.get("type") or default,
        "message": error.get("message") or f"workflow instance {info.instance_id} {info.status.value}",
    }


def _fields(value: InstanceInfo | HistoryEntry | RunInfo) -> dict[str, Any]:
    """A dataclass's fields, values as they are: ``dataclasses.asdict`` would deep-copy a result or a
    payload recursively, two frames a level, and fail with RecursionError (a 500) on deep JSON."""
    return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}


def _instance(info: InstanceInfo) -> dict[str, Any]:
    shown = _fields(info)
    shown["status"] = info.status.value
    shown["error"] = _public_error(info.error)
    return shown


def _entry(entry: HistoryEntry) -> dict[str, Any]:
    shown = _fields(entry)
    shown["kind"] = entry.kind.value
    payload = shown["payload"]
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        shown["payload"] = {**payload, "error": _public_error(payload["error"])}
    return shown


def _run(run: RunInfo) -> dict[str, Any]:
    return _fields(run)
