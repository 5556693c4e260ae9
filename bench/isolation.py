"""Tenant isolation probes: tenant B asks for every object of tenant A through every route.

Routes are read from the service's own OpenAPI schema, so a route added later is probed
without anyone remembering to list it; the dashboard's pages (outside the schema) are listed
here. A probe passes only with 404: 403 or 409 would tell B that the id exists, and 2xx
would hand it over. Lists pass when none of A's ids appear; a submission naming A's upload
must be refused as unknown; A's Idempotency-Key must not replay A's job to B.

Used by tests/app/test_isolation.py (TestClient) and bench/reliability.py (a live service):
both pass httpx-compatible clients that send each tenant's key.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

# Path parameters that name a tenant's object, and which of A's ids fills each.
OBJECT_PARAMS = {"job_id": "job", "dataset_id": "dataset", "model_id": "model", "key_id": "key"}
# Pages of the dashboard that name a job (method, path); it answers with HTML, 404 too.
DASHBOARD_PAGES = [
    ("GET", "/jobs/{job_id}"),
    ("GET", "/jobs/{job_id}/report"),
    ("GET", "/jobs/{job_id}/download"),
    ("GET", "/jobs/{job_id}/live"),
    ("POST", "/jobs/{job_id}/cancel"),
    ("GET", "/compare?id={job_id}"),
]
LISTS = {"/v1/jobs": "job", "/v1/datasets": "dataset", "/v1/models": "model", "/v1/keys": "key"}


@dataclass
class IsolationResult:
    probes: int = 0
    leaks: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        self.probes += 1
        if not ok:
            self.leaks.append(what)


def object_routes(openapi: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, path) of every API operation whose path names one of a tenant's objects."""
    routes = []
    for path, operations in openapi["paths"].items():
        if any(f"{{{param}}}" in path for param in OBJECT_PARAMS):
            routes += [(method.upper(), path) for method in operations if method in ("get", "post", "put", "patch", "delete")]
    return routes


def _fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids[OBJECT_PARAMS[m.group(1)]], path)


def probe(client_a, client_b, ids: dict[str, str], dashboard_b=None) -> IsolationResult:
    """`ids`: one of A's objects of each kind (job, dataset, model, key). `client_b` sends
    B's key; `dashboard_b`, if given, is a client signed in to the dashboard as B."""
    result = IsolationResult()
    openapi = client_a.get("/openapi.json").json()
    job_before = client_a.get(f"/v1/jobs/{ids['job']}").json()
    for method, path in object_routes(openapi):
        url = _fill(path, ids)
        answer = client_b.request(method, url, **({"json": {}} if method in ("POST", "PUT", "PATCH") else {}))
        result.check(answer.status_code == 404, f"{method} {url} as the other tenant: {answer.status_code}")
    for path, kind in LISTS.items():
        answer = client_b.get(path)
        listed = answer.json() if answer.status_code == 200 else []
        items = listed["items"] if isinstance(listed, dict) else listed
        result.check(all(item.get("id") != ids[kind] for item in items), f"GET {path} lists the other tenant's {kind}")
    for kind, field_name in (("model", "model"), ("dataset", "data.train")):
        # a classic job names uploads by id: the other tenant's must be unknown, not quantized
        body = {"kind": "ptq", "model": "bundled:digits-cnn", "data": {"train": "bundled:digits"}}
        if kind == "model":
            body["model"] = f"upload:{ids['model']}"
        else:
            body["data"] = {"train": f"upload:{ids['dataset']}"}
        answer = client_b.post("/v1/jobs", json=body)
        result.check(answer.status_code == 422, f"a job of the other tenant on its {kind} ({field_name}): {answer.status_code}")
    # a recipe (LLM) job names an uploaded folder or GGUF the same way
    answer = client_b.post("/v1/jobs", json={"model": f"upload:{ids['model']}", "recipe": "w4a16-rtn-g64"})
    result.check(answer.status_code == 422, f"a recipe job of the other tenant on its model: {answer.status_code}")
    replay_key = ids.get("idempotency_key")
    if replay_key:
        answer = client_b.post(
            "/v1/jobs", json={"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64"},
            headers={"Idempotency-Key": replay_key},
        )
        replayed = answer.status_code < 300 and answer.json().get("id") == ids["job"]
        result.check(not replayed, "the other tenant's Idempotency-Key replayed its job")
        if answer.status_code < 300:
            client_b.post(f"/v1/jobs/{answer.json()['id']}/cancel")  # leave nothing queued behind
    if dashboard_b is not None:
        for method, path in DASHBOARD_PAGES:
            url = _fill(path, ids)
            answer = dashboard_b.request(method, url, follow_redirects=False)
            result.check(answer.status_code == 404, f"dashboard {method} {url} as the other tenant: {answer.status_code}")
    # A's objects must all still be there for A: B's probes changed nothing
    for kind, path in (("job", "/v1/jobs/{}"), ("dataset", "/v1/datasets/{}"), ("model", "/v1/models/{}")):
        answer = client_a.get(path.format(ids[kind]))
        result.check(answer.status_code == 200, f"the owner lost its {kind} after the probes: {answer.status_code}")
    job_after = client_a.get(f"/v1/jobs/{ids['job']}").json()
    result.check(job_after.get("status") == job_before["status"], f"the owner's job went {job_before['status']} -> "
                 f"{job_after.get('status')} during the other tenant's probes")
    if job_before["status"] == "succeeded":
        answer = client_a.get(f"/v1/jobs/{ids['job']}/artifact")
        result.check(answer.status_code == 200, f"the owner's artifact is gone after the probes: {answer.status_code}")
    key_ids = [k["id"] for k in client_a.get("/v1/keys").json()]
    result.check(ids["key"] in key_ids, "the owner's key was revoked by the other tenant")
    return result


def new_idempotency_key() -> str:
    return f"isolation-{uuid.uuid4().hex}"
