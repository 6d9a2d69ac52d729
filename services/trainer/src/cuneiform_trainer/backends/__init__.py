"""Training backends: each turns a verified dataset into a model artifact.

A backend is an object with a ``name`` and a blocking ``train(job, progress) -> TrainingOutput``; the
worker runs it in a thread (heartbeats keep going meanwhile) after downloading and checking every file
of the offer, and uploads ``TrainingOutput.artifact`` as the new model version. Two ship with the
trainer:

* ``cpu`` (:mod:`.cpu`): GRPO on the demo's tabular policy, pure Python — the loop runs anywhere.
* ``art`` (:mod:`.art`): OpenPipe ART on a GPU host (``pip install 'cuneiform-trainer[art]'``): LoRA
  GRPO of ``base_model`` on the dataset's ART trajectory groups; the artifact is the LoRA checkpoint.

:func:`load` imports a backend only when it is asked for, so the GPU stack is never needed elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

#: ``progress(step, metrics)``: called from the training thread after each step (epoch, ART step).
Progress = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainingJob:
    """Everything a backend needs, already downloaded and verified (sha256) by the worker."""

    #: The dataset's files by name: ``art.jsonl``, ``openai_chat.jsonl``, ``manifest.json``.
    files: Mapping[str, bytes]
    #: The registered model being trained (``demo-policy``) and the version the result will become.
    model_name: str
    version: str
    #: What training starts from: a registry reference (``demo-policy:v1``) or, for ``art``, a Hugging
    #: Face model id; ``start_artifact`` is that version's artifact when the registry has one.
    base_model: str
    start_artifact: bytes | None = None
    hyperparameters: Mapping[str, float | int | str | bool] = field(default_factory=dict)
    #: A scratch directory owned by this job (removed afterwards).
    workdir: Path = Path(".")


@dataclass(frozen=True)
class TrainingOutput:
    artifact: bytes
    metrics: dict[str, float]
    #: What the artifact is (the registry keeps it with the model).
    content_type: str = "application/octet-stream"


class Backend(Protocol):
    name: str

    def preflight(self) -> None:
        """Raise ``BackendUnavailableError`` (saying what to install) when this host cannot train: the
        trainer checks at start-up, so a host that cannot train never claims a batch."""

    def train(self, job: TrainingJob, progress: Progress) -> TrainingOutput: ...


class BackendUnavailableError(RuntimeError):
    """The backend's dependencies are not installed here; the message says what to install."""


def coerce_hyperparameters(backend: str, given: Mapping[str, Any], types: Mapping[str, type]) -> dict[str, Any]:
    """The offer's hyperparameters (JSON values) as the backend's types; a clear ``ValueError`` for an
    unknown name or a value of the wrong kind (a float epoch count, a string flag, ``true`` as a number)."""
    unknown = sorted(set(given) - set(types))
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown}; the {backend} backend takes {sorted(types)}")
    values: dict[str, Any] = {}
    for name, value in given.items():
        kind = types[name]
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"hyperparameter {name} must be true or false, not {value!r}")
        elif isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"hyperparameter {name} must be {kind.__name__}, not {value!r}")
        try:
            values[name] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"hyperparameter {name} must be {kind.__name__}, not {value!r}") from None
    return values


BACKENDS = {"cpu": "cuneiform_trainer.backends.cpu", "art": "cuneiform_trainer.backends.art"}


def load(name: str, **options: Any) -> Backend:
    """The backend called ``name``, built by its module's ``create(**options)``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown training backend {name!r}; choose one of {sorted(BACKENDS)}")
    module = importlib.import_module(BACKENDS[name])
    backend: Backend = module.create(**options)
    return backend
