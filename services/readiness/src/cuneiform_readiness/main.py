"""The readiness service: when enough good data exists, freeze a batch and announce it.

Evaluated on a timer (hourly by default), after ``pipeline.trajectory.completed`` /
``pipeline.reward.judged`` (debounced), and on ``cmd.readiness.trigger`` (optionally forced past the
rules, with who and why recorded). A batch is created in one transaction under an advisory lock —
replicas never freeze the same trajectory twice — and then announced on ``pipeline.batch.created``
with an event id derived from the batch id; a sweep announces any batch a crash left unannounced.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
from cuneiform_core.events import BatchCreated, TrajectoryCompleted, publish, stable_id
from cuneiform_core.logging import get_logger
from cuneiform_core.runtime import ConsumerOptions, Delivery
from cuneiform_core.service import Service, run
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import BATCH_CREATED, PIPELINE, REWARD_JUDGED, TRAJECTORY_COMPLETED
from cuneiform_sdk.ids import uuid7
from prometheus_client import Counter, Gauge

from .rules import Verdict, evaluate, snapshot, trainable_trajectories
from .settings import ReadinessSettings

log = get_logger(__name__)

READY = Gauge("cuneiform_readiness_ready", "1 when every readiness rule passes")
RULE_VALUE = Gauge("cuneiform_readiness_rule_value", "The number behind each readiness rule", ["rule"])
RULE_PASSED = Gauge("cuneiform_readiness_rule_passed", "1 when the rule passes", ["rule"])
BATCHES = Counter("cuneiform_readiness_batches_total", "Batches created", ["trigger"])

#: Advisory lock key: one batch is frozen at a time across replicas.
_LOCK = 0x0C0E1F0A_0000_0001


class NothingToBatch(RuntimeError):
    pass


class RecorderMissing(RuntimeError):
    pass


class Readiness:
    def __init__(self, settings: ReadinessSettings, connection: ConnectionSettings | None = None) -> None:
        self.settings = settings
        self.service = Service(
            settings, connection, migrations="cuneiform_readiness.migrations", pool_size=settings.pool_size
        )
        self.verdict: Verdict | None = None
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self.service.consume(
            name="readiness",
            stream=PIPELINE,
            subjects=[TRAJECTORY_COMPLETED, REWARD_JUDGED],
            decode=self.decode,
            handle=self.noted,
            options=ConsumerOptions(batch_size=1000),
        )
        self.service.every(settings.evaluate_interval_s, "evaluate")(self.scheduled)
        self.service.every(settings.event_debounce_s, "evaluate-after-events")(self.after_events)
        self.service.every(5.0, "announce")(self.announce_pending)
        self.service.command("status")(self.status)
        self.service.command("trigger")(self.trigger)
        self.service.command("release")(self.release)

    # --- inputs --------------------------------------------------------------------------------------

    @staticmethod
    def decode(delivery: Delivery) -> str:
        # The content does not matter (the rules read PostgreSQL); a malformed event is still dead-lettered.
        if delivery.subject.endswith(TRAJECTORY_COMPLETED):
            TrajectoryCompleted.model_validate_json(delivery.data)
        return delivery.subject

    async def noted(self, _: Sequence[str]) -> None:
        self._dirty.set()

    async def after_events(self) -> None:
        if self._dirty.is_set():
            self._dirty.clear()
            await self.evaluate_and_act("readiness")

    async def scheduled(self) -> None:
        await self.evaluate_and_act("readiness")

    # --- the decision --------------------------------------------------------------------------------

    async def evaluate(self) -> Verdict:
        async with self.service.pool.acquire() as conn:
            try:
                numbers = await snapshot(conn, self.settings)
            except asyncpg.UndefinedTableError:
                raise RecorderMissing(
                    "the recorder's tables do not exist yet: start cuneiform-recorder (it creates them) first"
                ) from None
            verdict = evaluate(numbers, self.settings)
        self.verdict = verdict
        READY.set(1 if verdict.ready else 0)
        for rule in verdict.rules:
            RULE_VALUE.labels(rule.rule).set(rule.value if rule.value is not None else float("nan"))
            RULE_PASSED.labels(rule.rule).set(1 if rule.passed else 0)
        return verdict

    async def evaluate_and_act(self, triggered_by: str, reason: str = "", force: bool = False) -> dict[str, Any]:
        async with self._lock:  # one decision at a time in this process (replicas: the advisory lock)
            verdict = await self.evaluate()
            if not (verdict.ready or force):
                log.info("readiness.not_ready", failing=verdict.failing(), summary=verdict.summary())
                return {"created": False, "verdict": verdict.as_dict()}
            batch = await self.create_batch(verdict, triggered_by, reason or verdict.summary(), force)
            await self.announce_pending()
            await self.evaluate()
            return {"created": True, "batch": batch, "verdict": verdict.as_dict()}

    async def create_batch(self, verdict: Verdict, triggered_by: str, reason: str, forced: bool) -> dict[str, Any]:
        batch_id = uuid7()
        async with self.service.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
            rows = await trainable_trajectories(conn, self.settings)
            if not rows:
                raise NothingToBatch(
                    "no eligible trajectories in groups with a reward spread: nothing to train on "
                    f"({verdict.summary()})"
                )
            groups = len({r["scenario_id"] for r in rows})
            await conn.execute(
                """INSERT INTO readiness.batches (batch_id, triggered_by, reason, forced, verdict, trajectory_count,
                       group_count) VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                batch_id,
                triggered_by,
                reason,
                forced,
                verdict.as_dict(),
                len(rows),
                groups,
            )
            await conn.copy_records_to_table(
                "batch_trajectories",
                schema_name="readiness",
                records=[(r["trajectory_id"], batch_id, r["scenario_id"]) for r in rows],
                columns=["trajectory_id", "batch_id", "scenario_id"],
            )
        BATCHES.labels("forced" if forced else "rules").inc()
        log.info(
            "readiness.batch_created", batch_id=str(batch_id), trajectories=len(rows), groups=groups, by=triggered_by
        )
        return {"batch_id": str(batch_id), "trajectories": len(rows), "groups": groups}

    async def announce_pending(self) -> None:
        """Publish pipeline.batch.created for every batch not yet announced (same event id on retry)."""
        async with self.service.pool.acquire() as conn:
            pending = await conn.fetch(
                "SELECT * FROM readiness.batches WHERE published_at IS NULL AND status = 'created' ORDER BY created_at"
            )
            for batch in pending:
                ids = await conn.fetch(
                    "SELECT trajectory_id FROM readiness.batch_trajectories WHERE batch_id = $1 ORDER BY trajectory_id",
                    batch["batch_id"],
                )
                event = BatchCreated(
                    event_id=stable_id("batch.created", batch["batch_id"]),
                    occurred_at=batch["created_at"],
                    batch_id=batch["batch_id"],
                    trajectory_ids=[r["trajectory_id"] for r in ids],
                    triggered_by=batch["triggered_by"],
                    reason=batch["reason"],
                    rules={r["rule"]: r["value"] for r in batch["verdict"]["rules"]},
                )
                await publish(
                    self.service.broker,
                    self.service.topology.subject(BATCH_CREATED),
                    event,
                    stream=self.service.topology.stream(PIPELINE),
                )
                await conn.execute(
                    "UPDATE readiness.batches SET published_at = now() WHERE batch_id = $1", batch["batch_id"]
                )

    # --- commands ------------------------------------------------------------------------------------

    async def status(self, _: dict[str, Any]) -> dict[str, Any]:
        verdict = await self.evaluate()
        async with self.service.pool.acquire() as conn:
            last = await conn.fetchrow(
                "SELECT batch_id, created_at, triggered_by, reason, forced, trajectory_count, group_count, status "
                "FROM readiness.batches ORDER BY created_at DESC LIMIT 1"
            )
        answer = verdict.as_dict()
        answer["last_batch"] = None if last is None else {k: _plain(v) for k, v in dict(last).items()}
        return answer

    async def trigger(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"force": bool, "who": "...", "why": "..."}``: evaluate now; with force, batch past the rules."""
        who = str(request.get("who") or "unknown")
        why = str(request.get("why") or "manual trigger")
        force = bool(request.get("force", False))
        log.info("readiness.triggered", who=who, why=why, force=force)
        return await self.evaluate_and_act(f"manual:{who}", why, force=force)

    async def release(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"batch_id": "...", "reason": "..."}``: the batch failed; its trajectories may be used again."""
        batch_id = uuid.UUID(str(request["batch_id"]))
        reason = str(request.get("reason") or "released")
        async with self.service.pool.acquire() as conn, conn.transaction():
            updated = await conn.execute(
                "UPDATE readiness.batches SET status = 'released', released_at = now(), release_reason = $2 "
                "WHERE batch_id = $1 AND status = 'created'",
                batch_id,
                reason,
            )
            freed = await conn.execute("DELETE FROM readiness.batch_trajectories WHERE batch_id = $1", batch_id)
        if updated.endswith(" 0"):
            raise ValueError(f"no live batch {batch_id}")
        return {"batch_id": str(batch_id), "trajectories_freed": int(freed.split()[-1])}


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def build(settings: ReadinessSettings | None = None, connection: ConnectionSettings | None = None) -> Service:
    return Readiness(settings or ReadinessSettings(), connection).service


def main() -> None:
    run(build)
