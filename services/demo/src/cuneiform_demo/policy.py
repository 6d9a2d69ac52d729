"""The simulated agents' "LLM": a tiny tabular softmax policy — a STAND-IN for a real language model.

No language model runs in the demo. Each decision is drawn from ``softmax(logits[trend])`` over
buy/sell/hold with a seeded RNG; the only input it uses is the trend in the observation. To make the
recorded data look like a real agent's, each decision is rendered as the OpenAI-style chat call a
tool-using LLM agent would make: a system prompt explaining the game, a user prompt with the
observation, the ``trade`` function schema in ``tools``, and an assistant response that calls
``trade`` with JSON arguments ``{"action": ...}``. ``logprobs`` carry the policy's log-probabilities
of the three actions in the OpenAI layout (one "token" per decision: the action).

The parameters are plain JSON (:meth:`TabularPolicy.to_json`), so a trainer can update them (GRPO on
a CPU) and a deployer can roll a new version out.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .environment import ACTIONS, DEFAULT_STEPS, SYMBOL, TRENDS, Action, Observation

POLICY_NAME: Final = "demo-policy"
#: Said wherever the demo shows what its agents are: no LLM runs here.
STAND_IN_NOTE: Final = (
    'the agents\' "LLM" is a tabular softmax policy (one logit per trend and action), a stand-in for a real model'
)

SYSTEM_PROMPT: Final = (
    f"You are a trading agent for the stock {SYMBOL}. An episode has {DEFAULT_STEPS} steps. At each step you see "
    "a market signal (the trend: up, down or flat) and the price, and you choose your position for the next "
    "price move by calling the `trade` function: buy (long one share), sell (short one share) or hold "
    "(no position). Your reward for the step is your position times the next price change."
)

TRADE_TOOL: Final[dict[str, Any]] = {
    "type": "function",
    "function": {
        "name": "trade",
        "description": "Choose your position for the next price move.",
        "parameters": {
            "type": "object",
            "properties": {
                "action": {
                    "type": "string",
                    "enum": list(ACTIONS),
                    "description": "buy: long one share; sell: short one share; hold: no position",
                }
            },
            "required": ["action"],
            "additionalProperties": False,
        },
    },
}


def _initial_logits() -> dict[str, dict[str, float]]:
    """Version v1: leans a little towards following the trend, far from good — room to train."""
    return {
        "up": {"buy": 0.6, "sell": 0.0, "hold": 0.3},
        "down": {"buy": 0.0, "sell": 0.6, "hold": 0.3},
        "flat": {"buy": 0.0, "sell": 0.0, "hold": 0.3},
    }


@dataclass
class TabularPolicy:
    """``logits[trend][action]``; a decision samples ``softmax(logits[trend] / temperature)``."""

    logits: dict[str, dict[str, float]] = field(default_factory=_initial_logits)
    name: str = POLICY_NAME
    version: str = "v1"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for trend in TRENDS:
            row = self.logits.get(trend)
            if row is None or set(row) != set(ACTIONS):
                raise ValueError(f"logits[{trend!r}] must hold exactly the actions {', '.join(ACTIONS)}")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")

    def probabilities(self, trend: str) -> dict[Action, float]:
        row = self.logits[trend]
        top = max(row.values())
        weights = {a: math.exp((row[a] - top) / self.temperature) for a in ACTIONS}
        total = sum(weights.values())
        return {a: w / total for a, w in weights.items()}

    def sample(self, trend: str, rng: random.Random) -> Action:
        probabilities = self.probabilities(trend)
        return rng.choices(ACTIONS, weights=[probabilities[a] for a in ACTIONS])[0]

    @property
    def model(self) -> dict[str, str]:
        """The ``model`` reference recorded with each trajectory."""
        return {"name": self.name, "version": self.version}

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "tabular-softmax",
            "name": self.name,
            "version": self.version,
            "temperature": self.temperature,
            "logits": {t: {a: self.logits[t][a] for a in ACTIONS} for t in TRENDS},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TabularPolicy:
        if data.get("kind", "tabular-softmax") != "tabular-softmax":
            raise ValueError(f"not a tabular-softmax policy: kind {data.get('kind')!r}")
        return cls(
            logits={t: {a: float(v) for a, v in row.items()} for t, row in data["logits"].items()},
            name=str(data.get("name", POLICY_NAME)),
            version=str(data.get("version", "v1")),
            temperature=float(data.get("temperature", 1.0)),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)

    @classmethod
    def loads(cls, text: str) -> TabularPolicy:
        return cls.from_json(json.loads(text))


# --- rendering a decision as the chat call an LLM agent would make -----------------------------------


def user_prompt(observation: Observation) -> str:
    change = f"{observation.last_change:+.2f} since the last step" if observation.step else "opening price"
    return (
        f"Step {observation.step + 1} of {observation.steps}. {SYMBOL} trades at {observation.price:.2f} "
        f"({change}). Market signal: trend {observation.trend}. "
        "Choose your position for the next move: call `trade` with buy, sell or hold."
    )


def chat_messages(observation: Observation) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_prompt(observation)},
    ]


def tool_call_response(action: str, call_id: str) -> dict[str, Any]:
    """The assistant message: a single ``trade`` tool call (OpenAI chat format)."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": "trade", "arguments": json.dumps({"action": action})},
            }
        ],
    }


