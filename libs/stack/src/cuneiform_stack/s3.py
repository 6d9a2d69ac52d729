"""An S3 endpoint: moto in server mode, its state kept across restarts by replaying a request recording."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cuneiform_stack.errors import StackError
from cuneiform_stack.launcher import Ports, ServerLauncher, child_env
from cuneiform_stack.process import LOOPBACK, http_status

ACCESS_KEY = "cuneiform"
SECRET_KEY = "cuneiform-secret"
REGION = "us-east-1"
BUCKET = "cuneiform"

_MUTATING_METHODS = frozenset({"PUT", "POST", "DELETE"})


@dataclass
class S3Launcher(ServerLauncher):
    name: ClassVar[str] = "s3"
    port_names: ClassVar[tuple[str, ...]] = ("s3",)
    # The replay goes through moto's HTTP front door one request at a time: allow for a big recording.
    replay_timeout: ClassVar[float] = 600.0

    @property
    def recording(self) -> Path:
        return self.data_dir / "s3" / "recording.jsonl"

    def start_message(self) -> str:
        size = self.recording.stat().st_size if self.recording.is_file() else 0
        if size:
            return f"starting s3 (moto; replaying {_human_size(size)} of recorded writes)…"
        return "starting s3 (moto)…"

    def prepare(self) -> None:
        self.recording.parent.mkdir(parents=True, exist_ok=True)
        compact_recording(self.recording)

    def command(self, ports: Ports) -> list[str]:
        return [sys.executable, "-m", "cuneiform_stack._moto_server", "-H", LOOPBACK, "-p", str(ports["s3"])]

    def spawn_options(self) -> dict[str, Any]:
        return {
            "env": child_env(MOTO_ENABLE_RECORDING="true", MOTO_RECORDER_FILEPATH=str(self.recording)),
        }

    def is_ready(self, ports: Ports) -> bool:
        return http_status(f"{self.url(ports)}/moto-api/") == 200

    def after_ready(self, ports: Ports) -> None:
        if self.recording.is_file() and self.recording.stat().st_size:
            self._replay(ports)
        self._ensure_bucket(ports)

    def is_healthy(self, ports: Ports) -> bool:
        return http_status(f"{self.url(ports)}/{BUCKET}", method="HEAD") == 200

    def describe(self, ports: Ports) -> str:
        return f"bucket {BUCKET}, key {ACCESS_KEY} / {SECRET_KEY}"

    def url(self, ports: Ports) -> str:
        return f"http://{self.endpoint(ports)}"

    def endpoint(self, ports: Ports) -> str:
        """host:port, the form the minio client takes."""
        return f"{LOOPBACK}:{ports['s3']}"

    def _replay(self, ports: Ports) -> None:
        # moto stops recording while it replays, so the replay does not append to the file it reads.
        status = http_status(
            f"{self.url(ports)}/moto-api/recorder/replay-recording", method="POST", timeout=self.replay_timeout
        )
        if status != 200:
            raise StackError(
                f"replaying the S3 recording {self.recording} failed (HTTP {status}); see {self.log.path}. "
                "To start with an empty object store instead, move that file away."
            )

    def _ensure_bucket(self, ports: Ports) -> None:
        from minio import Minio

        client = Minio(self.endpoint(ports), ACCESS_KEY, SECRET_KEY, secure=False, region=REGION)
        if not client.bucket_exists(BUCKET):
            client.make_bucket(BUCKET)


def compact_recording(path: Path) -> None:
    """Drop reads and any torn last line (a server killed mid-append) so that the replay runs cleanly."""
    if not path.is_file():
        return
    kept: list[str] = []
    changed = False
    with path.open(encoding="utf-8") as recording:
        for line in recording:
            if _is_replayable(line):
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                changed = True
    if changed:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)


def _is_replayable(line: str) -> bool:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(entry, dict) and entry.get("method") in _MUTATING_METHODS


def _human_size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{max(1, size // 2**10)} KiB"
