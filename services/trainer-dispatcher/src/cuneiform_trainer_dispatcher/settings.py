from __future__ import annotations

from typing import ClassVar, Literal

from cuneiform_core.settings import SERVICE_CONFIG, ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class DispatcherSettings(ServiceSettings):
    """Env prefix ``CUNEIFORM_TRAINER_DISPATCHER_``."""

    service_name: ClassVar[str] = "trainer-dispatcher"
    model_config = SettingsConfigDict(env_prefix="CUNEIFORM_TRAINER_DISPATCHER_", **SERVICE_CONFIG)  # type: ignore[typeddict-item]

    #: Trainer pool the offers go to (``batch.ready.<pool>``).
    pool: str = Field(default="default", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    #: The model the batches train, and what training starts from.
    model_name: str = "demo-policy"
    base_model: str = "demo-policy:v1"
    #: ``champion``: each batch trains from the version the routing table gives every agent not in an
    #: experiment (its artifact goes to the trainer), so the flywheel improves on what the fleet runs;
    #: ``base_model`` when nothing is deployed yet. ``base``: always from ``base_model``.
    start_from: Literal["champion", "base"] = "champion"
    hyperparameters: dict[str, float | int | str | bool] = Field(default_factory=dict)
    #: A claimed batch whose trainer sends nothing for this long is offered again (new attempt).
    heartbeat_timeout_s: float = Field(default=120.0, gt=0)
    #: Attempts before a batch is failed for good.
    max_attempts: int = Field(default=3, ge=1)
    #: How long the presigned dataset and artifact URLs stay valid.
    url_expiry_h: float = Field(default=12.0, gt=0, le=168)
    #: How often silent trainers are looked for.
    sweep_interval_s: float = Field(default=5.0, gt=0)
    pool_size: int = Field(default=4, ge=2)
