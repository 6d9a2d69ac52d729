"""The public event contract, version 1.

Agents in any language publish these events as JSON on ``traj.<agent>.<type>`` (see ``subjects``).
The contract is stable: within ``"v": 1`` only additive changes are allowed, so every model accepts
and keeps fields it does not know (``extra="allow"``) and a consumer built today reads what a
producer adds tomorrow. ``schema/events.v1.schema.json`` is generated from these models
(``python -m cuneiform_sdk.schema``) for producers that are not written in Python.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeAlias
from uuid import UUID

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

CONTRACT_VERSION = 1
#: The broker's default max_payload; larger events travel by claim check (``PayloadRef``).
MAX_EVENT_BYTES = 1024 * 1024

EventType: TypeAlias = Literal[
    "trajectory_started",
    "step",
    "llm_call",
    "provider_access",
    "action",
    "reward",
    "trajectory_ended",
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]

_HOUR_WINDOW = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}$")


class _Model(BaseModel):
    """Frozen, tolerant of unknown fields (additive evolution), strict about the known ones."""

    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)


def utc_now() -> datetime:
    return datetime.now(UTC)


def hour_window(at: datetime | None = None) -> str:
    """The default GRPO group key: the UTC hour an episode ran in, ``YYYY-MM-DDTHH``."""
    return (at or utc_now()).astimezone(UTC).strftime("%Y-%m-%dT%H")


# --- shared pieces -------------------------------------------------------------------------------


class ModelRef(_Model):
    """Which model produced a trajectory; ``version``/``deployment_id``/``variant`` come from routing."""

    name: str = Field(min_length=1)
    version: str | None = None
    deployment_id: str | None = None
    variant: str | None = None


class ToolCallFunction(_Model):
    name: str
    #: JSON-encoded arguments, exactly as the model produced them (OpenAI chat format).
    arguments: str = ""


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Model):
    """One OpenAI chat-format message; ``content`` may be text, content parts or absent."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, JsonValue]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class AssistantMessage(ChatMessage):
    role: Literal["assistant"] = "assistant"


class Usage(_Model):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int | None = Field(default=None, ge=0)


class PayloadRef(_Model):
    """Claim check: the event's full body lives in the NATS object store, not in the message."""

    bucket: str = Field(min_length=1)
    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


# --- the envelope ----------------------------------------------------------------------------------


class Envelope(_Model):
    """Fields every event carries. ``event_id`` is made by the producer and is the dedupe key
    end to end (``Nats-Msg-Id`` header, primary keys); ``seq`` orders events within a trajectory."""

    v: Literal[1]
    event_id: UUID
    type: EventType
    trajectory_id: UUID
    agent_id: str = Field(min_length=1, max_length=256)
    seq: int = Field(ge=0)
    occurred_at: AwareDatetime

    @field_validator("occurred_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


# --- the seven event types -------------------------------------------------------------------------


class TrajectoryStarted(Envelope):
    type: Literal["trajectory_started"] = "trajectory_started"
    #: GRPO group key: trajectories of one scenario are compared with each other.
    scenario_id: str = Field(default_factory=hour_window, min_length=1, max_length=256)
    episode_id: str | None = None
    model: ModelRef
    environment: JsonValue = Field(default_factory=dict)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)


class Step(Envelope):
    type: Literal["step"] = "step"
    step: int = Field(ge=0)
    environment: JsonValue = Field(default_factory=dict)
    observation: JsonValue = None


LlmPurpose: TypeAlias = Literal["action", "reasoning", "evaluation", "response", "other"]


class LlmCall(Envelope):
    """One LLM call with its full prompt and response, in either of two forms:

    * chat: ``messages`` (OpenAI chat format, tool calls included) and ``response``;
    * simple: ``system_prompt`` + ``user_prompt`` + ``response_text``.
    """

    type: Literal["llm_call"] = "llm_call"
    step: int = Field(ge=0)
    call_id: str = Field(min_length=1, max_length=256)
    model: str = Field(min_length=1)
    purpose: LlmPurpose = "action"
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, JsonValue]] | None = None
    response: AssistantMessage | None = None
    system_prompt: str | None = None
    user_prompt: str | None = None
    response_text: str | None = None
    reasoning: str | None = None
    params: dict[str, JsonValue] | None = None
    usage: Usage | None = None
    latency_ms: float | None = Field(default=None, ge=0)
    logprobs: JsonValue = None

    @model_validator(mode="after")
    def _one_complete_form(self) -> LlmCall:
        chat = self.messages is not None and self.response is not None
        simple = self.user_prompt is not None and self.response_text is not None
        if not (chat or simple):
            raise ValueError(
                "an llm_call needs either `messages` and `response` (chat form) or "
                "`user_prompt` and `response_text` (simple form, `system_prompt` optional)"
            )
        return self

    def chat(self) -> tuple[list[ChatMessage], AssistantMessage]:
        """The call as chat messages and the assistant's response, whichever form was sent."""
        if self.messages is not None and self.response is not None:
            return list(self.messages), self.response
        messages = []
        if self.system_prompt:
            messages.append(ChatMessage(role="system", content=self.system_prompt))
        messages.append(ChatMessage(role="user", content=self.user_prompt))
        return messages, AssistantMessage(content=self.response_text)


