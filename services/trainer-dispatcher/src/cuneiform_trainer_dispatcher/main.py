"""The trainer-dispatcher: a batch's life after export, with one model per batch at most.

* ``pipeline.dataset.exported`` → a batch row (attempt 1) → a ``TrainingOffer`` on ``batch.ready.<pool>``
  (a work queue: one trainer claims it) with presigned download URLs for the dataset's files and a
  presigned upload URL for this attempt's artifact.
* ``training.<batch_id>.<kind>`` reports move the batch along — but only reports of the live attempt:
  anything else (a trainer that lost its claim, a duplicate) is rejected and recorded. That fencing,
  and an artifact key per attempt, is why one batch never yields two models.
* A claimed batch whose trainer is silent for ``heartbeat_timeout_s`` is taken back and offered again
  with the next attempt number; a failed attempt likewise; after ``max_attempts`` the batch fails with
  the reason.
* ``completed``: the artifact must exist with the reported size and sha256 (read back here); then it is
  registered (``models``: name, version, lineage) and ``pipeline.model.trained`` is published.

Every publish happens after the commit that decided it, from columns that say what is still to be
published, so the sweep publishes whatever a crash left behind under the same ids.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
from cuneiform_core.events import (
    DatasetExported,
    ModelTrained,
    OfferedFile,
    TrainingOffer,
    TrainingReport,
    publish,
    stable_id,
)
from cuneiform_core.logging import get_logger
from cuneiform_core.runtime import ConsumerOptions, Delivery
from cuneiform_core.service import Service, run
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import (
    BATCHES,
    DATASET_EXPORTED,
    MODEL_TRAINED,
    PIPELINE,
    ROUTING_BUCKET,
    TRAINING,
    batch_ready_subject,
)
from cuneiform_sdk.routing import Arm, RoutingTable
from nats.js.errors import KeyNotFoundError
from prometheus_client import Counter
from pydantic import ValidationError

from .settings import DispatcherSettings

log = get_logger(__name__)

OFFERS = Counter("cuneiform_dispatcher_offers_total", "Training offers published (attempts)")
OUTCOMES = Counter("cuneiform_dispatcher_attempts_total", "Attempts by outcome", ["outcome"])
REJECTED = Counter("cuneiform_dispatcher_rejected_reports_total", "Reports rejected (stale attempt, bad state)")
MODELS = Counter("cuneiform_dispatcher_models_registered_total", "Models registered")


class Dispatcher:
    def __init__(self, settings: DispatcherSettings, connection: ConnectionSettings | None = None) -> None:
        self.settings = settings
        self.service = Service(
            settings,
            connection,
            migrations="cuneiform_trainer_dispatcher.migrations",
            object_store=True,
            pool_size=settings.pool_size,
        )
        self.service.consume(
            name="trainer-dispatcher-datasets",
            stream=PIPELINE,
            subjects=[DATASET_EXPORTED],
            decode=lambda d: DatasetExported.model_validate_json(d.data),
            handle=self.datasets,
            options=ConsumerOptions(batch_size=10),
        )
        self.service.consume(
            name="trainer-dispatcher-reports",
            stream=TRAINING,
            decode=self.decode_report,
            handle=self.reports,
            options=ConsumerOptions(batch_size=100),
        )
        self.service.every(settings.sweep_interval_s, "sweep")(self.sweep)
        self.service.command("status")(self.status)
        self.service.command("models")(self.models)

    @staticmethod
    def decode_report(delivery: Delivery) -> TrainingReport:
        return TrainingReport.model_validate_json(delivery.data)

    # --- offers --------------------------------------------------------------------------------------

    async def datasets(self, events: Sequence[DatasetExported]) -> None:
        async with self.service.pool.acquire() as conn:
            for event in events:
                batch_id = event.batch_id or event.dataset_id
                await conn.execute(
                    """INSERT INTO trainer_dispatcher.batches (batch_id, dataset_id, manifest_key, state, attempt)
                       VALUES ($1, $2, $3, 'offered', 1) ON CONFLICT DO NOTHING""",
                    batch_id,
                    event.dataset_id,
                    event.manifest_key,
                )
        await self.publish_pending()

    async def offer(self, conn: asyncpg.Connection, row: asyncpg.Record) -> None:
        store = self.service.store
        manifest = orjson.loads(await store.get_bytes(row["manifest_key"]))
        expiry = timedelta(hours=self.settings.url_expiry_h)
        files = [
            OfferedFile(
                name=f["name"], url=await store.presigned_get(f["key"], expiry), sha256=f["sha256"], size=f["size"]
            )
            for f in manifest["files"]
        ]
        key = self.artifact_key(row["batch_id"], row["attempt"])
        base_model, base_artifact = await self.start_model(conn, row)
        base_url = None
        if base_artifact is not None:
            base_url = await store.presigned_get(base_artifact["key"], expiry)
        offer = TrainingOffer(
            event_id=stable_id("training.offer", row["batch_id"], row["attempt"]),
            batch_id=row["batch_id"],
            dataset_id=row["dataset_id"],
            attempt=row["attempt"],
            pool=self.settings.pool,
            model_name=self.settings.model_name,
            base_model=base_model,
            base_model_url=base_url,
            base_model_sha256=base_artifact["sha256"] if base_artifact is not None else None,
            hyperparameters=self.settings.hyperparameters,
            files=files,
            artifact_key=key,
            artifact_upload_url=await store.presigned_put(key, expiry),
            heartbeat_timeout_s=self.settings.heartbeat_timeout_s,
        )
        topology = self.service.topology
        await publish(
            self.service.broker,
            topology.subject(batch_ready_subject(self.settings.pool)),
            offer,
            stream=topology.stream(BATCHES),
        )
        OFFERS.inc()
        log.info("dispatcher.offered", batch_id=str(row["batch_id"]), attempt=row["attempt"])

    async def start_model(self, conn: asyncpg.Connection, row: asyncpg.Record) -> tuple[str, dict[str, Any] | None]:
        """What the batch trains from: fixed at its first offer (every attempt the same), from the routing
        table's champion when ``start_from`` is ``champion`` and one with an artifact is deployed."""
        if row["base_model"] is not None:
            return row["base_model"], row["base_artifact"]
        base_model, artifact = self.settings.base_model, None
        if self.settings.start_from == "champion":
            champion = await self.champion()
            if champion is not None and champion.artifact is not None:
                base_model = f"{self.settings.model_name}:{champion.version}"
                artifact = champion.artifact.model_dump(mode="json")
        fixed = await conn.fetchrow(
            """UPDATE trainer_dispatcher.batches SET base_model = coalesce(base_model, $2),
                   base_artifact = CASE WHEN base_model IS NULL THEN $3::jsonb ELSE base_artifact END
               WHERE batch_id = $1 RETURNING base_model, base_artifact""",
            row["batch_id"],
            base_model,
            artifact,
        )
        log.info("dispatcher.start_model", batch_id=str(row["batch_id"]), base_model=fixed["base_model"])
        return fixed["base_model"], fixed["base_artifact"]

    async def champion(self) -> Arm | None:
        """The arm every agent outside an experiment runs, from the routing table (None: nothing deployed)."""
        kv = await self.service.broker.connection.jetstream().key_value(self.service.topology.bucket(ROUTING_BUCKET))
        try:
            entry = await kv.get(self.settings.model_name)
            table = RoutingTable.model_validate_json(entry.value or b"")
        except KeyNotFoundError:
            return None
        except ValidationError as error:
            log.warning("dispatcher.routing_unreadable", model=self.settings.model_name, error=str(error))
            return None
        return next((a for a in table.arms if a.role == "champion"), None)

    def artifact_key(self, batch_id: uuid.UUID, attempt: int) -> str:
        # One key per attempt: a trainer that lost its claim can only ever write its own attempt's key.
        return f"models/{self.settings.model_name}/batches/{batch_id}/attempt-{attempt}/artifact"

    # --- reports -------------------------------------------------------------------------------------

    async def reports(self, reports: Sequence[TrainingReport]) -> None:
        for report in reports:
            async with self.service.pool.acquire() as conn, conn.transaction():
                batch = await conn.fetchrow(
                    "SELECT * FROM trainer_dispatcher.batches WHERE batch_id = $1 FOR UPDATE", report.batch_id
                )
                problem = self.fence(batch, report)
                if problem is not None:
                    await self.reject(conn, report, problem)
                    continue
                assert batch is not None
                if report.kind == "claimed":
                    await conn.execute(
                        """UPDATE trainer_dispatcher.batches SET state = 'claimed', trainer_id = $2, claimed_at = now(),
                               last_report_at = now(), updated_at = now() WHERE batch_id = $1""",
                        report.batch_id,
                        report.trainer_id,
                    )
                elif report.kind in ("heartbeat", "progress"):
                    progress = {"step": report.step, **report.metrics} if report.kind == "progress" else None
                    await conn.execute(
                        """UPDATE trainer_dispatcher.batches SET last_report_at = now(), updated_at = now(),
                               progress = coalesce($2, progress) WHERE batch_id = $1""",
                        report.batch_id,
                        progress,
                    )
                elif report.kind == "failed":
                    await self.end_attempt(conn, batch, "failed", report.reason or "the trainer gave no reason")
                elif report.kind == "completed":
                    await self.complete(conn, batch, report)
        await self.publish_pending()

    @staticmethod
    def fence(batch: asyncpg.Record | None, report: TrainingReport) -> str | None:
        if batch is None:
            return "unknown batch"
        if report.attempt != batch["attempt"]:
            return f"stale attempt {report.attempt}: the live attempt is {batch['attempt']}"
        if batch["state"] in ("completed", "failed"):
            return f"the batch is already {batch['state']}"
        if report.kind != "claimed" and batch["state"] != "claimed":
            return "not claimed"
        if report.kind != "claimed" and batch["trainer_id"] != report.trainer_id:
            return f"claimed by {batch['trainer_id']}, not {report.trainer_id}"
        if report.kind == "claimed" and batch["state"] == "claimed" and batch["trainer_id"] != report.trainer_id:
            return f"already claimed by {batch['trainer_id']}"
        return None

    async def reject(self, conn: asyncpg.Connection, report: TrainingReport, reason: str) -> None:
        REJECTED.inc()
        log.warning(
            "dispatcher.report_rejected",
            batch_id=str(report.batch_id),
            attempt=report.attempt,
            kind=report.kind,
            trainer=report.trainer_id,
            reason=reason,
        )
        await conn.execute(
            """INSERT INTO trainer_dispatcher.rejected_reports (event_id, batch_id, attempt, trainer_id, kind, reason)
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
            report.event_id,
            report.batch_id,
            report.attempt,
            report.trainer_id,
            report.kind,
            reason,
        )

    async def complete(self, conn: asyncpg.Connection, batch: asyncpg.Record, report: TrainingReport) -> None:
        key = self.artifact_key(batch["batch_id"], batch["attempt"])
        problem = await self.verify_artifact(key, report)
        if problem is not None:
            await self.end_attempt(conn, batch, "rejected_artifact", problem)
            return
        count = await conn.fetchval(
            "SELECT count(*) FROM trainer_dispatcher.models WHERE model_name = $1", self.settings.model_name
        )
        version = f"v{count + 2}"  # v1 is the base model
        await conn.execute(
            """INSERT INTO trainer_dispatcher.models (model_name, model_version, batch_id, dataset_id, base_model,
                   bucket, artifact_key, artifact_sha256, artifact_size, metrics, trainer_id, attempt)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
            self.settings.model_name,
            version,
            batch["batch_id"],
            batch["dataset_id"],
            batch["base_model"] or self.settings.base_model,
            self.service.store.bucket,
            key,
            report.artifact_sha256,
            report.artifact_size,
            report.metrics,
            report.trainer_id,
            batch["attempt"],
        )
        await conn.execute(
            """UPDATE trainer_dispatcher.batches SET state = 'completed', model_version = $2, progress = $3,
                   last_report_at = now(), updated_at = now() WHERE batch_id = $1""",
            batch["batch_id"],
            version,
            report.metrics,
        )
        await conn.execute(
            "INSERT INTO trainer_dispatcher.attempts (batch_id, attempt, trainer_id, outcome) "
            "VALUES ($1, $2, $3, 'completed')",
            batch["batch_id"],
            batch["attempt"],
            report.trainer_id,
        )
        OUTCOMES.labels("completed").inc()
        MODELS.inc()

    async def verify_artifact(self, key: str, report: TrainingReport) -> str | None:
        info = await self.service.store.stat(key)
        if info is None:
            return f"no artifact at {key}"
        if report.artifact_size is not None and info.size != report.artifact_size:
            return f"artifact has {info.size} bytes, the trainer reported {report.artifact_size}"
        # Uploaded through a presigned URL, so no checksum metadata: read it back and hash it.
        digest = hashlib.sha256(await self.service.store.get_bytes(key)).hexdigest()
        if digest != report.artifact_sha256:
            return f"artifact sha256 {digest} does not match the reported {report.artifact_sha256}"
        return None

    async def end_attempt(self, conn: asyncpg.Connection, batch: asyncpg.Record, outcome: str, reason: str) -> None:
        """Close the live attempt; offer the next one, or fail the batch after ``max_attempts``."""
        OUTCOMES.labels(outcome).inc()
        await conn.execute(
            """INSERT INTO trainer_dispatcher.attempts (batch_id, attempt, trainer_id, outcome, reason)
               VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
            batch["batch_id"],
            batch["attempt"],
            batch["trainer_id"],
            outcome,
            reason,
        )
        if batch["attempt"] >= self.settings.max_attempts:
            await conn.execute(
                """UPDATE trainer_dispatcher.batches SET state = 'failed', updated_at = now(),
                       reason = $2 WHERE batch_id = $1""",
                batch["batch_id"],
                f"{batch['attempt']} attempts; last: {outcome}: {reason}",
            )
            log.warning("dispatcher.batch_failed", batch_id=str(batch["batch_id"]), reason=reason)
            return
        await conn.execute(
            """UPDATE trainer_dispatcher.batches SET state = 'offered', attempt = attempt + 1, trainer_id = NULL,
                   claimed_at = NULL, last_report_at = NULL, offered_at = now(), offer_published_at = NULL,
                   reason = $2, updated_at = now() WHERE batch_id = $1""",
            batch["batch_id"],
            f"attempt {batch['attempt']} {outcome}: {reason}",
        )
        log.warning("dispatcher.reoffer", batch_id=str(batch["batch_id"]), attempt=batch["attempt"] + 1, why=reason)

    # --- timers and publishing -----------------------------------------------------------------------

    async def sweep(self) -> None:
        async with self.service.pool.acquire() as conn, conn.transaction():
            silent = await conn.fetch(
                """SELECT * FROM trainer_dispatcher.batches WHERE state = 'claimed'
                       AND last_report_at < now() - make_interval(secs => $1) FOR UPDATE SKIP LOCKED""",
                self.settings.heartbeat_timeout_s,
            )
            for batch in silent:
                await self.end_attempt(
                    conn,
                    batch,
                    "timed_out",
                    f"no report from {batch['trainer_id']} for {self.settings.heartbeat_timeout_s:g} s",
                )
        await self.publish_pending()

    async def publish_pending(self) -> None:
        """Offers and model announcements decided but not yet published (same ids on every try)."""
        async with self.service.pool.acquire() as conn:
            for row in await conn.fetch(
                "SELECT * FROM trainer_dispatcher.batches WHERE state = 'offered' AND offer_published_at IS NULL"
            ):
                await self.offer(conn, row)
                await conn.execute(
                    "UPDATE trainer_dispatcher.batches SET offer_published_at = now() "
                    "WHERE batch_id = $1 AND attempt = $2",
                    row["batch_id"],
                    row["attempt"],
                )
            for model in await conn.fetch("SELECT * FROM trainer_dispatcher.models WHERE published_at IS NULL"):
                event = ModelTrained(
                    event_id=stable_id("model.trained", model["batch_id"]),
                    model_name=model["model_name"],
                    model_version=model["model_version"],
                    batch_id=model["batch_id"],
                    dataset_id=model["dataset_id"],
                    base_model=model["base_model"],
                    bucket=model["bucket"],
                    artifact_key=model["artifact_key"],
                    artifact_sha256=model["artifact_sha256"],
                    artifact_size=model["artifact_size"],
                    metrics=model["metrics"],
                    trainer_id=model["trainer_id"] or "",
                    attempt=model["attempt"] or 0,
                )
                topology = self.service.topology
                await publish(
                    self.service.broker, topology.subject(MODEL_TRAINED), event, stream=topology.stream(PIPELINE)
                )
                await conn.execute(
                    "UPDATE trainer_dispatcher.models SET published_at = now() "
                    "WHERE model_name = $1 AND model_version = $2",
                    model["model_name"],
                    model["model_version"],
                )

    # --- commands ------------------------------------------------------------------------------------

    async def status(self, _: dict[str, Any]) -> dict[str, Any]:
        async with self.service.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT batch_id, state, attempt, trainer_id, progress, reason, model_version, updated_at "
                "FROM trainer_dispatcher.batches ORDER BY updated_at DESC LIMIT 20"
            )
        return {"batches": [{k: _plain(v) for k, v in dict(r).items()} for r in rows]}

    async def models(self, _: dict[str, Any]) -> dict[str, Any]:
        async with self.service.pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM trainer_dispatcher.models ORDER BY created_at")
        return {"models": [{k: _plain(v) for k, v in dict(r).items()} for r in rows]}


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, str | int | float | bool | dict | list) else str(value)


def build(settings: DispatcherSettings | None = None, connection: ConnectionSettings | None = None) -> Service:
    return Dispatcher(settings or DispatcherSettings(), connection).service


def main() -> None:
    run(build)
