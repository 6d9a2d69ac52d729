"""Training through the running services on real NATS, PostgreSQL and S3: a batch is offered, claimed,
trained by the reference trainer's CPU backend, verified and registered once; a trainer that goes
silent loses the batch to a new attempt and its late completion is rejected; a corrupt artifact is
rejected and the batch offered again."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from cuneiform_archiver.main import Archiver
from cuneiform_archiver.settings import ArchiverSettings
from cuneiform_core.events import BatchCreated, ModelTrained, TrainingOffer, TrainingReport, stable_id
from cuneiform_core.service import Service
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.storage import ObjectStore
from cuneiform_core.topology import (
    BATCH_CREATED,
    BATCHES,
    MODEL_TRAINED,
    PIPELINE,
    ROUTING_BUCKET,
    TRAINING,
    Topology,
    training_subject,
)
from cuneiform_demo.environment import Episode as Market
from cuneiform_demo.environment import make_scenario
from cuneiform_demo.policy import TRADE_TOOL, TabularPolicy, chat_messages, tool_call_response
from cuneiform_sdk.routing import Arm, ArtifactRef, RoutingTable
from cuneiform_trainer.main import Trainer
from cuneiform_trainer.settings import TrainerSettings
from cuneiform_trainer_dispatcher.main import Dispatcher
from cuneiform_trainer_dispatcher.settings import DispatcherSettings
from nats.js import JetStreamContext

from tests.faults.test_recorder_faults import stream_messages
from tests.integration.test_datasets import Episode, store
from tests.support import eventually, query

pytestmark = pytest.mark.integration


def demo_episode(seed: int, rng: random.Random) -> Episode:
    """A demo agent's episode as contract events: one chat call per decision, the market's rewards."""
    market = Market(make_scenario(seed))
    policy = TabularPolicy()
    episode = Episode(f"market-{seed:08x}", f"agent-{rng.randrange(100)}")
    while not market.done:
        observation = market.observe()
        action = policy.sample(observation.trend, rng)
        episode.call(
            observation.step,
            chat_messages(observation),
            tool_call_response(action, f"call-{observation.step}"),
            tools=[TRADE_TOOL],
        )
        market.act(action)
    episode.end(market.total_reward)
    return episode


async def start(services: list[Service], service: Service) -> None:
    await service.start()
    services.append(service)


async def batch_of_demo_data(connection: ConnectionSettings, js: JetStreamContext, topology: Topology) -> BatchCreated:
    rng = random.Random(3)
    episodes = [demo_episode(1000 + g, rng) for g in range(12) for _ in range(4)]
    await store(connection.pg_dsn, episodes)
    batch = BatchCreated(event_id=uuid.uuid4(), batch_id=uuid.uuid4(), trajectory_ids=[e.tid for e in episodes])
    await js.publish(
        topology.subject(BATCH_CREATED), batch.model_dump_json().encode(), headers={"Nats-Msg-Id": str(batch.event_id)}
    )
    return batch


async def models(dsn: str) -> list[Any]:
    return await query(dsn, "SELECT * FROM trainer_dispatcher.models ORDER BY created_at")


async def model_events(js: JetStreamContext, topology: Topology) -> list[ModelTrained]:
    found = await stream_messages(js, topology.stream(PIPELINE), topology.subject(MODEL_TRAINED))
    return [ModelTrained.model_validate(m) for m in found]


def dispatcher(connection: ConnectionSettings, **overrides: Any) -> Dispatcher:
    settings = {"heartbeat_timeout_s": 1.5, "sweep_interval_s": 0.3, "hyperparameters": {"epochs": 20}, **overrides}
    return Dispatcher(DispatcherSettings(**settings), connection)


def trainer(connection: ConnectionSettings, name: str = "trainer-a", **overrides: Any) -> Trainer:
    return Trainer(TrainerSettings(trainer_id=name, heartbeat_interval_s=0.3, **overrides), connection)


def wandb_runs(directory: Path) -> list[dict[str, Any]]:
    """The offline W&B runs under ``directory``, read back with wandb's own record reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    runs = []
    for path in sorted(directory.glob("wandb/offline-run-*/run-*.wandb")):
        run: dict[str, Any] = {"history": [], "summary": {}, "config": {}}
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["name"], run["group"] = record.run.display_name, record.run.run_group
                run["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                run["history"].append(row)
            elif kind == "summary":
                run["summary"].update(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update}
                )
        runs.append(run)
    return runs


