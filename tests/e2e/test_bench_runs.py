"""The benchmarks are user-facing commands (`make bench`, `make bench-datasets`, `make bench-routing`): they must run and print
their tables. This checks that they work on a small load; it asserts nothing about speed (figures come
from the make targets)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(*args: str, expect: tuple[str, ...]) -> None:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "CUNEIFORM_ENV_FILE": "/nonexistent/stack.env"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in expect:
        assert line in result.stdout, f"{line!r} missing from the benchmark's output:\n{result.stdout[-3000:]}"


def test_the_recorder_benchmark_runs_and_prints_its_figures() -> None:
    run_benchmark(
        "bench/recorder_bench.py",
        *("--events", "2000", "--latency-seconds", "1", "--naive-sample", "200"),
        expect=(
            "(a) recorder drain (own process)",
            "(b) ceiling: nats-py fetch + ack",
            "(c) ceiling: asyncpg COPY of the same rows",
            "(d) baseline: one INSERT per event",
            "(e) archiver drain to zstd segments in S3",
            "archive lag beside the recorder",
            "recorder / min(b, c) =",
            "publish→stored latency",
            "SDK record call: median",
            "recorder RSS:",
        ),
    )


def test_the_dataset_benchmark_runs_and_prints_its_figures() -> None:
    run_benchmark(
        "bench/dataset_bench.py",
        "--quick",
        expect=(
            "(a) export: art.jsonl + openai_chat.jsonl + manifest",
            "(b) baseline: SELECT the same rows + orjson.dumps",
            "export ÷ raw =",
        ),
    )


def test_the_routing_benchmark_runs_and_prints_its_figures() -> None:
    run_benchmark(
        "bench/routing_bench.py",
        *("--calls", "2000", "--changes", "5"),
        expect=(
            "(a) which version for this agent?",
            "sha256 of the key alone (baseline)",
            "Routing.model_for(model, agent)",
            "command → raw nats-py KV watcher sees it (floor)",
            "command → SDK Routing client sees it",
        ),
    )
