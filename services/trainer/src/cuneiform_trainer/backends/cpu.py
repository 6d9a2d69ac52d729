"""The built-in CPU backend: GRPO on the demo's tabular policy, from an ART dataset, in pure Python.

**What is trained.** The demo's agents decide with ``softmax(logits[trend])`` over buy / sell / hold
(:class:`~cuneiform_demo.policy.TabularPolicy`) and record every decision as a tool-calling chat call:
the trend is in the user prompt ("Market signal: trend up"), the action in the response's one ``trade``
tool call. :func:`decisions` reads those (trend, action) pairs back from an exported trajectory, so the
backend trains from exactly what the archiver wrote to ``art.jsonl`` (one line per GRPO group).

**GRPO as implemented here.**

* *Group-relative advantages.* Every trajectory of a group played the same scenario (the same market,
  decided by the scenario's seed only), so the group's own mean reward is the baseline: trajectory *i*
  gets ``A_i = (r_i - mean) / (std + eps)`` (population std of the group). Why group-relative: rewards
  differ far more *between* markets (a strongly trending market pays anyone who follows it) than
  *between choices* on one market. A global baseline would credit whoever drew the easy market; the
  group baseline compares agents facing identical prices, so the sign of ``A_i`` says whether *i's
  choices* were better than its peers'. It also needs no value network, and the normalisation puts
  every group on the same scale, whatever its market's volatility.
* *Uninformative groups are skipped*: a group with fewer than two trajectories, or whose rewards are all
  equal (std 0), says nothing about which choices were better; it contributes no decision at all.
* *Policy gradient.* Each decision of trajectory *i* is credited with ``A_i`` (outcome supervision: one
  reward per episode). The objective is ``J = mean over decisions of A · log π(action | trend)``; for a
  softmax over logits, ``∂ log π(a | t) / ∂ logits[t][b] = onehot(a)[b] - π(b | t)``, so each step is
  ``logits += lr · mean(A · (onehot(action) - π(·|trend)))`` over a (mini)batch, evaluated at the
  current policy (the on-policy form: no importance ratio or clipping — the data's behaviour policy is
  the start policy, and the anchor below keeps the update near it).
* *KL anchor.* A small ``kl_coef · KL(π(·|t) ‖ π_start(·|t))`` per decision is subtracted from ``J``
  (its gradient w.r.t. ``logits[t][b]`` is ``π(b) · (log π(b)/π_start(b) - KL)``), as GRPO's KL term
  toward the reference model: it keeps a small dataset from pushing probabilities to 0 or 1. At the
  start policy the anchor's gradient is exactly zero, so data with no usable group changes nothing.

Everything is deterministic: pure Python floats in a fixed order, and minibatch order (when
``batch_size`` is set) drawn from ``random.Random(seed)``. It is a real learner on the demo's
environment (held-out reward goes up; see ``tests/unit/test_cpu_backend.py``); on a GPU host an LLM
backend trains from the same dataset.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cuneiform_demo.environment import ACTIONS, TRENDS, make_scenario, play
from cuneiform_demo.policy import TabularPolicy

from . import Progress, TrainingJob, TrainingOutput, coerce_hyperparameters

_TREND = re.compile(r"\btrend (up|down|flat)\b")
_SCENARIO_SEED = re.compile(r"^market-([0-9a-f]{8})$")
#: Added to a group's std before dividing (GRPO's epsilon).
EPSILON = 1e-6
#: Seeds of :func:`evaluate`'s held-out markets start here unless told otherwise.
HELD_OUT_SEED = 10_000

Logits = dict[str, dict[str, float]]


@dataclass
class TrainResult:
    """The trained policy, the final metrics, and each epoch's metrics (as reported to ``progress``)."""

    policy: TabularPolicy
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


# --- reading decisions back from an ART trajectory ----------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else json.dumps(content, sort_keys=True, default=str)


def _action(choice: Mapping[str, Any]) -> str | None:
    """The action of a choice's single ``trade`` tool call, or None when it is not one."""
    message = choice.get("message")
    if not isinstance(message, dict):
        return None
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list) or len(calls) != 1 or not isinstance(calls[0], dict):
        return None
    function = calls[0].get("function")
    if not isinstance(function, dict) or function.get("name") != "trade":
        return None
    arguments = function.get("arguments")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return None
    action = parsed.get("action") if isinstance(parsed, dict) else None
    return action if isinstance(action, str) and action in ACTIONS else None


def _histories(trajectory: Mapping[str, Any]) -> Iterable[list[Any]]:
    yield trajectory.get("messages_and_choices") or []
    for history in trajectory.get("additional_histories") or []:
        if isinstance(history, dict):
            yield history.get("messages_and_choices") or []


