"""The raw archive's segment format: what goes in comes back out, keys follow the sequence range,
and the index tells complete segments from interrupted writes."""

from __future__ import annotations

import hashlib
import json

import orjson
import pytest
import zstandard
from cuneiform_archiver.segments import ArchiveIndex, SegmentBuilder, manifest_key, read_segment, segment_key


def event(n: int) -> bytes:
    return json.dumps({"v": 1, "type": "step", "n": n, "text": "é ✓ \u2028"}, separators=(",", ":")).encode()


def test_a_segment_round_trips_every_message_and_describes_itself() -> None:
    builder = SegmentBuilder("TRAJECTORIES", start_seq=11)
    builder.add(11, 1_000, "traj.a.step", event(1), msg_id="m1")
    builder.add(12, 2_000, "traj.a.step", b"{not json", msg_id="m2")  # kept as bytes, like the stream
    builder.add(15, 3_000, "traj.b.step", b'{\n  "pretty": true\n}', headers={"Nats-Msg-Id": "m3", "x-agent": "ts"})
    claimed = b'{"v":1,"type":"llm_call","big":"' + b"x" * 100 + b'"}'
    builder.add(16, 4_000, "traj.b.llm_call", b'{"payload_ref":{}}', payload=claimed)
    sealed = builder.seal()

    assert (
        sealed.key
        == segment_key("TRAJECTORIES", 11, 16)
        == "archive/TRAJECTORIES/00000000000000000011-00000000000000000016.jsonl.zst"
    )
    assert sealed.manifest_key == manifest_key("TRAJECTORIES", 11, 16)
    manifest = orjson.loads(sealed.manifest_bytes)
    assert manifest["count"] == 4
    assert (manifest["first_seq"], manifest["last_seq"]) == (11, 16)
    assert manifest["gaps"] == [[13, 14]]
    assert manifest["sha256"] == hashlib.sha256(sealed.body).hexdigest()
    assert manifest["bytes"] == len(sealed.body)
    assert manifest["first_ts_ns"] == 1_000 and manifest["last_ts_ns"] == 4_000
    assert manifest["claim_checks"] == 1
    # The body is standard zstd JSONL: readable without our code.
    lines = zstandard.ZstdDecompressor().decompressobj().decompress(sealed.body).splitlines()
    assert len(lines) == 4 and all(isinstance(json.loads(line), dict) for line in lines)

    messages = list(read_segment(sealed.body))
    assert [m.seq for m in messages] == [11, 12, 15, 16]
    assert event(1) in lines[0]  # the segment holds compact JSON exactly as published ...
    assert orjson.loads(messages[0].body) == orjson.loads(event(1))  # ... and replays the same JSON
    assert messages[0].msg_id == "m1"
    assert messages[1].data is None and messages[1].body == b"{not json"
    assert messages[2].data == {"pretty": True} and messages[2].headers == {"x-agent": "ts"}
    assert messages[3].event == orjson.loads(claimed)


def test_messages_must_come_once_and_in_order() -> None:
    builder = SegmentBuilder("S", start_seq=1)
    builder.add(1, 1, "traj.a.step", event(1))
    with pytest.raises(ValueError, match="not after"):
        builder.add(1, 2, "traj.a.step", event(1))
    with pytest.raises(ValueError, match="empty"):
        SegmentBuilder("S", start_seq=5).seal()


def test_the_index_separates_segments_from_interrupted_writes_and_finds_holes() -> None:
    keys = [
        segment_key("S", 1, 100),
        manifest_key("S", 1, 100),
        segment_key("S", 101, 180),
        manifest_key("S", 101, 180),
        segment_key("S", 251, 300),  # 181-250 missing: a deleted segment
        manifest_key("S", 251, 300),
        segment_key("S", 301, 320),  # no manifest: the writer died between the two puts
        "archive/S/unrelated.txt",
    ]
    index = ArchiveIndex.from_keys("S", keys)
    assert [(s.first_seq, s.last_seq) for s in index.segments] == [(1, 100), (101, 180), (251, 300)]
    assert index.orphans == [segment_key("S", 301, 320)]
    assert index.resume_after == 300
    assert index.chain_breaks() == [(181, 250)]
    assert index.contiguous_through() == 180
    assert ArchiveIndex.from_keys("S", []).resume_after == 0
