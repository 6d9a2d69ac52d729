"""Routing benchmark: what asking "which version does this agent run?" costs, and how fast a change
reaches a running agent.

(a) In process, no servers: ``assign()`` (sha256 of deployment and agent id, then the arm) and the SDK's
    ``Routing.model_for()`` (the same plus the ``ModelRef`` to stamp), next to two baselines in the same
    loop: a plain dict lookup (a static agent → version map) and the sha256 alone.
(b) On an embedded stack (nats-server, PostgreSQL, moto S3) with the deployer running in this process:
    an operator's ``cmd.deployer.deploy`` (alternating v1 / v2 to every agent) until a running SDK
    ``Routing`` client sees the new table — next to a raw nats-py KV watcher on the same bucket (the floor:
    the same KV update, no parsing or validation) and the command's own round trip (the PostgreSQL
    transaction, the compare-and-set write to the bucket, the history announcement).

Prints figures and ratios; asserts nothing (noisy machines: compare ratios).

    .venv/bin/python bench/routing_bench.py [--calls 200000] [--changes 60]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from cuneiform_core.logging import configure_logging
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.storage import ObjectStore
from cuneiform_core.topology import ROUTING_BUCKET, Topology, command_subject
from cuneiform_deployer.main import Deployer
from cuneiform_deployer.settings import DeployerSettings
from cuneiform_sdk.routing import Arm, Routing, RoutingTable, assign
from cuneiform_stack import LocalStack

MODEL = "bench-policy"


def per_call_us(fn: Any, agents: list[str], calls: int) -> float:
    n = len(agents)
    began = time.perf_counter()
    for i in range(calls):
        fn(agents[i % n])
    return (time.perf_counter() - began) / calls * 1e6


def in_process(calls: int) -> None:
    table = RoutingTable(
        model_name=MODEL,
        deployment_id="01a20f00-b22f-7150-9a0c-4b9872d438fe",
        strategy="ab",
        revision=1,
        arms=[Arm(version="v2", weight=0.1, role="challenger"), Arm(version="v1", weight=0.9, role="champion")],
    )
    agents = [f"agent-{i}" for i in range(10_000)]
    static = {a: assign(table, a).version for a in agents}
    routing = Routing("nats://127.0.0.1:1")  # never started: answers from its cache
    routing._apply(MODEL, table)
    deployment = table.deployment_id
    rows = [
        ("dict lookup (static map; baseline)", per_call_us(static.__getitem__, agents, calls)),
        (
            "sha256 of the key alone (baseline)",
            per_call_us(lambda a: hashlib.sha256(f"{deployment}:{a}".encode()).digest(), agents, calls),
        ),
        ("assign(table, agent)", per_call_us(lambda a: assign(table, a), agents, calls)),
        ("Routing.model_for(model, agent)", per_call_us(lambda a: routing.model_for(MODEL, a), agents, calls)),
    ]
    base = rows[1][1]
    print(f"\n(a) which version for this agent? {calls:,} calls over {len(agents):,} agents")
    for name, us in rows:
        print(f"    {name:<38} {us:8.2f} µs/call   {us / base:6.1f}x sha256")


async def propagation(changes: int, folder: Path) -> None:
    stack = LocalStack(folder / "stack", env_file=folder / "stack.env")
    print("\n(b) starting the embedded stack …", file=sys.stderr)
    endpoints = stack.start()
    try:
        connection = ConnectionSettings(
            nats_url=endpoints.nats_url,
            pg_dsn=endpoints.pg_dsn,
            s3_endpoint=endpoints.s3_endpoint,
            s3_access_key=endpoints.s3_access_key,
            s3_secret_key=endpoints.s3_secret_key,
            s3_region=endpoints.s3_region,
            nats_storage_gib=1,
        )
        deployer = Deployer(DeployerSettings(auto_rollout="off", evaluate_interval_s=3600), connection)
        await deployer.service.start()
        nc = await nats.connect(endpoints.nats_url)
        routing = Routing(endpoints.nats_url, prefix="")
        try:
            store = ObjectStore.from_settings(connection)
            for version in ("v1", "v2"):
                body = json.dumps({"weights": version}).encode()
                key = f"models/{MODEL}/manual/{version}/artifact"
                await store.put_bytes(key, body)
                await ask(nc, "register", {"model_name": MODEL, "version": version, "artifact_key": key,
                                           "sha256": hashlib.sha256(body).hexdigest(), "who": "bench", "why": "bench"})  # fmt: skip
            await ask(nc, "deploy", {"model_name": MODEL, "version": "v1", "who": "bench", "why": "start"})
            await routing.start()
            kv = await nc.jetstream().key_value(Topology("").bucket(ROUTING_BUCKET))
            raw_seen: dict[int, float] = {}
            sdk_seen: dict[int, float] = {}

            def on_change(_: str, table: RoutingTable | None) -> None:
                if table is not None:
                    sdk_seen.setdefault(table.revision, time.perf_counter())

            routing.on_change(on_change)
            watcher = await kv.watch(MODEL)

            async def raw() -> None:
                async for entry in watcher:
                    if entry is not None and entry.value:
                        raw_seen.setdefault(json.loads(entry.value)["revision"], time.perf_counter())

            raw_task = asyncio.create_task(raw())
            reply_ms, raw_ms, sdk_ms = [], [], []
            for i in range(changes):
                version = "v2" if i % 2 == 0 else "v1"
                began = time.perf_counter()
                answer = await ask(
                    nc, "deploy", {"model_name": MODEL, "version": version, "who": "bench", "why": f"change {i}"}
                )
                replied = time.perf_counter()
                revision = answer["revision"]
                while revision not in sdk_seen or revision not in raw_seen:
                    await asyncio.sleep(0.0005)
                reply_ms.append((replied - began) * 1e3)
                raw_ms.append((raw_seen[revision] - began) * 1e3)
                sdk_ms.append((sdk_seen[revision] - began) * 1e3)
                print(f"\r    {i + 1}/{changes} changes", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            raw_task.cancel()
            await watcher.stop()  # type: ignore[no-untyped-call]
        finally:
            await routing.close()
            await nc.close()
            await deployer.service.stop()
    finally:
        stack.stop()

    def line(name: str, values: list[float]) -> str:
        q = statistics.quantiles(values, n=20)
        return (
            f"    {name:<52} p50 {statistics.median(values):7.2f} ms   p95 {q[18]:7.2f} ms   max {max(values):7.2f} ms"
        )

    print(f"\n(b) a deployment change until agents see it ({changes} changes, each to every agent)")
    print(line("command round trip (PostgreSQL txn + KV write + event)", reply_ms))
    print(line("command → raw nats-py KV watcher sees it (floor)", raw_ms))
    print(line("command → SDK Routing client sees it", sdk_ms))
    extra = [s - r for s, r in zip(sdk_ms, raw_ms, strict=True)]
    print(f"    SDK client after the raw watcher: median {statistics.median(extra):+.3f} ms "
          f"({statistics.median(sdk_ms) / statistics.median(raw_ms):.2f}x the floor)")  # fmt: skip


async def ask(nc: nats.NATS, verb: str, body: dict[str, Any]) -> Any:
    reply = await nc.request(command_subject("deployer", verb), json.dumps(body).encode(), timeout=30)
    answer = json.loads(reply.data)
    if not answer["ok"]:
        raise RuntimeError(answer["error"])
    return answer["result"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--changes", type=int, default=60)
    args = parser.parse_args()
    configure_logging("bench", "WARNING", False)
    in_process(args.calls)
    folder = Path(tempfile.mkdtemp(prefix="cuneiform-routing-bench-"))
    try:
        asyncio.run(propagation(args.changes, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
