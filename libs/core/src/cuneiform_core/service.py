"""The life of one service process, the same for every service.

``Service`` owns the connections (NATS through FastStream, the PostgreSQL pool, the object store),
the health/metrics endpoint and the consumers; a service module only declares what it consumes and
what its commands do::

    service = Service(RecorderSettings(), migrations="cuneiform_recorder.migrations")
    service.consume(name="recorder", stream=TRAJECTORIES, decode=decode_event, handle=store_batch)
    run(service)

Start-up order: metrics endpoint, database (migrations under a lock), object store, NATS and its
streams, consumers. Shutdown (SIGTERM/SIGINT) runs it backwards and lets in-flight batches commit
and ack within ``graceful_timeout`` before the connections close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import asyncpg
from faststream.nats import NatsBroker

from . import db
from .logging import configure_logging, get_logger
from .observability import CONSUMER_ACK_PENDING, CONSUMER_PENDING, UP, HealthServer
from .runtime import BatchConsumer, BatchHandler, ConsumerOptions, DeadLetterHook, Decoder, TransientError
from .settings import ConnectionSettings, ServiceSettings
from .storage import ObjectStore
from .topology import StreamSpec, Topology, command_subject, ensure_topology

log = get_logger(__name__)

T = TypeVar("T")
CommandHandler = Callable[[dict[str, Any]], Awaitable[Any]]
Timer = Callable[[], Awaitable[None]]

#: Seconds between attempts to reach PostgreSQL when the service runs without it at first.
DATABASE_RETRY_S = 2.0


class Consumer(Protocol):
    """What the service starts and stops: ``BatchConsumer``, or a component with its own loop on a
    durable consumer (the archiver's segment writer)."""

    name: str
    stream: str

    async def start(self, broker: NatsBroker) -> None: ...

    async def stop(self, timeout: float) -> None: ...


class Service:
    def __init__(
        self,
        settings: ServiceSettings,
        connection: ConnectionSettings | None = None,
        *,
        migrations: str | list[db.Migration] | None = None,
        object_store: bool = False,
        pool_size: int = 10,
        require_database: bool = True,
    ) -> None:
        """``require_database=False``: start without PostgreSQL and connect in the background (the
        archiver's raw copy must not depend on it); ``pool`` raises ``TransientError`` until then."""
        self.settings = settings
        self.connection = connection or ConnectionSettings()
        self.name = settings.service_name
        self.topology = Topology.of(self.connection)
        self._migrations = db.load_migrations(migrations) if isinstance(migrations, str) else migrations
        self._pool_size = pool_size
        self._require_database = require_database
        self.broker = NatsBroker(
            self.connection.nats_url,
            name=f"cuneiform-{self.name}",
            graceful_timeout=settings.graceful_timeout,
            max_reconnect_attempts=-1,  # keep trying: a broker restart must not kill the service
            reconnect_time_wait=1,
            log_level=logging.DEBUG,  # FastStream logs every message at INFO otherwise
        )
        self.health = HealthServer(settings.metrics_host, settings.metrics_port)
        self.consumers: list[Consumer] = []
        self._pool: asyncpg.Pool | None = None
        # Built here (no I/O) so that components can hold it before start; the bucket is ensured at start.
        self._store: ObjectStore | None = ObjectStore.from_settings(self.connection) if object_store else None
        self._periodic: list[tuple[str, float, Timer]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    # --- what handlers use -------------------------------------------------------------------------------

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            if not self._require_database and self._migrations is not None:
                raise TransientError(f"{self.name}: PostgreSQL is not reachable yet")
            raise RuntimeError(f"{self.name}: the database is open only between start() and stop()")
        return self._pool

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            raise RuntimeError(f"{self.name}: created without object_store=True")
        return self._store

    # --- declarations ------------------------------------------------------------------------------------

    def consume(
        self,
        *,
        name: str,
        stream: StreamSpec,
        decode: Decoder[T],
        handle: BatchHandler[T],
        subjects: Sequence[str] | None = None,
        options: ConsumerOptions | None = None,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> BatchConsumer[T]:
        """Declare a durable batch consumer on ``stream`` (all its subjects unless narrowed)."""
        consumer: BatchConsumer[T] = BatchConsumer(
            service=self.name,
            name=f"{self.topology.prefix}_{name}" if self.topology.prefix else name,
            stream=self.topology.stream(stream),
            subjects=[self.topology.subject(s) for s in (subjects or stream.subjects)],
            decode=decode,
            handle=handle,
            topology=self.topology,
            options=options,
            on_dead_letter=on_dead_letter,
        )
        self.consumers.append(consumer)
        return consumer

    def add_consumer(self, consumer: Consumer) -> None:
        """Start and stop a consumer with its own loop together with the service."""
        self.consumers.append(consumer)

    def every(
        self, seconds: float, name: str
    ) -> Callable[[Callable[[], Awaitable[None]]], Callable[[], Awaitable[None]]]:
        """Run ``fn`` every ``seconds`` while the service runs (timers: sweeps, re-publishing)."""

        def register(fn: Timer) -> Timer:
            self._periodic.append((name, seconds, fn))
            return fn

        return register

    def command(self, verb: str) -> Callable[[CommandHandler], CommandHandler]:
        """Answer requests on ``cmd.<service>.<verb>`` (JSON in, JSON out), one replica per request."""

        def register(handler: CommandHandler) -> CommandHandler:
            subscriber = self.broker.subscriber(
                self.topology.subject(command_subject(self.name, verb)), queue=f"cmd-{self.name}"
            )

            async def answer(body: Any) -> Any:
                request = body if isinstance(body, dict) else {}
                try:
                    return {"ok": True, "result": await handler(request)}
                except Exception as error:  # a failed command answers with the reason, never crashes
                    log.warning("command.failed", verb=verb, error=repr(error))
                    return {"ok": False, "error": f"{type(error).__name__}: {error}"}

            subscriber(answer)
            return handler

        return register

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.health.start()
        log.info("service.starting", metrics=f"http://{self.settings.metrics_host}:{self.health.port}/metrics")
        background: list[asyncio.Task[None]] = []
        if self._migrations is not None:
            if self._require_database:
                self._pool = await self._open_database()
            else:
                background.append(asyncio.create_task(self._connect_database_eventually()))
            self.health.add_check("postgres", self._postgres_ok)
        if self._store is not None:
            await self._store.ensure_bucket()
            self.health.add_check("object_store", self._store.ping)
        await self.broker.connect()
        streams = await ensure_topology(self.broker.connection.jetstream(), self.topology)
        log.info("service.topology", **streams)
        self.health.add_check("nats", self._nats_ok)
        await self.broker.start()
        for consumer in self.consumers:
            await consumer.start(self.broker)
        self._tasks = [*background, asyncio.create_task(self._repeat("consumer-lag", 5.0, self._report_lag))]
        self._tasks += [asyncio.create_task(self._repeat(*timer)) for timer in self._periodic]
        self._started = True
        self.health.started = True
        UP.labels(self.name).set(1)
        log.info("service.ready", consumers=[c.name for c in self.consumers])

    async def stop(self) -> None:
        UP.labels(self.name).set(0)
        self.health.started = False
        log.info("service.stopping", graceful_timeout_s=self.settings.graceful_timeout)
        # Consumers first: they stop fetching and commit and ack the batch in hand.
        for consumer in self.consumers:
            await consumer.stop(self.settings.graceful_timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        # Then FastStream's own subscribers (commands) finish within graceful_timeout, and NATS drains.
        await self.broker.stop()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        await self.health.stop()
        self._started = False
        log.info("service.stopped")

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def _open_database(self) -> asyncpg.Pool:
        assert self._migrations is not None
        # A service named like "trainer-dispatcher" owns the schema "trainer_dispatcher".
        schema = self.name.replace("-", "_")
        return await db.open_database(self.connection.pg_dsn, schema, self._migrations, max_size=self._pool_size)

    async def _connect_database_eventually(self) -> None:
        while self._pool is None:
            try:
                self._pool = await self._open_database()
                log.info("service.database_connected")
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("service.database_unavailable", error=repr(error), retry_in_s=DATABASE_RETRY_S)
                await asyncio.sleep(DATABASE_RETRY_S)

    # --- checks and gauges -------------------------------------------------------------------------------

    async def _postgres_ok(self) -> bool:
        if self._pool is None:
            return False
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval("SELECT true"))

    async def _nats_ok(self) -> bool:
        return bool(self.broker.connection.is_connected)

    async def _repeat(self, name: str, seconds: float, fn: Timer) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a timer that fails once runs again next time
                log.warning("service.timer_failed", timer=name, error=repr(error))

    async def _report_lag(self) -> None:
        js = self.broker.connection.jetstream()
        for consumer in self.consumers:
            info = await js.consumer_info(consumer.stream, consumer.name)
            CONSUMER_PENDING.labels(self.name, consumer.name).set(info.num_pending or 0)
            CONSUMER_ACK_PENDING.labels(self.name, consumer.name).set(info.num_ack_pending or 0)


def run(service_factory: Callable[[], Service]) -> None:
    """Entry point of a service process: logging, then run until SIGTERM/SIGINT."""
    service = service_factory()
    configure_logging(service.name, service.settings.log_level, service.settings.log_json)
    asyncio.run(service.run_until_signalled())
