"""Streams, the routing KV bucket and the payloads object store: created idempotently, as specified."""

from __future__ import annotations

import nats
import pytest
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import STREAMS, TRAJECTORIES, Topology, ensure_topology
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType
from nats.js.errors import BadRequestError

pytestmark = pytest.mark.integration


async def test_topology_is_created_once_and_then_left_alone(connection: ConnectionSettings) -> None:
    topology = Topology.of(connection)
    nc = await nats.connect(connection.nats_url)
    try:
        js = nc.jetstream()
        first = await ensure_topology(js, topology)
        assert set(first.values()) == {"created"}
        assert set((await ensure_topology(js, topology)).values()) == {"unchanged"}

        for spec in STREAMS:
            config = (await js.stream_info(topology.stream(spec))).config
            assert config.storage == StorageType.FILE
            assert config.discard == DiscardPolicy.NEW  # full stream: producers get an error, data stays
            assert config.duplicate_window == spec.duplicate_window
            assert config.subjects == [topology.subject(s) for s in spec.subjects]
        batches = (await js.stream_info(topology.stream(STREAMS[2]))).config
        assert batches.retention == RetentionPolicy.WORK_QUEUE
        await js.key_value(topology.bucket("routing"))
        await js.object_store(topology.bucket("payloads"))
    finally:
        await nc.close()


async def test_the_stream_drops_a_repeated_message_id(connection: ConnectionSettings) -> None:
    topology = Topology.of(connection)
    nc = await nats.connect(connection.nats_url)
    try:
        js = nc.jetstream()
        await ensure_topology(js, topology)
        subject = topology.subject("traj.agent-1.step")
        acks = [await js.publish(subject, b"{}", headers={"Nats-Msg-Id": "same-id"}) for _ in range(3)]
        assert [a.duplicate for a in acks] == [None, True, True]
        assert (await js.stream_info(topology.stream(TRAJECTORIES))).state.messages == 1
    finally:
        await nc.close()


async def test_limits_drift_is_updated_in_place(connection: ConnectionSettings) -> None:
    topology = Topology.of(connection)
    nc = await nats.connect(connection.nats_url)
    try:
        js = nc.jetstream()
        await ensure_topology(js, topology)
        config = TRAJECTORIES.config(topology.prefix, topology.storage_gib)
        config.max_age = 3600.0
        await js.update_stream(config)
        assert (await ensure_topology(js, topology))[topology.stream(TRAJECTORIES)] == "updated"
        assert (await js.stream_info(topology.stream(TRAJECTORIES))).config.max_age == TRAJECTORIES.max_age
    finally:
        await nc.close()


async def test_oversize_messages_are_refused_by_the_server(connection: ConnectionSettings) -> None:
    topology = Topology.of(connection)
    nc = await nats.connect(connection.nats_url)
    try:
        js = nc.jetstream()
        await ensure_topology(js, topology)
        with pytest.raises((BadRequestError, nats.errors.MaxPayloadError)):
            await js.publish(topology.subject("traj.agent-1.llm_call"), b"x" * (1024 * 1024 + 1))
    finally:
        await nc.close()
