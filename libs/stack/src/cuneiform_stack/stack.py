"""LocalStack: nats-server, PostgreSQL and an S3 endpoint under one data directory, on free loopback ports.

The state file ``<data>/stack.json`` remembers each server's ports and process, so that another process
(``cuneiform-stack down``, ``status``) finds a detached stack, and a restart gets its old ports back
when they are still free.
"""

from __future__ import annotations

import fcntl
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cuneiform_core.settings import STACK_ENV_FILE

from cuneiform_stack.errors import StackError
from cuneiform_stack.launcher import ServerLauncher, ServerRecord
from cuneiform_stack.nats import NatsLauncher
from cuneiform_stack.postgres import PostgresLauncher
from cuneiform_stack.process import PortAllocator, ServerLog
from cuneiform_stack.s3 import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, S3Launcher

Progress = Callable[[str], None]


@dataclass(frozen=True)
class StackEndpoints:
    """Where the stack's servers listen, with the credentials to use them."""

    nats_url: str
    nats_monitor_url: str
    pg_dsn: str
    s3_endpoint: str  # host:port, as the minio client takes it
    s3_access_key: str
    s3_secret_key: str
    s3_region: str
    s3_bucket: str
    #: JetStream storage the streams reserve together: small, since a laptop's disk is shared
    #: (production sizes it to the server's max_file_store).
    nats_storage_gib: float = 2.0

    def as_env(self) -> dict[str, str]:
        """The ``CUNEIFORM_*`` variables that ``cuneiform_core.settings.ConnectionSettings`` reads."""
        return {
            "CUNEIFORM_NATS_URL": self.nats_url,
            "CUNEIFORM_NATS_STORAGE_GIB": f"{self.nats_storage_gib:g}",
            "CUNEIFORM_PG_DSN": self.pg_dsn,
            "CUNEIFORM_S3_ENDPOINT": self.s3_endpoint,
            "CUNEIFORM_S3_ACCESS_KEY": self.s3_access_key,
            "CUNEIFORM_S3_SECRET_KEY": self.s3_secret_key,
            "CUNEIFORM_S3_SECURE": "false",
            "CUNEIFORM_S3_REGION": self.s3_region,
            "CUNEIFORM_S3_BUCKET": self.s3_bucket,
        }


@dataclass(frozen=True)
class ServerStatus:
    name: str
    url: str
    healthy: bool
    pid: int | None
    detail: str = ""


@dataclass(frozen=True)
class StackStatus:
    servers: tuple[ServerStatus, ...]
    endpoints: StackEndpoints | None
    env_file: Path | None

    @property
    def healthy(self) -> bool:
        return all(server.healthy for server in self.servers)


