"""Metrics and health over HTTP, the same three endpoints on every service.

* ``/metrics``: Prometheus text format.
* ``/healthz``: 200 while the process runs its loop (liveness).
* ``/readyz``: 200 when every registered check passes, else 503 with the failing checks (readiness).

A tiny asyncio server instead of a web framework: three fixed routes do not justify a dependency,
and it runs on the service's own event loop so a wedged loop fails the health check as it should.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import orjson
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .logging import get_logger

log = get_logger(__name__)

ReadinessCheck = Callable[[], Awaitable[bool]]

# --- metrics every service shares (label ``service``) ---------------------------------------------------

MESSAGES = Counter(
    "cuneiform_messages_total",
    "Messages a consumer finished with, by outcome (acked, retried, dead_lettered)",
    ["service", "consumer", "outcome"],
)
BATCH_SIZE = Histogram(
    "cuneiform_batch_size",
    "Messages per fetched batch",
    ["service", "consumer"],
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
HANDLER_SECONDS = Histogram(
    "cuneiform_handler_seconds",
    "Time to process (and commit) one batch",
    ["service", "consumer"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMER_PENDING = Gauge(
    "cuneiform_consumer_pending_messages",
    "Messages in the stream not yet delivered to the consumer (lag)",
    ["service", "consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "cuneiform_consumer_ack_pending_messages",
    "Messages delivered to the consumer and not yet acknowledged",
    ["service", "consumer"],
)
DEAD_LETTERS = Counter(
    "cuneiform_dead_letters_total",
    "Messages sent to the dead-letter stream, by reason kind",
    ["service", "consumer", "kind"],
)
UP = Gauge("cuneiform_service_up", "1 while the service is ready", ["service"])


class HealthServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry = REGISTRY) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._checks: dict[str, ReadinessCheck] = {}
        self._server: asyncio.Server | None = None
        #: Set by the service once start-up is complete; /readyz is 503 until then.
        self.started = False

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def readiness(self) -> dict[str, bool]:
        results = {"started": self.started}
        for name, check in self._checks.items():
            try:
                results[name] = await asyncio.wait_for(check(), timeout=2.0)
            except Exception:
                results[name] = False
        return results

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5.0)
            while (await asyncio.wait_for(reader.readline(), timeout=5.0)) not in (b"\r\n", b"\n", b""):
                pass  # headers: nothing here needs them
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else "/"
            status, content_type, body = await self._route(path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            checks = await self.readiness()
            status = "200 OK" if all(checks.values()) else "503 Service Unavailable"
            return status, "application/json", orjson.dumps({"ready": all(checks.values()), "checks": checks})
        return "404 Not Found", "text/plain", b"try /metrics, /healthz or /readyz\n"
