"""One settings base for every service.

Connection settings (where NATS, PostgreSQL and the object store are) are shared by all services and
tools under the ``CUNEIFORM_`` prefix; each service's own knobs live under ``CUNEIFORM_<SERVICE>_``.
Real environment variables win over the env file that ``cuneiform-stack up`` writes, so the same code
points at the embedded stack, a compose stack or production by environment alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Where ``cuneiform-stack up`` writes the connection settings of the embedded stack.
STACK_ENV_FILE = Path(os.environ.get("CUNEIFORM_ENV_FILE", ".cuneiform/stack.env"))


class ConnectionSettings(BaseSettings):
    """Where the shared infrastructure lives. Env prefix ``CUNEIFORM_``."""

    model_config = SettingsConfigDict(env_prefix="CUNEIFORM_", env_file=STACK_ENV_FILE, extra="ignore", frozen=True)

    nats_url: str = "nats://127.0.0.1:4222"
    #: Prefix for every subject, stream, KV and object-store bucket name: lets two deployments (or two
    #: tests) share one NATS server without seeing each other. Empty in production.
    nats_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,32}$")
    #: JetStream file storage all streams may use together (GiB); the server reserves it up front.
    nats_storage_gib: float = Field(default=40.0, gt=0)
    pg_dsn: str = "postgresql://cuneiform:cuneiform@127.0.0.1:5432/cuneiform"
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "cuneiform"
    s3_secret_key: str = "cuneiform-secret"
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    s3_bucket: str = "cuneiform"


class ServiceSettings(BaseSettings):
    """Base of every service's own settings; subclasses set ``service_name`` and the env prefix.

    A subclass looks like::

        class RecorderSettings(ServiceSettings):
            service_name: ClassVar[str] = "recorder"
            model_config = SettingsConfigDict(env_prefix="CUNEIFORM_RECORDER_", **SERVICE_CONFIG)
    """

    service_name: ClassVar[str] = "service"

    log_level: str = "INFO"
    #: JSON logs; unset means JSON whenever stderr is not a terminal.
    log_json: bool | None = None
    metrics_host: str = "127.0.0.1"
    #: Port of the /metrics, /healthz and /readyz endpoint; 0 picks a free one.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    #: Seconds a stopping service waits for in-flight work to commit and ack.
    graceful_timeout: float = Field(default=30.0, gt=0)


#: Shared model_config keys for ServiceSettings subclasses (env file, unknown keys ignored).
SERVICE_CONFIG: dict[str, object] = {"env_file": STACK_ENV_FILE, "extra": "ignore", "frozen": True}
