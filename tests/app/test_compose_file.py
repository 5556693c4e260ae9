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


def test_flower_watches_the_workers_broker_on_port_5555():
    services = _services()
    flower = services["flower"]
    broker = [arg.split("=", 1)[1] for arg in flower["command"] if arg.startswith("--broker=")]
    assert broker == [services["worker"]["environment"]["QFORGE_BROKER_URL"]]  # the queue the workers consume
    assert flower["command"][-2:] == ["flower", "--port=5555"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]  # it can stop workers: loopback only
    assert "redis" in flower["depends_on"]


def test_prometheus_scrapes_the_apis_metrics_route_and_flower(client):
    services = _services()
    mount = [v for v in services["prometheus"]["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro")]
    [source] = [v.split(":")[0] for v in mount]
    config = yaml.safe_load((COMPOSE.parent / source).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    api = jobs["qforge-api"]
    scraped = client.get(api["metrics_path"])  # with no API key, as Prometheus scrapes it
    assert scraped.status_code == 200 and "# TYPE qforge_jobs gauge" in scraped.text
    [dns] = api["dns_sd_configs"]
    assert dns["names"] == ["api"] and str(dns["port"]) == services["api"]["environment"]["QFORGE_PORT"]
    [flower] = jobs["flower"]["static_configs"]
    assert flower["targets"] == ["flower:5555"]
    assert set(services["prometheus"]["depends_on"]) == {"api", "flower"}
