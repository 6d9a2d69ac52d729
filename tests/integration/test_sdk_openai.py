"""Calls made through the real ``openai`` client (sync and async) against a small local
OpenAI-compatible server are recorded as ``llm_call`` events on a real nats-server: the messages sent,
the tools offered, the response with its tool calls, sampling parameters, usage and latency."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nats
import openai
import pytest
from cuneiform_core.topology import TRAJECTORIES, Topology, ensure_topology
from cuneiform_sdk import Recorder, SyncRecorder
from cuneiform_sdk.contract import LlmCall
from nats.js import JetStreamContext

from tests.conftest import Servers
from tests.integration.test_sdk_publish import check_exactly_once, read_stream

pytestmark = pytest.mark.integration

#: The fake model thinks this long, so that the recorded latency has something to measure.
DELAY_S = 0.05

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "place_order",
            "description": "Buy or sell a symbol",
            "parameters": {
                "type": "object",
                "properties": {"symbol": {"type": "string"}, "side": {"type": "string", "enum": ["buy", "sell"]}},
                "required": ["symbol", "side"],
            },
        },
    }
]


class FakeModel:
    """An OpenAI-compatible chat completions endpoint on a free loopback port, in a thread."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        model = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                time.sleep(DELAY_S)
                answer = json.dumps(model.completion(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def completion(request: dict[str, Any]) -> dict[str, Any]:
        turn = len(request["messages"])
        if request.get("tools") and request["messages"][-1]["role"] != "tool":
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{turn}",
                        "type": "function",
                        "function": {"name": "place_order", "arguments": '{"symbol": "ACME", "side": "buy"}'},
                    }
                ],
            }
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": f"Done after {turn} messages."}
            finish = "stop"
        return {
            "id": f"chatcmpl-{turn}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "fake-trader-1",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": 30 + turn, "completion_tokens": 7, "total_tokens": 37 + turn},
        }


@pytest.fixture
def fake_model() -> Iterator[FakeModel]:
    model = FakeModel()
    model.thread.start()
    yield model
    model.server.shutdown()
    model.server.server_close()


async def llm_calls(js: JetStreamContext, prefix: str, recorded: dict[Any, int]) -> list[LlmCall]:
    stored = await read_stream(js, Topology(prefix).stream(TRAJECTORIES))
    check_exactly_once(stored, recorded, prefix)
    calls = [e for e in (s.event() for s in stored) if isinstance(e, LlmCall)]
    return sorted(calls, key=lambda c: c.seq)


def check_tool_turn(call: LlmCall, sent: list[dict[str, Any]]) -> None:
    assert call.model == "fake-trader-1"  # the model that answered, as the server named it
    assert call.messages is not None
    assert [m.model_dump(exclude_none=True) for m in call.messages] == sent
    assert call.tools == TOOLS
    assert call.response is not None and call.response.content is None
    assert call.response.tool_calls is not None
    (tool_call,) = call.response.tool_calls
    assert tool_call.id == "call_2" and tool_call.function.name == "place_order"
    assert json.loads(tool_call.function.arguments) == {"symbol": "ACME", "side": "buy"}
    assert call.usage is not None
    assert (call.usage.prompt_tokens, call.usage.completion_tokens, call.usage.total_tokens) == (32, 7, 39)
    assert call.params == {"temperature": 0.2, "max_tokens": 64}
    assert call.latency_ms is not None and DELAY_S * 1000 <= call.latency_ms < 10_000
    assert call.model_extra is not None and call.model_extra.get("finish_reason") == "tool_calls"


def check_final_turn(call: LlmCall) -> None:
    assert call.messages is not None
    assert [m.role for m in call.messages] == ["system", "user", "assistant", "tool"]
    assert call.messages[2].tool_calls is not None and call.messages[2].tool_calls[0].id == "call_2"
    assert call.messages[3].tool_call_id == "call_2"
    assert call.response is not None and call.response.content == "Done after 4 messages."
    assert call.usage is not None and call.usage.prompt_tokens == 34


def first_messages() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You trade ACME."},
        {"role": "user", "content": "The price dropped 5%. Act."},
    ]


