from __future__ import annotations

from typing import ClassVar

from cuneiform_core.settings import SERVICE_CONFIG, ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict

#: Secrets that must never reach the training data: API keys of common providers, private keys.
DEFAULT_REDACTIONS = [
    r"sk-[A-Za-z0-9_-]{20,}",
    r"AKIA[0-9A-Z]{16}",
    r'-----BEGIN [A-Z ]*PRIVATE KEY-----[^"]*?-----END [A-Z ]*PRIVATE KEY-----',
]


class RecorderSettings(ServiceSettings):
    """Env prefix ``CUNEIFORM_RECORDER_``."""

    service_name: ClassVar[str] = "recorder"
    model_config = SettingsConfigDict(env_prefix="CUNEIFORM_RECORDER_", **SERVICE_CONFIG)  # type: ignore[typeddict-item]

    #: Events per fetch and per database transaction.
    batch_size: int = Field(default=1000, ge=1, le=10_000)
    #: Batches in flight at once: the next is fetched and decoded while the previous one commits.
    concurrency: int = Field(default=2, ge=1, le=16)
    #: Seconds before JetStream redelivers events a crashed recorder had fetched but not acked;
    #: longer than the slowest batch commit.
    ack_wait_s: float = Field(default=30.0, ge=1)
    #: A trajectory whose end arrived but whose events are still missing after this many seconds
    #: is marked ``incomplete`` (never trained on).
    incomplete_after_s: float = Field(default=300.0, gt=0)
    #: A trajectory with no end and no new event for this long is marked ``abandoned``.
    abandoned_after_s: float = Field(default=3600.0, gt=0)
    #: How often to look for trajectories past those grace periods, and for unpublished completions.
    sweep_interval_s: float = Field(default=5.0, gt=0)
    #: Largest claim-checked event body accepted (bytes).
    max_claim_check_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    #: Regular expressions whose matches in LLM calls and provider data are replaced by [REDACTED].
    #: They run over the JSON text of each value, so a pattern must not match a double quote.
    redact_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REDACTIONS))
    #: Most database connections: each batch in flight uses one, the sweep and dead letters another.
    pool_size: int = Field(default=4, ge=2)
