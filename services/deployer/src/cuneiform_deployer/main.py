"""The deployer: the model registry, routing tables in NATS KV, experiments decided on live reward.

* **Registry.** ``pipeline.model.trained`` registers the version with its lineage (batch, dataset, the
  dataset's trajectory ids from its manifest, base model, metrics, artifact and checksum, trainer); a
  version uploaded by hand (``cuneiform-deployer register``) registers the same way, its artifact read
  back and checked first. Primary key (model, version): a redelivered announcement registers nothing twice.
* **Routing.** Every change — a deployment, a promotion, a rollback, a pin — is one transaction (under
  a per-model advisory lock) that writes the model's new routing table (revision + 1), its deployment
  and a history row. After the commit the table is written to the KV bucket ``routing`` (compare-and-set
  on the revision, so an older table never overwrites a newer one) and the history row is announced on
  ``pipeline.deployment.changed`` with its own event id; a sweep redoes both after a crash.
* **Experiments.** A canary or A/B deployment is evaluated on a timer and after trajectory completions
  (debounced) by the rule in :mod:`.rules`, over the trajectories each arm ran under this deployment
  (read from the recorder's tables); the verdict promotes the challenger or rolls it back on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from cuneiform_core.events import DeploymentChanged, ModelTrained, TrajectoryCompleted, publish
from cuneiform_core.logging import get_logger
from cuneiform_core.runtime import ConsumerOptions, Delivery
from cuneiform_core.service import Service, run
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import (
    DEPLOYMENT_CHANGED,
    MODEL_TRAINED,
    PIPELINE,
    ROUTING_BUCKET,
    TRAJECTORY_COMPLETED,
)
from cuneiform_sdk.ids import uuid7
from cuneiform_sdk.routing import MODEL_NAME_PATTERN, RoutingTable
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from prometheus_client import Counter, Gauge

from .rules import ArmStats, Verdict, decide
from .settings import DeployerSettings

log = get_logger(__name__)

CHANGES = Counter("cuneiform_deployer_changes_total", "Routing changes", ["action", "actor"])
REGISTERED = Counter("cuneiform_deployer_models_registered_total", "Model versions registered", ["source"])
ARM_TRAJECTORIES = Gauge(
    "cuneiform_deployer_arm_trajectories", "Finished trajectories per arm of running experiments", ["model", "version"]
)
ARM_REWARD = Gauge(
    "cuneiform_deployer_arm_mean_reward", "Mean reward per arm of running experiments", ["model", "version"]
)
ARM_FAILURE = Gauge(
    "cuneiform_deployer_arm_failure_rate", "Failure rate per arm of running experiments", ["model", "version"]
)
EXPERIMENTS = Gauge("cuneiform_deployer_experiments_running", "Canary / A/B deployments being evaluated")
ROUTING_LAG = Gauge("cuneiform_deployer_routing_unwritten", "Routing tables committed but not yet in the KV bucket")

_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,99}$"
#: A trajectory's reward: what the agent reported, else the sum of its reward events (as the datasets).
REWARD_SQL = (
    "COALESCE(t.total_reward, (SELECT sum(r.value) FROM recorder.rewards r WHERE r.trajectory_id = t.trajectory_id), 0)"
)


class DeployError(ValueError):
    """A command that cannot be carried out as asked; the message says why and what to do."""


class Deployer:
    def __init__(self, settings: DeployerSettings, connection: ConnectionSettings | None = None) -> None:
        self.settings = settings
        self.rule = settings.rule()
        self.service = Service(
            settings,
            connection,
            migrations="cuneiform_deployer.migrations",
            object_store=True,
            pool_size=settings.pool_size,
        )
        self._dirty = asyncio.Event()
        self._evaluating = asyncio.Lock()
        self.service.consume(
            name="deployer-models",
            stream=PIPELINE,
            subjects=[MODEL_TRAINED],
            decode=lambda d: ModelTrained.model_validate_json(d.data),
            handle=self.models_trained,
            options=ConsumerOptions(batch_size=16),
        )
        self.service.consume(
            name="deployer",
            stream=PIPELINE,
            subjects=[TRAJECTORY_COMPLETED],
            decode=self._completion,
            handle=self._noted,
            options=ConsumerOptions(batch_size=1000),
        )
        self.service.every(settings.evaluate_interval_s, "evaluate")(self._scheduled)
        self.service.every(settings.event_debounce_s, "evaluate-after-events")(self._after_events)
        self.service.every(settings.sweep_interval_s, "sweep")(self.flush)
        self.service.every(settings.reconcile_interval_s, "reconcile")(self.reconcile)
        for verb in ("register", "deploy", "promote", "rollback", "pin", "status", "models", "history", "deployment"):
            self.service.command(verb)(getattr(self, f"cmd_{verb}"))

    # --- registry ------------------------------------------------------------------------------------------

    async def models_trained(self, events: Sequence[ModelTrained]) -> dict[int, str]:
        """Register each announced version (once), then roll it out as ``auto_rollout`` says — unless it
        was ever deployed, so that a redelivery after a crash between the two finishes the job exactly once.
        A version name already registered with another artifact is rejected (dead-lettered with the reason)."""
        rejected: dict[int, str] = {}
        for index, event in enumerate(events):
            trajectory_ids = await self._dataset_trajectories(event.dataset_id)
            async with self.service.pool.acquire() as conn:
                trigger = await _batch_trigger(conn, event.batch_id)
                added = await conn.fetchval(
                    """INSERT INTO deployer.models (model_name, model_version, source, batch_id, dataset_id,
                           trajectory_ids, base_model, bucket, artifact_key, artifact_sha256, artifact_size, metrics,
                           trainer_id, attempt, registered_by, reason, triggered_by, trigger_reason)
                       VALUES ($1, $2, 'trained', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                               'trainer-dispatcher', $14, $15, $16)
                       ON CONFLICT DO NOTHING RETURNING model_version""",
                    event.model_name,
                    event.model_version,
                    event.batch_id,
                    event.dataset_id,
                    trajectory_ids,
                    event.base_model,
                    event.bucket,
                    event.artifact_key,
                    event.artifact_sha256,
                    event.artifact_size,
                    event.metrics,
                    event.trainer_id,
                    event.attempt,
                    f"trained on batch {event.batch_id}",
                    trigger[0],
                    trigger[1],
                )
                if added is None:
                    existing = await conn.fetchval(
                        "SELECT artifact_sha256 FROM deployer.models WHERE model_name = $1 AND model_version = $2",
                        event.model_name,
                        event.model_version,
                    )
                    if existing != event.artifact_sha256:
                        rejected[index] = (
                            f"{event.model_name} {event.model_version} is already registered with another artifact "
                            f"(sha256 {existing}); a version registered by hand must not take a name the "
                            "trainer-dispatcher gives trained versions (v2, v3, …)"
                        )
                        log.error("deployer.version_conflict", model=event.model_name, version=event.model_version)
                        continue
                deployed = await conn.fetchval(
                    "SELECT 1 FROM deployer.deployments WHERE model_name = $1 AND arms @> $2::jsonb",
                    event.model_name,
                    [{"version": event.model_version}],
                )
            if added is not None:
                REGISTERED.labels("trained").inc()
                log.info("deployer.registered", model=event.model_name, version=event.model_version, source="trained")
            if not deployed:
                await self.auto_rollout(event.model_name, event.model_version)
        return rejected

    async def _dataset_trajectories(self, dataset_id: uuid.UUID) -> list[uuid.UUID]:
        try:
            manifest = json.loads(await self.service.store.get_bytes(f"datasets/{dataset_id}/manifest.json"))
        except Exception as error:
            # Lineage without trajectory ids is still lineage (the batch and dataset ids lead there).
            log.warning("deployer.manifest_unreadable", dataset_id=str(dataset_id), error=repr(error))
            return []
        return [uuid.UUID(i) for i in manifest.get("trajectory_ids", [])]

    async def auto_rollout(self, model_name: str, version: str) -> None:
        mode = self.settings.auto_rollout
        if mode == "off":
            return
        # deploy() itself sends the first version of a model to everyone (no champion to test against).
        reason = f"new trained version {version} (auto rollout: {mode}; immediate while there is no champion)"
        try:
            await self.deploy(model_name, [version], mode, actor="deployer:auto", reason=reason)
        except DeployError as error:  # registered all the same; an operator can deploy it by hand
            log.warning("deployer.auto_rollout_refused", model=model_name, version=version, error=str(error))

    async def register_manual(self, request: dict[str, Any]) -> dict[str, Any]:
        model_name = _checked(request.get("model_name"), MODEL_NAME_PATTERN, "model_name")
        version = _checked(request.get("version"), _VERSION_PATTERN, "version")
        key = str(request.get("artifact_key") or "")
        sha256 = str(request.get("sha256") or "")
        if not key or len(sha256) != 64:
            raise DeployError("register needs artifact_key and its sha256 (cuneiform-deployer register uploads both)")
        store = self.service.store
        # Uploaded by the CLI: read it back and check it before anything can route to it.
        body = await store.get_bytes(key)
        if hashlib.sha256(body).hexdigest() != sha256:
            raise DeployError(f"the artifact at {key} does not match sha256 {sha256}: upload it again")
        actor = _actor(request)
        async with self.service.pool.acquire() as conn:
            existing = await conn.fetchrow(
                "SELECT artifact_sha256 FROM deployer.models WHERE model_name = $1 AND model_version = $2",
                model_name,
                version,
            )
            if existing is not None:
                if existing["artifact_sha256"] == sha256:
                    return {"model_name": model_name, "version": version, "registered": False, "existing": True}
                raise DeployError(
                    f"{model_name} {version} is already registered with another artifact; pick a new version"
                )
            await conn.execute(
                """INSERT INTO deployer.models (model_name, model_version, source, base_model, bucket, artifact_key,
                       artifact_sha256, artifact_size, metrics, registered_by, reason)
                   VALUES ($1, $2, 'manual', $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING""",
                model_name,
                version,
                request.get("base_model"),
                store.bucket,
                key,
                sha256,
                len(body),
                dict(request.get("metrics") or {}),
                actor,
                str(request.get("reason") or "uploaded by hand"),
            )
        REGISTERED.labels("manual").inc()
        log.info("deployer.registered", model=model_name, version=version, source="manual", by=actor)
        return {"model_name": model_name, "version": version, "registered": True, "artifact_key": key}

    # --- routing changes -----------------------------------------------------------------------------------

    async def deploy(
        self,
        model_name: str,
        versions: list[str],
        strategy: str,
        *,
        actor: str,
        reason: str,
        percent: float | None = None,
        weights: list[float] | None = None,
    ) -> dict[str, Any]:
        if strategy not in ("immediate", "canary", "ab"):
            raise DeployError(f"unknown strategy {strategy!r}: immediate, canary or ab")
        if not versions:
            raise DeployError("deploy needs a version")
        async with self._change(model_name) as conn:
            await self._require_registered(conn, model_name, versions)
            current = await _active(conn, model_name)
            champion = current["champion"] if current is not None else None
            if strategy == "immediate" or champion is None:
                if len(versions) != 1:
                    raise DeployError("an immediate deployment routes every agent to one version")
                strategy, arms = "immediate", [_arm(versions[0], 1.0, "champion")]
                champion = versions[0]
            else:
                if champion in versions:
                    raise DeployError(f"{champion} is the champion already; deploy a different version against it")
                if strategy == "canary":
                    if len(versions) != 1:
                        raise DeployError("a canary tries one version; use strategy ab for several")
                    share = (percent if percent is not None else self.settings.canary_percent) / 100
                    if not 0 < share < 1:
                        raise DeployError("a canary's percent is between 0 and 100")
                    arms = [_arm(versions[0], share, "challenger"), _arm(champion, 1 - share, "champion")]
                else:
                    shares = weights or [1.0] * (len(versions) + 1)
                    if len(shares) != len(versions) + 1 or any(w <= 0 for w in shares):
                        raise DeployError("ab weights: one positive weight per challenger, then the champion's")
                    total = sum(shares)
                    arms = [_arm(v, w / total, "challenger") for v, w in zip(versions, shares, strict=False)]
                    arms.append(_arm(champion, shares[-1] / total, "champion"))
            return await self._new_deployment(conn, model_name, strategy, arms, champion, "deploy", actor, reason)

    async def promote(
        self, model_name: str, version: str | None, *, actor: str, reason: str, evaluation: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        async with self._change(model_name) as conn:
            current = await _active(conn, model_name)
            challengers = _challengers(current)
            if version is None:
                if len(challengers) != 1:
                    raise DeployError(
                        f"{model_name} has {len(challengers)} challengers running; say which version to promote"
                    )
                version = challengers[0]
            await self._require_registered(conn, model_name, [version])
            if current is not None and current["strategy"] != "immediate":
                await _end(conn, current, "promoted", {"promoted": version, "actor": actor, "reason": reason,
                                                       "evaluation": evaluation})  # fmt: skip
            return await self._new_deployment(
                conn, model_name, "immediate", [_arm(version, 1.0, "champion")], version, "promote", actor, reason,
                evaluation,
            )  # fmt: skip

    async def rollback(
        self,
        model_name: str,
        to_version: str | None,
        *,
        actor: str,
        reason: str,
        evaluation: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        async with self._change(model_name) as conn:
            current = await _active(conn, model_name)
            if current is None:
                raise DeployError(f"{model_name} has no deployment to roll back")
            target = to_version
            if target is None:
                if current["strategy"] != "immediate":
                    target = current["champion"]  # an experiment: back to its champion
                else:
                    target = await conn.fetchval(
                        """SELECT champion FROM deployer.deployments WHERE model_name = $1 AND champion <> $2
                           ORDER BY created_at DESC LIMIT 1""",
                        model_name,
                        current["champion"],
                    )
                    if target is None:
                        raise DeployError(f"{model_name} has no earlier version to roll back to; name one")
            await self._require_registered(conn, model_name, [target])
            if current["strategy"] != "immediate":
                await _end(conn, current, "rolled_back", {"kept": target, "actor": actor, "reason": reason,
                                                          "evaluation": evaluation})  # fmt: skip
            else:
                await _end(conn, current, "superseded", None)
            return await self._new_deployment(
                conn, model_name, "immediate", [_arm(target, 1.0, "champion")], target, "rollback", actor, reason,
                evaluation,
            )  # fmt: skip

    async def drop_challenger(
        self, model_name: str, version: str, *, actor: str, reason: str, evaluation: dict[str, Any]
    ) -> dict[str, Any]:
        """Roll back one challenger of a multi-arm experiment: its slice runs the champion from now on
        (same deployment, so no other agent changes arm)."""
        async with self._change(model_name) as conn:
            current = await _active(conn, model_name)
            if current is None or version not in _challengers(current):
                raise DeployError(f"{version} is not a running challenger of {model_name}")
            arms = [
                _arm(current["champion"], a["weight"], "champion") if a["version"] == version else a
                for a in current["arms"]
            ]
            await conn.execute(
                "UPDATE deployer.deployments SET arms = $2 WHERE deployment_id = $1",
                current["deployment_id"],
                arms,
            )
            return await self._write_routing(
                conn, model_name, current["deployment_id"], current["strategy"], arms, "rollback", actor, reason,
                evaluation=evaluation,
            )  # fmt: skip

    async def pin(
        self, model_name: str, agent_id: str, version: str | None, *, actor: str, reason: str
    ) -> dict[str, Any]:
        async with self._change(model_name) as conn:
            current = await _active(conn, model_name)
            if current is None:
                raise DeployError(f"{model_name} has no deployment yet: deploy a version before pinning agents")
            if version is not None:
                await self._require_registered(conn, model_name, [version])
            pins = await conn.fetchval("SELECT pins FROM deployer.routing WHERE model_name = $1", model_name)
            if version is None:
                pins.pop(agent_id, None)
            else:
                pins[agent_id] = version
            await conn.execute("UPDATE deployer.routing SET pins = $2 WHERE model_name = $1", model_name, pins)
            return await self._write_routing(
                conn, model_name, current["deployment_id"], current["strategy"], current["arms"],
                "pin" if version else "unpin", actor, f"{agent_id}: {reason}",
            )  # fmt: skip

    @contextlib.asynccontextmanager
    async def _change(self, model_name: str) -> AsyncIterator[asyncpg.Connection]:
        """One transaction under the model's advisory lock; after the commit, the routing goes to the KV
        bucket and the change is announced (a failure there is finished by the sweep)."""
        _checked(model_name, MODEL_NAME_PATTERN, "model_name")
        async with self.service.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('deployer:' || $1))", model_name)
            yield conn
        try:
            await self.flush()
        except Exception as failure:  # committed: the sweep finishes the job
            log.warning("deployer.flush_deferred", model=model_name, error=repr(failure))

    async def _require_registered(self, conn: asyncpg.Connection, model_name: str, versions: list[str]) -> None:
        found = await conn.fetch(
            "SELECT model_version FROM deployer.models WHERE model_name = $1 AND model_version = ANY($2::text[])",
            model_name,
            versions,
        )
        missing = sorted(set(versions) - {r["model_version"] for r in found})
        if missing:
            raise DeployError(
                f"{model_name} {', '.join(missing)} not registered: `cuneiform-deployer models` lists the versions; "
                "`cuneiform-deployer register` adds one"
            )

    async def _new_deployment(
        self,
        conn: asyncpg.Connection,
        model_name: str,
        strategy: str,
        arms: list[dict[str, Any]],
        champion: str,
        action: str,
        actor: str,
        reason: str,
        evaluation: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        await conn.execute(
            "UPDATE deployer.deployments SET status = 'superseded', decided_at = now() "
            "WHERE model_name = $1 AND status = 'active'",
            model_name,
        )
        deployment_id = uuid7()
        await conn.execute(
            """INSERT INTO deployer.deployments
                   (deployment_id, model_name, strategy, arms, champion, created_by, reason)
               VALUES ($1, $2, $3, $4, $5, $6, $7)""",
            deployment_id,
            model_name,
            strategy,
            arms,
            champion,
            actor,
            reason,
        )
        return await self._write_routing(
            conn, model_name, deployment_id, strategy, arms, action, actor, reason, evaluation
        )

    async def _write_routing(
        self,
        conn: asyncpg.Connection,
        model_name: str,
        deployment_id: uuid.UUID,
        strategy: str,
        arms: list[dict[str, Any]],
        action: str,
        actor: str,
        reason: str,
        evaluation: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        row = await conn.fetchrow(
            "SELECT revision, pins, routing FROM deployer.routing WHERE model_name = $1", model_name
        )
        revision = (row["revision"] if row else 0) + 1
        pins = row["pins"] if row else {}
        previous = _weights(row["routing"]["arms"]) if row else {}
        versions = sorted({a["version"] for a in arms} | set(pins.values()))
        artifacts = {
            r["model_version"]: {"bucket": r["bucket"], "key": r["artifact_key"], "sha256": r["artifact_sha256"],
                                 "size": r["artifact_size"]}
            for r in await conn.fetch(
                "SELECT model_version, bucket, artifact_key, artifact_sha256, artifact_size FROM deployer.models "
                "WHERE model_name = $1 AND model_version = ANY($2::text[])",
                model_name,
                versions,
            )
        }  # fmt: skip
        arm_versions = {a["version"] for a in arms}
        table = RoutingTable(
            model_name=model_name,
            deployment_id=str(deployment_id),
            strategy=strategy,  # type: ignore[arg-type]
            revision=revision,
            arms=[{**a, "artifact": artifacts.get(a["version"])} for a in arms],  # type: ignore[misc]
            pins=pins,
            artifacts={v: artifacts[v] for v in versions if v not in arm_versions and v in artifacts},  # type: ignore[misc]
            updated_at=datetime.now(UTC),
        )
        document = table.model_dump(mode="json")
        await conn.execute(
            """INSERT INTO deployer.routing (model_name, revision, deployment_id, pins, routing, updated_at)
               VALUES ($1, $2, $3, $4, $5, now())
               ON CONFLICT (model_name) DO UPDATE SET revision = EXCLUDED.revision,
                   deployment_id = EXCLUDED.deployment_id, routing = EXCLUDED.routing, updated_at = now()""",
            model_name,
            revision,
            deployment_id,
            pins,
            document,
        )
        event_id = uuid7()
        await conn.execute(
            """INSERT INTO deployer.history (event_id, model_name, deployment_id, action, actor, reason, revision,
                   strategy, previous, current, routing, evaluation)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
            event_id,
            model_name,
            deployment_id,
            action,
            actor,
            reason,
            revision,
            strategy,
            previous,
            _weights(arms),
            document,
            evaluation,
        )
        CHANGES.labels(action, actor.split(":")[0]).inc()
        log.info(
            "deployer.changed", model=model_name, action=action, actor=actor, revision=revision,
            deployment_id=str(deployment_id), weights=_weights(arms), reason=reason,
        )  # fmt: skip
        return {
            "model_name": model_name,
            "deployment_id": str(deployment_id),
            "revision": revision,
            "routing": document,
        }

    # --- after the commit: the KV bucket and the announcements ----------------------------------------------

    async def flush(self) -> None:
        """Write every routing table the KV bucket lacks, then announce every unannounced change."""
        async with self.service.pool.acquire() as conn:
            lagging = await conn.fetch(
                "SELECT model_name, revision, routing FROM deployer.routing WHERE written_revision < revision"
            )
            ROUTING_LAG.set(len(lagging))
            for row in lagging:
                await self._put_routing(row["model_name"], row["revision"], json.dumps(row["routing"]))
                await conn.execute(
                    "UPDATE deployer.routing SET written_revision = GREATEST(written_revision, $2) "
                    "WHERE model_name = $1",
                    row["model_name"],
                    row["revision"],
                )
            ROUTING_LAG.set(0)
            pending = await conn.fetch("SELECT * FROM deployer.history WHERE published_at IS NULL ORDER BY seq")
            for change in pending:
                event = DeploymentChanged(
                    event_id=change["event_id"],
                    occurred_at=change["at"],
                    model_name=change["model_name"],
                    deployment_id=change["deployment_id"],
                    action=change["action"],
                    actor=change["actor"],
                    reason=change["reason"],
                    revision=change["revision"],
                    strategy=change["strategy"],
                    previous=change["previous"],
                    current=change["current"],
                    routing=change["routing"],
                    evaluation=change["evaluation"],
                )
                topology = self.service.topology
                await publish(
                    self.service.broker, topology.subject(DEPLOYMENT_CHANGED), event, stream=topology.stream(PIPELINE)
                )
                await conn.execute("UPDATE deployer.history SET published_at = now() WHERE seq = $1", change["seq"])

    async def reconcile(self) -> None:
        """A table missing from the bucket or older there than here (the key purged, the bucket recreated
        by hand) is written again: the bucket is a copy, PostgreSQL is the record."""
        kv = await self.service.broker.connection.jetstream().key_value(self.service.topology.bucket(ROUTING_BUCKET))
        async with self.service.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT model_name, revision FROM deployer.routing WHERE written_revision >= revision"
            )
            for row in rows:
                try:
                    entry = await kv.get(row["model_name"])
                    there = json.loads(entry.value or b"{}").get("revision", 0)
                except KeyNotFoundError:
                    there = 0
                if there < row["revision"]:
                    log.warning("deployer.routing_missing", model=row["model_name"], kv_revision=there,
                                revision=row["revision"])  # fmt: skip
                    await conn.execute(
                        "UPDATE deployer.routing SET written_revision = 0 WHERE model_name = $1", row["model_name"]
                    )
        await self.flush()

    async def _put_routing(self, model_name: str, revision: int, document: str) -> None:
        kv = await self.service.broker.connection.jetstream().key_value(self.service.topology.bucket(ROUTING_BUCKET))
        value = document.encode()
        for _ in range(10):
            try:
                entry = await kv.get(model_name)
            except KeyNotFoundError:
                entry = None
            try:
                if entry is None or not entry.value:
                    await kv.create(model_name, value)
                    return
                if json.loads(entry.value).get("revision", 0) >= revision:
                    return  # a newer table is there already (another replica, or an earlier flush)
                await kv.update(model_name, value, last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue  # someone wrote in between: look again
        raise RuntimeError(f"routing for {model_name} kept changing under the write; the sweep will retry")

    # --- evaluation ----------------------------------------------------------------------------------------

    def _completion(self, delivery: Delivery) -> None:
        TrajectoryCompleted.model_validate_json(delivery.data)

    async def _noted(self, _: Sequence[None]) -> None:
        self._dirty.set()

    async def _scheduled(self) -> None:
        await self.evaluate()

    async def _after_events(self) -> None:
        if self._dirty.is_set():
            self._dirty.clear()
            await self.evaluate()

    async def evaluate(self) -> list[dict[str, Any]]:
        """Evaluate every running experiment and act on the verdicts; returns them."""
        async with self._evaluating:
            async with self.service.pool.acquire() as conn:
                running = await conn.fetch(
                    "SELECT * FROM deployer.deployments WHERE status = 'active' AND strategy <> 'immediate'"
                )
            EXPERIMENTS.set(len(running))
            for gauge in (ARM_TRAJECTORIES, ARM_REWARD, ARM_FAILURE):
                gauge.clear()  # arms of ended experiments disappear from the dashboard
            results = []
            for deployment in running:
                verdicts = await self.judge(deployment)
                results.append({"model_name": deployment["model_name"], "verdicts": [v.as_dict() for v in verdicts]})
                await self._act(deployment, verdicts)
            return results

    async def judge(self, deployment: asyncpg.Record, conn: asyncpg.Connection | None = None) -> list[Verdict]:
        model_name = deployment["model_name"]
        if conn is None:
            async with self.service.pool.acquire() as own:
                stats = await arm_stats(own, model_name, deployment_id=deployment["deployment_id"])
        else:  # never hold one pool connection while waiting for another
            stats = await arm_stats(conn, model_name, deployment_id=deployment["deployment_id"])
        for version, arm in stats.items():
            ARM_TRAJECTORIES.labels(model_name, version).set(arm.finished)
            ARM_REWARD.labels(model_name, version).set(arm.mean)
            ARM_FAILURE.labels(model_name, version).set(arm.failure_rate)
        champion = deployment["champion"]
        challengers = _challengers(deployment)
        age = (datetime.now(UTC) - deployment["created_at"]).total_seconds()
        return [
            decide(stats.get(champion, ArmStats(champion)), stats.get(c, ArmStats(c)), self.rule, age_s=age,
                   challengers=len(challengers))
            for c in challengers
        ]  # fmt: skip

    async def _act(self, deployment: asyncpg.Record, verdicts: list[Verdict]) -> None:
        model_name = deployment["model_name"]
        winners = [v for v in verdicts if v.action == "promote"]
        losers = [v for v in verdicts if v.action == "rollback"]
        try:
            if winners:
                best = max(winners, key=lambda v: float(v.numbers["challenger_stats"]["mean_reward"]))
                await self.promote(
                    model_name, best.challenger, actor="deployer:auto", reason=best.reason, evaluation=best.as_dict()
                )
            elif losers and len(losers) == len(verdicts):
                await self.rollback(
                    model_name,
                    deployment["champion"],
                    actor="deployer:auto",
                    reason="; ".join(v.reason for v in losers),
                    evaluation={"verdicts": [v.as_dict() for v in losers]},
                )
            else:
                for loser in losers:
                    await self.drop_challenger(
                        model_name, loser.challenger, actor="deployer:auto", reason=loser.reason,
                        evaluation=loser.as_dict(),
                    )  # fmt: skip
        except DeployError as error:
            # An operator changed the routing meanwhile: the next evaluation sees the new state.
            log.info("deployer.verdict_skipped", model=model_name, error=str(error))

    # --- commands ------------------------------------------------------------------------------------------

    async def cmd_register(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.register_manual(request)

    async def cmd_deploy(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"model_name", "version" | "versions": [...], "strategy": immediate|canary|ab, "percent",
        "weights", "who", "why"}``."""
        versions = request.get("versions") or ([request["version"]] if request.get("version") else [])
        weights = request.get("weights")
        return await self.deploy(
            str(request.get("model_name") or ""),
            [str(v) for v in versions],
            str(request.get("strategy") or "immediate"),
            actor=_actor(request),
            reason=_reason(request),
            percent=float(request["percent"]) if request.get("percent") is not None else None,
            weights=[float(w) for w in weights] if weights else None,
        )

    async def cmd_promote(self, request: dict[str, Any]) -> dict[str, Any]:
        version = request.get("version")
        return await self.promote(
            str(request.get("model_name") or ""), str(version) if version else None, actor=_actor(request),
            reason=_reason(request),
        )  # fmt: skip

    async def cmd_rollback(self, request: dict[str, Any]) -> dict[str, Any]:
        version = request.get("to_version") or request.get("version")
        return await self.rollback(
            str(request.get("model_name") or ""), str(version) if version else None, actor=_actor(request),
            reason=_reason(request),
        )  # fmt: skip

    async def cmd_pin(self, request: dict[str, Any]) -> dict[str, Any]:
        agent_id = str(request.get("agent_id") or "")
        if not agent_id:
            raise DeployError("pin needs agent_id (and version; no version unpins)")
        version = request.get("version")
        return await self.pin(
            str(request.get("model_name") or ""), agent_id, str(version) if version else None, actor=_actor(request),
            reason=_reason(request),
        )  # fmt: skip

    async def cmd_status(self, request: dict[str, Any]) -> dict[str, Any]:
        """Per model: the routing table, the running experiment with its verdicts, reward by version."""
        wanted = request.get("model_name")
        async with self.service.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT model_name, revision, written_revision, routing FROM deployer.routing "
                "WHERE $1::text IS NULL OR model_name = $1 ORDER BY model_name",
                wanted,
            )
            answer: dict[str, Any] = {}
            for row in rows:
                model_name = row["model_name"]
                deployment = await _active(conn, model_name)
                by_version = await arm_stats(conn, model_name)
                entry: dict[str, Any] = {
                    "revision": row["revision"],
                    "in_kv": row["written_revision"] >= row["revision"],
                    "routing": row["routing"],
                    "by_version": {v: s.as_dict() for v, s in sorted(by_version.items())},
                }
                if deployment is not None and deployment["strategy"] != "immediate":
                    verdicts = await self.judge(deployment, conn)
                    entry["experiment"] = {
                        "deployment_id": str(deployment["deployment_id"]),
                        "strategy": deployment["strategy"],
                        "champion": deployment["champion"],
                        "started_at": deployment["created_at"].isoformat(),
                        "verdicts": [v.as_dict() for v in verdicts],
                    }
                answer[model_name] = entry
        return {"models": answer, "rule": self.rule.__dict__}

    async def cmd_deployment(self, request: dict[str, Any]) -> dict[str, Any]:
        """One deployment: ``{"deployment_id"}`` → its arms, state, the decision that ended it, or (while it
        runs) the current verdicts."""
        deployment_id = uuid.UUID(str(request.get("deployment_id")))
        async with self.service.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM deployer.deployments WHERE deployment_id = $1", deployment_id)
        if row is None:
            raise DeployError(f"no deployment {deployment_id}")
        answer = {k: _plain(v) for k, v in dict(row).items() if k not in ("arms", "decision")}
        answer.update(arms=row["arms"], decision=row["decision"], challengers=_challengers(row))
        if row["status"] == "active" and row["strategy"] != "immediate":
            answer["verdicts"] = [v.as_dict() for v in await self.judge(row)]
        return answer

    async def cmd_models(self, request: dict[str, Any]) -> dict[str, Any]:
        """The registry: ``{"model_name"?, "version"?}``; with a version, its trajectory ids too."""
        version = request.get("version")
        async with self.service.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT * FROM deployer.models WHERE ($1::text IS NULL OR model_name = $1)
                   AND ($2::text IS NULL OR model_version = $2) ORDER BY model_name, created_at""",
                request.get("model_name"),
                version,
            )
        models = []
        for row in rows:
            item = {k: _plain(v) for k, v in dict(row).items() if k != "trajectory_ids"}
            item["metrics"] = row["metrics"]
            item["trajectory_count"] = len(row["trajectory_ids"])
            if version:
                item["trajectory_ids"] = [str(t) for t in row["trajectory_ids"]]
            models.append(item)
        return {"models": models}

    async def cmd_history(self, request: dict[str, Any]) -> dict[str, Any]:
        limit = int(request.get("limit") or 50)
        async with self.service.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT seq, at, model_name, deployment_id, action, actor, reason, revision, strategy, previous,
                          current, evaluation FROM deployer.history
                   WHERE $1::text IS NULL OR model_name = $1 ORDER BY seq DESC LIMIT $2""",
                request.get("model_name"),
                limit,
            )
        return {
            "history": [
                {**{k: _plain(v) for k, v in dict(r).items()}, "previous": r["previous"],
                 "current": r["current"],
                 "evaluation": r["evaluation"]}
                for r in rows
            ]
        }  # fmt: skip


async def arm_stats(
    conn: asyncpg.Connection, model_name: str, *, deployment_id: uuid.UUID | None = None
) -> dict[str, ArmStats]:
    """Completed / failed counts and reward mean and spread per version: of one deployment's randomized
    arms (pinned agents left out), or of every trajectory of the model. Nothing while the recorder's
    tables do not exist yet (an experiment then keeps collecting)."""
    try:
        rows = await _arm_rows(conn, model_name, deployment_id)
    except asyncpg.UndefinedTableError:
        log.warning("deployer.no_recorder_tables", hint="start cuneiform-recorder: rewards are read from its tables")
        return {}
    return {
        r["version"]: ArmStats(r["version"], r["completed"], r["failed"], float(r["mean"] or 0), float(r["std"] or 0))
        for r in rows
    }


async def _arm_rows(conn: asyncpg.Connection, model_name: str, deployment_id: uuid.UUID | None) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT t.model_version AS version,
                   count(*) FILTER (WHERE t.status = 'completed') AS completed,
                   count(*) FILTER (WHERE t.status = 'failed') AS failed,
                   avg({REWARD_SQL}) FILTER (WHERE t.status = 'completed') AS mean,
                   stddev_samp({REWARD_SQL}) FILTER (WHERE t.status = 'completed') AS std
            FROM recorder.trajectories t
            WHERE t.model_name = $1 AND t.model_version IS NOT NULL AND t.status IN ('completed', 'failed')
              AND ($2::text IS NULL OR (t.deployment_id = $2 AND t.variant IS DISTINCT FROM 'pinned'))
            GROUP BY t.model_version""",
        model_name,
        str(deployment_id) if deployment_id is not None else None,
    )
    return rows


