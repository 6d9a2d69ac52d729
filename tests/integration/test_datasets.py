"""Dataset export against real PostgreSQL, S3 and NATS: ART lines that OpenPipe ART itself reads back,
OpenAI lines that follow the fine-tuning format's rules, manifests whose checksums match, no dataset
visible before it is complete, and pipeline.batch.created → pipeline.dataset.exported through the
running services."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from cuneiform_archiver.datasets import ExportConfig, Selection, export_dataset
from cuneiform_archiver.main import Archiver
from cuneiform_archiver.settings import ArchiverSettings
from cuneiform_core.db import load_migrations, open_database
from cuneiform_core.events import BatchCreated, DatasetExported
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.storage import ObjectStore
from cuneiform_core.topology import BATCH_CREATED, DATASET_EXPORTED, DLQ, PIPELINE, Topology
from cuneiform_recorder.main import build as build_recorder
from cuneiform_recorder.settings import RecorderSettings
from cuneiform_recorder.store import Redactor, store_events
from cuneiform_sdk.contract import validate_message
from nats.js import JetStreamContext

from tests.events import publish_events, trajectory
from tests.faults.test_recorder_faults import stream_messages
from tests.support import TcpProxy, eventually, scalar

pytestmark = pytest.mark.integration

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # ART imports litellm, which would go online

TRADE_TOOL = {
    "type": "function",
    "function": {
        "name": "trade",
        "description": "Choose a position.",
        "parameters": {"type": "object", "properties": {"action": {"type": "string"}}, "required": ["action"]},
    },
}
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


class Episode:
    """Contract events of one trajectory, as an agent would send them."""

    def __init__(self, scenario: str, agent: str) -> None:
        self.tid = uuid.uuid4()
        self.agent = agent
        self.events: list[dict[str, Any]] = []
        self.calls = 0
        self.add("trajectory_started", scenario_id=scenario, model={"name": "policy", "version": "v3"})

    def add(self, kind: str, **fields: Any) -> None:
        self.events.append(
            {
                "v": 1,
                "event_id": str(uuid.uuid4()),
                "type": kind,
                "trajectory_id": str(self.tid),
                "agent_id": self.agent,
                "seq": len(self.events),
                "occurred_at": (T0 + timedelta(seconds=len(self.events))).isoformat(),
                **fields,
            }
        )

    def call(self, step: int, messages: list[dict[str, Any]], response: dict[str, Any], **extra: Any) -> None:
        self.calls += 1
        self.add(
            "llm_call",
            step=step,
            call_id=f"c{self.calls}",
            model="policy-v3",
            messages=messages,
            response=response,
            **extra,
        )

    def end(self, reward: float, status: str = "completed") -> None:
        self.add("reward", value=reward, name="pnl", source="environment", reason="position times move")
        self.add(
            "trajectory_ended",
            status=status,
            total_reward=reward,
            metrics={"steps": 2, "won": reward > 0},
            event_count=len(self.events) + 1,
        )


def tool_call(call_id: str, action: str) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "trade", "arguments": json.dumps({"action": action})},
    }


def logprobs(token: str) -> dict[str, Any]:
    return {"content": [{"token": token, "logprob": -0.25, "bytes": list(token.encode()), "top_logprobs": []}]}


def multi_turn(scenario: str, reward: float) -> Episode:
    """One growing conversation: each call's prompt is the previous prompt + its response + the tool result."""
    e = Episode(scenario, "trader-1")
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You trade ACME."},
        {"role": "user", "content": "trend up"},
    ]
    for step, action in enumerate(("buy", "hold")):
        response = {"role": "assistant", "content": None, "tool_calls": [tool_call(f"t{step}", action)]}
        e.call(step, messages, response, tools=[TRADE_TOOL], logprobs=logprobs(action))
        e.add("action", step=step, action_type="trade", parameters={"action": action}, success=True)
        messages = [
            *messages,
            response,
            {"role": "tool", "tool_call_id": f"t{step}", "content": "filled"},
            {"role": "user", "content": "trend flat"},
        ]
    e.end(reward)
    return e


