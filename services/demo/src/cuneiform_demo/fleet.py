"""A simulated fleet: N trading agents playing episodes concurrently, recording through the SDK.

Agents are split into groups; in each round (episode) every group plays its own scenario, so the
several agents of a group face the same market — a GRPO group whose rewards differ only by choice.
Decisions come from :mod:`cuneiform_demo.policy` (a tabular stand-in for an LLM) and are recorded
exactly as a real tool-using agent's would be: step, provider access, llm_call, action, reward, and
the trajectory's end with its metrics.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cuneiform_sdk import ModelRef, Recorder

from .environment import DEFAULT_STEPS, SYMBOL, Episode, Scenario, make_scenario, scenario_seed
from .policy import TabularPolicy, decide

#: Events one trajectory sends: trajectory_started, five per step, trajectory_ended.
EVENTS_PER_STEP = 5


@dataclass(frozen=True)
class FleetPlan:
    agents: int
    episodes: int
    seed: int
    run_id: str
    group_size: int = 4
    steps: int = DEFAULT_STEPS
    #: Simulated thinking time per decision (seconds), so that agents interleave as real ones do.
    step_delay: float = 0.05
    #: What the episodes are for (in each trajectory's metadata): ``learn`` (training data), ``rollout``.
    phase: str = "learn"

    def __post_init__(self) -> None:
        if self.agents < 1 or self.episodes < 1 or self.steps < 1 or self.group_size < 1:
            raise ValueError("agents, episodes, steps and group size must be at least 1")

    @property
    def groups(self) -> int:
        """Groups per round; agents are dealt round-robin so that groups differ in size by one at most."""
        return math.ceil(self.agents / self.group_size)

    @property
    def trajectories(self) -> int:
        return self.agents * self.episodes

    @property
    def events_per_trajectory(self) -> int:
        return 2 + EVENTS_PER_STEP * self.steps

    def agent_id(self, agent: int) -> str:
        return f"demo-trader-{agent + 1:0{max(2, len(str(self.agents)))}d}"

    def scenario(self, episode: int, agent: int) -> Scenario:
        return make_scenario(scenario_seed(self.seed, episode, agent % self.groups), self.steps)


@dataclass
class FleetResult:
    trajectory_ids: list[uuid.UUID] = field(default_factory=list)
    #: Total reward of each trajectory, by scenario id, and by the model version that played it.
    rewards: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    by_version: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    started: int = 0
    ended: int = 0
    events: int = 0
    running_agents: int = 0


#: Which policy an agent plays its next episode with, and the model reference to stamp on it (from routing).
Chooser = Callable[[str], Awaitable[tuple[TabularPolicy, ModelRef]]]


def fixed(policy: TabularPolicy) -> Chooser:
    """Every agent plays ``policy``."""

    async def choose(_: str) -> tuple[TabularPolicy, ModelRef]:
        return policy, ModelRef(**policy.model)

    return choose


async def run_fleet(recorder: Recorder, choose: Chooser, plan: FleetPlan, result: FleetResult) -> FleetResult:
    """Play every agent's episodes concurrently; ``result`` fills in as they go (read it for progress)."""

    async def agent(index: int) -> None:
        rng = random.Random(f"cuneiform-demo-agent:{plan.seed}:{index}")
        result.running_agents += 1
        try:
            for episode_number in range(plan.episodes):
                await play_episode(recorder, choose, plan, index, episode_number, rng, result)
        finally:
            result.running_agents -= 1

    await asyncio.gather(*(agent(i) for i in range(plan.agents)))
    return result


async def play_episode(
    recorder: Recorder,
    choose: Chooser,
    plan: FleetPlan,
    agent: int,
    episode_number: int,
    rng: random.Random,
    result: FleetResult,
) -> None:
    scenario = plan.scenario(episode_number, agent)
    episode = Episode(scenario)
    agent_id = plan.agent_id(agent)
    # Asked before every episode: a rollout or a rollback reaches the agent at its next episode.
    policy, model = await choose(agent_id)
    async with recorder.trajectory(
        agent_id=agent_id,
        scenario_id=scenario.scenario_id,
        episode_id=f"{plan.run_id}:{agent_id}:{episode_number}",
        model=model,
        environment=episode.state(),
        metadata={
            "run_id": plan.run_id,
            "source": "cuneiform-demo",
            "scenario_seed": scenario.seed,
            "episode": episode_number,
            "phase": plan.phase,
            "policy": "tabular-softmax stand-in for an LLM",
        },
    ) as t:
        result.trajectory_ids.append(t.trajectory_id)
        result.started += 1
        result.events += 1
        while not episode.done:
            observation = episode.observe()
            t.step(environment=episode.state(), observation=observation.to_json())
            t.provider_access(
                "market",
                episode.market.quote(observation.step),
                query={"symbol": SYMBOL, "window": 4},
            )
            decision = decide(policy, observation, rng)
            call_id = t.llm_call(**decision.llm_call_fields())
            outcome = episode.act(decision.action)
            t.action(
                "trade",
                {"action": decision.action},
                success=True,
                result={
                    "position": outcome.position,
                    "price_before": outcome.price_before,
                    "price_after": outcome.price_after,
                },
                llm_call_id=call_id,
                reward=outcome.reward,
            )
            move = episode.market.move(outcome.step)
            t.reward(outcome.reward, reason=f"position {outcome.position:+d} times price move {move:+.2f}")
            result.events += EVENTS_PER_STEP
            await asyncio.sleep(plan.step_delay * rng.uniform(0.5, 1.5))
        t.end("completed", total_reward=episode.total_reward, metrics=episode.metrics(), environment=episode.state())
    result.rewards[scenario.scenario_id].append(episode.total_reward)
    result.by_version[model.version or "?"].append(episode.total_reward)
    result.events += 1
    result.ended += 1
