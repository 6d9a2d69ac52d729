"""Retention: old trajectories leave PostgreSQL only once the archive provably holds every event.

The proof is by stream sequence. The recorder stores, with each event, the sequence it had in the
TRAJECTORIES stream; the archive's segments cover sequence ranges. A trajectory may be deleted when
it is final, older than the cutoff, and every one of its events has a sequence inside the verified,
unbroken run of segments from sequence 1 — and not inside a gap a segment's manifest reports (a
message the stream no longer had when it was archived). An event stored before sequences were
recorded (NULL) proves nothing, so its trajectory stays.

"Verified" means the segment's manifest is readable and the stored body's size and sha256 (read
back from the object store) match it. Verification results are cached by key: segments are immutable.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from cuneiform_core.logging import get_logger
from cuneiform_core.storage import ObjectStore
from prometheus_client import Counter

from .segments import ArchiveIndex, stream_prefix

log = get_logger(__name__)

DELETED = Counter("cuneiform_archiver_retention_deleted_total", "Trajectories removed from PostgreSQL by retention")

#: The recorder's tables holding a trajectory's rows, children first.
RECORDER_TABLES = ("steps", "llm_calls", "provider_accesses", "actions", "rewards", "events")


@dataclass
class ArchiveProof:
    """The verified part of the archive: sequences 1..through, minus the gaps."""

    through: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)
    segments: int = 0
    unverified: list[str] = field(default_factory=list)


@dataclass
class RetentionReport:
    cutoff: datetime
    archived_through: int
    trajectories_deleted: int = 0
    events_deleted: int = 0
    #: Old enough, final, but some event is not (provably) archived yet: kept.
    #: (With ``dry_run``, ``trajectories_deleted`` counts what would be deleted.)
    kept_unarchived: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "archived_through": self.archived_through,
            "trajectories_deleted": self.trajectories_deleted,
            "events_deleted": self.events_deleted,
            "kept_unarchived": self.kept_unarchived,
            "dry_run": self.dry_run,
        }


class ArchiveVerifier:
    """Verifies segments once each (they never change) and says how far the archive is proven."""

    def __init__(self, store: ObjectStore, stream: str) -> None:
        self.store = store
        self.stream = stream
        self._verified: dict[str, list[tuple[int, int]]] = {}

    async def prove(self) -> ArchiveProof:
        index = ArchiveIndex.from_keys(self.stream, await self.store.list_keys(stream_prefix(self.stream)))
        proof = ArchiveProof()
        for segment in index.segments:
            if segment.first_seq != proof.through + 1:
                break  # a hole in the chain: nothing after it counts
            gaps = await self._verify(segment.key, segment.manifest_key)
            if gaps is None:
                proof.unverified.append(segment.key)
                break
            proof.gaps.extend(gaps)
            proof.through = segment.last_seq
            proof.segments += 1
        return proof

    async def _verify(self, key: str, manifest_key: str | None) -> list[tuple[int, int]] | None:
        if key in self._verified:
            return self._verified[key]
        if manifest_key is None:
            return None
        try:
            manifest = orjson.loads(await self.store.get_bytes(manifest_key))
            stat = await self.store.stat(key)
        except Exception as error:
            log.warning("retention.segment_unreadable", key=key, error=repr(error))
            return None
        if stat is None or stat.size != manifest["bytes"] or stat.sha256 != manifest["sha256"]:
            log.error("retention.segment_mismatch", key=key, manifest=manifest_key)
            return None
        gaps = [(int(a), int(b)) for a, b in manifest.get("gaps", [])]
        self._verified[key] = gaps
        return gaps


#: Is every event of trajectory ``t`` inside the proven archive ($2: through, $3/$4: gap bounds)?
_ALL_ARCHIVED = """
    NOT EXISTS (
        SELECT 1 FROM recorder.events e
        WHERE e.trajectory_id = t.trajectory_id
          AND (e.stream_seq IS NULL OR e.stream_seq > $2
               OR EXISTS (SELECT 1 FROM unnest($3::bigint[], $4::bigint[]) AS g(lo, hi)
                          WHERE e.stream_seq BETWEEN g.lo AND g.hi)))
"""

_DELETE_PROVEN = f"""
    WITH gone AS (
        DELETE FROM recorder.trajectories t WHERE t.trajectory_id = ANY($1::uuid[]) AND {_ALL_ARCHIVED}
        RETURNING t.trajectory_id)
    SELECT array_agg(trajectory_id) FROM gone
"""

_ELIGIBLE = f"""
    SELECT t.trajectory_id, t.finalized_at, {_ALL_ARCHIVED} AS archived
    FROM recorder.trajectories t
    WHERE t.status <> 'recording' AND t.finalized_at < $1
      AND (t.finalized_at, t.trajectory_id) > ($5::timestamptz, $6::uuid)
    ORDER BY t.finalized_at, t.trajectory_id
    LIMIT $7
"""


async def apply_retention(
    pool: asyncpg.Pool,
    verifier: ArchiveVerifier,
    older_than: timedelta,
    *,
    dry_run: bool = False,
    chunk: int = 500,
    now: datetime | None = None,
) -> RetentionReport:
    """Delete final trajectories finalized before ``now - older_than`` whose events are all archived."""
    proof = await verifier.prove()
    cutoff = (now or datetime.now(UTC)) - older_than
    report = RetentionReport(cutoff=cutoff, archived_through=proof.through, dry_run=dry_run)
    lows = [a for a, _ in proof.gaps]
    highs = [b for _, b in proof.gaps]
    cursor: tuple[datetime, uuid.UUID] = (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))
    async with pool.acquire() as conn:
        while True:
            rows = await conn.fetch(_ELIGIBLE, cutoff, proof.through, lows, highs, *cursor, chunk)
            if not rows:
                break
            cursor = (rows[-1]["finalized_at"], rows[-1]["trajectory_id"])
            doomed = [r["trajectory_id"] for r in rows if r["archived"]]
            report.kept_unarchived += len(rows) - len(doomed)
            report.trajectories_deleted += len(doomed)
            if dry_run or not doomed:
                continue
            async with conn.transaction():
                # The proof again, inside the transaction that deletes: an event that arrived since
                # the scan keeps its trajectory.
                gone = await conn.fetchval(_DELETE_PROVEN, doomed, proof.through, lows, highs)
                gone = list(gone or [])
                for table in RECORDER_TABLES:
                    status = await conn.execute(
                        f"DELETE FROM recorder.{table} WHERE trajectory_id = ANY($1::uuid[])", gone
                    )
                    if table == "events":
                        report.events_deleted += int(status.split()[-1])
            report.trajectories_deleted -= len(doomed) - len(gone)
            report.kept_unarchived += len(doomed) - len(gone)
            DELETED.inc(len(gone))
        if not dry_run:
            await conn.execute(
                """INSERT INTO archiver.retention_runs (run_id, cutoff, archived_through, trajectories_deleted,
                       events_deleted, trajectories_kept_unarchived) VALUES ($1, $2, $3, $4, $5, $6)""",
                uuid.uuid4(),
                cutoff,
                proof.through,
                report.trajectories_deleted,
                report.events_deleted,
                report.kept_unarchived,
            )
    log.info("retention.done", **report.as_dict(), unverified=proof.unverified)
    return report
