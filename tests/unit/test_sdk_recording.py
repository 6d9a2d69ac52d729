"""The agent SDK without servers: ids, the record calls and what they emit, the outbox on disk,
the held-back trajectory end, redaction, and what a record call costs."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cuneiform_sdk import Recorder, SyncRecorder
from cuneiform_sdk.contract import Envelope, LlmCall, TrajectoryEnded, dump_event, parse_event
from cuneiform_sdk.ids import uuid7
from cuneiform_sdk.outbox import DiskOutbox, OutboxLockedError, OutgoingEvent
from cuneiform_sdk.publisher import Publisher
from cuneiform_sdk.recorder import TrajectoryRecording
from cuneiform_sdk.subjects import trajectory_subject
from pydantic import ValidationError

# --- helpers -----------------------------------------------------------------------------------------


class Captured:
    """Stands in for the publisher: keeps what a trajectory submits, in order."""

    def __init__(self) -> None:
        self.events: list[Envelope] = []
        self.subjects: list[str] = []
        self.ends: list[bool] = []

    def __call__(self, event: Envelope, subject: str, is_end: bool) -> None:
        self.events.append(event)
        self.subjects.append(subject)
        self.ends.append(is_end)

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]


def trajectory(captured: Captured, **options: Any) -> TrajectoryRecording:
    return TrajectoryRecording(captured, agent_id=options.pop("agent_id", "trader-7"), model="qwen2.5-7b", **options)


def chat_call(t: TrajectoryRecording) -> str:
    return t.llm_call(
        messages=[{"role": "system", "content": "trade well"}, {"role": "user", "content": "price is 12"}],
        response={
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "buy", "arguments": '{"n": 1}'}}],
        },
        usage={"prompt_tokens": 12, "completion_tokens": 5},
        latency_ms=42.0,
    )


def unreachable_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"nats://127.0.0.1:{port}"  # nothing listens there once the socket is closed


# --- ids -----------------------------------------------------------------------------------------------


def test_uuid7_is_version_7_and_carries_the_current_time() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert before <= value.int >> 80 <= after
    assert uuid.UUID(str(value)) == value


def test_uuid7_is_unique_and_strictly_increasing_even_within_a_millisecond() -> None:
    ids = [uuid7() for _ in range(20_000)]  # many share a millisecond
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    first, later = uuid7(), None
    time.sleep(0.002)
    later = uuid7()
    assert (later.int >> 80) > (first.int >> 80)


def test_uuid7_differs_between_processes() -> None:
    code = "from cuneiform_sdk.ids import uuid7; print('\\n'.join(str(uuid7()) for _ in range(2000)))"
    outputs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    first, second = (set(o.split()) for o in outputs)
    assert len(first) == len(second) == 2000
    assert not first & second


# --- the record calls ------------------------------------------------------------------------------------


def test_seq_runs_from_started_to_ended_and_event_count_counts_them_all() -> None:
    captured = Captured()
    with trajectory(captured, scenario_id="market-open", environment={"cash": 1000}) as t:
        assert t.step(environment={"cash": 1000}, observation="market opened") == 0
        t.provider_access("prices", {"ACME": 12.0}, query={"symbol": "ACME"})
        call_id = chat_call(t)
        t.action("buy", {"symbol": "ACME", "n": 1}, success=True, llm_call_id=call_id)
        t.reward(1.5)
        assert t.step(observation="next") == 1
        t.reward(0.5, whole_trajectory=True)

    assert captured.types == [
        "trajectory_started", "step", "provider_access", "llm_call", "action", "reward", "step", "reward", "trajectory_ended",
    ]  # fmt: skip
    assert [e.seq for e in captured.events] == list(range(9))
    end = captured.events[-1]
    assert isinstance(end, TrajectoryEnded)
    assert end.status == "completed" and end.event_count == 9 and end.error is None
    assert end.total_reward == 2.0
    assert captured.ends == [False] * 8 + [True]
    assert len({e.event_id for e in captured.events}) == 9
    assert {e.trajectory_id for e in captured.events} == {t.trajectory_id}
    # step numbering: the reward after step 0 belongs to step 0, the trajectory-wide one to no step
    assert [getattr(e, "step", None) for e in captured.events[1:8]] == [0, 0, 0, 0, 0, 1, None]
    # each on its own subject, and every event survives the wire form unchanged
    assert captured.subjects[3] == trajectory_subject("trader-7", "llm_call") == "traj.trader-7.llm_call"
    for event in captured.events:
        assert parse_event(dump_event(event)) == event


def test_the_first_record_call_starts_the_trajectory_and_ids_are_time_ordered() -> None:
    captured = Captured()
    t = trajectory(captured)
    t.reward(1.0)
    t.end()
    assert captured.types == ["trajectory_started", "reward", "trajectory_ended"]
    assert captured.events[-1].event_count == 3  # type: ignore[attr-defined]
    assert [e.event_id for e in captured.events] == sorted(e.event_id for e in captured.events)
    # no scenario given: the group key is the UTC hour window the episode ran in
    assert captured.events[0].scenario_id == t.scenario_id  # type: ignore[attr-defined]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}", t.scenario_id)
    assert (
        abs(datetime.strptime(t.scenario_id, "%Y-%m-%dT%H").replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
        < 3700
    )


def test_prefix_and_unsafe_agent_ids_shape_the_subject() -> None:
    captured = Captured()
    with TrajectoryRecording(captured, agent_id="desk 4.alpha*", model="m", prefix="tn1") as t:
        t.step()
    token = captured.subjects[0].split(".")[2]
    assert captured.subjects[0] == f"tn1.traj.{token}.trajectory_started"
    assert token.startswith("h_") and "." not in token and "*" not in token
    assert captured.events[0].agent_id == "desk 4.alpha*"  # the id itself is kept in the body


async def test_a_block_that_raises_ends_failed_with_the_error_and_the_error_propagates() -> None:
    captured = Captured()
    with pytest.raises(ZeroDivisionError):
        async with trajectory(captured) as t:
            t.step(observation="about to fail")
            _ = 1 / 0
    end = captured.events[-1]
    assert isinstance(end, TrajectoryEnded)
    assert end.status == "failed"
    assert end.error == "ZeroDivisionError: division by zero"
    assert end.event_count == 3

    captured = Captured()
    with pytest.raises(KeyError), trajectory(captured) as t:  # the plain `with` form too
        raise KeyError("missing price")
    assert captured.events[-1].status == "failed"  # type: ignore[attr-defined]
    assert "missing price" in captured.events[-1].error  # type: ignore[attr-defined]


async def test_a_cancelled_block_ends_aborted() -> None:
    captured = Captured()

    async def agent() -> None:
        async with trajectory(captured) as t:
            t.step()
            await asyncio.sleep(10)

    task = asyncio.create_task(agent())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert captured.events[-1].status == "aborted"  # type: ignore[attr-defined]


def test_recording_after_the_end_raises() -> None:
    captured = Captured()
    with trajectory(captured) as t:
        t.step()
    with pytest.raises(RuntimeError, match="has ended"):
        t.step()
    with pytest.raises(RuntimeError, match="has ended"):
        t.reward(1.0)
    t.end()  # ending twice is harmless and sends nothing
    assert captured.types.count("trajectory_ended") == 1


def test_invalid_arguments_raise_at_the_call_site_and_leave_no_gap() -> None:
    captured = Captured()
    t = trajectory(captured)
    t.step()
    with pytest.raises(ValidationError, match="needs either `messages` and `response`"):
        t.llm_call(user_prompt="what now?")  # no response: neither form complete
    with pytest.raises(ValidationError):
        t.llm_call(messages=[{"role": "wizard", "content": "hi"}], response={"content": "x"})
    with pytest.raises(ValidationError):
        t.reward(math.nan)
    with pytest.raises(ValidationError):
        t.action("", success=True)
    with pytest.raises(ValidationError):
        t.step(-1)
    with pytest.raises(ValidationError):
        t.llm_call(user_prompt="q", response_text="a", usage={"prompt_tokens": -1, "completion_tokens": 0})
    t.llm_call(system_prompt="be brief", user_prompt="q", response_text="a")  # the simple form is fine
    assert t.current_step == 0  # the failed step(-1) did not move the step
    assert t.total_reward == 0.0  # nor did the NaN reward count
    t.end()
    # The failed calls sent nothing and took no seq: the count still proves completeness.
    assert [e.seq for e in captured.events] == list(range(4))
    assert captured.events[-1].event_count == 4  # type: ignore[attr-defined]


def test_recorded_values_are_a_snapshot_of_the_call() -> None:
    captured = Captured()
    t = trajectory(captured)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "first"}]
    environment = {"cash": 100, "positions": ["ACME"]}
    t.step(environment=environment)
    t.llm_call(messages=messages, response={"role": "assistant", "content": "ok"})
    messages.append({"role": "assistant", "content": "ok"})
    environment["positions"].append("INIT")
    environment["cash"] = 0
    assert captured.events[1].environment == {"cash": 100, "positions": ["ACME"]}  # type: ignore[attr-defined]
    assert len(captured.events[2].messages) == 1  # type: ignore[attr-defined]


def test_a_record_call_is_cheap() -> None:
    """Not a benchmark (no assertion on time): prints what a record call costs here."""
    captured = Captured()
    t = trajectory(captured)
    t.start()
    costs: dict[str, list[float]] = {"step": [], "llm_call": [], "action": []}
    for i in range(3000):
        started = time.perf_counter()
        t.step(environment={"cash": i}, observation="tick")
        costs["step"].append(time.perf_counter() - started)
        started = time.perf_counter()
        chat_call(t)
        costs["llm_call"].append(time.perf_counter() - started)
        started = time.perf_counter()
        t.action("buy", {"n": i}, success=True)
        costs["action"].append(time.perf_counter() - started)
    for name, values in costs.items():
        values.sort()
        print(
            f"{name}: median {values[len(values) // 2] * 1e6:.1f} µs, p99 {values[int(len(values) * 0.99)] * 1e6:.1f} µs"
        )
    assert len(captured.events) == 9001


# --- the outbox ---------------------------------------------------------------------------------------


def outgoing(n: int, trajectory_id: str = "t1", is_end: bool = False) -> OutgoingEvent:
    return OutgoingEvent(
        subject="traj.a.step",
        msg_id=str(uuid7()),
        payload=b'{"n": %d, "bytes": "\x00\xff"}' % n,
        trajectory_id=trajectory_id,
        is_end=is_end,
    )


def test_outbox_spill_read_remove_round_trip(tmp_path: Path) -> None:
    outbox = DiskOutbox(tmp_path / "outbox")
    first = [outgoing(i) for i in range(3)]
    second = [outgoing(9, is_end=True)]
    assert outbox.spill([]) is None
    one = outbox.spill(first)
    two = outbox.spill(second)
    assert outbox.segments() == [one, two]  # oldest first
    assert outbox.read(one) == first and outbox.read(two) == second  # bytes, ids and flags intact
    assert outbox.pending_count() == 4
    assert not list((tmp_path / "outbox").glob("*.tmp"))  # written whole, then renamed
    outbox.remove(one)
    assert outbox.segments() == [two]
    assert outbox.pending_count() == 1
    outbox.remove(one)  # removing twice is harmless


def test_outbox_sets_aside_an_unreadable_segment_and_clears_partial_writes(tmp_path: Path) -> None:
    outbox = DiskOutbox(tmp_path)
    good = outbox.spill([outgoing(1)])
    (tmp_path / "segment-00000000000000000001-000001.jsonl").write_text("{not json\n")
    (tmp_path / "segment-00000000000000000002-000001.tmp").write_text("half a segm")
    outbox.lock()
    try:
        assert not list(tmp_path.glob("*.tmp"))  # a crash mid-spill leaves nothing to replay
        bad = outbox.segments()[0]
        with pytest.raises(ValueError):
            outbox.read(bad)
        outbox.quarantine(bad)
        assert outbox.segments() == [good]
    finally:
        outbox.unlock()


def test_the_outbox_lock_refuses_a_second_recorder_in_this_process(tmp_path: Path) -> None:
    first = DiskOutbox(tmp_path)
    first.lock()
    try:
        with pytest.raises(OutboxLockedError, match=r"in use by another process.*own outbox directory"):
            DiskOutbox(tmp_path).lock()
    finally:
        first.unlock()
    second = DiskOutbox(tmp_path)
    second.lock()  # free again once released
    second.unlock()


def test_the_outbox_lock_refuses_a_second_process(tmp_path: Path) -> None:
    code = f"""
