"""The recorder against real NATS and PostgreSQL, fed through the SDK or raw JSON as a non-Python
agent would: every event stored once, trajectories proven complete, bad input dead-lettered."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from cuneiform_core.service import Service
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import DLQ, PIPELINE, Topology
from cuneiform_recorder.main import build
from cuneiform_recorder.settings import RecorderSettings
from cuneiform_sdk import Recorder
from cuneiform_sdk.subjects import trajectory_subject
from nats.js import JetStreamContext

from tests.support import eventually, query, scalar

pytestmark = pytest.mark.integration


@pytest.fixture
async def start_recorder(connection: ConnectionSettings) -> AsyncIterator[Callable[..., Awaitable[Service]]]:
    services: list[Service] = []

    async def start(**overrides: Any) -> Service:
        settings = RecorderSettings(**{"sweep_interval_s": 0.3, **overrides})
        service = build(settings, connection)
        await service.start()
        services.append(service)
        return service

    yield start
    for service in services:
        await service.stop()


@pytest.fixture
async def sdk(connection: ConnectionSettings, tmp_path: Path) -> AsyncIterator[Recorder]:
    recorder = Recorder(connection.nats_url, prefix=connection.nats_prefix, outbox_dir=tmp_path / "outbox")
    await recorder.start()
    yield recorder
    await recorder.close()


def record_episode(recorder: Recorder, agent: str, scenario: str, reward: float, fail: bool = False) -> uuid.UUID:
    t = recorder.trajectory(agent_id=agent, scenario_id=scenario, model={"name": "policy", "version": "v1"})
    t.start()
    for step in range(2):
        t.step(environment={"cash": 100 + step}, observation=f"tick {step}")
        t.provider_access("prices", {"ACME": 12.5 + step}, query={"symbol": "ACME"})
        call_id = t.llm_call(
            messages=[{"role": "system", "content": "trade"}, {"role": "user", "content": f"step {step}"}],
            response={
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": f"c{step}", "type": "function", "function": {"name": "buy", "arguments": "{}"}}],
            },
            usage={"prompt_tokens": 10, "completion_tokens": 3},
        )
        t.action("buy", {"n": 1}, success=True, llm_call_id=call_id)
        t.reward(reward / 2)
    if fail:
        t.end("failed", error="market closed")
    else:
        t.end()
    return t.trajectory_id


async def completions(js: JetStreamContext, topology: Topology) -> list[dict[str, Any]]:
    info = await js.stream_info(topology.stream(PIPELINE))
    found = []
    for seq in range(1, (info.state.last_seq or 0) + 1):
        msg = await js.get_msg(topology.stream(PIPELINE), seq)
        if msg.subject == topology.subject("pipeline.trajectory.completed"):
            found.append(json.loads(msg.data))
    return found


async def dead_letters(js: JetStreamContext, topology: Topology) -> list[dict[str, Any]]:
    info = await js.stream_info(topology.stream(DLQ))
    return [
        json.loads((await js.get_msg(topology.stream(DLQ), seq)).data)
        for seq in range(1, (info.state.last_seq or 0) + 1)
    ]


async def test_trajectories_recorded_through_the_sdk_are_stored_whole_and_announced_once(
    start_recorder, sdk, js, connection
) -> None:  # type: ignore[no-untyped-def]
    await start_recorder()
    ids = [record_episode(sdk, f"agent-{n}", "s1", reward=float(n)) for n in range(5)]
    failed = record_episode(sdk, "agent.with.dots", "s1", reward=0.0, fail=True)
    assert await sdk.flush(20)
    dsn = connection.pg_dsn
    topology = Topology.of(connection)

    async def all_final() -> bool:
        return await scalar(dsn, "SELECT count(*) FROM recorder.trajectories WHERE status <> 'recording'") == 6

    await eventually(all_final, what="six finalized trajectories")
    rows = {r["trajectory_id"]: r for r in await query(dsn, "SELECT * FROM recorder.trajectories")}
    for n, trajectory_id in enumerate(ids):
        row = rows[trajectory_id]
        assert (row["status"], row["agent_id"], row["scenario_id"]) == ("completed", f"agent-{n}", "s1")
        assert (row["model_name"], row["model_version"]) == ("policy", "v1")
        # started + 2 x (step, provider, llm, action, reward) + ended
        assert row["expected_events"] == row["stored_events"] == 12
        assert row["total_reward"] == pytest.approx(float(n))
    assert rows[failed]["status"] == "failed" and rows[failed]["error"] == "market closed"
    counts = {
        table: await scalar(dsn, f"SELECT count(*) FROM recorder.{table}")
        for table in ("events", "steps", "llm_calls", "provider_accesses", "actions", "rewards")
    }
    assert counts == {
        "events": 72,
        "steps": 12,
        "llm_calls": 12,
        "provider_accesses": 12,
        "actions": 12,
        "rewards": 12,
    }
    call = (await query(dsn, "SELECT * FROM recorder.llm_calls ORDER BY seq LIMIT 1"))[0]
    assert call["response"]["tool_calls"][0]["function"]["name"] == "buy"
    assert call["messages"][1] == {"role": "user", "content": "step 0"}
    assert call["prompt_tokens"] == 10

    async def announced() -> bool:
        return len(await completions(js, topology)) == 6

    await eventually(announced, what="six completion events")
    announced_ids = sorted(c["trajectory_id"] for c in await completions(js, topology))
    assert announced_ids == sorted(str(i) for i in [*ids, failed])
    assert await scalar(dsn, "SELECT count(*) FROM recorder.trajectories WHERE completion_published_at IS NULL") == 0


def raw_event(trajectory_id: uuid.UUID, seq: int, event_type: str, **fields: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "event_id": str(uuid.uuid4()),
        "type": event_type,
        "trajectory_id": str(trajectory_id),
        "agent_id": "ts-agent",
        "seq": seq,
        "occurred_at": datetime.now(UTC).isoformat(),
        **fields,
    }


def raw_trajectory() -> list[dict[str, Any]]:
    """What a TypeScript agent would publish: plain JSON, the simple llm_call form."""
    tid = uuid.uuid4()
    return [
        raw_event(tid, 0, "trajectory_started", scenario_id="g1", model={"name": "m"}),
        raw_event(tid, 1, "step", step=0, environment={}),
        raw_event(tid, 2, "llm_call", step=0, call_id="c", model="m", user_prompt="u?", response_text="r!"),
        raw_event(tid, 3, "reward", value=1.0),
        raw_event(tid, 4, "trajectory_ended", status="completed", event_count=5),
    ]


async def publish_raw(js: JetStreamContext, prefix: str, event: dict[str, Any], msg_id: str | None = None) -> None:
    subject = trajectory_subject(event["agent_id"], event["type"], prefix)
    await js.publish(subject, json.dumps(event).encode(), headers={"Nats-Msg-Id": msg_id or event["event_id"]})


async def test_the_same_events_published_three_times_are_stored_once(start_recorder, js, connection) -> None:  # type: ignore[no-untyped-def]
    await start_recorder()
    events = raw_trajectory()
    for attempt in range(3):
        for event in events:
            # Attempt 0 and 1 share Nats-Msg-Id (the stream drops the copy); attempt 2 uses new message
            # ids, as a replay from an archive would: then the recorder's ledger drops them.
            await publish_raw(js, connection.nats_prefix, event, msg_id=f"{event['event_id']}-{attempt // 2}")
    dsn = connection.pg_dsn

    async def done() -> bool:
        return await scalar(dsn, "SELECT status FROM recorder.trajectories") == "completed"

    await eventually(done, what="completed trajectory")
    await eventually(
        lambda: _pending_zero(js, connection), what="consumer drained"
    )  # every copy was delivered and handled
    assert await scalar(dsn, "SELECT count(*) FROM recorder.events") == 5
    assert await scalar(dsn, "SELECT stored_events FROM recorder.trajectories") == 5
    assert await scalar(dsn, "SELECT count(*) FROM recorder.llm_calls") == 1
    assert len(await completions(js, Topology.of(connection))) == 1


async def _pending_zero(js: JetStreamContext, connection: ConnectionSettings) -> bool:
    topology = Topology.of(connection)
    info = await js.consumer_info(topology.stream(topology.streams[0]), f"{topology.prefix}_recorder")
    return (info.num_pending or 0) == 0 and (info.num_ack_pending or 0) == 0


async def test_out_of_order_arrival_assembles_the_same_trajectory(start_recorder, js, connection) -> None:  # type: ignore[no-untyped-def]
    await start_recorder()
    events = raw_trajectory()
    for event in reversed(events):  # the end first, the start last
        await publish_raw(js, connection.nats_prefix, event)
    dsn = connection.pg_dsn

    async def done() -> bool:
        return await scalar(dsn, "SELECT status FROM recorder.trajectories") == "completed"

    await eventually(done, what="completed trajectory")
    row = (await query(dsn, "SELECT * FROM recorder.trajectories"))[0]
    assert (row["scenario_id"], row["model_name"], row["stored_events"]) == ("g1", "m", 5)
    call = (await query(dsn, "SELECT messages, response FROM recorder.llm_calls"))[0]
    assert call["messages"] == [{"role": "user", "content": "u?"}]
    assert call["response"] == {"role": "assistant", "content": "r!"}


async def test_missing_events_end_incomplete_and_silent_trajectories_abandoned(start_recorder, js, connection) -> None:  # type: ignore[no-untyped-def]
    await start_recorder(incomplete_after_s=0.5, abandoned_after_s=1.0)
    gap = raw_trajectory()
    for event in gap[:2] + gap[3:]:  # the llm_call never arrives
        await publish_raw(js, connection.nats_prefix, event)
    silent = raw_trajectory()
    for event in silent[:3]:  # no end
        await publish_raw(js, connection.nats_prefix, event)
    dsn = connection.pg_dsn

    async def finalized() -> bool:
        return await scalar(dsn, "SELECT count(*) FROM recorder.trajectories WHERE status <> 'recording'") == 2

    await eventually(finalized, what="both trajectories finalized")
    status = {r["trajectory_id"]: r["status"] for r in await query(dsn, "SELECT * FROM recorder.trajectories")}
    assert status[uuid.UUID(gap[0]["trajectory_id"])] == "incomplete"
    assert status[uuid.UUID(silent[0]["trajectory_id"])] == "abandoned"
    topology = Topology.of(connection)

    async def announced() -> bool:
        return len(await completions(js, topology)) == 2

    await eventually(announced, what="both announced")
    assert {c["status"] for c in await completions(js, topology)} == {"incomplete", "abandoned"}


async def test_a_5_mb_prompt_travels_by_claim_check(start_recorder, sdk, connection) -> None:  # type: ignore[no-untyped-def]
    await start_recorder()
    prompt = "market data: " + "ACME 12.5; " * (5 * 1024 * 1024 // 11)
    t = sdk.trajectory(agent_id="big", scenario_id="s", model="m")
    with t:
        t.llm_call(messages=[{"role": "user", "content": prompt}], response={"role": "assistant", "content": "ok"})
    assert await sdk.flush(30)
    assert sdk.stats.claim_checked == 1
    dsn = connection.pg_dsn

    async def done() -> bool:
        return await scalar(dsn, "SELECT status FROM recorder.trajectories") == "completed"

    await eventually(done, what="completed trajectory")
    stored = await scalar(dsn, "SELECT messages->0->>'content' FROM recorder.llm_calls")
    assert hashlib.sha256(stored.encode()).hexdigest() == hashlib.sha256(prompt.encode()).hexdigest()


async def test_every_kind_of_bad_input_is_dead_lettered_with_a_reason_while_good_events_flow(
    start_recorder, js, connection
) -> None:  # type: ignore[no-untyped-def]
    await start_recorder(max_claim_check_bytes=1000)
    prefix = connection.nats_prefix
    topology = Topology.of(connection)
    subject = trajectory_subject("bad-agent", "step", prefix)
    tid = uuid.uuid4()
    payloads = await js.object_store(topology.bucket("payloads"))
    body = json.dumps(raw_event(tid, 1, "step", step=0)).encode()
    await payloads.put("real-object", body)

    def claim(**ref: Any) -> bytes:
        good = {"bucket": topology.bucket("payloads"), "name": "real-object", "size": len(body)}
        good["sha256"] = hashlib.sha256(body).hexdigest()
        return json.dumps(raw_event(tid, 1, "step", payload_ref={**good, **ref})).encode()

    bad = {
        "malformed JSON": b'{"v": 1, "type": "step"',
        "unsupported contract version v=2": json.dumps(raw_event(tid, 1, "step", step=0) | {"v": 2}).encode(),
        "step: Input should be a valid integer": json.dumps(raw_event(tid, 1, "step", step="one")).encode(),
        "unknown event type 'dance'": json.dumps(raw_event(tid, 1, "dance")).encode(),
        "claim check digest mismatch": claim(sha256="0" * 64),
        "which does not exist": claim(name="no-such-object"),
        "oversize": claim(size=5000),
        "payloads live in": claim(bucket="someone-elses-bucket"),
    }
    good = raw_trajectory()
    for n, data in enumerate(bad.values()):  # bad and good interleaved
        if n < len(good):
            await publish_raw(js, prefix, good[n])
        await js.publish(subject, data, headers={"Nats-Msg-Id": f"bad-{n}"})
    dsn = connection.pg_dsn

    async def settled() -> bool:
        return len(await dead_letters(js, topology)) == len(bad) and (
            await scalar(
                dsn,
                "SELECT status FROM recorder.trajectories WHERE trajectory_id = $1",
                uuid.UUID(good[0]["trajectory_id"]),
            )
            == "completed"
        )

    await eventually(settled, what="dead letters and the good trajectory")
    letters = await dead_letters(js, topology)
    for expected in bad:
        assert any(expected in letter["reason"] for letter in letters), f"no dead letter says {expected!r}"
    stored = await query(dsn, "SELECT reason, payload, kind FROM recorder.dead_letters")
    assert len(stored) == len(bad)
    assert {bytes(r["payload"]) for r in stored} == set(bad.values())
    assert {r["kind"] for r in stored} == {"malformed", "invalid", "rejected"}
    # Nothing from the bad messages reached the data tables.
    assert await scalar(dsn, "SELECT count(*) FROM recorder.events WHERE trajectory_id = $1", tid) == 0


async def test_two_replicas_on_one_consumer_store_everything_once(start_recorder, sdk, js, connection) -> None:  # type: ignore[no-untyped-def]
    await start_recorder(batch_size=50)
    await start_recorder(batch_size=50)
    ids = [record_episode(sdk, f"agent-{n % 7}", f"s{n % 3}", reward=float(n)) for n in range(60)]
    assert await sdk.flush(30)
    dsn = connection.pg_dsn

    async def done() -> bool:
        return await scalar(dsn, "SELECT count(*) FROM recorder.trajectories WHERE status = 'completed'") == 60

    await eventually(done, timeout=30, what="60 completed trajectories")
    assert await scalar(dsn, "SELECT count(*) FROM recorder.events") == 60 * 12
    assert await scalar(dsn, "SELECT sum(stored_events) FROM recorder.trajectories") == 60 * 12
    topology = Topology.of(connection)

    async def announced() -> bool:
        return len(await completions(js, topology)) == 60

    await eventually(announced, what="60 completions")
    assert sorted(c["trajectory_id"] for c in await completions(js, topology)) == sorted(map(str, ids))


async def test_a_batch_of_nothing_but_bad_claim_checks_is_dead_lettered_not_retried(
    start_recorder, js, connection
) -> None:  # type: ignore[no-untyped-def]
    # Every message of such a batch is rejected before the database is touched: the handler must
    # still finish (a regression once turned this into an endless "transient" retry).
    topology = Topology.of(connection)
    tid = uuid.uuid4()
    subject = trajectory_subject("bad-agent", "step", connection.nats_prefix)
    for n in range(3):
        ref = {"bucket": topology.bucket("payloads"), "name": f"missing-{n}", "sha256": "0" * 64, "size": 10}
        await js.publish(subject, json.dumps(raw_event(tid, n, "step", payload_ref=ref)).encode())
    await start_recorder()

    async def settled() -> bool:
        return len(await dead_letters(js, topology)) == 3 and await _pending_zero(js, connection)

    await eventually(settled, timeout=10, what="three dead letters and a drained consumer")
    assert all("does not exist" in letter["reason"] for letter in await dead_letters(js, topology))


async def test_a_backlog_after_an_outage_is_not_mistaken_for_abandoned_trajectories(
    start_recorder, js, connection
) -> None:  # type: ignore[no-untyped-def]
    prefix = connection.nats_prefix
    dsn = connection.pg_dsn
    events = raw_trajectory()  # started, step, llm_call, reward, ended (5)
    tid = uuid.UUID(events[0]["trajectory_id"])
    recorder = await start_recorder(abandoned_after_s=1.0, incomplete_after_s=1.0)
    for event in events[:2]:
        await publish_raw(js, prefix, event)

    async def first_two() -> bool:
        return await scalar(dsn, "SELECT stored_events FROM recorder.trajectories WHERE trajectory_id = $1", tid) == 2

    await eventually(first_two, what="the first two events stored")
    await recorder.stop()  # an outage: the agent goes on publishing into the stream
    for _ in range(300):
        for event in raw_trajectory():
            await publish_raw(js, prefix, event)
    for event in events[2:]:
        await publish_raw(js, prefix, event)
    await asyncio.sleep(1.5)  # longer than both grace periods
    await start_recorder(abandoned_after_s=1.0, incomplete_after_s=1.0, batch_size=5, concurrency=1)

    async def drained() -> bool:
        return await _pending_zero(js, connection)

    await eventually(drained, what="the backlog drained")
    await asyncio.sleep(0.5)
    row = (await query(dsn, "SELECT status, stored_events FROM recorder.trajectories WHERE trajectory_id = $1", tid))[0]
    assert (row["status"], row["stored_events"]) == ("completed", 5)
    assert await scalar(dsn, "SELECT count(*) FROM recorder.trajectories WHERE status <> 'completed'") == 0


async def test_a_resent_position_does_not_fill_a_gap_and_a_finalized_trajectory_stays_as_announced(
    start_recorder, js, connection
) -> None:  # type: ignore[no-untyped-def]
    await start_recorder()
    prefix, dsn = connection.nats_prefix, connection.pg_dsn
    events = raw_trajectory()
    tid = uuid.UUID(events[0]["trajectory_id"])
    # seq 1 twice under two event ids, seq 2 never: four distinct ids but only four of five positions.
    for event in [events[0], events[1], events[1] | {"event_id": str(uuid.uuid4())}, events[3], events[4]]:
        await publish_raw(js, prefix, event)
    await eventually(lambda: _pending_zero(js, connection), what="drained")
    row = (await query(dsn, "SELECT status, stored_events FROM recorder.trajectories WHERE trajectory_id = $1", tid))[0]
    assert (row["status"], row["stored_events"]) == ("recording", 4)

    await publish_raw(js, prefix, events[2])  # the gap filled: complete

    async def completed() -> bool:
        return (
            await scalar(dsn, "SELECT status FROM recorder.trajectories WHERE trajectory_id = $1", tid) == "completed"
        )

    await eventually(completed, what="completed")
    # A conflicting end arriving after the announcement does not rewrite the trajectory.
    late_end = events[4] | {"event_id": str(uuid.uuid4()), "seq": 5, "status": "failed", "total_reward": -99.0}
    await publish_raw(js, prefix, late_end)
    await eventually(lambda: _pending_zero(js, connection), what="drained")
    row = (await query(dsn, "SELECT * FROM recorder.trajectories WHERE trajectory_id = $1", tid))[0]
    assert (row["status"], row["end_status"], row["expected_events"]) == ("completed", "completed", 5)
    assert row["total_reward"] != -99.0
    assert len(await completions(js, Topology.of(connection))) == 1


async def test_operators_ask_the_recorder_for_its_status_over_nats(start_recorder, js, connection) -> None:  # type: ignore[no-untyped-def]
    await start_recorder()
    for event in raw_trajectory()[:3]:  # a trajectory still recording
        await publish_raw(js, connection.nats_prefix, event)
    subject = trajectory_subject("ts-agent", "step", connection.nats_prefix)
    await js.publish(subject, b'{"v": 1, "type": "step"}')  # a dead letter
    await eventually(lambda: _pending_zero(js, connection), what="drained")
    nc = await nats.connect(connection.nats_url)
    try:
        reply = await nc.request(f"{connection.nats_prefix}.cmd.recorder.status", b"{}", timeout=5)
    finally:
        await nc.close()
    answer = json.loads(reply.data)
    assert answer["ok"] is True
    status = answer["result"]
    assert (status["trajectories_recording"], status["dead_letters"]) == (1, 1)
    assert status["consumer"]["pending"] == 0 and status["consumer"]["name"].endswith("_recorder")
