"""The automatic promote / roll back rule, as a pure function of the arms' statistics.

For each challenger of a running experiment (canary or A/B), against the champion, over the
trajectories each ran **under this deployment** (pinned agents left out: they were not randomized):

1. **Guardrail.** Once the challenger has ``guardrail_min_trajectories`` finished trajectories, a
   failure rate above ``max_failure_rate`` rolls it back at once, whatever its reward.
2. **Enough data.** Until both arms have ``min_trajectories`` completed trajectories, keep collecting.
3. **Welch's t-test** (:mod:`.stats`) of the challenger's mean reward against the champion's, one-sided
   each way at level ``alpha`` (divided by the number of challengers: Bonferroni, so an A/B of several
   challengers is not more likely to promote a lucky one). ``p_better < alpha`` and a difference of at
   least ``min_improvement`` → **promote**; ``p_worse < alpha`` → **roll back**.
4. **Deadline.** Otherwise keep collecting until the experiment is ``max_duration_s`` old; then roll the
   challenger back (the champion stays: a change must prove itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .stats import Sample, welch

Action = Literal["promote", "rollback", "continue"]


@dataclass(frozen=True)
class ArmStats:
    version: str
    completed: int = 0
    failed: int = 0
    mean: float = 0.0
    #: Sample standard deviation of the completed trajectories' rewards.
    std: float = 0.0

    @property
    def finished(self) -> int:
        return self.completed + self.failed

    @property
    def failure_rate(self) -> float:
        return self.failed / self.finished if self.finished else 0.0

    def sample(self) -> Sample:
        return Sample(self.completed, self.mean, self.std)

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "completed": self.completed,
            "failed": self.failed,
            "mean_reward": self.mean,
            "std_reward": self.std,
            "failure_rate": self.failure_rate,
        }


@dataclass(frozen=True)
class Rule:
    min_trajectories: int = 30
    alpha: float = 0.05
    min_improvement: float = 0.0
    max_failure_rate: float = 0.2
    guardrail_min_trajectories: int = 10
    max_duration_s: float = 3600.0


@dataclass(frozen=True)
class Verdict:
    action: Action
    challenger: str
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "challenger": self.challenger, "reason": self.reason, **self.numbers}


def decide(champion: ArmStats, challenger: ArmStats, rule: Rule, *, age_s: float, challengers: int = 1) -> Verdict:
    """The verdict on one challenger (see the module docstring for the rule)."""
    numbers: dict[str, Any] = {"champion": champion.as_dict(), "challenger_stats": challenger.as_dict()}
    name = challenger.version
    if challenger.finished >= rule.guardrail_min_trajectories and challenger.failure_rate > rule.max_failure_rate:
        return Verdict(
            "rollback",
            name,
            f"guardrail: {name} failed {challenger.failure_rate:.0%} of {challenger.finished} trajectories "
            f"(limit {rule.max_failure_rate:.0%})",
            numbers,
        )
    expired = age_s >= rule.max_duration_s
    short = min(champion.completed, challenger.completed)
    if short < max(rule.min_trajectories, 2):
        if expired:
            return Verdict(
                "rollback",
                name,
                f"deadline: {rule.max_duration_s:.0f} s passed with {short} completed trajectories on the smaller "
                f"arm (need {rule.min_trajectories}); the champion stays",
                numbers,
            )
        return Verdict(
            "continue",
            name,
            f"collecting: {champion.completed} ({champion.version}) and {challenger.completed} ({name}) completed "
            f"trajectories, need {rule.min_trajectories} each",
            numbers,
        )
    test = welch(champion.sample(), challenger.sample())
    level = rule.alpha / max(challengers, 1)
    numbers.update({"test": "welch_t", "alpha": level, **test.as_dict()})
    summary = (
        f"{name} {challenger.mean:+.3f} vs {champion.version} {champion.mean:+.3f} "
        f"(n {challenger.completed} / {champion.completed}, Welch t {test.t:.2f}, df {test.df:.1f}"
    )
    if test.p_better < level and test.difference >= rule.min_improvement:
        return Verdict("promote", name, f"better: {summary}, p {test.p_better:.2g} < {level:g})", numbers)
    if test.p_worse < level:
        return Verdict("rollback", name, f"worse: {summary}, p {test.p_worse:.2g} < {level:g})", numbers)
    if expired:
        return Verdict(
            "rollback",
            name,
            f"deadline: no significant difference after {rule.max_duration_s:.0f} s ({summary}, "
            f"p better {test.p_better:.2g}); the champion stays",
            numbers,
        )
    return Verdict(
        "continue",
        name,
        f"undecided: {summary}, p better {test.p_better:.2g}, p worse {test.p_worse:.2g}, need < {level:g})",
        numbers,
    )
