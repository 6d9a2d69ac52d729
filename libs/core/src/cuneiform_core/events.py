"""Internal events between services (stream PIPELINE and DLQ), and how they are published.

Like the public contract, every internal event is a frozen pydantic model carrying ``v`` and a
producer-made ``event_id``; ``publish`` sends it as JSON with ``Nats-Msg-Id`` = ``event_id`` and waits
for the stream's ack, so a retried publish is deduplicated by the server and never doubled. The
event id is derived from what the event is about (``stable_id``), so a service that crashes after
committing but before publishing publishes the same id again on restart.

Event types owned by later services are added here, additively, by the issue that builds them.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from faststream.nats import NatsBroker
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

_NAMESPACE = uuid.UUID("5d1f3e1c-4a6b-4f51-9d7e-2b8c0f6a9e11")


def stable_id(*parts: object) -> uuid.UUID:
    """A UUIDv5 from what an event is about: the same facts always give the same id."""
    return uuid.uuid5(_NAMESPACE, "\x1f".join(str(p) for p in parts))


def _now() -> datetime:
    return datetime.now(UTC)


class PipelineEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    v: Literal[1] = 1
    event_id: uuid.UUID
    occurred_at: AwareDatetime = Field(default_factory=_now)


class TrajectoryCompleted(PipelineEvent):
    """The recorder has every event of a trajectory (or gave up waiting: status tells which)."""

    trajectory_id: uuid.UUID
    agent_id: str
    scenario_id: str
    status: Literal["completed", "failed", "aborted", "incomplete", "abandoned"]
    event_count: int
    total_reward: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    deployment_id: str | None = None


class BatchCreated(PipelineEvent):
    """Readiness froze a training batch: these trajectories, and no others, are its data.

    Membership travels in the event (a batch is bounded by readiness's ``max_batch_trajectories``), so
    the export needs nothing but the event and the recorder's tables to be reproducible.
    """

    batch_id: uuid.UUID
    trajectory_ids: list[uuid.UUID]
    #: Who or what created it (``readiness``, ``cli:<user>``) and why (a rule summary, a reason).
    triggered_by: str = "readiness"
    reason: str = ""
    #: The numbers behind the decision (rule name → value), for the dataset manifest and the audit.
    rules: dict[str, float | int | bool | str | None] = Field(default_factory=dict)


class DatasetFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    key: str
    size: int
    sha256: str
    #: Lines (records) in the file.
    records: int
    format: str


class DatasetExported(PipelineEvent):
    """A dataset is complete in the object store (its manifest exists): trainers may use it."""

    dataset_id: uuid.UUID
    batch_id: uuid.UUID | None = None
    bucket: str
    prefix: str
    manifest_key: str
    manifest_sha256: str
    files: list[DatasetFile]
    trajectory_count: int
    group_count: int
    #: Groups left out of ``art.jsonl`` (fewer than 2 trajectories, or zero reward spread).
    excluded_group_count: int = 0


class OfferedFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    #: Presigned GET URL: trainers need no storage credentials.
    url: str
    sha256: str
    size: int


class TrainingOffer(PipelineEvent):
    """``batch.ready.<pool>`` (work queue): one trainer claims it. ``attempt`` fences: reports carrying
    another attempt number are rejected, so a trainer that lost its claim can never register a model."""

    batch_id: uuid.UUID
    dataset_id: uuid.UUID
    attempt: int
    pool: str
    model_name: str
    base_model: str
    #: The starting model's artifact (presigned GET) and its sha256, when there is one.
    base_model_url: str | None = None
    base_model_sha256: str | None = None
    hyperparameters: dict[str, float | int | str | bool] = Field(default_factory=dict)
    files: list[OfferedFile]
    artifact_key: str
    #: Presigned PUT URL for the trained artifact.
    artifact_upload_url: str
    #: A claimed offer whose trainer is silent this long is taken back and offered again.
    heartbeat_timeout_s: float


TRAINING_REPORT_KINDS = ("claimed", "heartbeat", "progress", "completed", "failed")


class TrainingReport(PipelineEvent):
    """``training.<batch_id>.<kind>``: what a trainer says about its attempt."""

    batch_id: uuid.UUID
    attempt: int
    trainer_id: str
    kind: Literal["claimed", "heartbeat", "progress", "completed", "failed"]
    step: int | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    artifact_size: int | None = None
    artifact_sha256: str | None = None
    reason: str | None = None


class ModelTrained(PipelineEvent):
    """A verified artifact registered as a new model version, with its lineage."""

    model_name: str
    model_version: str
    batch_id: uuid.UUID
    dataset_id: uuid.UUID
    base_model: str
    bucket: str
    artifact_key: str
    artifact_sha256: str
    artifact_size: int
    metrics: dict[str, float] = Field(default_factory=dict)
    trainer_id: str
    attempt: int


class DeploymentChanged(PipelineEvent):
    """``pipeline.deployment.changed``: the routing of ``model_name`` changed (a deployment, a promotion,
    a rollback, a pin). ``routing`` is the new table exactly as written to the ``routing`` KV bucket."""

    model_name: str
    deployment_id: uuid.UUID
    action: Literal["deploy", "promote", "rollback", "pin", "unpin"]
    #: ``operator:<who>`` for commands, ``deployer:auto`` for the evaluation rule and automatic rollouts.
    actor: str
    reason: str
    revision: int
    strategy: str
    #: Version → weight before and after.
    previous: dict[str, float] = Field(default_factory=dict)
    current: dict[str, float] = Field(default_factory=dict)
    routing: dict[str, Any] = Field(default_factory=dict)
    #: The evaluation behind an automatic decision (per-arm statistics, test, p-values).
    evaluation: dict[str, Any] | None = None


class DeadLetter(PipelineEvent):
    """A message a service can never process: why, and the exact bytes, for inspection or replay."""

    service: str
    consumer: str
    reason: str
    kind: Literal["malformed", "invalid", "rejected", "poison"]
    subject: str
    stream: str | None = None
    stream_seq: int | None = None
    num_delivered: int | None = None
    msg_id: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    payload_b64: str

    @property
    def payload(self) -> bytes:
        return base64.b64decode(self.payload_b64)


async def publish(
    broker: NatsBroker, subject: str, event: PipelineEvent, *, stream: str, timeout: float = 10.0
) -> None:
    """Publish to a JetStream stream, deduplicated by ``event_id``; returns once the stream has it."""
    await broker.publish(
        event.model_dump_json().encode(),
        subject,
        headers={"Nats-Msg-Id": str(event.event_id), "content-type": "application/json"},
        stream=stream,
        timeout=timeout,
    )
