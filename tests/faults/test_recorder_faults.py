"""The recorder under faults, against real NATS and PostgreSQL: a SIGKILL in the middle of a drain, and
a database that goes away for ten seconds while agents keep publishing. After each, every event is
stored exactly once, every trajectory is complete and announced exactly once, and nothing was
dead-lettered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import signal
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import nats.errors
import pytest
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import DLQ, PIPELINE, TRAJECTORIES, TRAJECTORY_COMPLETED, Topology, ensure_topology
from cuneiform_stack.launcher import ServerRecord
from cuneiform_stack.postgres import PostgresLauncher
from cuneiform_stack.process import PortAllocator, ServerLog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from tests.events import EVENTS_PER_TRAJECTORY, STEPS, interleaved, publish_events, trajectory
from tests.processes import ServiceProcess, metric
from tests.support import eventually, query, scalar

pytestmark = [pytest.mark.faults, pytest.mark.integration]

#: JetStream storage for the test's namespace: 20,000 events of up to 4 KB need more than the default.
STORAGE_GIB = 0.25


@pytest.fixture
def recorders(log_dir: Path) -> Iterator[list[ServiceProcess]]:
    """Every recorder process a test starts, stopped afterwards; their logs are printed, which pytest
    shows when the test failed."""
    started: list[ServiceProcess] = []
    yield started
    for recorder in started:
        status = recorder.stop()
        print(f"--- {recorder.log_path.name} (exit status {status}):\n{recorder.log_tail(60)}")


def with_storage(connection: ConnectionSettings) -> ConnectionSettings:
    return connection.model_copy(update={"nats_storage_gib": STORAGE_GIB})


@pytest.fixture
async def nc(connection: ConnectionSettings) -> AsyncIterator[Client]:
    client = await nats.connect(connection.nats_url)
    yield client
    await client.close()


# --- what the tests check ----------------------------------------------------------------------------------


async def stream_messages(js: JetStreamContext, stream: str, subject: str) -> list[dict[str, Any]]:
    """Every message of ``stream`` on ``subject``, read with an ephemeral pull consumer."""
    info = await js.stream_info(stream)
    total = info.state.messages or 0
    if total == 0:
        return []
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0),
    )
    found: list[dict[str, Any]] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=1.0)
            except nats.errors.TimeoutError:
                break
            found += [json.loads(m.data) for m in msgs]
            if msgs[-1].metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return found


async def stored_events(dsn: str) -> int:
    """Rows in the ledger; 0 before the recorder's first start has created its schema."""
    try:
        return int(await scalar(dsn, "SELECT count(*) FROM recorder.events"))
    except asyncpg.UndefinedTableError:
        return 0


async def consumer_state(js: JetStreamContext, topology: Topology) -> tuple[int, int]:
    info = await js.consumer_info(topology.stream(TRAJECTORIES), f"{topology.prefix}_recorder")
    return info.num_pending or 0, info.num_ack_pending or 0


async def assert_everything_stored_once(
    js: JetStreamContext, connection: ConnectionSettings, expected: dict[uuid.UUID, int], timeout: float
) -> None:
    """Wait for the drain, then check the database, the consumer and the PIPELINE stream exactly."""
    dsn = connection.pg_dsn
    topology = Topology.of(connection)
    total = sum(expected.values())

    async def drained() -> bool:
        done = await scalar(
            dsn,
            "SELECT count(*) FROM recorder.trajectories WHERE status <> 'recording' AND completion_published_at IS NOT NULL",
        )
        return done == len(expected) and await consumer_state(js, topology) == (0, 0)

    await eventually(drained, timeout=timeout, what=f"{len(expected)} trajectories finalized and announced")
    assert await scalar(dsn, "SELECT count(*) FROM recorder.events") == total
    assert await scalar(dsn, "SELECT count(DISTINCT event_id) FROM recorder.events") == total
    rows = await query(dsn, "SELECT trajectory_id, status, stored_events, expected_events FROM recorder.trajectories")
    assert {r["trajectory_id"] for r in rows} == set(expected)
    wrong = [
        dict(r)
        for r in rows
        if (r["status"], r["stored_events"], r["expected_events"])
        != ("completed", expected[r["trajectory_id"]], expected[r["trajectory_id"]])
    ]
    assert wrong == [], f"{len(wrong)} trajectories not completed with every event, e.g. {wrong[:3]}"
    per_table = {
        table: await scalar(dsn, f"SELECT count(*) FROM recorder.{table}")
        for table in ("steps", "llm_calls", "actions", "rewards")
    }
    assert per_table == {table: len(expected) * STEPS for table in per_table}
    assert await consumer_state(js, topology) == (0, 0)

    completed = await stream_messages(js, topology.stream(PIPELINE), topology.subject(TRAJECTORY_COMPLETED))
    per_trajectory = Counter(uuid.UUID(c["trajectory_id"]) for c in completed)
    assert set(per_trajectory) == set(expected)
    assert [t for t, n in per_trajectory.items() if n != 1] == [], "a trajectory was announced more than once"
    assert {c["event_count"] for c in completed} == {EVENTS_PER_TRAJECTORY}
    assert await dead_letter_count(js, topology) == 0
    assert await scalar(dsn, "SELECT count(*) FROM recorder.dead_letters") == 0


