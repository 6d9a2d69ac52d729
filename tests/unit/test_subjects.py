from __future__ import annotations

import pytest
from cuneiform_sdk.subjects import agent_subjects, agent_token, trajectory_subject


@pytest.mark.parametrize("agent_id", ["trader-7", "A_b-9", "x" * 64])
def test_subject_safe_agent_ids_are_used_as_they_are(agent_id: str) -> None:
    assert agent_token(agent_id) == agent_id
    assert trajectory_subject(agent_id, "step") == f"traj.{agent_id}.step"


@pytest.mark.parametrize(
    "agent_id", ["agent.with.dots", "has space", "wild*card", "gt>", "x" * 65, "ünïcödé", "", "a\nb"]
)
def test_other_agent_ids_become_a_short_stable_hash(agent_id: str) -> None:
    token = agent_token(agent_id)
    assert token.startswith("h_") and len(token) == 22
    assert token == agent_token(agent_id)  # stable across calls (and processes: sha256, not hash())
    subject = trajectory_subject(agent_id, "llm_call")
    assert subject.count(".") == 2 and "*" not in subject and ">" not in subject


def test_distinct_ids_get_distinct_tokens() -> None:
    tokens = {agent_token(f"agent.{i}") for i in range(10_000)}
    assert len(tokens) == 10_000


def test_known_hash_value_is_pinned_for_other_languages() -> None:
    # sha256("agent.one") — SDKs in other languages must produce exactly this token.
    assert agent_token("agent.one") == "h_" + __import__("hashlib").sha256(b"agent.one").hexdigest()[:20]


def test_prefix_and_permissions_wildcard() -> None:
    assert trajectory_subject("a", "reward", prefix="staging") == "staging.traj.a.reward"
    assert agent_subjects("a.b") == f"traj.{agent_token('a.b')}.*"


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        trajectory_subject("a", "teleport")
