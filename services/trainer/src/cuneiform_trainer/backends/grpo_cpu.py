"""The built-in CPU backend: GRPO on the demo's tabular policy, from an ART dataset, in pure Python.

The demo's agents decide with ``softmax(logits[trend])`` over buy / sell / hold and record each decision
as a chat call: the trend is in the user prompt ("Market signal: trend up"), the action in the
response's ``trade`` tool call. This backend reads those (trend, action) pairs back from ``art.jsonl``
and updates the logits with **GRPO**:

* every trajectory of a group played the same scenario (same market), so the group's mean reward is
  the baseline: the advantage of trajectory *i* is ``(r_i - mean) / (std + ε)`` — better than its peers
  on the same market → positive, worse → negative. No value network, no market-difficulty bias;
* a group whose rewards are all equal (or that has one trajectory) says nothing about which choices
  were better: it is skipped;
* each decision of trajectory *i* gets *i*'s advantage; the policy-gradient step on the softmax logits
  is ``A · (onehot(action) - π(·|trend))``, averaged over the decisions, plus a small pull back toward
  the starting logits (a KL-like anchor that keeps a small dataset from over-committing).

It is a real learner on the demo's environment (the test shows held-out reward going up), and small
enough to run anywhere; on a GPU host the ``art`` backend trains an LLM from the same dataset.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cuneiform_demo.environment import ACTIONS, TRENDS
from cuneiform_demo.policy import TabularPolicy, held_out_reward

_TREND = re.compile(r"trend (up|down|flat)\b")
Progress = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    policy: TabularPolicy
    metrics: dict[str, float] = field(default_factory=dict)


def _choices(items: Iterable[Any]) -> Iterable[tuple[str | None, dict[str, Any]]]:
    """(the last user message's text so far, the choice) for each choice of one conversation."""
    last_user: str | None = None
    for item in items:
        if not isinstance(item, dict):
            continue
        if "finish_reason" in item and "message" in item:
            yield last_user, item
        elif item.get("role") == "user":
            content = item.get("content")
            last_user = content if isinstance(content, str) else json.dumps(content)


def decisions(trajectory: dict[str, Any]) -> tuple[list[tuple[str, str]], int]:
    """The (trend, action) pairs of a trajectory's recorded decisions, and how many could not be read."""
    histories = [trajectory.get("messages_and_choices") or []]
    histories += [h.get("messages_and_choices") or [] for h in trajectory.get("additional_histories") or []]
    found: list[tuple[str, str]] = []
    unreadable = 0
    for history in histories:
        for prompt, choice in _choices(history):
            trend = _TREND.search(prompt or "")
            try:
                call = (choice["message"].get("tool_calls") or [])[0]["function"]
                action = json.loads(call["arguments"])["action"] if call["name"] == "trade" else None
            except (KeyError, IndexError, TypeError, ValueError):
                action = None
            if trend is None or action not in ACTIONS:
                unreadable += 1
                continue
            found.append((trend.group(1), str(action)))
    return found, unreadable


def train(
    groups: list[dict[str, Any]],
    start: TabularPolicy,
    *,
    version: str,
    epochs: int = 30,
    learning_rate: float = 0.5,
    anchor: float = 0.01,
    progress: Progress | None = None,
) -> TrainResult:
    """GRPO over the groups of an ART dataset (see the module docstring)."""
    samples: list[tuple[str, str, float]] = []  # (trend, action, advantage)
    used_groups = skipped_groups = unreadable = 0
    rewards: list[float] = []
    for group in groups:
        trajectories = group.get("trajectories") or []
        values = [float(t.get("reward", 0.0)) for t in trajectories]
        if len(values) < 2 or max(values) - min(values) <= 1e-12:
            skipped_groups += 1
            continue
        mean, std = statistics.fmean(values), statistics.pstdev(values)
        used_groups += 1
        rewards += values
        for trajectory, reward in zip(trajectories, values, strict=True):
            pairs, bad = decisions(trajectory)
            unreadable += bad
            advantage = (reward - mean) / (std + 1e-6)
            samples += [(trend, action, advantage) for trend, action in pairs]

    logits: dict[str, dict[str, float]] = {t: dict(start.logits[t]) for t in TRENDS}
    initial: dict[str, dict[str, float]] = {t: dict(start.logits[t]) for t in TRENDS}
    policy = TabularPolicy(logits=logits, name=start.name, version=version, temperature=start.temperature)
    loss = 0.0
    for epoch in range(1, epochs + 1):
        gradient: dict[str, dict[str, float]] = {t: dict.fromkeys(ACTIONS, 0.0) for t in TRENDS}
        loss = 0.0
        for trend, action, advantage in samples:
            probabilities: dict[str, float] = {a: p for a, p in policy.probabilities(trend).items()}
            loss -= advantage * math.log(max(probabilities[action], 1e-12))
            for a in ACTIONS:
                gradient[trend][a] += advantage * ((1.0 if a == action else 0.0) - probabilities[a])
        count = max(1, len(samples))
        for t in TRENDS:
            for a in ACTIONS:
                step = gradient[t][a] / count - anchor * (logits[t][a] - initial[t][a])
                logits[t][a] += learning_rate * step
        loss /= count
        if progress:
            progress(epoch, {"epoch": epoch, "loss": loss, "decisions": len(samples)})
    metrics = {
        "loss": loss,
        "decisions": float(len(samples)),
        "groups_used": float(used_groups),
        "groups_skipped": float(skipped_groups),
        "unreadable_decisions": float(unreadable),
        "mean_reward": statistics.fmean(rewards) if rewards else 0.0,
        "epochs": float(epochs),
    }
    return TrainResult(policy, metrics)


def evaluate(policy: TabularPolicy, episodes: int = 400, seed: int = 10_000) -> float:
    """Mean reward over held-out markets of the demo environment (see ``held_out_reward``)."""
    return float(held_out_reward(policy, episodes, seed))


def train_dataset(
    art_jsonl: bytes,
    start_policy: dict[str, Any] | None,
    version: str,
    progress: Progress | None = None,
    **hyperparameters: Any,
) -> tuple[bytes, dict[str, float]]:
    """The backend's entry point: ``art.jsonl`` bytes (+ the starting policy) → artifact bytes, metrics."""
    groups = [json.loads(line) for line in art_jsonl.splitlines() if line.strip()]
    start = TabularPolicy.from_json(start_policy) if start_policy else TabularPolicy()
    result = train(groups, start, version=version, progress=progress, **hyperparameters)
    return result.policy.dumps().encode(), result.metrics
