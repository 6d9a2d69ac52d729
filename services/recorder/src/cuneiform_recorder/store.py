"""Writing a batch of events: one transaction, one statement per table, idempotent by event id.

The ledger insert (``events``) tells which events are new; only those go on to the typed tables and
to the trajectory's ``stored_events`` count, so a redelivered or republished event changes nothing.
Each table is written with a single ``INSERT … SELECT FROM unnest(…)`` — one round trip however large
the batch — and trajectory rows are upserted in key order so concurrent replicas cannot deadlock.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from cuneiform_core.db import RawJson, encode_json
from cuneiform_sdk.contract import (
    Action,
    Envelope,
    Event,
    LlmCall,
    ProviderAccess,
    Reward,
    Step,
    TrajectoryEnded,
    TrajectoryStarted,
)

REDACTED = "[REDACTED]"


class Redactor:
    """Replaces secrets before they are stored.

    Patterns run over the JSON text of a value, once per value rather than once per string inside
    it; so a pattern must not match a double quote (it would cut across JSON strings).
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        joined = "|".join(f"(?:{p})" for p in patterns)
        self._pattern = re.compile(joined) if joined else None

    def json(self, value: Any) -> RawJson | None:
        if value is None:
            return None
        text = orjson.dumps(value).decode()
        return RawJson(self._pattern.sub(REDACTED, text) if self._pattern else text)

    def text(self, value: str | None) -> str | None:
        if value is None or self._pattern is None:
            return value
        return self._pattern.sub(REDACTED, value)


@dataclass(frozen=True)
class Finalized:
    """A trajectory that just reached its final status (published as pipeline.trajectory.completed)."""

    trajectory_id: UUID
    agent_id: str
    scenario_id: str | None
    status: str
    stored_events: int
    total_reward: float | None
    model_name: str | None
    model_version: str | None
    deployment_id: str | None


@dataclass
class StoreResult:
    stored: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    finalized: list[Finalized] = field(default_factory=list)


def _unnest(columns: str, types: str, rows: Sequence[tuple[Any, ...]]) -> tuple[str, list[list[Any]]]:
    """``SELECT … FROM unnest($1::t1[], …)`` and its array arguments, one array per column.

    jsonb values travel as JSON text and are cast back in SQL: handed to asyncpg as Python lists
    inside an array they would be read as extra array dimensions.
    """
    names = [c.strip() for c in columns.split(",")]
    kinds = types.split()
    arrays = [list(column) for column in zip(*rows, strict=True)]
    for n, kind in enumerate(kinds):
        if kind == "jsonb":
            arrays[n] = [None if v is None else encode_json(v) for v in arrays[n]]
    params = ", ".join(f"${n}::{'text' if k == 'jsonb' else k}[]" for n, k in enumerate(kinds, start=1))
    select = ", ".join(f"{name}::jsonb" if kind == "jsonb" else name for name, kind in zip(names, kinds, strict=True))
    return f"SELECT {select} FROM unnest({params}) AS u({columns})", arrays


#: Columns of each typed table, in the order ``typed_rows`` fills them.
TYPED_COLUMNS: dict[str, list[str]] = {
    table: columns.split()
    for table, columns in {
        "steps": "event_id trajectory_id seq step occurred_at environment observation extra",
        "llm_calls": "event_id trajectory_id seq step call_id occurred_at model purpose messages tools response "
        "reasoning params prompt_tokens completion_tokens latency_ms logprobs extra",
        "provider_accesses": "event_id trajectory_id seq step occurred_at provider provider_id query data purpose "
        "extra",
        "actions": "event_id trajectory_id seq step occurred_at action_type parameters success result error "
        "llm_call_id reward extra",
        "rewards": "event_id trajectory_id seq step occurred_at source name value reason extra",
    }.items()
}


def _extra(event: Envelope) -> dict[str, Any] | None:
    return dict(event.model_extra) if event.model_extra else None


FINALIZED_COLUMNS = ", ".join(
    (
        "trajectory_id",
        "agent_id",
        "scenario_id",
        "status",
        "stored_events",
        "total_reward",
        "model_name",
        "model_version",
        "deployment_id",
    )
)


