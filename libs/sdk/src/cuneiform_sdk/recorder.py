"""Recording API for agents.

::

    async with Recorder() as recorder:
        async with recorder.trajectory(agent_id="trader-7", scenario_id="market-open", model="qwen2.5-7b") as t:
            t.step(environment={"cash": 1000}, observation="market opened")
            t.llm_call(messages=[...], response={"role": "assistant", "content": "buy"})
            t.action("buy", {"symbol": "ACME"}, success=True)
            t.reward(1.5)

Every record call validates its arguments against the contract (a mistake raises at once, where it
was made) and only enqueues: publishing happens in the background (see ``publisher``). Leaving the
block sends ``trajectory_ended`` with the ``event_count`` that proves completeness — status
``failed`` with the error if the block raised. The same trajectory object works with plain ``with``
in synchronous agents (``SyncRecorder``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

from pydantic import JsonValue

from .contract import (
    Action,
    Envelope,
    LlmCall,
    ModelRef,
    ProviderAccess,
    Reward,
    Step,
    TrajectoryEnded,
    TrajectoryStarted,
    hour_window,
)
from .ids import uuid7
from .outbox import DiskOutbox
from .publisher import Publisher, PublisherStats, Redactor
from .subjects import trajectory_subject

Submit = Callable[[Envelope, str, bool], None]
ModelLike = ModelRef | str | Mapping[str, Any]


def _model_ref(model: ModelLike) -> ModelRef:
    if isinstance(model, ModelRef):
        return model
    if isinstance(model, str):
        return ModelRef(name=model)
    return ModelRef.model_validate(dict(model))


class TrajectoryRecording:
    """One episode of one agent; create it with ``Recorder.trajectory``."""

    def __init__(
        self,
        submit: Submit,
        *,
        agent_id: str,
        model: ModelLike,
        scenario_id: str | None = None,
        episode_id: str | None = None,
        environment: JsonValue = None,
        metadata: Mapping[str, JsonValue] | None = None,
        trajectory_id: uuid.UUID | None = None,
        prefix: str = "",
    ) -> None:
        self._submit = submit
        self.agent_id = agent_id
        self.trajectory_id = trajectory_id or uuid7()
        self.model = _model_ref(model)
        self.scenario_id = scenario_id or hour_window()
        self._episode_id = episode_id
        self._environment = environment if environment is not None else {}
        self._metadata = dict(metadata or {})
        self._prefix = prefix
        self._subjects: dict[str, str] = {}
        self._seq = 0
        self._step = -1
        self.started = False
        self.ended = False
        self.total_reward = 0.0

    # --- the record calls ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.started:
            return
        self._emit(
            TrajectoryStarted(
                **self._envelope("trajectory_started"),
                scenario_id=self.scenario_id,
                episode_id=self._episode_id,
                model=self.model,
                environment=self._environment,
                metadata=self._metadata,
            )
        )
        self.started = True

    def step(self, step: int | None = None, *, environment: JsonValue = None, observation: JsonValue = None) -> int:
        """Begin a step (numbered 0, 1, 2… unless given); later calls default to this step."""
        number = self._step + 1 if step is None else step
        self._emit(
            Step(
                **self._envelope("step"),
                step=number,
                environment=environment if environment is not None else {},
                observation=observation,
            )
        )
        self._step = number
        return number

    def llm_call(
        self,
        *,
        model: str | None = None,
        messages: list[Mapping[str, Any]] | None = None,
        response: Mapping[str, Any] | None = None,
        system_prompt: str | None = None,
        user_prompt: str | None = None,
        response_text: str | None = None,
        purpose: Literal["action", "reasoning", "evaluation", "response", "other"] = "action",
        tools: list[Mapping[str, Any]] | None = None,
        reasoning: str | None = None,
        params: Mapping[str, Any] | None = None,
        usage: Mapping[str, int] | None = None,
        latency_ms: float | None = None,
        logprobs: JsonValue = None,
        call_id: str | None = None,
        step: int | None = None,
        **extra: Any,
    ) -> str:
        """Record one LLM call: chat form (``messages`` + ``response``) or simple form
        (``system_prompt`` + ``user_prompt`` + ``response_text``). Returns its ``call_id``."""
        call_id = call_id or str(uuid7())
        # Plain values in, validated (and copied: later changes to the agent's lists don't leak in).
        fields: dict[str, Any] = {
            "step": self._current(step),
            "call_id": call_id,
            "model": model or self.model.name,
            "purpose": purpose,
            "messages": messages,
            "response": response,
            "system_prompt": system_prompt,
            "user_prompt": user_prompt,
            "response_text": response_text,
            "tools": tools,
            "reasoning": reasoning,
            "params": dict(params) if params is not None else None,
            "usage": usage,
            "latency_ms": latency_ms,
            "logprobs": logprobs,
        }
        self._emit(LlmCall(**self._envelope("llm_call"), **fields, **extra))
        return call_id

    def provider_access(
        self,
        provider: str,
        data: JsonValue,
        *,
        query: JsonValue = None,
        purpose: str = "context",
        provider_id: str | None = None,
        step: int | None = None,
    ) -> None:
        """Record a read of context or tool data that informed the agent's decision."""
        self._emit(
            ProviderAccess(
                **self._envelope("provider_access"),
                step=self._current(step),
                provider=provider,
                provider_id=provider_id,
                query=query,
                data=data,
                purpose=purpose,
            )
        )

    def action(
        self,
        action_type: str,
        parameters: Mapping[str, JsonValue] | None = None,
        *,
        success: bool = True,
        result: JsonValue = None,
        error: str | None = None,
        llm_call_id: str | None = None,
        reward: float | None = None,
        step: int | None = None,
    ) -> None:
        self._emit(
            Action(
                **self._envelope("action"),
                step=self._current(step),
                action_type=action_type,
                parameters=dict(parameters or {}),
                success=success,
                result=result,
                error=error,
                llm_call_id=llm_call_id,
                reward=reward,
            )
        )

    def reward(
        self,
        value: float,
        *,
        name: str = "reward",
        source: str = "environment",
        reason: str | None = None,
        step: int | None = None,
        whole_trajectory: bool = False,
    ) -> None:
        """A reward for the current step (or ``step``), or for the whole trajectory."""
        self._emit(
            Reward(
                **self._envelope("reward"),
                step=None if whole_trajectory else self._current(step),
                source=source,
                name=name,
                value=value,
                reason=reason,
            )
        )
        self.total_reward += value

    def end(
        self,
        status: Literal["completed", "failed", "aborted"] = "completed",
        *,
        total_reward: float | None = None,
        metrics: Mapping[str, float | int | bool] | None = None,
        environment: JsonValue = None,
        error: str | None = None,
    ) -> None:
        """Close the trajectory; ``event_count`` counts every event sent for it, this one included."""
        if self.ended:
            return
        envelope = self._envelope("trajectory_ended")
        event = TrajectoryEnded(
            **envelope,
            status=status,
            total_reward=self.total_reward if total_reward is None else total_reward,
            metrics=dict(metrics or {}),
            environment=environment if environment is not None else {},
            event_count=envelope["seq"] + 1,
            error=error,
        )
        self._submit(event, self._subject("trajectory_ended"), True)
        self._seq += 1
        self.ended = True

    def openai(self, client: Any) -> Any:
        """Wrap an ``openai`` client so every chat completion through it is recorded here."""
        from .openai_wrapper import RecordingOpenAI

        return RecordingOpenAI(client, self)

    @property
    def current_step(self) -> int:
        return max(self._step, 0)

    # --- context managers (async and sync alike: nothing here waits) ----------------------------------

    def __enter__(self) -> TrajectoryRecording:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.end("completed")
        elif isinstance(exc, Exception):
            self.end("failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        else:  # cancelled, interrupted: the agent stopped rather than failed
            self.end("aborted", error=type(exc).__name__)

    async def __aenter__(self) -> TrajectoryRecording:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    # --- internals -------------------------------------------------------------------------------------

    def _current(self, step: int | None) -> int:
        return step if step is not None else max(self._step, 0)

    def _envelope(self, event_type: str) -> dict[str, Any]:
        if self.ended:
            raise RuntimeError(f"trajectory {self.trajectory_id} has ended; start a new one to record more")
        if not self.started and event_type != "trajectory_started":
            self.start()
        # ``seq`` is taken only once the event is built and handed over (``_emit``): a call with
        # invalid arguments raises without leaving a gap that would keep the trajectory incomplete.
        return {
            "v": 1,
            "event_id": uuid7(),
            "trajectory_id": self.trajectory_id,
            "agent_id": self.agent_id,
            "seq": self._seq,
            "occurred_at": datetime.now(UTC),
        }

    def _subject(self, event_type: str) -> str:
        subject = self._subjects.get(event_type)
        if subject is None:
            subject = self._subjects[event_type] = trajectory_subject(self.agent_id, event_type, self._prefix)
        return subject

    def _emit(self, event: Envelope) -> None:
        self._submit(event, self._subject(event.type), False)
        self._seq += 1


def default_outbox_dir() -> Path:
    return Path(os.environ.get("CUNEIFORM_OUTBOX_DIR", ".cuneiform/outbox/default"))


class ModelResolver(Protocol):
    def model_for(self, model_name: str, agent_id: str) -> ModelRef: ...


class TrajectoryFactory:
    """``trajectory()``, shared by ``Recorder`` and ``SyncRecorder``: they differ only in how an
    event reaches the publisher (``_submit``) and where the subject prefix comes from."""

    #: A ``Routing`` (or ``SyncRouting``): a model given by name only is resolved through it.
    routing: ModelResolver | None = None

    @property
    def prefix(self) -> str:
        raise NotImplementedError

    def _submit(self, event: Envelope, subject: str, is_end: bool) -> None:
        raise NotImplementedError

    def trajectory(
        self,
        *,
        agent_id: str,
        model: ModelLike,
        scenario_id: str | None = None,
        episode_id: str | None = None,
        environment: JsonValue = None,
        metadata: Mapping[str, JsonValue] | None = None,
        trajectory_id: uuid.UUID | None = None,
    ) -> TrajectoryRecording:
        """A new trajectory of ``agent_id``; use it with ``async with``/``with``, or call ``start()``.

        With a ``routing`` client attached, a ``model`` given by name alone (``"demo-policy"``) is stamped
        with the version, deployment and arm routing assigns this agent."""
        if self.routing is not None and isinstance(model, str):
            model = self.routing.model_for(model, agent_id)
        return TrajectoryRecording(
            self._submit,
            agent_id=agent_id,
            model=model,
            scenario_id=scenario_id,
            episode_id=episode_id,
            environment=environment,
            metadata=metadata,
            trajectory_id=trajectory_id,
            prefix=self.prefix,
        )


class Recorder(TrajectoryFactory):
    """The agent's connection to Cuneiform; one per process, shared by all its trajectories."""

    def __init__(
        self,
        nats_url: str | None = None,
        *,
        prefix: str | None = None,
        outbox_dir: Path | str | None = None,
        redact: Redactor | None = None,
        batch_size: int = 512,
        max_buffer: int = 50_000,
        ack_timeout: float = 5.0,
        spill_after: float = 2.0,
        routing: ModelResolver | None = None,
    ) -> None:
        self.routing = routing
        self.nats_url = nats_url or os.environ.get("CUNEIFORM_NATS_URL", "nats://127.0.0.1:4222")
        self._prefix = prefix if prefix is not None else os.environ.get("CUNEIFORM_NATS_PREFIX", "")
        self.outbox = DiskOutbox(Path(outbox_dir) if outbox_dir is not None else default_outbox_dir())
        self._publisher = Publisher(
            self.nats_url,
            self.outbox,
            prefix=self._prefix,
            redact=redact,
            batch_size=batch_size,
            max_buffer=max_buffer,
            ack_timeout=ack_timeout,
            spill_after=spill_after,
        )

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def stats(self) -> PublisherStats:
        return self._publisher.stats

    @property
    def connected(self) -> bool:
        return self._publisher.connected

    def _submit(self, event: Envelope, subject: str, is_end: bool) -> None:
        self._publisher.submit(event, subject, is_end)

    async def start(self) -> None:
        await self._publisher.start()

    async def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every event recorded so far is in the stream; False on timeout."""
        return await self._publisher.flush(timeout)

    async def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered in ``timeout``; the rest waits in the outbox for next time."""
        await self._publisher.close(timeout)

    async def __aenter__(self) -> Recorder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
