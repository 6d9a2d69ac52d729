"""A deployer process SIGKILLed in the middle of an experiment: agents keep running the routing they
have (it lives in the KV bucket, not in the deployer), trajectories keep being recorded under their
arms, and the restarted deployer picks the experiment up and decides it — once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from cuneiform_core.service import Service
from cuneiform_core.settings import ConnectionSettings
from cuneiform_sdk import Recorder
from cuneiform_sdk.routing import Routing

from tests.integration.test_deployer import MODEL, ask, play, register
from tests.integration.test_deployer import stack as stack  # the recorder service, an SDK and a routing client
from tests.processes import ServiceProcess
from tests.support import eventually, query

pytestmark = [pytest.mark.faults, pytest.mark.integration]


async def test_a_deployer_killed_mid_experiment_loses_nothing(
    connection: ConnectionSettings,
    log_dir: Path,
    services: list[Service],
    stack: tuple[Recorder, Routing],
) -> None:
    sdk, routing = stack
    settings = {"auto_rollout": "off", "min_trajectories": 15, "evaluate_interval_s": 0.5, "sweep_interval_s": 0.3}
    victim = ServiceProcess("deployer", connection, log_dir, **settings)
    survivor: ServiceProcess | None = None
    try:
        await victim.wait_ready()
        for version in ("v1", "v2"):
            await register(connection, version)
        await ask(connection, "deploy", {"model_name": MODEL, "version": "v1", "who": "ops", "why": "baseline"})
        started = await ask(
            connection,
            "deploy",
            {"model_name": MODEL, "version": "v2", "strategy": "canary", "percent": 50, "who": "ops", "why": "try"},
        )
        await routing.wait_for(lambda t: MODEL in t and t[MODEL].strategy == "canary", timeout=5)
        victim.kill()

        # The deployer is gone: agents still resolve their arms, and their episodes are recorded under them.
        rng = random.Random(3)
        played: dict[str, int] = {}
        for _ in range(3):
            for version, n in play(sdk, routing, 30, {"v1": 2.0, "v2": 0.0}, rng).items():
                played[version] = played.get(version, 0) + n
        assert set(played) == {"v1", "v2"} and await sdk.flush(10)
        assert routing.table(MODEL).deployment_id == started["deployment_id"]  # type: ignore[union-attr]

        survivor = ServiceProcess("deployer", connection, log_dir, **settings)
        await survivor.wait_ready()
        await routing.wait_for(lambda t: t[MODEL].strategy == "immediate", timeout=20)
        assert [a.version for a in routing.table(MODEL).arms] == ["v1"]  # type: ignore[union-attr]

        history = await query(connection.pg_dsn, "SELECT action, actor, reason FROM deployer.history ORDER BY seq")
        assert [(h["action"], h["actor"]) for h in history] == [
            ("deploy", "operator:ops"),
            ("deploy", "operator:ops"),
            ("rollback", "deployer:auto"),
        ]
        assert history[-1]["reason"].startswith("worse")

        async def announced() -> bool:
            rows = await query(
                connection.pg_dsn, "SELECT count(*) AS n FROM deployer.history WHERE published_at IS NULL"
            )
            return rows[0]["n"] == 0

        await eventually(announced, timeout=10, what="every change announced on pipeline.deployment.changed")
    finally:
        for process in (victim, survivor):
            if process is not None:
                process.stop()
                print(f"--- {process.log_path.name}:\n{process.log_tail(15)}")
