"""The training-readiness rules: the numbers (a ``Snapshot`` of the recorder's tables) and the verdict.

Only **eligible** trajectories count: status ``completed``, finalized within ``max_data_age_h``, and not
already in a batch. A *group* is a scenario (the GRPO group key); it carries signal when it has at
least two eligible trajectories whose rewards differ — a group whose rewards are all equal trains
nothing under GRPO. A trajectory's reward is its ``total_reward``, else the sum of its reward events,
else 0 (the same rule as the dataset export).

Rules, each switched off by its neutral setting:

============  ==============================================================================
trajectories  eligible trajectories ≥ ``min_trajectories``
groups        groups with signal ≥ ``min_groups``
judged        eligible trajectories with a ``judge`` reward / eligible ≥ ``min_judged_fraction``
cooldown      seconds since the last batch ≥ ``cooldown_s`` (no batch yet: passes)
quality       data-quality score ≥ ``min_quality``
============  ==============================================================================

The quality score looks at every trajectory finalized in the window: completeness (share not
``incomplete``/``abandoned``) x (1 - share ``failed``/``aborted``) x share of completed trajectories that
recorded at least one LLM call. A fleet losing events, crashing or not logging its prompts scores low.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from .settings import ReadinessSettings


@dataclass(frozen=True)
class Snapshot:
    eligible: int
    groups_with_signal: int
    #: Trajectories in groups with signal: what a batch would hold (before the size cap).
    trainable: int
    judged: int
    #: Completed trajectories finalized before the window (not counted).
    stale: int
    finalized_in_window: int
    incomplete_in_window: int
    failed_in_window: int
    completed_in_window: int
    completed_with_llm_calls: int
    last_batch_at: datetime | None
    now: datetime

    @property
    def judged_fraction(self) -> float:
        return self.judged / self.eligible if self.eligible else 0.0

    @property
    def quality(self) -> float:
        final = self.finalized_in_window
        if not final:
            return 0.0
        completeness = 1 - self.incomplete_in_window / final
        failures = self.failed_in_window / final
        llm = self.completed_with_llm_calls / self.completed_in_window if self.completed_in_window else 0.0
        return completeness * (1 - failures) * llm

    @property
    def since_last_batch_s(self) -> float | None:
        return None if self.last_batch_at is None else (self.now - self.last_batch_at).total_seconds()


@dataclass(frozen=True)
class RuleResult:
    rule: str
    value: float | None
    threshold: float
    passed: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    ready: bool
    rules: list[RuleResult]
    snapshot: Snapshot

    def failing(self) -> list[str]:
        return [r.rule for r in self.rules if not r.passed]

    def as_dict(self) -> dict[str, Any]:
        numbers = asdict(self.snapshot)
        numbers["last_batch_at"] = self.snapshot.last_batch_at.isoformat() if self.snapshot.last_batch_at else None
        numbers["now"] = self.snapshot.now.isoformat()
        numbers["quality"] = round(self.snapshot.quality, 4)
        numbers["judged_fraction"] = round(self.snapshot.judged_fraction, 4)
        return {"ready": self.ready, "rules": [asdict(r) for r in self.rules], "numbers": numbers}

    def summary(self) -> str:
        return "; ".join(f"{r.rule} {r.detail}" for r in self.rules)


def evaluate(s: Snapshot, settings: ReadinessSettings) -> Verdict:
    cooldown = s.since_last_batch_s
    rules = [
        RuleResult(
            "trajectories",
            s.eligible,
            settings.min_trajectories,
            s.eligible >= settings.min_trajectories,
            f"{s.eligible} eligible (need {settings.min_trajectories})",
        ),
        RuleResult(
            "groups",
            s.groups_with_signal,
            settings.min_groups,
            s.groups_with_signal >= settings.min_groups,
            f"{s.groups_with_signal} groups with a reward spread (need {settings.min_groups})",
        ),
        RuleResult(
            "judged",
            s.judged_fraction,
            settings.min_judged_fraction,
            settings.min_judged_fraction == 0 or s.judged_fraction >= settings.min_judged_fraction,
            "no judge required"
            if settings.min_judged_fraction == 0
            else f"{s.judged_fraction:.0%} judged (need {settings.min_judged_fraction:.0%})",
        ),
        RuleResult(
            "cooldown",
            cooldown,
            settings.cooldown_s,
            cooldown is None or cooldown >= settings.cooldown_s,
            "no batch yet"
            if cooldown is None
            else f"{cooldown:.0f} s since the last batch (need {settings.cooldown_s:.0f})",
        ),
        RuleResult(
            "quality",
            s.quality,
            settings.min_quality,
            s.quality >= settings.min_quality,
            f"score {s.quality:.2f} (need {settings.min_quality:.2f})",
        ),
    ]
    # A batch needs something to train on, whatever the thresholds say.
    ready = all(r.passed for r in rules) and s.trainable > 0
    return Verdict(ready, rules, s)


# --- reading the numbers -------------------------------------------------------------------------------

#: Per trajectory in the window: its reward, whether it is eligible, judged and has LLM calls.
_WINDOW = """
    WITH win AS (
        SELECT t.trajectory_id, t.scenario_id, t.status, t.finalized_at,
               coalesce(t.total_reward,
                        (SELECT sum(r.value) FROM recorder.rewards r WHERE r.trajectory_id = t.trajectory_id),
                        0) AS reward,
               t.status = 'completed'
                 AND NOT EXISTS (SELECT 1 FROM readiness.batch_trajectories b
                                 WHERE b.trajectory_id = t.trajectory_id) AS eligible
        FROM recorder.trajectories t
        WHERE t.status <> 'recording' AND t.finalized_at >= $1
    ),
    groups AS (
        SELECT scenario_id, count(*) AS n
        FROM win WHERE eligible
        GROUP BY scenario_id
        HAVING count(*) >= 2 AND max(reward) > min(reward)
    )
