"""Training datasets from the recorder's tables: OpenPipe ART trajectory groups, OpenAI chat
fine-tuning examples, and a manifest — under ``datasets/<dataset_id>/`` in the object store.

**Groups.** Trajectories are grouped by ``scenario_id`` (the GRPO group key). A group with fewer than
two trajectories, or whose rewards are all equal, gives GRPO no signal: it is listed in the manifest
with the reason and left out of ``art.jsonl`` (unless ``include_degenerate_groups``).

**Reward.** A trajectory's reward is its ``total_reward`` when the agent reported one, else the sum of
its reward events, else 0.

**Conversations.** Each LLM call is a prompt (``messages``) and the model's response. ART trains on
the model's own responses: every recorded response becomes an ART *choice* (``finish_reason``,
``index``, ``message``, and ``logprobs`` when recorded), every prompt message stays a plain message.
Calls are stitched into conversations without inventing any: a call *continues* a conversation when
its messages begin with exactly that conversation so far (the earlier responses compared as the
assistant messages they are); only its new messages and its response are appended. Any other call
starts a new conversation. The first conversation is the trajectory's ``messages_and_choices``; the
others go to ``additional_histories`` — so an agent that makes separate calls (a planner and an
actor, say) is never flattened into one false dialogue.

**OpenAI chat.** For supervised fine-tuning on the best trajectories: one example per conversation of
each selected trajectory, with ``tools``, ``tool_calls`` kept, and ``weight`` 1 on the responses the
recorded model produced (0 on assistant messages that were only part of a prompt). Selection:
``top_per_group`` — the best ``sft_top_fraction`` of each group with reward spread (at least one per
group) — or ``min_reward``; only ``completed`` trajectories.

**Determinism and immutability.** Groups are sorted by scenario, trajectories by id, JSON keys sorted,
and the manifest's ``created_at`` comes from the request (the batch's time), so exporting the same
batch again yields the same bytes. The data files are uploaded first and ``manifest.json`` last: a
dataset without a manifest is incomplete and never used. An existing manifest is never overwritten.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import statistics
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import nats
import orjson
from cuneiform_core.db import load_migrations, open_database
from cuneiform_core.events import BatchCreated, DatasetExported, DatasetFile, publish, stable_id
from cuneiform_core.logging import get_logger
from cuneiform_core.service import Service
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.storage import ObjectStore
from cuneiform_core.topology import DATASET_EXPORTED, PIPELINE, Topology
from prometheus_client import Counter

from .settings import ArchiverSettings

log = get_logger(__name__)

MANIFEST_VERSION = 1
FORMATS = {
    "manifest": MANIFEST_VERSION,
    "art.jsonl": "OpenPipe ART TrajectoryGroup JSONL (art.utils.trajectory_migration), one group per line",
    "openai_chat.jsonl": "OpenAI chat fine-tuning JSONL (messages, tools, per-message weight)",
}
ART_FILE = "art.jsonl"
OPENAI_FILE = "openai_chat.jsonl"
MANIFEST_FILE = "manifest.json"
_JSON = orjson.OPT_SORT_KEYS

Progress = Callable[[int, int], None]
EXPORTS = Counter("cuneiform_archiver_datasets_exported_total", "Datasets exported for batches")


# --- what to export ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which trajectories: an explicit list (a batch), or filters over the recorder's table."""

    trajectory_ids: tuple[uuid.UUID, ...] | None = None
    since: datetime | None = None
    until: datetime | None = None
    agents: tuple[str, ...] = ()
    scenarios: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ("completed",)
    min_reward: float | None = None
    model_version: str | None = None
    limit: int | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.trajectory_ids is not None:
            return {"trajectory_ids": len(self.trajectory_ids)}
        found = {k: v for k, v in asdict(self).items() if k != "trajectory_ids" and v not in (None, ())}
        return {k: _plain(v) for k, v in found.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class ExportConfig:
    include_degenerate_groups: bool = False
    sft_selection: str = "top_per_group"
    sft_top_fraction: float = 0.25
    sft_min_reward: float | None = None
    chunk: int = 500

    def __post_init__(self) -> None:
        if self.sft_selection == "min_reward" and self.sft_min_reward is None:
            raise ValueError("sft_selection=min_reward needs sft_min_reward (CUNEIFORM_ARCHIVER_SFT_MIN_REWARD)")

    @classmethod
    def of(cls, settings: ArchiverSettings) -> ExportConfig:
        return cls(
            include_degenerate_groups=settings.include_degenerate_groups,
            sft_selection=settings.sft_selection,
            sft_top_fraction=settings.sft_top_fraction,
            sft_min_reward=settings.sft_min_reward,
            chunk=settings.export_chunk,
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "chunk"}


# --- conversations ------------------------------------------------------------------------------------


def _text(content: Any) -> str | None:
    """Assistant content as text (content parts joined), as a chat completion carries it."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    found = []
    for call in calls or []:
        function = call.get("function") or {}
        arguments = function.get("arguments", "")
        found.append(
            {
                "id": str(call.get("id", "")),
                "type": "function",
                "function": {
                    "name": str(function.get("name", "")),
                    "arguments": arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode(),
                },
            }
        )
    return found


def _logprobs(recorded: Any) -> dict[str, Any] | None:
    """Recorded logprobs in OpenAI's layout (``{"content": [{token, logprob, …}]}``), or None."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("content"), list):
        return None
    content = []
    for item in recorded["content"]:
        if not isinstance(item, dict) or not isinstance(item.get("token"), str):
            return None
        if not isinstance(item.get("logprob"), int | float):
            return None
        content.append(
            {
                "token": item["token"],
                "logprob": float(item["logprob"]),
                "bytes": item.get("bytes"),
                "top_logprobs": [
                    {"token": t["token"], "logprob": float(t["logprob"]), "bytes": t.get("bytes")}
                    for t in item.get("top_logprobs") or []
                    if isinstance(t, dict) and "token" in t and "logprob" in t
                ],
            }
        )
    return {"content": content, "refusal": None}


def choice_of(response: dict[str, Any], logprobs: Any = None) -> dict[str, Any]:
    """A recorded response as an ART (OpenAI) choice: the trainable turn."""
    message: dict[str, Any] = {"role": "assistant", "content": _text(response.get("content"))}
    tool_calls = _tool_calls(response.get("tool_calls"))
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice: dict[str, Any] = {
        "finish_reason": "tool_calls" if tool_calls else "stop",
        "index": 0,
        "message": message,
    }
    lp = _logprobs(logprobs)
    if lp is not None:
        choice["logprobs"] = lp
    return choice


def _key(item: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two chat messages the same turn (a choice compared as its assistant message)."""
    message = item.get("message", item) if "finish_reason" in item else item
    calls = tuple(
        (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in _tool_calls(message.get("tool_calls"))
    )
    content = message.get("content")
    return (
        message.get("role"),
        _text(content) or "" if not isinstance(content, list) else orjson.dumps(content),
        calls,
        message.get("tool_call_id"),
    )


@dataclass
class Conversation:
    items: list[dict[str, Any]] = field(default_factory=list)
    tools: list[Any] | None = None
    #: The conversation as the next prompt would repeat it: prompt messages as they were, and each
    #: response as the assistant message it was recorded as.
    said: list[dict[str, Any]] = field(default_factory=list)

    def continued_by(self, messages: Sequence[dict[str, Any]]) -> bool:
        """Does this prompt begin with exactly this conversation?"""
        if len(messages) < len(self.said):
            return False
        # Plain dict equality first (the recorder stores both sides through the same model, so it
        # is the common case and runs in C); the normalized comparison only where it fails.
        return all(a == b or _key(a) == _key(b) for a, b in zip(self.said, messages, strict=False))

    def extend(self, messages: Sequence[dict[str, Any]], response: dict[str, Any], logprobs: Any) -> None:
        tail = messages[len(self.said) :]
        self.items += tail
        self.said += tail
        self.items.append(choice_of(response, logprobs))
        self.said.append(response)


def conversations(calls: Iterable[dict[str, Any]]) -> list[Conversation]:
    """Stitch a trajectory's LLM calls (in order) into conversations; see the module docstring."""
    found: list[Conversation] = []
    for call in calls:
        messages = list(call["messages"] or [])
        target = next((c for c in reversed(found) if c.continued_by(messages)), None)
        if target is None:
            target = Conversation(tools=call.get("tools"))
            found.append(target)
        if target.tools is None and call.get("tools"):
            target.tools = call["tools"]
        target.extend(messages, call["response"], call.get("logprobs"))
    return found


# --- one trajectory, two formats -------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def trajectory_reward(row: asyncpg.Record | dict[str, Any]) -> float:
    if row["total_reward"] is not None:
        return float(row["total_reward"])
    return float(row["reward_sum"] or 0.0)


def art_trajectory(
    row: asyncpg.Record | dict[str, Any],
    calls: Sequence[dict[str, Any]],
    actions: Sequence[dict[str, Any]],
    rewards: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    convs = conversations(calls)
    main = convs[0] if convs else Conversation()
    metrics = {k: v for k, v in (row["metrics"] or {}).items() if isinstance(v, int | float | bool)}
    metrics.setdefault("llm_calls", len(calls))
    metrics.setdefault("actions", len(actions))
    metrics.setdefault("failed_actions", sum(1 for a in actions if not a["success"]))
    if row["started_at"] and row["ended_at"]:
        metrics.setdefault("duration_s", round((row["ended_at"] - row["started_at"]).total_seconds(), 6))
    logs = [
        f"step {a['step']} action {a['action_type']} {orjson.dumps(a['parameters']).decode()}"
        + ("" if a["success"] else f" failed: {a['error']}")
        for a in actions
    ]
    logs += [
        f"reward {r['name']}={r['value']:g} ({r['source']}"
        + (f", step {r['step']}" if r["step"] is not None else "")
        + ")"
        + (f": {r['reason']}" if r["reason"] else "")
        for r in rewards
    ]
    if row["error"]:
        logs.append(f"error: {row['error']}")
    return {
        "messages_and_choices": main.items,
        "tools": main.tools,
        "additional_histories": [{"messages_and_choices": c.items, "tools": c.tools} for c in convs[1:]],
        "reward": trajectory_reward(row),
        "metrics": metrics,
        "metadata": {
            "trajectory_id": str(row["trajectory_id"]),
            "agent_id": row["agent_id"],
            "scenario_id": row["scenario_id"],
            "episode_id": _scalar(row["episode_id"]),
            "model_name": row["model_name"],
            "model_version": row["model_version"],
            "deployment_id": row["deployment_id"],
            "status": row["status"],
        },
        "logs": logs,
    }


_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def openai_examples(trajectory: dict[str, Any]) -> list[dict[str, Any]]:
    """One OpenAI chat fine-tuning example per conversation of an ART trajectory dict."""
    histories = [{"messages_and_choices": trajectory["messages_and_choices"], "tools": trajectory["tools"]}]
    examples = []
    for history in histories + trajectory["additional_histories"]:
        messages: list[dict[str, Any]] = []
        for item in history["messages_and_choices"]:
            if "finish_reason" in item:
                messages.append({**_assistant(item["message"]), "weight": 1})
                continue
            role = _OPENAI_ROLES.get(item.get("role", ""))
            if role is None:
                continue  # legacy "function" messages have no place in the format
            if role == "assistant":
                messages.append({**_assistant(item), "weight": 0})
                continue
            message: dict[str, Any] = {"role": role, "content": item.get("content") or ""}
            if item.get("name") and role in ("system", "user"):
                message["name"] = item["name"]
            if role == "tool":
                message["tool_call_id"] = item.get("tool_call_id", "")
            messages.append(message)
        example: dict[str, Any] = {"messages": messages}
        if history["tools"]:
            example["tools"] = history["tools"]
        examples.append(example)
    return examples


def _assistant(message: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant"}
    tool_calls = _tool_calls(message.get("tool_calls"))
    content = _text(message.get("content"))
    if content or not tool_calls:
        out["content"] = content or ""
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out


# --- groups --------------------------------------------------------------------------------------------


@dataclass
class Group:
    scenario_id: str
    rows: list[asyncpg.Record]
    rewards: list[float]
    excluded_reason: str | None = None

    def summary(self, included: bool) -> dict[str, Any]:
        rewards = self.rewards
        return {
            "scenario_id": self.scenario_id,
            "size": len(rewards),
            "reward": {
                "mean": statistics.fmean(rewards),
                "std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
                "min": min(rewards),
                "max": max(rewards),
            },
            "included": included,
            "excluded_reason": self.excluded_reason,
            "trajectory_ids": [str(r["trajectory_id"]) for r in self.rows],
        }


def grouped(rows: Sequence[asyncpg.Record]) -> list[Group]:
    by_scenario: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        by_scenario.setdefault(row["scenario_id"] or "", []).append(row)
    groups = []
    for scenario in sorted(by_scenario):
        members = sorted(by_scenario[scenario], key=lambda r: r["trajectory_id"])
        rewards = [trajectory_reward(r) for r in members]
        group = Group(scenario, members, rewards)
        if len(members) < 2:
            group.excluded_reason = "fewer than 2 trajectories"
        elif max(rewards) - min(rewards) <= 1e-12:
            group.excluded_reason = "zero reward spread"
        groups.append(group)
    return groups


def sft_choice(groups: Sequence[Group], config: ExportConfig) -> set[uuid.UUID]:
    chosen: set[uuid.UUID] = set()
    for group in groups:
        ranked = sorted(
            (r for r, _ in zip(group.rows, group.rewards, strict=True) if r["status"] == "completed"),
            key=lambda r: (-trajectory_reward(r), r["trajectory_id"]),
        )
        if config.sft_selection == "min_reward":
            assert config.sft_min_reward is not None
            chosen.update(r["trajectory_id"] for r in ranked if trajectory_reward(r) >= config.sft_min_reward)
        elif group.excluded_reason is None and ranked:
            keep = max(1, math.ceil(config.sft_top_fraction * len(group.rows)))
            chosen.update(r["trajectory_id"] for r in ranked[:keep])
    return chosen


# --- reading the recorder's tables -------------------------------------------------------------------------

_TRAJECTORY_COLUMNS = """
    t.trajectory_id, t.agent_id, t.scenario_id, t.episode_id, t.model_name, t.model_version, t.deployment_id,
    t.status, t.total_reward, t.metrics, t.error, t.started_at, t.ended_at, t.finalized_at,
    (SELECT sum(value) FROM recorder.rewards r WHERE r.trajectory_id = t.trajectory_id) AS reward_sum
"""


async def select_trajectories(conn: asyncpg.Connection, selection: Selection) -> list[asyncpg.Record]:
    if selection.trajectory_ids is not None:
        rows: list[asyncpg.Record] = await conn.fetch(
            f"SELECT {_TRAJECTORY_COLUMNS} FROM recorder.trajectories t WHERE t.trajectory_id = ANY($1::uuid[])",
            list(selection.trajectory_ids),
        )
        return rows
    where = ["t.status = ANY($1::text[])"]
    args: list[Any] = [list(selection.statuses)]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if selection.since:
        where.append(f"t.finalized_at >= {arg(selection.since)}")
    if selection.until:
        where.append(f"t.finalized_at <= {arg(selection.until)}")
    if selection.agents:
        where.append(f"t.agent_id = ANY({arg(list(selection.agents))}::text[])")
    if selection.scenarios:
        where.append(f"t.scenario_id = ANY({arg(list(selection.scenarios))}::text[])")
    if selection.model_version:
        where.append(f"t.model_version = {arg(selection.model_version)}")
    if selection.min_reward is not None:
        where.append(
            "coalesce(t.total_reward, (SELECT sum(value) FROM recorder.rewards r "
            f"WHERE r.trajectory_id = t.trajectory_id), 0) >= {arg(selection.min_reward)}"
        )
    limit = f"LIMIT {arg(selection.limit)}" if selection.limit else ""
    sql = (
        f"SELECT {_TRAJECTORY_COLUMNS} FROM recorder.trajectories t WHERE {' AND '.join(where)} "
        f"ORDER BY t.finalized_at DESC NULLS LAST, t.trajectory_id {limit}"
    )
    rows = await conn.fetch(sql, *args)
    return rows


async def _children(conn: asyncpg.Connection, ids: list[uuid.UUID]) -> dict[str, dict[uuid.UUID, list[dict[str, Any]]]]:
    """LLM calls, actions and rewards of these trajectories, in recording order."""
    queries = {
        "calls": "SELECT trajectory_id, messages, tools, response, logprobs FROM recorder.llm_calls "
        "WHERE trajectory_id = ANY($1::uuid[]) ORDER BY trajectory_id, seq",
        "actions": "SELECT trajectory_id, step, action_type, parameters, success, error FROM recorder.actions "
        "WHERE trajectory_id = ANY($1::uuid[]) ORDER BY trajectory_id, seq",
        "rewards": "SELECT trajectory_id, step, source, name, value, reason FROM recorder.rewards "
        "WHERE trajectory_id = ANY($1::uuid[]) ORDER BY trajectory_id, seq",
    }
    found: dict[str, dict[uuid.UUID, list[dict[str, Any]]]] = {}
    for name, sql in queries.items():
        per: dict[uuid.UUID, list[dict[str, Any]]] = {}
        for row in await conn.fetch(sql, ids):
            per.setdefault(row["trajectory_id"], []).append(dict(row))
        found[name] = per
    return found


async def _children_of(pool: asyncpg.Pool, chunk: Sequence[Group]) -> dict[str, dict[uuid.UUID, list[dict[str, Any]]]]:
    async with pool.acquire() as conn:
        return await _children(conn, [r["trajectory_id"] for g in chunk for r in g.rows])


# --- writing --------------------------------------------------------------------------------------------


class _HashedFile:
    """A file written line by line while its sha256, size and line count are kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self._sha = hashlib.sha256()
        self.size = 0
        self.records = 0

    def line(self, value: Any) -> None:
        data = orjson.dumps(value, option=_JSON) + b"\n"
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)
        self.records += 1

    def close(self) -> str:
        self._file.close()
        return self._sha.hexdigest()


@dataclass
class ExportResult:
    dataset_id: uuid.UUID
    prefix: str
    manifest_key: str
    manifest: dict[str, Any]
    manifest_sha256: str
    reused: bool = False

    def event(self, bucket: str, batch_id: uuid.UUID | None) -> DatasetExported:
        m = self.manifest
        return DatasetExported(
            event_id=stable_id("dataset.exported", self.dataset_id),
            dataset_id=self.dataset_id,
            batch_id=batch_id,
            bucket=bucket,
            prefix=self.prefix,
            manifest_key=self.manifest_key,
            manifest_sha256=self.manifest_sha256,
            files=[DatasetFile(**f) for f in m["files"]],
            trajectory_count=m["art_trajectory_count"],
            group_count=sum(1 for g in m["groups"] if g["included"]),
            excluded_group_count=sum(1 for g in m["groups"] if not g["included"]),
        )


def dataset_prefix(dataset_id: uuid.UUID) -> str:
    return f"datasets/{dataset_id}/"


def dataset_id_for(selection_ids: Iterable[uuid.UUID], config: ExportConfig) -> uuid.UUID:
    return stable_id(
        "dataset", *sorted(str(i) for i in selection_ids), orjson.dumps(config.as_dict(), option=_JSON).decode()
    )


async def export_dataset(
    pool: asyncpg.Pool,
    store: ObjectStore,
    selection: Selection,
    config: ExportConfig,
    *,
    dataset_id: uuid.UUID | None = None,
    created_at: datetime | None = None,
    batch_id: uuid.UUID | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Build the dataset (or return the existing one with that id). Object-store failures raise:
    the caller retries the whole export, which rewrites the same keys with the same bytes."""
    async with pool.acquire() as conn:
        rows = await select_trajectories(conn, selection)
    found = {r["trajectory_id"] for r in rows}
    missing = sorted(str(i) for i in (selection.trajectory_ids or ()) if i not in found)
    final = [r for r in rows if r["status"] != "recording"]
    not_final = sorted(str(r["trajectory_id"]) for r in rows if r["status"] == "recording")
    dataset_id = dataset_id or dataset_id_for((r["trajectory_id"] for r in final), config)
    prefix = dataset_prefix(dataset_id)
    manifest_key = prefix + MANIFEST_FILE

    existing = await store.stat(manifest_key)
    if existing is not None:
        body = await store.get_bytes(manifest_key)
        log.info("export.exists", dataset_id=str(dataset_id))
        return ExportResult(
            dataset_id, prefix, manifest_key, orjson.loads(body), hashlib.sha256(body).hexdigest(), True
        )

    if created_at is None:  # the data's own time, not the clock: the same selection, the same bytes
        created_at = max(
            (r["finalized_at"] for r in final if r["finalized_at"]), default=datetime.fromtimestamp(0, UTC)
        )
    groups = grouped(final)
    sft = sft_choice(groups, config)
    included = {g.scenario_id for g in groups if g.excluded_reason is None or config.include_degenerate_groups}
    wanted = [g for g in groups if g.scenario_id in included or any(r["trajectory_id"] in sft for r in g.rows)]
    total = sum(len(g.rows) for g in wanted)

    with tempfile.TemporaryDirectory(prefix="cuneiform-export-") as folder:
        art = _HashedFile(Path(folder) / ART_FILE)
        chat = _HashedFile(Path(folder) / OPENAI_FILE)
        art_count = done = 0
        chunks = list(_chunks(wanted, config.chunk))
        # The next chunk's rows are read while this one is built (PostgreSQL works in its own process).
        upcoming = asyncio.create_task(_children_of(pool, chunks[0])) if chunks else None
        try:
            for n, chunk in enumerate(chunks):
                assert upcoming is not None
                children = await upcoming
                upcoming = asyncio.create_task(_children_of(pool, chunks[n + 1])) if n + 1 < len(chunks) else None
                for group in chunk:
                    trajectories = []
                    for row in group.rows:
                        tid = row["trajectory_id"]
                        trajectory = art_trajectory(
                            row,
                            children["calls"].get(tid, []),
                            children["actions"].get(tid, []),
                            children["rewards"].get(tid, []),
                        )
                        trajectories.append(trajectory)
                        if tid in sft:
                            for example in openai_examples(trajectory):
                                chat.line(example)
                    if group.scenario_id in included:
                        art.line(
                            {
                                "trajectories": trajectories,
                                "exceptions": [],
                                "metadata": {"scenario_id": group.scenario_id},
                                "metrics": {},
                                "logs": [],
                            }
                        )
                        art_count += len(trajectories)
                    done += len(group.rows)
                    if progress:
                        progress(done, total)
        except BaseException:
            if upcoming is not None:
                upcoming.cancel()
            art.close()
            chat.close()
            raise
        files = []
        for handle, fmt in ((art, "art"), (chat, "openai_chat")):
            sha = handle.close()
            key = prefix + handle.path.name
            await store.put_file(key, handle.path, sha, content_type="application/x-ndjson")
            files.append(
                {
                    "name": handle.path.name,
                    "key": key,
                    "size": handle.size,
                    "sha256": sha,
                    "records": handle.records,
                    "format": fmt,
                }
            )
    manifest = {
        "dataset_id": str(dataset_id),
        "batch_id": str(batch_id) if batch_id else None,
        "created_at": created_at.isoformat(),
        "formats": FORMATS,
        "selection": selection.as_dict(),
        "config": config.as_dict(),
        "trajectory_ids": sorted(str(r["trajectory_id"]) for r in final),
        "missing_trajectory_ids": missing,
        "not_final_trajectory_ids": not_final,
        "art_trajectory_count": art_count,
        "groups": [g.summary(g.scenario_id in included) for g in groups],
        "sft": {"selection": config.sft_selection, "trajectory_ids": sorted(str(i) for i in sft)},
        "files": files,
    }
    body = orjson.dumps(manifest, option=_JSON | orjson.OPT_INDENT_2)
    info = await store.put_bytes(manifest_key, body, content_type="application/json")
    log.info("export.done", dataset_id=str(dataset_id), trajectories=art_count, groups=len(groups), files=files)
    return ExportResult(dataset_id, prefix, manifest_key, manifest, info.sha256 or "", False)


def _chunks(groups: Sequence[Group], size: int) -> Iterable[list[Group]]:
    """Whole groups, about ``size`` trajectories at a time (bounded memory)."""
    chunk: list[Group] = []
    count = 0
    for group in groups:
        chunk.append(group)
        count += len(group.rows)
        if count >= size:
            yield chunk
            chunk, count = [], 0
    if chunk:
        yield chunk


# --- the two ways in: a batch event, and the CLI -------------------------------------------------------


async def record_dataset(pool: asyncpg.Pool, result: ExportResult, selection: Selection) -> None:
    m = result.manifest
    await pool.execute(
        """INSERT INTO archiver.datasets (dataset_id, batch_id, created_at, prefix, manifest_key, manifest_sha256,
               trajectory_count, group_count, excluded_group_count, files, selection)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING""",
        result.dataset_id,
        uuid.UUID(m["batch_id"]) if m["batch_id"] else None,
        datetime.fromisoformat(m["created_at"]),
        result.prefix,
        result.manifest_key,
        result.manifest_sha256,
        m["art_trajectory_count"],
        sum(1 for g in m["groups"] if g["included"]),
        sum(1 for g in m["groups"] if not g["included"]),
        m["files"],
        selection.as_dict(),
    )


async def export_batch(service: Service, settings: ArchiverSettings, batch: BatchCreated) -> DatasetExported:
    """``pipeline.batch.created`` → dataset → ``pipeline.dataset.exported`` (idempotent end to end)."""
    selection = Selection(trajectory_ids=tuple(batch.trajectory_ids))
    result = await export_dataset(
        service.pool,
        service.store,
        selection,
        ExportConfig.of(settings),
        dataset_id=stable_id("dataset", batch.batch_id),
        created_at=batch.occurred_at,
        batch_id=batch.batch_id,
    )
    await record_dataset(service.pool, result, selection)
    event = result.event(service.store.bucket, batch.batch_id)
    await publish(
        service.broker,
        service.topology.subject(DATASET_EXPORTED),
        event,
        stream=service.topology.stream(PIPELINE),
    )
    EXPORTS.inc()
    return event


async def run_cli_export(
    args: Any, connection: ConnectionSettings, settings: ArchiverSettings, progress: Progress | None = None
) -> int:
    """``cuneiform-archiver export``: filters from the command line, the dataset printed as JSON."""
    selection = Selection(
        since=args.since,
        until=args.until,
        agents=tuple(args.agent),
        scenarios=tuple(args.scenario),
        statuses=tuple(args.status) or ("completed",),
        min_reward=args.min_reward,
        model_version=args.model_version,
        limit=args.limit,
    )
    store = ObjectStore.from_settings(connection)
    await store.ensure_bucket()
    pool = await open_database(
        connection.pg_dsn, "archiver", load_migrations("cuneiform_archiver.migrations"), max_size=4
    )
    try:
        result = await export_dataset(pool, store, selection, ExportConfig.of(settings), progress=progress)
        await record_dataset(pool, result, selection)
    finally:
        await pool.close()
    event = result.event(store.bucket, None)
    if args.publish:
        nc = await nats.connect(connection.nats_url)
        try:
            topology = Topology.of(connection)
            await nc.jetstream().publish(
                topology.subject(DATASET_EXPORTED),
                event.model_dump_json().encode(),
                headers={"Nats-Msg-Id": str(event.event_id)},
                stream=topology.stream(PIPELINE),
            )
        finally:
            await nc.close()
    m = result.manifest
    summary = {
        "dataset_id": str(result.dataset_id),
        "location": f"s3://{store.bucket}/{result.prefix}",
        "already_existed": result.reused,
        "trajectories": len(m["trajectory_ids"]),
        "art_trajectories": m["art_trajectory_count"],
        "groups_included": event.group_count,
        "groups_excluded": {g["scenario_id"]: g["excluded_reason"] for g in m["groups"] if not g["included"]},
        "sft_trajectories": len(m["sft"]["trajectory_ids"]),
        "files": {f["name"]: {"bytes": f["size"], "records": f["records"], "sha256": f["sha256"]} for f in m["files"]},
        "published": bool(args.publish),
    }
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    if not m["trajectory_ids"]:
        print("no trajectory matched the filters; `cuneiform-archiver export --help` lists them", file=sys.stderr)
        return 1
    return 0
