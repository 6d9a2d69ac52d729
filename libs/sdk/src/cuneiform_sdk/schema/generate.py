"""Builds the JSON Schema of the contract from the pydantic models, byte-for-byte reproducibly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from ..contract import CONTRACT_VERSION, ClaimCheck, Event

SCHEMA_PATH = Path(__file__).with_name(f"events.v{CONTRACT_VERSION}.schema.json")


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


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def write(path: Path = SCHEMA_PATH) -> Path:
    path.write_text(render())
    return path