def planner_and_actor(scenario: str, reward: float) -> Episode:
    """Two separate conversations per step: a planner (growing) and a fresh actor call, plus a simple-form note."""
    e = Episode(scenario, "team-2")
    plan: list[dict[str, Any]] = [
        {"role": "system", "content": "You plan."},
        {"role": "user", "content": "market opens"},
    ]
    for step in range(2):
        answer = {"role": "assistant", "content": f"plan {step}: follow the trend"}
        e.call(step, plan, answer)
        actor = [{"role": "system", "content": "You act on a plan."}, {"role": "user", "content": f"plan {step}"}]
        e.call(
            step,
            actor,
            {"role": "assistant", "content": None, "tool_calls": [tool_call(f"a{step}", "buy")]},
            tools=[TRADE_TOOL],
        )
        plan = [*plan, answer, {"role": "user", "content": f"after step {step}"}]
    e.add(
        "llm_call",
        step=2,
        call_id="note",
        model="policy-v3",
        system_prompt="Summarize.",
        user_prompt="the day",
        response_text="a good day",
    )
    e.end(reward)
    return e


async def store(dsn: str, episodes: list[Episode]) -> None:
    pool = await open_database(dsn, "recorder", load_migrations("cuneiform_recorder.migrations"), max_size=2)
    try:
        async with pool.acquire() as conn:
            events = [validate_message(event) for episode in episodes for event in episode.events]
            await store_events(conn, events, Redactor([]))
    finally:
        await pool.close()


@pytest.fixture
async def pool(connection: ConnectionSettings) -> AsyncIterator[asyncpg.Pool]:
    pool = await open_database(
        connection.pg_dsn, "archiver", load_migrations("cuneiform_archiver.migrations"), max_size=4
    )
    yield pool
    await pool.close()


@pytest.fixture
async def bucket(connection: ConnectionSettings) -> ObjectStore:
    store = ObjectStore.from_settings(connection)
    await store.ensure_bucket()
    return store


@pytest.fixture
async def fleet(connection: ConnectionSettings) -> dict[str, list[Episode]]:
    episodes = {
        "multi": [multi_turn("market-a", r) for r in (1.0, -1.0, 0.5)],
        "team": [planner_and_actor("market-b", r) for r in (2.0, 0.0)],
        "alone": [multi_turn("market-c", 1.0)],
        "flat": [multi_turn("market-d", 0.5), multi_turn("market-d", 0.5)],
    }
    await store(connection.pg_dsn, [e for group in episodes.values() for e in group])
    return episodes


# --- ART ------------------------------------------------------------------------------------------------------


