from __future__ import annotations

from typing import ClassVar, Literal

from cuneiform_core.settings import SERVICE_CONFIG, ServiceSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class ArchiverSettings(ServiceSettings):
    """Env prefix ``CUNEIFORM_ARCHIVER_``."""

    service_name: ClassVar[str] = "archiver"
    model_config = SettingsConfigDict(env_prefix="CUNEIFORM_ARCHIVER_", **SERVICE_CONFIG)  # type: ignore[typeddict-item]

    # --- raw segments ------------------------------------------------------------------------------
    #: A segment is written when it holds this many bytes of events (uncompressed)...
    segment_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    #: ... or this many events ...
    segment_max_events: int = Field(default=200_000, ge=1)
    #: ... or its first event has waited this many seconds (bounds how stale the cold copy can be).
    segment_max_age_s: float = Field(default=60.0, gt=0)
    #: Events per fetch from the stream.
    fetch_batch: int = Field(default=2000, ge=1, le=10_000)
    #: zstd level: 3 is zstd's default, fast with a good ratio on JSON.
    zstd_level: int = Field(default=3, ge=1, le=19)
    #: Largest claim-checked body copied into a segment (bytes); larger ones are recorded as a reference.
    max_claim_check_bytes: int = Field(default=64 * 1024 * 1024, gt=0)

    # --- retention ---------------------------------------------------------------------------------
    #: Finalized trajectories older than this many days leave PostgreSQL once every one of their
    #: events is in a verified segment. 0 keeps everything.
    retention_days: float = Field(default=0.0, ge=0)
    #: How often the retention timer runs (seconds).
    retention_interval_s: float = Field(default=3600.0, gt=0)

    # --- dataset export ----------------------------------------------------------------------------
    #: Put groups with fewer than 2 trajectories or zero reward spread into art.jsonl anyway (they
    #: carry no GRPO signal; by default they are only listed in the manifest).
    include_degenerate_groups: bool = False
    #: Which trajectories become SFT examples in openai_chat.jsonl: the best ``sft_top_fraction`` of
    #: each group by reward (``top_per_group``), or every trajectory at or above ``sft_min_reward``
    #: (``min_reward``).
    sft_selection: Literal["top_per_group", "min_reward"] = "top_per_group"
    sft_top_fraction: float = Field(default=0.25, gt=0, le=1)
    sft_min_reward: float | None = None
    #: Trajectories read from PostgreSQL per query while exporting (bounds memory).
    export_chunk: int = Field(default=500, ge=1)
    #: Seconds an export may take before JetStream re-offers its batch.created event.
    export_ack_wait_s: float = Field(default=900.0, ge=10)

    #: Most database connections.
    pool_size: int = Field(default=4, ge=2)
