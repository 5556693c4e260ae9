"""The production shape end to end: the same `qforge serve`, configured only by QFORGE_*
variables, against a real PostgreSQL and Redis that the fixtures start and stop, with the
artifacts in an S3 bucket (a local S3 server)."""

import httpx
import pytest

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_job_runs_against_postgres_redis_and_s3(start_service, postgres_url, redis_url, s3_env, main_job):
    client = start_service({"QFORGE_DATABASE_URL": postgres_url, "QFORGE_BROKER_URL": redis_url, **s3_env})
    ready = client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok", "artifact_store": "ok"}
    job = main_job(client)  # downloads the artifact through the API, whole and by ranges
    assert job["attempts"] == 1
    bucket = s3_env["QFORGE_ARTIFACT_URL"].removeprefix("s3://").split("/")[0]
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env["QFORGE_S3_ENDPOINT_URL"], region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == [f"artifacts/{job['id']}.tar"]
    link = client.post(f"/v1/jobs/{job['id']}/artifact/link", json={"expires_in": 300}).json()
    with httpx.stream("GET", link["url"]) as fetched:  # straight from the bucket, no credentials
        assert fetched.status_code == 200 and int(fetched.headers["content-length"]) == job["artifact"]["bytes"]
    listed = client.get("/v1/jobs", params={"status": "succeeded"}).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]]
