"""The one consumer loop every service uses: batch pulls from a durable JetStream consumer, on the
service's FastStream broker connection, with an explicit acknowledgement discipline.

For each fetched batch:

1. Every message is decoded by the service's ``decode``. A message that cannot be decoded
   (malformed JSON, a contract violation, an unknown version) is dead-lettered with the reason and
   terminated; the rest of the batch goes on.
2. The decoded items go to the service's ``handle`` in one call, which commits them (one transaction).
   Only when it returns are the messages acked: ack after commit. ``handle`` may name items it
   rejects for good (``{index: reason}``); those are dead-lettered, the others acked.
3. A transient failure (database or broker unreachable, ``TransientError``) naks the batch with a
   backoff delay and pauses this consumer for as long: nothing is lost, nothing dead-lettered, and a
   down database is not hammered.
4. Any other exception is assumed to come from one bad message: the batch is split in halves and
   retried until the failing message stands alone; it is then redelivered with backoff and, after
   ``max_deliver`` attempts, dead-lettered with the error — so one poison message never blocks the
   stream and never takes the service down.

Acknowledgement is always explicit and always ours (FastStream's default policies either drop a
message whose handler raised or ack it anyway). Handlers must be idempotent (keys made by producers, ``ON CONFLICT DO
NOTHING``), since a crash between commit and ack redelivers.

On shutdown the service stops fetching and waits (``graceful_timeout``) for the batch in hand to
commit and ack.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import asyncpg
import nats.errors
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from .events import DeadLetter, publish, stable_id
from .logging import get_logger
from .observability import BATCH_SIZE, DEAD_LETTERS, HANDLER_SECONDS, MESSAGES
from .puller import ConsumerUnavailableError, Puller
from .topology import DLQ, Topology, dlq_subject

log = get_logger(__name__)

T = TypeVar("T")


class PermanentError(Exception):
    """This input can never be processed: dead-letter it with this message as the reason."""


class TransientError(Exception):
    """A dependency is unavailable: retry later, never dead-letter."""


#: Failures that say "try again later", not "this message is bad".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TransientError,
    OSError,  # includes ConnectionError and TimeoutError
    asyncpg.PostgresConnectionError,  # includes "connection was closed in the middle of operation"
    # Raised by asyncpg when a connection dies mid-operation (e.g. the reset on release during a fast
    # shutdown of the server): an I/O failure, not a bad message.
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.TimeoutError,
    nats.errors.NoServersError,
)


#: A fetch that fails for these waits and tries again (recreating the consumer if it is gone).
_FETCH_RETRYABLE: tuple[type[BaseException], ...] = (ConsumerUnavailableError, *TRANSIENT_ERRORS)


def is_transient(error: BaseException) -> bool:
    """Does this failure say "try again later" rather than "this input is bad"?

    asyncpg's ``InterfaceError`` is mostly a programming or data error (wrong arguments, a value of
    the wrong type), which retrying cannot fix; only its forms that report a dead connection are transient.
    """
    if isinstance(error, TRANSIENT_ERRORS):
        return True
    # "another operation is in progress": the connection died in the middle of an operation (the server
    # went away) and asyncpg refuses the next one on it; services never share a connection otherwise.
    return isinstance(error, asyncpg.InterfaceError) and (
        "connection is closed" in str(error) or "another operation is in progress" in str(error)
    )


# Positions in a JetStream ack subject: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``
# (v1, 9 tokens), or with ``<domain>.<account hash>`` after ``ACK`` and a trailing token (v2).
_V1_TOKENS = 9
_SEQ_TOKEN_V1, _TIME_TOKEN_V1 = 5, 7
_SEQ_TOKEN_V2, _TIME_TOKEN_V2 = 7, 9


class Delivery:
    """One message as a decoder sees it. The JetStream metadata (parsed from the reply subject) is
    read only when needed — for dead letters and retries, not on the hot path."""

    __slots__ = ("raw",)

    def __init__(self, raw: Msg) -> None:
        self.raw = raw

    @property
    def subject(self) -> str:
        return self.raw.subject

    @property
    def data(self) -> bytes:
        return self.raw.data

    @property
    def headers(self) -> dict[str, str]:
        return self.raw.headers or {}

    @property
    def msg_id(self) -> str | None:
        return self.headers.get("Nats-Msg-Id")

    @property
    def stream(self) -> str:
        return self.raw.metadata.stream

    @property
    def stream_seq(self) -> int:
        # Read straight from the ack subject (one split) rather than through nats-py's full metadata
        # object: the recorder and the archiver need it for every message on their hot paths.
        tokens = (self.raw.reply or "").split(".")
        return int(tokens[_SEQ_TOKEN_V1] if len(tokens) == _V1_TOKENS else tokens[_SEQ_TOKEN_V2])

    @property
    def stream_time_ns(self) -> int:
        """When the stream stored the message (nanoseconds since the epoch, the server's clock)."""
        tokens = (self.raw.reply or "").split(".")
        return int(tokens[_TIME_TOKEN_V1] if len(tokens) == _V1_TOKENS else tokens[_TIME_TOKEN_V2])

    @property
    def num_delivered(self) -> int:
        return self.raw.metadata.num_delivered


Decoder = Callable[[Delivery], T]
#: Commits the items; may return ``{index: reason}`` for items it rejects permanently.
BatchHandler = Callable[[Sequence[T]], Awaitable[Mapping[int, str] | None]]
DeadLetterHook = Callable[[DeadLetter], Awaitable[None]]


@dataclass(frozen=True)
class ConsumerOptions:
    #: Most messages handled (and committed) together.
    batch_size: int = 500
    #: Seconds one fetch waits for the first message; also the longest a stop waits for an idle fetch.
    #: Under load a fetch returns at once with whatever is pending, up to ``batch_size``.
    max_wait: float = 1.0
    #: Batches handled at once. Above 1, the next batch is fetched and decoded while the previous one
    #: commits (the handler must then tolerate concurrent calls, as idempotent writes do).
    concurrency: int = 1
    #: Seconds the server waits for an ack before redelivering; longer than the slowest commit.
    ack_wait: float = 60.0
    max_ack_pending: int = 20_000
    #: Attempts before a message that keeps failing with an unexpected error is dead-lettered.
    max_deliver: int = 5
    backoff_base: float = 0.5
    #: Longest wait before redelivering a message whose handler failed unexpectedly.
    backoff_max: float = 30.0
    #: Longest pause while a dependency is down: short, so the consumer resumes within seconds of
    #: the dependency coming back.
    transient_backoff_max: float = 5.0
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL


async def finish_loop(task: asyncio.Task[None] | None, timeout: float, name: str) -> None:
    """Wait up to ``timeout`` for a consumer loop that was told to stop, then cancel it."""
    if task is None:
        return
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except TimeoutError:
        log.warning("consumer.stop_timeout", consumer=name, timeout_s=timeout)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (attempt 1 waits up to ``base``)."""
    return random.uniform(0.5, 1.0) * min(cap, base * 2.0 ** max(0, attempt - 1))


def describe_decode_error(error: Exception) -> tuple[Literal["malformed", "invalid"], str]:
    """Classify a decoder's failure: bytes that are not JSON at all, or JSON that breaks the schema."""
    if isinstance(error, ValidationError):
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(body)'}: {e['msg']}" for e in error.errors(include_url=False)[:5]
        )
        return "invalid", problems
    text = str(error) or type(error).__name__
    if isinstance(error, json.JSONDecodeError | UnicodeDecodeError):
        return "malformed", f"malformed JSON: {text}"
    return ("malformed" if text.startswith("malformed") else "invalid"), text


