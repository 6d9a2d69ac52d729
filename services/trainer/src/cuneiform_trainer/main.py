"""The reference trainer: what a GPU host runs. Claims offers, trains, uploads, reports.

One offer at a time: the worker fetches from ``batch.ready.<pool>`` (a work queue shared by every
trainer of the pool) only when idle, and acks the offer as soon as it has it — that is the claim; if
the worker dies afterwards, the dispatcher notices the silence and offers the batch again with the
next attempt number. Then: ``claimed`` report, download every file through its presigned URL and check
its sha256, train with the backend in a worker thread (heartbeats keep going meanwhile), upload the
artifact through the presigned PUT URL, ``completed`` with its size and sha256 — or ``failed`` with
the reason. Every report carries the attempt number, which is what the dispatcher fences on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from cuneiform_core.events import TrainingOffer, TrainingReport, publish, stable_id
from cuneiform_core.logging import get_logger
from cuneiform_core.puller import ConsumerUnavailableError, Puller
from cuneiform_core.runtime import TRANSIENT_ERRORS, Delivery, backoff_delay, finish_loop
from cuneiform_core.service import Service, run
from cuneiform_core.settings import ConnectionSettings
from cuneiform_core.topology import BATCHES, TRAINING, batch_ready_subject, training_subject
from faststream.nats import NatsBroker
from nats.js.api import AckPolicy, ConsumerConfig
from prometheus_client import Counter

from . import tracking
from .backends import BackendUnavailableError, TrainingJob, load
from .settings import TrainerSettings

log = get_logger(__name__)

_FETCH_RETRYABLE: tuple[type[BaseException], ...] = (ConsumerUnavailableError, *TRANSIENT_ERRORS)
TRAINED = Counter("cuneiform_trainer_attempts_total", "Training attempts by outcome", ["outcome"])


class OfferWorker:
    """A ``Service`` consumer that fetches one offer at a time, only when idle."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        topology = trainer.service.topology
        self.stream = topology.stream(BATCHES)
        self.name = (
            f"{topology.prefix}_trainer-{trainer.settings.pool}"
            if topology.prefix
            else (f"trainer-{trainer.settings.pool}")
        )
        self.subject = topology.subject(batch_ready_subject(trainer.settings.pool))
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._broker: NatsBroker | None = None

    async def start(self, broker: NatsBroker) -> None:
        self._broker = broker
        config = ConsumerConfig(
            durable_name=self.name, filter_subject=self.subject, ack_policy=AckPolicy.EXPLICIT, ack_wait=60
        )
        await broker.connection.jetstream().add_consumer(self.stream, config)
        self._task = asyncio.create_task(self._run(broker), name="trainer-offers")

    async def stop(self, timeout: float) -> None:
        self._stopping.set()
        await finish_loop(self._task, timeout, self.name)

    async def _run(self, broker: NatsBroker) -> None:
        puller = Puller(broker.connection, self.stream, self.name)
        await puller.start()
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    msgs = await puller.fetch(1, 1.0)
                except _FETCH_RETRYABLE as error:
                    failures += 1
                    log.warning("trainer.fetch_failed", error=repr(error))
                    await asyncio.sleep(backoff_delay(failures, 0.5, 5.0))
                    continue
                failures = 0
                for msg in msgs:
                    delivery = Delivery(msg)
                    try:
                        offer = TrainingOffer.model_validate_json(delivery.data)
                    except ValueError as error:
                        log.error("trainer.bad_offer", error=str(error)[:300])
                        await msg.term()
                        continue
                    await msg.ack()  # the claim: from here on, the dispatcher's heartbeat timeout covers us
                    await self.trainer.train(offer)
        finally:
            await puller.stop()


