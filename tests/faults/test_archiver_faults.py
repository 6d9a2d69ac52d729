"""The archiver as a process under SIGKILL, against real NATS and S3: killed while a segment is
filling (and again right after one is stored), restarted, it still leaves every stream message in
exactly one segment — no gap, no duplicate, no orphaned write counted as data."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.storage import ObjectStore
from cuneiform_core.topology import TRAJECTORIES, Topology
from nats.js import JetStreamContext

from tests.events import publish_events, trajectory
from tests.integration.test_archiver import archive_contents
from tests.processes import ServiceProcess, metric
from tests.support import eventually

pytestmark = [pytest.mark.faults, pytest.mark.integration]


async def test_an_archiver_killed_mid_segment_leaves_every_event_in_exactly_one_segment(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology, log_dir: Path
) -> None:
    rng = random.Random(21)
    events = [e for n in range(600) for e in trajectory(rng, f"agent-{n % 50}")]  # 6,000 events
    settings = {"segment_max_events": 1500, "segment_max_age_s": 30, "fetch_batch": 250}
    processes: list[ServiceProcess] = []
    try:
        first = ServiceProcess("archiver", connection, log_dir, **settings)
        processes.append(first)
        await first.wait_ready()
        publishing = asyncio.create_task(publish_events(js, topology.prefix, events))

        # Killed after its first segment, while the next one is half full (nothing of it stored).
        async def one_segment_stored() -> bool:
            return await metric(first, "cuneiform_archiver_segments_total") >= 1

        await eventually(one_segment_stored, timeout=60, what="a first segment stored")
        first.kill()
        await publishing

        second = ServiceProcess("archiver", connection, log_dir, **{**settings, "segment_max_age_s": 0.5})
        processes.append(second)
        await second.wait_ready()
        last = (await js.stream_info(topology.stream(TRAJECTORIES))).state.last_seq
        assert last == len(events)

        async def caught_up(process: ServiceProcess = second) -> bool:
            return await metric(process, "cuneiform_archiver_last_archived_seq") == last

        await eventually(caught_up, timeout=60, what="the restarted archiver caught up")
        # And once more, right after a segment was stored: the restart must not write it again.
        second.kill()
        third = ServiceProcess("archiver", connection, log_dir, **{**settings, "segment_max_age_s": 0.5})
        processes.append(third)
        await third.wait_ready()
        await asyncio.sleep(1.0)
        assert await metric(third, "cuneiform_archiver_segments_total") == 0
    finally:
        for process in processes:
            status = process.stop()
            print(f"--- {process.log_path.name} (exit status {status}):\n{process.log_tail(30)}")

    index, messages = await archive_contents(ObjectStore.from_settings(connection), topology)
    assert [m.seq for m in messages] == list(range(1, len(events) + 1))
    assert sorted(m.msg_id for m in messages) == sorted(e["event_id"] for e in events)
    assert not index.orphans and not index.chain_breaks()
