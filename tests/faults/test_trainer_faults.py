"""A reference trainer process SIGKILLed in the middle of training: the dispatcher notices the silence,
offers the batch again under a new attempt, another trainer wins it, and exactly one model is
registered — from the new attempt."""

from __future__ import annotations

from pathlib import Path

import pytest
from cuneiform_archiver.main import Archiver
from cuneiform_archiver.settings import ArchiverSettings
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import Topology
from nats.js import JetStreamContext

from tests.integration.test_training import batch_of_demo_data, dispatcher, models, trainer
from tests.processes import ServiceProcess
from tests.support import eventually, query

pytestmark = [pytest.mark.faults, pytest.mark.integration]


async def test_a_trainer_killed_mid_training_loses_the_batch_to_a_new_attempt(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology, log_dir: Path
) -> None:
    archiver = Archiver(ArchiverSettings(segment_max_age_s=0.5), connection)
    await archiver.service.start()
    # Attempt 1 trains for a long time (many epochs), so the kill lands in the middle of it.
    slow = dispatcher(connection, heartbeat_timeout_s=30.0, hyperparameters={"epochs": 1_000_000})
    await slow.service.start()
    victim = ServiceProcess("trainer", connection, log_dir, trainer_id="victim", heartbeat_interval_s=0.5)
    survivor = None
    try:
        await victim.wait_ready()
        await batch_of_demo_data(connection, js, topology)

        async def training() -> bool:
            rows = await query(connection.pg_dsn, "SELECT state, progress FROM trainer_dispatcher.batches")
            return bool(rows) and rows[0]["state"] == "claimed" and rows[0]["progress"] is not None

        await eventually(training, timeout=60, what="the victim claimed the batch and is training")
        victim.kill()

        # A dispatcher with a short training for the next attempts (same database, same consumers).
        await slow.service.stop()
        fast = dispatcher(connection, heartbeat_timeout_s=2.0)
        await fast.service.start()
        survivor = trainer(connection, "survivor")
        await survivor.service.start()

        async def registered() -> bool:
            return len(await models(connection.pg_dsn)) == 1

        await eventually(registered, timeout=60, what="the batch retrained under attempt 2 and registered")
        await fast.service.stop()
    finally:
        if survivor is not None:
            await survivor.service.stop()
        victim.stop()
        print(f"--- {victim.log_path.name}:\n{victim.log_tail(20)}")
        await archiver.service.stop()

    model = (await models(connection.pg_dsn))[0]
    assert (model["attempt"], model["trainer_id"]) == (2, "survivor")
    attempts = await query(
        connection.pg_dsn, "SELECT attempt, outcome, trainer_id FROM trainer_dispatcher.attempts ORDER BY attempt"
    )
    assert [(a["attempt"], a["outcome"], a["trainer_id"]) for a in attempts] == [
        (1, "timed_out", "victim"),
        (2, "completed", "survivor"),
    ]