class Trainer:
    def __init__(self, settings: TrainerSettings, connection: ConnectionSettings | None = None) -> None:
        self.settings = settings
        self.backend = load(settings.backend)
        self.backend.preflight()  # a host that cannot train must not claim batches
        if settings.wandb_mode != "disabled":
            tracking.require_wandb()
        self.service = Service(settings, connection)
        self.worker = OfferWorker(self)
        self.service.add_consumer(self.worker)

    async def report(self, offer: TrainingOffer, kind: str, **fields: Any) -> None:
        sequence = fields.pop("sequence", 0)
        report = TrainingReport(
            event_id=stable_id(
                "training.report", offer.batch_id, offer.attempt, self.settings.trainer_id, kind, sequence
            ),
            batch_id=offer.batch_id,
            attempt=offer.attempt,
            trainer_id=self.settings.trainer_id,
            kind=kind,  # type: ignore[arg-type]
            **fields,
        )
        topology = self.service.topology
        await publish(
            self.service.broker,
            topology.subject(training_subject(offer.batch_id, kind)),
            report,
            stream=topology.stream(TRAINING),
        )

    async def train(self, offer: TrainingOffer) -> None:
        log.info("trainer.claimed", batch_id=str(offer.batch_id), attempt=offer.attempt)
        await self.report(offer, "claimed")
        beats = asyncio.create_task(self._heartbeat(offer))
        run: tracking.AttemptLog | None = None
        try:
            files = {f.name: await asyncio.to_thread(_download, f.url, f.sha256) for f in offer.files}
            start = None
            if offer.base_model_url:
                start = await asyncio.to_thread(_download, offer.base_model_url, offer.base_model_sha256)
            run = await asyncio.to_thread(tracking.start_attempt, self.settings, offer)
            loop = asyncio.get_running_loop()
            sent: list[concurrent.futures.Future[None]] = []

            def progress(step: int, numbers: dict[str, float]) -> None:
                # Called in the training thread: the report is published from the event loop.
                report = self.report(offer, "progress", sequence=step, step=step, metrics=numbers)
                sent.append(asyncio.run_coroutine_threadsafe(report, loop))
                if run is not None:
                    run.step(step, numbers)

            with tempfile.TemporaryDirectory(prefix=f"attempt-{offer.attempt}-", dir=self._work_dir()) as workdir:
                job = TrainingJob(
                    files=files,
                    model_name=offer.model_name,
                    version=_next_version(offer),
                    base_model=offer.base_model,
                    start_artifact=start,
                    hyperparameters=offer.hyperparameters,
                    workdir=Path(workdir),
                )
                output = await asyncio.to_thread(self.backend.train, job, progress)
            # Progress reports go out before the result, in order.
            await asyncio.gather(*(asyncio.wrap_future(f) for f in sent), return_exceptions=True)
            artifact, metrics = output.artifact, output.metrics
            await asyncio.to_thread(_upload, offer.artifact_upload_url, artifact, output.content_type)
            digest = hashlib.sha256(artifact).hexdigest()
            await self.report(offer, "completed", metrics=metrics, artifact_size=len(artifact), artifact_sha256=digest)
            TRAINED.labels("completed").inc()
            log.info("trainer.completed", batch_id=str(offer.batch_id), attempt=offer.attempt, **metrics)
            outcome: dict[str, Any] = {"metrics": metrics}
        except Exception as error:
            TRAINED.labels("failed").inc()
            reason = f"{type(error).__name__}: {error}"[:2000]
            log.warning("trainer.failed", batch_id=str(offer.batch_id), error=repr(error))
            with contextlib.suppress(Exception):
                await self.report(offer, "failed", reason=reason)
            outcome = {"failure": reason}
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        if run is not None:
            await asyncio.to_thread(functools.partial(run.finish, **outcome))

    def _work_dir(self) -> str | None:
        if self.settings.work_dir is None:
            return None
        self.settings.work_dir.mkdir(parents=True, exist_ok=True)
        return str(self.settings.work_dir)

    async def _heartbeat(self, offer: TrainingOffer) -> None:
        n = 0
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            n += 1
            with contextlib.suppress(Exception):
                await self.report(offer, "heartbeat", sequence=n)


def _next_version(offer: TrainingOffer) -> str:
    # The registry names the version; the artifact records where it came from.
    return f"trained-{offer.batch_id}-a{offer.attempt}"


def _download(url: str, sha256: str | None) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        body: bytes = response.read()
    if sha256 is not None and hashlib.sha256(body).hexdigest() != sha256:
        raise ValueError(f"downloaded file does not match its sha256 {sha256}")
    return body


def _upload(url: str, body: bytes, content_type: str) -> None:
    request = urllib.request.Request(url, data=body, method="PUT", headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=120) as response:
        if response.status not in (200, 204):
            raise OSError(f"artifact upload answered {response.status}")


def build(settings: TrainerSettings | None = None, connection: ConnectionSettings | None = None) -> Service:
    return Trainer(settings or TrainerSettings(), connection).service


def main() -> None:
    try:
        run(build)
    except (BackendUnavailableError, tracking.WandbUnavailableError) as error:
        # A configuration this host cannot serve: one line that says what to do, not a traceback.
        print(f"cuneiform-trainer: {error}", file=sys.stderr)
        sys.exit(2)