def finalized_from(rows: Iterable[asyncpg.Record]) -> list[Finalized]:
    return [Finalized(**dict(row)) for row in rows]


async def store_events(
    conn: asyncpg.Connection,
    batch: Sequence[Event],
    redact: Redactor,
    *,
    stream_seqs: Sequence[int | None] | None = None,
) -> StoreResult:
    """Store a batch in one transaction; ``stream_seqs`` (one per event) says where in the TRAJECTORIES
    stream each event was, which retention later checks against the archive."""
    result = StoreResult()
    unique: dict[UUID, tuple[Event, int | None]] = {}
    for event, stream_seq in zip(batch, stream_seqs or [None] * len(batch), strict=True):
        if event.event_id in unique:
            result.duplicates[event.type] += 1
        else:
            unique[event.event_id] = (event, stream_seq)
    # Key order for the ledger too: two batches holding the same redelivered ids cannot deadlock.
    ordered = sorted(unique.values(), key=lambda pair: pair[0].event_id)
    events = [event for event, _ in ordered]
    if not events:  # every message of the batch was rejected (e.g. bad claim checks)
        return result
    async with conn.transaction():
        columns = "event_id, trajectory_id, seq, type, occurred_at, stream_seq"
        select, arrays = _unnest(
            columns,
            "uuid uuid int text timestamptz bigint",
            [(e.event_id, e.trajectory_id, e.seq, e.type, e.occurred_at, sseq) for e, sseq in ordered],
        )
        inserted = await conn.fetch(
            f"INSERT INTO events ({columns}) {select} ON CONFLICT DO NOTHING RETURNING event_id", *arrays
        )
        new_ids = {row["event_id"] for row in inserted}
        fresh = [e for e in events if e.event_id in new_ids]
        for event in events:
            (result.stored if event.event_id in new_ids else result.duplicates)[event.type] += 1
        if not fresh:
            return result
        await _write_typed(conn, fresh, redact)
        result.finalized = await _update_trajectories(conn, fresh)
    return result


def typed_rows(events: Sequence[Event], redact: Redactor) -> dict[str, list[tuple[Any, ...]]]:
    """The rows each typed table gets for these events, in ``TYPED_COLUMNS`` order (the ledger and
    trajectory rows are written separately). Pure: the benchmark copies exactly these rows too."""
    steps, calls, accesses, actions, rewards = [], [], [], [], []
    for e in events:
        if isinstance(e, Step):
            steps.append(
                (e.event_id, e.trajectory_id, e.seq, e.step, e.occurred_at, e.environment, e.observation, _extra(e))
            )
        elif isinstance(e, LlmCall):
            messages, response = e.chat()
            calls.append(
                (
                    e.event_id,
                    e.trajectory_id,
                    e.seq,
                    e.step,
                    e.call_id,
                    e.occurred_at,
                    e.model,
                    e.purpose,
                    redact.json([m.model_dump(mode="json", exclude_none=True) for m in messages]),
                    e.tools,
                    redact.json(response.model_dump(mode="json", exclude_none=True)),
                    redact.text(e.reasoning),
                    e.params,
                    e.usage.prompt_tokens if e.usage else None,
                    e.usage.completion_tokens if e.usage else None,
                    e.latency_ms,
                    e.logprobs,
                    _extra(e),
                )
            )
        elif isinstance(e, ProviderAccess):
            accesses.append(
                (
                    e.event_id,
                    e.trajectory_id,
                    e.seq,
                    e.step,
                    e.occurred_at,
                    e.provider,
                    e.provider_id,
                    redact.json(e.query),
                    redact.json(e.data),
                    e.purpose,
                    _extra(e),
                )
            )
        elif isinstance(e, Action):
            actions.append(
                (
                    e.event_id,
                    e.trajectory_id,
                    e.seq,
                    e.step,
                    e.occurred_at,
                    e.action_type,
                    e.parameters,
                    e.success,
                    e.result,
                    e.error,
                    e.llm_call_id,
                    e.reward,
                    _extra(e),
                )
            )
        elif isinstance(e, Reward):
            rewards.append(
                (
                    e.event_id,
                    e.trajectory_id,
                    e.seq,
                    e.step,
                    e.occurred_at,
                    e.source,
                    e.name,
                    e.value,
                    e.reason,
                    _extra(e),
                )
            )
    return {"steps": steps, "llm_calls": calls, "provider_accesses": accesses, "actions": actions, "rewards": rewards}


