"""The engine's place in the layers: it imports nothing above it, and the checks it shares live below it."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

import geste
from geste import _validation
from geste.engine.journal import Abandon, Suspended
from geste.errors import ConfigurationError

ENGINE = Path(geste.__file__).parent / "engine"
ABOVE = ("geste._app", "geste._client", "geste._handle", "geste.http", "geste.cli", "geste.testing")


def _imported(path: Path, package: str = "geste.engine") -> set[str]:
    """Every geste module ``path`` (of ``package``) imports, ``if TYPE_CHECKING:`` and function-level
    imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = f"{base}.{node.module}" if node.module and base else node.module or base
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("geste")}


@pytest.mark.parametrize("path", sorted(ENGINE.glob("*.py")), ids=lambda path: path.name)
def test_the_engine_imports_nothing_above_it(path: Path) -> None:
    upward = {name for name in _imported(path) if name.startswith(ABOVE)}
    assert not upward, f"{path.name} imports {sorted(upward)}"


def test_the_validation_module_is_core() -> None:
    assert _imported(Path(_validation.__file__), "geste") <= {
        "geste.errors",
        "geste.errors.ConfigurationError",
    }


def test_the_engine_signals_are_not_exceptions_a_workflow_catches() -> None:
    assert not issubclass(Suspended, Exception) and not issubclass(Abandon, Exception)


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (lambda value: _validation.check_name(value, "workflow"), " "),
        (_validation.check_channel, ""),
        (_validation.check_mode, "fanout"),
        (_validation.check_instance_id, "a\x00b"),
    ],
)
def test_refused_names_raise_configuration_errors(check: Callable[[object], str], value: str) -> None:
    with pytest.raises(ConfigurationError):
        check(value)


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("order.paid", True),
        ("x" * 200, True),
        ("x" * 201, False),
        ("  ", False),
        ("\ud800", False),
        (3, False),
    ],
)
def test_event_types_a_workflow_waits_for_are_the_names_send_event_takes(
    value: object, accepted: bool
) -> None:
    if accepted:
        assert _validation.check_event_type(value) == value
        assert _validation.check_name(value, "event type") == value
    else:
        with pytest.raises(TypeError):
            _validation.check_event_type(value)
        with pytest.raises(ConfigurationError):
            _validation.check_name(value, "event type")
