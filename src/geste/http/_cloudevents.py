"""CloudEvents 1.0 over HTTP, binary and structured content modes, validated against the specification.

What is checked: ``specversion`` is ``1.0``; ``id``, ``source`` and ``type`` are present and non-empty;
attribute names are lower-case ASCII letters and digits; values follow the CloudEvents type system
(strings without control characters, surrogates or non-characters; ``source`` a URI-reference,
``dataschema`` an absolute URI, ``time`` an RFC 3339 timestamp; in JSON, extension values are strings,
booleans or 32-bit integers; ``null`` means absent). Binary-mode header values are percent-decoded as
UTF-8, as the HTTP binding asks. Batched mode and event formats other than JSON are refused (415).

The event's data, stored as JSON, is decided by its content type, the same way in both modes:
JSON types (``*/json``, ``*/*+json``) are parsed into the JSON value; ``text/*`` is decoded into a string
(its ``charset``, UTF-8 by default); any other type is kept as a base64 string. A structured event's
``data`` member is taken as it is; its ``data_base64`` is decoded and then treated like a binary body of
its ``datacontenttype``, and stays bytes (base64) without one: ``data_base64`` says the data is binary.

A binary-mode body without a ``Content-Type`` (what the Python SDK, ``cloudevents``, sends for an event
without ``datacontenttype``) is its JSON value when it is JSON as ``application/json`` data must be
(UTF-8, no ``NaN`` or ``Infinity``, nested at most 128 levels), and bytes otherwise, kept as a base64
string like ``application/octet-stream``: it is never refused for its type. Text sent that way arrives as
base64 unless it happens to be JSON; a sender of text gives ``text/plain``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_to_bytes

from ._routing import (
    HTTPError,
    MediaType,
    bad_request,
    is_utf8,
    load_json,
    parse_media_type,
    unsupported_media_type,
)

ErrorFactory = Callable[[str], HTTPError]

SPECVERSION = "1.0"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
INSTANCE_EXTENSION = "gesteinstance"
"""The extension attribute that sends an event to one instance only (``instance_id=``)."""

_REQUIRED = ("id", "source", "type")
_NAME = re.compile(r"[a-z0-9]+\Z")
_URI_REFERENCE = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+\Z")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z")
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef]")  # + U+xFFFE, U+xFFFF
_INT32 = range(-(2**31), 2**31)


def _invalid(message: str) -> HTTPError:
    return bad_request(message, "InvalidCloudEvent")


def _allowed(text: str) -> bool:
    """A CloudEvents String: no control characters, surrogates or non-characters."""
    return not _FORBIDDEN.search(text) and not any(ord(c) & 0xFFFE == 0xFFFE for c in text)


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """A validated event: the three attributes geste stores apart, its data, and every other attribute."""

    id: str
    source: str
    type: str
    data: Any
    attributes: dict[str, Any]
    """``specversion``, ``datacontenttype``, ``subject``, ``time``, ``dataschema`` and the extensions."""

    @property
    def instance_id(self) -> str | None:
        value = self.attributes.get(INSTANCE_EXTENSION)
        return None if value is None else str(value)


# -- content modes ------------------------------------------------------------------------------------
def is_structured(content_type: MediaType | None, has_ce_headers: bool) -> bool:
    """Which content mode a request uses, decided from its headers before its body is read.

    Structured: ``application/cloudevents+json``. Binary: ``ce-*`` headers. A 415 for the batch and other
    event formats, and for a request that is neither.
    """
    if content_type is not None:
        if content_type.essence == BATCH:
            raise unsupported_media_type(
                f"batched mode ({BATCH}) is not supported: send one event per request"
            )
        if content_type.essence == STRUCTURED:
            if not is_utf8(content_type.charset):
                raise unsupported_media_type(f"{STRUCTURED} must be UTF-8, not {content_type.charset}")
            return True
        if content_type.essence.startswith("application/cloudevents"):
            raise unsupported_media_type(
                f"event format {content_type.essence} is not supported: use {STRUCTURED} or binary mode"
            )
    if not has_ce_headers:
        raise unsupported_media_type(
            f"not a CloudEvent: send {STRUCTURED} (structured mode) or ce-* headers (binary mode)"
        )
    return False


def check_binary_content_type(content_type: MediaType | None) -> None:
    """Refuse (415), before the body is read, a binary-mode data type whose text cannot be decoded."""
    if content_type is not None:
        _data_kind(content_type, unsupported_media_type)


def _data_kind(media: MediaType, error: ErrorFactory) -> str:
    """``json``, ``binary`` or the codec name of a text type; ``error(message)`` when unusable."""
    if media.is_json:
        if not is_utf8(media.charset):
            raise error(f"JSON data must be UTF-8, not {media.charset}")
        return "json"
    if media.is_text:
        charset = media.charset or "utf-8"
        try:
            name = codecs.lookup(charset).name
            b"x".decode(name)  # a LookupError for codecs that are not text encodings (base64, rot13, ...)
        except UnicodeError:
            pass  # a text encoding: whether this body decodes is for _decode_data to say
        except LookupError:
            raise error(f"unknown charset {charset!r} in {media.raw!r}") from None
        return name
    return "binary"


def _decode_data(body: bytes, media: MediaType | None, error: ErrorFactory) -> Any:
    kind = "binary" if media is None else _data_kind(media, error)
    if kind == "json":
        return load_json(body, "the event data")
    if kind == "binary":
        return base64.b64encode(body).decode("ascii")
    try:
        return body.decode(kind)
    except UnicodeError:  # not only UnicodeDecodeError: the idna and punycode codecs raise UnicodeError
        raise bad_request(f"the event data is not valid {kind}", "InvalidCloudEvent") from None


def _untyped_data(body: bytes) -> Any:
    """A body without a content type: its JSON value when it is JSON as ``application/json`` data must be
    (UTF-8, strict, at most ``MAX_JSON_DEPTH`` deep), otherwise bytes, kept as a base64 string."""
    try:
        return load_json(body, "the event data")
    except HTTPError:
        return base64.b64encode(body).decode("ascii")


# -- binary mode --------------------------------------------------------------------------------------
def parse_binary(
    headers: list[tuple[bytes, bytes]], content_type: MediaType | None, body: bytes
) -> CloudEvent:
    """An event from ``ce-*`` headers (the attributes) and the body (the data, typed by Content-Type)."""
    attributes: dict[str, Any] = {}
    for key, raw in headers:
        if not key.startswith(b"ce-"):
            continue
        name = key[3:].decode("latin-1")
        header = f"ce-{name}"
        _check_name(name, header)
        if name in attributes:
            raise _invalid(f"the {header} header is given more than once")
        if name == "datacontenttype":
            raise _invalid("binary mode gives the data's type as Content-Type, never as ce-datacontenttype")
        attributes[name] = _header_value(raw, header)
    if content_type is not None:
        attributes["datacontenttype"] = content_type.raw
    data = None
    if body:
        if content_type is None:
            data = _untyped_data(body)
        else:
            data = _decode_data(body, content_type, unsupported_media_type)
    return _validated(attributes, data, lambda name: f"header ce-{name}")


def _header_value(raw: bytes, header: str) -> str:
    """Unquote a quoted string, then percent-decode once, strictly as UTF-8 (HTTP binding 3.1.3.2)."""
    if not raw.isascii():
        raise _invalid(f"the {header} header holds non-ASCII bytes: percent-encode them")
    text = raw.decode("ascii").strip(" \t")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = re.sub(r"\\(.)", r"\1", text[1:-1])
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid(f"the {header} header is not valid percent-encoded UTF-8") from None


# -- structured mode ----------------------------------------------------------------------------------
def parse_structured(body: bytes) -> CloudEvent:
    """An event from a JSON object holding its attributes and ``data`` or ``data_base64``."""
    document = load_json(body, "the event")
    if not isinstance(document, dict):
        raise _invalid(f"a structured event is a JSON object, not {type(document).__name__}")
    if "data" in document and document.get("data_base64") is not None:
        raise _invalid("an event has data or data_base64, not both")
    attributes: dict[str, Any] = {}
    for name, value in document.items():
        if name in ("data", "data_base64"):
            continue
        _check_name(name, f"attribute {name!r}")
        if value is None:  # the JSON format: null is the same as absent
            continue
        if isinstance(value, bool | str):
            attributes[name] = value
        elif isinstance(value, int):
            if value not in _INT32:
                raise _invalid(f"attribute {name!r} is an integer outside the 32-bit range")
            attributes[name] = value
        else:
            raise _invalid(f"attribute {name!r} must be a string, a boolean or an integer")
    encoded = document.get("data_base64")
    if encoded is not None:
        data = _from_base64(encoded, attributes.get("datacontenttype"))
    else:
        data = document.get("data")
    return _validated(attributes, data, lambda name: f"attribute {name!r}")


def _from_base64(encoded: Any, declared: Any) -> Any:
    if not isinstance(encoded, str):
        raise _invalid("data_base64 must be a string")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("data_base64 is not valid base64") from None
    media = None
    if isinstance(declared, str):
        media = parse_media_type(declared)
        if media is None:
            raise _invalid(f"malformed datacontenttype {declared!r}")
    return _decode_data(raw, media, _invalid)


# -- attributes ---------------------------------------------------------------------------------------
def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise _invalid(f"{what}: attribute names are lower-case ASCII letters and digits")
    if name == "data":
        raise _invalid(f"{what}: 'data' is not an attribute")


def _validated(attributes: dict[str, Any], data: Any, where: Callable[[str], str]) -> CloudEvent:
    specversion = attributes.get("specversion")
    if specversion is None:
        raise _invalid(f"the required attribute specversion ({where('specversion')}) is missing")
    if specversion != SPECVERSION:
        raise _invalid(f"specversion {specversion!r} is not supported: only {SPECVERSION}")
    for name in _REQUIRED:
        if name not in attributes:
            raise _invalid(f"the required attribute {name} ({where(name)}) is missing")
    for name, value in attributes.items():
        if isinstance(value, str):
            if not _allowed(value):
                raise _invalid(f"{where(name)} holds a control character, a surrogate or a non-character")
        elif name in ("id", "source", "type", "subject", "time", "dataschema", "datacontenttype"):
            raise _invalid(f"{where(name)} must be a string")
    for name in ("id", "source", "type", "subject", "dataschema", "datacontenttype"):
        if attributes.get(name) == "":
            raise _invalid(f"{where(name)} must not be empty")
    if not _URI_REFERENCE.match(attributes["source"]):
        raise _invalid(
            f"{where('source')} must be a URI-reference (RFC 3986; percent-encode other characters)"
        )
    declared = attributes.get("datacontenttype")
    if declared is not None and parse_media_type(declared) is None:
        # checked here, not only when data_base64 is decoded: a malformed type must not be stored and
        # handed on to the workflow with JSON `data`
        raise _invalid(f"{where('datacontenttype')} must be a media type (RFC 2046), like application/json")
    schema = attributes.get("dataschema")
    if schema is not None and not (_URI_REFERENCE.match(schema) and _SCHEME.match(schema)):
        raise _invalid(f"{where('dataschema')} must be an absolute URI")
    time = attributes.get("time")
    if time is not None and not _is_timestamp(time):
        raise _invalid(f"{where('time')} must be an RFC 3339 timestamp, like 2024-05-01T12:00:00Z")
    if INSTANCE_EXTENSION in attributes and not isinstance(attributes[INSTANCE_EXTENSION], str):
        raise _invalid(f"{where(INSTANCE_EXTENSION)} must be a string: an instance id")
    return CloudEvent(
        id=attributes["id"],
        source=attributes["source"],
        type=attributes["type"],
        data=data,
        attributes={k: v for k, v in attributes.items() if k not in _REQUIRED},
    )


def _is_timestamp(value: str) -> bool:
    if not _TIMESTAMP.match(value):
        return False
    try:
        datetime.fromisoformat(value.upper())
    except ValueError:  # month 13, February 30th, ...
        return False
    return True
