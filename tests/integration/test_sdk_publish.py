"""The agent SDK against a real nats-server: every recorded event lands in TRAJECTORIES exactly once,
under its own Nats-Msg-Id and subject; a trajectory's end is stored after all its other events; a
payload over the broker's limit travels by claim check; synchronous agents record from threads."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from cuneiform_core.topology import TRAJECTORIES, Topology, ensure_topology
from cuneiform_sdk import Recorder, SyncRecorder
from cuneiform_sdk.contract import ClaimCheck, Envelope, LlmCall, TrajectoryEnded, parse_event
from cuneiform_sdk.subjects import trajectory_subject
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from tests.conftest import Servers

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Stored:
    """One message as the stream holds it."""

    stream_seq: int
    subject: str
    msg_id: str | None
    data: bytes

    def event(self) -> Envelope | ClaimCheck:
        return parse_event(self.data)


async def read_stream(js: JetStreamContext, stream: str) -> list[Stored]:
    """Every message of ``stream``, in stream order (an ephemeral pull consumer, no acks)."""
    info = await js.stream_info(stream)
    total = info.state.messages
    if total == 0:
        return []
    subjects = info.config.subjects or [">"]
    sub = await js.pull_subscribe(
        subjects[0],
        durable=None,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0, max_ack_pending=-1
        ),
    )
    stored: list[Stored] = []
    try:
        while len(stored) < total:
            for msg in await sub.fetch(min(1000, total - len(stored)), timeout=5):
                headers = msg.headers or {}
                stored.append(Stored(msg.metadata.sequence.stream, msg.subject, headers.get("Nats-Msg-Id"), msg.data))
    finally:
        await sub.unsubscribe()
    return sorted(stored, key=lambda s: s.stream_seq)


def check_exactly_once(
    stored: list[Stored], recorded: dict[uuid.UUID, int], prefix: str
) -> dict[uuid.UUID, list[Stored]]:
    """The stream holds each recorded event once: Nats-Msg-Id = event_id, subject traj.<agent>.<type>,
    seq 0..n-1 per trajectory, ``event_count`` = n, and the end stored after every other event.
    ``recorded`` is how many events each trajectory recorded. Returns the messages per trajectory."""
    ids = [s.msg_id for s in stored]
    assert len(ids) == len(set(ids)), "an event was stored twice"
    by_trajectory: dict[uuid.UUID, list[Stored]] = defaultdict(list)
    for s in stored:
        event = s.event()
        assert s.msg_id == str(event.event_id)
        assert s.subject == trajectory_subject(event.agent_id, event.type, prefix)
        by_trajectory[event.trajectory_id].append(s)
    assert {t: len(messages) for t, messages in by_trajectory.items()} == recorded
    for messages in by_trajectory.values():
        events = [m.event() for m in messages]
        assert sorted(e.seq for e in events) == list(range(len(events)))
        ends = [m for m, e in zip(messages, events, strict=True) if e.type == "trajectory_ended"]
        assert len(ends) == 1
        end = ends[0].event()
        assert isinstance(end, TrajectoryEnded) and end.event_count == len(events)
        assert ends[0].stream_seq == max(m.stream_seq for m in messages), (
            "the end was stored before an event of its trajectory"
        )
    return by_trajectory


@pytest.fixture
def stream(nats_prefix: str) -> str:
    return Topology(nats_prefix).stream(TRAJECTORIES)


async def run_episode(recorder: Recorder, agent: str, index: int, steps: int) -> tuple[uuid.UUID, int]:
    """A small agent: a few steps with context, an LLM call, an action and a reward each."""
    async with recorder.trajectory(agent_id=agent, scenario_id=f"scenario-{index % 3}", model="qwen2.5-7b") as t:
        for step in range(steps):
            t.step(environment={"cash": 100 - step}, observation=f"tick {step}")
            t.provider_access("prices", {"ACME": 10 + step}, query={"symbol": "ACME"})
            call_id = t.llm_call(
                messages=[{"role": "user", "content": f"{agent} step {step}"}],
                response={"role": "assistant", "content": "buy"},
                usage={"prompt_tokens": 5, "completion_tokens": 1},
            )
            t.action("buy", {"n": 1}, success=True, llm_call_id=call_id)
            t.reward(0.1)
            await asyncio.sleep(0)  # agents interleave on the loop
    return t.trajectory_id, 2 + 5 * steps


async def test_concurrent_trajectories_land_exactly_once_with_their_ids_and_subjects(
    servers: Servers, nats_prefix: str, js: JetStreamContext, stream: str, tmp_path: Path
) -> None:
    agents = ["trader-1", "trader-2", "market_maker", "desk 4.alpha*", "x" * 80]  # the last two get hashed tokens
    async with Recorder(
        servers.nats_url, prefix=nats_prefix, outbox_dir=tmp_path / "outbox", batch_size=64
    ) as recorder:
        results = await asyncio.gather(
            *(run_episode(recorder, agents[i % len(agents)], i, steps=1 + i % 4) for i in range(40))
        )
        assert await recorder.flush(timeout=30)
        assert recorder.stats.errors.get("ack_timeout", 0) == 0
    recorded = dict(results)
    total = sum(recorded.values())
    assert total > 300
    stored = await read_stream(js, stream)
    assert len(stored) == total
    check_exactly_once(stored, recorded, nats_prefix)
    subjects = {s.subject for s in stored}
    assert f"{nats_prefix}.traj.trader-1.llm_call" in subjects
    assert not any("desk 4" in s or "*" in s for s in subjects)
    assert not list((tmp_path / "outbox").glob("segment-*"))  # nothing left behind


async def test_the_end_is_stored_after_thousands_of_events_of_its_trajectory(
    servers: Servers, nats_prefix: str, js: JetStreamContext, stream: str, tmp_path: Path
) -> None:
    # Small batches: the end is recorded while most of the trajectory is still unsent.
    async with Recorder(
        servers.nats_url, prefix=nats_prefix, outbox_dir=tmp_path / "outbox", batch_size=50
    ) as recorder:
        async with recorder.trajectory(agent_id="long-runner", model="m") as long:
            for i in range(3000):
                long.step(observation=i)
        async with recorder.trajectory(agent_id="short", model="m") as short:
            short.reward(1.0)
        assert await recorder.flush(timeout=30)
    stored = await read_stream(js, stream)
    # check_exactly_once also proves each end is stored after every other event of its trajectory
    check_exactly_once(stored, {long.trajectory_id: 3002, short.trajectory_id: 3}, nats_prefix)


async def test_a_payload_over_the_limit_travels_by_claim_check(
    servers: Servers, nats_prefix: str, js: JetStreamContext, stream: str, tmp_path: Path
) -> None:
    prompt = "Analyse this order book:\n" + "bid 12.50 x 100; ask 12.55 x 80\n" * (5 * 1024 * 1024 // 32)
    assert len(prompt) > 5 * 1024 * 1024
    async with Recorder(servers.nats_url, prefix=nats_prefix, outbox_dir=tmp_path / "outbox") as recorder:
        async with recorder.trajectory(agent_id="analyst", model="m") as t:
            t.step()
            call_id = t.llm_call(system_prompt="You are a trader.", user_prompt=prompt, response_text="hold")
            t.reward(0.5)
        assert await recorder.flush(timeout=60)
        assert recorder.stats.claim_checked == 1
    stored = await read_stream(js, stream)
    check_exactly_once(stored, {t.trajectory_id: 5}, nats_prefix)
    (message,) = [s for s in stored if s.subject.endswith(".llm_call")]
    assert len(message.data) < 2048  # only the envelope and the reference travel on the bus
    check = message.event()
    assert isinstance(check, ClaimCheck)
    assert check.type == "llm_call" and check.trajectory_id == t.trajectory_id and check.seq == 2
    ref = check.payload_ref
    assert ref.bucket == f"{nats_prefix}_payloads"
    body = (await (await js.object_store(ref.bucket)).get(ref.name)).data
    assert body is not None
    assert len(body) == ref.size and hashlib.sha256(body).hexdigest() == ref.sha256
    full = parse_event(body)
    assert isinstance(full, LlmCall)
    assert full.event_id == check.event_id and full.call_id == call_id
    assert full.user_prompt == prompt and full.response_text == "hold"


def test_the_sync_recorder_records_from_plain_threads(
    servers: Servers, nats_prefix: str, stream: str, tmp_path: Path
) -> None:
    async def topology() -> None:
        nc = await nats.connect(servers.nats_url)
        await ensure_topology(nc.jetstream(), Topology(nats_prefix, storage_gib=0.05))
        await nc.close()

    asyncio.run(topology())
    recorded: dict[uuid.UUID, int] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def agent(recorder: SyncRecorder, number: int) -> None:
        for episode in range(3):
            t = recorder.trajectory(agent_id=f"bot-{number}", model="gpt-4o-mini", scenario_id="s")
            try:
                with t:
                    for step in range(5):
                        t.step(observation=f"{number}/{episode}/{step}")
                        t.action("say", {"text": "hi"}, success=True)
                    if episode == 2:
                        raise RuntimeError("bot gave up")
            except RuntimeError:
                pass
            except BaseException as error:  # reported below
                failures.append(error)
            with lock:
                recorded[t.trajectory_id] = 12  # started + 5 x (step, action) + ended

    with SyncRecorder(servers.nats_url, prefix=nats_prefix, outbox_dir=tmp_path / "outbox") as recorder:
        threads = [threading.Thread(target=agent, args=(recorder, n)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert recorder.flush(timeout=30)
        assert recorder.stats.acked == 8 * 3 * 12
    assert not failures
    assert len(recorded) == 24

    async def check() -> None:
        nc = await nats.connect(servers.nats_url)
        try:
            stored = await read_stream(nc.jetstream(), stream)
        finally:
            await nc.close()
        by_trajectory = check_exactly_once(stored, recorded, nats_prefix)
        statuses = [
            e.status
            for messages in by_trajectory.values()
            for e in (m.event() for m in messages)
            if isinstance(e, TrajectoryEnded)
        ]
        assert sorted(statuses) == ["completed"] * 16 + ["failed"] * 8

    asyncio.run(check())


async def test_flush_reports_false_while_nothing_can_be_delivered(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    recorder = Recorder(f"nats://127.0.0.1:{port}", outbox_dir=tmp_path / "outbox")
    await recorder.start()
    async with recorder.trajectory(agent_id="a", model="m") as t:
        t.step()
    assert not recorder.connected
    assert await recorder.flush(timeout=0.3) is False
    await recorder.close(timeout=0.1)
    assert recorder.outbox.pending_count() == 3