async def _write_typed(conn: asyncpg.Connection, events: list[Event], redact: Redactor) -> None:
    # COPY, not INSERT: these events are new to the ledger in this very transaction, so no row of
    # theirs can exist in a typed table (a concurrent writer of the same event waits on the ledger).
    for table, rows in typed_rows(events, redact).items():
        if rows:
            await conn.copy_records_to_table(table, records=rows, columns=TYPED_COLUMNS[table])


@dataclass
class _TrajectoryUpdate:
    agent_id: str
    new_events: int = 0
    started: TrajectoryStarted | None = None
    ended: TrajectoryEnded | None = None


#: What an event may fill in on its trajectory's row. Once finalized (and announced) the description is
#: frozen: a late or conflicting event is still stored and counted, but does not rewrite it.
_DESCRIPTION_UPDATES = ",\n               ".join(
    f"{c} = CASE WHEN t.status = 'recording' THEN COALESCE(EXCLUDED.{c}, t.{c}) ELSE t.{c} END"
    for c in (
        "scenario_id",
        "episode_id",
        "model_name",
        "model_version",
        "deployment_id",
        "variant",
        "environment",
        "metadata",
        "started_at",
        "ended_at",
        "end_status",
        "total_reward",
        "metrics",
        "final_environment",
        "error",
        "expected_events",
    )
)


async def _update_trajectories(conn: asyncpg.Connection, events: list[Event]) -> list[Finalized]:
    updates: dict[UUID, _TrajectoryUpdate] = {}
    for e in events:
        update = updates.setdefault(e.trajectory_id, _TrajectoryUpdate(agent_id=e.agent_id))
        update.new_events += 1
        if isinstance(e, TrajectoryStarted):
            update.started = e
        elif isinstance(e, TrajectoryEnded):
            update.ended = e
    rows = []
    for trajectory_id in sorted(updates):  # one lock order for every replica: no deadlocks
        u = updates[trajectory_id]
        s, d = u.started, u.ended
        rows.append(
            (
                trajectory_id,
                u.agent_id,
                s.scenario_id if s else None,
                s.episode_id if s else None,
                s.model.name if s else None,
                s.model.version if s else None,
                s.model.deployment_id if s else None,
                s.model.variant if s else None,
                s.environment if s else None,
                s.metadata if s else None,
                s.occurred_at if s else None,
                d.occurred_at if d else None,
                d.status if d else None,
                d.total_reward if d else None,
                d.metrics if d else None,
                d.environment if d else None,
                d.error if d else None,
                d.event_count if d else None,
                u.new_events,
            )
        )
    columns = (
        "trajectory_id, agent_id, scenario_id, episode_id, model_name, model_version, deployment_id, variant, "
        "environment, metadata, started_at, ended_at, end_status, total_reward, metrics, final_environment, error, "
        "expected_events, stored_events"
    )
    select, arrays = _unnest(
        columns,
        "uuid text text text text text text text jsonb jsonb timestamptz timestamptz text float8 jsonb jsonb text "
        "int int",
        rows,
    )
    touched = await conn.fetch(
        f"""INSERT INTO trajectories AS t ({columns}) {select}
           ON CONFLICT (trajectory_id) DO UPDATE SET
               {_DESCRIPTION_UPDATES},
               stored_events = t.stored_events + EXCLUDED.stored_events,
               last_event_at = now()
           RETURNING trajectory_id, status, stored_events, expected_events""",
        *arrays,
    )
    complete = [
        r["trajectory_id"]
        for r in touched
        if r["status"] == "recording"
        and r["expected_events"] is not None
        and r["stored_events"] >= r["expected_events"]
    ]
    if not complete:
        return []
    finalized = await conn.fetch(
        f"""UPDATE trajectories SET status = end_status, finalized_at = now()
            WHERE trajectory_id = ANY($1::uuid[]) AND status = 'recording'
            RETURNING {FINALIZED_COLUMNS}""",
        complete,
    )
    return finalized_from(finalized)
