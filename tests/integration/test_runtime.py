"""The consumer runtime against real NATS and PostgreSQL: ack after commit, retry on transient
failures, dead-letter bad input with its reason while consuming on, finish in-flight work on stop."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar

import asyncpg
import pytest
from cuneiform_core.db import Migration
from cuneiform_core.runtime import ConsumerOptions, Delivery, PermanentError
from cuneiform_core.service import Service
from cuneiform_core.settings import SERVICE_CONFIG, ConnectionSettings, ServiceSettings
from cuneiform_core.topology import DLQ, TRAJECTORIES, Topology
from nats.js import JetStreamContext
from pydantic_settings import SettingsConfigDict

from tests.support import eventually

pytestmark = pytest.mark.integration

TABLE = Migration(1, "items", "CREATE TABLE items (id text PRIMARY KEY, body jsonb NOT NULL)")
FAST = ConsumerOptions(batch_size=50, max_wait=0.2, max_deliver=3, backoff_base=0.05, backoff_max=0.2)


class ProbeSettings(ServiceSettings):
    service_name: ClassVar[str] = "probe"
    model_config = SettingsConfigDict(env_prefix="CUNEIFORM_PROBE_", **SERVICE_CONFIG)  # type: ignore[typeddict-item]


def decode(delivery: Delivery) -> dict[str, Any]:
    body = json.loads(delivery.data)
    if not isinstance(body, dict) or "id" not in body:
        raise PermanentError("an item needs an `id`")
    return body


async def store(pool: asyncpg.Pool, items: Sequence[dict[str, Any]]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO items (id, body) VALUES ($1, $2) ON CONFLICT DO NOTHING", [(i["id"], i) for i in items]
        )


Handler = Callable[[Service, Sequence[dict[str, Any]]], Awaitable[Any]]


@pytest.fixture
async def run_probe(connection: ConnectionSettings) -> AsyncIterator[Callable[[Handler], Awaitable[Service]]]:
    started: list[Service] = []

    async def start(handler: Handler, options: ConsumerOptions = FAST) -> Service:
        service = Service(ProbeSettings(graceful_timeout=10), connection, migrations=[TABLE])
        service.consume(
            name="probe",
            stream=TRAJECTORIES,
            decode=decode,
            handle=lambda items: handler(service, items),
            options=options,
        )
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        if service._started:
            await service.stop()


async def publish(js: JetStreamContext, topology: Topology, items: list[Any], raw: bytes | None = None) -> None:
    for n, item in enumerate(items):
        data = raw if raw is not None else json.dumps(item).encode()
        await js.publish(topology.subject("traj.agent-1.step"), data, headers={"Nats-Msg-Id": f"m-{n}-{item}"})


async def rows(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r["id"] for r in await conn.fetch("SELECT id FROM probe.items ORDER BY id")]
    finally:
        await conn.close()


async def dead_letters(js: JetStreamContext, topology: Topology) -> list[dict[str, Any]]:
    info = await js.stream_info(topology.stream(DLQ))
    letters = []
    for seq in range(1, (info.state.last_seq or 0) + 1):
        letters.append(json.loads((await js.get_msg(topology.stream(DLQ), seq)).data))
    return letters


async def consumer_state(js: JetStreamContext, topology: Topology) -> tuple[int, int]:
    info = await js.consumer_info(topology.stream(TRAJECTORIES), f"{topology.prefix}_probe")
    return info.num_pending or 0, info.num_ack_pending or 0


async def test_acks_only_after_the_handler_commits(run_probe, js, connection) -> None:  # type: ignore[no-untyped-def]
    topology = Topology.of(connection)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow_store(service: Service, items: Sequence[dict[str, Any]]) -> None:
        entered.set()
        await release.wait()
        await store(service.pool, items)

    await publish(js, topology, [{"id": f"i{n}"} for n in range(5)])
    await run_probe(slow_store)  # the five are pending: one fetch takes them all
    await asyncio.wait_for(entered.wait(), 10)
    # Delivered, not yet committed: nothing is acked and nothing is in the table.
    assert await consumer_state(js, topology) == (0, 5)
    assert await rows(connection.pg_dsn) == []
    release.set()

    async def all_acked() -> bool:
        return await consumer_state(js, topology) == (0, 0)

    await eventually(all_acked)
    assert await rows(connection.pg_dsn) == [f"i{n}" for n in range(5)]


async def test_transient_failure_is_retried_with_nothing_lost_or_doubled(run_probe, js, connection) -> None:  # type: ignore[no-untyped-def]
    topology = Topology.of(connection)
    failures = 0
    calls = 0

    async def flaky(service: Service, items: Sequence[dict[str, Any]]) -> None:
        nonlocal failures, calls
        calls += 1
        if failures < 2:
            failures += 1
            raise ConnectionRefusedError("postgres is restarting")
        await store(service.pool, items)

    await run_probe(flaky)
    await publish(js, topology, [{"id": f"i{n}"} for n in range(20)])

    async def stored() -> bool:
        return len(await rows(connection.pg_dsn)) == 20

    await eventually(stored)
    assert await rows(connection.pg_dsn) == sorted(f"i{n}" for n in range(20))
    assert calls >= 3 and failures == 2
    assert await dead_letters(js, topology) == []


async def test_bad_input_is_dead_lettered_with_its_reason_and_good_input_flows(run_probe, js, connection) -> None:  # type: ignore[no-untyped-def]
    topology = Topology.of(connection)

    async def handler(service: Service, items: Sequence[dict[str, Any]]) -> dict[int, str]:
        await store(service.pool, [i for i in items if i["id"] != "refused"])
        return {n: "the handler refuses this id" for n, i in enumerate(items) if i["id"] == "refused"}

    await run_probe(handler)
    await publish(js, topology, [{"id": "a"}])
    await publish(js, topology, ["x"], raw=b"{this is not json")
    await publish(js, topology, ["y"], raw=b'{"no_id": true}')
    await publish(js, topology, [{"id": "refused"}, {"id": "b"}])

    async def settled() -> bool:
        return len(await dead_letters(js, topology)) == 3 and await consumer_state(js, topology) == (0, 0)

    await eventually(settled)
    assert await rows(connection.pg_dsn) == ["a", "b"]
    letters = {letter["kind"]: letter for letter in await dead_letters(js, topology)}
    assert letters["malformed"]["reason"].startswith("malformed JSON")
    assert base64.b64decode(letters["malformed"]["payload_b64"]) == b"{this is not json"
    assert letters["invalid"]["reason"] == "an item needs an `id`"
    assert letters["rejected"]["reason"] == "the handler refuses this id"
    assert all(letter["service"] == "probe" and letter["stream_seq"] for letter in letters.values())


async def test_a_poison_message_is_isolated_retried_then_dead_lettered(run_probe, js, connection) -> None:  # type: ignore[no-untyped-def]
    topology = Topology.of(connection)

    async def handler(service: Service, items: Sequence[dict[str, Any]]) -> None:
        if any(i["id"] == "poison" for i in items):
            raise ValueError("cannot handle poison")
        await store(service.pool, items)

    await run_probe(handler)
    await publish(js, topology, [{"id": f"i{n}"} for n in range(6)] + [{"id": "poison"}] + [{"id": "z"}])

    async def settled() -> bool:
        return len(await dead_letters(js, topology)) == 1 and await consumer_state(js, topology) == (0, 0)

    await eventually(settled)
    assert await rows(connection.pg_dsn) == sorted([f"i{n}" for n in range(6)] + ["z"])
    (letter,) = await dead_letters(js, topology)
    assert letter["kind"] == "poison"
    assert letter["num_delivered"] == FAST.max_deliver
    assert "ValueError: cannot handle poison" in letter["reason"]


async def test_shutdown_finishes_and_acks_in_flight_work(run_probe, js, connection) -> None:  # type: ignore[no-untyped-def]
    topology = Topology.of(connection)
    entered = asyncio.Event()
    calls = 0

    async def slow(service: Service, items: Sequence[dict[str, Any]]) -> None:
        nonlocal calls
        calls += 1
        entered.set()
        await asyncio.sleep(1.0)
        await store(service.pool, items)

    await publish(js, topology, [{"id": f"i{n}"} for n in range(10)])
    service = await run_probe(slow)
    await asyncio.wait_for(entered.wait(), 10)
    await service.stop()  # must wait for the batch in hand, commit it and ack it
    assert await rows(connection.pg_dsn) == sorted(f"i{n}" for n in range(10))
    assert await consumer_state(js, topology) == (0, 0)

    # A restarted service gets nothing again: every message was acked before the old one exited.
    seen_after_restart: list[str] = []

    async def record(service: Service, items: Sequence[dict[str, Any]]) -> None:
        seen_after_restart.extend(i["id"] for i in items)

    await run_probe(record)
    await asyncio.sleep(1.0)
    assert seen_after_restart == []
    assert calls == 1


async def test_replicas_on_one_durable_consumer_share_the_work_without_doubles(run_probe, js, connection) -> None:  # type: ignore[no-untyped-def]
    topology = Topology.of(connection)
    seen: list[str] = []

    async def handler(service: Service, items: Sequence[dict[str, Any]]) -> None:
        seen.extend(i["id"] for i in items)
        await store(service.pool, items)

    small = ConsumerOptions(batch_size=10, max_wait=0.2)
    await run_probe(handler, small)
    await run_probe(handler, small)
    await publish(js, topology, [{"id": f"i{n:03d}"} for n in range(300)])

    async def done() -> bool:
        return len(await rows(connection.pg_dsn)) == 300 and await consumer_state(js, topology) == (0, 0)

    await eventually(done)
    assert sorted(seen) == sorted(f"i{n:03d}" for n in range(300))  # each handled exactly once
