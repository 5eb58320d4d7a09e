"""Shared fixtures: every test gets its own real database, on each backend.

SQLite: a file in the test's temporary folder. PostgreSQL: a fresh schema in the database named by
``GESTE_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``), dropped afterwards.
An unreachable PostgreSQL is an error, never a skip: CI must not pass without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import geste

from . import tiers

if TYPE_CHECKING:
    from .processes import Cluster

POSTGRES_URL = os.environ.get("GESTE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgres"]


def _admin(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        try:
            conn = await asyncpg.connect(POSTGRES_URL, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise RuntimeError(
                f"PostgreSQL is required by the test suite and does not answer at {POSTGRES_URL}: {exc}. "
                "Start it (bash .ci/ensure-postgres) or set GESTE_TEST_POSTGRES_URL."
            ) from exc
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def die_with_parent() -> None:
    """``preexec_fn`` for worker subprocesses: killed when the test process dies, never left orphaned
    (an orphaned worker would keep PostgreSQL connections and disturb the next runs)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    """Worker processes of ``tests/apps/crash_app.py`` on the test's database (``tests/processes.py``),
    killed at the end."""
    from .processes import Cluster

    with Cluster(tmp_path, db_url) as group:
        yield group


def with_query(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in params.items())


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose geste tables live in a schema of their own, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_query(POSTGRES_URL, schema=schema)
    finally:
        _admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database for this test, on each backend. In the ``pgbouncer`` variant (modules
    marked ``pgbouncer``) it is the PostgreSQL one: ``make_app``'s Apps reach it through PgBouncer."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'geste.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


PGBOUNCER_MARK = "pgbouncer"
"""Marks a module (or test) whose ``make_app`` tests run a third time, their Apps through PgBouncer;
``pgbouncer(False)`` on a test of such a module leaves it out."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{PGBOUNCER_MARK}: also run the make_app tests with their Apps through PgBouncer (transaction mode)",
    )
    config.addinivalue_line(
        "markers", "via_pgbouncer: the PgBouncer variant of a test (-m via_pgbouncer: those alone)"
    )
    for tier in tiers.NAMES:
        config.addinivalue_line("markers", f"{tier}: a test of the {tier} tier (tests/tiers.py)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test gets its module's tier as a marker (tests/tiers.py): ``pytest -m unit``."""
    for item in items:
        item.add_marker(tiers.tier_of(item.path.stem))


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    mark = metafunc.definition.get_closest_marker(PGBOUNCER_MARK)
    if (
        mark is not None
        and mark.args[:1] != (False,)  # pgbouncer(False) on a test of a marked module: not this one
        and "make_app" in metafunc.fixturenames
        and "db_url" in metafunc.fixturenames
    ):
        # as a mark, which takes precedence over the fixture's own params (pytest's rule for a test that
        # parametrizes a fixture directly)
        variants = [*BACKENDS, pytest.param("pgbouncer", marks=pytest.mark.via_pgbouncer)]
        metafunc.definition.add_marker(pytest.mark.parametrize("db_url", variants, indirect=True))


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[Any]:
    """One PgBouncer in transaction mode for the session (``tests/pgbouncer.py``), started when a test
    first needs it and stopped at the end."""
    from .pgbouncer import PgBouncer

    bouncer = PgBouncer(POSTGRES_URL)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pgbouncer_url(pg_url: str, pgbouncer: Any) -> str:
    """The test's schema through PgBouncer in transaction mode (``pooler=transaction``)."""
    url: str = pgbouncer.through(pg_url)
    return url


@pytest.fixture
def make_app(request: pytest.FixtureRequest, db_url: str) -> Callable[..., geste.App]:
    """Build an App on the test database with test-friendly timings (fast polls, short leases). In the
    ``pgbouncer`` variant its pool goes through PgBouncer and its listener straight to the server."""
    url = db_url
    callspec = getattr(request.node, "callspec", None)
    through_pgbouncer = callspec is not None and callspec.params.get("db_url") == "pgbouncer"
    if through_pgbouncer:
        url = request.getfixturevalue("pgbouncer_url")

    def make(**options: Any) -> geste.App:
        options.setdefault("poll_interval", 0.05)
        options.setdefault("lock_timeout", 2.0)
        options.setdefault("shutdown_grace", 2.0)
        if through_pgbouncer and options.get("listen_notify") is not False:
            options.setdefault("listen_database_url", db_url)
        return geste.App(url, **options)

    return make
