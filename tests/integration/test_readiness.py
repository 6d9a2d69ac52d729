"""Readiness against real PostgreSQL and NATS: its numbers, its verdict, frozen batches announced once,
manual triggers (forced or not, with who and why), release, evaluation after pipeline events — and the
batch becoming a dataset in the archiver."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import pytest
from cuneiform_archiver.main import Archiver
from cuneiform_archiver.settings import ArchiverSettings
from cuneiform_core.events import BatchCreated, TrajectoryCompleted, stable_id
from cuneiform_core.service import Service
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import BATCH_CREATED, DATASET_EXPORTED, PIPELINE, TRAJECTORY_COMPLETED, Topology
from cuneiform_readiness.main import Readiness
from cuneiform_readiness.settings import ReadinessSettings
from nats.js import JetStreamContext

from tests.faults.test_recorder_faults import stream_messages
from tests.integration.test_datasets import Episode, multi_turn, store
from tests.processes import deployment_env
from tests.support import eventually, scalar

pytestmark = pytest.mark.integration

RULES = {"min_trajectories": 6, "min_groups": 2, "cooldown_s": 0, "min_quality": 0.5, "evaluate_interval_s": 3600}


def judged(episode: Episode, score: float) -> Episode:
    """Add a judge's reward before the end (as a judge service would record it)."""
    end = episode.events.pop()
    episode.add("reward", value=score, name="ruler", source="judge")
    end["seq"] = len(episode.events)
    end["event_count"] = len(episode.events) + 1
    episode.events.append(end)
    return episode


def fleet() -> dict[str, list[Episode]]:
    return {
        "a": [multi_turn("market-a", r) for r in (1.0, -1.0, 0.5)],  # signal
        "b": [judged(multi_turn("market-b", r), 0.5) for r in (2.0, 0.0)],  # signal, judged
        "c": [multi_turn("market-c", 1.0)],  # alone: no signal
        "d": [multi_turn("market-d", 0.5), multi_turn("market-d", 0.5)],  # equal rewards: no signal
    }


@pytest.fixture
def start_readiness(connection: ConnectionSettings, services: list[Service]) -> Callable[..., Awaitable[Readiness]]:
    async def start(**overrides: Any) -> Readiness:
        readiness = Readiness(ReadinessSettings(**{**RULES, **overrides}), connection)
        await readiness.service.start()
        services.append(readiness.service)
        return readiness

    return start


async def ask(connection: ConnectionSettings, verb: str, body: dict[str, Any] | None = None) -> Any:
    nc = await nats.connect(connection.nats_url)
    try:
        subject = Topology(connection.nats_prefix).subject(f"cmd.readiness.{verb}")
        reply = await nc.request(subject, json.dumps(body or {}).encode(), timeout=10)
    finally:
        await nc.close()
    return json.loads(reply.data)


async def announced(js: JetStreamContext, topology: Topology) -> list[BatchCreated]:
    found = await stream_messages(js, topology.stream(PIPELINE), topology.subject(BATCH_CREATED))
    return [BatchCreated.model_validate(m) for m in found]


