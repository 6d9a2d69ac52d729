"""Optional Weights & Biases logging of training attempts.

One W&B run per attempt (``<model>-<batch>-a<attempt>``, grouped by batch, so a re-offered batch's
attempts sit side by side), with the offer as its config (batch, dataset, base model, pool, backend,
hyperparameters), every progress step as a history row, and the final metrics — or the failure — in
its summary. ``CUNEIFORM_TRAINER_WANDB_MODE``: ``disabled`` (default), ``offline`` (writes the run
under ``wandb_dir`` with no account and no network; ``wandb sync`` uploads it later) or ``online``.

Logging never decides an attempt's outcome: a W&B error is logged and training goes on.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cuneiform_core.events import TrainingOffer
from cuneiform_core.logging import get_logger

from .settings import TrainerSettings

log = get_logger(__name__)


class WandbUnavailableError(RuntimeError):
    pass


def require_wandb() -> None:
    """Fail at start-up, not at the first batch, when logging is asked for but wandb is missing."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise WandbUnavailableError(
            "CUNEIFORM_TRAINER_WANDB_MODE asks for Weights & Biases logging but wandb is not installed: "
            "pip install 'cuneiform-trainer[wandb]' (or set CUNEIFORM_TRAINER_WANDB_MODE=disabled)"
        ) from None


class AttemptLog:
    """One attempt's W&B run. Thread-safe: progress arrives from the training thread."""

    def __init__(self, run: Any) -> None:
        self._run = run
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path:
        return Path(self._run.dir).parent

    def step(self, step: int, metrics: dict[str, float]) -> None:
        with self._lock, _quietly("wandb.log_failed"):
            self._run.log(dict(metrics), step=step)

    def finish(self, *, metrics: dict[str, float] | None = None, failure: str | None = None) -> None:
        with self._lock, _quietly("wandb.finish_failed"):
            summary = self._run.summary
            summary["outcome"] = "failed" if failure else "completed"
            if failure:
                summary["failure"] = failure
            for key, value in (metrics or {}).items():
                summary[f"final/{key}"] = value
            self._run.finish(exit_code=1 if failure else 0)


def start_attempt(settings: TrainerSettings, offer: TrainingOffer) -> AttemptLog | None:
    """The attempt's run, or None when logging is disabled or W&B cannot start (logged). Blocking."""
    if settings.wandb_mode == "disabled":
        return None
    import wandb

    directory = settings.wandb_dir or Path(os.environ.get("WANDB_DIR") or ".")
    directory.mkdir(parents=True, exist_ok=True)
    with _quietly("wandb.init_failed"):
        run = wandb.init(
            mode=settings.wandb_mode,
            project=settings.wandb_project,
            entity=settings.wandb_entity,
            dir=str(directory),
            name=f"{offer.model_name}-{offer.batch_id}-a{offer.attempt}",
            group=str(offer.batch_id),
            job_type="train",
            tags=[settings.backend, settings.pool],
            config={
                "batch_id": str(offer.batch_id),
                "dataset_id": str(offer.dataset_id),
                "attempt": offer.attempt,
                "model_name": offer.model_name,
                "base_model": offer.base_model,
                "pool": offer.pool,
                "backend": settings.backend,
                "trainer_id": settings.trainer_id,
                "hyperparameters": dict(offer.hyperparameters),
            },
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        return AttemptLog(run)
    return None


@contextlib.contextmanager
def _quietly(event: str) -> Iterator[None]:
    try:
        yield
    except Exception as error:  # logging must never fail an attempt
        log.warning(event, error=repr(error))
