"""The agent-side outbox: events that could not be delivered wait on local disk.

Events are spilled in segments — one file per spill, written to a temporary name, fsynced and
renamed, so a crash leaves either a whole segment or none. A segment is deleted only after every
event in it is acknowledged by the stream; replaying one twice is harmless because each event keeps
its ``Nats-Msg-Id`` and the stream drops duplicates. One process owns an outbox directory at a time
(an advisory file lock), so two agents never replay each other's events.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO


@dataclass(frozen=True, slots=True)
class OutgoingEvent:
    """One event ready for the wire."""

    subject: str
    msg_id: str
    payload: bytes
    trajectory_id: str
    #: A trajectory_ended event: published only after every earlier event of its trajectory is acked.
    is_end: bool = False

    def to_line(self) -> str:
        return json.dumps(
            {
                "subject": self.subject,
                "msg_id": self.msg_id,
                "trajectory_id": self.trajectory_id,
                "is_end": self.is_end,
                "payload": base64.b64encode(self.payload).decode(),
            }
        )

    @classmethod
    def from_line(cls, line: str) -> OutgoingEvent:
        data = json.loads(line)
        return cls(
            subject=data["subject"],
            msg_id=data["msg_id"],
            payload=base64.b64decode(data["payload"]),
            trajectory_id=data["trajectory_id"],
            is_end=data["is_end"],
        )


class OutboxLockedError(RuntimeError):
    """The outbox directory belongs to another live Recorder (in this process or another one)."""


class DiskOutbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file: IO[str] | None = None
        self._counter = 0

    def lock(self) -> None:
        handle = (self.directory / ".lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise OutboxLockedError(
                f"outbox {self.directory} is in use by another process; give each agent process its own "
                "outbox directory (Recorder(outbox_dir=...) or CUNEIFORM_OUTBOX_DIR)"
            ) from None
        self._lock_file = handle
        # A spill interrupted by a crash leaves only its temporary file: never a part of a segment.
        for partial in self.directory.glob("segment-*.tmp"):
            partial.unlink(missing_ok=True)

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def spill(self, events: Iterable[OutgoingEvent]) -> Path | None:
        lines = [event.to_line() for event in events]
        if not lines:
            return None
        self._counter += 1
        final = self.directory / f"segment-{time.time_ns():020d}-{self._counter:06d}.jsonl"
        temporary = final.with_suffix(".tmp")
        with temporary.open("w") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        temporary.rename(final)
        directory_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)  # make the rename itself durable
        finally:
            os.close(directory_fd)
        return final

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("segment-*.jsonl"))

    @staticmethod
    def read(segment: Path) -> list[OutgoingEvent]:
        return [OutgoingEvent.from_line(line) for line in segment.read_text().splitlines() if line.strip()]

    @staticmethod
    def remove(segment: Path) -> None:
        segment.unlink(missing_ok=True)

    @staticmethod
    def quarantine(segment: Path) -> Path:
        """Set aside a segment that cannot be read (kept for a person to look at, never replayed)."""
        target = segment.with_suffix(".bad")
        segment.rename(target)
        return target

    def pending_count(self) -> int:
        return sum(len(self.read(segment)) for segment in self.segments())
