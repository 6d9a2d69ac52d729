"""The raw archive against real NATS, PostgreSQL and S3: every event in exactly one segment, an
object-store outage that pauses without loss, PostgreSQL not needed at all; rebuild reproduces the
recorder's tables; retention deletes only what the archive provably holds."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import nats
import orjson
import pytest
from cuneiform_archiver.main import Archiver
from cuneiform_archiver.replay import rebuild, republish, table_checksums
from cuneiform_archiver.retention import ArchiveVerifier, apply_retention
from cuneiform_archiver.segments import ArchiveIndex, read_segment, stream_prefix
from cuneiform_archiver.settings import ArchiverSettings
from cuneiform_core.service import Service
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.storage import ObjectStore
from cuneiform_core.topology import PAYLOADS_BUCKET, TRAJECTORIES, Topology, ensure_topology
from cuneiform_recorder.main import build as build_recorder
from cuneiform_recorder.settings import RecorderSettings
from cuneiform_sdk.subjects import trajectory_subject
from nats.js import JetStreamContext

from tests.conftest import Servers, _unique, _with_database
from tests.events import publish_events, raw_event, trajectory
from tests.support import TcpProxy, eventually, query, scalar

pytestmark = pytest.mark.integration

FAST = {"segment_max_events": 100, "segment_max_age_s": 0.3, "fetch_batch": 200}


@pytest.fixture
def start_archiver(connection: ConnectionSettings, services: list[Service]) -> Callable[..., Awaitable[Archiver]]:
    async def start(connection: ConnectionSettings = connection, **overrides: Any) -> Archiver:
        archiver = Archiver(ArchiverSettings(**{**FAST, **overrides}), connection)
        await archiver.service.start()
        services.append(archiver.service)
        return archiver

    return start


@pytest.fixture
def start_recorder(connection: ConnectionSettings, services: list[Service]) -> Callable[..., Awaitable[Service]]:
    async def start(**overrides: Any) -> Service:
        service = build_recorder(RecorderSettings(**{"sweep_interval_s": 0.3, **overrides}), connection)
        await service.start()
        services.append(service)
        return service

    return start


@pytest.fixture
async def empty_dsn(servers: Servers) -> AsyncIterator[str]:
    """A second, empty database (the rebuild target)."""
    name = _unique("db")
    admin = await asyncpg.connect(servers.pg_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    yield _with_database(servers.pg_dsn, name)
    admin = await asyncpg.connect(servers.pg_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def all_archived(archiver: Archiver, js: JetStreamContext, topology: Topology, timeout: float = 30) -> None:
    async def done() -> bool:
        last = (await js.stream_info(topology.stream(TRAJECTORIES))).state.last_seq
        return last > 0 and archiver.segments.archived_through == last

    await eventually(done, timeout=timeout, what="every stream message archived")


async def archive_contents(store: ObjectStore, topology: Topology) -> tuple[ArchiveIndex, list[Any]]:
    stream = topology.stream(TRAJECTORIES)
    index = ArchiveIndex.from_keys(stream, await store.list_keys(stream_prefix(stream)))
    messages = []
    for segment in index.segments:
        body = await store.get_bytes(segment.key)
        assert segment.manifest_key is not None
        manifest = orjson.loads(await store.get_bytes(segment.manifest_key))
        assert manifest["sha256"] == hashlib.sha256(body).hexdigest()
        assert manifest["bytes"] == len(body)
        found = list(read_segment(body))
        assert manifest["count"] == len(found)
        assert [manifest["first_seq"], manifest["last_seq"]] == [segment.first_seq, segment.last_seq]
        messages += found
    return index, messages


def agent_events(n_trajectories: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    for i in range(n_trajectories):
        events += trajectory(rng, f"agent-{i % 7}")
    return events


# --- the raw archive ------------------------------------------------------------------------------------------


async def test_every_message_lands_in_exactly_one_segment_without_postgres(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology, start_archiver: Any
) -> None:
    events = agent_events(40)  # 400 events
    await publish_events(js, topology.prefix, events)
    # What the recorder dead-letters stays in the cold copy too: not JSON, and a claim check.
    subject = trajectory_subject("agent-x", "step", topology.prefix)
    await js.publish(subject, b"{definitely not json", headers={"Nats-Msg-Id": "junk-1"})
    body = json.dumps(raw_event(uuid.uuid4(), "agent-x", 0, "step", step=0, observation="x" * 5000)).encode()
    objects = await js.object_store(topology.bucket(PAYLOADS_BUCKET))
    await objects.put("claim-1", body)
    claim = raw_event(uuid.uuid4(), "agent-x", 0, "step")
    claim["payload_ref"] = {
        "bucket": topology.bucket(PAYLOADS_BUCKET),
        "name": "claim-1",
        "sha256": hashlib.sha256(body).hexdigest(),
        "size": len(body),
    }
    await js.publish(subject, json.dumps(claim).encode(), headers={"Nats-Msg-Id": "claim-1"})

    # No PostgreSQL at all: the raw copy does not need it.
    nowhere = connection.model_copy(update={"pg_dsn": "postgresql://nobody:x@127.0.0.1:9/none"})
    archiver = await start_archiver(nowhere)
    await all_archived(archiver, js, topology)

    index, messages = await archive_contents(archiver.service.store, topology)
    assert [m.seq for m in messages] == list(range(1, len(events) + 3))
    assert len(index.segments) >= 4 and not index.chain_breaks() and not index.orphans
    by_id = {e["event_id"]: e for e in events}
    for message in messages[: len(events)]:
        assert message.data == by_id[message.msg_id]
    junk, claimed = messages[-2], messages[-1]
    assert junk.data is None and junk.body == b"{definitely not json"
    assert claimed.data == claim and claimed.event == json.loads(body)
    info = await js.consumer_info(topology.stream(TRAJECTORIES), archiver.segments.name)
    assert info.num_ack_pending == 0 and info.num_pending == 0
    # Operators ask over NATS; the archive part answers without PostgreSQL.
    nc = await nats.connect(connection.nats_url)
    try:
        reply = await nc.request(topology.subject("cmd.archiver.status"), b"{}", timeout=5)
    finally:
        await nc.close()
    status = json.loads(reply.data)["result"]
    assert status["archive"]["lag_events"] == 0
    assert status["archive"]["segments"] == len(index.segments)
    assert status["archive"]["archived_through_seq"] == len(events) + 2
    assert status["database"].startswith("unavailable")

    # A restart resumes after the last segment: nothing is written twice.
    await archiver.service.stop()
    again = await start_archiver(nowhere)
    await publish_events(js, topology.prefix, agent_events(5, seed=8))
    await all_archived(again, js, topology)
    _, messages = await archive_contents(again.service.store, topology)
    assert [m.seq for m in messages] == list(range(1, len(events) + 53))


async def test_an_object_store_outage_pauses_the_archive_and_loses_nothing(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology, start_archiver: Any
) -> None:
    proxy = TcpProxy(connection.s3_endpoint)
    await proxy.start()
    try:
        archiver = await start_archiver(connection.model_copy(update={"s3_endpoint": proxy.endpoint}))
        await publish_events(js, topology.prefix, agent_events(10, seed=1))
        await all_archived(archiver, js, topology)
        before = archiver.segments.archived_through

        await proxy.cut()
        await publish_events(js, topology.prefix, agent_events(30, seed=2))
        await asyncio.sleep(2.0)
        assert archiver.segments.archived_through == before  # paused ...
        info = await js.consumer_info(topology.stream(TRAJECTORIES), archiver.segments.name)
        assert (info.num_ack_pending or 0) + (info.num_pending or 0) > 0  # ... with the events still in the stream

        await proxy.restore()
        await all_archived(archiver, js, topology, timeout=40)
    finally:
        await proxy.stop()
    _, messages = await archive_contents(ObjectStore.from_settings(connection), topology)
    assert [m.seq for m in messages] == list(range(1, 401))


# --- rebuild and republish ------------------------------------------------------------------------------------


async def test_rebuild_from_segments_reproduces_the_recorders_tables(
    connection: ConnectionSettings,
    js: JetStreamContext,
    topology: Topology,
    start_archiver: Any,
    start_recorder: Any,
    empty_dsn: str,
) -> None:
    await start_recorder(incomplete_after_s=1.0)
    archiver = await start_archiver()
    # One trajectory that never gets its last event: the recorder calls it incomplete after 1 s ...
    broken = trajectory(random.Random(3), "agent-broken")
    await publish_events(js, topology.prefix, broken[:4] + broken[5:])
    await eventually(
        lambda: _status_count(connection.pg_dsn, "incomplete", 1), what="the broken trajectory marked incomplete"
    )
    # ... then the fleet's completed trajectories, a failed one, and a message no recorder can read.
    events = agent_events(30, seed=4)
    failed = trajectory(random.Random(5), "agent-failed")
    failed[-1]["status"] = "failed"
    await publish_events(js, topology.prefix, events + failed)
    await js.publish(trajectory_subject("agent-x", "step", topology.prefix), b"[1, 2", headers={"Nats-Msg-Id": "bad"})
    await eventually(lambda: _status_count(connection.pg_dsn, "completed", 30), what="30 trajectories completed")
    await all_archived(archiver, js, topology)

    report = await rebuild(
        archiver.service.store,
        topology.stream(TRAJECTORIES),
        empty_dsn,
        recorder=RecorderSettings(incomplete_after_s=1.0),
    )
    assert report.statuses == {"completed": 30, "failed": 1, "incomplete": 1}
    assert report.messages == 31 * 10 + 9 + 1 and sum(report.invalid.values()) == 1
    original, rebuilt = await table_checksums(connection.pg_dsn), await table_checksums(empty_dsn)
    assert rebuilt["events"]["rows"] == 31 * 10 + 9
    assert rebuilt == original
    # The rebuilt trajectories are not announced a second time.
    assert (
        await scalar(empty_dsn, "SELECT count(*) FROM recorder.trajectories WHERE completion_published_at IS NULL") == 0
    )

    with pytest.raises(RuntimeError, match="already holds recorder events"):
        await rebuild(archiver.service.store, topology.stream(TRAJECTORIES), empty_dsn)


async def test_republish_moves_the_archive_onto_another_namespace(
    connection: ConnectionSettings, js: JetStreamContext, topology: Topology, start_archiver: Any
) -> None:
    events = agent_events(12, seed=9)
    await publish_events(js, topology.prefix, events)
    archiver = await start_archiver()
    await all_archived(archiver, js, topology)
    target = Topology(f"{topology.prefix}r", storage_gib=topology.storage_gib)
    await ensure_topology(js, target)
    nc = await nats.connect(connection.nats_url)
    try:
        sent = await republish(archiver.service.store, topology.stream(TRAJECTORIES), nc, target_prefix=target.prefix)
        again = await republish(archiver.service.store, topology.stream(TRAJECTORIES), nc, target_prefix=target.prefix)
    finally:
        await nc.close()
    assert sent == again == len(events)
    state = (await js.stream_info(target.stream(TRAJECTORIES))).state
    assert state.messages == len(events)  # the second replay was dropped by Nats-Msg-Id


# --- retention ------------------------------------------------------------------------------------------------


async def test_retention_deletes_only_trajectories_whose_every_event_is_archived(
    connection: ConnectionSettings,
    js: JetStreamContext,
    topology: Topology,
    start_archiver: Any,
    start_recorder: Any,
) -> None:
    dsn = connection.pg_dsn
    await start_recorder()
    archiver = await start_archiver()
    await publish_events(js, topology.prefix, agent_events(10, seed=11))
    await eventually(lambda: _status_count(dsn, "completed", 10), what="first 10 trajectories completed")
    await all_archived(archiver, js, topology)
    await archiver.service.stop()

    # Recorded while the archiver is down: in PostgreSQL, not yet in any segment.
    await publish_events(js, topology.prefix, agent_events(5, seed=12))
    await eventually(lambda: _status_count(dsn, "completed", 15), what="15 trajectories completed")
    # Everything is "40 days old"; one old trajectory has an event from before sequences were kept.
    await _execute(dsn, "UPDATE recorder.trajectories SET finalized_at = finalized_at - interval '40 days'")
    legacy = await scalar(dsn, "SELECT trajectory_id FROM recorder.trajectories ORDER BY finalized_at LIMIT 1")
    await _execute(dsn, "UPDATE recorder.events SET stream_seq = NULL WHERE trajectory_id = $1 AND seq = 3", legacy)

    store = ObjectStore.from_settings(connection)
    verifier = ArchiveVerifier(store, topology.stream(TRAJECTORIES))
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        young = await apply_retention(pool, verifier, timedelta(days=60))
        assert young.trajectories_deleted == 0
        dry = await apply_retention(pool, verifier, timedelta(days=30), dry_run=True)
        assert (dry.trajectories_deleted, dry.kept_unarchived) == (9, 6)
        assert await scalar(dsn, "SELECT count(*) FROM recorder.trajectories") == 15

        first = await apply_retention(pool, verifier, timedelta(days=30))
        assert (first.trajectories_deleted, first.events_deleted, first.kept_unarchived) == (9, 90, 6)
        kept = await query(dsn, "SELECT agent_id FROM recorder.trajectories")
        assert len(kept) == 6
        for table in ("events", "steps", "llm_calls", "actions", "rewards"):
            orphans = await scalar(
                dsn,
                f"SELECT count(*) FROM recorder.{table} e WHERE NOT EXISTS "
                "(SELECT 1 FROM recorder.trajectories t WHERE t.trajectory_id = e.trajectory_id)",
            )
            assert orphans == 0, table

        # Once the archiver has caught up, the rest goes too — except the one whose proof is missing.
        archiver = await start_archiver()
        await all_archived(archiver, js, topology)
        second = await apply_retention(pool, verifier, timedelta(days=30))
        assert (second.trajectories_deleted, second.kept_unarchived) == (5, 1)
        assert await scalar(dsn, "SELECT trajectory_id FROM recorder.trajectories") == legacy
        runs = await query(dsn, "SELECT trajectories_deleted FROM archiver.retention_runs ORDER BY ran_at")
        assert [r["trajectories_deleted"] for r in runs] == [0, 9, 5]
    finally:
        await pool.close()


async def _status_count(dsn: str, status: str, wanted: int) -> bool:
    try:
        found = await scalar(dsn, "SELECT count(*) FROM recorder.trajectories WHERE status = $1", status)
    except asyncpg.UndefinedTableError:
        return False
    return bool(found == wanted)


async def _execute(dsn: str, sql: str, *args: Any) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()
