"""A small trading game whose reward depends on the agent's choices; deterministic given a seed.

Each episode is one market of ``steps`` price moves. Before every move the agent sees a market
signal — the current trend (``up``, ``down`` or ``flat``) — and the price so far (noisy: the trend
sets the drift of each move, noise is added on top), and picks its position for the next move:

* ``buy``  — long one share  (position +1),
* ``sell`` — short one share (position -1),
* ``hold`` — no position     (position  0).

The reward of a step is ``position * next price move``: buying into up-trends and selling into
down-trends pays on average, the opposite loses, holding earns exactly nothing.

The market depends on the seed only, never on the agent's actions, so every agent that plays the
same :class:`Scenario` faces exactly the same prices: a scenario is a GRPO group, and the spread of
rewards inside it comes from the agents' choices alone.

Everything here is pure (dataclasses and functions of the seed), so a trainer can replay episodes
and score actions without the recording machinery::

    market = generate_market(scenario.seed)
    for t in range(market.steps):
        obs = market.observation(t)
        reward = market.reward(t, choose(obs))
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

Action: TypeAlias = Literal["buy", "sell", "hold"]
Trend: TypeAlias = Literal["up", "down", "flat"]

ACTIONS: Final[tuple[Action, ...]] = ("buy", "sell", "hold")
TRENDS: Final[tuple[Trend, ...]] = ("up", "down", "flat")
#: The position an action takes for the next price move.
POSITION: Final[dict[str, int]] = {"buy": 1, "sell": -1, "hold": 0}

SYMBOL: Final = "ACME"
DEFAULT_STEPS: Final = 8
START_PRICE: Final = 100.0
#: Expected price move per step under each trend, and the noise around it (standard deviation).
DRIFT: Final[dict[str, float]] = {"up": 1.0, "down": -1.0, "flat": 0.0}
NOISE: Final = 0.8
#: Chance that the trend changes before a step (it persists otherwise).
SWITCH_PROBABILITY: Final = 0.25


@dataclass(frozen=True)
class Scenario:
    """One market, identified by its seed; every episode of a scenario sees the same prices."""

    scenario_id: str
    seed: int
    steps: int = DEFAULT_STEPS

    def market(self) -> Market:
        return generate_market(self.seed, self.steps)


def scenario_seed(run_seed: int, episode: int, group: int) -> int:
    """A stable 32-bit seed for group ``group`` of round ``episode`` of a run (no hash randomization)."""
    return random.Random(f"cuneiform-demo:{run_seed}:{episode}:{group}").getrandbits(32)


def make_scenario(seed: int, steps: int = DEFAULT_STEPS) -> Scenario:
    """The scenario of a seed; its id names the seed, so equal ids always mean equal markets."""
    return Scenario(scenario_id=f"market-{seed:08x}", seed=seed, steps=steps)


@dataclass(frozen=True)
class Observation:
    """What the agent sees before choosing its position for the move after step ``step``."""

    step: int
    steps: int
    trend: Trend
    price: float
    last_change: float

    @property
    def steps_left(self) -> int:
        return self.steps - self.step

    def to_json(self) -> dict[str, Any]:
        return {
            "symbol": SYMBOL,
            "step": self.step,
            "steps_left": self.steps_left,
            "trend": self.trend,
            "price": self.price,
            "last_change": self.last_change,
        }


@dataclass(frozen=True)
class Market:
    """The whole price path of an episode: ``prices[t]`` before move ``t``, ``prices[t + 1]`` after it."""

    seed: int
    trends: tuple[Trend, ...]
    prices: tuple[float, ...]

    @property
    def steps(self) -> int:
        return len(self.trends)

    def observation(self, step: int) -> Observation:
        last_change = round(self.prices[step] - self.prices[step - 1], 2) if step > 0 else 0.0
        return Observation(step, self.steps, self.trends[step], self.prices[step], last_change)

    def move(self, step: int) -> float:
        """The price change that the position taken at ``step`` is exposed to."""
        return round(self.prices[step + 1] - self.prices[step], 2)

    def reward(self, step: int, action: str) -> float:
        """``position * next price move`` for ``action`` taken at ``step``."""
        if action not in POSITION:
            raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        return round(POSITION[action] * self.move(step), 2)

    def history(self, step: int, window: int = 4) -> list[float]:
        """The last ``window`` prices up to ``step``."""
        return list(self.prices[max(0, step - window + 1) : step + 1])

    def quote(self, step: int, window: int = 4) -> dict[str, Any]:
        """What a market-data provider answers at ``step``: recent prices and the trend signal."""
        return {"symbol": SYMBOL, "prices": self.history(step, window), "trend": self.trends[step]}


def generate_market(seed: int, steps: int = DEFAULT_STEPS) -> Market:
    """The market of a seed: a persistent trend that sometimes switches, and noisy moves around it."""
    if steps < 1:
        raise ValueError("an episode needs at least one step")
    rng = random.Random(seed)
    trend: Trend = rng.choice(TRENDS)
    trends: list[Trend] = []
    prices = [START_PRICE]
    for step in range(steps):
        if step > 0 and rng.random() < SWITCH_PROBABILITY:
            trend = rng.choice([t for t in TRENDS if t != trend])
        trends.append(trend)
        prices.append(round(prices[-1] + DRIFT[trend] + rng.gauss(0.0, NOISE), 2))
    return Market(seed, tuple(trends), tuple(prices))


@dataclass(frozen=True)
class StepOutcome:
    step: int
    action: Action
    position: int
    price_before: float
    price_after: float
    reward: float


class Episode:
    """One agent playing one scenario: the market plus the agent's running account of it."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.market = scenario.market()
        self.step = 0
        self.total_reward = 0.0
        self.outcomes: list[StepOutcome] = []

    @property
    def done(self) -> bool:
        return self.step >= self.market.steps

    def observe(self) -> Observation:
        if self.done:
            raise RuntimeError("the episode is over")
        return self.market.observation(self.step)

    def act(self, action: str) -> StepOutcome:
        if self.done:
            raise RuntimeError("the episode is over")
        reward = self.market.reward(self.step, action)
        outcome = StepOutcome(
            step=self.step,
            action=action,  # type: ignore[arg-type]  # checked by Market.reward
            position=POSITION[action],
            price_before=self.market.prices[self.step],
            price_after=self.market.prices[self.step + 1],
            reward=reward,
        )
        self.outcomes.append(outcome)
        self.total_reward = round(self.total_reward + reward, 2)
        self.step += 1
        return outcome

    def state(self) -> dict[str, Any]:
        """The environment's state as recorded with each step (JSON)."""
        return {
            "symbol": SYMBOL,
            "scenario_seed": self.scenario.seed,
            "step": self.step,
            "price": self.market.prices[self.step],
            "total_reward": self.total_reward,
        }

    def metrics(self) -> dict[str, float | int]:
        """Per-episode numbers for ``trajectory_ended.metrics``."""
        counts = {a: sum(1 for o in self.outcomes if o.action == a) for a in ACTIONS}
        followed = sum(
            1
            for o in self.outcomes
            if (self.market.trends[o.step], o.action) in {("up", "buy"), ("down", "sell"), ("flat", "hold")}
        )
        return {
            "steps": len(self.outcomes),
            "buys": counts["buy"],
            "sells": counts["sell"],
            "holds": counts["hold"],
            "followed_trend": followed,
            "final_price": self.market.prices[self.step],
            "total_reward": self.total_reward,
        }


def play(scenario: Scenario, choose: Callable[[Observation], str]) -> float:
    """Total reward of ``choose`` (a function of the observation) over one episode of ``scenario``."""
    episode = Episode(scenario)
    while not episode.done:
        episode.act(choose(episode.observe()))
    return episode.total_reward
