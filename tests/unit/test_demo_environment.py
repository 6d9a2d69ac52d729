"""The demo's trading environment and its tabular stand-in policy: pure, seeded, choice-dependent."""

from __future__ import annotations

import random

import pytest
from cuneiform_demo.environment import (
    ACTIONS,
    Episode,
    Observation,
    generate_market,
    make_scenario,
    play,
    scenario_seed,
)
from cuneiform_demo.fleet import FleetPlan
from cuneiform_demo.policy import TabularPolicy, decide, parse_tool_call
from cuneiform_sdk.contract import LlmCall

SEEDS = range(200)


def follow(observation: Observation) -> str:
    return {"up": "buy", "down": "sell", "flat": "hold"}[observation.trend]


def oppose(observation: Observation) -> str:
    return {"up": "sell", "down": "buy", "flat": "hold"}[observation.trend]


def test_episodes_are_deterministic_per_seed() -> None:
    assert generate_market(42) == generate_market(42)
    assert generate_market(42) != generate_market(43)
    scenario = make_scenario(42)
    assert play(scenario, follow) == play(make_scenario(42), follow)
    assert scenario_seed(7, 0, 1) == scenario_seed(7, 0, 1) != scenario_seed(7, 1, 1)
    market = generate_market(42)
    assert market.steps == 8 and len(market.prices) == 9


def test_the_reward_depends_on_the_choices() -> None:
    scenarios = [make_scenario(seed) for seed in SEEDS]
    following = [play(s, follow) for s in scenarios]
    opposing = [play(s, oppose) for s in scenarios]
    holding = [play(s, lambda _: "hold") for s in scenarios]
    assert sum(following) / len(SEEDS) > 3.0  # about +1 a trending step
    assert sum(opposing) / len(SEEDS) < -3.0
    assert holding == [0.0] * len(SEEDS)
    # Not merely on average: within one scenario (a GRPO group) the choice alone makes the difference.
    assert sum(f > o for f, o in zip(following, opposing, strict=True)) > 0.9 * len(SEEDS)


def test_a_step_pays_position_times_the_next_move() -> None:
    market = generate_market(5)
    for step in range(market.steps):
        move = round(market.prices[step + 1] - market.prices[step], 2)
        assert market.reward(step, "buy") == pytest.approx(move)
        assert market.reward(step, "sell") == pytest.approx(-move)
        assert market.reward(step, "hold") == 0.0
    with pytest.raises(ValueError, match="unknown action"):
        market.reward(0, "short")


def test_an_episode_keeps_its_account() -> None:
    episode = Episode(make_scenario(9))
    actions = []
    while not episode.done:
        actions.append(follow(episode.observe()))
        episode.act(actions[-1])
    assert episode.total_reward == pytest.approx(sum(o.reward for o in episode.outcomes))
    metrics = episode.metrics()
    assert metrics["steps"] == 8 and metrics["followed_trend"] == 8
    assert metrics["buys"] + metrics["sells"] + metrics["holds"] == 8
    with pytest.raises(RuntimeError):
        episode.act("buy")


def test_agents_of_a_group_share_the_market_and_groups_differ() -> None:
    plan = FleetPlan(agents=6, episodes=2, seed=1, run_id="t")
    assert plan.groups == 2
    assert plan.scenario(0, 0) == plan.scenario(0, 2) == plan.scenario(0, 4)
    assert plan.scenario(0, 0) != plan.scenario(0, 1)
    assert plan.scenario(0, 0) != plan.scenario(1, 0)
    assert plan.events_per_trajectory == 42


def test_the_policy_is_seeded_serializable_and_renders_a_valid_tool_call() -> None:
    policy = TabularPolicy()
    restored = TabularPolicy.loads(policy.dumps())
    assert restored == policy
    probabilities = policy.probabilities("up")
    assert sum(probabilities.values()) == pytest.approx(1.0)
    assert max(probabilities, key=probabilities.__getitem__) == "buy"

    observation = generate_market(3).observation(0)
    decision = decide(policy, observation, random.Random(11))
    assert decide(policy, observation, random.Random(11)).response == decision.response  # seeded
    assert decision.action in ACTIONS
    assert parse_tool_call(decision.response) == decision.action
    # The rendered call is a valid contract llm_call (chat form, tool call, tools, usage, logprobs).
    LlmCall(
        v=1,
        event_id="00000000-0000-7000-8000-000000000000",
        trajectory_id="00000000-0000-7000-8000-000000000001",
        agent_id="a",
        seq=1,
        occurred_at="2026-01-01T00:00:00Z",
        step=0,
        call_id="c",
        model=policy.name,
        **decision.llm_call_fields(),
    )


def test_a_policy_that_follows_the_trend_samples_mostly_the_trend() -> None:
    logits = {t: {a: 0.0 for a in ACTIONS} for t in ("up", "down", "flat")}
    logits["up"]["buy"] = logits["down"]["sell"] = logits["flat"]["hold"] = 5.0
    trained = TabularPolicy(logits=logits, version="v2")
    rng = random.Random(0)
    scenarios = [make_scenario(seed) for seed in SEEDS]
    trained_total = sum(play(s, lambda o: trained.sample(o.trend, rng)) for s in scenarios)
    initial_total = sum(play(s, lambda o: TabularPolicy().sample(o.trend, rng)) for s in scenarios)
    assert trained_total > initial_total > 0
