"""docker-compose.yml is configuration nobody runs in CI (no Docker here): check what can be
checked without it, that every QFORGE_* variable it sets is a setting the service reads and
parses, and that API and workers agree on the stores they share."""

from pathlib import Path

import yaml

from app.core.config import Settings

COMPOSE = Path(__file__).parents[2] / "docker-compose.yml"
QUANTCORE_VARIABLES = {"QFORGE_CACHE_DIR"}  # read by quantcore, not the service's Settings


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_every_qforge_variable_is_a_setting_that_parses(monkeypatch):
    for name, service in _services().items():
        env = service.get("environment") or {}
        qforge = {k: str(v) for k, v in env.items() if k.startswith("QFORGE_") and k not in QUANTCORE_VARIABLES}
        unknown = {k for k in qforge if k.removeprefix("QFORGE_").lower() not in Settings.model_fields}
        assert not unknown, f"{name}: {unknown} are not settings"
        for key, value in qforge.items():
            # ${VAR:-default} as compose resolves it with VAR unset
            if value.startswith("${") and ":-" in value:
                value = value.split(":-", 1)[1].rstrip("}")
            monkeypatch.setenv(key, value)
        if qforge:
            Settings()  # raises on a value that does not parse


def test_api_and_workers_share_database_broker_store_and_uploads():
    services = _services()
    api, worker = services["api"], services["worker"]
    for key in ("QFORGE_DATABASE_URL", "QFORGE_BROKER_URL", "QFORGE_ARTIFACT_URL", "QFORGE_S3_ENDPOINT_URL", "QFORGE_DATA_DIR"):
        assert api["environment"][key] == worker["environment"][key], key
    data_dir = api["environment"]["QFORGE_DATA_DIR"]
    shared = {v.split(":")[1]: v.split(":")[0] for v in api["volumes"]}
    assert shared.get(data_dir) is not None  # uploads written by the API ...
    assert any(v == f"{shared[data_dir]}:{data_dir}" for v in worker["volumes"])  # ... are read by workers
    assert "minio" in services and "minio" in api["depends_on"]
