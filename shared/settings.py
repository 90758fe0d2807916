"""Settings from the environment, prefix ``CONVEYOR_``. Every field is documented; the
README's table is checked against this class by a test."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REDIS_URL_FILE = "redis.url"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        description="redis:// or rediss:// URL of the broker and result store. Unset: the embedded "
        "Redis that `conveyor up` starts (its URL is recorded under CONVEYOR_HOME).",
    )
    home: Path = Field(
        default=Path.home() / ".conveyor",
        description="Where Conveyor keeps the embedded Redis's data, its URL, logs and Flower's login.",
    )
    model_dir: Path | None = Field(
        default=None, description="The model store. Unset: CONVEYOR_HOME/models."
    )
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="Most items in one forward pass.")
    max_wait_ms: float = Field(
        default=10.0, ge=0.0, le=10_000.0, description="Longest wait after a batch's first item before it runs."
    )
    token_budget: int = Field(
        default=8192,
        ge=1,
        description="Most padded tokens in one text batch (items x longest item); audio counts 30 s windows.",
    )
    worker_concurrency: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Task threads per worker process. 0: four times max_batch_size, so batches can fill.",
    )
    result_ttl_s: int = Field(default=86_400, ge=60, description="How long results stay in Redis (seconds).")
    visibility_timeout_s: int = Field(
        default=300,
        ge=5,
        description="Seconds after which a job held by a dead worker is redelivered. Live workers renew "
        "the lease of every job they hold, so long jobs are not redelivered while they run.",
    )
    idempotency_ttl_s: int = Field(
        default=86_400, ge=1, description="How long an idempotency key maps to its first job (seconds)."
    )
    model_cache_mb: int = Field(
        default=4096, ge=1, description="Memory bound of a worker's loaded-model cache (least recently used evicted)."
    )
    devices: str = Field(default="auto", description="Worker devices: auto, cpu, or GPU indices such as 0,1.")
    flower_port: int = Field(default=5555, ge=1, le=65535, description="Port of Flower on 127.0.0.1.")
    flower_user: str = Field(default="conveyor", description="Flower's basic-auth user.")
    flower_password: str | None = Field(
        default=None, description="Flower's basic-auth password. Unset: generated once, kept in CONVEYOR_HOME."
    )

    @cached_property
    def models_path(self) -> Path:
        return self.model_dir or self.home / "models"

    def broker_url(self) -> str:
        """The Redis URL to use: the configured one, or the embedded one recorded by `conveyor up`."""
        if self.redis_url:
            return self.redis_url
        recorded = self.home / REDIS_URL_FILE
        if recorded.exists():
            return recorded.read_text().strip()
        raise RuntimeError(
            f"no Redis configured: set CONVEYOR_REDIS_URL, or run `conveyor up` to start the embedded one "
            f"(it records its URL in {recorded})"
        )

    def concurrency(self) -> int:
        return self.worker_concurrency or 4 * self.max_batch_size


def get_settings() -> Settings:
    return Settings()