import sys
from pathlib import Path
from cuneiform_sdk.outbox import DiskOutbox, OutboxLockedError
try:
    DiskOutbox(Path({str(tmp_path)!r})).lock()
except OutboxLockedError as error:
    print(error)
    sys.exit(3)
"""
    outbox = DiskOutbox(tmp_path)
    outbox.lock()
    try:
        refused = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert refused.returncode == 3, refused.stderr
        assert str(tmp_path) in refused.stdout and "CUNEIFORM_OUTBOX_DIR" in refused.stdout
    finally:
        outbox.unlock()
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


async def test_a_second_recorder_on_one_outbox_is_refused_at_start(tmp_path: Path) -> None:
    url = unreachable_url()
    first = Recorder(url, outbox_dir=tmp_path)
    await first.start()
    try:
        with pytest.raises(OutboxLockedError):
            await Recorder(url, outbox_dir=tmp_path).start()
        with pytest.raises(OutboxLockedError):
            SyncRecorder(url, outbox_dir=tmp_path).start()
    finally:
        await first.close(timeout=0.1)


# --- the publisher without a server -------------------------------------------------------------------------


def make_publisher(tmp_path: Path, **options: Any) -> Publisher:
    return Publisher(unreachable_url(), DiskOutbox(tmp_path / "outbox"), **options)


def test_an_end_is_held_until_every_earlier_event_is_acknowledged(tmp_path: Path) -> None:
    publisher = make_publisher(tmp_path, batch_size=3)
    t = TrajectoryRecording(publisher.submit, agent_id="a", model="m")
    with t:
        for _ in range(4):
            t.step()
    # started + 4 steps queued; the end waits outside the queue
    first = publisher._take()
    second = publisher._take()
    assert [e.is_end for e in first + second] == [False] * 5
    assert publisher._take() == []
    for event in first + second[:1]:
        publisher._acked(event)
    assert publisher._take() == []  # one event still unacknowledged: the end stays held
    publisher._acked(second[1])
    (end,) = publisher._take()
    assert end.is_end and json.loads(end.payload)["event_count"] == 6


def test_close_without_a_server_keeps_everything_in_the_outbox_ends_last(tmp_path: Path) -> None:
    publisher = make_publisher(tmp_path)
    captured_ids = []
    for agent in ("a", "b"):
        t = TrajectoryRecording(publisher.submit, agent_id=agent, model="m")
        with t:
            t.step()
            t.reward(1.0)
        captured_ids.append(t.trajectory_id)
    asyncio.run(publisher.close())
    (segment,) = publisher._outbox.segments()
    events = DiskOutbox.read(segment)
    assert len(events) == 8
    assert [e.is_end for e in events] == [False] * 6 + [True] * 2
    assert {parse_event(e.payload).trajectory_id for e in events} == set(captured_ids)
    with pytest.raises(RuntimeError, match="closed"):
        publisher.submit(parse_event(events[0].payload), events[0].subject)


def test_redaction_applies_before_anything_leaves_the_process(tmp_path: Path) -> None:
    def redact(event: dict[str, Any]) -> dict[str, Any]:
        for message in event.get("messages") or []:
            if isinstance(message.get("content"), str):
                message["content"] = message["content"].replace("4111-1111", "[card]")
        event["seq"] = 999  # an overzealous hook may not touch the envelope
        return event

    publisher = make_publisher(tmp_path, redact=redact)
    t = TrajectoryRecording(publisher.submit, agent_id="a", model="m")
    t.llm_call(
        messages=[{"role": "user", "content": "pay with 4111-1111"}], response={"role": "assistant", "content": "done"}
    )
    batch = publisher._take()
    llm = parse_event(batch[1].payload)
    assert isinstance(llm, LlmCall)
    assert llm.messages is not None and llm.messages[0].content == "pay with [card]"
    assert llm.seq == 1  # envelope kept
    t.step(observation="again 4111-1111 in an observation the hook ignores")
    asyncio.run(publisher.close())
    spilled = b"".join(s.read_bytes() for s in publisher._outbox.segments())
    assert b"4111-1111" not in spilled.replace(b"again 4111-1111", b"")  # the outbox got the redacted body


def test_a_failing_redaction_hook_drops_the_event_but_never_raises_into_the_agent(tmp_path: Path) -> None:
    def redact(event: dict[str, Any]) -> dict[str, Any]:
        if event["type"] == "step":
            raise ValueError("hook bug")
        return event

    publisher = make_publisher(tmp_path, redact=redact)
    with TrajectoryRecording(publisher.submit, agent_id="a", model="m") as t:
        t.step()  # recorded fine from the agent's point of view
        t.reward(1.0)
    batch = publisher._take()
    assert [json.loads(e.payload)["type"] for e in batch] == ["trajectory_started", "reward"]
    assert publisher.stats.dropped == 1
    for event in batch:
        publisher._acked(event)
    (end,) = publisher._take()  # the dropped event does not hold the end back forever
    assert json.loads(end.payload)["event_count"] == 4  # and the count still says 4: incomplete, visibly


class FakeConnection:
    is_connected = True
    is_closed = False


async def test_an_interrupted_replay_neither_counts_an_event_twice_nor_releases_an_end_early(tmp_path: Path) -> None:
    """Replay of a spilled segment breaks off (disconnect) and resumes: events acknowledged the first
    time are not sent or counted again, so the held end waits for the one event still unacknowledged."""
    publisher = make_publisher(tmp_path)
    t = TrajectoryRecording(publisher.submit, agent_id="a", model="m")
    t.start()
    t.step()
    t.step()
    publisher._spill_buffer()  # the outage: started, step, step on disk
    t.end()  # recorded during the outage: held, three events outstanding
    assert publisher.pending() == 1 and publisher._take() == []

    connection = FakeConnection()
    publisher._nc = connection  # type: ignore[assignment]
    sent: list[list[int]] = []
    plans = iter([{0}, {1}])  # which seqs the server acknowledges in each round

    async def publish(batch: list[OutgoingEvent]) -> list[OutgoingEvent]:
        acked = next(plans)
        sent.append([json.loads(e.payload)["seq"] for e in batch])
        connection.is_connected = False  # the connection drops after this round
        return [e for e in batch if json.loads(e.payload)["seq"] not in acked]

    publisher._publish = publish  # type: ignore[method-assign]
    assert await publisher._replay_outbox() is False
    connection.is_connected = True
    assert await publisher._replay_outbox() is False
    assert sent == [[0, 1, 2], [1, 2]]  # seq 0 was not sent again
    assert publisher._take() == []  # seq 2 still unacknowledged: the end stays held
    assert len(publisher._outbox.segments()) == 1

    async def publish_all(batch: list[OutgoingEvent]) -> list[OutgoingEvent]:
        sent.append([json.loads(e.payload)["seq"] for e in batch])
        return []

    publisher._publish = publish_all  # type: ignore[method-assign]
    connection.is_connected = True
    assert await publisher._replay_outbox() is True
    assert sent[-1] == [2]
    assert publisher._outbox.segments() == []
    (end,) = publisher._take()
    assert json.loads(end.payload)["type"] == "trajectory_ended"
    assert publisher.stats.replayed == 3


def test_a_sync_recorder_left_open_keeps_its_events_at_interpreter_exit(tmp_path: Path) -> None:
    code = f"""
from cuneiform_sdk import SyncRecorder
recorder = SyncRecorder({unreachable_url()!r}, outbox_dir={str(tmp_path)!r}).start()
with recorder.trajectory(agent_id="forgetful", model="m") as t:
    t.step(observation="never closed")
"""  # and no recorder.close(): the interpreter just exits
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert time.monotonic() - started < 20
    assert DiskOutbox(tmp_path).pending_count() == 3
