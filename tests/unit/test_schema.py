"""The committed JSON Schema is what producers in other languages validate against: it must match
the pydantic models exactly, and it must accept and reject what the models accept and reject."""

from __future__ import annotations

import json

import jsonschema
import pytest
from cuneiform_sdk.contract import ContractError, dump_event, parse_event
from cuneiform_sdk.routing import Arm, RoutingTable
from cuneiform_sdk.schema.generate import ROUTING_SCHEMA_PATH, SCHEMA_PATH, render, render_routing

from .test_contract import envelope, one_of_each


def test_committed_schema_is_current() -> None:
    assert SCHEMA_PATH.read_text() == render(), (
        "libs/sdk/src/cuneiform_sdk/schema/events.v1.schema.json is stale: "
        "run `make schema` (python -m cuneiform_sdk.schema) and commit the result"
    )


def test_the_routing_schema_is_current_and_accepts_what_the_deployer_writes() -> None:
    assert ROUTING_SCHEMA_PATH.read_text() == render_routing(), "routing.v1.schema.json is stale: run `make schema`"
    schema = json.loads(ROUTING_SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    table = RoutingTable(
        model_name="demo-policy",
        deployment_id="d-1",
        strategy="canary",
        revision=3,
        arms=[Arm(version="v2", weight=0.1, role="challenger"), Arm(version="v1", weight=0.9)],
        pins={"agent-7": "v1"},
    )
    jsonschema.validate(table.model_dump(mode="json"), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**table.model_dump(mode="json"), "revision": 0}, schema)


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("event", one_of_each(), ids=lambda e: e.type)
def test_schema_accepts_every_valid_event(validator: jsonschema.Draft202012Validator, event: object) -> None:
    validator.validate(json.loads(dump_event(event)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        envelope(0, type="step", step="three"),
        envelope(0, type="step", step=0) | {"v": 2},
        envelope(0, type="teleport"),
        envelope(0, type="trajectory_started"),
        envelope(0, type="trajectory_ended", status="done", event_count=1),
    ],
)
def test_schema_and_models_agree_on_rejections(validator: jsonschema.Draft202012Validator, bad: dict) -> None:
    assert not validator.is_valid(bad)
    with pytest.raises(ContractError):
        parse_event(json.dumps(bad))
