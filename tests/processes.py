"""Service processes for fault and end-to-end tests: each ``cuneiform-<service>`` runs as deployed,
configured by environment only, and can be killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from cuneiform_core.settings import ConnectionSettings
from cuneiform_stack.process import LOOPBACK, http_status

from tests.support import eventually


def deployment_env(connection: ConnectionSettings, env_file: Path | str = "/nonexistent/stack.env") -> dict[str, str]:
    """This process's environment without any CUNEIFORM_* of the developer's, plus the test's deployment
    (a developer's .cuneiform/stack.env must not leak in either)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUNEIFORM_")}
    env |= {
        "CUNEIFORM_ENV_FILE": str(env_file),
        "CUNEIFORM_NATS_URL": connection.nats_url,
        "CUNEIFORM_NATS_PREFIX": connection.nats_prefix,
        "CUNEIFORM_NATS_STORAGE_GIB": str(connection.nats_storage_gib),
        "CUNEIFORM_PG_DSN": connection.pg_dsn,
        "CUNEIFORM_S3_ENDPOINT": connection.s3_endpoint,
        "CUNEIFORM_S3_ACCESS_KEY": connection.s3_access_key,
        "CUNEIFORM_S3_SECRET_KEY": connection.s3_secret_key,
        "CUNEIFORM_S3_REGION": connection.s3_region,
        "CUNEIFORM_S3_BUCKET": connection.s3_bucket,
    }
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """``cuneiform-<service>`` in a subprocess, configured by environment only, as deployed."""

    def __init__(self, service: str, connection: ConnectionSettings, log_dir: Path, **settings: Any) -> None:
        self.service = service
        self.port = _free_port()
        self.log_path = log_dir / f"{service}-{uuid.uuid4().hex[:6]}.log"
        upper = service.upper().replace("-", "_")
        env = deployment_env(connection, env_file=log_dir / "no-such-stack.env")
        env[f"CUNEIFORM_{upper}_METRICS_PORT"] = str(self.port)
        env[f"CUNEIFORM_{upper}_LOG_JSON"] = "true"
        env.update({f"CUNEIFORM_{upper}_{k.upper()}": str(v) for k, v in settings.items()})
        script = Path(sys.executable).parent / f"cuneiform-{service}"
        module = f"cuneiform_{service.replace('-', '_')}.main"
        command = [str(script)] if script.is_file() else [sys.executable, "-c", f"import {module} as m; m.main()"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    async def readyz(self) -> int | None:
        return await asyncio.to_thread(http_status, f"http://{LOOPBACK}:{self.port}/readyz", "GET", 3.0)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        async def ready() -> bool:
            assert self.alive, f"{self.service} exited with {self.process.returncode}:\n{self.log_tail()}"
            return await self.readyz() == 200

        await eventually(ready, timeout=timeout, what=f"{self.service} /readyz 200")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        """The last log lines, one short line per JSON record (asyncpg's tracebacks left out)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        short = []
        for line in text.splitlines()[-lines:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                short.append(line[:300])
                continue
            details = " ".join(
                f"{k}={str(v)[:160]}"
                for k, v in record.items()
                if k not in ("event", "timestamp", "level", "logger", "service", "exception")
            )
            short.append(f"{record.get('timestamp', '')} {record.get('level', '')} {record.get('event', '')} {details}")
        return "\n".join(short)

    def log_events(self) -> Counter[str]:
        """How often each structured log event occurred (``consumer.transient_failure``, …)."""
        found: Counter[str] = Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                found[json.loads(line).get("event", "?")] += 1
            except (json.JSONDecodeError, AttributeError):
                continue
        return found


async def metric(process: ServiceProcess, name: str, **labels: str) -> float:
    """The sum of a metric's samples matching ``labels`` on the process's /metrics (0 when absent)."""
    url = f"http://{LOOPBACK}:{process.port}/metrics"

    def read() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in (await asyncio.to_thread(read)).splitlines():
        if line.startswith(name + "{"):
            found = line[len(name) + 1 : line.index("}")]
            if all(part in found.split(",") for part in wanted.split(",") if part):
                total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + " ") and not wanted:
            total += float(line.rsplit(" ", 1)[1])
    return total
