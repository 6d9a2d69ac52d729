from __future__ import annotations

from typing import ClassVar, Literal

from cuneiform_core.settings import SERVICE_CONFIG, ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from .rules import Rule


class DeployerSettings(ServiceSettings):
    """Env prefix ``CUNEIFORM_DEPLOYER_``."""

    service_name: ClassVar[str] = "deployer"
    model_config = SettingsConfigDict(env_prefix="CUNEIFORM_DEPLOYER_", **SERVICE_CONFIG)  # type: ignore[typeddict-item]

    #: What a newly trained model (``pipeline.model.trained``) does: ``off`` (registered only),
    #: ``immediate`` (every agent at once), ``canary`` (``canary_percent`` of the agents) or ``ab``
    #: (half the agents). With no champion yet, the first model goes out immediately whatever this says.
    auto_rollout: Literal["off", "immediate", "canary", "ab"] = "canary"
    canary_percent: float = Field(default=10.0, gt=0, lt=100)
    #: The rule (README, "Promote or roll back"): completed trajectories per arm before testing,
    #: one-sided level of Welch's t-test, smallest mean gain that promotes, failure-rate guardrail and
    #: how many finished trajectories before it applies, and how long an experiment may run.
    min_trajectories: int = Field(default=30, ge=2)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    min_improvement: float = Field(default=0.0, ge=0)
    max_failure_rate: float = Field(default=0.2, ge=0, le=1)
    guardrail_min_trajectories: int = Field(default=10, ge=1)
    max_duration_s: float = Field(default=6 * 3600.0, gt=0)
    #: Evaluate running experiments this often, and after trajectory completions (debounced).
    evaluate_interval_s: float = Field(default=30.0, gt=0)
    event_debounce_s: float = Field(default=2.0, gt=0)
    #: Re-write routing tables and re-publish history events a crash left undone.
    sweep_interval_s: float = Field(default=5.0, gt=0)
    #: Check that the bucket still holds every table (a purged key is written again) this often.
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    pool_size: int = Field(default=4, ge=2)

    def rule(self) -> Rule:
        return Rule(
            min_trajectories=self.min_trajectories,
            alpha=self.alpha,
            min_improvement=self.min_improvement,
            max_failure_rate=self.max_failure_rate,
            guardrail_min_trajectories=self.guardrail_min_trajectories,
            max_duration_s=self.max_duration_s,
        )
