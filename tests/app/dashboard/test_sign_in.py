"""Signing in to the dashboard with an API key: the key checked as the API checks it, kept
in an HttpOnly SameSite=Strict cookie, pages of the key's tenant only, forms refused from
other sites, and no redirect off the site after signing in."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app import tenants
from app.core.db import session_scope
from app.dashboard.auth import API_KEY_COOKIE
from app.models import DEFAULT_TENANT, Job, JobStatus, Scope


@pytest.fixture
def browser(settings):
    """A client with no key: a browser that has not signed in (it keeps cookies it is given)."""
    from app.main import app

    with TestClient(app, base_url="http://testserver") as test_client:
        yield test_client


def new_key(scope: Scope = Scope.SUBMIT, tenant: str = DEFAULT_TENANT) -> tuple[str, str]:
    with session_scope() as session:
        made = tenants.create_key(session, tenant, scope, "browser")
        return made.secret, made.row.id


@pytest.mark.parametrize("path", ["/", "/jobs/new", "/jobs/0123/report", "/compare?id=a&id=b"])
def test_pages_send_a_visitor_without_a_key_to_sign_in_and_back(browser, path):
    answer = browser.get(path, follow_redirects=False)
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert location.startswith("/sign-in")
    if path != "/":
        assert "next=" in location
    form = browser.get(location)
    assert form.status_code == 200 and 'name="api_key"' in form.text


def test_signing_in_sets_an_httponly_strict_cookie_and_goes_where_the_visitor_was_going(browser):
    key, _ = new_key()
    answer = browser.post("/sign-in", data={"api_key": key, "next": "/jobs/new"}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/jobs/new"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{API_KEY_COOKIE}=")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "samesite", "path"} <= attributes and "samesite=strict" in cookie.lower()
    assert "secure" not in attributes  # plain http here; a browser would drop a Secure cookie
    page = browser.get("/jobs/new")
    assert page.status_code == 200 and f"Tenant <strong>{DEFAULT_TENANT}</strong>" in page.text


def test_a_wrong_key_shows_why_and_sets_no_cookie(browser):
    new_key()
    answer = browser.post("/sign-in", data={"api_key": "qf_guess-" + "0" * 40}, follow_redirects=False)
    assert answer.status_code == 401 and "not valid" in answer.text and 'role="alert"' in answer.text
    assert "set-cookie" not in answer.headers
    assert browser.get("/", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "jobs"])
def test_signing_in_never_redirects_off_the_site(browser, target):
    key, _ = new_key()
    answer = browser.post("/sign-in", data={"api_key": key, "next": target}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/"


def test_a_form_sent_from_another_site_is_refused(browser, job_count):
    key, _ = new_key()
    browser.post("/sign-in", data={"api_key": key})
    form = {"kind": "recipe", "model": "bundled:smollm2-135m", "recipe": "name: x\nstages: []"}
    refused = browser.post("/jobs/new", data=form, headers={"Origin": "https://evil.example"}, follow_redirects=False)
    assert refused.status_code == 403 and job_count() == 0
    from_referer = browser.post("/jobs/new", data=form, headers={"Referer": "https://evil.example/page"})
    assert from_referer.status_code == 403 and job_count() == 0
    signed_in_elsewhere = browser.post("/sign-in", data={"api_key": key}, headers={"Origin": "https://evil.example"})
    assert signed_in_elsewhere.status_code == 403


def test_a_read_only_key_sees_jobs_but_cannot_submit_or_cancel(browser, submit):
    job_id = submit().json()["id"]
    key, _ = new_key(Scope.READ)
    browser.post("/sign-in", data={"api_key": key})
    assert browser.get(f"/jobs/{job_id}").status_code == 200
    new = browser.get("/jobs/new")
    assert new.status_code == 403 and "submit" in new.text
    cancel = browser.post(f"/jobs/{job_id}/cancel", follow_redirects=False)
    assert cancel.status_code == 403
    with session_scope() as session:
        assert session.get(Job, job_id).status == JobStatus.QUEUED  # nothing was cancelled


def test_revoking_the_key_signs_its_sessions_out(browser):
    key, key_id = new_key()
    browser.post("/sign-in", data={"api_key": key})
    assert browser.get("/", follow_redirects=False).status_code == 200
    with session_scope() as session:
        tenants.revoke_key(session, key_id)
    assert browser.get("/", follow_redirects=False).status_code == 303


def test_signing_out_forgets_the_key(browser):
    key, _ = new_key()
    browser.post("/sign-in", data={"api_key": key})
    out = browser.post("/sign-out", follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/sign-in"
    assert f'{API_KEY_COOKIE}=""' in out.headers["set-cookie"] or "Max-Age=0" in out.headers["set-cookie"]
    assert browser.get("/", follow_redirects=False).status_code == 303