async def test_art_lines_are_read_back_whole_by_openpipe_art(
    pool: asyncpg.Pool, bucket: ObjectStore, fleet: dict[str, list[Episode]]
) -> None:
    from art.trajectories import Trajectory
    from art.utils.trajectory_migration import deserialize_trajectory_groups, dict_to_message_or_choice
    from openai.types.chat.chat_completion import Choice

    result = await export_dataset(pool, bucket, Selection(), ExportConfig())
    manifest = result.manifest
    text = (await bucket.get_bytes(result.prefix + "art.jsonl")).decode()

    # ART's own reader: every group and every trajectory, each recorded response a Choice.
    groups = deserialize_trajectory_groups(text)
    assert [len(g.trajectories) for g in groups] == [3, 2]  # market-a, market-b; c and d carry no signal
    multi, _team = groups
    for episode in multi.trajectories:
        kinds = [type(x).__name__ for x in episode.messages_and_choices]
        assert kinds == ["dict", "dict", "Choice", "dict", "dict", "Choice"]
        assert all(
            c.logprobs is not None and c.logprobs.content[0].token in ("buy", "hold")
            for c in episode.messages_and_choices
            if isinstance(c, Choice)
        )
        assert episode.messages_and_choices[2].message.tool_calls[0].function.name == "trade"
    assert sorted(t.reward for t in multi.trajectories) == [-1.0, 0.5, 1.0]

    # ART's model accepts each trajectory whole: tools and additional histories included.
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        for raw in line["trajectories"]:
            parsed = Trajectory.model_validate(raw)
            assert parsed.tools == [TRADE_TOOL] or parsed.metadata["agent_id"] == "team-2"
            assert parsed.metadata["scenario_id"] in ("market-a", "market-b")
            assert parsed.metadata["model_version"] == "v3"
            assert isinstance(parsed.metadata["trajectory_id"], str)
            assert any("pnl" in log for log in parsed.logs)

    def choices(items: list[Any]) -> int:
        # model_validate keeps items as given (ART's Message type skips validation); ART's reader turns
        # the ones holding a `message` into Choice objects — count with ART's own conversion.
        return sum(isinstance(dict_to_message_or_choice(x) if isinstance(x, dict) else x, Choice) for x in items)

    for raw in lines[1]["trajectories"]:  # the planner + actor agent: not flattened into one dialogue
        parsed = Trajectory.model_validate(raw)
        assert choices(parsed.messages_and_choices) == 2  # the planner's growing conversation
        histories = parsed.additional_histories
        assert [choices(h.messages_and_choices) for h in histories] == [1, 1, 1]
        assert histories[0].tools == [TRADE_TOOL] and histories[2].tools is None  # two actor calls, then the note
        assert histories[2].messages_and_choices[0] == {"role": "system", "content": "Summarize."}

    # The manifest reports the groups left out, and why.
    excluded = {g["scenario_id"]: g["excluded_reason"] for g in manifest["groups"] if not g["included"]}
    assert excluded == {"market-c": "fewer than 2 trajectories", "market-d": "zero reward spread"}
    assert manifest["art_trajectory_count"] == 5 and len(manifest["trajectory_ids"]) == 8
    stats = next(g for g in manifest["groups"] if g["scenario_id"] == "market-a")["reward"]
    assert stats["min"] == -1.0 and stats["max"] == 1.0 and abs(stats["mean"] - 1 / 6) < 1e-9


async def test_manifest_checksums_match_and_a_second_export_is_byte_identical(
    pool: asyncpg.Pool, bucket: ObjectStore, fleet: dict[str, list[Episode]]
) -> None:
    ids = tuple(e.tid for group in fleet.values() for e in group)
    batch = uuid.uuid4()
    first = await export_dataset(
        pool, bucket, Selection(trajectory_ids=ids), ExportConfig(), dataset_id=batch, created_at=T0, batch_id=batch
    )
    files = {}
    for entry in first.manifest["files"]:
        body = await bucket.get_bytes(entry["key"])
        assert (len(body), hashlib.sha256(body).hexdigest()) == (entry["size"], entry["sha256"])
        assert entry["records"] == len(body.splitlines())
        files[entry["key"]] = body
    manifest_body = await bucket.get_bytes(first.manifest_key)
    assert hashlib.sha256(manifest_body).hexdigest() == first.manifest_sha256
    assert json.loads(manifest_body)["created_at"] == T0.isoformat()

    # Immutable: the same id returns the existing dataset ...
    again = await export_dataset(pool, bucket, Selection(trajectory_ids=ids), ExportConfig(), dataset_id=batch)
    assert again.reused and again.manifest_sha256 == first.manifest_sha256
    # ... and built afresh from the same batch, every byte is the same.
    for key in [*files, first.manifest_key]:
        await bucket.delete(key)
    rebuilt = await export_dataset(
        pool, bucket, Selection(trajectory_ids=ids), ExportConfig(), dataset_id=batch, created_at=T0, batch_id=batch
    )
    assert not rebuilt.reused and rebuilt.manifest_sha256 == first.manifest_sha256
    for key, body in files.items():
        assert await bucket.get_bytes(key) == body


# --- OpenAI chat fine-tuning --------------------------------------------------------------------------------


