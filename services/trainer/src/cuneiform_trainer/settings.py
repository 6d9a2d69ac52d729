from __future__ import annotations

import os
import socket
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
    #: ``cpu``: the built-in GRPO backend (runs anywhere). ``art`` (OpenPipe ART on a GPU host) is planned.
    backend: Literal["cpu"] = "cpu"
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
