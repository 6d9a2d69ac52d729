"""Dataset export benchmark: the archiver's export next to the raw cost of the same reads.

Stores N trajectories of S steps each (a growing tool-calling conversation per trajectory, like the
demo's agents: per step a step event, an LLM call, an action and a reward) in a fresh database of its
own embedded stack, then measures, on the same data in the same run:

  (a) the export: PostgreSQL → art.jsonl + openai_chat.jsonl + manifest.json, uploaded to S3;
  (b) baseline: SELECT of the same rows (trajectories, llm_calls, actions, rewards) and orjson.dumps of
      every row — the least any export must do, with no formats, no files and no upload.

Prints time, MB and MB/s of each and the ratio; asserts nothing (compare ratios on noisy machines).

    make bench-datasets                          # 10,000 trajectories x 10 steps
    make bench-datasets ARGS="--trajectories 2000"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from cuneiform_archiver.datasets import ExportConfig, Selection, export_dataset
from cuneiform_core.db import create_pool, load_migrations, open_database
from cuneiform_core.logging import configure_logging
from cuneiform_core.storage import ObjectStore
from cuneiform_recorder.store import Redactor, store_events
from cuneiform_sdk.contract import validate_message
from cuneiform_stack import LocalStack

TOOL = {
    "type": "function",
    "function": {
        "name": "trade",
        "description": "Choose your position for the next price move.",
        "parameters": {"type": "object", "properties": {"action": {"type": "string", "enum": ["buy", "sell", "hold"]}}},
    },
}
SYSTEM = "You are a trading agent for ACME. Each step, call `trade` with buy, sell or hold. " * 3


def progress(line: str) -> None:
    end = "" if sys.stdout.isatty() else "\n"
    print(f"\r{line}" if sys.stdout.isatty() else line, end=end, flush=True)


_shown = [-1]


def export_progress(done: int, total: int) -> None:
    """A tenth at a time off a terminal (the export reports every group)."""
    tenth = done * 10 // max(1, total)
    if sys.stdout.isatty() or tenth != _shown[0]:
        _shown[0] = tenth
        progress(f"  (a) export: {done:,}/{total:,} trajectories")


def episode(rng: random.Random, n: int, steps: int, t0: datetime) -> list[dict[str, Any]]:
    tid = str(uuid.uuid4())
    events: list[dict[str, Any]] = []

    def add(kind: str, **fields: Any) -> None:
        events.append(
            {
                "v": 1,
                "event_id": str(uuid.uuid4()),
                "type": kind,
                "trajectory_id": tid,
                "agent_id": f"agent-{n % 100}",
                "seq": len(events),
                "occurred_at": (t0 + timedelta(milliseconds=len(events))).isoformat(),
                **fields,
            }
        )

    add("trajectory_started", scenario_id=f"market-{n // 8}", model={"name": "policy", "version": "v1"})
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    total = 0.0
    for step in range(steps):
        trend = rng.choice(["up", "down", "flat"])
        messages.append({"role": "user", "content": f"Step {step}: price {100 + rng.random():.2f}, trend {trend}."})
        action = rng.choice(["buy", "sell", "hold"])
        call = {
            "id": f"call-{step}",
            "type": "function",
            "function": {"name": "trade", "arguments": json.dumps({"action": action})},
        }
        response = {"role": "assistant", "content": None, "tool_calls": [call]}
        add("step", step=step, environment={"price": 100.0, "trend": trend}, observation=f"trend {trend}")
        add(
            "llm_call",
            step=step,
            call_id=f"c{step}",
            model="policy-v1",
            messages=messages,
            response=response,
            tools=[TOOL],
            logprobs={"content": [{"token": action, "logprob": -1.1, "bytes": None, "top_logprobs": []}]},
        )
        add("action", step=step, action_type="trade", parameters={"action": action}, success=True)
        reward = rng.uniform(-1, 1)
        total += reward
        add("reward", step=step, value=reward, name="pnl", source="environment")
        messages = [*messages, response, {"role": "tool", "tool_call_id": f"call-{step}", "content": "filled"}]
    add("trajectory_ended", status="completed", total_reward=total, event_count=len(events) + 1)
    return events


async def fill(dsn: str, trajectories: int, steps: int) -> int:
    pool = await open_database(dsn, "recorder", load_migrations("cuneiform_recorder.migrations"), max_size=2)
    rng = random.Random(3)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    stored = 0
    try:
        async with pool.acquire() as conn:
            batch: list[Any] = []
            for n in range(trajectories):
                batch += [validate_message(e) for e in episode(rng, n, steps, t0)]
                if len(batch) >= 5000 or n == trajectories - 1:
                    await store_events(conn, batch, Redactor([]))
                    stored += len(batch)
                    batch = []
                    progress(f"  storing: {n + 1:,}/{trajectories:,} trajectories ({stored:,} events)")
    finally:
        await pool.close()
    print()
    return stored


async def raw_baseline(dsn: str, chunk: int) -> tuple[float, int]:
    """(b): the same rows read in the same chunks, every row serialized with orjson."""
    pool = await create_pool(dsn, max_size=2)
    started = time.perf_counter()
    size = 0
    try:
        async with pool.acquire() as conn:
            ids = [
                r["trajectory_id"]
                for r in await conn.fetch(
                    "SELECT trajectory_id FROM recorder.trajectories ORDER BY scenario_id, trajectory_id"
                )
            ]
            for start in range(0, len(ids), chunk):
                part = ids[start : start + chunk]
                for sql in (
                    "SELECT * FROM recorder.trajectories WHERE trajectory_id = ANY($1::uuid[])",
                    "SELECT trajectory_id, messages, tools, response, logprobs FROM recorder.llm_calls "
                    "WHERE trajectory_id = ANY($1::uuid[]) ORDER BY trajectory_id, seq",
                    "SELECT trajectory_id, step, action_type, parameters, success, error FROM recorder.actions "
                    "WHERE trajectory_id = ANY($1::uuid[]) ORDER BY trajectory_id, seq",
                    "SELECT trajectory_id, step, source, name, value, reason FROM recorder.rewards "
                    "WHERE trajectory_id = ANY($1::uuid[]) ORDER BY trajectory_id, seq",
                ):
                    for row in await conn.fetch(sql, part):
                        size += len(orjson.dumps(dict(row), default=str)) + 1
    finally:
        await pool.close()
    return time.perf_counter() - started, size


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="200 trajectories: checks that the benchmark runs")
    args = parser.parse_args()
    if args.quick:
        args.trajectories = 200

    configure_logging("dataset-bench", "WARNING", False)
    folder = Path(tempfile.mkdtemp(prefix="cuneiform-dataset-bench-"))
    print(f"starting a fresh embedded stack in {folder} …")
    stack = LocalStack(folder / "stack", env_file=folder / "stack.env")
    endpoints = stack.start()
    try:
        admin = await asyncpg.connect(endpoints.pg_dsn)
        await admin.execute("CREATE DATABASE bench_datasets")
        await admin.close()
        dsn = endpoints.pg_dsn.rsplit("/", 1)[0] + "/bench_datasets"
        print(f"storing {args.trajectories:,} trajectories of {args.steps} steps through the recorder's store …")
        events = await fill(dsn, args.trajectories, args.steps)
        store = ObjectStore(
            endpoints.s3_endpoint, endpoints.s3_access_key, endpoints.s3_secret_key, "bench", region=endpoints.s3_region
        )
        await store.ensure_bucket()
        config = ExportConfig()

        print("  (b) raw read + orjson …")
        raw_s, raw_bytes = await raw_baseline(dsn, config.chunk)
        pool = await open_database(dsn, "archiver", load_migrations("cuneiform_archiver.migrations"), max_size=4)
        try:
            started = time.perf_counter()
            result = await export_dataset(
                pool,
                store,
                Selection(),
                config,
                progress=export_progress,
            )
            export_s = time.perf_counter() - started
        finally:
            await pool.close()
        print()
        files = {f["name"]: f for f in result.manifest["files"]}
        written = sum(f["size"] for f in files.values())

        print()
        print(
            f"Dataset export benchmark — {args.trajectories:,} trajectories x {args.steps} steps ({events:,} events), 2 cores"
        )
        print(f"{'':<52}{'seconds':>9}{'rows MB/s':>11}{'written MB':>12}{'ratio':>8}")
        read_mb = raw_bytes / 1e6
        print(
            f"{'(a) export: art.jsonl + openai_chat.jsonl + manifest':<52}{export_s:>9.2f}{read_mb / export_s:>11.1f}"
            f"{written / 1e6:>12.1f}{export_s / raw_s:>8.2f}"
        )
        print(
            f"{'(b) baseline: SELECT the same rows + orjson.dumps':<52}{raw_s:>9.2f}{read_mb / raw_s:>11.1f}{read_mb:>12.1f}{1.0:>8.2f}"
        )
        print(f"(rows MB/s: the rows read, {read_mb:,.1f} MB as JSON, per second of each)")
        print()
        print(
            f"export ÷ raw = {export_s / raw_s:.2f}x the time; {args.trajectories / export_s:,.0f} trajectories/s; "
            f"art.jsonl {files['art.jsonl']['size'] / 1e6:.1f} MB ({files['art.jsonl']['records']:,} groups), "
            f"openai_chat.jsonl {files['openai_chat.jsonl']['size'] / 1e6:.1f} MB "
            f"({files['openai_chat.jsonl']['records']:,} examples)"
        )
    finally:
        stack.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
