"""PostgreSQL: one pool setup and one migration mechanism for every service.

Each service owns one schema (``recorder``, ``archiver``, …) and ships numbered SQL files
(``001_init.sql``, ``002_….sql``) next to its code. ``migrate`` applies the ones not yet applied,
each in its own transaction, under an advisory lock keyed by the schema, and records them in
``<schema>.schema_migrations`` with a checksum — so replicas starting together apply each file once,
and an edited, already-applied file is reported instead of silently diverging.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from .logging import get_logger

log = get_logger(__name__)

_MIGRATION_FILE = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(source: Traversable | Path | str) -> list[Migration]:
    """Numbered ``.sql`` files from a directory or a package (``"cuneiform_recorder.migrations"``)."""
    folder: Traversable | Path = resources.files(source) if isinstance(source, str) else source
    found: dict[int, Migration] = {}
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if not match:
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations numbered {version}: {found[version].name} and {entry.name}")
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def _lock_key(schema: str) -> int:
    # A stable signed 64-bit key per schema; hashtext() would also do, but this keeps it visible here.
    return int.from_bytes(hashlib.sha256(f"cuneiform:migrate:{schema}".encode()).digest()[:8], "big", signed=True)


async def migrate(conn: asyncpg.Connection, schema: str, migrations: list[Migration]) -> list[int]:
    """Apply pending migrations into ``schema``; returns the versions this call applied."""
    if not _SCHEMA_NAME.match(schema):
        raise MigrationError(f"invalid schema name {schema!r}")
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _lock_key(schema))
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch(f"SELECT version, name, checksum FROM {schema}.schema_migrations")
        done = {r["version"]: r for r in rows}
        for migration in migrations:
            previous = done.get(migration.version)
            if previous is not None:
                if previous["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {schema}/{migration.version:03d}_{migration.name}.sql changed after it was "
                        "applied; add a new numbered file instead of editing an applied one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(f"SET LOCAL search_path TO {schema}, public")
                await conn.execute(migration.sql)
                await conn.execute(
                    f"INSERT INTO {schema}.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(migration.version)
            log.info("db.migration_applied", schema=schema, version=migration.version, name=migration.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _lock_key(schema))
    return applied_now


class RawJson(str):
    """JSON text that is already encoded: written to a json/jsonb parameter as it is."""

    __slots__ = ()


def encode_json(value: Any) -> str:
    return value if isinstance(value, RawJson) else orjson.dumps(value).decode()


def _jsonb_out(value: Any) -> bytes:
    # jsonb's binary form is a version byte (1) and the JSON text.
    return b"\x01" + (value.encode() if isinstance(value, RawJson) else orjson.dumps(value))


def _jsonb_in(data: bytes) -> Any:
    return orjson.loads(data[1:])


def _json_out(value: Any) -> bytes:
    return value.encode() if isinstance(value, RawJson) else orjson.dumps(value)


async def register_json_codecs(conn: asyncpg.Connection) -> None:
    """jsonb/json as Python values, encoded with orjson (several times faster than the stdlib), in
    binary form so that COPY can write them too."""
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=_jsonb_out, decoder=_jsonb_in, format="binary")
    await conn.set_type_codec("json", schema="pg_catalog", encoder=_json_out, decoder=orjson.loads, format="binary")


async def create_pool(dsn: str, schema: str | None = None, **kwargs: Any) -> asyncpg.Pool:
    """A pool whose connections find the service's own tables first (``search_path``)."""
    settings = dict(kwargs.pop("server_settings", {}) or {})
    if schema:
        settings.setdefault("search_path", f"{schema}, public")
    settings.setdefault("application_name", f"cuneiform-{schema or 'tool'}")
    pool = await asyncpg.create_pool(
        dsn,
        init=register_json_codecs,
        server_settings=settings,
        min_size=kwargs.pop("min_size", 1),
        max_size=kwargs.pop("max_size", 10),
        **kwargs,
    )
    assert pool is not None
    return pool


async def open_database(dsn: str, schema: str, migrations: list[Migration], **kwargs: Any) -> asyncpg.Pool:
    """Migrate the service's schema, then return its pool — the one start-up call a service makes."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, schema, migrations)
    finally:
        await conn.close()
    return await create_pool(dsn, schema, **kwargs)
