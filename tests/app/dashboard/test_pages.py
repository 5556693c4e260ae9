"""The dashboard's pages through a TestClient: the job list (filters, pages), a job's
progress, cancelling, the report, downloads and the comparison, checked against the jobs'
rows and reports; and the API beside them, unchanged."""

import hashlib

import pytest

from app.models import JobStatus


def test_the_api_and_probes_still_answer_json_beside_the_dashboard(client, submit):
    job_id = submit().json()["id"]
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    assert client.get("/v1/jobs").json()["items"][0]["id"] == job_id
    missing = client.get("/v1/jobs/nope")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    home = client.get("/")
    assert home.status_code == 200 and home.headers["content-type"].startswith("text/html")
    assert "/jobs/new" not in client.get("/openapi.json").json()["paths"]  # pages stay out of the API schema


def test_the_list_shows_jobs_newest_first_and_filters_by_status_and_model(client, submit, set_job, html):
    first = submit().json()["id"]
    second = submit({"model": "bundled:minilm-l6", "recipe": "w8a16-rtn"}).json()["id"]
    set_job(first, status=JobStatus.RUNNING, progress_percent=42.0, progress_stage="quantize")
    page = html(client.get("/").text)
    ids = [r.attrs["id"].removeprefix("job-") for r in page.find_all("tr") if "id" in r.attrs]
    assert ids == [second, first]
    assert page.by_id(f"job-{first}").attrs["data-status"] == "running"
    assert page.by_id(f"job-{first}").find_all("progress")[0].attrs["value"] == "42.0"
    assert page.by_id("job-count").text.startswith("2 jobs")

    running = html(client.get("/?status=running").text)
    assert [r.attrs["id"] for r in running.find_all("tr") if "id" in r.attrs] == [f"job-{first}"]
    minilm = html(client.get("/?model=MINILM").text)
    assert [r.attrs["id"] for r in minilm.find_all("tr") if "id" in r.attrs] == [f"job-{second}"]


def test_the_list_is_paginated_with_links_that_keep_the_filters(client, submit, html):
    ids = [submit().json()["id"] for _ in range(3)][::-1]  # newest first
    first = html(client.get("/?limit=2&model=smollm").text)
    assert [r.attrs["id"].removeprefix("job-") for r in first.find_all("tr") if "id" in r.attrs] == ids[:2]
    next_link = first.find_all("a", rel="next")[0].attrs["href"]
    assert not first.find_all("a", rel="prev")
    second = html(client.get(next_link).text)
    assert [r.attrs["id"].removeprefix("job-") for r in second.find_all("tr") if "id" in r.attrs] == ids[2:]
    assert "model=smollm" in next_link and "limit=2" in next_link
    assert second.by_id("job-count").text.startswith("3 jobs, showing 3–3")
    assert second.find_all("a", rel="prev") and not second.find_all("a", rel="next")


def test_a_running_job_shows_each_stage_and_the_layer_it_is_at(client, submit, set_job, html):
    job_id = submit().json()["id"]
    set_job(job_id, status=JobStatus.RUNNING, attempts=1, progress_stage="quantize", progress_current=21,
            progress_total=210, progress_percent=42.0, progress_message="stage 1/1 rtn: model.layers.3.mlp.up_proj")
    page = html(client.get(f"/jobs/{job_id}").text)
    values = {s: float(page.by_id(f"progress-{s}").attrs["value"]) for s in ("load", "baseline", "quantize", "evaluate", "export")}
    assert values == {"load": 1.0, "baseline": 1.0, "quantize": 0.1, "evaluate": 0.0, "export": 0.0}
    assert "21 of 210" in page.by_id("state").text and "model.layers.3.mlp.up_proj" in page.by_id("state").text
    assert page.find_all("label", for_="progress-quantize")  # every bar is labelled
    assert page.by_id("live").attrs["sse-connect"] == f"/jobs/{job_id}/live?after=0"  # no stored line yet
    assert page.find_all("form", action=f"/jobs/{job_id}/cancel")


def test_a_job_page_opened_later_shows_the_stored_log_and_streams_after_it(client, submit, set_job, html):
    from app import joblog
    from app.core.db import session_scope
    from app.models import LogLevel

    job_id = submit().json()["id"]
    set_job(job_id, status=JobStatus.RUNNING, attempts=2, progress_stage="quantize")
    written = [("started", LogLevel.INFO, None, 1), ("load started", LogLevel.INFO, "load", 1),
               ("the worker running attempt 1 stopped responding", LogLevel.WARNING, "load", 1),
               ("restarted: attempt 2 of 2", LogLevel.INFO, None, 2)]
    with session_scope() as session:
        for message, level, stage, attempt in written:
            joblog.append(session, job_id, message, level, stage=stage, attempt=attempt)
    with session_scope() as session:
        last = joblog.read(session, job_id, limit=None)[-1].id
    page = html(client.get(f"/jobs/{job_id}").text)
    lines = page.by_id("log").find_all("li")
    assert [line.attrs["data-seq"] for line in lines][-1] == str(last) and len(lines) == 4
    assert "[load] load started" in lines[1].text
    assert lines[2].attrs["class"] == "log-warning" and "warning" in lines[2].text
    assert "restarted: attempt 2 of 2" in lines[3].text and "(attempt 2)" in lines[3].text
    assert page.by_id("live").attrs["sse-connect"] == f"/jobs/{job_id}/live?after={last}"


