"""The deployer on real NATS (JetStream + KV), PostgreSQL and S3, with the real recorder and the SDK's
routing client: registration (trained and by hand), rollouts the SDK follows live, trajectories stamped
with the version and deployment they ran under, automatic promotion and rollback on live reward, and
manual rollback reaching a running client within seconds."""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from cuneiform_core.events import DeploymentChanged, ModelTrained
from cuneiform_core.service import Service
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.storage import ObjectStore
from cuneiform_core.topology import (
    DEPLOYMENT_CHANGED,
    DLQ,
    MODEL_TRAINED,
    PIPELINE,
    ROUTING_BUCKET,
    Topology,
    command_subject,
)
from cuneiform_deployer.main import Deployer
from cuneiform_deployer.settings import DeployerSettings
from cuneiform_recorder.main import build as build_recorder
from cuneiform_recorder.settings import RecorderSettings
from cuneiform_sdk import Recorder
from cuneiform_sdk.routing import Routing, SyncRouting
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from tests.faults.test_recorder_faults import stream_messages
from tests.support import eventually, query

pytestmark = pytest.mark.integration

MODEL = "demo-policy"


async def ask(connection: ConnectionSettings, verb: str, body: dict[str, Any]) -> Any:
    """What an operator's CLI does: cmd.deployer.<verb> over NATS."""
    nc = await nats.connect(connection.nats_url)
    try:
        subject = Topology(connection.nats_prefix).subject(command_subject("deployer", verb))
        reply = await nc.request(subject, json.dumps(body).encode(), timeout=30)
    finally:
        await nc.close()
    answer = json.loads(reply.data)
    if not answer["ok"]:
        raise AssertionError(answer["error"])
    return answer["result"]


async def upload(connection: ConnectionSettings, version: str) -> tuple[str, str]:
    body = json.dumps({"policy": version}).encode()
    key = f"models/{MODEL}/manual/{version}/artifact"
    await ObjectStore.from_settings(connection).put_bytes(key, body)
    return key, hashlib.sha256(body).hexdigest()


async def register(connection: ConnectionSettings, version: str) -> Any:
    key, sha256 = await upload(connection, version)
    return await ask(
        connection,
        "register",
        {
            "model_name": MODEL,
            "version": version,
            "artifact_key": key,
            "sha256": sha256,
            "who": "test",
            "why": "by hand",
        },
    )


async def announce_trained(
    js: JetStreamContext, topology: Topology, connection: ConnectionSettings, version: str
) -> ModelTrained:
    """A trained version as the trainer-dispatcher announces it (its dataset's manifest in S3)."""
    store = ObjectStore.from_settings(connection)
    dataset_id, batch_id = uuid.uuid4(), uuid.uuid4()
    trajectories = sorted(str(uuid.uuid4()) for _ in range(3))
    await store.put_bytes(f"datasets/{dataset_id}/manifest.json", json.dumps({"trajectory_ids": trajectories}).encode())
    key = f"models/{MODEL}/batches/{batch_id}/attempt-1/artifact"
    body = json.dumps({"policy": version, "trained_on": str(batch_id)}).encode()
    await store.put_bytes(key, body)
    event = ModelTrained(
        event_id=uuid.uuid4(),
        model_name=MODEL,
        model_version=version,
        batch_id=batch_id,
        dataset_id=dataset_id,
        base_model=f"{MODEL}:v1",
        bucket=store.bucket,
        artifact_key=key,
        artifact_sha256=hashlib.sha256(body).hexdigest(),
        artifact_size=len(body),
        metrics={"loss": 0.5},
        trainer_id="trainer-a",
        attempt=1,
    )
    for _ in range(2):  # announced twice (a redelivery): registered and rolled out once
        await js.publish(
            topology.subject(MODEL_TRAINED),
            event.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(uuid.uuid4())},
        )
    return event


async def changes(js: JetStreamContext, topology: Topology) -> list[DeploymentChanged]:
    found = await stream_messages(js, topology.stream(PIPELINE), topology.subject(DEPLOYMENT_CHANGED))
    return [DeploymentChanged.model_validate(m) for m in found]


@pytest.fixture
async def stack(
    connection: ConnectionSettings, services: list[Service], tmp_path: Path
) -> AsyncIterator[tuple[Recorder, Routing]]:
    recorder_service = build_recorder(RecorderSettings(sweep_interval_s=0.2), connection)
    await recorder_service.start()
    services.append(recorder_service)
    routing = Routing(connection.nats_url, prefix=connection.nats_prefix, retry_interval=0.2)
    await routing.start()
    # With routing attached, a trajectory whose model is given by name is stamped with the agent's arm.
    sdk = Recorder(connection.nats_url, prefix=connection.nats_prefix, outbox_dir=tmp_path / "outbox", routing=routing)
    await sdk.start()
    yield sdk, routing
    await routing.close()
    await sdk.close()