class ProviderAccess(Envelope):
    """A read of context or tool data that informed a decision."""

    type: Literal["provider_access"] = "provider_access"
    step: int = Field(ge=0)
    provider: str = Field(min_length=1)
    provider_id: str | None = None
    query: JsonValue = None
    data: JsonValue = None
    purpose: str = "context"


class Action(Envelope):
    type: Literal["action"] = "action"
    step: int = Field(ge=0)
    action_type: str = Field(min_length=1)
    parameters: dict[str, JsonValue] = Field(default_factory=dict)
    success: bool
    result: JsonValue = None
    error: str | None = None
    llm_call_id: str | None = None
    reward: float | None = None


class Reward(Envelope):
    """A reward for one step, or for the whole trajectory when ``step`` is absent."""

    type: Literal["reward"] = "reward"
    step: int | None = Field(default=None, ge=0)
    source: str = Field(default="environment", min_length=1)
    name: str = Field(default="reward", min_length=1)
    value: float = Field(allow_inf_nan=False)
    reason: str | None = None


class TrajectoryEnded(Envelope):
    type: Literal["trajectory_ended"] = "trajectory_ended"
    status: Literal["completed", "failed", "aborted"]
    total_reward: float | None = Field(default=None, allow_inf_nan=False)
    metrics: dict[str, float | int | bool] = Field(default_factory=dict)
    environment: JsonValue = Field(default_factory=dict)
    #: How many events the producer published for this trajectory, this one included: the proof of
    #: completeness. A trajectory is complete once that many distinct events are stored.
    event_count: int = Field(ge=1)
    error: str | None = None


Event: TypeAlias = Annotated[
    TrajectoryStarted | Step | LlmCall | ProviderAccess | Action | Reward | TrajectoryEnded,
    Field(discriminator="type"),
]

EVENT_MODELS: dict[str, type[Envelope]] = {
    "trajectory_started": TrajectoryStarted,
    "step": Step,
    "llm_call": LlmCall,
    "provider_access": ProviderAccess,
    "action": Action,
    "reward": Reward,
    "trajectory_ended": TrajectoryEnded,
}


class ClaimCheck(Envelope):
    """What travels on the bus for an event too large for it: the envelope plus ``payload_ref``.

    The object it names holds the whole event's JSON; its sha256 and size must match.
    """

    payload_ref: PayloadRef


# --- decoding with errors a producer can act on ------------------------------------------------------


class ContractError(ValueError):
    """An event that does not follow the contract; ``reason`` says what to fix."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


def _describe(error: ValidationError, tag: str | None = None) -> str:
    parts = []
    for item in error.errors(include_url=False)[:5]:
        loc = item["loc"]
        # Drop the discriminator tag pydantic puts first in the location: the producer never wrote it.
        if tag is not None and loc and loc[0] == tag:
            loc = loc[1:]
        location = ".".join(str(p) for p in loc) or "(event)"
        parts.append(f"{location}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _check_header(data: Any) -> None:
    if not isinstance(data, dict):
        raise ContractError(f"an event must be a JSON object, got {type(data).__name__}")
    version = data.get("v")
    if version != CONTRACT_VERSION:
        raise ContractError(f"unsupported contract version v={version!r}: this consumer reads v={CONTRACT_VERSION}")
    if data.get("type") not in EVENT_TYPES:
        raise ContractError(f"unknown event type {data.get('type')!r}; expected one of {', '.join(EVENT_TYPES)}")


def validate_event(data: Any) -> Event:
    """Validate an already-decoded JSON value as a contract event."""
    _check_header(data)
    try:
        return _event_adapter.validate_python(data)
    except ValidationError as error:
        raise ContractError(f"invalid {data['type']} event: {_describe(error, data['type'])}") from None


def validate_message(data: Any) -> Event | ClaimCheck:
    """Validate a decoded message body: a full event, or a ``ClaimCheck`` whose body must be fetched."""
    if isinstance(data, dict) and "payload_ref" in data:
        _check_header(data)
        try:
            return ClaimCheck.model_validate(data)
        except ValidationError as error:
            raise ContractError(f"invalid claim check: {_describe(error)}") from None
    return validate_event(data)


def parse_event(raw: bytes | str) -> Event | ClaimCheck:
    """Decode and validate one message body.

    The common case — a valid full event — is parsed and validated in one pass by pydantic-core;
    anything else takes the slower path that explains exactly what is wrong.
    """
    # A claim check may carry fields of its type too; it must never pass for the full event.
    marker: str | bytes = "payload_ref" if isinstance(raw, str) else b"payload_ref"
    if marker not in raw:  # type: ignore[operator]
        try:
            return _event_adapter.validate_json(raw)
        except ValidationError:
            pass
    import json  # stdlib keeps the SDK light

    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ContractError(f"malformed JSON: {error}") from None
    return validate_message(data)


def dump_event(event: Envelope) -> bytes:
    """The canonical wire form: compact JSON with every field, so defaults computed at creation
    (``scenario_id``'s hour window) are fixed on the wire and JSON nulls inside data survive."""
    return event.model_dump_json().encode()
