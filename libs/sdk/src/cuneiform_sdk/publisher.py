"""Delivers recorded events to JetStream without ever blocking or failing the agent.

The agent's record calls only append to an in-memory queue. This publisher, a task on the agent's
event loop, takes events in batches, serializes them, and publishes each batch pipelined — every
message sent at once, then the stream's acks awaited together — each with ``Nats-Msg-Id`` =
``event_id`` so that every retry (after a lost ack, a reconnect or an agent restart) is
deduplicated by the stream.

* Unacknowledged events are retried under the same id. While NATS is unreachable they wait in
  memory; past ``max_buffer`` events, after ``spill_after`` seconds of outage, and at shutdown they
  are spilled to the on-disk outbox, which is replayed, oldest first, once NATS is back — in this
  process or the next one.
* A ``trajectory_ended`` event is held back until every earlier event of its trajectory is
  acknowledged: when the recorder sees the end, the rest is already in the stream. (In the outbox an
  end is always written after its trajectory's other events, and replayed after them.)
* An event larger than the broker's payload limit goes by claim check: its body into the object
  store bucket ``payloads``, a small ``ClaimCheck`` (envelope + ``payload_ref``) onto the stream.
* The redaction hook runs before an event is serialized, so nothing unredacted reaches the wire or
  the outbox on disk.

Acks are collected on one reply subscription of our own rather than with nats-py's
``publish_async``: that one registers its future before sending and leaks it (and a slot of its
pending-semaphore, until publishing stalls for good) when the send itself raises, as it does while
the client reconnects with a full buffer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from .contract import Envelope, dump_event
from .outbox import DiskOutbox, OutgoingEvent

log = logging.getLogger("cuneiform_sdk")

Redactor = Callable[[dict[str, Any]], dict[str, Any]]
#: Room left under max_payload for headers and the subject.
_HEADROOM = 8 * 1024
_ENVELOPE_KEYS = ("v", "event_id", "type", "trajectory_id", "agent_id", "seq", "occurred_at")
_RETRY_PAUSE = 0.2


@dataclass
class PublisherStats:
    submitted: int = 0
    acked: int = 0
    retried: int = 0
    spilled: int = 0
    replayed: int = 0
    claim_checked: int = 0
    duplicates: int = 0
    #: Events the redaction hook failed on: never sent (their trajectory stays incomplete).
    dropped: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Queued:
    event: Envelope
    subject: str
    trajectory_id: str
    is_end: bool


async def _cancel(task: asyncio.Task[None], limit: float = 5.0) -> None:
    """Cancel ``task`` and wait for it to end, cancelling again as needed.

    One cancel is not always enough: on Python 3.11, ``asyncio.wait_for`` loses a cancellation that
    arrives as its inner call finishes (gh-86296), and nats-py's connect loop, which wraps every dial
    in one, then just dials again — forever while the server is down. Cancelled again at its next
    await, it ends.
    """
    deadline = time.monotonic() + limit
    while not task.done() and time.monotonic() < deadline:
        task.cancel()
        await asyncio.wait([task], timeout=0.05)
    if task.done() and not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()  # retrieved, so asyncio does not log it as never retrieved


class PublishRejectedError(Exception):
    """The server answered a publish with a status instead of an ack (503: no stream for the subject)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Publisher:
    def __init__(
        self,
        nats_url: str,
        outbox: DiskOutbox,
        *,
        prefix: str = "",
        payloads_bucket: str = "payloads",
        redact: Redactor | None = None,
        batch_size: int = 512,
        max_buffer: int = 50_000,
        ack_timeout: float = 5.0,
        spill_after: float = 2.0,
    ) -> None:
        self._url = nats_url
        self._outbox = outbox
        self._prefix = prefix
        self._payloads_bucket = f"{prefix}_{payloads_bucket}" if prefix else payloads_bucket
        self._redact = redact
        self._batch_size = max(1, batch_size)
        self._max_buffer = max(1, max_buffer)
        self._ack_timeout = ack_timeout
        self._spill_after = spill_after
        # Newly recorded events (not yet serialized), and serialized ones waiting for a (re)try.
        self._queue: deque[_Queued] = deque()
        self._retry: deque[OutgoingEvent] = deque()
        # The batch being published now: at close it is spilled with the rest, never lost.
        self._inflight: list[OutgoingEvent] = []
        # Per trajectory: events submitted and not yet acknowledged (in memory, in flight or spilled).
        self._outstanding: Counter[str] = Counter()
        self._held_ends: dict[str, _Queued] = {}
        # Outbox segments being replayed: the ids already acknowledged, so a replay interrupted by a
        # disconnect neither counts an event twice nor releases a held end early.
        self._replay_done: dict[str, set[str]] = {}
        self._outbox_dirty = True  # segments may exist (we are the only writer while we hold the lock)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._started = False
        self._closed = False
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._reply_prefix = ""
        self._acks: dict[str, asyncio.Future[PubAck]] = {}
        self._tokens = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._disconnected_since: float | None = None
        self._last_spill = 0.0
        self.stats = PublisherStats()

    # --- called by record calls: must stay cheap and never raise for infrastructure reasons ----------

    def submit(self, event: Envelope, subject: str, is_end: bool = False) -> None:
        if self._closed:
            raise RuntimeError("this Recorder is closed; record with a started Recorder")
        trajectory = str(event.trajectory_id)
        item = _Queued(event, subject, trajectory, is_end)
        self.stats.submitted += 1
        if not is_end:
            self._outstanding[trajectory] += 1
            self._queue.append(item)
        elif self._outstanding[trajectory] > 0:
            self._held_ends[trajectory] = item
        else:
            self._queue.append(item)
        self._idle.clear()
        self._wake.set()

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._outbox.lock()
        self._started = True
        self._disconnected_since = time.monotonic()
        self._connect_task = asyncio.create_task(self._connect(), name="cuneiform-connect")
        self._task = asyncio.create_task(self._run(), name="cuneiform-publisher")

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted event is acknowledged (the outbox included); False on timeout."""
        if self._task is None or self._task.done():
            return not self._has_work()
        self._wake.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered within ``timeout``; spill the rest to the outbox."""
        if self._closed:
            return
        if self._started:
            # Disconnected: give a reconnect in progress a moment, not the whole timeout; what is not
            # delivered waits in the outbox for the next start.
            await self.flush(timeout if self.connected else min(timeout, 1.0))
        self._closed = True
        for task in (self._task, self._connect_task):
            if task is not None:
                await _cancel(task)
        for future in self._acks.values():
            future.cancel()
        self._acks.clear()
        leftovers = self._drain_memory()
        if leftovers:
            try:
                self._outbox.spill(leftovers)
                self.stats.spilled += len(leftovers)
                log.warning(
                    "cuneiform: %d events not delivered yet, kept in outbox %s",
                    len(leftovers),
                    self._outbox.directory,
                )
            except OSError:
                log.exception("cuneiform: could not write %d undelivered events to the outbox", len(leftovers))
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._outbox.unlock()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def pending(self) -> int:
        """Events in memory not yet acknowledged (the outbox on disk not included)."""
        return len(self._queue) + len(self._retry) + len(self._inflight) + len(self._held_ends)

    # --- connection ----------------------------------------------------------------------------------------

    async def _connect(self) -> None:
        # Connect in the background, for as long as it takes: an agent starting while NATS is down
        # records anyway. nats-py retries the first connect itself (max_reconnect_attempts=-1).
        delay = 0.2
        while True:
            try:
                nc = await nats.connect(
                    self._url,
                    name="cuneiform-sdk",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    allow_reconnect=True,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
                self._reply_prefix = nc.new_inbox() + "."
                await nc.subscribe(self._reply_prefix + "*", cb=self._on_ack)
                self._js = nc.jetstream()
                self._nc = nc
                self._disconnected_since = None
                self._wake.set()
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.stats.errors[type(error).__name__] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _on_error(self, error: Exception) -> None:
        self.stats.errors[type(error).__name__] += 1
        log.debug("cuneiform: nats error: %r", error)

    async def _on_disconnected(self) -> None:
        if self._disconnected_since is None:
            self._disconnected_since = time.monotonic()

    async def _on_reconnected(self) -> None:
        self._disconnected_since = None
        self._wake.set()

    async def _on_ack(self, msg: Msg) -> None:
        future = self._acks.pop(msg.subject[len(self._reply_prefix) :], None)
        if future is None or future.done():
            return
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is not None and not msg.data:
            reason = "no stream takes this subject" if status == "503" else headers.get("Description", status)
            future.set_exception(PublishRejectedError(f"status {status}: {reason}"))
            return
        try:
            body = json.loads(msg.data)
        except ValueError:
            future.set_exception(PublishRejectedError("unreadable ack"))
            return
        if "error" in body:
            future.set_exception(nats.js.errors.APIError.from_error(body["error"]))
        else:
            future.set_result(PubAck.from_response(body))

    # --- the publishing loop ---------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._queue or self._retry or self._inflight or self._held_ends or self._outbox_dirty)

    async def _run(self) -> None:
        while True:
            try:
                await self._iteration()
            except asyncio.CancelledError:
                raise
            except Exception:
                # Never let the loop die: a bug or a disk error here must not stop delivery for good.
                self.stats.errors["publisher_loop"] += 1
                log.exception("cuneiform: publisher error; retrying")
                if self._inflight:
                    self._retry.extendleft(reversed(self._inflight))
                    self._inflight = []
                await asyncio.sleep(1.0)

    async def _iteration(self) -> None:
        if self._nc is not None and self._nc.is_closed and (self._connect_task is None or self._connect_task.done()):
            # Only our own close() closes the client; anything else (say, an auth error on reconnect): dial again.
            self._nc = None
            self._disconnected_since = time.monotonic()
            self._connect_task = asyncio.create_task(self._connect(), name="cuneiform-connect")
        if not self.connected:
            await self._while_disconnected()
            return
        if self._outbox_dirty and not await self._replay_outbox():
            await asyncio.sleep(_RETRY_PAUSE)
            return
        batch = self._take()
        if not batch:
            if not self._has_work():
                self._idle.set()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)
            return
        self._inflight = batch
        failed = await self._publish(batch)
        self._inflight = []
        failed_ids = {id(e) for e in failed}
        for event in batch:
            if id(event) not in failed_ids:
                self._acked(event)
        if failed:
            self.stats.retried += len(failed)
            self._retry.extendleft(reversed(failed))
            await asyncio.sleep(_RETRY_PAUSE)

    async def _while_disconnected(self) -> None:
        # Past max_buffer, and every spill_after seconds of an outage, what waits in memory goes to
        # disk: a crashed agent then loses at most the last few seconds of an outage.
        buffered = len(self._queue) + len(self._retry) + len(self._held_ends)
        now = time.monotonic()
        since = max(self._disconnected_since or now, self._last_spill)
        if buffered > self._max_buffer or (buffered and now - since >= self._spill_after):
            self._spill_buffer()
            self._last_spill = time.monotonic()
        # A plain pause, not a wait on ``_wake``: every record call sets that, and there is nothing to
        # do per event while the connection is down.
        await asyncio.sleep(0.1)

    def _take(self) -> list[OutgoingEvent]:
        batch: list[OutgoingEvent] = []
        while self._retry and len(batch) < self._batch_size:
            batch.append(self._retry.popleft())
        while self._queue and len(batch) < self._batch_size:
            outgoing = self._serialize(self._queue.popleft())
            if outgoing is not None:
                batch.append(outgoing)
        return batch

    def _serialize(self, item: _Queued) -> OutgoingEvent | None:
        try:
            if self._redact is None:
                payload = dump_event(item.event)
            else:
                original = item.event.model_dump(mode="json")
                redacted = self._redact(dict(original))
                # The envelope is the dedupe and ordering key end to end: redaction never changes it.
                redacted.update({key: original[key] for key in _ENVELOPE_KEYS})
                payload = json.dumps(redacted, separators=(",", ":")).encode()
        except Exception:
            # Sending it unredacted is not an option; its trajectory will be seen as incomplete.
            self.stats.dropped += 1
            self.stats.errors["redaction"] += 1
            log.exception("cuneiform: redaction failed, event %s dropped", item.event.event_id)
            if not item.is_end:
                self._settle(item.trajectory_id)
            return None
        return OutgoingEvent(
            subject=item.subject,
            msg_id=str(item.event.event_id),
            payload=payload,
            trajectory_id=item.trajectory_id,
            is_end=item.is_end,
        )

    def _acked(self, event: OutgoingEvent) -> None:
        self.stats.acked += 1
        if not event.is_end:
            self._settle(event.trajectory_id)

    def _settle(self, trajectory: str) -> None:
        """One event of ``trajectory`` is done with; its end goes out once none is left."""
        if self._outstanding[trajectory] <= 0:
            return  # an event replayed from a previous process's outbox
        self._outstanding[trajectory] -= 1
        if self._outstanding[trajectory] == 0:
            del self._outstanding[trajectory]
            held = self._held_ends.pop(trajectory, None)
            if held is not None:
                self._queue.append(held)

    def _drain_memory(self) -> list[OutgoingEvent]:
        """Everything in memory, serialized, in an order safe to replay: ends after their events."""
        events = self._inflight + list(self._retry)
        self._inflight = []
        self._retry.clear()
        while self._queue:
            outgoing = self._serialize(self._queue.popleft())
            if outgoing is not None:
                events.append(outgoing)
        # A held end's earlier events are acked, in ``events`` above, or in an earlier segment.
        for item in list(self._held_ends.values()):
            outgoing = self._serialize(item)
            if outgoing is not None:
                events.append(outgoing)
        self._held_ends.clear()
        return events

    def _spill_buffer(self) -> None:
        events = self._drain_memory()
        if not events:
            return
        try:
            self._outbox.spill(events)
        except OSError:
            # Disk full or read-only: keep them in memory and try again later.
            self.stats.errors["spill"] += 1
            log.exception("cuneiform: could not spill %d events to the outbox", len(events))
            self._retry.extend(events)
            return
        self._outbox_dirty = True
        self.stats.spilled += len(events)

    async def _replay_outbox(self) -> bool:
        """Publish the outbox, oldest segment first; True once it is empty."""
        for segment in self._outbox.segments():
            try:
                events = self._outbox.read(segment)
            except (OSError, ValueError, KeyError, TypeError):
                self.stats.errors["bad_segment"] += 1
                log.exception("cuneiform: outbox segment %s is unreadable; set aside", segment)
                with contextlib.suppress(OSError):
                    self._outbox.quarantine(segment)
                continue
            done = self._replay_done.setdefault(segment.name, set())
            # Earlier events first, then the ends: an end is never stored before its trajectory's events.
            for group in ([e for e in events if not e.is_end], [e for e in events if e.is_end]):
                todo = [e for e in group if e.msg_id not in done]
                for start in range(0, len(todo), self._batch_size):
                    if not self.connected:
                        return False
                    chunk = todo[start : start + self._batch_size]
                    failed = await self._publish(chunk)
                    failed_ids = {id(e) for e in failed}
                    for event in chunk:
                        if id(event) not in failed_ids:
                            done.add(event.msg_id)
                            self._acked(event)
                            self.stats.replayed += 1
                    if failed:
                        self.stats.retried += len(failed)
                        return False
            self._outbox.remove(segment)
            del self._replay_done[segment.name]
        self._outbox_dirty = False
        return True

    async def _publish(self, batch: list[OutgoingEvent]) -> list[OutgoingEvent]:
        """Publish pipelined; returns the events that were not acknowledged (to retry), in order."""
        nc = self._nc
        assert nc is not None
        limit = nc.max_payload - _HEADROOM
        loop = asyncio.get_running_loop()
        waiting: list[tuple[OutgoingEvent, str, asyncio.Future[PubAck]]] = []
        failed_ids: set[int] = set()
        for index, event in enumerate(batch):
            try:
                payload = event.payload if len(event.payload) <= limit else await self._claim_check(event)
                token = str(next(self._tokens))
                future: asyncio.Future[PubAck] = loop.create_future()
                self._acks[token] = future
                try:
                    await nc.publish(
                        event.subject, payload, reply=self._reply_prefix + token, headers={"Nats-Msg-Id": event.msg_id}
                    )
                except BaseException:
                    self._acks.pop(token, None)
                    raise
                waiting.append((event, token, future))
            except asyncio.CancelledError:
                for _, token, future in waiting:
                    self._acks.pop(token, None)
                    future.cancel()
                raise
            except Exception as error:
                self._count_error(event, error)
                failed_ids.add(id(event))
                if not nc.is_connected:  # the rest would fail the same way
                    failed_ids.update(id(e) for e in batch[index + 1 :])
                    break
        if waiting:
            try:
                await asyncio.wait([f for _, _, f in waiting], timeout=self._ack_timeout)
            finally:
                for _, token, future in waiting:
                    self._acks.pop(token, None)
                    if not future.done():
                        future.cancel()
        for event, _, future in waiting:
            if future.cancelled():
                self.stats.errors["ack_timeout"] += 1
                failed_ids.add(id(event))
            elif (failure := future.exception()) is not None:
                self._count_error(event, failure)
                failed_ids.add(id(event))
            elif future.result().duplicate:
                self.stats.duplicates += 1
        return [e for e in batch if id(e) in failed_ids]

    def _count_error(self, event: OutgoingEvent, error: BaseException) -> None:
        name = type(error).__name__
        self.stats.errors[name] += 1
        if self.stats.errors[name] == 1 or self.stats.errors[name] % 1000 == 0:
            log.warning("cuneiform: publish of %s failed, will retry: %r", event.subject, error)

    async def _claim_check(self, event: OutgoingEvent) -> bytes:
        assert self._js is not None
        store = await self._js.object_store(self._payloads_bucket)
        digest = hashlib.sha256(event.payload).digest()
        # A retry (its ack was lost) must not upload again: a new version purges the chunks a recorder
        # may be reading. The name is the event id and the body never changes, so one upload is enough.
        try:
            existing = await store.get_info(event.msg_id)
        except nats.js.errors.NotFoundError:
            existing = None
        if existing is None or existing.digest != "SHA-256=" + base64.urlsafe_b64encode(digest).decode():
            await store.put(event.msg_id, event.payload)
        body = json.loads(event.payload)
        stub = {key: body[key] for key in _ENVELOPE_KEYS}
        stub["payload_ref"] = {
            "bucket": self._payloads_bucket,
            "name": event.msg_id,
            "sha256": digest.hex(),
            "size": len(event.payload),
        }
        self.stats.claim_checked += 1
        return json.dumps(stub, separators=(",", ":")).encode()
