"""Recording never blocks or loses events when NATS goes away: a private nats-server is stopped while
agents record and restarted on the same port and data; agents that cannot reach NATS at all keep
their events in the on-disk outbox, and a later process — even after the first was SIGKILLed —
delivers them, each exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from cuneiform_core.topology import TRAJECTORIES, Topology, ensure_topology
from cuneiform_sdk import Recorder
from cuneiform_sdk.outbox import DiskOutbox
from cuneiform_stack.launcher import ServerRecord
from cuneiform_stack.nats import NatsLauncher
from cuneiform_stack.process import PortAllocator, ServerLog

from tests.conftest import Servers
from tests.integration.test_sdk_publish import check_exactly_once, read_stream

pytestmark = pytest.mark.integration


class PrivateNats:
    """A nats-server of this test alone (file storage in tmp), which it may stop and restart."""

    def __init__(self, folder: Path) -> None:
        self.launcher = NatsLauncher(folder / "data", ServerLog(folder / "nats.log"))
        self.record: ServerRecord | None = None
        self.ports: dict[str, int] = {}

    @property
    def url(self) -> str:
        return self.launcher.url(self.ports)

    def start(self) -> None:
        # A fresh allocator: the previous one remembers our ports as taken and would move us.
        self.record = self.launcher.start(PortAllocator(), previous=self.ports or None)
        if self.ports:
            assert dict(self.record.ports) == self.ports, "restarted on other ports"
        self.ports = dict(self.record.ports)

    def stop(self) -> None:
        if self.record is not None:
            self.launcher.stop(self.record)
            self.record = None


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    server = PrivateNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


async def make_topology(url: str, prefix: str) -> None:
    nc = await nats.connect(url)
    try:
        await ensure_topology(nc.jetstream(), Topology(prefix, storage_gib=0.05))
    finally:
        await nc.close()


async def stored_events(url: str, prefix: str) -> list:
    nc = await nats.connect(url)
    try:
        return await read_stream(nc.jetstream(), Topology(prefix).stream(TRAJECTORIES))
    finally:
        await nc.close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"nats://127.0.0.1:{port}"  # nothing listens there


async def wait_for(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        await asyncio.sleep(0.02)


async def test_recording_goes_on_through_a_server_restart_and_every_event_arrives_once(
    private_nats: PrivateNats, tmp_path: Path
) -> None:
    prefix = "outage"
    await make_topology(private_nats.url, prefix)
    recorder = Recorder(
        private_nats.url, prefix=prefix, outbox_dir=tmp_path / "outbox", batch_size=64, ack_timeout=1.0, spill_after=0.5
    )
    await recorder.start()
    await wait_for(lambda: recorder.connected, 10, "connected")

    recorded: dict[uuid.UUID, int] = {}
    costs: list[float] = []
    running = True

    def timed(call, *args, **kwargs):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        result = call(*args, **kwargs)
        costs.append(time.perf_counter() - started)
        return result

    async def agent(number: int) -> None:
        while running:
            t = recorder.trajectory(agent_id=f"agent-{number}", model="m")
            timed(t.start)
            for step in range(15):
                timed(t.step, observation=step)
                timed(t.llm_call, user_prompt=f"step {step}?", response_text="buy")
                await asyncio.sleep(0.003)
            timed(t.end, "completed")
            recorded[t.trajectory_id] = 32

    agents = [asyncio.create_task(agent(n)) for n in range(4)]
    await asyncio.sleep(0.6)  # live
    before_outage = len(recorded)
    await asyncio.to_thread(private_nats.stop)
    await wait_for(lambda: not recorder.connected, 10, "disconnected")
    await asyncio.sleep(1.5)  # down: the agents keep recording, the buffer spills to disk
    spilled_during_outage = recorder.outbox.pending_count()
    await asyncio.to_thread(private_nats.start)  # same port, same data directory
    await wait_for(lambda: recorder.connected, 15, "reconnected")
    await asyncio.sleep(0.6)  # live again
    running = False
    await asyncio.gather(*agents)
    assert await recorder.flush(timeout=60), f"not delivered: {recorder.stats}"
    await recorder.close()

    print(f"stats: {recorder.stats}")
    assert before_outage > 0 and len(recorded) > before_outage
    assert spilled_during_outage > 0
    assert recorder.outbox.segments() == []
    stored = await stored_events(private_nats.url, prefix)
    check_exactly_once(stored, recorded, prefix)
    costs.sort()
    median, p99, worst = statistics.median(costs), costs[int(len(costs) * 0.99)], costs[-1]
    print(
        f"{len(costs)} record calls through the outage: median {median * 1e6:.1f} µs, "
        f"p99 {p99 * 1e6:.1f} µs, max {worst * 1e3:.2f} ms"
    )
    # Generous bounds for a loaded 2-core CI machine; waiting on the network would take seconds.
    assert median < 0.001 and p99 < 0.01 and worst < 0.5, "a record call waited on the network"


async def test_lost_acks_are_retried_under_the_same_id_and_stored_once(
    private_nats: PrivateNats, tmp_path: Path
) -> None:
    """A frozen server (SIGSTOP) takes messages but acks none: every in-flight event times out and
    is sent again, several times. Thawed, the server stores each once and drops the repeats."""
    prefix = "frozen"
    await make_topology(private_nats.url, prefix)
    recorder = Recorder(private_nats.url, prefix=prefix, outbox_dir=tmp_path / "outbox", batch_size=32, ack_timeout=0.3)
    await recorder.start()
    await wait_for(lambda: recorder.connected, 10, "connected")
    assert private_nats.record is not None and private_nats.record.process is not None
    pid = private_nats.record.process.pid
    recorded: dict[uuid.UUID, int] = {}
    os.kill(pid, signal.SIGSTOP)
    try:
        for n in range(10):
            async with recorder.trajectory(agent_id=f"patient-{n % 3}", model="m") as t:
                for step in range(20):
                    t.step(observation=step)
            recorded[t.trajectory_id] = 22
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # a few more rounds of timeouts and resends
        assert recorder.stats.acked == 0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert await recorder.flush(timeout=30), f"not delivered: {recorder.stats}"
    await recorder.close()
    print(f"stats: {recorder.stats}")
    assert recorder.stats.errors["ack_timeout"] > 0 and recorder.stats.retried > 0
    stored = await stored_events(private_nats.url, prefix)
    check_exactly_once(stored, recorded, prefix)


async def test_events_recorded_without_nats_are_delivered_by_the_next_recorder(
    servers: Servers, nats_prefix: str, tmp_path: Path
) -> None:
    await make_topology(servers.nats_url, nats_prefix)
    outbox_dir = tmp_path / "outbox"
    offline = Recorder(closed_port_url(), prefix=nats_prefix, outbox_dir=outbox_dir)
    await offline.start()
    recorded: dict[uuid.UUID, int] = {}
    for n in range(5):
        async with offline.trajectory(agent_id=f"offline-{n}", model="m") as t:
            for step in range(n + 1):
                t.step(observation=step)
                t.reward(0.5)
        recorded[t.trajectory_id] = 2 + 2 * (n + 1)
    unfinished = offline.trajectory(agent_id="offline-x", model="m")
    unfinished.step()  # the process stops mid-trajectory: what it recorded still counts
    recorded[unfinished.trajectory_id] = 2
    await offline.close(timeout=0.2)
    assert offline.outbox.pending_count() == sum(recorded.values())

    saved = {segment.name: segment.read_bytes() for segment in DiskOutbox(outbox_dir).segments()}

    online = Recorder(servers.nats_url, prefix=nats_prefix, outbox_dir=outbox_dir)
    await online.start()
    assert await online.flush(timeout=30)
    await online.close()
    assert online.stats.replayed == sum(recorded.values())
    assert online.stats.duplicates == 0
    assert DiskOutbox(outbox_dir).segments() == []

    # A third start finds nothing to send again.
    again = Recorder(servers.nats_url, prefix=nats_prefix, outbox_dir=outbox_dir)
    await again.start()
    assert await again.flush(timeout=10)
    await again.close()
    assert again.stats.replayed == 0

    # An agent that crashed after sending but before clearing its outbox sends it all again on
    # restart: the stream recognises every event by its Nats-Msg-Id and keeps one copy.
    for name, content in saved.items():
        (outbox_dir / name).write_bytes(content)
    crashed = Recorder(servers.nats_url, prefix=nats_prefix, outbox_dir=outbox_dir)
    await crashed.start()
    assert await crashed.flush(timeout=30)
    await crashed.close()
    assert crashed.stats.replayed == crashed.stats.duplicates == sum(recorded.values())

    stored = await stored_events(servers.nats_url, nats_prefix)
    assert len(stored) == sum(recorded.values())
    ended = {u: n for u, n in recorded.items() if u != unfinished.trajectory_id}
    check_exactly_once([s for s in stored if s.event().trajectory_id != unfinished.trajectory_id], ended, nats_prefix)
    assert sorted(s.event().seq for s in stored if s.event().trajectory_id == unfinished.trajectory_id) == [0, 1]


CHILD_AGENT = """
import asyncio, json, sys
from cuneiform_sdk import Recorder

