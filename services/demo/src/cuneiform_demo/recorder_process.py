"""A service (``cuneiform-recorder``, ``cuneiform-archiver``) as a child process, configured by
environment only, as it is deployed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cuneiform_stack.process import LOOPBACK, PortAllocator, ServerLog

from .console import DemoError, shown


def service_command(service: str = "recorder") -> list[str]:
    """The console script next to this Python, else the module through this interpreter."""
    script = Path(sys.executable).parent / f"cuneiform-{service}"
    if script.is_file():
        return [str(script)]
    module = f"cuneiform_{service.replace('-', '_')}.main"
    return [sys.executable, "-c", f"from {module} import main; main()"]


class ServiceProcess:
    def __init__(self, env: dict[str, str], log_path: Path, service: str = "recorder") -> None:
        self.service = service
        self.port = PortAllocator().claim()
        self.log = ServerLog(log_path)
        upper = service.upper().replace("-", "_")
        self.env = {
            **env,
            f"CUNEIFORM_{upper}_METRICS_PORT": str(self.port),
            f"CUNEIFORM_{upper}_LOG_LEVEL": "WARNING",
            f"CUNEIFORM_{upper}_LOG_JSON": "true",
        }
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        command = service_command(self.service)
        log_file, self._log_offset = self.log.open_for_start(command)
        with log_file:
            # Its own session: a Ctrl-C in the terminal reaches the demo, which then stops the recorder
            # gracefully itself (and with --keep-running the recorder outlives the demo).
            self.process = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def readiness(self) -> tuple[int | None, str]:
        """The /readyz status and body (the failing checks when 503)."""
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.port}/readyz", timeout=1) as response:
                return int(response.status), response.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode(errors="replace")
        except (OSError, ValueError):
            return None, ""

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /readyz answered 200; raises DemoError with the log tail otherwise."""
        began = time.monotonic()
        status, body = None, ""
        while time.monotonic() - began < timeout:
            if not self.alive:
                assert self.process is not None
                raise DemoError(
                    f"the {self.service} exited with status {self.process.returncode} while starting; "
                    f"last lines of {shown(self.log.path)}:\n{self.log_tail()}\n"
                    "Fix what the log says (its settings come from CUNEIFORM_<SERVICE>_* variables) and run again."
                )
            status, body = self.readiness()
            if status == 200:
                return time.monotonic() - began
            time.sleep(0.1)
        self.stop()
        checks = ""
        if body:
            try:
                failing = [name for name, ok in json.loads(body).get("checks", {}).items() if not ok]
                checks = f" (failing checks: {', '.join(failing)})" if failing else ""
            except (json.JSONDecodeError, AttributeError):
                pass
        answer = f"answered {status}{checks}" if status else "never answered"
        raise DemoError(
            f"the {self.service} was not ready within {timeout:g} s: {self.metrics_url.replace('/metrics', '/readyz')} "
            f"{answer}. Last lines of {shown(self.log.path)}:\n{self.log_tail()}\n"
            "Check that the stack is healthy (`cuneiform-stack status`) or raise --ready-timeout."
        )

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM (the recorder commits and acks what it holds), SIGKILL if it takes too long."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def metric(self, name: str) -> float:
        """One unlabelled sample of the process's /metrics (0 when absent or unreachable)."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                for line in response.read().decode().splitlines():
                    if line.startswith(name + " "):
                        return float(line.split()[1])
        except OSError:
            pass
        return 0.0

    def log_tail(self, lines: int = 20) -> str:
        return self.log.tail(self._log_offset, lines)

    def close_without_stopping(self) -> int | None:
        """Leave the recorder running on its own (--keep-running); returns its pid."""
        pid, self.process = self.pid, None
        return pid


def recorder_env(base: dict[str, str], stack_env: dict[str, str], env_file: Path) -> dict[str, str]:
    """The environment the recorder runs with: ours, then the stack's endpoints (and JetStream budget),
    its env file, and no subject prefix (the SDK in the demo publishes without one)."""
    return {**base, **stack_env, "CUNEIFORM_ENV_FILE": str(env_file), "CUNEIFORM_NATS_PREFIX": ""}


def current_env() -> dict[str, str]:
    return dict(os.environ)