async def test_the_verdict_the_batch_and_its_frozen_membership(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology, start_readiness: Any
) -> None:
    episodes = fleet()
    await store(connection.pg_dsn, [e for group in episodes.values() for e in group])
    await start_readiness(min_trajectories=9)

    status = await ask(connection, "status")
    assert status["ok"], status
    verdict = status["result"]
    numbers = verdict["numbers"]
    assert (numbers["eligible"], numbers["groups_with_signal"], numbers["trainable"], numbers["judged"]) == (8, 2, 5, 2)
    assert numbers["quality"] == 1.0
    assert not verdict["ready"]
    assert [r["rule"] for r in verdict["rules"] if not r["passed"]] == ["trajectories"]  # 8 of 9

    # Not forced: the rules say no, nothing happens.
    answer = (await ask(connection, "trigger", {"who": "alice", "why": "curious"}))["result"]
    assert answer["created"] is False
    # Forced: a batch of the trainable groups, with who and why recorded.
    answer = (await ask(connection, "trigger", {"force": True, "who": "alice", "why": "try the new reward"}))["result"]
    assert answer["created"] and answer["batch"]["trajectories"] == 5 and answer["batch"]["groups"] == 2
    batch_id = uuid.UUID(answer["batch"]["batch_id"])
    row = (await _rows(connection.pg_dsn, "SELECT triggered_by, reason, forced FROM readiness.batches"))[0]
    assert (row["triggered_by"], row["reason"], row["forced"]) == ("manual:alice", "try the new reward", True)

    # Announced once, with exactly the trajectories of the groups that carry signal.
    events = await announced(js, topology)
    assert len(events) == 1 and events[0].batch_id == batch_id
    assert events[0].event_id == stable_id("batch.created", batch_id)
    expected = {e.tid for e in episodes["a"] + episodes["b"]}
    assert set(events[0].trajectory_ids) == expected
    assert events[0].triggered_by == "manual:alice" and events[0].rules["trajectories"] == 8

    # Frozen: those trajectories are not eligible again ...
    after = (await ask(connection, "status"))["result"]["numbers"]
    assert (after["eligible"], after["trainable"]) == (3, 0)
    nothing = await ask(connection, "trigger", {"force": True, "who": "alice"})
    assert not nothing["ok"] and "nothing to train on" in nothing["error"]
    # ... unless the batch is released (its training failed).
    released = (await ask(connection, "release", {"batch_id": str(batch_id), "reason": "trainer crashed"}))["result"]
    assert released["trajectories_freed"] == 5
    assert (await ask(connection, "status"))["result"]["numbers"]["eligible"] == 8


async def test_completed_trajectories_trigger_an_evaluation_and_the_batch_becomes_a_dataset(
    connection: ConnectionSettings,
    js: JetStreamContext,
    topology: Topology,
    start_readiness: Any,
    services: list[Service],
) -> None:
    archiver = Archiver(ArchiverSettings(segment_max_age_s=0.5), connection)
    await archiver.service.start()
    services.append(archiver.service)
    await start_readiness(event_debounce_s=0.3, min_trajectories=5)
    episodes = fleet()
    await store(connection.pg_dsn, [e for group in episodes.values() for e in group])
    # The recorder would announce these; here they are published as it does.
    episode = episodes["a"][0]
    event = TrajectoryCompleted(
        event_id=stable_id("trajectory.completed", episode.tid),
        trajectory_id=episode.tid,
        agent_id=episode.agent,
        scenario_id="market-a",
        status="completed",
        event_count=len(episode.events),
    )
    await js.publish(
        topology.subject(TRAJECTORY_COMPLETED),
        event.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(event.event_id)},
    )

    async def exported() -> bool:
        found = await stream_messages(js, topology.stream(PIPELINE), topology.subject(DATASET_EXPORTED))
        return len(found) == 1

    await eventually(exported, timeout=30, what="readiness → batch.created → archiver → dataset.exported")
    batch = (await announced(js, topology))[0]
    assert batch.triggered_by == "readiness"
    assert (
        await scalar(connection.pg_dsn, "SELECT count(*) FROM archiver.datasets WHERE batch_id = $1", batch.batch_id)
        == 1
    )


async def _rows(dsn: str, sql: str) -> list[Any]:
    from tests.support import query

    return await query(dsn, sql)


async def test_operators_ask_with_cuneiform_ask(connection: ConnectionSettings, start_readiness: Any) -> None:
    import asyncio
    import subprocess
    import sys
    from pathlib import Path

    await start_readiness()
    env = deployment_env(connection)
    script = str(Path(sys.executable).parent / "cuneiform-ask")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([script, *args], env=env, capture_output=True, text=True, timeout=60)

    early = await asyncio.to_thread(run, "readiness", "status")
    assert early.returncode == 1 and "start cuneiform-recorder" in early.stderr
    await store(connection.pg_dsn, [])  # the recorder's tables, empty
    status = await asyncio.to_thread(run, "readiness", "status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["ready"] is False  # an empty database
    refused = await asyncio.to_thread(run, "readiness", "trigger", '{"force": true, "who": "bob"}')
    assert refused.returncode == 1 and "nothing to train on" in refused.stderr
    nobody = await asyncio.to_thread(run, "deployer", "status")
    assert nobody.returncode == 1 and "no deployer service answers" in nobody.stderr
