"""app.webhooks: which receiver addresses are allowed, the deployment's secret, and the
event a finished job sends."""

import ipaddress
import json
import stat

import pytest

from app.core.config import Settings
from app.models import Job, JobStatus, utcnow
from app.webhooks import address_allowed, build_event, webhook_secret


def settings_with(monkeypatch, tmp_path, **env) -> Settings:
    monkeypatch.setenv("QFORGE_DATA_DIR", str(tmp_path))
    for name in ("DATABASE_URL", "WEBHOOK_ALLOW_LOOPBACK", "WEBHOOK_ALLOWED_NETWORKS", "WEBHOOK_SECRET", "SIGNING_KEY",
                 "PUBLIC_URL", "HOST", "PORT"):
        monkeypatch.delenv(f"QFORGE_{name}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(f"QFORGE_{name.upper()}", value)
    return Settings()


CASES = [  # address, embedded (SQLite), production (PostgreSQL), production listing 10.0.0.0/8
    ("93.184.216.34", True, True, True),
    ("2606:2800:220:1:248:1893:25c8:1946", True, True, True),
    ("127.0.0.1", True, False, False),
    ("127.8.9.10", True, False, False),
    ("::1", True, False, False),
    ("::ffff:127.0.0.1", True, False, False),
    ("10.1.2.3", False, False, True),
    ("::ffff:10.1.2.3", False, False, True),
    ("192.168.1.1", False, False, False),
    ("172.16.0.1", False, False, False),
    ("169.254.169.254", False, False, False),  # cloud metadata
    ("100.64.0.1", False, False, False),  # carrier-grade NAT
    ("0.0.0.0", False, False, False),
    ("224.0.0.1", False, False, False),  # multicast
    ("fd00::1", False, False, False),
    ("fe80::1", False, False, False),
    ("64:ff9b::a01:203", False, False, True),  # NAT64 of 10.1.2.3
    ("64:ff9b::5db8:d822", True, True, True),  # NAT64 of 93.184.216.34
]


@pytest.mark.parametrize("address, embedded, production, listed", CASES, ids=[c[0] for c in CASES])
def test_public_addresses_always_others_only_when_allowed(monkeypatch, tmp_path, address, embedded, production, listed):
    pg = "postgresql+psycopg2://q@db/q"
    ip = ipaddress.ip_address(address)
    assert address_allowed(ip, settings_with(monkeypatch, tmp_path)) is embedded
    assert address_allowed(ip, settings_with(monkeypatch, tmp_path, database_url=pg)) is production
    allowing = settings_with(monkeypatch, tmp_path, database_url=pg, webhook_allowed_networks="10.0.0.0/8")
    assert address_allowed(ip, allowing) is listed


def test_loopback_can_be_switched_either_way(monkeypatch, tmp_path):
    loopback = ipaddress.ip_address("127.0.0.1")
    assert not address_allowed(loopback, settings_with(monkeypatch, tmp_path, webhook_allow_loopback="false"))
    pg = settings_with(monkeypatch, tmp_path, database_url="postgresql+psycopg2://q@db/q", webhook_allow_loopback="true")
    assert address_allowed(loopback, pg)


def test_the_default_secret_is_generated_once_private_and_apart_from_the_signing_key(monkeypatch, tmp_path):
    from app.artifacts import signing_key

    settings = settings_with(monkeypatch, tmp_path)
    secret = webhook_secret(settings)
    assert len(secret) == 64 and webhook_secret(settings_with(monkeypatch, tmp_path)) == secret
    path = tmp_path / "webhook.secret"
    assert path.read_bytes() == secret and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret != signing_key(settings)
    assert webhook_secret(settings_with(monkeypatch, tmp_path, webhook_secret="configured")) == b"configured"


def test_the_public_url_defaults_to_where_the_api_listens(monkeypatch, tmp_path):
    assert settings_with(monkeypatch, tmp_path).api_url == "http://127.0.0.1:8000"
    assert settings_with(monkeypatch, tmp_path, host="0.0.0.0", port="9000").api_url == "http://127.0.0.1:9000"
    assert settings_with(monkeypatch, tmp_path, public_url="https://q.example.com/").api_url == "https://q.example.com"


def test_only_a_finished_job_has_an_event(monkeypatch, tmp_path):
    settings = settings_with(monkeypatch, tmp_path)
    job = Job(id="a" * 32, status=JobStatus.RUNNING, model="m", attempts=1, created_at=utcnow())
    with pytest.raises(ValueError, match="only a finished job"):
        build_event(job, "e" * 32, settings, utcnow())
    job.status, job.finished_at, job.error = JobStatus.FAILED, utcnow(), "boom"
    event_type, body = build_event(job, "e" * 32, settings, utcnow())
    event = json.loads(body)
    assert event_type == event["type"] == "job.failed" and event["job"]["error"] == "boom"
    assert event["created_at"].endswith("Z") and b" " not in body  # compact, UTC
