"""Builds the JSON Schema of the contract from the pydantic models, byte-for-byte reproducibly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from ..contract import CONTRACT_VERSION, ClaimCheck, Event
from ..routing import ROUTING_VERSION, RoutingTable

SCHEMA_PATH = Path(__file__).with_name(f"events.v{CONTRACT_VERSION}.schema.json")
ROUTING_SCHEMA_PATH = Path(__file__).with_name(f"routing.v{ROUTING_VERSION}.schema.json")


def build() -> dict[str, Any]:
    event_schema = TypeAdapter(Event).json_schema(mode="validation")
    defs = event_schema.pop("$defs", {})
    claim = ClaimCheck.model_json_schema(mode="validation", ref_template="#/$defs/{model}")
    defs.update(claim.pop("$defs", {}))
    defs["ClaimCheck"] = claim
    for definition in defs.values():
        # `type` has a default in Python (each class knows its own), but on the wire it is required:
        # it is the discriminator every consumer reads first.
        if "event_id" in definition.get("properties", {}):
            definition["required"] = sorted({*definition.get("required", []), "type"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://cuneiform.dev/schema/events.v{CONTRACT_VERSION}.schema.json",
        "title": f"Cuneiform trajectory event, contract v{CONTRACT_VERSION}",
        "description": (
            "One JSON message on subject traj.<agent>.<type>, with header Nats-Msg-Id = event_id. "
            "Either a full event (discriminated by `type`) or, for bodies over the broker's payload "
            "limit, a ClaimCheck naming the object that holds the full event. Unknown fields are "
            "allowed: v1 evolves additively."
        ),
        "anyOf": [*event_schema["oneOf"], {"$ref": "#/$defs/ClaimCheck"}],
        "$defs": dict(sorted(defs.items())),
    }


def build_routing() -> dict[str, Any]:
    """The value of a key of the ``routing`` KV bucket, for agents in other languages."""
    schema = RoutingTable.model_json_schema(mode="validation")
    schema.update(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://cuneiform.dev/schema/routing.v{ROUTING_VERSION}.schema.json",
            "title": f"Cuneiform routing table, v{ROUTING_VERSION}",
            "description": (
                "The value of key <model_name> in the NATS KV bucket `routing`. An agent's arm: "
                "point = first 8 bytes of sha256('<deployment_id>:<agent_id>') as a big-endian integer / 2^64; "
                "the arms with a positive weight cover [0, sum of weights) in order, each as wide as its weight; "
                "the agent runs the arm its point x the sum falls in, unless `pins` names its version. "
                "Ignore a table whose revision is lower than one already seen."
            ),
        }
    )
    return schema


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def render_routing() -> str:
    return json.dumps(build_routing(), indent=2, sort_keys=True) + "\n"


def write(path: Path = SCHEMA_PATH, routing_path: Path = ROUTING_SCHEMA_PATH) -> Path:
    path.write_text(render())
    routing_path.write_text(render_routing())
    return path
