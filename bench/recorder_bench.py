"""Recorder benchmark: how fast the recorder drains the stream, next to the ceilings and a baseline.

Fills a fresh stream with realistic events through the SDK (hundreds of concurrent trajectories,
LLM calls of 2–8 KB), then measures, on the same data in the same run:

  (a) the recorder (its own process, as deployed) draining the stream into PostgreSQL;
  (b) ceiling: raw nats-py fetch + ack of the same messages, no database;
  (c) ceiling: raw asyncpg COPY of the same rows, no NATS;
  (d) baseline: one INSERT per event (the naive recorder), on a sample;

  (e) the archiver (its own process) storing the same stream as zstd segments in S3, next to (b);

then the publish→stored latency at a steady rate with the archiver running beside the recorder (and
the archive's lag meanwhile), the SDK's per-call cost, and the recorder's memory.
Prints a table of figures and ratios; it asserts nothing (machines here are noisy: compare ratios).

    make bench                      # 200,000 events
    make bench ARGS="--events 50000 --rate 1000"
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import nats
import orjson
import psutil
from cuneiform_core.db import load_migrations, migrate, register_json_codecs
from cuneiform_core.topology import TRAJECTORIES, Topology, ensure_topology
from cuneiform_recorder.settings import DEFAULT_REDACTIONS
from cuneiform_recorder.store import TYPED_COLUMNS, Redactor, typed_rows
from cuneiform_sdk import Recorder
from cuneiform_sdk.contract import validate_message
from cuneiform_stack import LocalStack

WORDS = [
    "price",
    "volume",
    "order",
    "book",
    "spread",
    "bid",
    "ask",
    "market",
    "limit",
    "stop",
    "trend",
    "signal",
    "momentum",
    "risk",
    "cash",
]


def text(rng: random.Random, size: int) -> str:
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        out.append(word)
        length += len(word) + 1
    return " ".join(out)


def record_step(t: Any, rng: random.Random, step: int, costs: list[float] | None = None) -> None:
    """One agent step: five record calls. The content is made first, so ``costs`` (µs per call)
    measures only what the SDK costs the agent."""
    environment = {"cash": rng.randint(0, 10_000), "positions": {"ACME": rng.randint(0, 50)}}
    observation = text(rng, 200)
    prices = {s: round(rng.uniform(5, 50), 2) for s in ("ACME", "INIT", "GLOB")}
    messages = [
        {"role": "system", "content": text(rng, 600)},
        {"role": "user", "content": text(rng, rng.randint(1_400, 7_400))},
    ]
    response = {"role": "assistant", "content": text(rng, 120)}
    usage = {"prompt_tokens": rng.randint(400, 2000), "completion_tokens": rng.randint(20, 80)}
    latency, amount, reward = rng.uniform(200, 1500), rng.randint(1, 5), rng.uniform(-1, 1)
    clock = time.perf_counter_ns
    marks = [clock()]
    t.step(step, environment=environment, observation=observation)
    marks.append(clock())
    t.provider_access("prices", prices, query={"n": 3})
    marks.append(clock())
    call_id = t.llm_call(messages=messages, response=response, usage=usage, latency_ms=latency)
    marks.append(clock())
    t.action("buy", {"symbol": "ACME", "n": amount}, success=True, llm_call_id=call_id)
    marks.append(clock())
    t.reward(reward)
    marks.append(clock())
    if costs is not None:
        costs.extend((b - a) / 1000 for a, b in itertools.pairwise(marks))


async def fill(
    recorder: Recorder, events: int, concurrent: int, steps: int, show_progress: bool = True
) -> tuple[int, list[float]]:
    """Record trajectories round-robin, ``concurrent`` open at once; returns events and call costs (µs)."""
    rng = random.Random(7)
    per_trajectory = 2 + steps * 5
    trajectories = max(1, events // per_trajectory)
    costs: list[float] = []
    open_ones: list[tuple[Any, int]] = []
    started = 0
    done = 0
    recorded = 0
    rounds = 0
    while done < trajectories:
        while len(open_ones) < concurrent and started < trajectories:
            t = recorder.trajectory(agent_id=f"agent-{started % 500}", scenario_id=f"s{started % 50}", model="policy")
            t.start()
            open_ones.append((t, 0))
            started += 1
            recorded += 1
        next_round = []
        for t, step in open_ones:
            record_step(t, rng, step, costs)
            recorded += 5
            if step + 1 == steps:
                t.end()
                recorded += 1
                done += 1
            else:
                next_round.append((t, step + 1))
        open_ones = next_round
        await asyncio.sleep(0)  # let the publisher run, as an agent's loop would
        rounds += 1
        if show_progress and rounds % 5 == 0:
            progress(f"  recording: {recorded:,} events, {done:,}/{trajectories:,} trajectories")
    if show_progress:
        print()
    return recorded, costs


_last_progress = 0.0


def progress(line: str) -> None:
    """A live line on a terminal; one line every few seconds when the output goes to a file."""
    global _last_progress
    if sys.stdout.isatty():
        print(f"\r{line}", end="", flush=True)
    elif time.monotonic() - _last_progress > 3:
        _last_progress = time.monotonic()
        print(line, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Row:
    name: str
    rate: float
    note: str = ""


async def create_database(admin_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin_dsn.rsplit("/", 1)[0] + f"/{name}"


#: Segment age for the archiver in the steady run: short enough that several segments roll in it.
ARCHIVE_SEGMENT_AGE_S = 5.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    def __init__(self, env: dict[str, str], service: str = "recorder", **settings: Any) -> None:
        self.port = free_port()
        upper = service.upper()
        env = {
            **env,
            f"CUNEIFORM_{upper}_METRICS_PORT": str(self.port),
            f"CUNEIFORM_{upper}_LOG_LEVEL": "WARNING",
            **{f"CUNEIFORM_{upper}_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name(f"cuneiform-{service}"))], env={**os.environ, **env}
        )
        self.ps = psutil.Process(self.process.pid)

    def metric(self, name: str) -> float:
        """One unlabelled sample of the process's /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 1e6

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


