"""Shared fixtures: every test gets its own real database (a SQLite file in a temporary folder)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import geste

BACKENDS = ["sqlite"]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database for this test, on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'geste.db'}"
    raise AssertionError(request.param)


@pytest.fixture
def make_app(db_url: str) -> Callable[..., geste.App]:
    """Build an App on the test database with test-friendly timings (fast polls, short leases)."""

    def make(**options: Any) -> geste.App:
        options.setdefault("poll_interval", 0.05)
        options.setdefault("lock_timeout", 2.0)
        options.setdefault("shutdown_grace", 2.0)
        return geste.App(db_url, **options)

    return make