"""


async def snapshot(conn: asyncpg.Connection, settings: ReadinessSettings) -> Snapshot:
    now: datetime = await conn.fetchval("SELECT now()")
    since = now - timedelta(hours=settings.max_data_age_h)
    row = await conn.fetchrow(
        _WINDOW
        + """
        SELECT
            (SELECT count(*) FROM win WHERE eligible) AS eligible,
            (SELECT count(*) FROM groups) AS groups_with_signal,
            (SELECT coalesce(sum(n), 0)::bigint FROM groups) AS trainable,
            (SELECT count(*) FROM win WHERE eligible AND EXISTS (
                SELECT 1 FROM recorder.rewards r WHERE r.trajectory_id = win.trajectory_id AND r.source = 'judge'))
                AS judged,
            (SELECT count(*) FROM recorder.trajectories WHERE status = 'completed' AND finalized_at < $1) AS stale,
            (SELECT count(*) FROM win) AS finalized_in_window,
            (SELECT count(*) FROM win WHERE status IN ('incomplete', 'abandoned')) AS incomplete_in_window,
            (SELECT count(*) FROM win WHERE status IN ('failed', 'aborted')) AS failed_in_window,
            (SELECT count(*) FROM win WHERE status = 'completed') AS completed_in_window,
            (SELECT count(*) FROM win WHERE status = 'completed' AND EXISTS (
                SELECT 1 FROM recorder.llm_calls c WHERE c.trajectory_id = win.trajectory_id))
                AS completed_with_llm_calls,
            (SELECT max(created_at) FROM readiness.batches) AS last_batch_at
        """,
        since,
    )
    assert row is not None
    values: dict[str, Any] = dict(row)
    return Snapshot(**values, now=now)


async def trainable_trajectories(conn: asyncpg.Connection, settings: ReadinessSettings) -> list[asyncpg.Record]:
    """The eligible trajectories of groups with signal, whole groups, oldest groups first, capped."""
    now: datetime = await conn.fetchval("SELECT now()")
    rows: list[asyncpg.Record] = await conn.fetch(
        _WINDOW
        + """
        SELECT win.trajectory_id, win.scenario_id, g.n,
               min(win.finalized_at) OVER (PARTITION BY win.scenario_id) AS group_since
        FROM win JOIN groups g USING (scenario_id)
        WHERE win.eligible
        ORDER BY group_since, win.scenario_id, win.trajectory_id
        """,
        now - timedelta(hours=settings.max_data_age_h),
    )
    chosen: list[asyncpg.Record] = []
    for row in rows:
        # Whole groups only: a group cut in half would change what GRPO compares.
        starts_group = not chosen or chosen[-1]["scenario_id"] != row["scenario_id"]
        if starts_group and len(chosen) + row["n"] > settings.max_batch_trajectories and chosen:
            break
        chosen.append(row)
    return chosen
