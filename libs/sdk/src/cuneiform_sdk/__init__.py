"""Cuneiform agent SDK: the public event contract (v1), subject names, and the recording client.

Depends on nothing heavier than nats-py and pydantic, so an agent installs it alone.
"""

from .contract import (
    CONTRACT_VERSION,
    Action,
    AssistantMessage,
    ChatMessage,
    ClaimCheck,
    ContractError,
    Envelope,
    Event,
    LlmCall,
    ModelRef,
    PayloadRef,
    ProviderAccess,
    Reward,
    Step,
    ToolCall,
    TrajectoryEnded,
    TrajectoryStarted,
    dump_event,
    parse_event,
    validate_event,
)
from .recorder import Recorder, TrajectoryRecording
from .routing import Assignment, Routing, RoutingTable, SyncRouting, assign
from .subjects import agent_token, trajectory_subject
from .sync import SyncRecorder

__all__ = [
    "CONTRACT_VERSION",
    "Action",
    "Assignment",
    "AssistantMessage",
    "ChatMessage",
    "ClaimCheck",
    "ContractError",
    "Envelope",
    "Event",
    "LlmCall",
    "ModelRef",
    "PayloadRef",
    "ProviderAccess",
    "Recorder",
    "Reward",
    "Routing",
    "RoutingTable",
    "Step",
    "SyncRecorder",
    "SyncRouting",
    "ToolCall",
    "TrajectoryEnded",
    "TrajectoryRecording",
    "TrajectoryStarted",
    "agent_token",
    "assign",
    "dump_event",
    "parse_event",
    "trajectory_subject",
    "validate_event",
]
