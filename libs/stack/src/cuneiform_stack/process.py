"""Process plumbing shared by the launchers: free loopback ports, readiness polling, logs, stopping."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import psutil

from cuneiform_stack.errors import ServerExitedError, StackError

LOOPBACK = "127.0.0.1"


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``LOOPBACK:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The servers set SO_REUSEADDR too, so a port left in TIME_WAIT by a stopped server counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out free loopback ports, never the same one twice, to launchers running in parallel."""

    def __init__(self) -> None:
        self._claimed: set[int] = set()
        self._lock = threading.Lock()

    def claim(self, preferred: int | None = None) -> int:
        with self._lock:
            if preferred and preferred not in self._claimed and port_is_free(preferred):
                port = preferred
            else:
                port = self._fresh_port()
            self._claimed.add(port)
            return port

    def _fresh_port(self) -> int:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, 0))
                port = int(sock.getsockname()[1])
            if port not in self._claimed:
                return port
        raise StackError(f"could not find a free port on {LOOPBACK}; is the machine out of ephemeral ports?")


@dataclass(frozen=True)
class ServerLog:
    """A server's log file: appended to across restarts, with a header line per start."""

    path: Path

    def open_for_start(self, command: Sequence[str]) -> tuple[IO[bytes], int]:
        """Open the log for a new server process; returns the file and the offset where this start begins."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        log = self.path.open("ab")
        offset = log.tell()
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        log.write(f"=== {stamp} starting: {' '.join(command)}\n".encode())
        log.flush()
        return log, offset

    def tail(self, since: int = 0, lines: int = 25) -> str:
        try:
            with self.path.open("rb") as log:
                log.seek(since)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_until_ready(
    name: str,
    is_ready: Callable[[], bool],
    process: subprocess.Popen[bytes],
    log: ServerLog,
    log_offset: int,
    timeout: float,
) -> None:
    """Poll ``is_ready`` until it holds, the process dies, or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if process.poll() is not None:
            tail = log.tail(log_offset)
            raise ServerExitedError(
                f"{name} exited with status {process.returncode} while starting; last lines of "
                f"{log.path}:\n{_indent(tail)}",
                tail,
            )
        if is_ready():
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"{name} did not answer within {timeout:.0f} s; last lines of {log.path}:\n"
                f"{_indent(log.tail(log_offset))}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def http_status(url: str, method: str = "GET", timeout: float = 2.0) -> int | None:
    """The HTTP status ``url`` answers with, or None when nothing answers."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ProcessRef:
    """A process identified by pid and start time, so that a recycled pid is never mistaken for ours."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        return cls(pid, psutil.Process(pid).create_time())

    def process(self) -> psutil.Process | None:
        """The live process, or None when it has exited (a zombie counts as exited)."""
        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.create_time) > 0.01:
                return None
            if process.status() == psutil.STATUS_ZOMBIE:
                process.wait(0)  # our own child: reap it
                return None
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            return None
        except psutil.AccessDenied:
            return process
        return process

    def is_alive(self) -> bool:
        return self.process() is not None


def stop_process(ref: ProcessRef, signals: Iterable[signal.Signals], grace: float = 15.0) -> None:
    """Send each signal in turn, waiting ``grace`` seconds after each for the process to exit."""
    process = ref.process()
    if process is None:
        return
    for sig in signals:
        try:
            process.send_signal(sig)
            process.wait(grace)  # also reaps the process when it is our child
            return
        except psutil.NoSuchProcess:
            return
        except psutil.TimeoutExpired:
            continue
    raise StackError(f"process {ref.pid} did not exit after {', '.join(s.name for s in signals)}")


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines()) or "    (the log is empty)"