def check_fine_tuning_example(example: dict[str, Any]) -> None:
    """The chat fine-tuning format's rules (OpenAI's data-preparation checks, plus tool calls and weights)."""
    assert set(example) <= {"messages", "tools", "parallel_tool_calls"}, set(example)
    messages = example["messages"]
    assert messages, "no messages"
    offered: set[str] = set()
    for message in messages:
        assert message["role"] in ("system", "user", "assistant", "tool"), message
        assert set(message) <= {"role", "content", "name", "tool_calls", "tool_call_id", "weight"}, message
        assert "content" in message or message.get("tool_calls"), f"no content: {message}"
        if "weight" in message:
            assert message["role"] == "assistant" and message["weight"] in (0, 1), message
        for call in message.get("tool_calls") or []:
            assert message["role"] == "assistant"
            assert call["type"] == "function" and call["id"] and call["function"]["name"]
            json.loads(call["function"]["arguments"])
            offered.add(call["id"])
        if message["role"] == "tool":
            assert message["tool_call_id"] in offered, f"tool result for an unknown call: {message}"
    assert any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages), "nothing to learn"
    for tool in example.get("tools", []):
        assert tool["type"] == "function" and tool["function"]["name"]


async def test_openai_lines_follow_the_fine_tuning_rules(
    pool: asyncpg.Pool, bucket: ObjectStore, fleet: dict[str, list[Episode]]
) -> None:
    result = await export_dataset(pool, bucket, Selection(), ExportConfig(sft_top_fraction=0.5))
    lines = [json.loads(line) for line in (await bucket.get_bytes(result.prefix + "openai_chat.jsonl")).splitlines()]
    for example in lines:
        check_fine_tuning_example(example)
    # The best half of each group with a reward spread (market-a: the +1.0 and +0.5 runs; market-b: +2.0),
    # one example per conversation: 1 + 1 + 4 (planner, two actor calls, the note).
    chosen = set(result.manifest["sft"]["trajectory_ids"])
    best = {str(e.tid) for e in fleet["multi"][::2]} | {str(fleet["team"][0].tid)}
    assert chosen == best
    assert len(lines) == 6
    multi = next(line for line in lines if line["messages"][0]["content"] == "You trade ACME.")
    assert [m["role"] for m in multi["messages"]] == ["system", "user", "assistant", "tool", "user", "assistant"]
    assert [m.get("weight") for m in multi["messages"]] == [None, None, 1, None, None, 1]  # the model's own turns
    assert multi["tools"] == [TRADE_TOOL]
    by_min = await export_dataset(
        pool, bucket, Selection(), ExportConfig(sft_selection="min_reward", sft_min_reward=1.0)
    )
    assert set(by_min.manifest["sft"]["trajectory_ids"]) == {
        str(fleet["multi"][0].tid),
        str(fleet["team"][0].tid),
        str(fleet["alone"][0].tid),
    }


# --- an object-store outage -----------------------------------------------------------------------------------


class CutBeforeManifest(ObjectStore):
    """The S3 endpoint (through a proxy) goes away right after the data files were uploaded."""

    proxy: TcpProxy

    async def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> Any:
        if key.endswith("manifest.json"):
            await self.proxy.cut()
        return await super().put_bytes(key, data, content_type)


async def test_an_export_during_an_object_store_outage_is_never_visible_half_written(
    connection: ConnectionSettings, pool: asyncpg.Pool, bucket: ObjectStore, fleet: dict[str, list[Episode]]
) -> None:
    proxy = TcpProxy(connection.s3_endpoint)
    await proxy.start()
    try:
        flaky = CutBeforeManifest.from_settings(connection.model_copy(update={"s3_endpoint": proxy.endpoint}))
        assert isinstance(flaky, CutBeforeManifest)
        flaky.proxy = proxy
        dataset = uuid.uuid4()
        with pytest.raises(Exception):  # noqa: B017 - whatever the client raises for a refused connection
            await export_dataset(pool, flaky, Selection(), ExportConfig(), dataset_id=dataset, created_at=T0)
        keys = await bucket.list_keys(f"datasets/{dataset}/")
        assert keys == [f"datasets/{dataset}/art.jsonl", f"datasets/{dataset}/openai_chat.jsonl"]  # no manifest

        await proxy.restore()
        retried = await export_dataset(pool, bucket, Selection(), ExportConfig(), dataset_id=dataset, created_at=T0)
        assert not retried.reused
        for entry in retried.manifest["files"]:
            assert hashlib.sha256(await bucket.get_bytes(entry["key"])).hexdigest() == entry["sha256"]
    finally:
        await proxy.stop()


