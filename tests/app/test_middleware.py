"""The request middleware's side of structured logs: one JSON line per request, with the
route template, status, duration and request id, and the ids of the job it is about."""

import logging

from app import jobs, logctx
from app.api import deps
from app.models import DEFAULT_TENANT


def access_lines(json_log) -> list[dict]:
    return [line for line in json_log() if line["logger"] == "qforge.access"]


def test_a_job_request_logs_one_line_with_its_job_id_route_status_and_request_id(client, submit, json_log):
    job_id = submit().json()["id"]
    response = client.get(f"/v1/jobs/{job_id}")
    line = access_lines(json_log)[-1]
    assert line["level"] == "info" and line["message"].startswith(f"GET /v1/jobs/{job_id} 200 ")
    assert (line["method"], line["route"], line["path"], line["status"]) == ("GET", "/v1/jobs/{job_id}", f"/v1/jobs/{job_id}", 200)
    assert line["job_id"] == job_id
    assert line["request_id"] == response.headers["x-request-id"] and len(line["request_id"]) == 32
    assert 0 < line["duration_ms"] < 60_000
    assert line["tenant_id"] == DEFAULT_TENANT  # bound by the key check


def test_a_submission_logs_the_id_of_the_job_it_created(client, submit, json_log):
    job_id = submit().json()["id"]
    line = access_lines(json_log)[-1]
    assert (line["route"], line["status"], line["job_id"]) == ("/v1/jobs", 202, job_id)


def test_a_request_without_a_job_has_no_job_id_and_requests_get_their_own_ids(client, json_log):
    client.get("/v1/jobs")
    client.get("/v1/jobs")
    first, second = access_lines(json_log)[-2:]
    assert "job_id" not in first and "job_id" not in second
    assert first["request_id"] != second["request_id"]


def test_the_clients_request_id_is_kept_and_a_malformed_one_replaced(client, json_log):
    assert client.get("/v1/jobs", headers={"X-Request-ID": "lb-7f3a.12"}).headers["x-request-id"] == "lb-7f3a.12"
    assert access_lines(json_log)[-1]["request_id"] == "lb-7f3a.12"
    replaced = client.get("/v1/jobs", headers={"X-Request-ID": "no spaces\tor tabs"}).headers["x-request-id"]
    assert replaced != "no spaces\tor tabs" and access_lines(json_log)[-1]["request_id"] == replaced


def test_lines_written_while_the_route_runs_carry_the_job_id(client, submit, json_log, monkeypatch):
    job_id = submit().json()["id"]
    require_status = jobs.require_status

    def logging_require_status(job, wanted, what):
        logging.getLogger("app.jobs").info("checking the job's status")
        return require_status(job, wanted, what)

    monkeypatch.setattr(jobs, "require_status", logging_require_status)
    assert client.get(f"/v1/jobs/{job_id}/report").status_code == 409  # still queued
    inner = [line for line in json_log() if line["message"] == "checking the job's status"]
    assert len(inner) == 1 and inner[0]["job_id"] == job_id
    assert inner[0]["request_id"] == access_lines(json_log)[-1]["request_id"]


def test_the_key_s_tenant_bound_by_the_auth_dependency_reaches_the_request_line(client, submit, json_log):
    """The auth dependency binds the key's tenant inside the request's dependencies, which
    FastAPI may run on a copy of the request's context (a sync one in a worker thread): its
    tenant_id must still reach the request's own line."""
    job_id = submit().json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    line = access_lines(json_log)[-1]
    assert (line["tenant_id"], line["job_id"]) == (DEFAULT_TENANT, job_id)
    client.get("/no/such/page")  # no key checked: no tenant
    assert "tenant_id" not in access_lines(json_log)[-1]  # the next request starts clean


def test_probes_and_scrapes_are_logged_at_debug(client, json_log):
    client.get("/healthz")
    client.get("/metrics")
    assert access_lines(json_log) == []  # INFO and above only
    client.get("/no/such/page")
    assert access_lines(json_log)[-1]["route"] == "<unmatched>"
