"""Replay from the archive: rebuild the recorder's tables in an empty database, or republish.

Rebuild runs every archived event through the recorder's own store code (same validation, same
redaction, same completeness counting), in stream order, with each event's original stream sequence.
Trajectories still open at the end get the verdict the recorder's sweep would have given them: a
trajectory whose last archived event is older than a grace period (measured against the newest
message in the replayed range) is ``incomplete`` (its end arrived, events are missing) or
``abandoned`` (no end); younger ones stay ``recording``. Completions are marked as already announced:
the pipeline saw them when they first happened.

``table_checksums`` summarizes the recorder's tables by content (counts and an md5 over every column
that comes from the events — not the times the rows were written), so a rebuilt database can be
compared with the original one.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from cuneiform_core.db import create_pool, load_migrations, migrate
from cuneiform_core.logging import get_logger
from cuneiform_core.storage import ObjectStore
from cuneiform_recorder.settings import RecorderSettings
from cuneiform_recorder.store import TYPED_COLUMNS, Redactor, store_events
from cuneiform_sdk.contract import ClaimCheck, ContractError, Event, validate_message
from cuneiform_sdk.subjects import TRAJECTORY_SUBJECT_ROOT, with_prefix
from nats.aio.client import Client

from .segments import ArchivedMessage, ArchiveIndex, read_segment, stream_prefix

log = get_logger(__name__)

Progress = Callable[[int, int], None]


class ArchiveCorruptError(RuntimeError):
    pass


async def load_manifests(store: ObjectStore, index: ArchiveIndex) -> dict[str, dict[str, Any]]:
    manifests = {}
    for segment in index.segments:
        if segment.manifest_key is not None:
            manifests[segment.key] = orjson.loads(await store.get_bytes(segment.manifest_key))
    return manifests


async def archived_messages(
    store: ObjectStore,
    stream: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Progress | None = None,
) -> AsyncIterator[ArchivedMessage]:
    """Every archived message of ``stream`` stored in ``[since, until]``, in sequence order; each
    segment's sha256 is checked against its manifest before it is read."""
    index = ArchiveIndex.from_keys(stream, await store.list_keys(stream_prefix(stream)))
    manifests = await load_manifests(store, index)
    since_ns = int(since.timestamp() * 1e9) if since else None
    until_ns = int(until.timestamp() * 1e9) if until else None
    chosen = index.overlapping(since_ns, until_ns, manifests)
    for n, segment in enumerate(chosen, start=1):
        body = await store.get_bytes(segment.key)
        manifest = manifests[segment.key]
        if hashlib.sha256(body).hexdigest() != manifest["sha256"]:
            raise ArchiveCorruptError(f"segment {segment.key} does not match the sha256 in its manifest")
        for message in read_segment(body):
            if (since_ns is None or message.ts_ns >= since_ns) and (until_ns is None or message.ts_ns <= until_ns):
                yield message
        if progress:
            progress(n, len(chosen))


@dataclass
class RebuildReport:
    messages: int = 0
    stored: int = 0
    duplicates: int = 0
    #: Archived messages that are not valid events (the recorder dead-lettered them too), by reason.
    invalid: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "invalid": self.invalid,
            "statuses": self.statuses,
        }


def _event_of(message: ArchivedMessage) -> Event:
    if message.data is None:
        raise ContractError("not JSON")
    if message.payload_error is not None:
        raise ContractError(f"claim check: {message.payload_error}")
    event = validate_message(message.event)
    if isinstance(event, ClaimCheck):
        raise ContractError("claim check without its body")
    return event


async def rebuild(
    store: ObjectStore,
    stream: str,
    dsn: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    recorder: RecorderSettings | None = None,
    batch: int = 2000,
    allow_nonempty: bool = False,
    progress: Progress | None = None,
) -> RebuildReport:
    """Rebuild the recorder's tables in the database at ``dsn`` from the archive."""
    settings = recorder or RecorderSettings()
    redact = Redactor(settings.redact_patterns)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, "recorder", load_migrations("cuneiform_recorder.migrations"))
    finally:
        await conn.close()
    pool = await create_pool(dsn, "recorder", max_size=2)
    report = RebuildReport()
    try:
        async with pool.acquire() as conn:
            if not allow_nonempty and await conn.fetchval("SELECT EXISTS (SELECT 1 FROM recorder.events)"):
                raise RuntimeError(
                    "the target database already holds recorder events; rebuild into an empty database "
                    "(or pass allow_nonempty / --allow-nonempty to add to it)"
                )
            pending: list[Event] = []
            seqs: list[int] = []
            last_ts = 0

            async def write() -> None:
                result = await store_events(conn, pending, redact, stream_seqs=seqs)
                report.stored += sum(result.stored.values())
                report.duplicates += sum(result.duplicates.values())
                pending.clear()
                seqs.clear()

            async for message in archived_messages(store, stream, since=since, until=until, progress=progress):
                report.messages += 1
                last_ts = max(last_ts, message.ts_ns)
                try:
                    pending.append(_event_of(message))
                    seqs.append(message.seq)
                except (ContractError, ValueError) as error:
                    reason = str(error).split(":")[0][:80]
                    report.invalid[reason] = report.invalid.get(reason, 0) + 1
                    continue
                if len(pending) >= batch:
                    await write()
            if pending:
                await write()
            await _settle(conn, settings, last_ts)
            rows = await conn.fetch("SELECT status, count(*) AS n FROM recorder.trajectories GROUP BY status")
            report.statuses = {r["status"]: r["n"] for r in rows}
    finally:
        await pool.close()
    log.info("rebuild.done", **report.as_dict())
    return report