async def consumer_idle(js: Any, stream: str, durable: str) -> tuple[int, int]:
    info = await js.consumer_info(stream, durable)
    return info.num_pending or 0, info.num_ack_pending or 0


async def measure_recorder(env: dict[str, str], js: Any, topology: Topology, total: int) -> tuple[float, list[float]]:
    recorder = ServiceProcess(env)
    while not recorder.ready():
        await asyncio.sleep(0.05)
    started = time.perf_counter()
    stream, durable = topology.stream(TRAJECTORIES), f"{topology.prefix}_recorder"
    rss = [recorder.rss_mb()]
    while True:
        pending, ack_pending = await consumer_idle(js, stream, durable)
        rss.append(recorder.rss_mb())
        done = total - pending - ack_pending
        progress(f"  (a) recorder: {done:,}/{total:,} events stored, RSS {rss[-1]:.0f} MB")
        if pending == 0 and ack_pending == 0:
            break
        await asyncio.sleep(0.2)
    elapsed = time.perf_counter() - started
    print()
    recorder.stop()
    return total / elapsed, rss


async def measure_archiver(env: dict[str, str], js: Any, topology: Topology, total: int) -> tuple[float, int]:
    """(e): the archiver (own process) storing the same stream as zstd segments in S3."""
    # A 1 s segment age: the last, partial segment is stored right after the stream is drained
    # (at the default 60 s the drain time would mostly be the wait for that last segment).
    archiver = ServiceProcess(env, "archiver", segment_max_age_s=1)
    while not archiver.ready():
        await asyncio.sleep(0.05)
    started = time.perf_counter()
    while True:
        done = int(archiver.metric("cuneiform_archiver_last_archived_seq"))
        progress(f"  (e) archiver: {done:,}/{total:,} events in segments")
        if done >= total:
            break
        await asyncio.sleep(0.2)
    elapsed = time.perf_counter() - started
    stored = int(archiver.metric("cuneiform_archiver_segment_bytes_total"))
    print()
    archiver.stop()
    return total / elapsed, stored


