"""``sql/<backend>/schema.sql`` is the schema the migrations make, to the letter of the catalogue.

Each test migrates a fresh database from nothing, builds another from ``schema.sql`` alone, and compares
what the database itself reports of both: tables, columns (order, type, nullability, default, key),
indexes (columns, uniqueness, partial condition), and on PostgreSQL storage options, constraints,
sequences and functions. A migration that changes the schema without ``schema.sql`` fails here.
"""

from __future__ import annotations

import re
import sqlite3
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from geste.storage.postgres import SCHEMA_VERSION as POSTGRES_VERSION
from geste.storage.postgres import PostgresStorage, parse_postgres_url
from geste.storage.sqlite import SCHEMA_VERSION as SQLITE_VERSION
from geste.storage.sqlite import SQLiteStorage
from tests.conftest import POSTGRES_URL


def schema_sql(backend: str) -> str:
    return resources.files("geste.storage").joinpath("sql", backend, "schema.sql").read_text(encoding="utf-8")


def _folded(text: str | None) -> str | None:
    return None if text is None else " ".join(text.split())


# -- SQLite ------------------------------------------------------------------------------------------------
def sqlite_catalogue(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        objects = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
        catalogue: dict[str, Any] = {
            "other objects": sorted((t, n) for t, n, _, _ in objects if t not in ("table", "index")),
        }
        for kind, table, _, sql in sorted(objects):
            if kind != "table":
                continue
            _, _, _, ncol, without_rowid, strict = conn.execute(f"PRAGMA table_list('{table}')").fetchone()
            indexes = {}
            for _, name, unique, origin, partial in conn.execute(f"PRAGMA index_list('{table}')"):
                index_sql = next((s for t, n, _, s in objects if t == "index" and n == name), None)
                where = re.split(r"\bWHERE\b", index_sql, flags=re.IGNORECASE)[1] if partial else None
                columns = conn.execute(f"PRAGMA index_xinfo('{name}')").fetchall()
                indexes[name] = (unique, origin, _folded(where), columns)
            catalogue[table] = {
                "columns": conn.execute(f"PRAGMA table_xinfo('{table}')").fetchall(),
                "without rowid": (ncol, without_rowid, strict),
                "autoincrement": "AUTOINCREMENT" in (sql or "").upper(),
                "foreign keys": conn.execute(f"PRAGMA foreign_key_list('{table}')").fetchall(),
                "indexes": indexes,
            }
        return catalogue
    finally:
        conn.close()


async def test_sqlite_schema_sql_is_what_the_migrations_make(tmp_path: Path) -> None:
    migrated = tmp_path / "migrated.db"
    storage = SQLiteStorage(f"sqlite:///{migrated}")
    await storage.open()
    await storage.close()

    written = tmp_path / "written.db"
    text = schema_sql("sqlite")
    conn = sqlite3.connect(written)
    try:
        conn.executescript(text)
    finally:
        conn.close()

    expected, found = sqlite_catalogue(migrated), sqlite_catalogue(written)
    assert found.keys() == expected.keys()
    for table in expected:
        assert found[table] == expected[table], table
    assert f"(schema version {SQLITE_VERSION})" in text.splitlines()[0]


# -- PostgreSQL --------------------------------------------------------------------------------------------
CATALOGUE = {
    "relations": """
        SELECT c.relname, c.relkind, coalesce(c.reloptions, '{}') AS options
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 ORDER BY c.relname""",
    "columns": """
        SELECT table_name, ordinal_position, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns WHERE table_schema = $1 ORDER BY table_name, ordinal_position""",
    "constraints": """
        SELECT r.relname, con.conname, con.contype, pg_get_constraintdef(con.oid) AS definition
        FROM pg_constraint con
        JOIN pg_class r ON r.oid = con.conrelid JOIN pg_namespace n ON n.oid = r.relnamespace
        WHERE n.nspname = $1 ORDER BY r.relname, con.conname""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = $1 ORDER BY indexname""",
    "sequences": """
        SELECT s.sequencename, s.data_type::text, s.start_value, s.increment_by, s.cycle,
               (SELECT d.refobjid::regclass::text || '.' || a.attname
                FROM pg_depend d
                JOIN pg_class c ON c.oid = d.objid
                JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                WHERE c.relname = s.sequencename AND c.relnamespace = $1::text::regnamespace
                  AND d.deptype = 'a') AS owned_by
        FROM pg_sequences s WHERE s.schemaname = $1 ORDER BY s.sequencename""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS arguments,
               pg_get_functiondef(p.oid) AS definition
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = $1 ORDER BY p.proname""",
}


async def postgres_catalogue(conn: asyncpg.Connection, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """The catalogue of ``schema``, its name taken out of every definition (so two schemas compare)."""

    def unnamed(value: Any) -> Any:
        return (
            value.replace(f"{schema}.", "").replace(f'"{schema}".', "") if isinstance(value, str) else value
        )

    return {
        part: [tuple(unnamed(value) for value in row) for row in await conn.fetch(query, schema)]
        for part, query in CATALOGUE.items()
    }


async def test_postgres_schema_sql_is_what_the_migrations_make(pg_url: str) -> None:
    migrated = parse_postgres_url(pg_url)[1]["schema"]  # a fresh schema, dropped after the test
    storage = PostgresStorage(pg_url)
    await storage.open()
    await storage.close()

    written = f"t_{uuid.uuid4().hex[:12]}"
    text = schema_sql("postgres")
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f'CREATE SCHEMA "{written}"')
        try:
            async with conn.transaction():
                await conn.execute(f'SET LOCAL search_path TO "{written}"')
                await conn.execute(text)  # the simple protocol: the whole file in one call
            expected = await postgres_catalogue(conn, migrated)
            found = await postgres_catalogue(conn, written)
        finally:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{written}" CASCADE')
    finally:
        await conn.close()
    for part in CATALOGUE:
        assert found[part] == expected[part], part
    assert len(expected["relations"]) > 20 and expected["functions"]  # the catalogue was read
    assert f"(schema version {POSTGRES_VERSION})" in text.splitlines()[0]