async def _settle(conn: asyncpg.Connection, settings: RecorderSettings, last_ts_ns: int) -> None:
    """The recorder's verdicts for trajectories still open, as of the newest replayed message."""
    if last_ts_ns:
        as_of = datetime.fromtimestamp(last_ts_ns / 1e9, UTC)
        await conn.execute(
            """UPDATE recorder.trajectories t SET
                   status = CASE WHEN expected_events IS NULL THEN 'abandoned' ELSE 'incomplete' END,
                   finalized_at = now()
               FROM (SELECT trajectory_id, max(occurred_at) AS last_at FROM recorder.events GROUP BY 1) e
               WHERE e.trajectory_id = t.trajectory_id AND t.status = 'recording'
                 AND ((t.expected_events IS NOT NULL AND e.last_at < $1::timestamptz - make_interval(secs => $2))
                      OR (t.expected_events IS NULL AND e.last_at < $1::timestamptz - make_interval(secs => $3)))""",
            as_of,
            settings.incomplete_after_s,
            settings.abandoned_after_s,
        )
    await conn.execute(
        "UPDATE recorder.trajectories SET completion_published_at = finalized_at "
        "WHERE finalized_at IS NOT NULL AND completion_published_at IS NULL"
    )


# --- comparing databases -------------------------------------------------------------------------------

#: Columns that come from the events (not when rows were written), per recorder table, and its key.
_CONTENT_COLUMNS: dict[str, tuple[str, list[str]]] = {
    "trajectories": (
        "trajectory_id",
        [
            *("trajectory_id", "agent_id", "scenario_id", "episode_id", "model_name", "model_version"),
            *("deployment_id", "variant", "environment", "metadata", "started_at", "ended_at", "end_status"),
            *("total_reward", "metrics", "final_environment", "error", "expected_events", "stored_events"),
            "status",
        ],
    ),
    "events": ("event_id", ["event_id", "trajectory_id", "seq", "type", "occurred_at", "stream_seq"]),
    **{table: ("event_id", columns) for table, columns in TYPED_COLUMNS.items()},
}


async def table_checksums(dsn: str) -> dict[str, dict[str, Any]]:
    """Per recorder table: row count and an md5 of its content columns in key order."""
    conn = await asyncpg.connect(dsn)
    try:
        sums = {}
        for table, (key, columns) in _CONTENT_COLUMNS.items():
            row = await conn.fetchrow(
                f"SELECT count(*) AS n, md5(coalesce(string_agg(row({', '.join(columns)})::text, E'\\n' "
                f"ORDER BY {key}), '')) AS md5 FROM recorder.{table}"
            )
            assert row is not None
            sums[table] = {"rows": row["n"], "md5": row["md5"]}
        return sums
    finally:
        await conn.close()


# --- republishing --------------------------------------------------------------------------------------


async def republish(
    store: ObjectStore,
    stream: str,
    nc: Client,
    *,
    target_prefix: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Progress | None = None,
) -> int:
    """Publish archived messages again, under their original ``Nats-Msg-Id`` (the stream and the
    recorder's ledger drop what they already have). ``target_prefix`` moves them into another
    deployment's namespace (its ``nats_prefix``; "" for the unprefixed one)."""
    js = nc.jetstream()
    sent = 0
    pending = []
    async for message in archived_messages(store, stream, since=since, until=until, progress=progress):
        subject = message.subject if target_prefix is None else _reprefix(message.subject, target_prefix)
        headers = dict(message.headers)
        if message.msg_id:
            headers["Nats-Msg-Id"] = message.msg_id
        pending.append(await js.publish_async(subject, message.body, headers=headers or None))
        sent += 1
        if len(pending) >= 1000:
            for future in pending:
                await future
            pending.clear()
    for future in pending:
        await future
    return sent


def _reprefix(subject: str, prefix: str) -> str:
    """``old.traj.a.step`` (or ``traj.a.step``) → ``traj.a.step`` in the namespace ``prefix``."""
    root = subject.find(f"{TRAJECTORY_SUBJECT_ROOT}.")
    return with_prefix(subject[root:] if root >= 0 else subject, prefix)
