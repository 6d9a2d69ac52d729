"""`cuneiform-archiver` as an operator runs it: a subprocess configured by environment, JSON on stdout,
a clear message and a non-zero status when something is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cuneiform_core.settings import ConnectionSettings

from tests.integration.test_datasets import multi_turn, planner_and_actor, store
from tests.processes import deployment_env

pytestmark = pytest.mark.integration


def archiver_cli(connection: ConnectionSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = deployment_env(connection)
    script = Path(sys.executable).parent / "cuneiform-archiver"
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=120)


def output(run: subprocess.CompletedProcess[str]) -> Any:
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


async def test_export_with_filters_and_the_archive_summary(connection: ConnectionSettings) -> None:
    await store(
        connection.pg_dsn,
        [multi_turn("market-a", r) for r in (1.0, -1.0, 0.5)] + [planner_and_actor("market-b", r) for r in (2.0, 0.0)],
    )
    found = output(archiver_cli(connection, "export", "--scenario", "market-a", "--min-reward", "0"))
    assert found["trajectories"] == 2 and found["art_trajectories"] == 2  # the -1.0 run is filtered out
    assert found["location"].startswith(f"s3://{connection.s3_bucket}/datasets/")
    assert set(found["files"]) == {"art.jsonl", "openai_chat.jsonl"}
    again = output(archiver_cli(connection, "export", "--scenario", "market-a", "--min-reward", "0"))
    assert again["dataset_id"] == found["dataset_id"] and again["already_existed"]

    nothing = archiver_cli(connection, "export", "--agent", "nobody")
    assert nothing.returncode == 1 and "no trajectory matched" in nothing.stderr

    summary = output(archiver_cli(connection, "segments", "--verify"))
    assert summary["segments"] == 0 and summary["chain_breaks"] == []
    dry = output(archiver_cli(connection, "retention", "--older-than-days", "30"))
    assert dry["dry_run"] and dry["trajectories_deleted"] == 0


def test_a_useful_message_when_the_servers_are_not_there(tmp_path: Path) -> None:
    dead = ConnectionSettings(
        nats_url="nats://127.0.0.1:9", pg_dsn="postgresql://x:y@127.0.0.1:9/none", s3_endpoint="127.0.0.1:9"
    )
    run = archiver_cli(dead, "export")
    assert run.returncode == 1
    assert "cuneiform-archiver export:" in run.stderr and "cuneiform-stack status" in run.stderr
