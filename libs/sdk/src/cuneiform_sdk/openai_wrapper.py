"""Automatic recording of calls made through an OpenAI-compatible client (the ``openai`` package).

``t.openai(client)`` returns a stand-in for ``client`` whose ``chat.completions.create`` calls the
real client and records the call — messages, tools, the response (tool calls included), sampling
parameters, token usage and latency — as an ``llm_call`` of trajectory ``t``. Sync and async
clients alike; every other attribute passes through untouched. Streaming responses are passed
through unrecorded (assemble them and call ``t.llm_call`` yourself).
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recorder import TrajectoryRecording

log = logging.getLogger("cuneiform_sdk")

_PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop", "n", "response_format")


def _plain(value: Any) -> Any:
    """openai's response objects are pydantic models; the contract wants plain JSON."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _record(t: TrajectoryRecording, request: dict[str, Any], completion: Any, started: float) -> None:
    """Record one completion; a failure here is logged, never raised into the agent's call."""
    latency_ms = (time.perf_counter() - started) * 1000
    try:
        choice = completion.choices[0]
        message = _plain(choice.message)
        response = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            response["tool_calls"] = message["tool_calls"]
        usage = getattr(completion, "usage", None)
        recorded_usage = None
        if usage is not None and usage.prompt_tokens is not None and usage.completion_tokens is not None:
            recorded_usage = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
            if getattr(usage, "total_tokens", None) is not None:
                recorded_usage["total_tokens"] = usage.total_tokens
        t.llm_call(
            model=getattr(completion, "model", None) or request.get("model"),
            messages=_plain(list(request.get("messages", []))),
            tools=_plain(request["tools"]) if request.get("tools") else None,
            response=response,
            reasoning=message.get("reasoning_content") or message.get("reasoning"),
            params={k: _plain(request[k]) for k in _PARAMS if k in request} or None,
            usage=recorded_usage,
            latency_ms=latency_ms,
            logprobs=_plain(getattr(choice, "logprobs", None)),
            finish_reason=getattr(choice, "finish_reason", None),
        )
    except Exception:
        # The agent's LLM call succeeded; recording it must not turn that into a failure. A call on a
        # trajectory that has ended is the agent's mistake, though, and raises like any record call.
        if t.ended:
            raise
        log.exception("cuneiform: could not record an llm_call from the openai client")


class _Completions:
    def __init__(self, completions: Any, trajectory: TrajectoryRecording) -> None:
        self._completions = completions
        self._trajectory = trajectory

    def create(self, **request: Any) -> Any:
        started = time.perf_counter()
        result = self._completions.create(**request)
        if request.get("stream"):
            return result
        # openai's AsyncCompletions.create is a plain function returning a coroutine (it is wrapped
        # by a decorator), so tell sync from async by what comes back, not by inspecting the method.
        if inspect.isawaitable(result):
            return self._finish_async(result, request, started)
        _record(self._trajectory, request, result, started)
        return result

    async def _finish_async(self, pending: Any, request: dict[str, Any], started: float) -> Any:
        completion = await pending
        _record(self._trajectory, request, completion, started)
        return completion

    def __getattr__(self, name: str) -> Any:
        return getattr(self._completions, name)


class _Chat:
    def __init__(self, chat: Any, trajectory: TrajectoryRecording) -> None:
        self.completions = _Completions(chat.completions, trajectory)
        self._chat = chat

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chat, name)


class RecordingOpenAI:
    def __init__(self, client: Any, trajectory: TrajectoryRecording) -> None:
        self.chat = _Chat(client.chat, trajectory)
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)