class BatchConsumer(Generic[T]):
    """A durable pull consumer of one stream, wired into a FastStream broker."""

    def __init__(
        self,
        *,
        service: str,
        name: str,
        stream: str,
        subjects: Sequence[str],
        decode: Decoder[T],
        handle: BatchHandler[T],
        topology: Topology,
        options: ConsumerOptions | None = None,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        self.service = service
        self.name = name
        self.stream = stream
        self.subjects = list(subjects)
        self._decode = decode
        self._handle = handle
        self._topology = topology
        self.options = options or ConsumerOptions()
        self._on_dead_letter = on_dead_letter
        self._broker: NatsBroker | None = None
        self._puller: Puller | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._consecutive_transient = 0

    # --- wiring ---------------------------------------------------------------------------------------

    def consumer_config(self) -> ConsumerConfig:
        opts = self.options
        return ConsumerConfig(
            durable_name=self.name,
            ack_policy=JsAckPolicy.EXPLICIT,
            ack_wait=opts.ack_wait,
            # Redelivery is counted by the server, dead-lettering decided here (-1: no server limit,
            # so a message is never silently dropped after max_deliver).
            max_deliver=-1,
            max_ack_pending=opts.max_ack_pending,
            deliver_policy=opts.deliver_policy,
            filter_subjects=self.subjects if len(self.subjects) > 1 else None,
            filter_subject=self.subjects[0] if len(self.subjects) == 1 else None,
        )

    async def start(self, broker: NatsBroker) -> None:
        """Create (or update) the durable consumer and start pulling on the broker's connection."""
        self._broker = broker
        self._stopping.clear()
        await broker.connection.jetstream().add_consumer(self.stream, self.consumer_config())
        self._puller = Puller(broker.connection, self.stream, self.name)
        await self._puller.start()
        self._task = asyncio.create_task(self._pull(), name=f"consume-{self.name}")

    async def stop(self, timeout: float) -> None:
        """Stop fetching; let the batch in hand commit and ack (up to ``timeout``), then return."""
        self._stopping.set()
        await finish_loop(self._task, timeout, self.name)
        self._task = None

    async def _pull(self) -> None:
        # Our own fetch loop rather than FastStream's batch subscriber: in FastStream 0.7.8 a bare
        # asyncio.TimeoutError from nats-py escapes that loop and the messages it had fetched wait
        # out ack_wait before redelivery; here every fetched message is handled, also during a stop.
        assert self._puller is not None
        failures = 0
        in_flight: set[asyncio.Task[None]] = set()
        while not self._stopping.is_set():
            if len(in_flight) >= self.options.concurrency:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await self._puller.fetch(self.options.batch_size, self.options.max_wait)
            except _FETCH_RETRYABLE as error:
                failures += 1
                delay = backoff_delay(failures, self.options.backoff_base, self.options.transient_backoff_max)
                log.warning("consumer.fetch_failed", consumer=self.name, error=repr(error), retry_in_s=round(delay, 2))
                await self._pause(delay)
                if isinstance(error, ConsumerUnavailableError):
                    # Deleted by an operator or lost with a server: create it again (idempotent).
                    assert self._broker is not None
                    with contextlib.suppress(Exception):
                        await self._broker.connection.jetstream().add_consumer(self.stream, self.consumer_config())
                continue
            failures = 0
            if not msgs:
                continue
            task = asyncio.create_task(self._process_safely(msgs))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        # Stopping: every fetched message is still handled, committed and acked before we return —
        # including deliveries that reached the puller after its last fetch.
        if in_flight:
            await asyncio.gather(*in_flight)
        await self._puller.stop()
        leftovers = self._puller.take_buffered()
        if leftovers:
            await self._process_safely(leftovers)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the consumer is being stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _process_safely(self, msgs: list[Msg]) -> None:
        try:
            await self.process(msgs)
        except Exception as error:  # never let one batch end the loop; unacked messages come back
            log.exception("consumer.batch_crashed", consumer=self.name, error=repr(error))

    # --- the loop body ---------------------------------------------------------------------------------

    async def process(self, msgs: list[Msg]) -> None:
        BATCH_SIZE.labels(self.service, self.name).observe(len(msgs))
        started = time.perf_counter()
        items: list[T] = []
        deliveries: list[Delivery] = []
        for msg in msgs:
            delivery = Delivery(msg)
            try:
                items.append(self._decode(delivery))
                deliveries.append(delivery)
            except Exception as error:
                kind, reason = describe_decode_error(error)
                await self._dead_letter(delivery, kind, reason)
        if items:
            await self._handle_items(items, deliveries)
        HANDLER_SECONDS.labels(self.service, self.name).observe(time.perf_counter() - started)

    async def _handle_items(self, items: list[T], deliveries: list[Delivery]) -> None:
        try:
            rejected = await self._handle(items) or {}
        except PermanentError as error:
            if len(items) == 1:
                await self._dead_letter(deliveries[0], "rejected", str(error))
                return
            await self._bisect(items, deliveries)
            return
        except Exception as error:
            if is_transient(error):
                await self._retry_later(deliveries, error)
                return
            if len(items) == 1:
                await self._poison(deliveries[0], error)
                return
            log.warning("consumer.batch_failed_isolating", consumer=self.name, size=len(items), error=repr(error))
            await self._bisect(items, deliveries)
            return
        self._consecutive_transient = 0
        for index, delivery in enumerate(deliveries):
            if index in rejected:
                await self._dead_letter(delivery, "rejected", rejected[index])
            else:
                await delivery.raw.ack()
        MESSAGES.labels(self.service, self.name, "acked").inc(len(deliveries) - len(rejected))

    async def _bisect(self, items: list[T], deliveries: list[Delivery]) -> None:
        middle = len(items) // 2
        await self._handle_items(items[:middle], deliveries[:middle])
        await self._handle_items(items[middle:], deliveries[middle:])

    async def _retry_later(self, deliveries: list[Delivery], error: BaseException) -> None:
        self._consecutive_transient += 1
        delay = backoff_delay(
            self._consecutive_transient, self.options.backoff_base, self.options.transient_backoff_max
        )
        log.warning(
            "consumer.transient_failure",
            consumer=self.name,
            size=len(deliveries),
            retry_in_s=round(delay, 2),
            error=repr(error),
        )
        for delivery in deliveries:
            await _quietly(delivery.raw.nak(delay=delay))
        MESSAGES.labels(self.service, self.name, "retried").inc(len(deliveries))
        # Pause this consumer too, so a down dependency is not hammered with the rest of the stream.
        await self._pause(delay)

    async def _poison(self, delivery: Delivery, error: Exception) -> None:
        attempts = delivery.num_delivered
        if attempts >= self.options.max_deliver:
            reason = f"handler failed {attempts} times; last error: {type(error).__name__}: {error}"
            await self._dead_letter(delivery, "poison", reason)
            return
        delay = backoff_delay(attempts, self.options.backoff_base, self.options.backoff_max)
        log.warning(
            "consumer.message_failed",
            consumer=self.name,
            subject=delivery.subject,
            stream_seq=delivery.stream_seq,
            attempt=attempts,
            retry_in_s=round(delay, 2),
            error=repr(error),
        )
        await _quietly(delivery.raw.nak(delay=delay))
        MESSAGES.labels(self.service, self.name, "retried").inc()

    async def _dead_letter(self, delivery: Delivery, kind: str, reason: str) -> None:
        """Record the message in the DLQ stream first, then terminate it: never lost in between."""
        assert self._broker is not None
        letter = DeadLetter(
            event_id=stable_id("dead-letter", self.service, self.name, delivery.stream, delivery.stream_seq),
            service=self.service,
            consumer=self.name,
            reason=reason,
            kind=kind,  # type: ignore[arg-type]
            subject=delivery.subject,
            stream=delivery.stream,
            stream_seq=delivery.stream_seq,
            num_delivered=delivery.num_delivered,
            msg_id=delivery.msg_id,
            headers=dict(delivery.headers),
            payload_b64=base64.b64encode(delivery.data).decode(),
        )
        try:
            await publish(
                self._broker,
                self._topology.subject(dlq_subject(self.service)),
                letter,
                stream=self._topology.stream(DLQ),
            )
            if self._on_dead_letter is not None:
                await self._on_dead_letter(letter)
        except Exception as error:
            # Cannot record it now (DLQ stream unreachable, missing or full): leave this one message
            # to be redelivered and dead-lettered then; the rest of the batch goes on.
            log.warning("consumer.dead_letter_deferred", consumer=self.name, error=repr(error))
            await _quietly(delivery.raw.nak(delay=self.options.backoff_max))
            return
        await delivery.raw.term()
        log.warning(
            "consumer.dead_lettered",
            consumer=self.name,
            kind=kind,
            subject=delivery.subject,
            stream_seq=delivery.stream_seq,
            reason=reason,
        )
        MESSAGES.labels(self.service, self.name, "dead_lettered").inc()
        DEAD_LETTERS.labels(self.service, self.name, kind).inc()


async def _quietly(awaitable: Awaitable[None]) -> None:
    # A nak that cannot reach the server is harmless: the ack deadline redelivers the message.
    with contextlib.suppress(*TRANSIENT_ERRORS):
        await awaitable
