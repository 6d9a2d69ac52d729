"""The raw archive's on-disk format: zstd-compressed JSONL segments and their manifests.

A segment covers a range of stream sequences ``[first_seq, last_seq]`` of the TRAJECTORIES stream and
holds every message the stream had in that range, one JSON object per line, in sequence order::

    {"seq": 1042, "ts": 1764000000123456789, "subject": "traj.a1.step", "msg_id": "…", "data": {…event…}}

``data`` is the event exactly as published when it is compact JSON (a non-JSON message is kept as
``data_b64``, so even bytes the recorder dead-lettered stay in the cold copy). A claim-checked event
also carries the body it points at (``payload``), so the archive does not depend on the payloads
bucket's TTL. Sequences of the range the stream no longer had (deleted or expired before archiving)
are listed in the manifest's ``gaps``.

Keys derive from the range only (``archive/<stream>/<first>-<last>.jsonl.zst``, zero-padded so that a
listing is in sequence order): a retried write lands on the same key. The manifest
(``….manifest.json``: count, range, gaps, first/last stream time, sha256 and sizes) is written after the
segment is stored and verified, so a segment without a manifest is an interrupted write, never data.
Consecutive segments chain: each starts right after the previous one's ``last_seq``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import zstandard

FORMAT_VERSION = 1
ROOT = "archive"
_KEY = re.compile(r"/(\d{20})-(\d{20})\.(jsonl\.zst|manifest\.json)$")


def stream_prefix(stream: str) -> str:
    return f"{ROOT}/{stream}/"


def segment_key(stream: str, first_seq: int, last_seq: int) -> str:
    return f"{stream_prefix(stream)}{first_seq:020d}-{last_seq:020d}.jsonl.zst"


def manifest_key(stream: str, first_seq: int, last_seq: int) -> str:
    return f"{stream_prefix(stream)}{first_seq:020d}-{last_seq:020d}.manifest.json"


def iso_ns(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


# --- writing -------------------------------------------------------------------------------------------


@dataclass
class Sealed:
    """A segment ready to store: compressed body, manifest, and their keys."""

    key: str
    manifest_key: str
    body: bytes
    manifest: dict[str, Any]
    first_seq: int
    last_seq: int
    count: int

    @property
    def manifest_bytes(self) -> bytes:
        return orjson.dumps(self.manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


@dataclass
class SegmentBuilder:
    """Collects consecutive stream messages for one segment, starting at ``start_seq``."""

    stream: str
    start_seq: int
    zstd_level: int = 3
    lines: list[bytes] = field(default_factory=list)
    raw_bytes: int = 0
    last_seq: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    gaps: list[list[int]] = field(default_factory=list)
    claim_checks: int = 0

    def __post_init__(self) -> None:
        self.last_seq = self.start_seq - 1

    @property
    def count(self) -> int:
        return len(self.lines)

    def add(
        self,
        seq: int,
        ts_ns: int,
        subject: str,
        data: bytes,
        *,
        msg_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        payload: bytes | None = None,
        payload_error: str | None = None,
    ) -> None:
        if seq <= self.last_seq:
            raise ValueError(f"sequence {seq} is not after {self.last_seq}: segments hold each message once, in order")
        if seq > self.last_seq + 1:
            self.gaps.append([self.last_seq + 1, seq - 1])
        head: dict[str, Any] = {"seq": seq, "ts": ts_ns, "subject": subject}
        if msg_id is not None:
            head["msg_id"] = msg_id
        extra_headers = {k: v for k, v in (headers or {}).items() if k != "Nats-Msg-Id"}
        if extra_headers:
            head["headers"] = extra_headers
        if payload_error is not None:
            head["payload_error"] = payload_error
        line = orjson.dumps(head)[:-1] + b"," + _field(b"data", data)
        if payload is not None:
            line += b"," + _field(b"payload", payload)
            self.claim_checks += 1
        line += b"}\n"
        self.lines.append(line)
        self.raw_bytes += len(line)
        self.last_seq = seq
        self.first_ts = ts_ns if self.first_ts is None else self.first_ts
        self.last_ts = ts_ns

    def seal(self, written_at: datetime | None = None) -> Sealed:
        """Compress and describe the segment (CPU-bound: run it in a thread)."""
        if not self.lines:
            raise ValueError("an empty segment is never written")
        raw = b"".join(self.lines)
        body = zstandard.ZstdCompressor(level=self.zstd_level).compress(raw)
        first, last = self.start_seq, self.last_seq
        manifest = {
            "format": FORMAT_VERSION,
            "stream": self.stream,
            "key": segment_key(self.stream, first, last),
            "first_seq": first,
            "last_seq": last,
            "count": len(self.lines),
            "gaps": self.gaps,
            "first_time": iso_ns(self.first_ts or 0),
            "last_time": iso_ns(self.last_ts or 0),
            "first_ts_ns": self.first_ts,
            "last_ts_ns": self.last_ts,
            "claim_checks": self.claim_checks,
            "compression": {"codec": "zstd", "level": self.zstd_level},
            "bytes": len(body),
            "raw_bytes": len(raw),
            "sha256": hashlib.sha256(body).hexdigest(),
            "written_at": (written_at or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        }
        return Sealed(
            key=segment_key(self.stream, first, last),
            manifest_key=manifest_key(self.stream, first, last),
            body=body,
            manifest=manifest,
            first_seq=first,
            last_seq=last,
            count=len(self.lines),
        )


def _field(name: bytes, data: bytes) -> bytes:
    """``"name":<value>`` — the JSON itself when it is one compact line, else base64."""
    if b"\n" not in data and b"\r" not in data:
        try:
            orjson.loads(data)
            return b'"' + name + b'":' + data
        except orjson.JSONDecodeError:
            pass
    else:
        try:
            return b'"' + name + b'":' + orjson.dumps(orjson.loads(data))
        except orjson.JSONDecodeError:
            pass
    return b'"' + name + b'_b64":"' + base64.b64encode(data) + b'"'


# --- reading -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchivedMessage:
    seq: int
    ts_ns: int
    subject: str
    msg_id: str | None
    headers: dict[str, str]
    #: The event as a JSON value, or None when the message was not JSON (then ``raw`` holds it).
    data: Any
    raw: bytes | None
    payload: Any = None
    payload_error: str | None = None

    @property
    def body(self) -> bytes:
        """The message as it can be published again (the same JSON, compact)."""
        return self.raw if self.raw is not None else orjson.dumps(self.data)

    @property
    def event(self) -> Any:
        """The full event: the claim-checked body when there is one, else the message."""
        return self.payload if self.payload is not None else self.data


def read_segment(body: bytes) -> Iterator[ArchivedMessage]:
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(body)
    for line in raw.splitlines():
        if not line:
            continue
        d = orjson.loads(line)
        payload = d.get("payload")
        if payload is None and "payload_b64" in d:
            payload = orjson.loads(base64.b64decode(d["payload_b64"]))
        yield ArchivedMessage(
            seq=d["seq"],
            ts_ns=d["ts"],
            subject=d["subject"],
            msg_id=d.get("msg_id"),
            headers=d.get("headers") or {},
            data=d.get("data"),
            raw=base64.b64decode(d["data_b64"]) if "data_b64" in d else None,
            payload=payload,
            payload_error=d.get("payload_error"),
        )


@dataclass(frozen=True)
class SegmentRef:
    first_seq: int
    last_seq: int
    key: str
    manifest_key: str | None


@dataclass
class ArchiveIndex:
    """What a listing of ``archive/<stream>/`` says: complete segments and interrupted writes."""

    stream: str
    segments: list[SegmentRef]
    #: Segment bodies without a manifest (a crash between the two writes): not archive data.
    orphans: list[str]

    @classmethod
    def from_keys(cls, stream: str, keys: list[str]) -> ArchiveIndex:
        bodies: dict[tuple[int, int], str] = {}
        manifests: dict[tuple[int, int], str] = {}
        for key in keys:
            match = _KEY.search(key)
            if not match:
                continue
            span = (int(match.group(1)), int(match.group(2)))
            (bodies if match.group(3) == "jsonl.zst" else manifests)[span] = key
        complete = [span for span in sorted(bodies) if span in manifests]
        segments = [SegmentRef(a, b, bodies[(a, b)], manifests[(a, b)]) for a, b in complete]
        orphans = [bodies[span] for span in sorted(bodies) if span not in manifests]
        return cls(stream, segments, orphans)

    @property
    def resume_after(self) -> int:
        """The last stream sequence archived (0 when nothing is)."""
        return max((s.last_seq for s in self.segments), default=0)

    def chain_breaks(self) -> list[tuple[int, int]]:
        """Ranges no segment covers between the first and the last segment (a deleted segment)."""
        breaks = []
        for previous, current in zip(self.segments, self.segments[1:], strict=False):
            if current.first_seq != previous.last_seq + 1:
                breaks.append((previous.last_seq + 1, current.first_seq - 1))
        return breaks

    def contiguous_through(self) -> int:
        """Every sequence from 1 to this one lies in some segment's range (0: none)."""
        through = 0
        for segment in self.segments:
            if segment.first_seq > through + 1:
                break
            through = max(through, segment.last_seq)
        return through

    def overlapping(
        self, since_ns: int | None, until_ns: int | None, manifests: Mapping[str, dict[str, Any]]
    ) -> list[SegmentRef]:
        """Segments whose stream-time span meets ``[since, until]`` (manifests already loaded)."""
        chosen = []
        for segment in self.segments:
            manifest = manifests[segment.key]
            first, last = manifest["first_ts_ns"], manifest["last_ts_ns"]
            if (until_ns is None or first <= until_ns) and (since_ns is None or last >= since_ns):
                chosen.append(segment)
        return chosen