async def test_a_batch_is_trained_by_the_reference_trainer_and_registered_once(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology, services: list[Service], tmp_path: Path
) -> None:
    await start(services, Archiver(ArchiverSettings(segment_max_age_s=0.5), connection).service)
    await start(services, dispatcher(connection).service)
    # With Weights & Biases logging in offline mode: no account, no network.
    await start(services, trainer(connection, wandb_mode="offline", wandb_dir=tmp_path).service)
    batch = await batch_of_demo_data(connection, js, topology)

    async def registered() -> bool:
        try:
            return len(await models(connection.pg_dsn)) == 1 and len(await model_events(js, topology)) == 1
        except Exception:
            return False

    await eventually(registered, timeout=60, what="a model registered and announced")
    model = (await models(connection.pg_dsn))[0]
    event = (await model_events(js, topology))[0]
    assert (model["model_name"], model["model_version"], model["batch_id"]) == ("demo-policy", "v2", batch.batch_id)
    assert event.model_version == "v2" and event.batch_id == batch.batch_id and event.attempt == 1
    assert event.dataset_id == stable_id("dataset", batch.batch_id)
    # The artifact in S3 is what the registry says, and it is the trained policy.
    artifact = await ObjectStore.from_settings(connection).get_bytes(model["artifact_key"])
    assert hashlib.sha256(artifact).hexdigest() == model["artifact_sha256"] == event.artifact_sha256
    trained = TabularPolicy.loads(artifact.decode())
    assert trained.logits != TabularPolicy().logits
    assert model["metrics"]["groups_used"] > 0
    attempts = await query(connection.pg_dsn, "SELECT outcome FROM trainer_dispatcher.attempts")
    assert [a["outcome"] for a in attempts] == ["completed"]
    # The trainer reported as it went: claimed, progress per epoch (step, loss), completed.
    reports = await stream_messages(js, topology.stream(TRAINING), topology.subject(f"training.{batch.batch_id}.*"))
    kinds = [r["kind"] for r in reports]
    assert kinds[0] == "claimed" and kinds[-1] == "completed" and kinds.count("progress") == 20
    assert all("loss" in r["metrics"] for r in reports if r["kind"] == "progress")
    # The attempt is a W&B run: the offer as config, a history row per epoch, the outcome in the summary.
    [run] = wandb_runs(tmp_path)
    assert run["name"] == f"demo-policy-{batch.batch_id}-a1" and run["group"] == str(batch.batch_id)
    assert run["config"]["backend"] == "cpu" and run["config"]["hyperparameters"] == {"epochs": 20}
    losses = [row["loss"] for row in run["history"] if "loss" in row]
    assert losses == [r["metrics"]["loss"] for r in reports if r["kind"] == "progress"]
    assert run["summary"]["outcome"] == "completed"
    assert run["summary"]["final/groups_used"] == model["metrics"]["groups_used"]


async def take_offer(js: JetStreamContext, topology: Topology) -> tuple[TrainingOffer, Any]:
    """Claim the next offer as a trainer would (the same work-queue consumer), by hand."""
    sub = await js.pull_subscribe(
        topology.subject("batch.ready.default"),
        durable=f"{topology.prefix}_trainer-default",
        stream=topology.stream(BATCHES),
    )
    msgs = await sub.fetch(1, timeout=30)
    await msgs[0].ack()
    await sub.unsubscribe()
    return TrainingOffer.model_validate_json(msgs[0].data), sub


async def say(
    js: JetStreamContext, topology: Topology, offer: TrainingOffer, kind: str, trainer_id: str, **fields: Any
) -> None:
    report = TrainingReport(
        event_id=uuid.uuid4(),
        batch_id=offer.batch_id,
        attempt=offer.attempt,
        trainer_id=trainer_id,
        kind=kind,
        **fields,
    )
    await js.publish(
        topology.subject(training_subject(offer.batch_id, kind)),
        report.model_dump_json().encode(),
        headers={"Nats-Msg-Id": str(report.event_id)},
    )