class LocalStack:
    """The embedded servers of one data directory. Several stacks in different directories coexist.

    Servers keep running after the process that started them exits; ``stop()`` (from any process)
    stops them. As a context manager it starts on entry and stops on exit.
    """

    def __init__(self, data_dir: Path, env_file: Path | None = None, progress: Progress | None = None) -> None:
        # Absolute: the state file is read from other working directories and servers run with other cwds.
        self.data_dir = data_dir.expanduser().absolute()
        self.env_file = (env_file or STACK_ENV_FILE).expanduser().absolute()
        self._progress_callback = progress
        self._progress_lock = threading.Lock()  # servers start and stop on parallel threads
        self._nats = NatsLauncher(self.data_dir, ServerLog(self.log_dir / "nats.log"))
        self._postgres = PostgresLauncher(self.data_dir, ServerLog(self.log_dir / "postgres.log"))
        self._s3 = S3Launcher(self.data_dir, ServerLog(self.log_dir / "s3.log"))
        self._launchers: dict[str, ServerLauncher] = {
            launcher.name: launcher for launcher in (self._nats, self._postgres, self._s3)
        }

    @property
    def state_file(self) -> Path:
        return self.data_dir / "stack.json"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def start(self) -> StackEndpoints:
        """Start whatever is not already running and healthy; write the state and env files."""
        with self._locked():
            records = self._read_state()
            running = {name: rec for name, rec in records.items() if self._is_up(rec)}
            for name in running:
                self._progress(f"{name} already running")
            stale = [rec for name, rec in records.items() if name not in running and rec.is_alive()]
            for record in stale:  # alive but not answering: replace it
                self._progress(f"{record.name} is not answering; restarting it")
                self._launchers[record.name].stop(record)
            to_start = [name for name in self._launchers if name not in running]
            started = self._start_all(to_start, records) if to_start else {}
            records = {**records, **running, **started}
            endpoints = self._endpoints(records)
            self._write_env_file(endpoints)
            self._write_state(records)
            return endpoints

    def stop(self) -> None:
        """Stop every server of this data directory, whichever process started them."""
        with self._locked():
            records = self._read_state()
            alive = [rec for rec in records.values() if rec.is_alive()]
            with ThreadPoolExecutor(max_workers=len(self._launchers)) as pool:
                for future in [pool.submit(self._stop_one, rec) for rec in alive]:
                    future.result()
            self._remove_env_file(records)
            self._write_state({name: ServerRecord(name, rec.ports) for name, rec in records.items()})

    def status(self) -> StackStatus:
        records = self._read_state()
        servers = tuple(self._server_status(name, records.get(name)) for name in self._launchers)
        all_running = all(server.pid is not None for server in servers)
        endpoints = self._endpoints(records) if all_running else None
        return StackStatus(servers, endpoints, self._recorded_env_file() if all_running else None)

    @property
    def endpoints(self) -> StackEndpoints:
        """The running stack's endpoints; raises StackError when it is not running."""
        records = self._read_state()
        missing = [name for name in self._launchers if not (name in records and records[name].is_alive())]
        if missing:
            raise StackError(
                f"the local stack in {self.data_dir} is not running ({', '.join(missing)} down); "
                "run `cuneiform-stack up`"
            )
        return self._endpoints(records)

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- starting and stopping ------------------------------------------------------------------------

    def _progress(self, message: str) -> None:
        if self._progress_callback is not None:
            with self._progress_lock:
                self._progress_callback(message)

    def _start_all(self, names: list[str], previous: Mapping[str, ServerRecord]) -> dict[str, ServerRecord]:
        """Start servers in parallel (initdb dominates); on any failure stop those started here."""
        allocator = PortAllocator()
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            futures = {name: pool.submit(self._start_one, name, allocator, previous.get(name)) for name in names}
        started: dict[str, ServerRecord] = {}
        errors: list[str] = []
        for name, future in futures.items():
            try:
                started[name] = future.result()
            except Exception as error:  # every failure is reported, and the others are stopped
                errors.append(f"{name}: {error}" if isinstance(error, StackError) else f"{name}: {error!r}")
        if errors:
            for record in started.values():
                self._stop_one(record)
            raise StackError("the local stack did not start:\n" + "\n".join(errors))
        return started

    def _start_one(self, name: str, allocator: PortAllocator, previous: ServerRecord | None) -> ServerRecord:
        launcher = self._launchers[name]
        self._progress(launcher.start_message())
        began = time.monotonic()
        record = launcher.start(allocator, previous.ports if previous else None)
        self._progress(f"{name} ready in {time.monotonic() - began:.1f} s")
        return record

    def _stop_one(self, record: ServerRecord) -> None:
        self._progress(f"stopping {record.name}…")
        self._launchers[record.name].stop(record)

    def _is_up(self, record: ServerRecord) -> bool:
        return record.is_alive() and self._launchers[record.name].is_healthy(record.ports)

    def _server_status(self, name: str, record: ServerRecord | None) -> ServerStatus:
        launcher = self._launchers[name]
        if record is None or not record.is_alive():
            url = launcher.url(record.ports) if record else ""
            return ServerStatus(name, url, healthy=False, pid=None, detail="not running")
        assert record.process is not None
        healthy = launcher.is_healthy(record.ports)
        detail = launcher.describe(record.ports) if healthy else f"not answering; see {launcher.log.path}"
        return ServerStatus(name, launcher.url(record.ports), healthy, record.process.pid, detail)

    def _endpoints(self, records: Mapping[str, ServerRecord]) -> StackEndpoints:
        nats_ports, s3_ports = records["nats"].ports, records["s3"].ports
        return StackEndpoints(
            nats_url=self._nats.url(nats_ports),
            nats_monitor_url=self._nats.monitor_url(nats_ports),
            pg_dsn=self._postgres.url(records["postgres"].ports),
            s3_endpoint=self._s3.endpoint(s3_ports),
            s3_access_key=ACCESS_KEY,
            s3_secret_key=SECRET_KEY,
            s3_region=REGION,
            s3_bucket=BUCKET,
        )

    # -- files ----------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One start or stop at a time per data directory, across processes."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with (self.data_dir / "stack.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read_state(self) -> dict[str, ServerRecord]:
        data = self._read_state_json()
        servers: dict[str, Any] = data.get("servers", {})
        return {name: ServerRecord.from_json(name, servers[name]) for name in self._launchers if name in servers}

    def _read_state_json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as error:
            raise StackError(f"cannot read {self.state_file} ({error}); remove it and run the command again") from error
        return data if isinstance(data, dict) else {}

    def _write_state(self, records: Mapping[str, ServerRecord]) -> None:
        state = {
            "version": 1,
            "data_dir": str(self.data_dir),
            "env_file": str(self.env_file),
            "servers": {name: record.to_json() for name, record in records.items()},
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def _recorded_env_file(self) -> Path:
        recorded = self._read_state_json().get("env_file")
        return Path(recorded) if recorded else self.env_file

    def _write_env_file(self, endpoints: StackEndpoints) -> None:
        self.env_file.parent.mkdir(parents=True, exist_ok=True)
        self.env_file.write_text(_env_file_text(endpoints))

    def _remove_env_file(self, records: Mapping[str, ServerRecord]) -> None:
        """Remove the env file on stop, unless it was since rewritten for another stack."""
        if set(self._launchers) - set(records):
            return
        env_file = self._recorded_env_file()
        try:
            if env_file.read_text() == _env_file_text(self._endpoints(records)):
                env_file.unlink()
        except FileNotFoundError:
            pass


def _env_file_text(endpoints: StackEndpoints) -> str:
    lines = [f"{key}={value}" for key, value in endpoints.as_env().items()]
    return "# Written by `cuneiform-stack up`; removed by `cuneiform-stack down`.\n" + "\n".join(lines) + "\n"
