"""What every server launcher shares: spawn on free ports, wait until it answers, stop in stages."""

from __future__ import annotations

import os
import signal
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cuneiform_stack.errors import ServerExitedError, StackError
from cuneiform_stack.process import PortAllocator, ProcessRef, ServerLog, stop_process, wait_until_ready

Ports = Mapping[str, int]

#: Port conflicts are retried on fresh ports this many times: a free port can be taken between the check
#: and the server's bind, e.g. by another stack starting at the same moment.
_START_ATTEMPTS = 3


@dataclass(frozen=True)
class ServerRecord:
    """A server as the state file remembers it: its ports always, its process while it runs."""

    name: str
    ports: Mapping[str, int]
    process: ProcessRef | None = None

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def to_json(self) -> dict[str, Any]:
        proc = self.process
        return {
            "ports": dict(self.ports),
            "pid": proc.pid if proc else None,
            "create_time": proc.create_time if proc else None,
        }

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> ServerRecord:
        pid, create_time = data.get("pid"), data.get("create_time")
        proc = ProcessRef(int(pid), float(create_time)) if pid and create_time else None
        return cls(name, {k: int(v) for k, v in data.get("ports", {}).items()}, proc)


@dataclass
class ServerLauncher(ABC):
    """Starts one kind of server as a subprocess under ``data_dir`` and knows how to check and stop it."""

    name: ClassVar[str]
    port_names: ClassVar[tuple[str, ...]]
    #: Signals sent in turn on stop, each followed by a grace period.
    stop_signals: ClassVar[tuple[signal.Signals, ...]] = (signal.SIGTERM, signal.SIGKILL)
    start_timeout: ClassVar[float] = 30.0

    data_dir: Path
    log: ServerLog
    # Our own children, kept so that they are reaped and Popen does not warn about them.
    _children: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict, init=False, repr=False)

    @abstractmethod
    def command(self, ports: Ports) -> list[str]:
        """The server's command line."""

    @abstractmethod
    def is_ready(self, ports: Ports) -> bool:
        """Whether the server answers (cheap; polled while starting)."""

    @abstractmethod
    def url(self, ports: Ports) -> str:
        """Where clients connect."""

    def prepare(self) -> None:
        """One-off work before the first spawn: directories, initdb, repair."""
        return None

    def start_message(self) -> str:
        return f"starting {self.name}…"

    def spawn_options(self) -> dict[str, Any]:
        """Extra ``subprocess.Popen`` keyword arguments (env, user, cwd)."""
        return {}

    def after_ready(self, ports: Ports) -> None:
        """Work once the server answers and before anyone else is told where it is."""
        return None

    def is_healthy(self, ports: Ports) -> bool:
        return self.is_ready(ports)

    def describe(self, ports: Ports) -> str:
        """Anything a user needs besides the URL (a second port, credentials)."""
        return ""

    def start(self, allocator: PortAllocator, previous: Ports | None = None) -> ServerRecord:
        """Start the server, on its previous ports when they are free; return once it answers."""
        self.prepare()
        for attempt in range(1, _START_ATTEMPTS + 1):
            wanted = previous if attempt == 1 else None
            ports = {name: allocator.claim((wanted or {}).get(name)) for name in self.port_names}
            try:
                return self._start_on(ports)
            except ServerExitedError as error:
                if not error.port_conflict or attempt == _START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _start_on(self, ports: Ports) -> ServerRecord:
        command = self.command(ports)
        log_file, offset = self.log.open_for_start(command)
        with log_file:
            try:
                child = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    # Its own session: the server outlives `cuneiform-stack up` and ignores the terminal's Ctrl-C.
                    start_new_session=True,
                    **self.spawn_options(),
                )
            except OSError as error:
                raise StackError(f"could not run {command[0]}: {error}; run `make install`") from error
        self._children[child.pid] = child
        ref = ProcessRef.of(child.pid)
        try:
            wait_until_ready(self.name, lambda: self.is_ready(ports), child, self.log, offset, self.start_timeout)
            self.after_ready(ports)
        except BaseException:
            self.stop(ServerRecord(self.name, ports, ref))
            raise
        return ServerRecord(self.name, ports, ref)

    def stop(self, record: ServerRecord) -> None:
        if record.process is not None:
            stop_process(record.process, self.stop_signals)
            child = self._children.pop(record.process.pid, None)
            if child is not None:
                child.wait(5)  # already reaped by stop_process; this settles Popen's own bookkeeping


def child_env(**overrides: str) -> dict[str, str]:
    """Our environment minus libpq's PG* variables (a developer's PGHOST must not redirect our tools)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(overrides)
    return env
