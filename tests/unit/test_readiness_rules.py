"""The readiness verdict for each rule, from the numbers alone."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cuneiform_readiness.rules import Snapshot, evaluate
from cuneiform_readiness.settings import ReadinessSettings

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
SETTINGS = ReadinessSettings(
    min_trajectories=10, min_groups=3, min_judged_fraction=0.0, cooldown_s=600, min_quality=0.5, _env_file=None
)
GOOD = Snapshot(
    eligible=12,
    groups_with_signal=3,
    trainable=12,
    judged=0,
    stale=0,
    finalized_in_window=20,
    incomplete_in_window=1,
    failed_in_window=1,
    completed_in_window=18,
    completed_with_llm_calls=18,
    last_batch_at=NOW - timedelta(hours=1),
    now=NOW,
)


def failing(snapshot: Snapshot, settings: ReadinessSettings = SETTINGS) -> list[str]:
    return evaluate(snapshot, settings).failing()


def test_ready_when_every_rule_passes() -> None:
    verdict = evaluate(GOOD, SETTINGS)
    assert verdict.ready and verdict.failing() == []
    assert {r.rule for r in verdict.rules} == {"trajectories", "groups", "judged", "cooldown", "quality"}
    assert verdict.as_dict()["numbers"]["quality"] == pytest.approx(0.95 * 0.95 * 1.0)


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"eligible": 9}, "trajectories"),
        ({"groups_with_signal": 2}, "groups"),
        ({"last_batch_at": NOW - timedelta(seconds=599)}, "cooldown"),
        ({"incomplete_in_window": 10}, "quality"),  # half the window lost events
        ({"failed_in_window": 11}, "quality"),  # more than half crashed
        ({"completed_with_llm_calls": 8}, "quality"),  # most trajectories recorded no LLM call
        ({"finalized_in_window": 0, "completed_in_window": 0}, "quality"),  # nothing in the window at all
    ],
)
def test_each_rule_fails_on_its_own(change: dict[str, object], rule: str) -> None:
    assert failing(replace(GOOD, **change)) == [rule]  # type: ignore[arg-type]


def test_the_judged_fraction_counts_only_when_a_judge_is_required() -> None:
    assert failing(replace(GOOD, judged=0)) == []
    judged = SETTINGS.model_copy(update={"min_judged_fraction": 0.5})
    assert failing(replace(GOOD, judged=5), judged) == ["judged"]
    assert failing(replace(GOOD, judged=6), judged) == []


def test_no_batch_yet_passes_the_cooldown_and_nothing_trainable_is_never_ready() -> None:
    assert failing(replace(GOOD, last_batch_at=None)) == []
    empty = SETTINGS.model_copy(update={"min_trajectories": 0, "min_groups": 0, "min_quality": 0.0})
    verdict = evaluate(replace(GOOD, eligible=0, groups_with_signal=0, trainable=0), empty)
    assert verdict.failing() == [] and not verdict.ready
