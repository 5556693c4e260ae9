"""Fuzzing the REST API from its own OpenAPI schema (schemathesis): every operation gets
cases that fit the schema and cases that break it; none may answer 5xx, and every error
must be an RFC 9457 problem document (`application/problem+json` with type, title, status).

Runs in-process against the ASGI app on whatever database the settings name (the embedded
SQLite in the tests), with a tenant key whose rate limit is off, so that every case reaches
the route. Jobs it submits stay queued: no worker runs. Used by tests/app/test_fuzz.py and
bench/reliability.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROBLEM = "application/problem+json"
# Successful answers that are not JSON documents: a stream of events, an artifact.
NON_JSON_OK = ("text/event-stream", "application/x-tar", "application/octet-stream")


@dataclass
class FuzzResult:
    cases: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)  # 5xx: method, path, status, the answer, the request as curl
    not_problems: list[str] = field(default_factory=list)  # 4xx without a problem document

    def record(self, case, response) -> None:
        self.cases += 1
        status = response.status_code
        self.by_status[status] = self.by_status.get(status, 0) + 1
        where = f"{case.method} {case.formatted_path} -> {status}"
        if status >= 500:
            self.server_errors.append(f"{where}: {response.text[:300]!r}; {case.as_curl_command()}")
        elif status >= 400:
            media = response.headers.get("content-type") or ""
            media = media[0] if isinstance(media, list) else media  # schemathesis keeps every value of a header
            body = _json(response)
            if not media.startswith(PROBLEM) or not {"type", "title", "status"} <= set(body or {}):
                self.not_problems.append(f"{where} ({media}): {response.text[:200]}")


def _json(response):
    try:
        return response.json()
    except ValueError:
        return None


def fuzz_app(app, api_key: str, cases_per_operation: int, seed: int = 0, skip: tuple[str, ...] = ()) -> FuzzResult:
    """`cases_per_operation` positive and as many negative cases for each operation."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    result = FuzzResult()
    headers = {"Authorization": f"Bearer {api_key}"}
    for outcome in schema.get_all_operations():
        operation = outcome.ok()
        if any(operation.path.startswith(prefix) for prefix in skip):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis_seed(seed)
            @settings(max_examples=cases_per_operation, database=None, deadline=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                # our key on every case: a case without one would only ever meet the 401 at the door
                case.headers = {**(case.headers or {}), **headers}
                try:
                    response = case.call()
                except Exception as exc:  # the in-process client re-raises what the app did not handle: a 500
                    result.cases += 1
                    result.server_errors.append(f"{case.method} {case.formatted_path} raised {exc!r}")
                    return
                result.record(case, response)

            try:
                run()
            except Unsatisfiable:  # nothing to break: an operation without parameters or body has no negative case
                pass
    return result