async def test_a_silent_trainer_loses_the_batch_and_its_late_completion_is_rejected(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology, services: list[Service]
) -> None:
    await start(services, Archiver(ArchiverSettings(segment_max_age_s=0.5), connection).service)
    await start(services, dispatcher(connection).service)
    await batch_of_demo_data(connection, js, topology)

    # A trainer claims attempt 1, then dies (no heartbeat, no result).
    offer, _ = await take_offer(js, topology)
    assert offer.attempt == 1
    await say(js, topology, offer, "claimed", "doomed")

    # The dispatcher takes it back; a live trainer gets attempt 2 and finishes it.
    await start(services, trainer(connection, "survivor").service)

    async def registered() -> bool:
        return len(await models(connection.pg_dsn)) == 1

    await eventually(registered, timeout=60, what="attempt 2 trained and registered")
    model = (await models(connection.pg_dsn))[0]
    assert (model["attempt"], model["trainer_id"]) == (2, "survivor")

    # The dead trainer comes back with a completion for attempt 1: fenced off, no second model.
    await say(js, topology, offer, "completed", "doomed", artifact_size=3, artifact_sha256="0" * 64)

    async def rejected() -> bool:
        rows = await query(connection.pg_dsn, "SELECT kind, reason FROM trainer_dispatcher.rejected_reports")
        return any(r["kind"] == "completed" and "stale attempt 1" in r["reason"] for r in rows)

    await eventually(rejected, timeout=20, what="the stale completion rejected")
    assert len(await models(connection.pg_dsn)) == 1
    outcomes = await query(
        connection.pg_dsn, "SELECT attempt, outcome FROM trainer_dispatcher.attempts ORDER BY attempt"
    )
    assert [(a["attempt"], a["outcome"]) for a in outcomes] == [(1, "timed_out"), (2, "completed")]


async def test_a_corrupt_artifact_is_rejected_and_the_batch_offered_again(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology, services: list[Service]
) -> None:
    await start(services, Archiver(ArchiverSettings(segment_max_age_s=0.5), connection).service)
    await start(services, dispatcher(connection, heartbeat_timeout_s=30).service)
    await batch_of_demo_data(connection, js, topology)

    offer, _ = await take_offer(js, topology)
    await say(js, topology, offer, "claimed", "sloppy")
    garbage = b"not a policy"
    request = urllib.request.Request(
        offer.artifact_upload_url, data=garbage, method="PUT", headers={"Content-Type": "application/octet-stream"}
    )
    await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=30).close())
    # It claims a digest that is not what it uploaded.
    await say(js, topology, offer, "completed", "sloppy", artifact_size=len(garbage), artifact_sha256="1" * 64)

    again, _ = await take_offer(js, topology)
    assert again.attempt == 2 and again.batch_id == offer.batch_id
    assert again.artifact_key != offer.artifact_key  # a new attempt writes elsewhere
    outcome = await query(connection.pg_dsn, "SELECT outcome, reason FROM trainer_dispatcher.attempts")
    assert outcome[0]["outcome"] == "rejected_artifact" and "does not match" in outcome[0]["reason"]
    assert await models(connection.pg_dsn) == []


async def test_a_batch_trains_from_the_champion_the_fleet_runs(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology, services: list[Service]
) -> None:
    await start(services, Archiver(ArchiverSettings(segment_max_age_s=0.5), connection).service)
    # The deployer's routing table says every agent runs v7 (a policy that already follows the trend).
    store = ObjectStore.from_settings(connection)
    champion = TabularPolicy(
        logits={"up": {"buy": 2.0, "sell": -1.0, "hold": 0.0}, "down": {"buy": -1.0, "sell": 2.0, "hold": 0.0},
                "flat": {"buy": 0.0, "sell": 0.0, "hold": 1.0}},
        version="v7",
    )  # fmt: skip
    body = champion.dumps().encode()
    await store.put_bytes("models/demo-policy/manual/v7/artifact", body)
    table = RoutingTable(
        model_name="demo-policy",
        deployment_id=str(uuid.uuid4()),
        strategy="immediate",
        revision=1,
        arms=[
            Arm(
                version="v7",
                weight=1.0,
                role="champion",
                artifact=ArtifactRef(
                    bucket=store.bucket,
                    key="models/demo-policy/manual/v7/artifact",
                    sha256=hashlib.sha256(body).hexdigest(),
                ),
            )
        ],
    )
    kv = await js.key_value(topology.bucket(ROUTING_BUCKET))
    await kv.put("demo-policy", table.model_dump_json().encode())
    await start(services, dispatcher(connection).service)
    await start(services, trainer(connection).service)

    batch = await batch_of_demo_data(connection, js, topology)

    async def registered() -> bool:
        return len(await models(connection.pg_dsn)) == 1 and len(await model_events(js, topology)) == 1

    await eventually(registered, timeout=60, what="a model trained from the champion and registered")
    [row] = await query(connection.pg_dsn, "SELECT base_model, base_artifact FROM trainer_dispatcher.batches")
    assert row["base_model"] == "demo-policy:v7" and row["base_artifact"]["sha256"] == hashlib.sha256(body).hexdigest()
    [event] = await model_events(js, topology)
    assert event.base_model == "demo-policy:v7" and event.batch_id == batch.batch_id
    # Trained from v7, not from the untrained policy: it keeps v7's strong preferences.
    trained = TabularPolicy.loads((await store.get_bytes(event.artifact_key)).decode())
    assert trained.probabilities("up")["buy"] > 0.8 > TabularPolicy().probabilities("up")["buy"]
