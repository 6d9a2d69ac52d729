"""The CPU GRPO backend learns: trained on ART groups of the demo's own episodes, its policy earns more
on held-out markets than the policy it started from."""

from __future__ import annotations

import json
import random
from typing import Any

from cuneiform_archiver.datasets import conversations
from cuneiform_demo.environment import Episode, make_scenario
from cuneiform_demo.policy import TRADE_TOOL, TabularPolicy, chat_messages, tool_call_response
from cuneiform_trainer.backends.grpo_cpu import decisions, evaluate, train, train_dataset


def recorded_trajectory(policy: TabularPolicy, seed: int, rng: random.Random) -> dict[str, Any]:
    """One episode as the archiver exports it: one chat call per decision, stitched the archiver's way."""
    episode = Episode(make_scenario(seed))
    calls = []
    while not episode.done:
        observation = episode.observe()
        action = policy.sample(observation.trend, rng)
        calls.append(
            {
                "messages": chat_messages(observation),
                "tools": [TRADE_TOOL],
                "response": tool_call_response(action, f"call-{observation.step}"),
                "logprobs": None,
            }
        )
        episode.act(action)
    found = conversations(calls)
    return {
        "messages_and_choices": found[0].items,
        "tools": found[0].tools,
        "additional_histories": [{"messages_and_choices": c.items, "tools": c.tools} for c in found[1:]],
        "reward": episode.total_reward,
    }


def dataset(policy: TabularPolicy, groups: int, size: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"trajectories": [recorded_trajectory(policy, 1000 + g, rng) for _ in range(size)]} for g in range(groups)]


def test_every_recorded_decision_is_read_back() -> None:
    trajectory = recorded_trajectory(TabularPolicy(), 7, random.Random(0))
    pairs, unreadable = decisions(trajectory)
    assert len(pairs) == 8 and unreadable == 0  # one per step of the demo's 8-step episodes
    assert {trend for trend, _ in pairs} <= {"up", "down", "flat"}


def test_grpo_raises_the_held_out_reward() -> None:
    start = TabularPolicy()
    result = train(dataset(start, groups=40, size=6), start, version="v2")
    before = evaluate(start, episodes=400, seed=50_000)
    after = evaluate(result.policy, episodes=400, seed=50_000)
    assert result.metrics["groups_used"] == 40 and result.metrics["decisions"] == 40 * 6 * 8
    # Following the trend is what pays in this market: GRPO must have found that from the groups alone.
    assert after > before + 0.5, (before, after)
    assert result.policy.probabilities("up")["buy"] > start.probabilities("up")["buy"]
    assert result.policy.probabilities("down")["sell"] > start.probabilities("down")["sell"]


def test_groups_without_a_reward_spread_teach_nothing() -> None:
    start = TabularPolicy()
    flat = dataset(start, groups=3, size=4)
    for group in flat:
        for trajectory in group["trajectories"]:
            trajectory["reward"] = 1.0
    result = train(flat, start, version="v2")
    assert result.policy.logits == start.logits
    assert result.metrics["groups_skipped"] == 3 and result.metrics["decisions"] == 0


def test_the_artifact_is_deterministic_bytes() -> None:
    start = TabularPolicy()
    art = "\n".join(json.dumps(g) for g in dataset(start, groups=5, size=4)).encode()
    first, metrics = train_dataset(art, start.to_json(), version="v2")
    second, _ = train_dataset(art, start.to_json(), version="v2")
    assert first == second
    trained = TabularPolicy.loads(first.decode())
    assert trained.version == "v2" and metrics["groups_used"] == 5
