"""The embedded local stack: real servers answer, keep their data across a restart, and the CLI drives them."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from cuneiform_core.settings import ConnectionSettings
from cuneiform_stack import LocalStack, StackEndpoints
from cuneiform_stack.process import PortAllocator
from minio import Minio

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

STREAM = "STACKTEST"
OBJECT_KEY = "stacktest/kept.txt"

RunCli = Callable[[str], "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    """One data directory for the module: the CLI test then runs on an initialized cluster (no initdb).

    Not under pytest's tmp_path: as root, postgres runs as another account that must traverse the path,
    and every pytest session that starts resets /tmp/pytest-of-<user> to 0700.
    """
    path = Path(tempfile.mkdtemp(prefix="cuneiform-stack-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real CUNEIFORM_* variables would win over the env file under test."""
    for key in [key for key in os.environ if key.startswith("CUNEIFORM_")]:
        monkeypatch.delenv(key)


async def test_servers_answer_and_keep_their_data_across_a_restart(
    data_dir: Path, tmp_path: Path, clean_env: None
) -> None:
    env_file = tmp_path / "stack.env"
    stack = LocalStack(data_dir, env_file)
    endpoints = await asyncio.to_thread(stack.start)
    try:
        assert ConnectionSettings(_env_file=env_file).pg_dsn == endpoints.pg_dsn
        pids = [server.pid for server in stack.status().servers]
        assert await asyncio.to_thread(stack.start) == endpoints, "a second start is a no-op"
        assert [server.pid for server in stack.status().servers] == pids
        marker = uuid.uuid4().hex
        await _write_to_every_server(endpoints, marker)
    finally:
        await asyncio.to_thread(stack.stop)
    assert not env_file.exists()
    assert not stack.status().healthy

    endpoints = await asyncio.to_thread(stack.start)
    try:
        assert stack.status().healthy
        await _check_every_server_kept(endpoints, marker)
    finally:
        await asyncio.to_thread(stack.stop)


async def _write_to_every_server(endpoints: StackEndpoints, marker: str) -> None:
    nc = await nats.connect(endpoints.nats_url)
    try:
        js = nc.jetstream()
        await js.account_info()
        await js.add_stream(name=STREAM, subjects=["stacktest.>"])
        await js.publish("stacktest.kept", marker.encode())
    finally:
        await nc.close()

    conn = await asyncpg.connect(endpoints.pg_dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        scratch = f"stacktest_{uuid.uuid4().hex[:8]}"
        await conn.execute(f"CREATE DATABASE {scratch}")
        await conn.execute(f"DROP DATABASE {scratch}")
        await conn.execute("CREATE TABLE IF NOT EXISTS stacktest (marker text)")
        await conn.execute("INSERT INTO stacktest VALUES ($1)", marker)
    finally:
        await conn.close()

    s3 = _minio(endpoints)
    body = marker.encode()
    await asyncio.to_thread(s3.put_object, endpoints.s3_bucket, OBJECT_KEY, io.BytesIO(body), len(body))
    assert await asyncio.to_thread(_read_object, s3, endpoints.s3_bucket) == body


async def _check_every_server_kept(endpoints: StackEndpoints, marker: str) -> None:
    nc = await nats.connect(endpoints.nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        last = await js.get_msg(STREAM, info.state.last_seq)
        assert last.data == marker.encode()
    finally:
        await nc.close()

    conn = await asyncpg.connect(endpoints.pg_dsn)
    try:
        assert marker in [row["marker"] for row in await conn.fetch("SELECT marker FROM stacktest")]
    finally:
        await conn.close()

    s3 = _minio(endpoints)
    assert await asyncio.to_thread(_read_object, s3, endpoints.s3_bucket) == marker.encode()


def _minio(endpoints: StackEndpoints) -> Minio:
    return Minio(
        endpoints.s3_endpoint,
        endpoints.s3_access_key,
        endpoints.s3_secret_key,
        secure=False,
        region=endpoints.s3_region,
    )


def _read_object(s3: Minio, bucket: str) -> bytes:
    response = s3.get_object(bucket, OBJECT_KEY)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


@pytest.fixture
def cli(data_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, RunCli]]:
    env = {**os.environ, "CUNEIFORM_ENV_FILE": str(tmp_path / "cli.env")}

    def run(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cuneiform_stack", command, "--data-dir", str(data_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    yield tmp_path / "cli.env", run
    run("down")  # never leave servers behind, whatever failed


def test_cli_up_status_env_down(cli: tuple[Path, RunCli]) -> None:
    env_file, run = cli

    up = run("up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert up.stdout.count("healthy") == 3, up.stdout
    assert "CUNEIFORM_NATS_URL=nats://127.0.0.1:" in env_file.read_text()

    # A new process finds the servers that `up` left running.
    status = run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("healthy") == 3, status.stdout
    exports = run("env")
    assert "export CUNEIFORM_PG_DSN=postgresql://cuneiform:cuneiform@127.0.0.1:" in exports.stdout

    down = run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not env_file.exists()
    after = run("status")
    assert after.returncode == 1
    assert after.stdout.count("DOWN") == 3, after.stdout


def test_port_allocator_prefers_the_previous_port_when_free() -> None:
    allocator = PortAllocator()
    first = allocator.claim()
    assert PortAllocator().claim(first) == first
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert PortAllocator().claim(taken) != taken
    assert allocator.claim(first) != first, "never the same port twice from one allocator"
