from __future__ import annotations

from typing import ClassVar

from cuneiform_core.settings import SERVICE_CONFIG, ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class ReadinessSettings(ServiceSettings):
    """Env prefix ``CUNEIFORM_READINESS_``. Each rule is switched off by its neutral value (0)."""

    service_name: ClassVar[str] = "readiness"
    model_config = SettingsConfigDict(env_prefix="CUNEIFORM_READINESS_", **SERVICE_CONFIG)  # type: ignore[typeddict-item]

    #: Rule: at least this many complete trajectories not yet in a batch.
    min_trajectories: int = Field(default=64, ge=0)
    #: Rule: at least this many GRPO groups (scenarios) of ≥ 2 unused trajectories with a reward spread.
    min_groups: int = Field(default=8, ge=0)
    #: Rule: at least this fraction of the unused trajectories judged (a `judge` reward); 0 = no judge.
    min_judged_fraction: float = Field(default=0.0, ge=0, le=1)
    #: Only trajectories finalized within this many hours count (older data is stale for the policy).
    max_data_age_h: float = Field(default=72.0, gt=0)
    #: Rule: at least this many seconds since the last batch.
    cooldown_s: float = Field(default=3600.0, ge=0)
    #: Rule: data-quality score (completeness x (1 - failure rate) x share with LLM calls) at least this.
    min_quality: float = Field(default=0.5, ge=0, le=1)
    #: Most trajectories in one batch (whole groups, oldest first).
    max_batch_trajectories: int = Field(default=5000, ge=2, le=20_000)
    #: The timer: evaluate this often even when nothing happens (hourly, like the cron it replaces).
    evaluate_interval_s: float = Field(default=3600.0, gt=0)
    #: After pipeline events, evaluate at most this often.
    event_debounce_s: float = Field(default=10.0, gt=0)
    pool_size: int = Field(default=4, ge=2)
