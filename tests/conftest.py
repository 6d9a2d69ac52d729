"""Real servers for the whole session, and per-test isolation on top of them.

Where the servers come from (``CUNEIFORM_TEST_BACKEND``):

* ``embedded`` (default): nats-server, PostgreSQL and moto's S3 from the embedded stack, on free
  loopback ports in a temporary folder — nothing to install by hand.
* ``env``: servers named by ``CUNEIFORM_TEST_NATS_URL``, ``CUNEIFORM_TEST_PG_DSN`` (a role that may
  CREATE DATABASE), ``CUNEIFORM_TEST_S3_ENDPOINT`` and ``CUNEIFORM_TEST_S3_ACCESS_KEY`` /
  ``…_SECRET_KEY`` — a compose stack, say. Chosen automatically when those are set.
* ``containers``: testcontainers, where a Docker engine runs.

Each test then gets its own NATS namespace (every subject, stream and bucket prefixed), its own
database and its own S3 bucket, so tests never see each other's data and need no cleanup order.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import Topology, ensure_topology
from nats.js import JetStreamContext


@dataclass(frozen=True)
class Servers:
    nats_url: str
    pg_dsn: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_region: str = "us-east-1"


def _from_env() -> Servers:
    return Servers(
        nats_url=os.environ["CUNEIFORM_TEST_NATS_URL"],
        pg_dsn=os.environ["CUNEIFORM_TEST_PG_DSN"],
        s3_endpoint=os.environ["CUNEIFORM_TEST_S3_ENDPOINT"],
        s3_access_key=os.environ.get("CUNEIFORM_TEST_S3_ACCESS_KEY", "cuneiform"),
        s3_secret_key=os.environ.get("CUNEIFORM_TEST_S3_SECRET_KEY", "cuneiform-secret"),
    )


@contextlib.contextmanager
def _containers() -> Iterator[Servers]:
    from testcontainers.community.minio import MinioContainer
    from testcontainers.community.nats import NatsContainer
    from testcontainers.community.postgres import PostgresContainer

    with (
        NatsContainer("nats:2.11", jetstream=True) as nats_c,
        PostgresContainer("postgres:17", username="cuneiform", password="cuneiform", dbname="cuneiform") as pg_c,
        MinioContainer("minio/minio:latest", access_key="cuneiform", secret_key="cuneiform-secret") as s3_c,
    ):
        yield Servers(
            nats_url=nats_c.nats_uri(),
            pg_dsn=pg_c.get_connection_url(driver=None),
            s3_endpoint=f"{s3_c.get_container_host_ip()}:{s3_c.get_exposed_port(9000)}",
            s3_access_key="cuneiform",
            s3_secret_key="cuneiform-secret",
        )


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    backend = os.environ.get("CUNEIFORM_TEST_BACKEND") or (
        "env" if "CUNEIFORM_TEST_NATS_URL" in os.environ else "embedded"
    )
    if backend == "env":
        yield _from_env()
    elif backend == "containers":
        with _containers() as found:
            yield found
    elif backend == "embedded":
        from cuneiform_stack import LocalStack

        # Not pytest's tmp_path: PostgreSQL runs as its own user when we are root, and pytest resets
        # its temp root to 0700 whenever another session starts.
        folder = Path(tempfile.mkdtemp(prefix="cuneiform-test-stack-"))
        stack = LocalStack(folder / "data", env_file=folder / "stack.env")
        stack.start()
        try:
            e = stack.endpoints
            yield Servers(e.nats_url, e.pg_dsn, e.s3_endpoint, e.s3_access_key, e.s3_secret_key, e.s3_region)
        finally:
            stack.stop()
            shutil.rmtree(folder, ignore_errors=True)
    else:
        raise pytest.UsageError(f"CUNEIFORM_TEST_BACKEND={backend!r}: use embedded, env or containers")


def _unique(kind: str) -> str:
    return f"t{kind}{uuid.uuid4().hex[:10]}"


def _with_database(dsn: str, database: str) -> str:
    base, _, query = dsn.partition("?")
    root = base.rsplit("/", 1)[0]
    return f"{root}/{database}" + (f"?{query}" if query else "")


@pytest.fixture
async def pg_dsn(servers: Servers) -> AsyncIterator[str]:
    """A fresh, empty database for this test."""
    name = _unique("db")
    admin = await asyncpg.connect(servers.pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(servers.pg_dsn, name)
    admin = await asyncpg.connect(servers.pg_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def nats_prefix(servers: Servers) -> AsyncIterator[str]:
    """This test's NATS namespace: its streams, subjects and buckets are invisible to other tests,
    and are deleted afterwards (JetStream reserves each stream's storage while it exists)."""
    prefix = _unique("n")
    yield prefix
    nc = await nats.connect(servers.nats_url)
    try:
        js = nc.jetstream()
        for name in await js.streams_info():
            if prefix in name.config.name:
                await js.delete_stream(name.config.name)
    finally:
        await nc.close()


#: A small stream budget: JetStream reserves it for every test namespace while the test runs.
TEST_STORAGE_GIB = 0.05


@pytest.fixture
def topology(nats_prefix: str) -> Topology:
    return Topology(nats_prefix, storage_gib=TEST_STORAGE_GIB)


@pytest.fixture
async def js(servers: Servers, topology: Topology) -> AsyncIterator[JetStreamContext]:
    """JetStream on the session's server, with this test's streams and buckets created."""
    nc = await nats.connect(servers.nats_url)
    js = nc.jetstream()
    await ensure_topology(js, topology)
    yield js
    await nc.close()


@pytest.fixture
def connection(servers: Servers, pg_dsn: str, nats_prefix: str) -> ConnectionSettings:
    """Connection settings of a whole isolated deployment: own namespace, database and bucket."""
    values: dict[str, Any] = {
        "nats_url": servers.nats_url,
        "nats_prefix": nats_prefix,
        "pg_dsn": pg_dsn,
        "s3_endpoint": servers.s3_endpoint,
        "s3_access_key": servers.s3_access_key,
        "s3_secret_key": servers.s3_secret_key,
        "s3_region": servers.s3_region,
        "s3_bucket": _unique("b").lower(),
        "nats_storage_gib": TEST_STORAGE_GIB,
    }
    return ConnectionSettings(**values)


@pytest.fixture
def log_dir() -> Iterator[Path]:
    """A folder for the logs of the service processes a test starts (outside pytest's tmp: see above)."""
    folder = Path(tempfile.mkdtemp(prefix="cuneiform-test-logs-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def services() -> AsyncIterator[list[Any]]:
    """Services a test starts in-process (append them); stopped afterwards, last started first."""
    started: list[Any] = []
    yield started
    for service in reversed(started):
        await service.stop()
