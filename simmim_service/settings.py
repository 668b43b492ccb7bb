"""Service configuration: one pydantic-settings class, read from ``SIMMIM_*`` environment variables.

Nothing reads the environment at import time: build ``Settings()`` where the process starts
and hand it down (tests construct their own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting of the API, the workers and the embedded mode."""

    model_config = SettingsConfigDict(env_prefix="SIMMIM_", extra="ignore")

    database_url: str = Field(default="sqlite:///./.simmim/jobs.db",
                              description="Job store: sqlite:///path or postgresql+psycopg://user@host/db")
    broker_url: str = Field(default="redis://127.0.0.1:6379/0", description="Celery broker")
    result_backend: str = Field(default="redis://127.0.0.1:6379/1",
                                description="Celery result backend (used for synchronous embedding requests)")
    artifact_root: str = Field(default="./.simmim/artifacts",
                               description="Directory or fsspec URL (s3://bucket/prefix) for job artifacts")
    artifact_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options, e.g. {\"endpoint_url\": \"http://minio:9000\"}")
    dataset_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for s3:// (or other fsspec) dataset locations")
    work_dir: str = Field(default="./.simmim/work", description="Worker-local scratch space")
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="Local dataset locations must lie under one of these directories (empty: any)")
    api_keys: dict[str, str] = Field(
        default_factory=dict, description="API key -> tenant. Empty: no authentication (embedded mode only)")
    auth_required: bool = Field(default=True, description="Refuse requests without a valid key")
    default_tenant: str = Field(default="local", description="Tenant of unauthenticated requests")
    host: str = "127.0.0.1"
    port: int = 8000
    max_embed_images: int = Field(default=256, ge=1)
    max_embed_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="Per embedding request")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="Refuse larger images (decompression bombs)")
    embed_timeout_s: float = Field(default=120.0, gt=0)
    progress_interval_s: float = Field(default=2.0, ge=0, description="Throttle for progress writes")
    lease_seconds: float = Field(default=120.0, gt=0, description="A worker silent this long is lost")
    worker_gpus: int = Field(
        default=1, ge=1, le=64,
        description="Devices one training worker process owns (its GPUs, or CPU processes on a CPU-only "
                    "worker); it takes jobs with training.gpus up to this. Set by `simmim-service worker`")
    max_job_gpus: int = Field(default=8, ge=1, le=64, description="Largest training.gpus the API accepts")
    embed_cache_size: int = Field(default=4, ge=1, description="Encoders kept loaded per embed worker")
    reaper_interval_s: float = Field(
        default=15.0, gt=0, description="How often the API looks for jobs whose worker stopped heart-beating")
    redispatch_after_s: float = Field(
        default=600.0, gt=0,
        description="Re-send the task of a job still queued/recovering after this long (a lost broker message)")
    max_lost_attempts: int = Field(
        default=5, ge=1, description="Attempts that may lose their worker before the job fails (worker_lost)")
    cancel_grace_s: float = Field(
        default=60.0, gt=0, description="After a cancel, how long training may take to stop before its "
                                        "process is terminated")
    max_archive_member_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1, description="Largest file read from a dataset archive (zip bombs)")
    rate_limit_per_minute: int = Field(
        default=600, ge=0, description="Requests per minute per API key (tenant); 0 turns rate limiting off")
    rate_limit_burst: int = Field(default=60, ge=1, description="Requests a key may send at once above the rate")
    max_active_jobs_per_tenant: int = Field(
        default=20, ge=1, description="Jobs a tenant may have queued or running at once")
    webhook_max_attempts: int = Field(
        default=8, ge=1, description="Tries to deliver one webhook event before giving up")
    webhook_backoff_s: float = Field(
        default=10.0, gt=0, description="Wait before the first webhook retry; doubled after each failure "
                                        "(at most an hour)")
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="Seconds one webhook POST may take")
    webhook_allow_private: bool = Field(
        default=True, description="Allow webhook URLs on loopback, private, link-local and other non-public "
        "addresses. Set false where API keys go to people who must not reach your internal network (SSRF)")

    @property
    def is_local_artifacts(self) -> bool:
        return "://" not in self.artifact_root or self.artifact_root.startswith("file://")

    def local_artifact_root(self) -> Path:
        return Path(self.artifact_root.removeprefix("file://")).resolve()
