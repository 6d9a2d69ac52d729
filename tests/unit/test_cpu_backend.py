"""The CPU GRPO backend learns from data shaped exactly like the archiver's ART export: the demo's own
episodes, each decision rendered by the demo (``decide``) and stitched by the archiver
(``art_trajectory``), grouped by scenario. Trained on them, the policy earns more on held-out markets."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

import pytest
from cuneiform_archiver.datasets import art_trajectory
from cuneiform_demo.environment import Episode, make_scenario, scenario_seed
from cuneiform_demo.policy import TabularPolicy, decide
from cuneiform_trainer.backends.cpu import (
    decisions,
    evaluate,
    parse_groups,
    read_decisions,
    train,
    train_dataset,
    training_seeds,
)

RUN_SEED = 1


def recorded_trajectory(policy: TabularPolicy, seed: int, rng: random.Random) -> tuple[dict[str, Any], list[Any]]:
    """One episode as the archiver exports it, and the (trend, action) pairs actually played."""
    scenario = make_scenario(seed)
    episode = Episode(scenario)
    calls, played = [], []
    while not episode.done:
        observation = episode.observe()
        decision = decide(policy, observation, rng)
        calls.append(decision.llm_call_fields())
        played.append((observation.trend, decision.action))
        episode.act(decision.action)
    row = {
        "trajectory_id": uuid.UUID(int=rng.getrandbits(128)),
        "agent_id": "agent-0",
        "scenario_id": scenario.scenario_id,
        "episode_id": 0,
        "model_name": policy.name,
        "model_version": policy.version,
        "deployment_id": None,
        "status": "completed",
        "total_reward": episode.total_reward,
        "reward_sum": episode.total_reward,
        "metrics": episode.metrics(),
        "started_at": None,
        "ended_at": None,
        "error": None,
    }
    return art_trajectory(row, calls, [], []), played


def dataset(policy: TabularPolicy, groups: int, size: int, seed: int = 1) -> list[dict[str, Any]]:
    """``groups`` ART groups: ``size`` episodes of one scenario each (different sampling draws)."""
    rng = random.Random(seed)
    found = []
    for g in range(groups):
        scenario = make_scenario(scenario_seed(RUN_SEED, 0, g))
        trajectories = [recorded_trajectory(policy, scenario.seed, rng)[0] for _ in range(size)]
        found.append({"trajectories": trajectories, "metadata": {"scenario_id": scenario.scenario_id}})
    return found


def test_every_recorded_decision_is_read_back() -> None:
    trajectory, played = recorded_trajectory(TabularPolicy(), scenario_seed(RUN_SEED, 0, 0), random.Random(0))
    # The demo's calls are independent prompts: the archiver exports one history per decision.
    assert len(trajectory["additional_histories"]) == 7
    assert decisions(trajectory) == played and len(played) == 8
    assert read_decisions(trajectory) == (played, 0)


def test_unreadable_choices_are_skipped_and_counted() -> None:
    trajectory, played = recorded_trajectory(TabularPolicy(), 3, random.Random(0))
    broken = json.loads(json.dumps(trajectory))
    broken["messages_and_choices"][-1]["message"]["tool_calls"] = []  # a choice with no trade call
    broken["additional_histories"][0]["messages_and_choices"][1]["content"] = "no signal here"
    assert read_decisions(broken) == (played[2:], 2)


def test_grpo_raises_the_held_out_reward() -> None:
    start = TabularPolicy()
    groups = dataset(start, groups=40, size=6)
    reported: list[tuple[int, dict[str, float]]] = []
    result = train(groups, start, version="v2", progress=lambda step, m: reported.append((step, m)))
    held_out = training_seeds(groups)
    assert len(held_out) == 40
    before = evaluate(start, episodes=400, seed=50_000, exclude=held_out)
    after = evaluate(result.policy, episodes=400, seed=50_000, exclude=held_out)
    assert result.metrics["groups_used"] == 40 and result.metrics["decisions"] == 40 * 6 * 8
    assert result.metrics["unreadable_decisions"] == 0
    # Following the trend is what pays in this market: GRPO must have found that from the groups alone.
    assert after > before + 2.0, (before, after)
    assert result.policy.probabilities("up")["buy"] > start.probabilities("up")["buy"]
    assert result.policy.probabilities("down")["sell"] > start.probabilities("down")["sell"]
    assert result.policy.version == "v2" and start.version == "v1"  # the start policy is untouched
    assert [step for step, _ in reported] == list(range(1, 5))  # one report per epoch (4 by default)
    assert set(reported[0][1]) == {"epoch", "loss", "mean_abs_advantage", "mean_reward", "decisions"}
    assert reported[-1][1]["loss"] < reported[0][1]["loss"]  # the surrogate loss went down


def test_groups_without_a_reward_spread_teach_nothing() -> None:
    start = TabularPolicy()
    flat = dataset(start, groups=3, size=4)
    for group in flat:
        for trajectory in group["trajectories"]:
            trajectory["reward"] = 1.0
    single = dataset(start, groups=1, size=1, seed=2)  # one trajectory: no peers to compare with
    result = train(flat + single, start, version="v2")
    assert result.policy.logits == start.logits
    assert result.metrics["groups_skipped"] == 4 and result.metrics["decisions"] == 0


def test_the_artifact_is_deterministic_bytes() -> None:
    start = TabularPolicy()
    art = "\n".join(json.dumps(g) for g in dataset(start, groups=5, size=4)).encode()
    assert len(parse_groups(art)) == 5
    first, metrics = train_dataset(art, start.to_json(), "v2", epochs=10, seed=3)
    second, again = train_dataset(art, start.to_json(), "v2", epochs=10, seed=3)
    assert first == second and metrics == again
    trained = TabularPolicy.loads(first.decode())
    assert trained.version == "v2" and trained.logits != start.logits and metrics["groups_used"] == 5
    assert train_dataset(art, None, "v2", epochs=10, seed=3)[0] == first  # None: the demo's initial policy
    assert train_dataset(art, None, "v2", epochs=10, seed=4)[0] != first  # the seed orders the minibatches
    full_batch, _ = train_dataset(art, None, "v2", epochs=10, batch_size=0)
    assert full_batch == train_dataset(art, None, "v2", epochs=10, batch_size=0, seed=4)[0] != first


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        train_dataset(b"", None, "v2", momentum=0.9)
    with pytest.raises(ValueError, match="epochs must be int"):
        train_dataset(b"", None, "v2", epochs=2.5)
    with pytest.raises(ValueError, match="line 2"):
        parse_groups(b'{"trajectories": []}\n{not json')
