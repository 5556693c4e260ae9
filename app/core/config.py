"""Service configuration: one pydantic-settings class, every field overridable by a
`QFORGE_<FIELD>` environment variable.

The defaults are the embedded setup: everything lives under `data_dir` (a SQLite database,
a SQLite-backed Celery broker that needs no server, the artifact folder), so `qforge serve`
runs with nothing else installed. Production points `QFORGE_DATABASE_URL` at PostgreSQL and
`QFORGE_BROKER_URL` at Redis.
"""

from __future__ import annotations

from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    # extra="ignore": other QFORGE_* variables (e.g. quantcore's QFORGE_CACHE_DIR) share the prefix;
    # env_ignore_empty: `VAR=` (as docker compose passes an unset ${VAR:-}) means "use the default".
    model_config = SettingsConfigDict(env_prefix="QFORGE_", extra="ignore", env_ignore_empty=True)

    data_dir: Path = Field(Path(".qforge"), description="root of the embedded database, broker and artifacts")
    # The next three default to files under data_dir (filled in by _embedded_defaults).
    database_url: str = Field(description="SQLAlchemy URL; default sqlite:///<data_dir>/qforge.db")
    broker_url: str = Field(description="Celery broker URL; default sqla+sqlite:///<data_dir>/broker.db")
    artifact_dir: Path = Field(description="finished artifacts (<job id>.tar); default <data_dir>/artifacts")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    worker_concurrency: int = Field(1, ge=1, description="jobs one worker runs at once (each holds a whole model)")
    worker_nice: int = Field(
        10, ge=0, le=19,
        description="`qforge serve`: how much lower the worker's CPU priority is than the API's (0: the same). "
        "A job's torch threads then get the cycles the API leaves idle: at 50 clients with jobs running all "
        "through, the embedded default's submit p50 / p99 were 11.9 / 155 ms at 10 against 25.6 / 691 ms at 0 "
        "(bench/RESULTS.md, runs B10 and B0)",
    )
    max_job_attempts: int = Field(2, ge=1, description="runs of a job whose worker was lost before it is failed")
    job_heartbeat_timeout: float = Field(
        60.0, gt=0, description="seconds without a heartbeat after which a running job's worker is presumed lost"
    )
    job_log_max_lines: int = Field(
        1000, ge=10, description="log lines kept per job; past it the oldest are removed as new ones are written"
    )
    bootstrap_api_key: SecretStr | None = Field(
        None, description="an admin key of the default tenant that `qforge serve` makes sure exists (at least 32 characters)"
    )
    # text: for a person at a terminal (the embedded `qforge serve`); json: one object a line
    # for a log pipeline (docker-compose.yml sets it). Both carry job_id, tenant_id, request_id.
    log_format: Literal["text", "json"] = Field("text", description="API and worker log lines: text or json")
    # Per-tenant limits (app.quotas); `qforge admin tenant quota` sets one tenant's own.
    tenant_max_active_jobs: int = Field(20, ge=1, description="a tenant's queued and running jobs at once")
    tenant_max_stored_bytes: int = Field(
        50 * 2**30, ge=1, description="bytes a tenant may keep: its uploaded models and datasets and its jobs' artifacts"
    )
    tenant_requests_per_minute: int = Field(
        6000, ge=0, description="API calls per minute of one tenant (bursts of up to a tenth of it at once); 0: no limit"
    )
    allow_local_model_paths: bool = Field(False, description="let clients name a model by a path on the worker")
    max_upload_bytes: int = Field(
        256 * 2**20, ge=1, description="largest dataset or model file accepted (and largest an .npz may unpack to)"
    )
    max_dataset_samples: int = Field(1_000_000, ge=1, description="most samples one uploaded dataset may hold")

    # Where finished artifacts are kept (app.artifact_store). The worker always builds them
    # in work_dir first; the store only ever receives whole files.
    artifact_url: str = Field(
        "", description="empty: the artifact_dir folder; s3://bucket[/prefix]: an S3-compatible object store"
    )
    s3_endpoint_url: str | None = Field(None, description="an S3-compatible server (MinIO, Ceph); empty: AWS")
    s3_region: str | None = Field(None, description="the bucket's region; empty: the AWS configuration's")
    s3_public_endpoint_url: str | None = Field(
        None, description="the store's address as clients reach it, for signed links (when it differs from s3_endpoint_url)"
    )
    artifact_links: Literal["store", "api"] = Field(
        "store",
        description="signed download links: 'store' hands out the object store's own (S3 presigned) links where it "
        "has them, 'api' always links to this API, which streams the file",
    )
    artifact_link_max_seconds: int = Field(
        7 * 24 * 3600, ge=1, le=7 * 24 * 3600, description="longest lifetime a signed link may be given (S3 allows 7 days)"
    )
    artifact_retention_days: float | None = Field(
        None, gt=0, description="delete a job's artifacts this long after it finished; empty: keep until deleted"
    )
    artifact_sweep_interval_s: float = Field(
        3600.0, gt=0, description="how often a worker deletes expired artifacts and abandoned uploads"
    )
    signing_key: SecretStr | None = Field(
        None, description="key of the API's signed links; empty: one generated once and kept in <data_dir>/signing.key"
    )

    # Webhooks: one signed POST to a job's callback_url when it finishes (app.webhooks, worker.webhooks).
    public_url: str | None = Field(
        None, description="the API's address as webhook receivers reach it, for links in events; default http://<host>:<port>"
    )
    webhook_secret: SecretStr | None = Field(
        None, description="key of webhook signatures; empty: one generated once and kept in <data_dir>/webhook.secret"
    )
    webhook_allow_loopback: bool | None = Field(
        None, description="callback URLs may reach this machine's loopback addresses; empty: only with the embedded SQLite"
    )
    # NoDecode: a comma-separated list in the environment, not JSON
    webhook_allowed_networks: Annotated[tuple[IPv4Network | IPv6Network, ...], NoDecode] = Field(
        (), description="non-public networks receivers may be in, comma-separated (e.g. 10.0.0.0/8); public ones always are"
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=300, description="longest one delivery attempt may take, connecting too")
    webhook_max_attempts: int = Field(6, ge=1, le=50, description="attempts of one event before it is given up")
    webhook_backoff_s: float = Field(
        20.0, gt=0, description="wait before the first retry, doubled for each next one (20: six attempts span ~10 minutes)"
    )
    webhook_poll_interval_s: float = Field(2.0, gt=0, description="how often each worker looks for events to send")

    @field_validator("artifact_url")
    @classmethod
    def _known_store(cls, url: str) -> str:
        url = url.strip()
        if url and not (url.startswith("s3://") and url.removeprefix("s3://").split("/", 1)[0]):
            raise ValueError(f"artifact_url '{url}': leave it empty for the artifact folder, or give s3://bucket[/prefix]")
        return url

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        try:
            return tuple(ip_network(v) if isinstance(v, str) else v for v in value)
        except ValueError as exc:  # e.g. host bits set: 10.0.0.1/8 is most likely a typo
            raise ValueError(f"webhook_allowed_networks: {exc}") from None

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
    def webhook_loopback_allowed(self) -> bool:
        """Loopback receivers are allowed in the embedded default: its API listens on this
        machine for this machine's user, who reaches loopback anyway. A shared deployment
        (PostgreSQL) must opt in: there a callback to loopback reaches the worker's own
        services on behalf of whoever submitted the job."""
        if self.webhook_allow_loopback is not None:
            return self.webhook_allow_loopback
        return self.database_url.startswith("sqlite")

    @property
    def storage_in_process(self) -> bool:
        """Database and broker are SQLite files this process reads and writes itself (the
        embedded default): their work is CPU time in this process, never a network wait."""
        return self.database_url.startswith("sqlite") and is_sqlite_broker(self.broker_url)

    @property
    def api_url(self) -> str:
        """The base of links handed to webhook receivers."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

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


def is_sql_broker(broker_url: str) -> bool:
    """kombu's SQL transport (`sqla+<database URL>`), on any database."""
    return broker_url.split("://", 1)[0].startswith(("sqla+", "sqlalchemy+"))


def is_sqlite_broker(broker_url: str) -> bool:
    """kombu's SQL transport on a SQLite file (the embedded default's broker)."""
    return broker_url.startswith(("sqla+sqlite", "sqlalchemy+sqlite"))


@lru_cache
def get_settings() -> Settings:
    return Settings()


async def settings_dependency() -> Settings:
    """The settings as a FastAPI dependency: async, because FastAPI runs a plain function
    dependency in a worker thread, a trip each request would pay for a cached value."""
    return get_settings()
