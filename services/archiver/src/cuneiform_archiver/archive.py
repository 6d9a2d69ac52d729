"""The raw archive writer: TRAJECTORIES → zstd JSONL segments in the object store.

Its position is the archive itself, not consumer state: at start it lists the segments already
stored, resumes right after the last one, and (re)creates its durable consumer to deliver from there,
in stream order. Messages are acked only after the segment holding them is stored, verified (size
and sha256 read back) and described by its manifest — with ``AckPolicy.ALL``, one ack per segment.

Why this gives "every event exactly once" across crashes:

* a crash before a segment is stored loses nothing: its messages were never acked, and the restart
  delivers them again from the same first sequence;
* a crash after the segment but before its manifest leaves an orphan body, deleted at the next start
  (not data until its manifest exists);
* a crash after the manifest but before the ack: the restart resumes after that segment, so the
  redelivered messages are not written twice.

One archiver writes a stream's segments (run one replica: two would each recreate the consumer).
PostgreSQL is not on this path at all; an object-store outage pauses fetching while the write is
retried, so messages wait in the stream, unacked, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import orjson
from cuneiform_core.claims import read_claim_body
from cuneiform_core.logging import get_logger
from cuneiform_core.puller import ConsumerUnavailableError, Puller
from cuneiform_core.runtime import TRANSIENT_ERRORS, Delivery, PermanentError, backoff_delay, finish_loop
from cuneiform_core.storage import ObjectStore
from cuneiform_core.topology import PAYLOADS_BUCKET, TRAJECTORIES, Topology
from cuneiform_sdk.contract import PayloadRef
from faststream.nats import NatsBroker
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge, Histogram

from .segments import ArchiveIndex, Sealed, SegmentBuilder, stream_prefix
from .settings import ArchiverSettings

log = get_logger(__name__)

SEGMENTS = Counter("cuneiform_archiver_segments_total", "Segments stored in the object store")
ARCHIVED = Counter("cuneiform_archiver_events_archived_total", "Stream messages stored in segments")
SEGMENT_BYTES = Counter("cuneiform_archiver_segment_bytes_total", "Compressed bytes of stored segments")
WRITE_FAILURES = Counter("cuneiform_archiver_write_failures_total", "Failed segment writes (retried)")
FLUSH_SECONDS = Histogram(
    "cuneiform_archiver_flush_seconds",
    "Compress, store, verify and describe one segment",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LAST_ARCHIVED = Gauge("cuneiform_archiver_last_archived_seq", "Last stream sequence stored in a segment")
LAG = Gauge("cuneiform_archiver_lag_events", "Stream messages not yet stored in a segment")

#: Attempts to read a claim-checked body that fails transiently before the segment notes the failure.
_CLAIM_ATTEMPTS = 3
_FETCH_RETRYABLE: tuple[type[BaseException], ...] = (ConsumerUnavailableError, *TRANSIENT_ERRORS)
_RETRY_CAP_S = 5.0


class ArchiveError(RuntimeError):
    """The archive cannot go on safely without an operator (e.g. the stream was recreated)."""


@dataclass(frozen=True)
class Progress:
    archived_through: int
    stream_last_seq: int

    @property
    def lag(self) -> int:
        return max(0, self.stream_last_seq - self.archived_through)


class SegmentArchiver:
    """A ``Service`` consumer with its own loop (see ``Service.add_consumer``)."""

    def __init__(self, settings: ArchiverSettings, topology: Topology, store: ObjectStore) -> None:
        self.settings = settings
        self.topology = topology
        self.store = store
        self.stream = topology.stream(TRAJECTORIES)
        self.name = f"{topology.prefix}_archiver" if topology.prefix else "archiver"
        self._broker: NatsBroker | None = None
        self._puller: Puller | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.archived_through = 0
        self._builder: SegmentBuilder | None = None
        self._builder_started = 0.0
        self._last_msg: Delivery | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self, broker: NatsBroker) -> None:
        self._broker = broker
        self._stopping.clear()
        await self._resume()
        self._task = asyncio.create_task(self._run(), name="archive-segments")

    async def stop(self, timeout: float) -> None:
        """Stop fetching and store what is in hand (within ``timeout``); anything left unstored stays
        unacked in the stream and is archived after the restart."""
        self._stopping.set()
        await finish_loop(self._task, timeout, self.name)
        self._task = None

    async def _resume(self) -> None:
        index = await self.index()
        for orphan in index.orphans:
            # A segment stored without its manifest: the crash came before the messages were acked,
            # so they are delivered again and land in a segment of their own. Not data; remove it.
            log.info("archive.orphan_removed", key=orphan)
            await self.store.delete(orphan)
        self.archived_through = index.resume_after
        js = self._js()
        stream = await js.stream_info(self.stream)
        if stream.state.last_seq < self.archived_through:
            raise ArchiveError(
                f"stream {self.stream} ends at sequence {stream.state.last_seq} but the archive already holds up to "
                f"{self.archived_through}: the stream was recreated. Move {stream_prefix(self.stream)} aside in the "
                "bucket (or point the archiver at a new bucket) before archiving the new stream"
            )
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(self.stream, self.name)
        await js.add_consumer(self.stream, self._consumer_config())
        self._puller = Puller(self._nats(), self.stream, self.name)
        await self._puller.start()
        self._builder = None
        LAST_ARCHIVED.set(self.archived_through)
        log.info("archive.resumed", stream=self.stream, after_seq=self.archived_through, segments=len(index.segments))

    def _consumer_config(self) -> ConsumerConfig:
        s = self.settings
        return ConsumerConfig(
            durable_name=self.name,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.archived_through + 1,
            # One ack per segment: acking its last message acks everything before it.
            ack_policy=AckPolicy.ALL,
            # Messages wait unacked while their segment fills; redelivery only if the archiver died.
            ack_wait=max(120.0, 2 * s.segment_max_age_s + 60.0),
            max_ack_pending=s.segment_max_events + 2 * s.fetch_batch,
            max_deliver=-1,
        )

    async def index(self) -> ArchiveIndex:
        return ArchiveIndex.from_keys(self.stream, await self.store.list_keys(stream_prefix(self.stream)))

    def _nats(self) -> Client:
        assert self._broker is not None
        return self._broker.connection

    def _js(self) -> JetStreamContext:
        return self._nats().jetstream()

    # --- the loop --------------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._puller is not None
        failures = 0
        while not self._stopping.is_set():
            if self._segment_due():
                await self._flush()
                continue
            try:
                msgs = await self._puller.fetch(self._fetch_size(), self._fetch_wait())
            except _FETCH_RETRYABLE as error:
                failures += 1
                delay = backoff_delay(failures, 0.5, _RETRY_CAP_S)
                log.warning("archive.fetch_failed", error=repr(error), retry_in_s=round(delay, 2))
                await self._pause(delay)
                if isinstance(error, ConsumerUnavailableError):
                    with contextlib.suppress(Exception):
                        await self._js().add_consumer(self.stream, self._consumer_config())
                continue
            failures = 0
            for msg in msgs:
                await self._take(Delivery(msg))
        # Stopping: store the segment in hand if the object store lets us; else it is redelivered later.
        if self._builder is not None and self._builder.count:
            await self._flush(attempts=3)
        await self._puller.stop()

    def _segment_due(self) -> bool:
        b = self._builder
        if b is None or not b.count:
            return False
        s = self.settings
        return (
            b.raw_bytes >= s.segment_max_bytes
            or b.count >= s.segment_max_events
            or time.monotonic() - self._builder_started >= s.segment_max_age_s
        )

    def _fetch_size(self) -> int:
        """No more than the segment in hand has room for, so segments keep their size limit."""
        held = self._builder.count if self._builder is not None else 0
        return max(1, min(self.settings.fetch_batch, self.settings.segment_max_events - held))

    def _fetch_wait(self) -> float:
        if self._builder is None or not self._builder.count:
            return 1.0
        remaining = self.settings.segment_max_age_s - (time.monotonic() - self._builder_started)
        return max(0.05, min(1.0, remaining))

    async def _take(self, delivery: Delivery) -> None:
        seq = delivery.stream_seq
        if seq <= (self._builder.last_seq if self._builder is not None else self.archived_through):
            # A redelivery (the ack of a stored segment was lost, or ack_wait passed during an
            # outage): the message is already in a segment or in the one being built.
            return
        if self._builder is None:
            self._builder = SegmentBuilder(self.stream, self.archived_through + 1, self.settings.zstd_level)
            self._builder_started = time.monotonic()
        data = delivery.data
        payload, payload_error = (None, None)
        if b'"payload_ref"' in data:
            payload, payload_error = await self._claimed_body(data)
        self._builder.add(
            seq,
            delivery.stream_time_ns,
            delivery.subject,
            data,
            msg_id=delivery.msg_id,
            headers=delivery.headers,
            payload=payload,
            payload_error=payload_error,
        )
        self._last_msg = delivery

    async def _claimed_body(self, data: bytes) -> tuple[bytes | None, str | None]:
        """The claim-checked body, so the cold copy holds the whole event; or why it could not."""
        try:
            ref = PayloadRef.model_validate(orjson.loads(data)["payload_ref"])
        except Exception as error:
            return None, f"unreadable claim check: {error}"
        for attempt in range(1, _CLAIM_ATTEMPTS + 1):
            try:
                body = await read_claim_body(
                    self._js(),
                    ref,
                    expected_bucket=self.topology.bucket(PAYLOADS_BUCKET),
                    max_bytes=self.settings.max_claim_check_bytes,
                )
                return body, None
            except PermanentError as error:
                return None, str(error)
            except Exception as error:
                if attempt == _CLAIM_ATTEMPTS:
                    return None, f"claim-checked body unavailable: {error!r}"
                await self._pause(backoff_delay(attempt, 0.2, 2.0))
        return None, "unreachable"

    async def _flush(self, attempts: int | None = None) -> bool:
        """Store the segment in hand, verify it, write its manifest, then ack its messages.

        Retries until it succeeds (or ``attempts`` run out, or the service stops): while the object
        store is down nothing more is fetched, and nothing is acked."""
        builder, last = self._builder, self._last_msg
        assert builder is not None and last is not None
        started = time.perf_counter()
        sealed = await asyncio.to_thread(builder.seal)
        tries = 0
        while True:
            tries += 1
            try:
                await self._store(sealed)
                break
            except Exception as error:
                WRITE_FAILURES.inc()
                if (attempts is not None and tries >= attempts) or (attempts is None and self._stopping.is_set()):
                    log.warning("archive.segment_not_stored", key=sealed.key, error=repr(error))
                    return False
                delay = backoff_delay(tries, 0.5, _RETRY_CAP_S)
                log.warning("archive.write_failed", key=sealed.key, error=repr(error), retry_in_s=round(delay, 2))
                await self._pause(delay)
        # Acking the segment's last message acks all of it (AckPolicy.ALL).
        with contextlib.suppress(Exception):
            await last.raw.ack()
        self.archived_through = sealed.last_seq
        self._builder, self._last_msg = None, None
        SEGMENTS.inc()
        ARCHIVED.inc(sealed.count)
        SEGMENT_BYTES.inc(len(sealed.body))
        LAST_ARCHIVED.set(sealed.last_seq)
        FLUSH_SECONDS.observe(time.perf_counter() - started)
        log.info(
            "archive.segment_stored",
            key=sealed.key,
            events=sealed.count,
            bytes=len(sealed.body),
            raw_bytes=sealed.manifest["raw_bytes"],
        )
        return True

    async def _store(self, sealed: Sealed) -> None:
        info = await self.store.put_bytes(sealed.key, sealed.body, content_type="application/zstd")
        # Read back what the store holds before declaring the segment durable.
        stored = await self.store.stat(sealed.key)
        if stored is None or stored.size != len(sealed.body) or stored.sha256 != info.sha256:
            raise OSError(f"segment {sealed.key} did not read back as written")
        await self.store.put_bytes(sealed.manifest_key, sealed.manifest_bytes, content_type="application/json")

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # --- reporting -------------------------------------------------------------------------------------

    async def progress(self) -> Progress:
        stream = await self._js().stream_info(self.stream)
        progress = Progress(self.archived_through, stream.state.last_seq)
        LAG.set(progress.lag)
        return progress
