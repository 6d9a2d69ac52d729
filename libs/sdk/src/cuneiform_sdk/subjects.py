"""Subject names of the public contract: ``traj.<agent>.<type>``.

One subject space per agent lets the broker restrict each agent's credentials to its own subjects.
An agent id that is not subject-safe (``[A-Za-z0-9_-]{1,64}``) is replaced by a short stable hash,
so dots, spaces or wildcards in an id can never leak into the subject hierarchy.
"""

from __future__ import annotations

import hashlib
import re

from .contract import EVENT_TYPES

_SAFE_AGENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Prefix of hashed tokens; 80 bits of sha256 keep accidental collisions out of reach for any fleet.
HASHED_PREFIX = "h_"
TRAJECTORY_SUBJECT_ROOT = "traj"


def agent_token(agent_id: str) -> str:
    """The subject token for an agent: its id when subject-safe, otherwise ``h_`` + 20 hex chars."""
    if _SAFE_AGENT.match(agent_id):
        return agent_id
    return HASHED_PREFIX + hashlib.sha256(agent_id.encode("utf-8")).hexdigest()[:20]


def with_prefix(subject: str, prefix: str = "") -> str:
    """Namespace a subject (``prefix.subject``); an empty prefix is the production namespace."""
    return f"{prefix}.{subject}" if prefix else subject


def trajectory_subject(agent_id: str, event_type: str, prefix: str = "") -> str:
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}; expected one of {', '.join(EVENT_TYPES)}")
    return with_prefix(f"{TRAJECTORY_SUBJECT_ROOT}.{agent_token(agent_id)}.{event_type}", prefix)


def agent_subjects(agent_id: str, prefix: str = "") -> str:
    """The wildcard an agent's publish permission should be limited to."""
    return with_prefix(f"{TRAJECTORY_SUBJECT_ROOT}.{agent_token(agent_id)}.*", prefix)
