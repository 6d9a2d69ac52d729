"""``cuneiform-demo`` run as a user runs it: a fresh embedded stack, the recorder, a small fleet.

The stack lives in a folder of its own (``tempfile.mkdtemp``, not pytest's tmp_path: PostgreSQL runs
as its own user when we are root, and pytest's temp root is 0700), and is stopped afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cuneiform_core.storage import ObjectStore

from tests.support import query, scalar

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent
# Enough episodes (12 GRPO groups of 3) for the trained policy to beat the start on held-out markets;
# a fixed seed keeps the training reproducible (the loop is deterministic given the seed). 12 agents,
# so that both arms of the A/B test get agents (the split is by a hash of agent and deployment id).
AGENTS, EPISODES, GROUP_SIZE, STEPS, SEED = 12, 3, 3, 8, 7
TRAJECTORIES = AGENTS * EPISODES
EVENTS_PER_TRAJECTORY = 2 + 5 * STEPS
#: The training episodes (the rollout's come after, each stamped with its version and deployment).
LEARN = "t.metadata->>'phase' = 'learn'"


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def command(name: str) -> str:
    script = BIN / name
    assert script.is_file(), f"{script} is missing: run `make install`"
    return str(script)


async def test_make_demo_records_a_fleet_end_to_end() -> None:
    folder = Path(tempfile.mkdtemp(prefix="cuneiform-e2e-demo-"))
    data_dir, env_file = folder / "stack", folder / "stack.env"
    # Only the test's own settings: a developer's CUNEIFORM_* variables must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUNEIFORM_")}
    env["CUNEIFORM_ENV_FILE"] = str(env_file)
    try:
        began = time.monotonic()
        run = await asyncio.to_thread(
            subprocess.run,
            [
                command("cuneiform-demo"),
                "--agents",
                str(AGENTS),
                "--episodes",
                str(EPISODES),
                "--seed",
                str(SEED),
                "--group-size",
                str(GROUP_SIZE),
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=250,
        )
        took = time.monotonic() - began
        output = f"--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
        assert run.returncode == 0, output

        # What the user reads: every trajectory completed, nothing dead-lettered, the stand-in said plainly.
        assert re.search(rf"Trajectories by status:\s+completed {TRAJECTORIES}\s*$", run.stdout, re.M), output
        assert re.search(r"Dead letters:\s+0\b", run.stdout), output
        assert re.search(rf"Events stored by type:\s+{TRAJECTORIES * EVENTS_PER_TRAJECTORY:,} in all", run.stdout), (
            output
        )
        assert "tabular softmax policy" in run.stdout and "stand-in" in run.stdout, output
        assert "next issues" in run.stdout, output
        # The loop closed: readiness fired, the trainer trained, the model is registered and does better.
        assert "trained and registered v2" in run.stdout, output
        held_out = re.search(r"mean reward ([+-][0-9.]+) \(v1\) → ([+-][0-9.]+) \(v2\)", run.stdout)
        assert held_out and float(held_out.group(2)) > float(held_out.group(1)), output
        # ... then rolled out: the fleet's live rewards promote v2 and roll back a deliberately worse canary.
        assert re.search(r"deployer \(deployer:auto\): v2 promoted: better: ", run.stdout), output
        assert re.search(r"deployer \(deployer:auto\): v2-inverted rolled back: worse: ", run.stdout), output
        assert "; promoted v2; rolled back v2-inverted." in run.stdout, output
        by_version = dict(re.findall(r"^\s+(v2-inverted|v2|v1)\s+canary\s+\d+\s+([+-][0-9.]+)", run.stdout, re.M))
        assert float(by_version["v2"]) > float(by_version["v2-inverted"]), output
        assert "Where to look" in run.stdout and "psql" in run.stdout, output
        assert (data_dir / "logs" / "recorder.log").is_file()
        print(f"cuneiform-demo took {took:.1f} s")

        # What the user would check in PostgreSQL, with the DSN from the env file the stack wrote.
        dsn = read_env_file(env_file)["CUNEIFORM_PG_DSN"]
        statuses = dict(await query(dsn, "SELECT status, count(*) FROM recorder.trajectories GROUP BY status"))
        assert list(statuses) == ["completed"]
        learn = await scalar(dsn, f"SELECT count(*) FROM recorder.trajectories t WHERE {LEARN}")
        assert learn == TRAJECTORIES
        for table, per_trajectory in (("events", EVENTS_PER_TRAJECTORY), ("llm_calls", STEPS), ("rewards", STEPS)):
            count = await scalar(
                dsn,
                f"SELECT count(*) FROM recorder.{table} JOIN recorder.trajectories t USING (trajectory_id) WHERE {LEARN}",
            )
            assert count == TRAJECTORIES * per_trajectory, table
        assert await scalar(dsn, "SELECT count(*) FROM recorder.dead_letters") == 0
        # Every rollout episode carries the version, the deployment and the arm it ran under.
        arms = await query(
            dsn,
            """SELECT metadata->>'phase' AS phase, model_version, variant, count(*) AS n FROM recorder.trajectories
               WHERE NOT (metadata->>'phase' = 'learn') GROUP BY 1, 2, 3""",
        )
        assert {(a["phase"], a["model_version"], a["variant"]) for a in arms} == {
            ("rollout", "v1", "champion"),
            ("rollout", "v2", "challenger"),
            ("canary", "v2", "champion"),
            ("canary", "v2-inverted", "challenger"),
        }
        assert await scalar(dsn, "SELECT count(*) FROM recorder.trajectories WHERE deployment_id IS NULL") == 0
        lineage = (await query(dsn, "SELECT * FROM deployer.models WHERE model_version = 'v2'"))[0]
        assert (lineage["source"], lineage["triggered_by"]) == ("trained", "readiness")
        assert len(lineage["trajectory_ids"]) == TRAJECTORIES
        decisions = await query(dsn, "SELECT action, actor FROM deployer.history ORDER BY seq")
        assert [(d["action"], d["actor"]) for d in decisions] == [
            ("deploy", "operator:demo"),  # v1 to everyone
            ("deploy", "deployer:auto"),  # v2 A/B against v1, on pipeline.model.trained
            ("promote", "deployer:auto"),
            ("deploy", "operator:demo"),  # the worse canary
            ("rollback", "deployer:auto"),
        ]
        # Each trajectory is proven complete by its own count, and its total is the sum of its step rewards.
        mismatched = await scalar(
            dsn,
            """SELECT count(*) FROM recorder.trajectories t
                WHERE t.stored_events <> t.expected_events
                   OR abs(t.total_reward - (SELECT sum(value) FROM recorder.rewards r
                                             WHERE r.trajectory_id = t.trajectory_id)) > 1e-6""",
        )
        assert mismatched == 0
        # GRPO groups: 12 agents in groups of 3 make 4 groups per round, each sharing one market.
        groups = await query(
            dsn, f"SELECT scenario_id, count(*) AS n FROM recorder.trajectories t WHERE {LEARN} GROUP BY scenario_id"
        )
        assert sorted(r["n"] for r in groups) == [GROUP_SIZE] * (AGENTS // GROUP_SIZE * EPISODES)
        # The recorded decisions look like a tool-using LLM agent's.
        call = (await query(dsn, "SELECT messages, tools, response, model FROM recorder.llm_calls LIMIT 1"))[0]
        assert [m["role"] for m in call["messages"]] == ["system", "user"]
        assert call["tools"][0]["function"]["name"] == "trade"
        assert call["response"]["tool_calls"][0]["function"]["name"] == "trade"
        assert call["model"] == "demo-policy"

        # The archive holds every event; the run is a dataset whose manifest matches its files.
        assert (data_dir / "logs" / "archiver.log").is_file()
        found = re.search(r"dataset ([0-9a-f-]{36}): s3://cuneiform/(datasets/\S+/)", run.stdout)
        assert found, output
        stack_env = read_env_file(env_file)
        store = ObjectStore(
            stack_env["CUNEIFORM_S3_ENDPOINT"],
            stack_env["CUNEIFORM_S3_ACCESS_KEY"],
            stack_env["CUNEIFORM_S3_SECRET_KEY"],
            "cuneiform",
        )
        manifest = json.loads(await store.get_bytes(found.group(2) + "manifest.json"))
        assert len(manifest["trajectory_ids"]) == TRAJECTORIES
        for entry in manifest["files"]:
            body = await store.get_bytes(entry["key"])
            assert hashlib.sha256(body).hexdigest() == entry["sha256"] and len(body.splitlines()) == entry["records"]
        segments = [k for k in await store.list_keys("archive/TRAJECTORIES/") if k.endswith(".manifest.json")]
        archived = 0
        for key in segments:
            archived += json.loads(await store.get_bytes(key))["count"]
        assert archived == await scalar(dsn, "SELECT count(*) FROM recorder.events")
    finally:
        down = await asyncio.to_thread(
            subprocess.run,
            [command("cuneiform-stack"), "down", "--data-dir", str(data_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        shutil.rmtree(folder, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