async def start_deployer(connection: ConnectionSettings, services: list[Service], **overrides: Any) -> Deployer:
    settings = {
        "auto_rollout": "ab",
        "min_trajectories": 20,
        "evaluate_interval_s": 0.5,
        "event_debounce_s": 0.2,
        "sweep_interval_s": 0.3,
        **overrides,
    }
    deployer = Deployer(DeployerSettings(**settings), connection)
    await deployer.service.start()
    services.append(deployer.service)
    return deployer


def play(
    sdk: Recorder,
    routing: Routing,
    agents: int,
    rewards: dict[str, float],
    rng: random.Random,
    *,
    fail: str | None = None,
) -> dict[str, int]:
    """One episode per agent, under whatever version routing gives it; reward drawn around that version's
    mean. Returns how many episodes each version played."""
    played: dict[str, int] = {}
    for n in range(agents):
        agent = f"agent-{n}"
        model = routing.model_for(MODEL, agent)
        assert model.version is not None, "every agent resolves a version once a deployment exists"
        played[model.version] = played.get(model.version, 0) + 1
        t = sdk.trajectory(agent_id=agent, scenario_id=f"market-{n % 7}", model=MODEL)
        t.start()
        t.llm_call(messages=[{"role": "user", "content": "trend up"}], response={"role": "assistant", "content": "buy"})
        reward = rng.gauss(rewards[model.version], 1.0)
        if fail == model.version:
            t.end("failed", error="tool crashed")
        else:
            t.end(total_reward=reward)
    return played


async def test_registry_rollout_evaluation_and_promotion(
    connection: ConnectionSettings,
    js: JetStreamContext,
    topology: Topology,
    services: list[Service],
    stack: tuple[Recorder, Routing],
) -> None:
    sdk, routing = stack
    await start_deployer(connection, services)
    # v1 uploaded by hand and deployed to everyone.
    assert (await register(connection, "v1"))["registered"] is True
    assert (await register(connection, "v1"))["existing"] is True  # same bytes again: nothing new
    await ask(
        connection,
        "deploy",
        {"model_name": MODEL, "version": "v1", "strategy": "immediate", "who": "ops", "why": "first"},
    )
    await routing.wait_for(lambda t: MODEL in t, timeout=5)
    assert routing.model_for(MODEL, "agent-1").version == "v1"

    # v2 comes from training (announced twice): registered once, with its lineage, and A/B-tested against v1.
    trained = await announce_trained(js, topology, connection, "v2")
    await routing.wait_for(lambda t: MODEL in t and len(t[MODEL].arms) == 2, timeout=10)
    [v2] = (await ask(connection, "models", {"model_name": MODEL, "version": "v2"}))["models"]
    assert (v2["source"], v2["batch_id"], v2["dataset_id"]) == (
        "trained",
        str(trained.batch_id),
        str(trained.dataset_id),
    )
    assert v2["trajectory_count"] == 3 and len(v2["trajectory_ids"]) == 3
    assert v2["artifact_sha256"] == trained.artifact_sha256
    table = routing.table(MODEL)
    assert (
        table is not None
        and table.strategy == "ab"
        and {a.version: a.weight for a in table.arms} == {"v2": 0.5, "v1": 0.5}
    )
    assert table.artifact("v2") is not None and table.artifact("v2").sha256 == trained.artifact_sha256  # type: ignore[union-attr]
    experiment = table.deployment_id

    # The fleet plays under its arms; v2 earns more. Trajectories carry version + deployment + variant.
    rng = random.Random(5)
    played: dict[str, int] = {}
    while routing.table(MODEL).strategy == "ab":  # type: ignore[union-attr]
        for version, count in play(sdk, routing, 40, {"v1": 1.0, "v2": 2.0}, rng).items():
            played[version] = played.get(version, 0) + count
        assert await sdk.flush(10)
        await eventually(
            lambda: _stored(connection, experiment, sum(played.values())), timeout=15, what="the episodes stored"
        )
        if sum(played.values()) >= 400:
            break
    await routing.wait_for(lambda t: t[MODEL].strategy == "immediate", timeout=15)
    table = routing.table(MODEL)
    assert table is not None and [a.version for a in table.arms] == ["v2"], "the better challenger is promoted"
    # About half the agents on each arm: 40 agents keep their arms, so the share is one binomial(40, 0.5)
    # draw (outside 0.2 to 0.8 with probability ~1e-4).
    assert 0.2 < played["v2"] / sum(played.values()) < 0.8

    stamped = await query(
        connection.pg_dsn,
        "SELECT model_version, variant, count(*) AS n FROM recorder.trajectories WHERE deployment_id = $1 GROUP BY 1, 2",
        experiment,
    )
    assert {(r["model_version"], r["variant"]) for r in stamped} == {("v1", "champion"), ("v2", "challenger")}

    events = await changes(js, topology)
    assert [(e.action, e.actor, e.current) for e in events] == [
        ("deploy", "operator:ops", {"v1": 1.0}),
        ("deploy", "deployer:auto", {"v2": 0.5, "v1": 0.5}),
        ("promote", "deployer:auto", {"v2": 1.0}),
    ]
    promotion = events[-1]
    assert promotion.evaluation is not None and promotion.evaluation["test"] == "welch_t"
    assert promotion.evaluation["p_better"] < 0.05 and promotion.reason.startswith("better")
    status = (await ask(connection, "status", {"model_name": MODEL}))["models"][MODEL]
    assert status["in_kv"] and status["by_version"]["v2"]["mean_reward"] > status["by_version"]["v1"]["mean_reward"]


