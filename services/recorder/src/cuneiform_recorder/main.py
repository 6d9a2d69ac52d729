"""The recorder service: TRAJECTORIES → PostgreSQL → ``pipeline.trajectory.completed``.

The handler is thin: resolve claim checks, store the batch in one transaction, publish the
completions it produced. The sweep timer finalizes trajectories whose grace periods ran out and
re-publishes any completion a crash left unpublished (the event id is stable, so the stream drops a
second copy: exactly one ``completed`` per trajectory).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from cuneiform_core.claims import read_claim_body
from cuneiform_core.events import DeadLetter, TrajectoryCompleted, publish, stable_id
from cuneiform_core.logging import get_logger
from cuneiform_core.runtime import ConsumerOptions, Delivery, PermanentError
from cuneiform_core.service import Service, run
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import PAYLOADS_BUCKET, PIPELINE, TRAJECTORIES, TRAJECTORY_COMPLETED
from cuneiform_sdk.contract import EVENT_TYPES, ClaimCheck, ContractError, Event, parse_event, validate_message
from prometheus_client import Counter, Gauge, Histogram

from .settings import RecorderSettings
from .store import FINALIZED_COLUMNS, Finalized, Redactor, finalized_from, store_events

log = get_logger(__name__)

EVENTS = Counter("cuneiform_recorder_events_total", "Events by type and outcome", ["type", "outcome"])
COMMIT_SECONDS = Histogram(
    "cuneiform_recorder_commit_seconds",
    "Time to write one batch in one transaction",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
FINALIZED = Counter("cuneiform_recorder_trajectories_finalized_total", "Trajectories by final status", ["status"])
#: Trajectories finalized late, or completions re-published, per sweep: bounded, the next sweep goes on.
SWEEP_LIMIT = 1000

RECORDING = Gauge("cuneiform_recorder_trajectories_recording", "Trajectories still waiting for events")


#: A decoded message and its stream sequence (kept with the event: retention proves by it that the
#: archiver's segments hold the event before the row may leave PostgreSQL).
Received = tuple[Event | ClaimCheck, int]


def decode(delivery: Delivery) -> Received:
    """Bytes → contract event; anything else raises with the reason the dead letter will carry."""
    return parse_event(delivery.data), delivery.stream_seq


class Recorder:
    def __init__(self, settings: RecorderSettings, connection: ConnectionSettings | None = None) -> None:
        self.settings = settings
        self.service = Service(
            settings, connection, migrations="cuneiform_recorder.migrations", pool_size=settings.pool_size
        )
        self.redact = Redactor(settings.redact_patterns)
        self.service.consume(
            name="recorder",
            stream=TRAJECTORIES,
            decode=decode,
            handle=self.handle,
            options=ConsumerOptions(
                batch_size=settings.batch_size, concurrency=settings.concurrency, ack_wait=settings.ack_wait_s
            ),
            on_dead_letter=self.keep_dead_letter,
        )
        self.service.every(settings.sweep_interval_s, "sweep")(self.sweep)
        self.service.command("status")(self.status)
        self._stream_last_seq: int | None = None

    # --- the hot path ----------------------------------------------------------------------------------

    async def handle(self, items: Sequence[Received]) -> dict[int, str]:
        rejected: dict[int, str] = {}
        events: list[Event] = []
        seqs: list[int] = []
        for index, (item, seq) in enumerate(items):
            if isinstance(item, ClaimCheck):
                try:
                    events.append(await self.resolve(item))
                except PermanentError as error:
                    rejected[index] = str(error)
                    continue
            else:
                events.append(item)
            seqs.append(seq)
        started = datetime.now(UTC)
        async with self.service.pool.acquire() as conn:
            result = await store_events(conn, events, self.redact, stream_seqs=seqs)
        COMMIT_SECONDS.observe((datetime.now(UTC) - started).total_seconds())
        for kind, counts in (("stored", result.stored), ("duplicate", result.duplicates)):
            for event_type, count in counts.items():
                EVENTS.labels(event_type, kind).inc(count)
        for f in result.finalized:
            FINALIZED.labels(f.status).inc()
        await self.announce(result.finalized)
        return rejected

    async def resolve(self, claim: ClaimCheck) -> Event:
        """Fetch a claim-checked body from the object store and prove it is the one announced."""
        try:
            body = await read_claim_body(
                self.service.broker.connection.jetstream(),
                claim.payload_ref,
                expected_bucket=self.service.topology.bucket(PAYLOADS_BUCKET),
                max_bytes=self.settings.max_claim_check_bytes,
            )
        except PermanentError as error:
            if str(error).startswith("oversize"):
                raise PermanentError(f"{error} (CUNEIFORM_RECORDER_MAX_CLAIM_CHECK_BYTES)") from None
            raise
        try:
            event = validate_message(orjson.loads(body))
        except (orjson.JSONDecodeError, ContractError) as error:
            raise PermanentError(f"claim-checked body is not a valid event: {error}") from None
        if isinstance(event, ClaimCheck) or event.event_id != claim.event_id:
            raise PermanentError("claim-checked body does not hold the event its claim check announced")
        return event

    # --- completions -----------------------------------------------------------------------------------

    async def announce(self, finalized: list[Finalized]) -> None:
        """Publish ``pipeline.trajectory.completed`` for each, then mark it published.

        Runs after the commit. At the first failure it stops — the batch's ack must not wait on a
        slow broker — and the sweep publishes the rest later under the same event ids."""
        published = []
        for f in finalized:
            event = TrajectoryCompleted(
                event_id=stable_id("trajectory.completed", f.trajectory_id),
                trajectory_id=f.trajectory_id,
                agent_id=f.agent_id,
                scenario_id=f.scenario_id or "",
                status=f.status,  # type: ignore[arg-type]
                event_count=f.stored_events,
                total_reward=f.total_reward,
                model_name=f.model_name,
                model_version=f.model_version,
                deployment_id=f.deployment_id,
            )
            try:
                await publish(
                    self.service.broker,
                    self.service.topology.subject(TRAJECTORY_COMPLETED),
                    event,
                    stream=self.service.topology.stream(PIPELINE),
                )
            except Exception as error:
                log.warning("recorder.completion_deferred", trajectory_id=str(f.trajectory_id), error=repr(error))
                break
            published.append(f.trajectory_id)
        if published:
            await self.service.pool.execute(
                "UPDATE trajectories SET completion_published_at = now() WHERE trajectory_id = ANY($1::uuid[])",
                published,
            )

    async def caught_up(self) -> bool:
        """Has this recorder stored everything that was in the stream one sweep ago?

        "No event for the grace period" only means something when the recorder is not behind: after
        an outage the missing events may simply be waiting in the backlog. The check compares the
        consumer's ack floor with the stream's last sequence seen by the previous sweep."""
        consumer = self.service.consumers[0]
        js = self.service.broker.connection.jetstream()
        stream = await js.stream_info(consumer.stream)
        info = await js.consumer_info(consumer.stream, consumer.name)
        previous, self._stream_last_seq = self._stream_last_seq, stream.state.last_seq
        return previous is not None and info.ack_floor.stream_seq >= previous

    async def sweep(self) -> None:
        """Finalize trajectories past their grace periods; publish completions a crash left behind."""
        late: list[asyncpg.Record] = []
        if await self.caught_up():
            late = await self.service.pool.fetch(
                f"""UPDATE trajectories SET
                        status = CASE WHEN expected_events IS NULL THEN 'abandoned' ELSE 'incomplete' END,
                        finalized_at = now()
                    WHERE trajectory_id IN (
                        SELECT trajectory_id FROM trajectories
                        WHERE status = 'recording'
                          AND last_event_at < now() - make_interval(secs => least($1::float8, $2::float8))
                          AND CASE WHEN expected_events IS NULL
                                   THEN last_event_at < now() - make_interval(secs => $2::float8)
                                   ELSE last_event_at < now() - make_interval(secs => $1::float8) END
                        LIMIT $3)
                      AND status = 'recording'
                    RETURNING {FINALIZED_COLUMNS}""",
                self.settings.incomplete_after_s,
                self.settings.abandoned_after_s,
                SWEEP_LIMIT,
            )
        for f in finalized_from(late):
            FINALIZED.labels(f.status).inc()
            log.info("recorder.trajectory_finalized_late", trajectory_id=str(f.trajectory_id), status=f.status)
        # Late ones were just finalized: announce them now, with any a crash left unannounced.
        unpublished = await self.service.pool.fetch(
            f"""SELECT {FINALIZED_COLUMNS} FROM trajectories
                WHERE finalized_at IS NOT NULL AND completion_published_at IS NULL
                  AND finalized_at < now() - interval '2 seconds'
                ORDER BY finalized_at LIMIT $1""",
            SWEEP_LIMIT,
        )
        await self.announce(finalized_from(late) + finalized_from(unpublished))
        RECORDING.set(await self.service.pool.fetchval("SELECT count(*) FROM trajectories WHERE status = 'recording'"))

    # --- operators -------------------------------------------------------------------------------------

    async def status(self, request: dict[str, Any]) -> dict[str, Any]:
        """``cmd.recorder.status``: what an operator asks first. Cheap queries only (indexes)."""
        consumer = self.service.consumers[0]
        info = await self.service.broker.connection.jetstream().consumer_info(consumer.stream, consumer.name)
        return {
            "trajectories_recording": await self.service.pool.fetchval(
                "SELECT count(*) FROM trajectories WHERE status = 'recording'"
            ),
            "completions_unpublished": await self.service.pool.fetchval(
                "SELECT count(*) FROM trajectories WHERE finalized_at IS NOT NULL AND completion_published_at IS NULL"
            ),
            "dead_letters": await self.service.pool.fetchval("SELECT count(*) FROM dead_letters"),
            "consumer": {
                "name": consumer.name,
                "pending": info.num_pending or 0,
                "ack_pending": info.num_ack_pending or 0,
                "redelivered": info.num_redelivered or 0,
            },
        }

    # --- dead letters ----------------------------------------------------------------------------------

    async def keep_dead_letter(self, letter: DeadLetter) -> None:
        """Also keep dead letters next to the data, where operators query them with SQL."""
        try:
            await self.service.pool.execute(
                """INSERT INTO dead_letters (dead_letter_id, consumer, kind, reason, subject, stream_seq, msg_id,
                       headers, payload, failed_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING""",
                letter.event_id,
                letter.consumer,
                letter.kind,
                letter.reason,
                letter.subject,
                letter.stream_seq,
                letter.msg_id,
                letter.headers,
                letter.payload,
                letter.occurred_at,
            )
        except (asyncpg.PostgresError, OSError) as error:
            # The DLQ stream already holds it; the table is the convenient copy.
            log.warning("recorder.dead_letter_table_write_failed", error=repr(error))
        event_type = letter.subject.rsplit(".", 1)[-1]
        EVENTS.labels(event_type if event_type in EVENT_TYPES else "unknown", "dead_lettered").inc()


def build(settings: RecorderSettings | None = None, connection: ConnectionSettings | None = None) -> Service:
    return Recorder(settings or RecorderSettings(), connection).service


def main() -> None:
    run(build)
