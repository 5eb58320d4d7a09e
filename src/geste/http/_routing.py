"""Requests, responses and routes for geste's ASGI application: what it needs of a web framework, no more.

Every answer is JSON. Errors are ``{"error": {"type": ..., "message": ...}}`` with their HTTP status.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_TOKEN = r"[!#$%&'*+.^_`|~0-9a-z-]+"
_MEDIA_TYPE = re.compile(rf"({_TOKEN}/{_TOKEN})\Z")


class HTTPError(Exception):
    """An answer with an error status and the JSON error body."""

    def __init__(
        self, status: int, type_: str, message: str, *, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = list(headers)

    def response(self) -> Response:
        return error_response(self.status, self.type, self.message, headers=self.headers)


class ClientDisconnected(Exception):
    """The client went away before its request body was read: there is no one to answer."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    headers: Sequence[tuple[str, str]] = ()
    content_type: str = "application/json"
    stream: Callable[[Send], Awaitable[None]] | None = None
    """A body sent in parts as it comes (Server-Sent Events): it sends each with ``more_body`` and the
    last without; the response has no content-length then."""

    async def send(self, send: Send) -> None:
        headers = [(b"content-type", self.content_type.encode("latin-1"))]
        if self.stream is None:
            headers.append((b"content-length", str(len(self.body)).encode("ascii")))
        headers += [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
        headers += [(name.encode("latin-1"), value.encode("latin-1")) for name, value in self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        if self.stream is not None:
            await self.stream(send)
            return
        await send({"type": "http.response.body", "body": self.body})


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_response(status: int, value: Any, *, headers: Sequence[tuple[str, str]] = ()) -> Response:
    # ensure_ascii: stored strings may hold lone surrogates (JSON allows "\ud800"), which UTF-8 cannot.
    body = json.dumps(value, default=_jsonable, separators=(",", ":")).encode("ascii")
    return Response(status, body, headers)


def error_response(
    status: int, type_: str, message: str, *, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    return json_response(status, {"error": {"type": type_, "message": message}}, headers=headers)


def bad_request(message: str, type_: str = "BadRequest") -> HTTPError:
    return HTTPError(400, type_, message)


def unsupported_media_type(message: str) -> HTTPError:
    return HTTPError(415, "UnsupportedMediaType", message)


# -- media types --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MediaType:
    """A parsed ``Content-Type``: ``essence`` is ``type/subtype`` in lower case, without parameters."""

    essence: str
    params: dict[str, str]
    raw: str

    @property
    def is_json(self) -> bool:
        """``*/json`` or ``*/*+json``, as the CloudEvents JSON format defines JSON-formatted content."""
        subtype = self.essence.partition("/")[2]
        return subtype == "json" or subtype.endswith("+json")

    @property
    def is_text(self) -> bool:
        return self.essence.startswith("text/")

    @property
    def charset(self) -> str | None:
        return self.params.get("charset")


def parse_media_type(value: str) -> MediaType | None:
    """Parse a media type (``type/subtype; name=value; ...``); None when it is malformed."""
    essence, *rest = value.split(";")
    essence = essence.strip().lower()
    if not _MEDIA_TYPE.match(essence):
        return None
    params: dict[str, str] = {}
    for param in rest:
        name, sep, val = param.partition("=")
        name = name.strip().lower()
        if not name and not sep:
            continue  # a trailing ";"
        if not sep or not re.fullmatch(_TOKEN, name):
            return None
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        params[name] = val
    return MediaType(essence, params, value.strip())


def is_utf8(charset: str | None) -> bool:
    return charset is None or charset.lower().replace("_", "-") in ("utf-8", "utf8")


def load_json(body: bytes, what: str) -> Any:
    """Strict JSON: UTF-8, no NaN or Infinity, nested at most ``MAX_JSON_DEPTH`` deep; a 400
    ``InvalidJSON`` otherwise."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    try:
        value = json.loads(body.decode("utf-8"), parse_constant=refuse)
    except UnicodeDecodeError:
        raise bad_request(f"{what} is not valid UTF-8", "InvalidJSON") from None
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"{what} is not valid JSON: {exc}", "InvalidJSON") from None
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _too_deep(value):
        raise bad_request(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", "InvalidJSON")
    return value


MAX_JSON_DEPTH = 128
"""The deepest nesting of arrays and objects taken in a request body (as serde_json's default).

Deeper values parse here but come near Python's recursion limit wherever they are encoded, decoded or
copied again (the App, the worker, ``GET /instances``), and would fail there rather than here.
"""


def _too_deep(value: Any) -> bool:
    """Whether ``value`` nests arrays and objects deeper than ``MAX_JSON_DEPTH``, found without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


# -- requests -----------------------------------------------------------------------------------------
class Request:
    """One HTTP request: its method, path, headers and query, and its body read within a size limit."""

    def __init__(self, scope: Scope, receive: Receive, *, max_body_bytes: int) -> None:
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.raw_headers: list[tuple[bytes, bytes]] = list(scope.get("headers", ()))
        self._receive = receive
        self.max_body_bytes = max_body_bytes
        self._body_read = False

    @property
    def mount(self) -> str:
        """Where the application is mounted (the ASGI ``root_path``, percent-encoded; "" at the root), for
        the paths of its own URLs (``Location``)."""
        return quote(str(self.scope.get("root_path", "")).rstrip("/"), safe="/")

    async def disconnected(self) -> None:
        """Return once the client went away (a streamed response stops then)."""
        while True:
            message = await self._receive()
            if message.get("type") == "http.disconnect":
                return

    def header_values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.raw_headers if key == name]

    def header(self, name: str) -> str | None:
        """One header's value (latin-1, as HTTP has it); a 400 if the request has it twice."""
        values = self.header_values(name.encode("latin-1"))
        if len(values) > 1:
            raise bad_request(f"the {name} header is given more than once")
        return values[0].decode("latin-1") if values else None

    def content_type(self) -> MediaType | None:
        raw = self.header("content-type")
        if raw is None:
            return None
        media = parse_media_type(raw)
        if media is None:
            raise unsupported_media_type(f"malformed Content-Type {raw!r}")
        return media

    def query(self, *allowed: str) -> dict[str, str]:
        """The query parameters, each at most once, only those ``allowed``."""
        try:
            pairs = parse_qsl(
                self.scope.get("query_string", b"").decode("latin-1"),
                keep_blank_values=True,
                errors="strict",
                max_num_fields=50,
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad_request(f"malformed query string: {exc}") from None
        found: dict[str, str] = {}
        for name, value in pairs:
            if "\x00" in name or "\x00" in value:
                raise bad_request("a query parameter holds a NUL character (PostgreSQL cannot compare it)")
            if name not in allowed:
                known = ", ".join(allowed) or "none"
                raise bad_request(f"unknown query parameter {name!r} (known: {known})")
            if name in found:
                raise bad_request(f"query parameter {name!r} is given more than once")
            found[name] = value
        return found

    async def body(self) -> bytes:
        """The whole body, or a 413 as soon as it is known to be over ``max_body_bytes``.

        A ``Content-Length`` over the limit is refused before anything is read; a body that grows past
        it (chunked, or a lying length) is refused at the chunk that crosses it.
        """
        length = self.header("content-length")
        if length is not None:
            # ASCII digits only ("²" is a digit to str.isdigit, not to int), and never more of them than
            # int() converts: a length of thousands of digits is over the limit, not a ValueError (500).
            digits = length.strip()
            if not digits.isascii() or not digits.isdigit():
                raise bad_request(f"malformed Content-Length {length!r}")
            significant = digits.lstrip("0")
            if len(significant) > 18 or int(significant or "0") > self.max_body_bytes:
                raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                self._body_read = True
                return b"".join(chunks)

    def body_left_unread(self) -> bool:
        """Whether the request announced a body (a ``Content-Length`` other than 0, or chunked) that was
        not read to its end: answered before it, or refused at the limit."""
        if self._body_read:
            return False
        lengths = [value.strip() for value in self.header_values(b"content-length")]
        return any(value.lstrip(b"0") for value in lengths) or bool(self.header_values(b"transfer-encoding"))

    def _too_large(self) -> HTTPError:
        return HTTPError(
            413,
            "PayloadTooLarge",
            f"the request body is larger than the limit of {self.max_body_bytes} bytes",
        )


def local_path(scope: Scope) -> str:
    """The request's path below where the application is mounted (the ASGI ``root_path``), still
    percent-encoded as the client sent it: ``/instances/a%2Fb`` for the instance ``a/b``.

    ASGI's ``path`` holds the ``root_path`` (Starlette's ``Mount`` and the servers keep the full path;
    servers of the older convention leave it out), decoded. ``raw_path``, when given, is the path as it
    arrived: with the prefix, or without it behind a proxy that stripped it while the server adds it
    to ``path`` (``--root-path``). The answer is the tail of ``raw_path`` that decodes to ``path`` less
    ``root_path``, found in one pass over the part it leaves out.
    """
    path: str = scope["path"]
    root = str(scope.get("root_path", "")).rstrip("/")
    rest = path[len(root) :] if root and (path == root or path.startswith(f"{root}/")) else path
    raw_bytes = scope.get("raw_path")
    if not raw_bytes:
        return quote(rest, safe="/")
    raw: str = raw_bytes.decode("latin-1").split("?", 1)[0]
    decoded = unquote(raw)
    if not decoded.endswith(rest):  # a server whose two paths disagree: the decoded one routes
        return quote(rest, safe="/")
    skip = len(decoded) - len(rest)  # decoded characters of the prefix to pass over, whole segments
    start = 0
    while skip > 0 and start < len(raw):
        end = raw.find("/", start + 1)
        end = len(raw) if end < 0 else end
        skip -= len(unquote(raw[start:end]))  # (an escape never spans a "/", so segments add up)
        start = end
    return raw[start:] if skip == 0 else quote(rest, safe="/")


def path_segments(scope: Scope) -> tuple[str, ...]:
    """The path's segments below the mount point, each percent-decoded on its own, so that an id may
    hold an encoded ``/``."""
    segments = local_path(scope).split("/")[1:]
    try:
        decoded = tuple(unquote(segment, errors="strict") for segment in segments)
    except UnicodeDecodeError:
        raise bad_request("the path is not valid percent-encoded UTF-8") from None
    if any("\x00" in segment for segment in decoded):
        # No id or name holds one (geste refuses them at creation), and PostgreSQL fails on a NUL in a
        # parameter, which would be answered as a 503 "database not available".
        raise bad_request("the path holds a NUL character (%00): no id or name has one")
    return decoded


# -- routes -------------------------------------------------------------------------------------------
Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]


class Router:
    """Routes ``METHOD /literal/{param}/...`` patterns; a known path with another method is a 405."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, tuple[str, ...], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, tuple(pattern.strip("/").split("/")), handler))

    def resolve(self, method: str, segments: tuple[str, ...]) -> tuple[Handler, dict[str, str]]:
        allowed: list[str] = []
        for route_method, pattern, handler in self._routes:
            params = _match(pattern, segments)
            if params is None:
                continue
            if route_method == method:
                return handler, params
            allowed.append(route_method)
        if allowed:
            raise HTTPError(
                405,
                "MethodNotAllowed",
                f"{method} is not allowed here; allowed: {', '.join(allowed)}",
                headers=[("allow", ", ".join(allowed))],
            )
        raise HTTPError(404, "NotFound", "no such endpoint")


def _match(pattern: tuple[str, ...], segments: tuple[str, ...]) -> dict[str, str] | None:
    if len(pattern) != len(segments):
        return None
    params: dict[str, str] = {}
    for part, segment in zip(pattern, segments, strict=True):
        if part.startswith("{") and part.endswith("}"):
            if not segment:
                return None
            params[part[1:-1]] = segment
        elif part != segment:
            return None
    return params