def parse_tool_call(response: Mapping[str, Any]) -> str:
    """The action in a recorded assistant response (what a trainer reads back)."""
    calls = response.get("tool_calls") or []
    if len(calls) != 1 or calls[0]["function"]["name"] != "trade":
        raise ValueError("expected exactly one `trade` tool call")
    action = json.loads(calls[0]["function"]["arguments"])["action"]
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    return str(action)


def _tokens(text: str) -> int:
    """A rough token count (≈ 4 characters a token), for the recorded ``usage``."""
    return max(1, len(text) // 4)


@dataclass(frozen=True)
class Decision:
    """One decision with everything ``TrajectoryRecording.llm_call`` records about it."""

    action: Action
    probabilities: dict[Action, float]
    messages: list[dict[str, Any]]
    response: dict[str, Any]
    tools: list[dict[str, Any]]
    usage: dict[str, int]
    params: dict[str, Any]
    logprobs: dict[str, Any]
    latency_ms: float

    def llm_call_fields(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "tools": self.tools,
            "response": self.response,
            "usage": self.usage,
            "params": self.params,
            "logprobs": self.logprobs,
            "latency_ms": self.latency_ms,
        }


def decide(policy: TabularPolicy, observation: Observation, rng: random.Random) -> Decision:
    """Sample an action for ``observation`` and render the decision as a tool-calling chat completion."""
    began = time.perf_counter()
    probabilities = policy.probabilities(observation.trend)
    action = policy.sample(observation.trend, rng)
    latency_ms = (time.perf_counter() - began) * 1000  # the real (tiny) cost of the stand-in
    messages = chat_messages(observation)
    response = tool_call_response(action, f"call_{rng.getrandbits(64):016x}")
    top = [{"token": a, "logprob": math.log(probabilities[a])} for a in ACTIONS]
    return Decision(
        action=action,
        probabilities=probabilities,
        messages=messages,
        response=response,
        tools=[TRADE_TOOL],
        usage={
            "prompt_tokens": sum(_tokens(m["content"]) for m in messages) + _tokens(json.dumps(TRADE_TOOL)),
            "completion_tokens": _tokens(response["tool_calls"][0]["function"]["arguments"]) + 4,
        },
        params={"temperature": policy.temperature, "tool_choice": "required", "policy_version": policy.version},
        logprobs={"content": [{"token": action, "logprob": math.log(probabilities[action]), "top_logprobs": top}]},
        latency_ms=round(latency_ms, 4),
    )


def held_out_reward(policy: TabularPolicy, episodes: int = 400, seed: int = 10_000) -> float:
    """Mean reward of ``policy`` over ``episodes`` markets it never trained on (seeds from ``seed`` on),
    sampling its decisions with a seeded RNG: the same markets and draws for every policy compared."""
    from .environment import make_scenario, play

    rng = random.Random(seed)
    total = 0.0
    for n in range(episodes):
        total += play(make_scenario(seed + n), lambda observation: policy.sample(observation.trend, rng))
    return total / episodes
