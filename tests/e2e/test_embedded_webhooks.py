"""Webhooks end to end: `qforge serve` (embedded default) POSTs each finished job's event to
a receiver on 127.0.0.1 that refuses the first delivery with a 500 and accepts the second."""

import hashlib
import hmac
import json
import time

import httpx
import pytest

from qforge.webhooks import verify_webhook

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SECRET = "e2e-webhook-secret"
BACKOFF_S = 1.0
# the quickest real job: 8-bit RTN, no evaluation
SHORT_JOB = {"model": "bundled:smollm2-135m", "recipe": "w8a16-rtn", "evaluation": {"enabled": False}}


@pytest.fixture(scope="module")
def client(start_service):
    return start_service({
        "QFORGE_WEBHOOK_SECRET": SECRET,
        "QFORGE_WEBHOOK_BACKOFF_S": str(BACKOFF_S),
        "QFORGE_WEBHOOK_POLL_INTERVAL_S": "0.5",
        "QFORGE_WEBHOOK_TIMEOUT_S": "5",
    })


def accepted(receiver, event_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = [r for r in receiver.received(event_id) if r["status"] == 200]
        if done:
            return done[0]
        time.sleep(0.2)
    pytest.fail(f"event {event_id}: not accepted within {timeout_s} s; received {receiver.received(event_id)}")


def check_deliveries(receiver, event_id: str) -> dict:
    """Refused once, accepted once, the same signed event both times; returns the event."""
    requests = receiver.received(event_id)
    assert [r["status"] for r in requests] == [500, 200]
    assert requests[0]["body"] == requests[1]["body"]
    assert [r["headers"]["x-qforge-delivery-attempt"] for r in requests] == ["1", "2"]
    assert requests[1]["at"] - requests[0]["at"] >= 0.8 * BACKOFF_S  # the backoff was waited
    for request in requests:
        header = request["headers"]["x-qforge-signature"]
        fields = dict(item.split("=", 1) for item in header.split(","))
        reference = hmac.new(SECRET.encode(), f"{fields['t']}.".encode() + request["body"], hashlib.sha256).hexdigest()
        assert fields["v1"] == reference
        assert abs(int(fields["t"]) - request["at"]) < 5  # signed when sent
        assert verify_webhook(SECRET, request["body"], header, now=request["at"])["id"] == event_id
        assert request["headers"]["user-agent"].startswith("qforge-webhooks/")
    return json.loads(requests[1]["body"])


def test_finished_jobs_post_signed_events_and_a_500_is_retried(client, webhook_receiver, wait_for):
    receiver = webhook_receiver([500, 200])
    body = {**SHORT_JOB, "callback_url": receiver.url}
    submitted = client.post("/v1/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["callback_url"] == receiver.url and job["webhook"]["state"] == "pending"
    # a second job waits behind the first (one job at a time): cancelled while queued, by the API
    behind = client.post("/v1/jobs", json=body).json()
    cancel = client.post(f"/v1/jobs/{behind['id']}/cancel")
    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled"

    accepted(receiver, behind["webhook"]["event_id"])
    cancelled_event = check_deliveries(receiver, behind["webhook"]["event_id"])
    # sent while the first job still ran: events never wait behind quantization jobs
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] in ("queued", "running")
    assert cancelled_event["type"] == "job.cancelled" and cancelled_event["job"]["status"] == "cancelled"
    assert cancelled_event["job"]["id"] == behind["id"] and cancelled_event["job"]["error"] is None

    finished = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"})
    assert finished["status"] == "succeeded", finished["error"]
    event_id = finished["webhook"]["event_id"]
    accepted(receiver, event_id)
    event = check_deliveries(receiver, event_id)
    assert event["id"] == event_id and event["type"] == "job.succeeded"
    assert event["job"]["id"] == job["id"] and event["job"]["status"] == "succeeded" and event["job"]["error"] is None
    assert event["job"]["finished_at"].replace("Z", "+00:00") == finished["finished_at"].replace("Z", "+00:00")
    assert event["artifacts"][0]["sha256"] == finished["artifact"]["sha256"]
    # the links lead back to this service (for a holder of the tenant's key: the event names no secret)
    report = httpx.get(event["links"]["report"], timeout=30, headers=client.headers)
    assert report.status_code == 200 and report.json() == client.get(f"/v1/jobs/{job['id']}/report").json()
    assert httpx.get(event["links"]["report"], timeout=30).status_code == 401
    head = httpx.get(event["links"]["artifact"], headers={**client.headers, "Range": "bytes=0-0"}, timeout=30)
    assert head.status_code == 206 and head.headers["x-checksum-sha256"] == finished["artifact"]["sha256"]

    for job_id in (job["id"], behind["id"]):  # the retry is recorded with the job
        webhook = client.get(f"/v1/jobs/{job_id}").json()["webhook"]
        assert webhook["state"] == "delivered" and webhook["attempts"] == 2
        assert webhook["last_status"] == 200 and webhook["delivered_at"] is not None
    time.sleep(3 * BACKOFF_S)
    assert len(receiver.received()) == 4  # exactly one accepted delivery per event, nothing after