async def main() -> None:
    url, outbox, prefix = sys.argv[1:4]
    # A tiny buffer and a short spill delay: whatever cannot be sent is on disk almost at once.
    recorder = Recorder(url, prefix=prefix, outbox_dir=outbox, max_buffer=5, spill_after=0.2)
    await recorder.start()
    recorded = {}
    for n in range(6):
        async with recorder.trajectory(agent_id=f"doomed-{n % 2}", model="m") as t:
            for step in range(n + 3):
                t.step(observation=step)
                t.action("wait", success=True)
                await asyncio.sleep(0.01)
        recorded[str(t.trajectory_id)] = 2 + 2 * (n + 3)
    while recorder.outbox.pending_count() < sum(recorded.values()):
        await asyncio.sleep(0.05)
    print(json.dumps(recorded), flush=True)
    await asyncio.sleep(3600)  # killed here, without any chance to clean up

asyncio.run(main())
"""


async def test_events_spilled_by_a_killed_agent_are_delivered_by_a_new_process(
    servers: Servers, nats_prefix: str, tmp_path: Path
) -> None:
    await make_topology(servers.nats_url, nats_prefix)
    outbox_dir = tmp_path / "outbox"
    script = tmp_path / "agent.py"
    script.write_text(CHILD_AGENT)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        closed_port_url(),
        str(outbox_dir),
        nats_prefix,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), timeout=60)
        assert line, f"the agent died: {(await child.stderr.read()).decode()}"
        recorded = {uuid.UUID(k): v for k, v in json.loads(line).items()}
    finally:
        child.send_signal(signal.SIGKILL)  # no atexit, no close(): only the outbox on disk survives
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    segments = DiskOutbox(outbox_dir).segments()
    assert len(segments) > 1  # spilled as it went, not only at the end

    # The next agent process on this outbox (here, this one) delivers what the killed one recorded.
    successor = Recorder(servers.nats_url, prefix=nats_prefix, outbox_dir=outbox_dir)
    await successor.start()  # the dead process's lock is gone with it
    assert await successor.flush(timeout=30)
    await successor.close()
    stored = await stored_events(servers.nats_url, nats_prefix)
    check_exactly_once(stored, recorded, nats_prefix)
    assert DiskOutbox(outbox_dir).segments() == []