async def dead_letter_count(js: JetStreamContext, topology: Topology) -> int:
    return (await js.stream_info(topology.stream(DLQ))).state.messages or 0


async def expire_what_the_dead_process_held(js: JetStreamContext, topology: Topology) -> float:
    """Make JetStream redeliver now what a killed recorder had fetched and not acked.

    The server would redeliver it by itself after the consumer's ack_wait (60 s): a crash costs that
    much latency for one batch, never data. To keep the test short, ack_wait is shortened for a moment,
    as an operator would with `nats consumer edit` (the server rechecks pending messages at once); the
    restarted recorder puts its own configuration back when it starts. Returns the original ack_wait.
    """
    stream, name = topology.stream(TRAJECTORIES), f"{topology.prefix}_recorder"
    config = (await js.consumer_info(stream, name)).config
    await js.add_consumer(stream, config.evolve(ack_wait=1.0))
    await asyncio.sleep(1.5)  # past the shortened deadline: the held messages are queued for redelivery
    return float(config.ack_wait or 0)


# --- 1. SIGKILL in the middle of a drain -----------------------------------------------------------------------


async def test_a_recorder_killed_mid_drain_and_restarted_stores_every_event_exactly_once(
    connection: ConnectionSettings, nc: Client, recorders: list[ServiceProcess], log_dir: Path
) -> None:
    connection = with_storage(connection)
    js = nc.jetstream()
    topology = Topology.of(connection)
    await ensure_topology(js, topology)
    rng = random.Random(20_000)
    trajectories = [trajectory(rng, f"agent-{n % 50}") for n in range(2_000)]
    events = interleaved(trajectories)
    await publish_events(js, connection.nats_prefix, events)
    assert (await js.stream_info(topology.stream(TRAJECTORIES))).state.messages == len(events) == 20_000

    settings = {"batch_size": 250, "sweep_interval_s": 0.5}
    first = ServiceProcess("recorder", connection, log_dir, **settings)
    recorders.append(first)
    dsn = connection.pg_dsn

    async def partly_stored() -> bool:
        assert first.alive, f"the recorder exited:\n{first.log_tail()}"
        return await stored_events(dsn) >= len(events) // 5

    await eventually(partly_stored, timeout=40, what="a fifth of the events stored")
    first.kill()
    assert first.process.returncode == -signal.SIGKILL
    stored_at_kill = await stored_events(dsn)
    assert 0 < stored_at_kill < len(events), "the kill must land in the middle of the drain"
    _, held = await consumer_state(js, topology)  # fetched by the dead process, never acked
    completed_at_kill, unannounced_at_kill = (
        await query(
            dsn,
            """SELECT count(*) FILTER (WHERE status = 'completed'),
                      count(*) FILTER (WHERE status = 'completed' AND completion_published_at IS NULL)
                 FROM recorder.trajectories""",
        )
    )[0]

    ack_wait = await expire_what_the_dead_process_held(js, topology)
    second = ServiceProcess("recorder", connection, log_dir, **settings)
    recorders.append(second)
    await second.wait_ready()
    info = await js.consumer_info(topology.stream(TRAJECTORIES), f"{topology.prefix}_recorder")
    assert info.config.ack_wait == pytest.approx(ack_wait), "the restarted recorder restores its consumer"
    expected = {uuid.UUID(t[0]["trajectory_id"]): EVENTS_PER_TRAJECTORY for t in trajectories}
    await assert_everything_stored_once(js, connection, expected, timeout=45)
    assert second.alive
    duplicates = await metric(second, "cuneiform_recorder_events_total", outcome="duplicate")
    print(
        f"killed with {stored_at_kill} events stored, {completed_at_kill} trajectories completed "
        f"({unannounced_at_kill} not yet announced) and {held} messages unacked; the restarted recorder "
        f"found {duplicates:.0f} of those already stored"
    )


