"""Which model version an agent runs: the routing table, stable assignment, and a live client.

The deployer writes one **routing table** per model name into the NATS KV bucket ``routing`` (key: the
model name). A table is the current deployment: its arms (a version and a weight each, plus where its
artifact is), and agents pinned to a version. An agent's arm is a pure function of the table and its
id (:func:`assign`), so every process of the fleet — in any language — agrees on it without asking
anyone, and an agent keeps its arm for the whole deployment:

* the agent's **point** is ``sha256("<deployment_id>:<agent_id>")``, its first 8 bytes as a fraction of
  2^64 — uniform over [0, 1), fixed for the deployment (a new deployment reshuffles, so one unlucky
  cohort is not the canary of every rollout);
* the arms cover [0, 1) in table order, each a slice as wide as its share of the weights; the agent runs
  the arm its point falls in. The deployer lists challengers first, so raising a canary from 10 % to
  50 % only adds agents to it: nobody already on the canary moves back;
* a pinned agent runs its pinned version, whatever its point.

:class:`Routing` watches the bucket (every change arrives within milliseconds; a rollback reaches the
fleet in well under a second), keeps the tables in memory, and answers :meth:`Routing.model_for` with a
``ModelRef`` (name, version, deployment id, variant) to pass to ``recorder.trajectory(model=...)`` —
that is how every trajectory is stamped with the version and deployment it ran under.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Literal, NamedTuple

import nats
from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .contract import ModelRef

log = logging.getLogger(__name__)

ROUTING_BUCKET = "routing"
ROUTING_VERSION = 1
#: KV keys allow ``[-/_=.a-zA-Z0-9]``; a model name is a key.
MODEL_NAME_PATTERN = r"^[-/_=.a-zA-Z0-9]{1,200}$"

Variant = Literal["champion", "challenger", "pinned"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class ArtifactRef(_Frozen):
    """Where a version's weights are: an object in the deployment's bucket, with its checksum."""

    bucket: str
    key: str
    sha256: str
    size: int | None = None


class Arm(_Frozen):
    version: str = Field(min_length=1)
    weight: float = Field(ge=0)
    role: Literal["champion", "challenger"] = "champion"
    artifact: ArtifactRef | None = None


class RoutingTable(_Frozen):
    """The value of key ``<model_name>`` in the ``routing`` bucket (JSON)."""

    v: int = ROUTING_VERSION
    model_name: str = Field(pattern=MODEL_NAME_PATTERN)
    deployment_id: str
    strategy: Literal["immediate", "canary", "ab"]
    #: Grows with every change the deployer makes to this model's routing, across deployments.
    revision: int = Field(ge=1)
    arms: list[Arm] = Field(min_length=1)
    pins: dict[str, str] = Field(default_factory=dict)
    #: Artifacts of pinned versions that are not an arm.
    artifacts: dict[str, ArtifactRef] = Field(default_factory=dict)
    updated_at: datetime | None = None

    @model_validator(mode="after")
    def _positive_total(self) -> RoutingTable:
        if sum(a.weight for a in self.arms) <= 0:
            raise ValueError("a routing table needs at least one arm with a positive weight")
        return self

    @functools.cached_property
    def slices(self) -> tuple[list[float], list[Arm]]:
        """The arms with a positive weight and the upper edges of their slices (cumulative weights)."""
        arms = [a for a in self.arms if a.weight > 0]
        return list(itertools.accumulate(a.weight for a in arms)), arms

    def artifact(self, version: str) -> ArtifactRef | None:
        for arm in self.arms:
            if arm.version == version:
                return arm.artifact
        return self.artifacts.get(version)


class Assignment(NamedTuple):
    """Which version an agent runs, under which deployment and arm (an immutable tuple: the hot path)."""

    model_name: str
    version: str
    deployment_id: str
    variant: Variant
    revision: int
    artifact: ArtifactRef | None = None

    def model_ref(self) -> ModelRef:
        return _model_ref(self.model_name, self.version, self.deployment_id, self.variant)


@functools.lru_cache(maxsize=4096)
def _model_ref(name: str, version: str, deployment_id: str, variant: str) -> ModelRef:
    # A handful of distinct (version, arm) pairs per deployment: built (and validated) once, shared (frozen).
    return ModelRef(name=name, version=version, deployment_id=deployment_id, variant=variant)


def point(deployment_id: str, agent_id: str) -> float:
    """The agent's fixed place in [0, 1) for this deployment."""
    digest = hashlib.sha256(f"{deployment_id}:{agent_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(table: RoutingTable, agent_id: str) -> Assignment:
    """The arm ``agent_id`` runs under ``table`` (see the module docstring)."""
    pinned = table.pins.get(agent_id)
    variant: Variant
    if pinned is not None:
        version, variant, artifact = pinned, "pinned", table.artifact(pinned)
    else:
        edges, arms = table.slices
        at = point(table.deployment_id, agent_id) * edges[-1]
        arm = arms[min(bisect.bisect_right(edges, at), len(arms) - 1)]
        version, variant, artifact = arm.version, arm.role, arm.artifact
    return Assignment(table.model_name, version, table.deployment_id, variant, table.revision, artifact)


def routing_bucket(prefix: str = "") -> str:
    return f"{prefix}_{ROUTING_BUCKET}" if prefix else ROUTING_BUCKET


class Routing:
    """A live, in-memory copy of the ``routing`` bucket.

    ``async with Routing() as routing: ref = routing.model_for("my-model", agent_id)``. ``start`` returns
    once every current table is loaded (or the bucket does not exist yet: then it keeps looking, and
    ``model_for`` answers with the bare name until a table appears). Changes are applied as they
    arrive; ``on_change`` callbacks run for each (in the event loop; keep them quick).
    """

    def __init__(
        self,
        nats_url: str | None = None,
        *,
        prefix: str | None = None,
        nc: Client | None = None,
        retry_interval: float = 1.0,
    ) -> None:
        self.nats_url = nats_url or os.environ.get("CUNEIFORM_NATS_URL", "nats://127.0.0.1:4222")
        prefix = prefix if prefix is not None else os.environ.get("CUNEIFORM_NATS_PREFIX", "")
        self.bucket = routing_bucket(prefix)
        self._nc = nc
        self._own_connection = nc is None
        self._tables: dict[str, RoutingTable] = {}
        self._callbacks: list[Callable[[str, RoutingTable | None], None]] = []
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._retry = retry_interval
        #: Updates applied, and values that were not a valid table (kept out of the cache).
        self.updates = 0
        self.rejected = 0

    # --- answers ------------------------------------------------------------------------------------------

    def table(self, model_name: str) -> RoutingTable | None:
        return self._tables.get(model_name)

    def tables(self) -> dict[str, RoutingTable]:
        return dict(self._tables)

    def assignment(self, model_name: str, agent_id: str) -> Assignment | None:
        table = self._tables.get(model_name)
        return None if table is None else assign(table, agent_id)

    def model_for(self, model_name: str, agent_id: str) -> ModelRef:
        """What to stamp on ``agent_id``'s next trajectory: its assigned version and deployment, or just
        the name while no deployment of ``model_name`` exists."""
        found = self.assignment(model_name, agent_id)
        return found.model_ref() if found is not None else ModelRef(name=model_name)

    def on_change(self, callback: Callable[[str, RoutingTable | None], None]) -> None:
        self._callbacks.append(callback)

    async def wait_for(
        self, predicate: Callable[[dict[str, RoutingTable]], bool], timeout: float | None = None
    ) -> None:
        """Until ``predicate(tables)`` holds (checked now and after every change)."""
        changed = asyncio.Event()

        def wake(_: str, __: RoutingTable | None) -> None:
            changed.set()

        self._callbacks.append(wake)
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.tables()):
                    await changed.wait()
                    changed.clear()
        finally:
            self._callbacks.remove(wake)

    # --- life cycle ---------------------------------------------------------------------------------------

    async def start(self, timeout: float | None = 10.0) -> None:
        if self._nc is None:
            self._nc = await nats.connect(
                self.nats_url, name="cuneiform-sdk-routing", max_reconnect_attempts=-1, reconnect_time_wait=0.5
            )
        self._task = asyncio.create_task(self._watch(), name="cuneiform-routing-watch")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._loaded.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: closing must not hang on a connection that is going away.
            await asyncio.wait({self._task}, timeout=5.0)
        if self._own_connection and self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._nc.close(), timeout=5.0)

    async def __aenter__(self) -> Routing:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _watch(self) -> None:
        assert self._nc is not None
        js = self._nc.jetstream()
        while True:
            try:
                kv = await js.key_value(self.bucket)
            except BucketNotFoundError:
                self._loaded.set()  # nothing deployed yet: answer with bare names meanwhile
                await asyncio.sleep(self._retry)
                continue
            except Exception as error:  # connection trouble: nats-py reconnects; look again shortly
                log.warning("routing: cannot open bucket %s: %r", self.bucket, error)
                await asyncio.sleep(self._retry)
                continue
            try:
                await self._follow(kv)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("routing: watch of %s ended (%r); resuming", self.bucket, error)
                await asyncio.sleep(self._retry)

    async def _follow(self, kv: KeyValue) -> None:
        # Latest value per key first (then a None marker), then every change as it happens.
        watcher = await kv.watchall()
        try:
            seen: set[str] = set()
            initial = True
            async for entry in watcher:
                if entry is None:
                    if initial:
                        # Tables deleted while we were not watching.
                        for gone in set(self._tables) - seen:
                            self._apply(gone, None)
                        initial = False
                        self._loaded.set()
                    continue
                seen.add(entry.key)
                if entry.operation in ("DEL", "PURGE") or entry.value is None or not entry.value:
                    self._apply(entry.key, None)
                    continue
                try:
                    table = RoutingTable.model_validate_json(entry.value)
                except ValidationError as error:
                    self.rejected += 1
                    log.warning("routing: key %s holds no valid routing table: %s", entry.key, error)
                    continue
                current = self._tables.get(entry.key)
                if current is not None and current.revision > table.revision:
                    continue  # never step back (revisions only grow, across deployments too)
                self._apply(entry.key, table)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watcher.stop(), timeout=2.0)  # type: ignore[no-untyped-call]

    def _apply(self, key: str, table: RoutingTable | None) -> None:
        if table is None:
            if self._tables.pop(key, None) is None:
                return
        else:
            self._tables[key] = table
        self.updates += 1
        for callback in list(self._callbacks):
            try:
                callback(key, table)
            except Exception:
                log.exception("routing: on_change callback failed")


