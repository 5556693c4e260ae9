"""Service configuration: one pydantic-settings class, every field overridable by a
`QFORGE_<FIELD>` environment variable.

The defaults are the embedded setup: everything lives under `data_dir` (a SQLite database,
a SQLite-backed Celery broker that needs no server, the artifact folder), so `qforge serve`
runs with nothing else installed. Production points `QFORGE_DATABASE_URL` at PostgreSQL and
`QFORGE_BROKER_URL` at Redis.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # extra="ignore": other QFORGE_* variables (e.g. quantcore's QFORGE_CACHE_DIR) share the prefix.
    model_config = SettingsConfigDict(env_prefix="QFORGE_", extra="ignore")

    data_dir: Path = Field(Path(".qforge"), description="root of the embedded database, broker and artifacts")
    # The next three default to files under data_dir (filled in by _embedded_defaults).
    database_url: str = Field(description="SQLAlchemy URL; default sqlite:///<data_dir>/qforge.db")
    broker_url: str = Field(description="Celery broker URL; default sqla+sqlite:///<data_dir>/broker.db")
    artifact_dir: Path = Field(description="finished artifacts (<job id>.tar); default <data_dir>/artifacts")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    worker_concurrency: int = Field(1, ge=1, description="jobs one worker runs at once (each holds a whole model)")
    max_job_attempts: int = Field(2, ge=1, description="runs of a job whose worker was lost before it is failed")
    job_heartbeat_timeout: float = Field(
        60.0, gt=0, description="seconds without a heartbeat after which a running job's worker is presumed lost"
    )
    allow_local_model_paths: bool = Field(False, description="let clients name a model by a path on the worker")
    max_upload_bytes: int = Field(
        256 * 2**20, ge=1, description="largest dataset or model file accepted (and largest an .npz may unpack to)"
    )
    max_dataset_samples: int = Field(1_000_000, ge=1, description="most samples one uploaded dataset may hold")

    @model_validator(mode="before")
    @classmethod
    def _embedded_defaults(cls, values: dict[str, Any]) -> dict[str, Any]:
        # Absolute paths, so the API and the worker (which may start elsewhere) agree on the files.
        values = dict(values)
        data_dir = Path(values.get("data_dir") or ".qforge").expanduser().resolve()
        values["data_dir"] = data_dir
        values["database_url"] = values.get("database_url") or f"sqlite:///{data_dir / 'qforge.db'}"
        values["broker_url"] = values.get("broker_url") or f"sqla+sqlite:///{data_dir / 'broker.db'}"
        values["artifact_dir"] = Path(values.get("artifact_dir") or data_dir / "artifacts").expanduser().resolve()
        return values

    @property
    def datasets_dir(self) -> Path:
        """Uploaded datasets, one folder per dataset id."""
        return self.data_dir / "datasets"

    @property
    def models_dir(self) -> Path:
        """Uploaded models, one folder per model id."""
        return self.data_dir / "models"

    @property
    def work_dir(self) -> Path:
        """Where running jobs write; each job's folder is removed once its artifact is archived."""
        return self.artifact_dir / "work"


@lru_cache
def get_settings() -> Settings:
    return Settings()