# --- 2. PostgreSQL down for 10 s -----------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL server of this test's own, which the test stops and starts again on the same port."""

    def __init__(self, folder: Path) -> None:
        self.launcher = PostgresLauncher(folder / "data", ServerLog(folder / "postgres.log"))
        self.record: ServerRecord = self.launcher.start(PortAllocator())
        self.ports = dict(self.record.ports)

    @property
    def url(self) -> str:
        return self.launcher.url(self.ports)

    def stop(self) -> None:
        """A fast shutdown: open sessions are terminated, new connections refused."""
        self.launcher.stop(self.record)

    def start(self) -> None:
        self.record = self.launcher.start(PortAllocator(), previous=self.ports)
        assert dict(self.record.ports) == self.ports, "PostgreSQL must come back where the recorder looks"


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    # Not pytest's tmp_path: as root PostgreSQL runs as its own user (see tests/conftest.py).
    folder = Path(tempfile.mkdtemp(prefix="cuneiform-faults-pg-"))
    try:
        server = PrivatePostgres(folder)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class SteadyPublisher:
    """Agents publishing whole trajectories at a steady rate until stopped."""

    def __init__(self, js: JetStreamContext, prefix: str, rng: random.Random, per_tick: int, tick_s: float) -> None:
        self.js, self.prefix, self.rng = js, prefix, rng
        self.per_tick, self.tick_s = per_tick, tick_s
        self.trajectories: list[list[dict[str, Any]]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while not self._stop.is_set():
            tick = loop.time()
            batch = [trajectory(self.rng, f"agent-{(n + i) % 20}") for i in range(self.per_tick)]
            n += self.per_tick
            await publish_events(self.js, self.prefix, [e for t in batch for e in t])
            self.trajectories += batch
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, self.tick_s - (loop.time() - tick)))


async def test_postgres_down_for_10_s_during_a_drain_loses_and_doubles_nothing(
    private_postgres: PrivatePostgres,  # first: torn down after the recorder has stopped
    connection: ConnectionSettings,
    nc: Client,
    recorders: list[ServiceProcess],
    log_dir: Path,
) -> None:
    connection = with_storage(connection).model_copy(update={"pg_dsn": private_postgres.url})
    dsn = connection.pg_dsn
    js = nc.jetstream()
    topology = Topology.of(connection)
    await ensure_topology(js, topology)
    rng = random.Random(10)
    # A backlog to drain, then agents that keep publishing through the outage (~400 events/s).
    backlog = [trajectory(rng, f"agent-{n % 20}") for n in range(800)]
    await publish_events(js, connection.nats_prefix, [e for t in backlog for e in t])
    recorder = ServiceProcess("recorder", connection, log_dir, batch_size=100, sweep_interval_s=0.5)
    recorders.append(recorder)
    publisher = SteadyPublisher(js, connection.nats_prefix, rng, per_tick=10, tick_s=0.25)
    publisher.start()

    async def draining() -> bool:
        assert recorder.alive, f"the recorder exited:\n{recorder.log_tail()}"
        return await stored_events(dsn) >= 2_000

    await eventually(draining, timeout=40, what="the drain under way")
    await asyncio.to_thread(private_postgres.stop)  # off the loop: the agents go on publishing
    down_at, published_before = time.monotonic(), len(publisher.trajectories)
    readiness_during_outage = set()
    while time.monotonic() - down_at < 10:
        assert recorder.alive, f"the recorder died while PostgreSQL was down:\n{recorder.log_tail()}"
        readiness_during_outage.add(await recorder.readyz())
        await asyncio.sleep(0.5)
    await asyncio.to_thread(private_postgres.start)
    back_at, published_during = time.monotonic(), len(publisher.trajectories) - published_before
    assert published_during > 0, "agents must have published while the database was down"
    assert readiness_during_outage == {503}, "readiness must fail while the database is down"
    await recorder.wait_ready(timeout=30)  # the pool reconnected by itself
    await asyncio.sleep(1.0)  # agents go on publishing after the database is back
    await publisher.stop()

    expected = {uuid.UUID(t[0]["trajectory_id"]): EVENTS_PER_TRAJECTORY for t in backlog + publisher.trajectories}
    await assert_everything_stored_once(js, connection, expected, timeout=45)
    assert recorder.alive
    logged = recorder.log_events()
    assert logged["consumer.transient_failure"] > 0, "the outage must have hit the consumer"
    # A database outage is never a bad message: no batch may be bisected, no message retried as poison
    # (which ends in a dead letter after max_deliver attempts).
    mistaken = logged["consumer.batch_failed_isolating"] + logged["consumer.message_failed"]
    assert mistaken == 0, f"the outage was taken for bad messages {mistaken} times:\n{recorder.log_tail(80)}"
    print(
        f"{sum(expected.values())} events stored once, {published_during * EVENTS_PER_TRAJECTORY} of them published "
        f"during the outage; {logged['consumer.transient_failure']} transient failures; everything stored "
        f"{time.monotonic() - back_at:.1f} s after PostgreSQL was back"
    )
