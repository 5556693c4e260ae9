"""POST /v1/jobs with a callback_url: validated at the edge (a problem naming the field),
stored with the job and its pending webhook, shown in the job JSON; the secret never is."""

import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.models import WebhookDelivery

PROBLEM = "https://qforge.dev/problems/"
JOB = {"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64"}
CLASSIC = {"kind": "ptq", "model": "bundled:digits-cnn", "data": {"train": "bundled:digits"}}


@pytest.fixture
def service_env():
    return {"QFORGE_WEBHOOK_SECRET": "s3cr3t-never-shown"}


def deliveries() -> list[WebhookDelivery]:
    with session_scope() as session:
        return list(session.scalars(select(WebhookDelivery)))


@pytest.mark.parametrize("body", [JOB, CLASSIC], ids=["recipe job", "classic job"])
def test_a_callback_is_stored_with_a_pending_webhook_and_shown(submit, client, body):
    url = "http://127.0.0.1:9/hooks/qforge?tenant=a&x=1"
    response = submit({**body, "callback_url": url})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["callback_url"] == url
    webhook = job["webhook"]
    assert webhook["state"] == "pending" and webhook["attempts"] == 0 and webhook["delivered_at"] is None
    [row] = deliveries()
    assert (row.id, row.job_id, row.body) == (webhook["event_id"], job["id"], None)
    assert "callback_url" not in job["request"]  # the request as quantcore runs it
    again = client.get(f"/v1/jobs/{job['id']}").json()
    assert again["callback_url"] == url and again["webhook"]["event_id"] == row.id
    listed = client.get("/v1/jobs").json()["items"][0]
    assert listed["webhook"]["event_id"] == row.id
    for text in (response.text, client.get(f"/v1/jobs/{job['id']}").text, client.get("/v1/jobs").text):
        assert "s3cr3t" not in text


def test_without_a_callback_there_is_no_webhook(submit):
    job = submit().json()
    assert job["callback_url"] is None and job["webhook"] is None
    assert deliveries() == []


def test_a_worker_accepts_the_stored_request(submit, client):
    """The stored request must still validate as quantcore's (which forbids unknown keys)."""
    from quantcore.classic_job import JOB_SPEC

    job = submit({**JOB, "callback_url": "http://127.0.0.1:9/h"}).json()
    JOB_SPEC.validate_python(job["request"])


BAD = {
    "ftp scheme": ("ftp://example.com/hook", "http:// or https://"),
    "no scheme": ("example.com/hook", "http:// or https://"),
    "file": ("file:///etc/passwd", "http:// or https://"),
    "no host": ("http:///hook", "names no host"),
    "credentials": ("https://user:pw@example.com/hook", "credentials"),
    "bad port": ("https://example.com:99999/hook", "invalid port"),
    "space": ("https://example.com/a hook", "ASCII without spaces"),
    "non-ascii": ("https://exämple.com/hook", "ASCII without spaces"),
    "too long": ("https://example.com/" + "a" * 2048, "at most 2048 characters"),
    "not a string": (42, "string"),
}


@pytest.mark.parametrize("url, mention", BAD.values(), ids=BAD.keys())
def test_a_bad_callback_url_is_a_problem_naming_the_field(submit, job_count, url, mention):
    response = submit({**JOB, "callback_url": url})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == PROBLEM + "validation-error"
    assert "callback_url" in problem["detail"] and mention in problem["detail"], problem["detail"]
    assert [e["loc"][-1] for e in problem["errors"]] == ["callback_url"]
    assert job_count() == 0 and deliveries() == []


@pytest.mark.parametrize(
    "url, mention",
    [
        ("http://10.1.2.3/hook", "10.1.2.3"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),  # cloud metadata
        ("http://[::ffff:192.168.0.1]/hook", "192.168.0.1"),
        ("http://[fd00::1]:8080/hook", "fd00::1"),
        ("http://0.0.0.0/hook", "0.0.0.0"),
    ],
)
def test_private_addresses_are_refused(submit, job_count, url, mention):
    response = submit({**JOB, "callback_url": url})
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"] == PROBLEM + "callback-url-not-allowed"
    assert problem["errors"][0]["loc"] == ["body", "callback_url"]
    assert mention in problem["detail"] and "QFORGE_WEBHOOK_ALLOWED_NETWORKS" in problem["detail"]
    assert job_count() == 0


def test_loopback_is_allowed_in_the_embedded_default_only(submit, settings, monkeypatch):
    from app.core.config import get_settings

    assert settings.database_url.startswith("sqlite") and settings.webhook_loopback_allowed
    assert submit({**JOB, "callback_url": "http://localhost:9/hook"}).status_code == 202
    monkeypatch.setenv("QFORGE_WEBHOOK_ALLOW_LOOPBACK", "false")
    get_settings.cache_clear()
    refused = submit({**JOB, "callback_url": "http://localhost:9/hook"})
    assert refused.status_code == 422 and "127.0.0.1" in refused.json()["detail"]


def test_a_listed_private_network_is_allowed(submit, monkeypatch):
    from app.core.config import get_settings

    monkeypatch.setenv("QFORGE_WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/8, fd00::/8")
    get_settings.cache_clear()
    assert submit({**JOB, "callback_url": "http://10.1.2.3/hook"}).status_code == 202
    assert submit({**JOB, "callback_url": "http://[fd00::1]/hook"}).status_code == 202
    assert submit({**JOB, "callback_url": "http://192.168.0.1/hook"}).status_code == 422


@pytest.mark.parametrize("host", ["no-such-host.invalid", "a" * 64 + ".example.com"])
def test_a_host_that_does_not_resolve_is_refused(submit, host):
    response = submit({**JOB, "callback_url": f"https://{host}/hook"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["type"] == "callback_url_unresolved"


def test_an_idempotency_key_reused_with_another_callback_is_refused(submit, job_count):
    first = submit({**JOB, "callback_url": "http://127.0.0.1:9/a"}, headers={"Idempotency-Key": "k"})
    replay = submit({**JOB, "callback_url": "http://127.0.0.1:9/a"}, headers={"Idempotency-Key": "k"})
    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
    other = submit({**JOB, "callback_url": "http://127.0.0.1:9/b"}, headers={"Idempotency-Key": "k"})
    assert other.status_code == 422 and other.json()["type"] == PROBLEM + "idempotency-key-reused"
    dropped = submit(JOB, headers={"Idempotency-Key": "k"})
    assert dropped.status_code == 422
    assert job_count() == 1 and len(deliveries()) == 1