async def measure_fetch_ack(js: Any, topology: Topology, total: int) -> tuple[float, list[bytes]]:
    """(b): raw fetch + ack; keeps the bodies for (c) and (d)."""
    stream = topology.stream(TRAJECTORIES)
    sub = await js.pull_subscribe(topology.subject("traj.>"), durable="bench-raw", stream=stream)
    bodies: list[bytes] = []
    started = time.perf_counter()
    while len(bodies) < total:
        msgs = await sub.fetch(1000, timeout=5)
        for msg in msgs:
            bodies.append(msg.data)
            await msg.ack()
    elapsed = time.perf_counter() - started
    return total / elapsed, bodies


def rows_of(bodies: list[bytes]) -> dict[str, list[tuple[Any, ...]]]:
    """The rows the recorder writes for these events — its own ``typed_rows`` plus the ledger —
    built outside the timing, so (c) copies exactly what (a) stores."""
    events: list[Any] = [validate_message(orjson.loads(body)) for body in bodies]
    ledger = [(e.event_id, e.trajectory_id, e.seq, e.type, e.occurred_at) for e in events]
    return {"events": ledger, **typed_rows(events, Redactor(DEFAULT_REDACTIONS))}


COLUMNS = {"events": ["event_id", "trajectory_id", "seq", "type", "occurred_at"], **TYPED_COLUMNS}


async def fresh_recorder_schema(admin_dsn: str, name: str) -> asyncpg.Connection:
    dsn = await create_database(admin_dsn, name)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "recorder"})
    await migrate(conn, "recorder", load_migrations("cuneiform_recorder.migrations"))
    await register_json_codecs(conn)  # the recorder's codecs: jsonb values go in as the recorder sends them
    return conn


async def measure_copy(admin_dsn: str, tables: dict[str, list[tuple[Any, ...]]], total: int) -> float:
    """(c): COPY every row in one transaction, with no NATS and no per-event work."""
    conn = await fresh_recorder_schema(admin_dsn, "bench_copy")
    try:
        started = time.perf_counter()
        async with conn.transaction():
            for table, rows in tables.items():
                await conn.copy_records_to_table(table, records=rows, columns=COLUMNS[table], schema_name="recorder")
        return total / (time.perf_counter() - started)
    finally:
        await conn.close()


async def measure_naive(admin_dsn: str, tables: dict[str, list[tuple[Any, ...]]], sample: int) -> float:
    """(d): one INSERT per event, each its own transaction (ledger row + typed row)."""
    conn = await fresh_recorder_schema(admin_dsn, "bench_naive")
    typed = {row[0]: (table, row) for table, rows in tables.items() if table != "events" for row in rows}
    ledger = tables["events"][:sample]
    try:
        started = time.perf_counter()
        for event in ledger:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO recorder.events (event_id, trajectory_id, seq, type, occurred_at) VALUES ($1,$2,$3,$4,$5) ON CONFLICT DO NOTHING",
                    *event,
                )
                if event[0] in typed:
                    table, row = typed[event[0]]
                    columns = COLUMNS[table]
                    values = ", ".join(f"${n}" for n in range(1, len(columns) + 1))
                    await conn.execute(
                        f"INSERT INTO recorder.{table} ({', '.join(columns)}) VALUES ({values}) ON CONFLICT DO NOTHING",
                        *row,
                    )
        return len(ledger) / (time.perf_counter() - started)
    finally:
        await conn.close()


