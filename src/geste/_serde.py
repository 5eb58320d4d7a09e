"""JSON encoding of everything geste stores: arguments, results, events and recorded errors.

Values go through ``json`` with pydantic's ``to_jsonable_python`` as the fallback, so pydantic models,
dataclasses, datetimes, UUIDs and enums are stored as JSON; reading back validates against the type hints
of the receiving function (``TypeAdapter``) only where a hint asks for more than plain JSON.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import json
import re
import traceback
from collections.abc import Callable
from functools import cache
from itertools import accumulate
from typing import Any, get_type_hints

import msgspec
from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError, to_jsonable_python

from .errors import ActivityError, PayloadTooLargeError, SerializationError

_PLAIN_JSON = (str, int, float, bool, type(None), dict, list, Any)

MAX_NESTING = 128
"""How deeply arrays and objects may nest in stored JSON. ``json`` recurses once a level and fails
(RecursionError) near Python's recursion limit, counted from wherever it is called: a value encoded
in a shallow stack could be undecodable in a deeper one (the worker, an HTTP handler)."""
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = re.compile(r"[\[\]{}]")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _default(value: Any) -> Any:
    try:
        return to_jsonable_python(value)
    except PydanticSerializationError as exc:
        raise TypeError(f"{type(value).__name__} is not JSON serialisable") from exc


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_default)
"""What ``json.dumps`` builds at each call for these options, built once: the same text, ~1 us sooner."""


def encode(value: Any, *, what: str, limit: int | None = None) -> str:
    """Encode ``value`` as compact JSON, or raise a typed error naming ``what`` it was."""
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SerializationError(f"{what} cannot be stored as JSON: {exc}") from exc
    if too_deep(text):
        raise SerializationError(f"{what} cannot be stored: nested more than {MAX_NESTING} levels deep")
    if limit is not None:
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        if size > limit:
            raise PayloadTooLargeError(what, size, limit)
    return text


def too_deep(text: str) -> bool:
    """Whether arrays and objects nest more than ``MAX_NESTING`` levels in JSON ``text`` (compact, as
    ``encode`` writes it). Counting the brackets settles most texts; the others are scanned in C
    (strings removed, the brackets' running depth)."""
    if text.count("[") + text.count("{") <= MAX_NESTING:
        return False
    brackets = _BRACKET.findall(_JSON_STRING.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) > MAX_NESTING


_fast_loads = msgspec.json.Decoder().decode
_FastRefused = (msgspec.DecodeError, UnicodeEncodeError)
"""What msgspec raises for JSON it will not read: invalid or out of its range, or text holding a lone
surrogate (which it cannot encode to UTF-8 to read; a database gives none)."""


def loads(text: str) -> Any:
    """Parse JSON text as ``json.loads`` does, five times sooner: every step a replay reads is parsed.

    msgspec parses it (integers of any size included, as ``json``; orjson turns those past 64 bits into
    floats); what msgspec refuses and ``json`` may take (``NaN``, ``1e400``, a lone surrogate: none of
    which geste writes) or refuses too goes to ``json``, so the values and the errors raised are the
    standard library's."""
    try:
        return _fast_loads(text)
    except _FastRefused:
        return json.loads(text)


def decode(text: str | None) -> Any:
    return None if text is None else loads(text)


def to_json_value(value: Any, *, what: str) -> Any:
    """The JSON form of ``value`` as Python objects (what a replay will see)."""
    return json.loads(encode(value, what=what))


@cache
def _adapter(hint: Any) -> TypeAdapter[Any]:
    return TypeAdapter(hint)


def _needs_validation(hint: Any) -> bool:
    return hint is not inspect.Parameter.empty and hint not in _PLAIN_JSON


class Signature:
    """The parameters and return type of a user function, to rebuild typed values from JSON."""

    def __init__(self, fn: Callable[..., Any], *, skip_first: bool) -> None:
        sig = inspect.signature(fn)
        try:
            hints = get_type_hints(fn)
        except Exception:  # unresolvable forward references: fall back to plain JSON values
            hints = {}
        params = list(sig.parameters.values())[1 if skip_first else 0 :]
        self._signature = sig.replace(parameters=params)
        self.param_hints = {p.name: hints.get(p.name, inspect.Parameter.empty) for p in params}
        self.return_hint = hints.get("return", inspect.Parameter.empty)
        self.validates_args = any(_needs_validation(h) for h in self.param_hints.values())
        self.validates_result = _needs_validation(self.return_hint)

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, what: str) -> None:
        """Fail early, at the caller, when the arguments do not fit the function."""
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise SerializationError(f"{what}: {exc}") from exc

    def load_args(self, stored: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        args = list(stored.get("args", []))
        kwargs = dict(stored.get("kwargs", {}))
        if not self.validates_args:
            return args, kwargs
        names = list(self.param_hints)
        try:
            for i, value in enumerate(args):
                if i < len(names) and _needs_validation(self.param_hints[names[i]]):
                    args[i] = _adapter(self.param_hints[names[i]]).validate_python(value)
            for name, value in kwargs.items():
                hint = self.param_hints.get(name, inspect.Parameter.empty)
                if _needs_validation(hint):
                    kwargs[name] = _adapter(hint).validate_python(value)
        except ValidationError as exc:
            raise SerializationError(f"stored arguments do not match the signature: {exc}") from exc
        return args, kwargs

    def load_result(self, value: Any) -> Any:
        if not self.validates_result:
            return value
        try:
            return _adapter(self.return_hint).validate_python(value)
        except ValidationError as exc:
            raise SerializationError(f"stored result does not match the return type: {exc}") from exc


def encode_error(exc: BaseException) -> dict[str, Any]:
    """The recorded form of an exception: enough to rebuild it, or to show it to a person."""
    cls = type(exc)
    try:
        text = json.dumps(list(exc.args), allow_nan=False)
        args = None if too_deep(text) else json.loads(text)
    except (TypeError, ValueError, RecursionError):
        args = None
    return {
        "type": f"{cls.__module__}.{cls.__qualname__}",
        "message": str(exc),
        "args": args,
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _find_class(type_name: str) -> type[Exception] | None:
    module_name, _, qualname = type_name.rpartition(".")
    while module_name:
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            module_name, _, head = module_name.rpartition(".")
            qualname = f"{head}.{qualname}"
            continue
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        break
    else:
        obj = getattr(builtins, qualname, None)
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None  # not an Exception (BaseExceptions are not rebuilt)


def decode_error(error: dict[str, Any]) -> Exception:
    """Rebuild a recorded exception as its own type where possible, else as ``ActivityError``."""
    type_name = str(error.get("type", "Exception"))
    message = str(error.get("message", ""))
    tb = str(error.get("traceback", ""))
    cls = _find_class(type_name)
    if cls is not None and error.get("args") is not None:
        try:
            exc = cls(*error["args"])
        except Exception:
            exc = None
        if exc is not None:
            exc.__notes__ = [f"recorded traceback:\n{tb}"] if tb else []
            return exc
    return ActivityError(type_name, message, tb)
