"""The archiver service: the cold copy of every event, retention, and dataset export.

Three independent paths in one process:

* raw archive: TRAJECTORIES → zstd JSONL segments (``archive.SegmentArchiver``); needs NATS and the
  object store only, so it keeps the copy going while PostgreSQL is down (the service starts without
  PostgreSQL and connects when it can);
* dataset export: ``pipeline.batch.created`` → ``datasets/<dataset_id>/`` → ``pipeline.dataset.exported``;
* retention: a timer deleting old trajectories from PostgreSQL once the archive provably holds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from cuneiform_core.events import BatchCreated
from cuneiform_core.logging import get_logger
from cuneiform_core.runtime import ConsumerOptions, Delivery
from cuneiform_core.service import Service, run
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import BATCH_CREATED, PIPELINE, TRAJECTORIES

from .archive import SegmentArchiver
from .retention import ArchiveVerifier, RetentionReport, apply_retention
from .settings import ArchiverSettings

log = get_logger(__name__)


def decode_batch(delivery: Delivery) -> BatchCreated:
    return BatchCreated.model_validate_json(delivery.data)


class Archiver:
    def __init__(self, settings: ArchiverSettings, connection: ConnectionSettings | None = None) -> None:
        self.settings = settings
        self.service = Service(
            settings,
            connection,
            migrations="cuneiform_archiver.migrations",
            object_store=True,
            pool_size=settings.pool_size,
            require_database=False,
        )
        topology = self.service.topology
        self.segments = SegmentArchiver(settings, topology, self.service.store)
        self.service.add_consumer(self.segments)
        self.verifier = ArchiveVerifier(self.service.store, topology.stream(TRAJECTORIES))
        self.service.consume(
            name="archiver-export",
            stream=PIPELINE,
            subjects=[BATCH_CREATED],
            decode=decode_batch,
            handle=self.export_batches,
            options=ConsumerOptions(batch_size=1, ack_wait=settings.export_ack_wait_s, max_deliver=5),
        )
        self.service.every(5.0, "archive-progress")(self.report_progress)
        if settings.retention_days > 0:
            self.service.every(settings.retention_interval_s, "retention")(self.scheduled_retention)
        self.service.command("status")(self.status)
        self.service.command("retention")(self.retention_command)

    async def report_progress(self) -> None:
        await self.segments.progress()

    async def export_batches(self, batches: Sequence[BatchCreated]) -> None:
        from .datasets import export_batch

        for batch in batches:
            await export_batch(self.service, self.settings, batch)

    async def scheduled_retention(self) -> None:
        await self.retention()

    async def retention(self, dry_run: bool = False, days: float | None = None) -> RetentionReport:
        age = timedelta(days=self.settings.retention_days if days is None else days)
        return await apply_retention(self.service.pool, self.verifier, age, dry_run=dry_run)

    async def retention_command(self, request: dict[str, Any]) -> dict[str, Any]:
        days = request.get("older_than_days")
        report = await self.retention(dry_run=bool(request.get("dry_run", True)), days=days)
        return report.as_dict()

    async def status(self, _: dict[str, Any]) -> dict[str, Any]:
        progress = await self.segments.progress()
        index = await self.segments.index()
        answer: dict[str, Any] = {
            "archive": {
                "stream": self.segments.stream,
                "segments": len(index.segments),
                "archived_through_seq": progress.archived_through,
                "stream_last_seq": progress.stream_last_seq,
                "lag_events": progress.lag,
                "chain_breaks": index.chain_breaks(),
            }
        }
        try:
            async with self.service.pool.acquire() as conn:
                answer["datasets"] = await conn.fetchval("SELECT count(*) FROM archiver.datasets")
                last = await conn.fetchrow("SELECT * FROM archiver.retention_runs ORDER BY ran_at DESC LIMIT 1")
                answer["last_retention"] = None if last is None else {k: str(v) for k, v in dict(last).items()}
        except Exception as error:  # the archive part of the answer stands without PostgreSQL
            answer["database"] = f"unavailable: {error!r}"
        return answer


def build(settings: ArchiverSettings | None = None, connection: ConnectionSettings | None = None) -> Service:
    return Archiver(settings or ArchiverSettings(), connection).service


def main() -> None:
    run(build)
