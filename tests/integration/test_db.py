"""Migrations: numbered files, applied once under concurrent starts, changes to applied files refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
from cuneiform_core.db import Migration, MigrationError, load_migrations, migrate, open_database

pytestmark = pytest.mark.integration

MIGRATIONS = [
    Migration(1, "init", "CREATE TABLE things (id bigint PRIMARY KEY, note text)"),
    # Not idempotent on purpose: applied twice it would fail, so a double apply cannot hide.
    Migration(2, "add_column", "ALTER TABLE things ADD COLUMN size int NOT NULL DEFAULT 0"),
    Migration(3, "seed", "INSERT INTO things (id, note) VALUES (1, 'seeded')"),
]


async def test_concurrent_starts_apply_each_migration_once(pg_dsn: str) -> None:
    async def start() -> list[int]:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return await migrate(conn, "svc", MIGRATIONS)
        finally:
            await conn.close()

    results = await asyncio.gather(*(start() for _ in range(8)))
    assert sorted(v for applied in results for v in applied) == [1, 2, 3]  # one starter applied them all
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM svc.things") == 1
        recorded = await conn.fetch("SELECT version, name FROM svc.schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in recorded] == [(1, "init"), (2, "add_column"), (3, "seed")]
    finally:
        await conn.close()


async def test_new_migrations_apply_on_the_next_start_and_the_pool_finds_the_schema(pg_dsn: str) -> None:
    pool = await open_database(pg_dsn, "svc", MIGRATIONS[:1])
    await pool.close()
    pool = await open_database(pg_dsn, "svc", MIGRATIONS)
    try:
        # search_path puts the service's schema first: unqualified names are its own tables.
        assert await pool.fetchval("SELECT size FROM things WHERE id = 1") == 0
        assert await pool.fetchval("SELECT '{\"a\": [1, null]}'::jsonb") == {"a": [1, None]}
    finally:
        await pool.close()


async def test_an_edited_applied_migration_is_refused_with_advice(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn, "svc", MIGRATIONS[:1])
        edited = [Migration(1, "init", "CREATE TABLE things (id uuid PRIMARY KEY)")]
        with pytest.raises(MigrationError, match="add a new numbered file"):
            await migrate(conn, "svc", edited)
    finally:
        await conn.close()


async def test_a_failing_migration_rolls_back_and_leaves_no_record(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        broken = [*MIGRATIONS[:1], Migration(2, "broken", "ALTER TABLE things ADD COLUMN x int; SELECT 1/0")]
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate(conn, "svc", broken)
        assert await conn.fetchval("SELECT max(version) FROM svc.schema_migrations") == 1
        columns = await conn.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = 'things'")
        assert {c["column_name"] for c in columns} == {"id", "note"}
    finally:
        await conn.close()


def test_migration_files_are_loaded_in_numeric_order(tmp_path: Path) -> None:
    (tmp_path / "010_later.sql").write_text("SELECT 10")
    (tmp_path / "002_second.sql").write_text("SELECT 2")
    (tmp_path / "001_first.sql").write_text("SELECT 1")
    (tmp_path / "README.md").write_text("not a migration")
    assert [(m.version, m.name) for m in load_migrations(tmp_path)] == [(1, "first"), (2, "second"), (10, "later")]
    (tmp_path / "002_duplicate.sql").write_text("SELECT 2")
    with pytest.raises(MigrationError, match="two migrations numbered 2"):
        load_migrations(tmp_path)