async def _stored(connection: ConnectionSettings, deployment: str, expected: int) -> bool:
    rows = await query(
        connection.pg_dsn,
        "SELECT count(*) AS n FROM recorder.trajectories WHERE deployment_id = $1 AND status IN ('completed', 'failed')",
        deployment,
    )
    return rows[0]["n"] >= expected


async def test_a_worse_canary_and_a_failing_one_are_rolled_back(
    connection: ConnectionSettings,
    js: JetStreamContext,
    topology: Topology,
    services: list[Service],
    stack: tuple[Recorder, Routing],
) -> None:
    sdk, routing = stack
    await start_deployer(connection, services, auto_rollout="off", min_trajectories=15)
    for version in ("v1", "v2", "v3"):
        await register(connection, version)
    await ask(connection, "deploy", {"model_name": MODEL, "version": "v1", "who": "ops", "why": "baseline"})
    rng = random.Random(11)

    async def run_until_decided(rewards: dict[str, float], fail: str | None = None) -> None:
        for _ in range(30):
            play(sdk, routing, 30, rewards, rng, fail=fail)
            assert await sdk.flush(10)
            try:
                await routing.wait_for(lambda t: t[MODEL].strategy == "immediate", timeout=1.0)
                return
            except TimeoutError:
                continue
        raise AssertionError("the experiment was never decided")

    # A canary of 40 % that earns less: rolled back to v1.
    await ask(
        connection,
        "deploy",
        {"model_name": MODEL, "version": "v2", "strategy": "canary", "percent": 40, "who": "ops", "why": "try v2"},
    )
    await routing.wait_for(lambda t: t[MODEL].strategy == "canary", timeout=5)
    await run_until_decided({"v1": 2.0, "v2": 0.5})
    assert [a.version for a in routing.table(MODEL).arms] == ["v1"]  # type: ignore[union-attr]
    # A canary that fails a third of its episodes: the guardrail rolls it back, whatever its reward.
    await ask(
        connection,
        "deploy",
        {"model_name": MODEL, "version": "v3", "strategy": "canary", "percent": 50, "who": "ops", "why": "try v3"},
    )
    await routing.wait_for(lambda t: t[MODEL].strategy == "canary", timeout=5)
    await run_until_decided({"v1": 2.0, "v3": 9.0}, fail="v3")
    assert [a.version for a in routing.table(MODEL).arms] == ["v1"]  # type: ignore[union-attr]

    history = (await ask(connection, "history", {"model_name": MODEL}))["history"]
    rollbacks = [h for h in history if h["action"] == "rollback"]
    assert [h["actor"] for h in rollbacks] == ["deployer:auto", "deployer:auto"]
    assert rollbacks[0]["reason"].startswith("guardrail") and rollbacks[1]["reason"].startswith("worse")
    decided = await query(
        connection.pg_dsn, "SELECT status FROM deployer.deployments WHERE strategy = 'canary' ORDER BY created_at"
    )
    assert [d["status"] for d in decided] == ["rolled_back", "rolled_back"]


