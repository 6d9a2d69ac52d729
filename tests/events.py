"""Agent events as any producer (in any language) publishes them: raw contract JSON on
``traj.<agent>.<type>`` with ``Nats-Msg-Id``. Shared by the fault, archiver and end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from datetime import UTC, datetime
from typing import Any

from cuneiform_sdk.subjects import trajectory_subject
from nats.js import JetStreamContext

#: Events per trajectory: started, 2 x (step, llm_call, action, reward), ended.
EVENTS_PER_TRAJECTORY = 10
STEPS = 2

_WORDS = ("ACME", "opened", "at", "12.50,", "volume", "rising;", "analysts", "expect", "a", "rebound")


# --- events, as an agent in any language would publish them ------------------------------------------------


def raw_event(trajectory_id: uuid.UUID, agent: str, seq: int, event_type: str, **fields: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "event_id": str(uuid.uuid4()),
        "type": event_type,
        "trajectory_id": str(trajectory_id),
        "agent_id": agent,
        "seq": seq,
        "occurred_at": datetime.now(UTC).isoformat(),
        **fields,
    }


def _prose(rng: random.Random, size: int) -> str:
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


def trajectory(rng: random.Random, agent: str) -> list[dict[str, Any]]:
    """One whole episode: its llm_calls carry a 2-4 KB prompt each, as real ones do."""
    tid = uuid.uuid4()
    events = [
        raw_event(
            tid,
            agent,
            0,
            "trajectory_started",
            scenario_id=f"market-{rng.randrange(5)}",
            model={"name": "policy", "version": "v7", "deployment_id": "d1"},
            environment={"cash": 1000},
        )
    ]
    total = 0.0
    for step in range(STEPS):
        seq = len(events)
        call_id = f"call-{step}"
        reward = round(rng.uniform(-1, 1), 3)
        total += reward
        events += [
            raw_event(
                tid, agent, seq, "step", step=step, environment={"cash": 1000 - step}, observation=f"tick {step}"
            ),
            raw_event(
                tid,
                agent,
                seq + 1,
                "llm_call",
                step=step,
                call_id=call_id,
                model="policy-v7",
                messages=[
                    {"role": "system", "content": "You trade ACME. Answer with one tool call."},
                    {"role": "user", "content": _prose(rng, rng.randrange(2048, 4096))},
                ],
                response={
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": call_id, "type": "function", "function": {"name": "buy", "arguments": '{"n": 1}'}}
                    ],
                },
                usage={"prompt_tokens": 800, "completion_tokens": 12},
                latency_ms=420.0,
            ),
            raw_event(tid, agent, seq + 2, "action", step=step, action_type="buy", parameters={"n": 1}, success=True),
            raw_event(tid, agent, seq + 3, "reward", step=step, value=reward),
        ]
    events.append(
        raw_event(
            tid,
            agent,
            len(events),
            "trajectory_ended",
            status="completed",
            total_reward=round(total, 3),
            event_count=len(events) + 1,
        )
    )
    assert len(events) == EVENTS_PER_TRAJECTORY
    return events


def interleaved(trajectories: list[list[dict[str, Any]]], agents: int = 100) -> list[dict[str, Any]]:
    """The events as ``agents`` agents running at once publish them: each trajectory in order, the
    trajectories of one wave interleaved event by event, one wave after the other."""
    events: list[dict[str, Any]] = []
    for start in range(0, len(trajectories), agents):
        wave = trajectories[start : start + agents]
        events += [t[n] for n in range(EVENTS_PER_TRAJECTORY) for t in wave]
    return events


async def publish_events(js: JetStreamContext, prefix: str, events: list[dict[str, Any]], window: int = 256) -> None:
    """Publish and wait for every stream ack, ``window`` publishes in flight at a time."""

    async def one(event: dict[str, Any]) -> None:
        subject = trajectory_subject(event["agent_id"], event["type"], prefix)
        await js.publish(subject, json.dumps(event).encode(), headers={"Nats-Msg-Id": event["event_id"]}, timeout=30)

    for start in range(0, len(events), window):
        await asyncio.gather(*(one(e) for e in events[start : start + window]))


# --- the recorder as a process -------------------------------------------------------------------------------
