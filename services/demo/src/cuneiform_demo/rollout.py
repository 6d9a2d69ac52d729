"""The demo fleet's side of a rollout: each agent plays the version routing assigns it.

:class:`PolicyBook` is what a real agent process does with the SDK's :class:`~cuneiform_sdk.Routing`:
before each episode, ask which version this agent runs (a stable hash of its id, or a pin), fetch that
version's weights once (the artifact named in the routing table, checked against its sha256) and
stamp the trajectory with the version, the deployment and the arm. Here the "weights" are the tabular
policy's JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import nats
from cuneiform_core.storage import ObjectStore
from cuneiform_sdk import ModelRef, Routing
from cuneiform_sdk.routing import ArtifactRef

from .policy import TabularPolicy

MODEL_NAME = "demo-policy"


class PolicyBook:
    def __init__(self, routing: Routing, store: ObjectStore, fallback: TabularPolicy) -> None:
        self.routing = routing
        self.store = store
        self.fallback = fallback
        self._policies: dict[str, TabularPolicy] = {}
        self._lock = asyncio.Lock()

    async def choose(self, agent_id: str) -> tuple[TabularPolicy, ModelRef]:
        assignment = self.routing.assignment(MODEL_NAME, agent_id)
        if assignment is None:  # nothing deployed: the built-in policy
            return self.fallback, ModelRef(**self.fallback.model)
        policy = await self.policy(assignment.version, assignment.artifact)
        return policy, assignment.model_ref()

    async def policy(self, version: str, artifact: ArtifactRef | None) -> TabularPolicy:
        if version in self._policies:
            return self._policies[version]
        async with self._lock:
            if version not in self._policies:
                if artifact is None:
                    raise RuntimeError(f"routing names {MODEL_NAME} {version} but not where its artifact is")
                body = await self.store.get_bytes(artifact.key)
                if hashlib.sha256(body).hexdigest() != artifact.sha256:
                    raise RuntimeError(f"the artifact of {version} does not match its sha256: refusing to run it")
                loaded = TabularPolicy.loads(body.decode())
                self._policies[version] = TabularPolicy(
                    logits=loaded.logits, name=MODEL_NAME, version=version, temperature=loaded.temperature
                )
        return self._policies[version]


async def ask(nats_url: str, service: str, verb: str, body: dict[str, Any], timeout: float = 30.0) -> Any:
    """``cmd.<service>.<verb>`` (what ``cuneiform-ask`` does); the result, or RuntimeError with the service's error."""
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        reply = await nc.request(f"cmd.{service}.{verb}", json.dumps(body).encode(), timeout=timeout)
    finally:
        await nc.close()
    answer = json.loads(reply.data)
    if not answer.get("ok"):
        raise RuntimeError(f"{service} {verb}: {answer.get('error')}")
    return answer.get("result")


async def register(nats_url: str, store: ObjectStore, policy: TabularPolicy, version: str, why: str) -> dict[str, Any]:
    """Upload ``policy`` and register it as ``version`` (what ``cuneiform-deployer register`` does)."""
    body = policy.dumps().encode()
    key = f"models/{MODEL_NAME}/manual/{version}/artifact"
    await store.put_bytes(key, body, content_type="application/json")
    result: dict[str, Any] = await ask(
        nats_url,
        "deployer",
        "register",
        {
            "model_name": MODEL_NAME,
            "version": version,
            "artifact_key": key,
            "sha256": hashlib.sha256(body).hexdigest(),
            "who": "demo",
            "why": why,
        },
    )
    return result
