from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import ClassVar, Literal

from cuneiform_core.settings import SERVICE_CONFIG, ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class TrainerSettings(ServiceSettings):
    """Env prefix ``CUNEIFORM_TRAINER_``."""

    service_name: ClassVar[str] = "trainer"
    model_config = SettingsConfigDict(env_prefix="CUNEIFORM_TRAINER_", **SERVICE_CONFIG)  # type: ignore[typeddict-item]

    pool: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    trainer_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    #: ``cpu``: the built-in GRPO backend (runs anywhere). ``art``: OpenPipe ART on a GPU host
    #: (``pip install 'cuneiform-trainer[art]'``).
    backend: Literal["cpu", "art"] = "cpu"
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    #: Scratch space for a job (the ``art`` backend's checkpoints); a directory per attempt, removed after.
    work_dir: Path | None = None
    #: Weights & Biases logging of every attempt: ``disabled``, ``offline`` (no account or network
    #: needed; ``wandb sync`` later) or ``online`` (needs ``WANDB_API_KEY``). Needs the ``wandb`` extra.
    wandb_mode: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "cuneiform"
    wandb_entity: str | None = None
    #: Where runs are written (W&B puts them under ``<dir>/wandb/``); default ``$WANDB_DIR`` or ``.``.
    wandb_dir: Path | None = None