class SyncRouting:
    """:class:`Routing` for synchronous agents: the watch runs on a background thread, and the answers
    (``model_for``, ``assignment``, ``table``) are plain in-memory reads, safe from any thread.

    ``with SyncRouting() as routing: ref = routing.model_for("my-model", agent_id)``
    """

    def __init__(self, nats_url: str | None = None, **options: object) -> None:
        self._nats_url = nats_url
        self._options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cuneiform-routing", daemon=True)
        self._routing: Routing | None = None

    def start(self, timeout: float = 10.0) -> SyncRouting:
        if self._routing is None:
            self._thread.start()
            routing = Routing(self._nats_url, **self._options)  # type: ignore[arg-type]
            asyncio.run_coroutine_threadsafe(routing.start(timeout), self._loop).result(timeout + 5)
            self._routing = routing
        return self

    @property
    def routing(self) -> Routing:
        if self._routing is None:
            raise RuntimeError("SyncRouting not started: use `with SyncRouting() as routing:` or .start()")
        return self._routing

    def table(self, model_name: str) -> RoutingTable | None:
        return self.routing.table(model_name)

    def assignment(self, model_name: str, agent_id: str) -> Assignment | None:
        return self.routing.assignment(model_name, agent_id)

    def model_for(self, model_name: str, agent_id: str) -> ModelRef:
        return self.routing.model_for(model_name, agent_id)

    def close(self) -> None:
        if self._routing is not None:
            asyncio.run_coroutine_threadsafe(self._routing.close(), self._loop).result(10)
            self._routing = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> SyncRouting:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