async def test_manual_rollback_reaches_a_running_client_within_seconds(
    connection: ConnectionSettings, services: list[Service], stack: tuple[Recorder, Routing]
) -> None:
    _, routing = stack
    await start_deployer(connection, services, auto_rollout="off")
    for version in ("v1", "v2"):
        await register(connection, version)
    await ask(connection, "deploy", {"model_name": MODEL, "version": "v1", "who": "ops", "why": "baseline"})
    await ask(connection, "deploy", {"model_name": MODEL, "version": "v2", "who": "ops", "why": "upgrade"})
    await routing.wait_for(lambda t: MODEL in t and t[MODEL].arms[0].version == "v2", timeout=5)
    # Pin one agent, then roll everyone else back: the pin survives, the rest run v1 again.
    await ask(
        connection, "pin", {"model_name": MODEL, "agent_id": "agent-7", "version": "v2", "who": "ops", "why": "debug"}
    )
    started = time.monotonic()
    await ask(connection, "rollback", {"model_name": MODEL, "who": "ops", "why": "complaints"})
    await routing.wait_for(lambda t: t[MODEL].arms[0].version == "v1", timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"rollback took {elapsed:.2f} s to reach the client"
    assert routing.model_for(MODEL, "agent-1").version == "v1"
    pinned = routing.model_for(MODEL, "agent-7")
    assert (pinned.version, pinned.variant) == ("v2", "pinned")
    # Bad requests get a clear answer and change nothing.
    for bad, expected in [
        ({"model_name": MODEL, "version": "v9", "who": "ops", "why": "x"}, "not registered"),
        ({"model_name": MODEL, "version": "v2"}, "say why"),
        ({"model_name": "bad name!", "version": "v2", "why": "x"}, "not valid"),
        ({"model_name": MODEL, "version": "v2", "strategy": "canary", "percent": 140, "why": "x"}, "percent"),
    ]:
        with pytest.raises(AssertionError, match=expected):
            await ask(connection, "deploy", bad)
    nc = await nats.connect(connection.nats_url)
    try:
        kv = await nc.jetstream().key_value(Topology(connection.nats_prefix).bucket(ROUTING_BUCKET))
        assert json.loads((await kv.get(MODEL)).value or b"{}")["arms"][0]["version"] == "v1"
    finally:
        await nc.close()


async def test_bad_announcements_are_dead_lettered_and_the_stream_goes_on(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology, services: list[Service]
) -> None:
    await start_deployer(connection, services, auto_rollout="immediate")
    subject = topology.subject(MODEL_TRAINED)
    # Not JSON; the wrong types; a version name already taken by another artifact (registered by hand).
    await register(connection, "v2")
    await js.publish(subject, b"{not json", headers={"Nats-Msg-Id": "bad-1"})
    await js.publish(
        subject, json.dumps({"model_name": MODEL, "model_version": 2}).encode(), headers={"Nats-Msg-Id": "bad-2"}
    )
    clash = await announce_trained(js, topology, connection, "v2")
    # ... and a good one after them, which still goes through and out to every agent (no champion yet).
    await announce_trained(js, topology, connection, "v3")

    async def letters() -> list[dict[str, Any]]:
        return await stream_messages(js, topology.stream(DLQ), topology.subject("dlq.deployer"))

    async def all_dead_lettered() -> bool:
        return len(await letters()) == 4  # the clash is announced twice (as a redelivery would)

    await eventually(all_dead_lettered, timeout=15, what="four dead letters from the deployer")
    reasons = [letter["reason"] for letter in await letters()]
    assert "Invalid JSON" in reasons[0] and "model_version: Input should be a valid string" in reasons[1]
    assert all("v2 is already registered with another artifact" in r for r in reasons[2:])

    async def v3_routed() -> bool:
        rows = await query(connection.pg_dsn, "SELECT routing FROM deployer.routing WHERE model_name = $1", MODEL)
        return bool(rows) and rows[0]["routing"]["arms"][0]["version"] == "v3"

    await eventually(v3_routed, timeout=15, what="v3 registered and deployed despite the bad messages before it")
    [v2] = (await ask(connection, "models", {"model_name": MODEL, "version": "v2"}))["models"]
    assert v2["source"] == "manual" and v2["artifact_sha256"] != clash.artifact_sha256


async def test_a_purged_routing_table_is_written_again_and_sync_agents_follow(
    connection: ConnectionSettings, services: list[Service]
) -> None:
    await start_deployer(connection, services, auto_rollout="off", reconcile_interval_s=0.3)
    await register(connection, "v1")
    await ask(connection, "deploy", {"model_name": MODEL, "version": "v1", "who": "ops", "why": "baseline"})
    with SyncRouting(connection.nats_url, prefix=connection.nats_prefix) as routing:  # a thread-based agent
        assert routing.model_for(MODEL, "agent-1").version == "v1"
        nc = await nats.connect(connection.nats_url)
        try:
            kv = await nc.jetstream().key_value(Topology(connection.nats_prefix).bucket(ROUTING_BUCKET))
            seen = routing.routing.updates
            await kv.purge(MODEL)  # someone wipes the key: agents fall back to the bare name, then ...

            async def restored() -> bool:
                try:
                    there = json.loads((await kv.get(MODEL)).value or b"{}")
                except KeyNotFoundError:
                    return False
                # ... the deployer writes the same table again, and the running client takes it.
                return there["revision"] == 1 and routing.routing.updates >= seen + 2

            await eventually(restored, timeout=10, what="the deployer writing the routing table again")
            assert routing.model_for(MODEL, "agent-1").version == "v1"
        finally:
            await nc.close()
