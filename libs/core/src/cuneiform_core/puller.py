"""A lean JetStream pull client for batch consumers.

nats-py's ``PullSubscription.fetch`` awaits every message through ``asyncio.wait_for`` on a queue,
which costs tens of microseconds a message — more than validating the event. This puller lets the
subscription's callback collect deliveries into a list and wakes the waiting fetch once per batch:

1. a ``no_wait`` request takes whatever is pending at once (up to ``batch``);
2. only when nothing was pending, a long-poll request (``expires`` = ``max_wait``) waits for the
   first message.

Deliveries that arrive for a long-poll request after its fetch returned are kept and handed out by
the next fetch, so a message is never left unprocessed while this puller runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

_STATUS = "Status"
#: 404 no messages (no_wait), 408 request expired, 409 conflict (e.g. max waiting), 503 no responders.
_REQUEST_ENDED = {"404", "408", "409", "503"}
#: Per pull request: a batch of large events must not become gigabytes in memory.
MAX_BATCH_BYTES = 64 * 1024 * 1024


class ConsumerUnavailableError(RuntimeError):
    """The durable consumer did not answer (deleted, no JetStream, leadership lost): retry, recreate."""


class Puller:
    def __init__(self, nc: Client, stream: str, consumer: str, api_prefix: str = "$JS.API") -> None:
        self._nc = nc
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._buffer: list[Msg] = []
        self._signal = asyncio.Event()
        self._ended = 0
        self._trouble: str | None = None
        self._sub: Subscription | None = None
        self._inbox = ""

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        # Generous pending limits: a whole batch of large events sits here between fetches.
        self._sub = await self._nc.subscribe(
            self._inbox, cb=self._on_message, pending_msgs_limit=1_000_000, pending_bytes_limit=1024**3
        )

    async def stop(self) -> None:
        """Unsubscribe after handing every delivery already received to the buffer (drain)."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.drain()  # type: ignore[no-untyped-call]
            self._sub = None

    def take_buffered(self) -> list[Msg]:
        taken, self._buffer = self._buffer, []
        return taken

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None:
            self._buffer.append(msg)
            self._signal.set()
        elif status in _REQUEST_ENDED:
            self._ended += 1
            description = (msg.headers or {}).get("Description", "")
            # 503: no responders; 409 "Consumer Deleted" / "Consumer is push based": the consumer is
            # gone. Other 409s (e.g. "Exceeded MaxWaiting") and 404/408 just end the request.
            if status == "503" or (status == "409" and "consumer" in description.lower()):
                self._trouble = f"{status} {description}".strip()
            self._signal.set()
        # 100: idle heartbeat / flow control; nothing to do.

    async def fetch(self, batch: int, max_wait: float) -> list[Msg]:
        """Up to ``batch`` messages: at once if any are pending, else waiting up to ``max_wait``."""
        if self._buffer:
            return self._take(batch)
        self._raise_trouble()
        ended = self._ended
        await self._request({"batch": batch, "no_wait": True, "max_bytes": MAX_BATCH_BYTES})
        await self._wait(lambda: len(self._buffer) >= batch or self._ended > ended, max_wait)
        if self._buffer:
            return self._take(batch)
        self._raise_trouble()
        ended = self._ended
        await self._request({"batch": batch, "expires": int(max_wait * 1e9), "max_bytes": MAX_BATCH_BYTES})
        await self._wait(lambda: bool(self._buffer) or self._ended > ended, max_wait + 0.5)
        if not self._buffer:
            self._raise_trouble()
        return self._take(batch)

    def _raise_trouble(self) -> None:
        trouble, self._trouble = self._trouble, None
        if trouble is not None:
            raise ConsumerUnavailableError(f"pull request refused: {trouble}")

    def _take(self, batch: int) -> list[Msg]:
        taken, self._buffer = self._buffer[:batch], self._buffer[batch:]
        return taken

    async def _request(self, body: dict[str, object]) -> None:
        await self._nc.publish(self._next_subject, json.dumps(body).encode(), reply=self._inbox)

    async def _wait(self, done: object, timeout: float) -> None:
        assert callable(done)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not done():
            self._signal.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._signal.wait(), remaining)
