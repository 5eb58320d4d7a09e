"""The App as a facade: its registry, its client, and the layering of the modules behind them."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

import geste
from geste._client import SentEvent

MakeApp = Callable[..., geste.App]
SRC = Path(geste.__file__).parent


async def test_the_client_says_whether_an_event_was_stored_the_app_returns_its_id(
    make_app: MakeApp,
) -> None:
    app = make_app(run_worker=False)
    async with app:
        assert await app.client.send_event("paid", {"n": 1}, event_id="e-1") == SentEvent("e-1", True)
        assert await app.client.send_event("paid", {"n": 2}, event_id="e-1") == SentEvent("e-1", False)
        assert await app.send_event("paid", event_id="e-1") == "e-1"  # a duplicate: the id all the same
        generated = await app.client.send_event("paid")
        assert generated.stored and len(generated.event_id) == 32


def test_the_registry_is_what_the_decorators_fill_and_its_views_are_read_only() -> None:
    app = geste.App("sqlite:///unused.db")

    @app.activity(name="charge")
    async def charge(ctx: geste.ActivityContext) -> None:
        pass

    @app.workflow
    async def order(ctx: geste.WorkflowContext) -> None:
        await charge(ctx)

    assert app.registry.workflows == {"order": order} == app.workflows
    assert app.registry.activities == {"charge": charge} == app.activities
    assert app.workflows is not app.workflows  # a copy each time, as before
    with pytest.raises(TypeError):
        app.registry.workflows["other"] = order  # type: ignore[index]
    with pytest.raises(geste.errors.ConfigurationError, match="registered already"):
        app.workflow(name="order")(order.fn)
    assert order.app is app  # a workflow reaches the client through its App, read at each start


def _geste_imports(path: Path) -> set[str]:
    """The geste modules ``path`` imports, TYPE_CHECKING and function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = (node.module or "").lstrip(".")
            if base:
                found.add(base.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("module", ["_definitions", "_registry", "_handle", "_operations"])
def test_the_definitions_registry_and_handle_import_nothing_of_the_api_nor_the_engine(module: str) -> None:
    above = {"_app", "_client", "_context", "_engine", "_worker", "_replay", "http", "cli", "testing"}
    assert _geste_imports(SRC / f"{module}.py") & above == set()


def test_the_client_imports_no_app() -> None:
    assert "_app" not in _geste_imports(SRC / "_client.py")
