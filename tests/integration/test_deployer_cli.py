"""`cuneiform-deployer` as an operator runs it, against the deployer running as its own process:
register a file and a URL, deploy, canary, status, rollback, history — JSON on stdout; a clear message
and a non-zero status when something is wrong."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.storage import ObjectStore

from tests.processes import ServiceProcess, deployment_env, metric

pytestmark = pytest.mark.integration


def cli(connection: ConnectionSettings, *args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "cuneiform-deployer"
    return subprocess.run(
        [str(script), *args], env=deployment_env(connection), capture_output=True, text=True, timeout=60
    )


def ok(run: subprocess.CompletedProcess[str]) -> Any:
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


async def test_an_operator_registers_deploys_and_rolls_back(
    connection: ConnectionSettings, log_dir: Path, tmp_path: Path
) -> None:
    deployer = ServiceProcess("deployer", connection, log_dir, auto_rollout="off")
    try:
        await deployer.wait_ready()
        artifact = tmp_path / "v1.json"
        artifact.write_text('{"weights": "v1"}')
        registered = ok(
            cli(connection, "register", str(artifact), "--name", "demo-policy", "--version", "v1", "--why", "base")
        )
        assert registered == {
            "model_name": "demo-policy",
            "version": "v1",
            "registered": True,
            "artifact_key": "models/demo-policy/manual/v1/artifact",
        }
        # From a URL (here a presigned link to an object somewhere in S3).
        store = ObjectStore.from_settings(connection)
        await store.put_bytes("elsewhere/v2.bin", b"v2 weights")
        url = await store.presigned_get("elsewhere/v2.bin", timedelta(minutes=10))
        ok(cli(connection, "register", url, "--name", "demo-policy", "--version", "v2", "--why", "from a URL"))
        assert await store.get_bytes("models/demo-policy/manual/v2/artifact") == b"v2 weights"

        first = ok(cli(connection, "deploy", "demo-policy", "v1", "--why", "first", "--who", "alice"))
        assert first["revision"] == 1 and first["routing"]["arms"][0]["version"] == "v1"
        canary = ok(
            cli(connection, "deploy", "demo-policy", "v2", "--strategy", "canary", "--percent", "20", "--why", "try")
        )
        assert {a["version"]: a["weight"] for a in canary["routing"]["arms"]} == {"v2": 0.2, "v1": 0.8}
        status = ok(cli(connection, "status", "demo-policy"))["models"]["demo-policy"]
        assert status["experiment"]["champion"] == "v1" and status["in_kv"]
        assert status["experiment"]["verdicts"][0]["action"] == "continue"
        back = ok(cli(connection, "rollback", "demo-policy", "--why", "complaints", "--who", "bob"))
        assert back["routing"]["arms"] == [
            {**back["routing"]["arms"][0], "version": "v1", "weight": 1.0, "role": "champion"}
        ]
        history = ok(cli(connection, "history", "demo-policy"))["history"]
        assert [(h["action"], h["actor"]) for h in history] == [
            ("rollback", "operator:bob"),
            ("deploy", f"operator:{getpass.getuser()}"),  # --who defaults to the user running the CLI
            ("deploy", "operator:alice"),
        ]
        models = ok(cli(connection, "models", "demo-policy"))["models"]
        assert [(m["model_version"], m["source"]) for m in models] == [("v1", "manual"), ("v2", "manual")]
        assert await metric(deployer, "cuneiform_deployer_changes_total", action="rollback", actor="operator") == 1

        # Mistakes get one clear line and a non-zero status.
        unknown = cli(connection, "deploy", "demo-policy", "v9", "--why", "typo")
        assert unknown.returncode == 1 and "v9 not registered" in unknown.stderr
        no_reason = cli(connection, "promote", "demo-policy")
        assert no_reason.returncode == 2 and "--why" in no_reason.stderr
        missing = cli(
            connection, "register", str(tmp_path / "nope.bin"), "--name", "demo-policy", "--version", "v3", "--why", "x"
        )
        assert missing.returncode == 1 and "no file" in missing.stderr
    finally:
        deployer.stop()
    nobody = cli(connection, "status")
    assert nobody.returncode == 1 and "no deployer service answers" in nobody.stderr