def read_decisions(trajectory: Mapping[str, Any]) -> tuple[list[tuple[str, str]], int]:
    """(trend, action) for each choice of the trajectory (main history, then the additional ones), and
    how many choices could not be read (no ``trend …`` in the last user message before it, or not one
    ``trade`` call with a known action)."""
    found: list[tuple[str, str]] = []
    unreadable = 0
    for history in _histories(trajectory):
        last_user = ""
        for item in history if isinstance(history, list) else []:
            if not isinstance(item, dict):
                continue
            if "finish_reason" in item or "message" in item:  # a choice: the trainable turn
                trend = _TREND.search(last_user)
                action = _action(item)
                if trend is None or action is None:
                    unreadable += 1
                else:
                    found.append((trend.group(1), action))
            elif item.get("role") == "user":
                last_user = _text(item.get("content"))
    return found, unreadable


def decisions(trajectory: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(trend, action) for each readable choice of the trajectory; see :func:`read_decisions`."""
    return read_decisions(trajectory)[0]


# --- GRPO ---------------------------------------------------------------------------------------------


def _softmax(row: Mapping[str, float], temperature: float) -> dict[str, float]:
    top = max(row.values())
    weights = {a: math.exp((row[a] - top) / temperature) for a in ACTIONS}
    total = sum(weights.values())
    return {a: w / total for a, w in weights.items()}


def _reward(trajectory: Any) -> float | None:
    value = trajectory.get("reward") if isinstance(trajectory, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def train(
    groups: list[dict[str, Any]],
    start: TabularPolicy,
    *,
    version: str,
    epochs: int = 4,
    learning_rate: float = 0.5,
    kl_coef: float = 0.02,
    batch_size: int = 32,
    seed: int = 0,
    progress: Progress | None = None,
) -> TrainResult:
    """GRPO over the groups of an ART dataset (see the module docstring); ``start`` is not modified.

    Each epoch visits the decisions in minibatches of ``batch_size`` (0: one full-batch step per epoch),
    in an order drawn from ``seed``. The defaults (4 epochs of 32-decision minibatches, lr 0.5) take the
    demo's held-out reward from about 1.1 to about 5.2 on 40 groups of 6 episodes. The result has
    ``version`` and the start policy's name and temperature.
    """
    if epochs < 0 or batch_size < 0 or not (0 <= learning_rate < math.inf and 0 <= kl_coef < math.inf):
        raise ValueError("epochs, batch_size, learning_rate and kl_coef must be finite and not negative")
    samples: list[tuple[str, str, float]] = []  # (trend, action, advantage)
    used = skipped = unreadable = unrewarded = 0
    rewards: list[float] = []
    for group in groups:
        scored = [(t, r) for t in (group.get("trajectories") or []) if (r := _reward(t)) is not None]
        unrewarded += len(group.get("trajectories") or []) - len(scored)
        values = [r for _, r in scored]
        mean = math.fsum(values) / len(values) if values else 0.0
        std = math.sqrt(math.fsum((r - mean) ** 2 for r in values) / len(values)) if values else 0.0
        if len(values) < 2 or std <= 1e-9:
            skipped += 1
            continue
        used += 1
        rewards += values
        for trajectory, reward in scored:
            pairs, bad = read_decisions(trajectory)
            unreadable += bad
            advantage = (reward - mean) / (std + EPSILON)
            samples += [(trend, action, advantage) for trend, action in pairs]

    temperature = start.temperature
    reference: Logits = {t: {a: float(start.logits[t][a]) for a in ACTIONS} for t in TRENDS}
    reference_p = {t: _softmax(reference[t], temperature) for t in TRENDS}
    logits: Logits = {t: dict(reference[t]) for t in TRENDS}
    mean_abs_advantage = math.fsum(abs(s[2]) for s in samples) / len(samples) if samples else 0.0
    mean_reward = math.fsum(rewards) / len(rewards) if rewards else 0.0
    order = list(range(len(samples)))
    rng = random.Random(seed)
    history: list[dict[str, float]] = []
    loss = 0.0
    for epoch in range(1, epochs + 1):
        if batch_size:
            rng.shuffle(order)
        size = batch_size or max(1, len(order))
        # The epoch's loss: -A·logπ(action) over its decisions, each at the policy its minibatch stepped from.
        terms: list[float] = []
        for begin in range(0, len(order), size):
            batch = [samples[i] for i in order[begin : begin + size]]
            probs = {t: _softmax(logits[t], temperature) for t in TRENDS}
            gradient: Logits = {t: dict.fromkeys(ACTIONS, 0.0) for t in TRENDS}
            counts = dict.fromkeys(TRENDS, 0)
            for trend, action, advantage in batch:
                counts[trend] += 1
                terms.append(-advantage * math.log(max(probs[trend][action], 1e-300)))
                for a in ACTIONS:
                    gradient[trend][a] += advantage * ((1.0 if a == action else 0.0) - probs[trend][a])
            for t in TRENDS:
                if not counts[t]:
                    continue
                p, q = probs[t], reference_p[t]
                kl = math.fsum(p[a] * math.log(p[a] / q[a]) for a in ACTIONS)
                for a in ACTIONS:
                    kl_gradient = p[a] * (math.log(p[a] / q[a]) - kl)
                    # d(logπ)/d(logit) is scaled by 1/temperature; fold it in so lr means the same at any T.
                    step = (gradient[t][a] - counts[t] * kl_coef * kl_gradient) / (len(batch) * temperature)
                    logits[t][a] += learning_rate * step
        loss = math.fsum(terms) / len(terms) if terms else 0.0
        numbers = {
            "epoch": float(epoch),
            "loss": loss,
            "mean_abs_advantage": mean_abs_advantage,
            "mean_reward": mean_reward,
            "decisions": float(len(samples)),
        }
        history.append(numbers)
        if progress is not None:
            progress(epoch, dict(numbers))
    policy = TabularPolicy(logits=logits, name=start.name, version=version, temperature=temperature)
    metrics = {
        "loss": loss,
        "epochs": float(epochs),
        "decisions": float(len(samples)),
        "groups_used": float(used),
        "groups_skipped": float(skipped),
        "unreadable_decisions": float(unreadable),
        "unrewarded_trajectories": float(unrewarded),
        "mean_abs_advantage": mean_abs_advantage,
        "mean_reward": mean_reward,
    }
    return TrainResult(policy, metrics, history)


# --- evaluation ---------------------------------------------------------------------------------------


def training_seeds(groups: Iterable[Mapping[str, Any]]) -> set[int]:
    """The market seeds of a dataset's groups (the demo names a scenario ``market-<seed as 8 hex>``)."""
    seeds = set()
    for group in groups:
        metadata = group.get("metadata")
        match = _SCENARIO_SEED.match(str(metadata.get("scenario_id", ""))) if isinstance(metadata, dict) else None
        if match:
            seeds.add(int(match.group(1), 16))
    return seeds


def evaluate(
    policy: TabularPolicy, episodes: int = 400, seed: int = HELD_OUT_SEED, *, exclude: Iterable[int] = ()
) -> float:
    """Mean reward of ``policy`` over ``episodes`` held-out markets of the demo environment.

    The markets are ``make_scenario(s)`` for seeds ``s = seed, seed + 1, …`` minus ``exclude`` (pass the
    training data's :func:`training_seeds`); the decisions are sampled with ``random.Random(seed)``, so
    every policy compared sees the same markets and draws. With nothing excluded it is the demo's own
    ``held_out_reward``.
    """
    if episodes < 1:
        raise ValueError("evaluate needs at least one episode")
    excluded = set(exclude)
    rng = random.Random(seed)
    total = 0.0
    played = 0
    market = seed
    while played < episodes:
        if market not in excluded:
            total += play(make_scenario(market), lambda observation: policy.sample(observation.trend, rng))
            played += 1
        market += 1
    return total / episodes


# --- the backend's entry point ------------------------------------------------------------------------

_HYPERPARAMETERS: dict[str, type] = {
    "epochs": int,
    "learning_rate": float,
    "kl_coef": float,
    "batch_size": int,
    "seed": int,
}


def parse_groups(art_jsonl: bytes) -> list[dict[str, Any]]:
    """The GRPO groups of an ``art.jsonl`` (one JSON object a line; blank lines ignored)."""
    groups = []
    for number, line in enumerate(art_jsonl.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            group = json.loads(line)
        except ValueError as error:
            raise ValueError(f"art.jsonl line {number} is not JSON: {error}") from None
        if not isinstance(group, dict) or not isinstance(group.get("trajectories", []), list):
            raise ValueError(f"art.jsonl line {number} is not a group (an object with a trajectories list)")
        groups.append(group)
    return groups


def train_dataset(
    art_jsonl: bytes,
    start_policy_json: dict[str, Any] | None,
    version: str,
    progress: Progress | None = None,
    **hyperparameters: Any,
) -> tuple[bytes, dict[str, float]]:
    """``art.jsonl`` bytes and the starting policy (None: the demo's initial policy) → the new policy's
    JSON as UTF-8 bytes, and the training metrics. Deterministic: equal inputs give equal bytes.

    ``hyperparameters`` are :func:`train`'s keywords (``epochs``, ``learning_rate``, ``kl_coef``,
    ``batch_size``, ``seed``); unknown names or uncoercible values raise ``ValueError``.
    """
    options = coerce_hyperparameters("cpu", hyperparameters, _HYPERPARAMETERS)
    groups = parse_groups(art_jsonl)
    start = TabularPolicy.from_json(start_policy_json) if start_policy_json else TabularPolicy()
    result = train(groups, start, version=version, progress=progress, **options)
    return result.policy.dumps().encode("utf-8"), result.metrics


class CpuBackend:
    """The ``cpu`` backend: :func:`train_dataset` on the job's ``art.jsonl``, from the start version's
    policy (its artifact) or the demo's initial policy; the artifact is the new policy's JSON."""

    name = "cpu"

    def preflight(self) -> None:
        """Runs anywhere."""

    def train(self, job: TrainingJob, progress: Progress) -> TrainingOutput:
        start = json.loads(job.start_artifact) if job.start_artifact else None
        artifact, metrics = train_dataset(
            job.files["art.jsonl"], start, job.version, progress, **dict(job.hyperparameters)
        )
        return TrainingOutput(artifact, metrics, content_type="application/json")


def create() -> CpuBackend:
    return CpuBackend()
