"""Recording for synchronous agents: the same API, with the publisher on a background thread.

::

    with SyncRecorder() as recorder:
        with recorder.trajectory(agent_id="bot-1", model="gpt-4o-mini") as t:
            t.step(observation="hello")
            t.reward(1.0)

Record calls validate in the caller's thread (a mistake raises where it was made) and hand the
event to the publisher's thread without waiting. Any number of threads may record at once, each on
its own trajectories. A recorder left open at interpreter exit is closed then, so what it still
holds reaches NATS or the outbox.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from typing import Any

from .contract import Envelope
from .publisher import PublisherStats
from .recorder import Recorder, TrajectoryFactory


class SyncRecorder(TrajectoryFactory):
    def __init__(self, nats_url: str | None = None, **options: Any) -> None:
        # Resolved in the caller's thread (a SyncRouting answers from memory), like validation.
        self.routing = options.pop("routing", None)
        self._options = options
        self._nats_url = nats_url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cuneiform-recorder", daemon=True)
        self._recorder: Recorder | None = None
        self._lock = threading.Lock()

    def start(self) -> SyncRecorder:
        with self._lock:
            if self._recorder is not None:
                return self
            if not self._thread.is_alive():
                self._thread.start()
            try:
                self._recorder = self._call(self._make())
            except BaseException:
                self._stop_loop()
                raise
            atexit.register(self._close_at_exit)
        return self

    async def _make(self) -> Recorder:
        recorder = Recorder(self._nats_url, **self._options)
        await recorder.start()
        return recorder

    @property
    def recorder(self) -> Recorder:
        if self._recorder is None:
            raise RuntimeError("SyncRecorder not started: use `with SyncRecorder() as recorder:` or .start()")
        return self._recorder

    @property
    def stats(self) -> PublisherStats:
        return self.recorder.stats

    @property
    def connected(self) -> bool:
        return self.recorder.connected

    @property
    def prefix(self) -> str:
        return self.recorder.prefix

    def _submit(self, event: Envelope, subject: str, is_end: bool) -> None:
        # Validated in the caller's thread; handed to the publisher's loop without waiting. The
        # recorder is looked up here so that recording after close raises in the caller.
        recorder = self.recorder
        self._loop.call_soon_threadsafe(recorder._publisher.submit, event, subject, is_end)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every event recorded so far is in the stream; False on timeout."""
        return bool(self._call(self.recorder.flush(timeout)))

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered in ``timeout``; the rest waits in the outbox for next time."""
        with self._lock:
            recorder, self._recorder = self._recorder, None
            if recorder is not None:
                atexit.unregister(self._close_at_exit)
                try:
                    self._call(recorder.close(timeout))
                finally:
                    self._stop_loop()

    def _close_at_exit(self) -> None:
        self.close(timeout=3.0)

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running():
            self._loop.close()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> SyncRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