async def measure_latency(
    env: dict[str, str], nats_url: str, prefix: str, admin_dsn: str, rate: int, seconds: float, outbox: Path
) -> tuple[float, float, int, list[int]]:
    """Steady ``rate`` events/s through the SDK into a running recorder (and archiver); latency =
    stored − recorded; also the archive's lag samples."""
    recorder_proc = ServiceProcess(env)
    # The archiver runs beside it, as deployed; its lag (events in the stream, not yet in a stored
    # segment) is sampled throughout.
    archiver = ServiceProcess(env, "archiver", segment_max_age_s=ARCHIVE_SEGMENT_AGE_S)
    while not (recorder_proc.ready() and archiver.ready()):
        await asyncio.sleep(0.05)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    lags: list[int] = []

    async def sample_lag() -> None:
        stream = Topology(prefix).stream(TRAJECTORIES)
        while True:
            last = (await js.stream_info(stream)).state.last_seq
            lags.append(max(0, last - int(archiver.metric("cuneiform_archiver_last_archived_seq"))))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample_lag())
    sdk = Recorder(nats_url, prefix=prefix, outbox_dir=outbox)
    await sdk.start()
    rng = random.Random(11)
    interval = 5 / rate  # one step = five events
    t = None
    step = 0
    started = time.perf_counter()
    next_at = started
    sent = 0
    while time.perf_counter() - started < seconds:
        if t is None or step == 20:
            if t is not None:
                t.end()
                sent += 1
            t = sdk.trajectory(agent_id=f"steady-{sent % 50}", scenario_id="steady", model="policy")
            t.start()
            step = 0
            sent += 1
        record_step(t, rng, step)
        step += 1
        sent += 5
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    if t is not None:
        t.end()
    await sdk.flush(30)
    await sdk.close()
    await asyncio.sleep(2)
    sampler.cancel()
    await nc.close()
    archiver.stop()
    recorder_proc.stop()
    conn = await asyncpg.connect(env["CUNEIFORM_PG_DSN"])
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM received_at - occurred_at) * 1000 AS ms FROM recorder.events WHERE trajectory_id IN "
            "(SELECT trajectory_id FROM recorder.trajectories WHERE scenario_id = 'steady')"
        )
    finally:
        await conn.close()
    latencies = [float(r["ms"]) for r in rows]
    return percentile(latencies, 0.5), percentile(latencies, 0.99), len(latencies), lags


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--concurrent", type=int, default=400, help="trajectories open at once")
    parser.add_argument("--naive-sample", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=2_000, help="events/s for the latency run")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="cuneiform-bench-"))
    print(f"starting a fresh embedded stack in {folder} …")
    stack = LocalStack(folder / "stack", env_file=folder / "stack.env")
    endpoints = stack.start()
    try:
        prefix = "bench" + uuid.uuid4().hex[:6]
        topology = Topology(prefix, storage_gib=4.0)
        dsn = await create_database(endpoints.pg_dsn, "bench_recorder")
        env = {
            **endpoints.as_env(),
            "CUNEIFORM_ENV_FILE": str(folder / "none.env"),
            "CUNEIFORM_NATS_PREFIX": prefix,
            "CUNEIFORM_NATS_STORAGE_GIB": "4",
            "CUNEIFORM_PG_DSN": dsn,
        }
        nc = await nats.connect(endpoints.nats_url)
        js = nc.jetstream()
        await ensure_topology(js, topology)

        print(
            f"filling the stream with ~{args.events:,} events through the SDK ({args.concurrent} trajectories at once) …"
        )
        sdk = Recorder(endpoints.nats_url, prefix=prefix, outbox_dir=folder / "outbox", max_buffer=1_000_000)
        await sdk.start()
        fill_started = time.perf_counter()
        total, costs = await fill(sdk, args.events, args.concurrent, steps=20)
        assert await sdk.flush(600), "the SDK could not deliver everything"
        fill_rate = total / (time.perf_counter() - fill_started)
        await sdk.close()
        info = await js.stream_info(topology.stream(TRAJECTORIES))
        assert info.state.messages == total, f"stream holds {info.state.messages}, recorded {total}"
        print(f"  stream: {info.state.messages:,} messages, {info.state.bytes / 1e6:,.0f} MB")

        recorder_rate, rss = await measure_recorder(env, js, topology, total)
        archiver_rate, archive_bytes = await measure_archiver(env, js, topology, total)
        print("  (b) raw fetch + ack …")
        fetch_rate, bodies = await measure_fetch_ack(js, topology, total)
        tables = rows_of(bodies)
        print("  (c) raw COPY …")
        copy_rate = await measure_copy(endpoints.pg_dsn, tables, total)
        print(f"  (d) one INSERT per event, {args.naive_sample:,} events …")
        naive_rate = await measure_naive(endpoints.pg_dsn, tables, args.naive_sample)
        await nc.close()

        print(f"  latency: {args.rate:,} events/s for {args.latency_seconds:.0f} s …")
        latency_prefix = "lat" + uuid.uuid4().hex[:6]
        await ensure_topology_for(endpoints.nats_url, Topology(latency_prefix, storage_gib=1.0))
        latency_dsn = await create_database(endpoints.pg_dsn, "bench_latency")
        p50, p99, samples, lags = await measure_latency(
            {
                **env,
                "CUNEIFORM_NATS_PREFIX": latency_prefix,
                "CUNEIFORM_NATS_STORAGE_GIB": "1",
                "CUNEIFORM_PG_DSN": latency_dsn,
            },
            endpoints.nats_url,
            latency_prefix,
            endpoints.pg_dsn,
            args.rate,
            args.latency_seconds,
            folder / "outbox-latency",
        )

        ceiling = min(fetch_rate, copy_rate)
        print()
        print(
            f"Recorder benchmark — {total:,} events ({info.state.bytes / total:,.0f} B average), 2 cores, one process each"
        )
        print(f"{'':<44}{'events/s':>12}{'ratio':>10}")
        print(f"{'(a) recorder drain (own process)':<44}{recorder_rate:>12,.0f}{'':>10}")
        print(f"{'(b) ceiling: nats-py fetch + ack':<44}{fetch_rate:>12,.0f}{recorder_rate / fetch_rate:>10.2f}")
        print(
            f"{'(c) ceiling: asyncpg COPY of the same rows':<44}{copy_rate:>12,.0f}{recorder_rate / copy_rate:>10.2f}"
        )
        print(f"{'(d) baseline: one INSERT per event':<44}{naive_rate:>12,.0f}{recorder_rate / naive_rate:>10.1f}x")
        print(
            f"{'(e) archiver drain to zstd segments in S3':<44}{archiver_rate:>12,.0f}{archiver_rate / fetch_rate:>10.2f}"
        )
        print(f"{'SDK fill rate (record → acked by stream)':<44}{fill_rate:>12,.0f}")
        print()
        print(f"recorder / min(b, c) = {recorder_rate / ceiling:.2f}  (target ≥ 0.5)")
        print(f"recorder / (d)       = {recorder_rate / naive_rate:.1f}  (target ≥ 6)")
        print(
            f"publish→stored latency at {args.rate:,} events/s: p50 {p50:.0f} ms, p99 {p99:.0f} ms over {samples:,} events  (target p99 ≤ 250 ms)"
        )
        print(
            f"SDK record call: median {statistics.median(costs):.1f} µs, p99 {percentile(costs, 0.99):.1f} µs  (target ≤ 20 / ≤ 200)"
        )
        print(
            f"archiver / (b) = {archiver_rate / fetch_rate:.2f}; segments: {archive_bytes / 1e6:,.1f} MB for "
            f"{info.state.bytes / 1e6:,.0f} MB of stream ({info.state.bytes / max(1, archive_bytes):.1f}x smaller)"
        )
        bound = args.rate * ARCHIVE_SEGMENT_AGE_S
        print(
            f"archive lag beside the recorder at {args.rate:,} events/s (segments every {ARCHIVE_SEGMENT_AGE_S:.0f} s): "
            f"p50 {percentile([float(x) for x in lags], 0.5):,.0f}, max {max(lags):,} events "
            f"({max(lags) / args.rate:.1f} s of traffic; bound by design: rate × segment age = {bound:,.0f} + one flush)"
        )
        third = max(1, len(rss) // 3)
        print(
            f"recorder RSS: start {rss[0]:.0f} MB, after a third {rss[third]:.0f} MB, end {rss[-1]:.0f} MB, max {max(rss):.0f} MB"
        )
    finally:
        stack.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def ensure_topology_for(url: str, topology: Topology) -> None:
    nc = await nats.connect(url)
    try:
        await ensure_topology(nc.jetstream(), topology)
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