def test_a_cancel_from_the_page_is_in_the_jobs_log(client, submit, html):
    job_id = submit().json()["id"]
    client.post(f"/jobs/{job_id}/cancel", follow_redirects=False)
    page = html(client.get(f"/jobs/{job_id}").text)
    assert [line.text.split(" ", 1)[1] for line in page.by_id("log").find_all("li")] == [
        "warning cancelled before it started"
    ]
    assert "sse-connect" not in page.by_id("live").attrs  # finished: nothing more to follow


def test_cancelling_from_the_page_cancels_a_queued_job(client, submit, html):
    job_id = submit().json()["id"]
    response = client.post(f"/jobs/{job_id}/cancel", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].endswith(f"/jobs/{job_id}")
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    page = html(client.get(f"/jobs/{job_id}").text)
    assert "sse-connect" not in page.by_id("live").attrs  # a finished job has no stream to follow
    assert not page.find_all("form", action=f"/jobs/{job_id}/cancel")
    assert client.post(f"/jobs/{job_id}/cancel", follow_redirects=False).status_code == 303  # again: harmless


def test_unknown_jobs_get_an_html_404(client):
    for path in ("/jobs/0123", "/jobs/0123/report", "/compare?id=0123"):
        response = client.get(path)
        assert response.status_code == 404 and response.headers["content-type"].startswith("text/html"), path
        assert "No job with id 0123" in response.text


def test_the_report_shows_metrics_sizes_the_layer_chart_and_timings(client, succeeded_job, html, known_report):
    job_id, _ = succeeded_job()
    page = html(client.get(f"/jobs/{job_id}/report").text)
    cells = [c.text for c in page.by_id("metrics").find_all("tr")[1].find_all("td")]
    assert cells == ["11.5", "13.8", "+2.3"]
    sizes = {r.find_all("th")[0].text: r.find_all("td")[0].text for r in page.by_id("sizes").find_all("tr")}
    assert sizes["Compression vs float32"] == "3.20×"
    assert sizes["Linear compression vs float16"] == "4.00×"  # 1 / 0.25
    assert sizes["Parameters as stored in the artifact"] == "1.2 KiB (1,250 bytes)"
    bars = page.find_all("rect", class_="bar")
    assert [b.attrs["data-layer"] for b in bars] == [layer["name"] for layer in known_report["layers"]]
    timings = {r.find_all("th")[0].text: r.find_all("td")[0].text for r in page.by_id("timings").find_all("tr")}
    assert timings == {"load": "1.5 s", "quantize": "2.2 s", "total": "10.0 s"}


def test_a_report_of_a_job_that_did_not_succeed_says_so(client, submit, set_job):
    job_id = submit().json()["id"]
    set_job(job_id, status=JobStatus.FAILED, error="group_size 7 does not divide 576")
    response = client.get(f"/jobs/{job_id}/report")
    assert response.status_code == 409 and "group_size 7 does not divide 576" in response.text


def test_the_download_button_serves_the_artifact_with_its_checksum(client, succeeded_job, html):
    job_id, payload = succeeded_job()
    page = html(client.get(f"/jobs/{job_id}/report").text)
    link = page.by_id("downloads").find_all("a")[0]
    assert "download" in link.attrs
    response = client.get(link.attrs["href"])
    assert response.content == payload
    assert response.headers["x-checksum-sha256"] == hashlib.sha256(payload).hexdigest()
    api = client.get(f"/v1/jobs/{job_id}").json()["artifact"]
    assert api["sha256"] == hashlib.sha256(payload).hexdigest()
    assert client.get(link.attrs["href"], headers={"Range": "bytes=10-19"}).content == payload[10:20]


def test_compare_puts_jobs_side_by_side_on_one_error_scale(client, succeeded_job, submit, html, known_report):
    worse = [{**layer, "sqnr_db": layer["sqnr_db"] - 6.0206} for layer in known_report["layers"]]  # errors x2
    a, _ = succeeded_job()
    b, _ = succeeded_job(layers=worse, metrics={"baseline": {"perplexity": 11.5}, "quantized": {"perplexity": 19.25}})
    queued = submit().json()["id"]
    page = html(client.get(f"/compare?id={b}&id={a}&id={queued}&id={a}").text)
    table = page.by_id("compare")
    assert [th.text for th in table.find_all("thead")[0].find_all("th")][1:] == [b[:8], a[:8], queued[:8]]
    assert [td.text for td in table.find_all("tr", data_metric="perplexity")[0].find_all("td")] == ["19.25", "13.8", "–"]
    charts = page.find_all("svg")
    assert len(charts) == 2  # the queued job has no report yet
    tallest = [max(float(r.attrs["height"]) for r in svg.find_all("rect", class_="bar")) for svg in charts]
    assert tallest[1] / tallest[0] == pytest.approx(0.5, rel=1e-3)  # same scale: b's errors are twice a's