async def _batch_trigger(conn: asyncpg.Connection, batch_id: uuid.UUID) -> tuple[str | None, str | None]:
    """Who or what froze the batch (readiness's rules, or an operator's forced trigger) and why."""
    try:
        row = await conn.fetchrow("SELECT triggered_by, reason FROM readiness.batches WHERE batch_id = $1", batch_id)
    except asyncpg.UndefinedTableError:  # readiness not deployed here: the lineage stops at the batch id
        return None, None
    return (row["triggered_by"], row["reason"]) if row is not None else (None, None)


async def _active(conn: asyncpg.Connection, model_name: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        "SELECT * FROM deployer.deployments WHERE model_name = $1 AND status = 'active' "
        "ORDER BY created_at DESC LIMIT 1",
        model_name,
    )
    return row


async def _end(
    conn: asyncpg.Connection, deployment: asyncpg.Record, status: str, decision: dict[str, Any] | None
) -> None:
    await conn.execute(
        "UPDATE deployer.deployments SET status = $2, decided_at = now(), decision = $3 WHERE deployment_id = $1",
        deployment["deployment_id"],
        status,
        decision,
    )


def _challengers(deployment: asyncpg.Record | None) -> list[str]:
    if deployment is None:
        return []
    seen: list[str] = []
    for arm in deployment["arms"]:
        if arm["role"] == "challenger" and arm["version"] not in seen:
            seen.append(arm["version"])
    return seen


def _arm(version: str, weight: float, role: str) -> dict[str, Any]:
    return {"version": version, "weight": round(weight, 9), "role": role}


def _weights(arms: list[dict[str, Any]]) -> dict[str, float]:
    found: dict[str, float] = {}
    for arm in arms:
        found[arm["version"]] = round(found.get(arm["version"], 0.0) + float(arm["weight"]), 9)
    return found


def _checked(value: Any, pattern: str, name: str) -> str:
    text = str(value or "")
    if not re.match(pattern, text):
        raise DeployError(f"{name} {text!r} is not valid (pattern {pattern})")
    return text


def _actor(request: dict[str, Any]) -> str:
    return f"operator:{request.get('who') or 'unknown'}"


def _reason(request: dict[str, Any]) -> str:
    reason = str(request.get("why") or request.get("reason") or "").strip()
    if not reason:
        raise DeployError("say why (a reason is kept in the deployment history)")
    return reason


def _plain(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def build(settings: DeployerSettings | None = None, connection: ConnectionSettings | None = None) -> Service:
    return Deployer(settings or DeployerSettings(), connection).service


def main() -> None:
    run(build)
