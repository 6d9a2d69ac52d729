"""Routing: which version an agent runs is a pure function of the table and its id — stable, in the
proportions the deployer asked for, and moving nobody back when a canary grows."""

from __future__ import annotations

import pytest
from cuneiform_sdk.routing import Arm, RoutingTable, assign, point
from pydantic import ValidationError

AGENTS = [f"agent-{i}" for i in range(20_000)]


def table(
    arms: list[tuple[str, float, str]], *, deployment: str = "d-1", pins: dict[str, str] | None = None
) -> RoutingTable:
    return RoutingTable(
        model_name="demo-policy",
        deployment_id=deployment,
        strategy="ab" if len(arms) > 1 else "immediate",
        revision=1,
        arms=[Arm(version=v, weight=w, role=r) for v, w, r in arms],  # type: ignore[arg-type]
        pins=pins or {},
    )


def shares(routing: RoutingTable) -> dict[str, float]:
    counts: dict[str, int] = {}
    for agent in AGENTS:
        version = assign(routing, agent).version
        counts[version] = counts.get(version, 0) + 1
    return {v: n / len(AGENTS) for v, n in counts.items()}


def test_an_agent_keeps_its_arm() -> None:
    routing = table([("v2", 0.5, "challenger"), ("v1", 0.5, "champion")])
    first = {a: assign(routing, a).version for a in AGENTS[:2000]}
    # Same table again (another process, another day): the same answer for every agent.
    again = table([("v2", 0.5, "challenger"), ("v1", 0.5, "champion")])
    assert {a: assign(again, a).version for a in AGENTS[:2000]} == first
    assert 0.0 <= point("d-1", "agent-1") < 1.0
    # The check the README gives to ports of the hash in other languages.
    assert point("01a20f00-b22f-7150-9a0c-4b9872d438fe", "agent-1") == pytest.approx(0.686642559269, abs=1e-12)


@pytest.mark.parametrize(
    "arms",
    [
        [("v2", 0.1, "challenger"), ("v1", 0.9, "champion")],
        [("v2", 0.5, "challenger"), ("v1", 0.5, "champion")],
        [("v3", 1.0, "challenger"), ("v2", 1.0, "challenger"), ("v1", 2.0, "champion")],
    ],
)
def test_arms_get_their_share_of_the_agents(arms: list[tuple[str, float, str]]) -> None:
    routing = table(arms)
    total = sum(w for _, w, _ in arms)
    measured = shares(routing)
    for version, weight, _ in arms:
        # 20,000 agents: the binomial standard error is at most 0.0036; 0.015 is > 4 of them.
        assert measured[version] == pytest.approx(weight / total, abs=0.015)


def test_growing_a_canary_moves_nobody_back() -> None:
    small = table([("v2", 0.1, "challenger"), ("v1", 0.9, "champion")])
    large = table([("v2", 0.5, "challenger"), ("v1", 0.5, "champion")])
    canary = {a for a in AGENTS if assign(small, a).version == "v2"}
    assert canary and all(assign(large, a).version == "v2" for a in canary)


def test_a_new_deployment_reshuffles_the_cohorts() -> None:
    one = table([("v2", 0.5, "challenger"), ("v1", 0.5, "champion")], deployment="d-1")
    two = table([("v3", 0.5, "challenger"), ("v1", 0.5, "champion")], deployment="d-2")
    same = sum((assign(one, a).variant == assign(two, a).variant) for a in AGENTS) / len(AGENTS)
    assert 0.45 < same < 0.55  # independent halves, not the same agents again


def test_pins_win_and_stamp_the_trajectory() -> None:
    routing = table([("v2", 1.0, "champion")], pins={"agent-7": "v1"})
    pinned = assign(routing, "agent-7")
    assert (pinned.version, pinned.variant) == ("v1", "pinned")
    ref = assign(routing, "agent-8").model_ref()
    assert (ref.name, ref.version, ref.deployment_id, ref.variant) == ("demo-policy", "v2", "d-1", "champion")


def test_zero_weight_arms_get_nobody_and_invalid_tables_are_refused() -> None:
    routing = table([("v2", 0.0, "challenger"), ("v1", 1.0, "champion")])
    assert shares(routing) == {"v1": 1.0}
    with pytest.raises(ValidationError):
        table([("v1", 0.0, "champion")])
    with pytest.raises(ValidationError):
        RoutingTable(
            model_name="bad name!",
            deployment_id="d",
            strategy="immediate",
            revision=1,
            arms=[Arm(version="v1", weight=1)],
        )