def tool_result(tool_call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": tool_call_id, "content": '{"filled": true}'}


async def test_the_async_client_is_recorded(
    servers: Servers, nats_prefix: str, js: JetStreamContext, fake_model: FakeModel, tmp_path: Path
) -> None:
    client = openai.AsyncOpenAI(base_url=fake_model.base_url, api_key="sk-test", max_retries=0)
    async with Recorder(servers.nats_url, prefix=nats_prefix, outbox_dir=tmp_path / "outbox") as recorder:
        async with recorder.trajectory(agent_id="llm-trader", model="fake-trader") as t:
            llm = t.openai(client)
            t.step(observation="price dropped")
            messages = first_messages()
            first = await llm.chat.completions.create(
                model="fake-trader", messages=messages, tools=TOOLS, temperature=0.2, max_tokens=64
            )
            # The agent gets the real response object, untouched.
            assert isinstance(first, openai.types.chat.ChatCompletion)
            tool_call = first.choices[0].message.tool_calls[0]
            messages = [*messages, first.choices[0].message, tool_result(tool_call.id)]  # the usual agent loop
            second = await llm.chat.completions.create(model="fake-trader", messages=messages, tools=TOOLS)
            assert second.choices[0].message.content == "Done after 4 messages."
            assert llm.models is client.models  # everything else passes through
        assert await recorder.flush(timeout=30)
    assert [r["body"]["model"] for r in fake_model.requests] == ["fake-trader", "fake-trader"]
    assert fake_model.requests[0]["auth"] == "Bearer sk-test"
    first_call, second_call = await llm_calls(js, nats_prefix, {t.trajectory_id: 5})
    check_tool_turn(first_call, first_messages())
    check_final_turn(second_call)
    assert first_call.step == second_call.step == 0


def test_the_sync_client_is_recorded(servers: Servers, nats_prefix: str, fake_model: FakeModel, tmp_path: Path) -> None:
    async def topology() -> None:
        nc = await nats.connect(servers.nats_url)
        await ensure_topology(nc.jetstream(), Topology(nats_prefix, storage_gib=0.05))
        await nc.close()

    asyncio.run(topology())
    client = openai.OpenAI(base_url=fake_model.base_url, api_key="sk-test", max_retries=0)
    with SyncRecorder(servers.nats_url, prefix=nats_prefix, outbox_dir=tmp_path / "outbox") as recorder:
        with recorder.trajectory(agent_id="sync-trader", model="fake-trader") as t:
            llm = t.openai(client)
            messages = first_messages()
            first = llm.chat.completions.create(
                model="fake-trader", messages=messages, tools=TOOLS, temperature=0.2, max_tokens=64
            )
            tool_call = first.choices[0].message.tool_calls[0]
            messages = [*messages, first.choices[0].message.model_dump(exclude_none=True), tool_result(tool_call.id)]
            llm.chat.completions.create(model="fake-trader", messages=messages, tools=TOOLS)
        assert recorder.flush(timeout=30)

    async def check() -> None:
        nc = await nats.connect(servers.nats_url)
        try:
            first_call, second_call = await llm_calls(nc.jetstream(), nats_prefix, {t.trajectory_id: 4})
        finally:
            await nc.close()
        check_tool_turn(first_call, first_messages())
        check_final_turn(second_call)

    asyncio.run(check())


async def test_a_failed_llm_call_raises_as_usual_and_records_nothing(
    servers: Servers, nats_prefix: str, js: JetStreamContext, tmp_path: Path
) -> None:
    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="sk-test", max_retries=0, timeout=2)
    async with Recorder(servers.nats_url, prefix=nats_prefix, outbox_dir=tmp_path / "outbox") as recorder:
        async with recorder.trajectory(agent_id="unlucky", model="m") as t:
            with pytest.raises(openai.APIConnectionError):
                await t.openai(client).chat.completions.create(model="m", messages=first_messages())
        assert await recorder.flush(timeout=30)
    assert await llm_calls(js, nats_prefix, {t.trajectory_id: 2}) == []
