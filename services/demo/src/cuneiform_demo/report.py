"""What the run left in PostgreSQL: read back from the recorder's tables, not from the demo's memory."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import nats
from cuneiform_core.topology import TRAJECTORIES
from cuneiform_sdk.contract import EVENT_TYPES

#: The recorder's schema (it owns these tables; we only read them).
SCHEMA = "recorder"


@dataclass(frozen=True)
class ScenarioRewards:
    scenario_id: str
    trajectories: int
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class Example:
    agent_id: str
    step: int
    prompt: str
    tool_call: str
    reward: float | None


@dataclass
class Summary:
    statuses: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    scenarios: list[ScenarioRewards] = field(default_factory=list)
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dead_letters_run: int = 0
    dead_letters_total: int = 0
    trajectories_in_database: int = 0
    example: Example | None = None

    @property
    def total_events(self) -> int:
        return sum(self.events.values())

    @property
    def groups_with_spread(self) -> int:
        return sum(1 for s in self.scenarios if s.trajectories >= 2 and s.high > s.low)


async def finalized_counts(conn: asyncpg.Connection, ids: list[uuid.UUID]) -> dict[str, int]:
    """Trajectories of ``ids`` by recorder status (``recording`` until every event is stored)."""
    rows = await conn.fetch(
        f"SELECT status, count(*) AS n FROM {SCHEMA}.trajectories WHERE trajectory_id = ANY($1::uuid[]) "
        "GROUP BY status",
        ids,
    )
    return {r["status"]: r["n"] for r in rows}


async def read_summary(conn: asyncpg.Connection, ids: list[uuid.UUID], run_started: datetime) -> Summary:
    summary = Summary()
    summary.statuses = await finalized_counts(conn, ids)
    rows = await conn.fetch(
        f"SELECT type, count(*) AS n FROM {SCHEMA}.events WHERE trajectory_id = ANY($1::uuid[]) GROUP BY type", ids
    )
    found = {r["type"]: r["n"] for r in rows}
    summary.events = {t: found.pop(t, 0) for t in EVENT_TYPES} | found
    rows = await conn.fetch(
        f"""SELECT scenario_id, count(*) AS n, avg(total_reward) AS mean, min(total_reward) AS low,
                   max(total_reward) AS high
              FROM {SCHEMA}.trajectories WHERE trajectory_id = ANY($1::uuid[])
             GROUP BY scenario_id ORDER BY min(started_at), scenario_id""",
        ids,
    )
    summary.scenarios = [
        ScenarioRewards(r["scenario_id"], r["n"], r["mean"] or 0.0, r["low"] or 0.0, r["high"] or 0.0) for r in rows
    ]
    row = await conn.fetchrow(
        f"""SELECT count(*) AS n, coalesce(sum(prompt_tokens), 0) AS prompt,
                   coalesce(sum(completion_tokens), 0) AS completion
              FROM {SCHEMA}.llm_calls WHERE trajectory_id = ANY($1::uuid[])""",
        ids,
    )
    assert row is not None
    summary.llm_calls, summary.prompt_tokens, summary.completion_tokens = row["n"], row["prompt"], row["completion"]
    summary.dead_letters_run = await conn.fetchval(
        f"SELECT count(*) FROM {SCHEMA}.dead_letters WHERE failed_at >= $1", run_started
    )
    summary.dead_letters_total = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.dead_letters")
    summary.trajectories_in_database = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.trajectories")
    example = await conn.fetchrow(
        f"""SELECT t.agent_id, l.step, l.messages::text AS messages, l.response::text AS response, a.reward
              FROM {SCHEMA}.llm_calls l
              JOIN {SCHEMA}.trajectories t USING (trajectory_id)
              LEFT JOIN {SCHEMA}.actions a ON a.trajectory_id = l.trajectory_id AND a.llm_call_id = l.call_id
             WHERE l.trajectory_id = $1 ORDER BY l.step LIMIT 1""",
        ids[0],
    )
    if example is not None:
        messages = json.loads(example["messages"])
        call = json.loads(example["response"])["tool_calls"][0]["function"]
        summary.example = Example(
            agent_id=example["agent_id"],
            step=example["step"],
            prompt=str(messages[-1]["content"]),
            tool_call=f"{call['name']}({call['arguments']})",
            reward=example["reward"],
        )
    return summary


async def stream_last_seq(nats_url: str) -> int:
    """The TRAJECTORIES stream's last sequence: what the archive must hold."""
    nc = await nats.connect(nats_url)
    try:
        return int((await nc.jetstream().stream_info(TRAJECTORIES.stream_name())).state.last_seq)
    finally:
        await nc.close()


@dataclass
class LoopOutcome:
    """How far this run got through the loop, read from each service's own tables."""

    batch: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    stage: str = "waiting for readiness to fire"
    before: float | None = None
    after: float | None = None


async def _row(conn: asyncpg.Connection, sql: str, *args: Any) -> dict[str, Any] | None:
    try:
        row = await conn.fetchrow(sql, *args)
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        return None  # that service has not created its tables yet
    if row is None:
        return None
    # jsonb columns arrive as text on the demo's plain connection.
    return {k: json.loads(v) if k in _JSON_COLUMNS and isinstance(v, str) else v for k, v in dict(row).items()}


_JSON_COLUMNS = {"files", "metrics", "verdict", "selection", "progress"}


async def loop_outcome(conn: asyncpg.Connection, since: datetime) -> LoopOutcome:
    out = LoopOutcome()
    out.batch = await _row(
        conn, "SELECT * FROM readiness.batches WHERE created_at >= $1 ORDER BY created_at DESC LIMIT 1", since
    )
    if out.batch is None:
        return out
    out.stage = f"batch {out.batch['batch_id']} created; the archiver is exporting it"
    out.dataset = await _row(conn, "SELECT * FROM archiver.datasets WHERE batch_id = $1", out.batch["batch_id"])
    if out.dataset is None:
        return out
    training = await _row(
        conn,
        "SELECT state, attempt, progress FROM trainer_dispatcher.batches WHERE batch_id = $1",
        out.batch["batch_id"],
    )
    out.stage = (
        "dataset exported; waiting for a trainer"
        if training is None
        else (f"training: {training['state']} (attempt {training['attempt']})")
    )
    out.model = await _row(conn, "SELECT * FROM trainer_dispatcher.models WHERE batch_id = $1", out.batch["batch_id"])
    return out


async def reward_by_version(conn: asyncpg.Connection, run_id: str) -> list[dict[str, Any]]:
    """This run's finished trajectories by the model version they ran under (and the demo phase)."""
    rows = await conn.fetch(
        f"""SELECT model_version AS version, metadata->>'phase' AS phase, count(*) AS episodes,
                   avg(total_reward) AS mean, coalesce(stddev_samp(total_reward), 0) AS std,
                   min(first_seen_at) AS first
            FROM {SCHEMA}.trajectories WHERE metadata->>'run_id' = $1 AND status = 'completed'
            GROUP BY 1, 2 ORDER BY first""",
        run_id,
    )
    return [
        {"version": r["version"] or "?", "phase": r["phase"] or "", "episodes": r["episodes"],
         "mean": float(r["mean"] or 0.0), "std": float(r["std"] or 0.0)}
        for r in rows
    ]  # fmt: skip