# --- through the running services ---------------------------------------------------------------------------


async def exported_events(js: JetStreamContext, topology: Topology) -> list[dict[str, Any]]:
    return await stream_messages(js, topology.stream(PIPELINE), topology.subject(DATASET_EXPORTED))


async def test_batch_created_becomes_a_dataset_and_one_exported_event(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology
) -> None:
    recorder = build_recorder(RecorderSettings(sweep_interval_s=0.3), connection)
    archiver = Archiver(ArchiverSettings(segment_max_age_s=0.5), connection)
    await recorder.start()
    await archiver.service.start()
    try:
        rng = random.Random(5)
        episodes = [trajectory(rng, f"agent-{n}") for n in range(20)]
        await publish_events(js, topology.prefix, [e for episode in episodes for e in episode])

        async def completed() -> bool:
            return (
                await scalar(connection.pg_dsn, "SELECT count(*) FROM recorder.trajectories WHERE status = 'completed'")
                == 20
            )

        await eventually(completed, what="20 trajectories completed")
        ids = [uuid.UUID(episode[0]["trajectory_id"]) for episode in episodes]
        unknown = uuid.uuid4()
        batch = BatchCreated(
            event_id=uuid.uuid4(),
            batch_id=uuid.uuid4(),
            trajectory_ids=[*ids, unknown],
            reason="test",
            rules={"groups": 5},
        )
        subject = topology.subject(BATCH_CREATED)
        await js.publish(subject, batch.model_dump_json().encode(), headers={"Nats-Msg-Id": str(batch.event_id)})
        # The same batch announced twice (a readiness retry under a new message id): still one dataset, one event.
        again = batch.model_copy(update={"event_id": uuid.uuid4()})
        await js.publish(subject, again.model_dump_json().encode(), headers={"Nats-Msg-Id": str(again.event_id)})
        await js.publish(subject, b'{"v": 1, "batch_id": "nope"}', headers={"Nats-Msg-Id": "bad-batch"})

        async def exported() -> bool:
            return len(await exported_events(js, topology)) >= 1

        await eventually(exported, what="pipeline.dataset.exported")
        await asyncio.sleep(1.0)
        events = [DatasetExported.model_validate(e) for e in await exported_events(js, topology)]
        assert len(events) == 1
        event = events[0]
        assert event.batch_id == batch.batch_id and event.bucket == connection.s3_bucket
        manifest = json.loads(await archiver.service.store.get_bytes(event.manifest_key))
        assert (
            hashlib.sha256(await archiver.service.store.get_bytes(event.manifest_key)).hexdigest()
            == event.manifest_sha256
        )
        assert manifest["missing_trajectory_ids"] == [str(unknown)]
        assert len(manifest["trajectory_ids"]) == 20
        assert event.trajectory_count + sum(g["size"] for g in manifest["groups"] if not g["included"]) == 20
        assert {f.name for f in event.files} == {"art.jsonl", "openai_chat.jsonl"}
        assert (
            await scalar(
                connection.pg_dsn, "SELECT count(*) FROM archiver.datasets WHERE batch_id = $1", batch.batch_id
            )
            == 1
        )

        async def dead_lettered() -> bool:
            letters = await stream_messages(js, topology.stream(DLQ), topology.subject("dlq.archiver"))
            return len(letters) == 1 and "batch_id" in letters[0]["reason"]

        await eventually(dead_lettered, timeout=10, what="the malformed batch dead-lettered with its reason")
    finally:
        await archiver.service.stop()
        await recorder.stop()
