"""The public event contract: what producers in any language may send, and what they are told
when they get it wrong."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cuneiform_sdk import (
    Action,
    ClaimCheck,
    ContractError,
    LlmCall,
    ModelRef,
    Reward,
    Step,
    TrajectoryEnded,
    TrajectoryStarted,
    dump_event,
    parse_event,
)
from cuneiform_sdk.contract import ProviderAccess, hour_window

TRAJ = uuid.UUID("0190f5c2-7b1a-7cc3-9d1e-5a4b3c2d1e0f")
AT = datetime(2026, 11, 24, 10, 30, tzinfo=UTC)


def envelope(seq: int, **extra: object) -> dict[str, object]:
    return {
        "v": 1,
        "event_id": str(uuid.uuid4()),
        "trajectory_id": str(TRAJ),
        "agent_id": "trader-7",
        "seq": seq,
        "occurred_at": AT.isoformat(),
        **extra,
    }


def one_of_each() -> list[object]:
    return [
        TrajectoryStarted(
            **envelope(0),
            scenario_id="market-open",
            model=ModelRef(name="qwen2.5-7b", version="v3", deployment_id="d1", variant="canary"),
            environment={"cash": 1000, "prices": {"ACME": 12.5}, "note": None},
            metadata={"game": "babylon"},
        ),
        Step(**envelope(1), step=0, environment={"cash": 1000}, observation="market opened"),
        LlmCall(
            **envelope(2),
            step=0,
            call_id="c1",
            model="qwen2.5-7b",
            purpose="action",
            messages=[
                {"role": "system", "content": "You trade."},
                {"role": "user", "content": "ACME at 12.5. Buy?"},
            ],
            tools=[{"type": "function", "function": {"name": "buy", "parameters": {"type": "object"}}}],
            response={
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "buy", "arguments": '{"n":3}'}}],
            },
            params={"temperature": 0.7},
            usage={"prompt_tokens": 40, "completion_tokens": 9},
            latency_ms=812.5,
        ),
        ProviderAccess(**envelope(3), step=0, provider="prices", data={"ACME": 12.5}, purpose="market data"),
        Action(**envelope(4), step=0, action_type="buy", parameters={"symbol": "ACME", "n": 3}, success=True),
        Reward(**envelope(5), step=0, source="environment", name="pnl", value=1.25),
        TrajectoryEnded(**envelope(6), status="completed", total_reward=1.25, metrics={"trades": 1}, event_count=7),
    ]


@pytest.mark.parametrize("event", one_of_each(), ids=lambda e: e.type)
def test_every_event_type_round_trips_through_the_wire_form(event: object) -> None:
    wire = dump_event(event)  # type: ignore[arg-type]
    assert parse_event(wire) == event
    assert json.loads(wire)["v"] == 1


def test_json_nulls_inside_environment_data_survive() -> None:
    started = one_of_each()[0]
    assert json.loads(dump_event(started))["environment"]["note"] is None  # type: ignore[arg-type]


def test_simple_llm_call_form_is_accepted_and_reads_as_chat() -> None:
    call = parse_event(
        json.dumps(
            envelope(
                2,
                type="llm_call",
                step=1,
                call_id="c",
                model="m",
                system_prompt="S",
                user_prompt="U",
                response_text="R",
            )
        )
    )
    assert isinstance(call, LlmCall)
    messages, response = call.chat()
    assert [(m.role, m.content) for m in messages] == [("system", "S"), ("user", "U")]
    assert response.content == "R"


def test_unknown_fields_are_kept_for_additive_evolution() -> None:
    event = parse_event(json.dumps(envelope(1, type="step", step=0, new_field={"x": 1})))
    assert json.loads(dump_event(event))["new_field"] == {"x": 1}  # type: ignore[arg-type]


def test_occurred_at_is_normalised_to_utc() -> None:
    plus_two = datetime(2026, 11, 24, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    event = parse_event(json.dumps(envelope(1, type="step", step=0, occurred_at=plus_two.isoformat())))
    assert event.occurred_at == AT
    assert event.occurred_at.utcoffset() == timedelta(0)


def test_scenario_defaults_to_the_hour_window() -> None:
    started = TrajectoryStarted(**envelope(0), model=ModelRef(name="m"))
    assert started.scenario_id == hour_window()
    assert hour_window(AT) == "2026-11-24T10"


def test_claim_check_is_recognised() -> None:
    ref = {"bucket": "payloads", "name": "e1", "sha256": "a" * 64, "size": 5_000_000}
    parsed = parse_event(json.dumps(envelope(2, type="llm_call", payload_ref=ref)))
    assert isinstance(parsed, ClaimCheck)
    assert parsed.payload_ref.size == 5_000_000


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps(envelope(0, type="step", step=0) | {"v": 2}).encode(), "unsupported contract version v=2"),
        (json.dumps({k: v for k, v in envelope(0, type="step", step=0).items() if k != "v"}).encode(), "v=None"),
        (json.dumps(envelope(0, type="teleport")).encode(), "unknown event type 'teleport'"),
        (json.dumps(envelope(0, type="step", step="three")).encode(), "step: Input should be a valid integer"),
        (json.dumps(envelope(-1, type="step", step=0)).encode(), "seq: Input should be greater than or equal to 0"),
        (
            json.dumps(envelope(0, type="step", step=0) | {"event_id": "nope"}).encode(),
            "event_id: Input should be a valid UUID",
        ),
        (
            json.dumps(envelope(0, type="step", step=0) | {"occurred_at": "2026-11-24T10:30:00"}).encode(),
            "occurred_at: Input should have timezone info",
        ),
        (json.dumps(envelope(0, type="llm_call", step=0, call_id="c", model="m")).encode(), "needs either `messages`"),
        (json.dumps(envelope(0, type="reward", value="NaN")).encode(), "value"),
        (
            json.dumps(envelope(0, type="trajectory_ended", status="done", event_count=1)).encode(),
            "status: Input should be",
        ),
        (json.dumps(envelope(0, type="trajectory_ended", status="completed", event_count=0)).encode(), "event_count"),
        (json.dumps(envelope(0, type="trajectory_started")).encode(), "model: Field required"),
        (
            json.dumps(
                envelope(0, type="llm_call", payload_ref={"bucket": "b", "name": "n", "sha256": "x", "size": 1})
            ).encode(),
            "invalid claim check: payload_ref.sha256",
        ),
    ],
    ids=[
        "malformed",
        "not-utf8",
        "not-object",
        "unknown-version",
        "missing-version",
        "unknown-type",
        "wrong-type",
        "negative-seq",
        "bad-uuid",
        "naive-time",
        "llm-call-without-prompt",
        "nan-reward",
        "bad-status",
        "zero-event-count",
        "missing-model",
        "bad-claim-check",
    ],
)
def test_invalid_events_are_rejected_with_a_reason_a_producer_can_act_on(raw: bytes, message: str) -> None:
    with pytest.raises(ContractError) as caught:
        parse_event(raw)
    assert message in caught.value.reason


def test_events_are_frozen() -> None:
    step = one_of_each()[1]
    with pytest.raises(Exception, match="frozen"):
        step.seq = 9  # type: ignore[attr-defined]


def test_a_claim_check_carrying_its_types_fields_is_still_a_claim_check() -> None:
    # The fast path must not take a stub for the full event and skip fetching and verifying the body.
    ref = {"bucket": "payloads", "name": "e1", "sha256": "a" * 64, "size": 10}
    parsed = parse_event(json.dumps(envelope(1, type="step", step=3, payload_ref=ref)))
    assert isinstance(parsed, ClaimCheck)
