"""Every stream, KV bucket and object-store bucket of the system, in one place.

Services call ``ensure_topology`` at start: creating is idempotent, and a stream whose stored
configuration drifted from the code (limits raised in a release, say) is updated in place. All names
take the deployment's ``nats_prefix`` so that several deployments — or parallel tests — share one
server without seeing each other's traffic.

Limits use ``discard=new``: when a stream is full the producer gets an error on publish and keeps the
event (the SDK buffers and retries) instead of the broker silently dropping the oldest data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cuneiform_sdk.subjects import TRAJECTORY_SUBJECT_ROOT, with_prefix
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError

from .logging import get_logger
from .settings import ConnectionSettings

log = get_logger(__name__)

GIB = 1024**3
DAY = 24 * 3600.0
#: JetStream file storage the streams of one deployment may use together, split by ``storage_share``.
DEFAULT_STORAGE_GIB = 40.0

#: JetStream's error code for "insufficient storage resources available".
_INSUFFICIENT_STORAGE = 10047

#: The broker's default max_payload; the contract's claim check takes anything larger.
MAX_MESSAGE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StreamSpec:
    """A stream as the code wants it; ``config(prefix)`` yields the NATS configuration."""

    name: str
    subjects: tuple[str, ...]
    description: str
    #: This stream's share of the deployment's JetStream storage budget (``nats_storage_gib``).
    storage_share: float
    retention: RetentionPolicy = RetentionPolicy.LIMITS
    max_age: float = 7 * DAY
    #: Window in which a repeated Nats-Msg-Id is dropped by the server: it covers an SDK that
    #: retries after a lost publish ack, a reconnect, or an agent restart that resends its outbox.
    duplicate_window: float = 20 * 60.0

    def stream_name(self, prefix: str = "") -> str:
        return f"{prefix}_{self.name}" if prefix else self.name

    def config(self, prefix: str = "", storage_gib: float = DEFAULT_STORAGE_GIB) -> StreamConfig:
        return StreamConfig(
            name=self.stream_name(prefix),
            description=self.description,
            subjects=[with_prefix(s, prefix) for s in self.subjects],
            retention=self.retention,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            max_age=self.max_age,
            # JetStream reserves max_bytes up front, so the budget is set deliberately, not "unlimited".
            max_bytes=max(1024**2, int(storage_gib * self.storage_share * GIB)),
            max_msg_size=MAX_MESSAGE_BYTES,
            duplicate_window=self.duplicate_window,
            num_replicas=1,
        )


TRAJECTORIES = StreamSpec(
    name="TRAJECTORIES",
    subjects=(f"{TRAJECTORY_SUBJECT_ROOT}.>",),
    description="Raw agent events (public contract v1): recorder and archiver consume independently",
    storage_share=0.5,
)
PIPELINE = StreamSpec(
    name="PIPELINE",
    subjects=("pipeline.>",),
    description="Internal pipeline events between services",
    max_age=30 * DAY,
    storage_share=0.1,
)
BATCHES = StreamSpec(
    name="BATCHES",
    subjects=("batch.ready.>",),
    description="Training offers: a work queue, one trainer claims each offer",
    retention=RetentionPolicy.WORK_QUEUE,
    max_age=30 * DAY,
    storage_share=0.02,
)
TRAINING = StreamSpec(
    name="TRAINING",
    subjects=("training.>",),
    description="Trainer reports: started, progress, heartbeat, completed, failed",
    max_age=30 * DAY,
    storage_share=0.08,
)
DLQ = StreamSpec(
    name="DLQ",
    subjects=("dlq.>",),
    description="Messages a service can never process, with the reason and the raw bytes",
    max_age=90 * DAY,
    storage_share=0.2,
    duplicate_window=DAY,
)

STREAMS: tuple[StreamSpec, ...] = (TRAJECTORIES, PIPELINE, BATCHES, TRAINING, DLQ)

#: KV bucket: which agent gets which model (deployer writes, agents watch).
ROUTING_BUCKET = "routing"
#: Object-store bucket: bodies of events too large for a message (claim check).
PAYLOADS_BUCKET = "payloads"
#: The payloads bucket's share of the storage budget (the streams take the rest).
PAYLOADS_STORAGE_SHARE = 0.1


def bucket_name(name: str, prefix: str = "") -> str:
    return f"{prefix}_{name}" if prefix else name


# --- subjects of internal events ---------------------------------------------------------------------

TRAJECTORY_COMPLETED = "pipeline.trajectory.completed"
REWARD_JUDGED = "pipeline.reward.judged"
BATCH_CREATED = "pipeline.batch.created"
DATASET_EXPORTED = "pipeline.dataset.exported"
MODEL_TRAINED = "pipeline.model.trained"
DEPLOYMENT_CHANGED = "pipeline.deployment.changed"


def dlq_subject(service: str) -> str:
    return f"dlq.{service}"


def batch_ready_subject(pool: str) -> str:
    return f"batch.ready.{pool}"


def training_subject(batch_id: object, kind: str) -> str:
    return f"training.{batch_id}.{kind}"


def command_subject(service: str, verb: str) -> str:
    return f"cmd.{service}.{verb}"


@dataclass(frozen=True)
class Topology:
    """The names one deployment uses: ``Topology(prefix).subject("pipeline.batch.created")``."""

    prefix: str = ""
    storage_gib: float = DEFAULT_STORAGE_GIB
    streams: tuple[StreamSpec, ...] = field(default=STREAMS)

    @classmethod
    def of(cls, settings: ConnectionSettings) -> Topology:
        return cls(settings.nats_prefix, settings.nats_storage_gib)

    def subject(self, subject: str) -> str:
        return with_prefix(subject, self.prefix)

    def stream(self, spec: StreamSpec) -> str:
        return spec.stream_name(self.prefix)

    def bucket(self, name: str) -> str:
        return bucket_name(name, self.prefix)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> str:
    """Create or update one stream; returns what happened: created, updated or unchanged."""
    try:
        info = await js.stream_info(config.name or "")
    except NotFoundError:
        try:
            await js.add_stream(config)
        except APIError as error:
            if error.err_code == _INSUFFICIENT_STORAGE:
                raise RuntimeError(
                    f"JetStream cannot reserve {(config.max_bytes or 0) / GIB:.2f} GiB for stream {config.name}: "
                    "lower CUNEIFORM_NATS_STORAGE_GIB (the budget all streams share) or give nats-server more "
                    "max_file_store"
                ) from error
            raise
        return "created"
    wanted = {k: v for k, v in config.as_dict().items() if v is not None}
    current = info.config.as_dict()
    if all(current.get(k) == v for k, v in wanted.items()):
        return "unchanged"
    try:
        await js.update_stream(config)
    except APIError as error:
        # Some properties (storage, retention) cannot change in place, and a larger budget may not
        # fit: keep serving with the stored configuration and say so, rather than refusing to start.
        log.warning("stream.update_refused", stream=config.name, error=error.description)
        return "unchanged"
    return "updated"


async def ensure_topology(js: JetStreamContext, topology: Topology) -> dict[str, str]:
    """Create every stream, the routing KV bucket and the payloads object store; idempotent."""
    outcome = {}
    for spec in topology.streams:
        outcome[topology.stream(spec)] = await ensure_stream(js, spec.config(topology.prefix, topology.storage_gib))
    routing = topology.bucket(ROUTING_BUCKET)
    try:
        await js.key_value(routing)
        outcome[routing] = "unchanged"
    except NotFoundError:  # BucketNotFoundError is a NotFoundError
        await js.create_key_value(
            KeyValueConfig(bucket=routing, history=16, storage=StorageType.FILE, description="model routing")
        )
        outcome[routing] = "created"
    payloads = topology.bucket(PAYLOADS_BUCKET)
    try:
        await js.object_store(payloads)
        outcome[payloads] = "unchanged"
    except NotFoundError:
        await js.create_object_store(
            payloads,
            ObjectStoreConfig(
                storage=StorageType.FILE,
                description="claim-check payloads",
                ttl=30 * DAY,
                # At least room for a few of the largest payloads, however small the budget.
                max_bytes=max(64 * 1024**2, int(topology.storage_gib * PAYLOADS_STORAGE_SHARE * GIB)),
            ),
        )
        outcome[payloads] = "created"
    return outcome
