"""Every rejected submission is a 4xx problem document that names what was wrong, and
leaves no job row behind."""

import pytest

PROBLEM = "https://qforge.dev/problems/"


def _weights(**overrides) -> dict:
    scheme = {"type": "int", "bits": 4, "symmetric": True, "granularity": "group", "group_size": 64}
    stage = {"algorithm": "rtn", "weights": {**scheme, **overrides}}
    return {"model": "bundled:smollm2-135m", "recipe": {"stages": [stage]}}


CASES = {
    "unknown model": ({"model": "bundled:nope", "recipe": "w4a16-rtn-g64"}, 422, "unknown-model", ["model", "nope"]),
    "unknown algorithm": (
        {"model": "bundled:smollm2-135m", "recipe": {"stages": [{"algorithm": "magic", "weights": {"bits": 4}}]}},
        422, "validation-error", ["recipe.stages.0", "unknown algorithm 'magic'"],
    ),
    "planned algorithm": (
        {"model": "bundled:smollm2-135m", "recipe": {"stages": [{"algorithm": "dfq", "weights": {"bits": 4}}]}},
        422, "validation-error", ["dfq", "not implemented"],
    ),
    "unknown preset": (
        {"model": "bundled:smollm2-135m", "recipe": "w5a5-nope"},
        422, "validation-error", ["recipe", "unknown preset 'w5a5-nope'"],
    ),
    "group_size 0": (_weights(group_size=0), 422, "validation-error", ["recipe.stages.0.weights", "group_size"]),
    "bits 9": (_weights(bits=9), 422, "validation-error", ["recipe.stages.0.weights", "bits", "got 9"]),
    "bits 1": (_weights(bits=1), 422, "validation-error", ["recipe.stages.0.weights", "bits", "got 1"]),
    "unknown key": (
        {"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64", "colour": "red"},
        422, "validation-error", ["colour", "Extra inputs"],
    ),
    "missing model": ({"recipe": "w4a16-rtn-g64"}, 422, "validation-error", ["model", "Field required"]),
    "perplexity_tokens too small": (
        {"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64", "evaluation": {"perplexity_tokens": 8}},
        422, "validation-error", ["evaluation.perplexity_tokens"],
    ),
}


@pytest.mark.parametrize("body, status, slug, mentions", CASES.values(), ids=CASES.keys())
def test_bad_submission_is_a_problem_naming_the_field(submit, job_count, body, status, slug, mentions):
    response = submit(body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == PROBLEM + slug
    assert problem["status"] == status and problem["title"]
    for text in mentions:
        assert text in problem["detail"], problem["detail"]
    assert problem["errors"] and all({"loc", "msg"} <= set(e) for e in problem["errors"])
    assert job_count() == 0


def test_local_paths_are_refused_unless_allowed(submit, job_count, tmp_path):
    response = submit({"model": str(tmp_path), "recipe": "w4a16-rtn-g64"})
    assert response.status_code == 422
    assert "model" in response.json()["detail"]
    assert job_count() == 0


@pytest.mark.parametrize("payload", [b'{"model": "bundled:smollm2-135m", "recipe": ', b"not json", b'{"model": }'])
def test_malformed_json_is_a_400_problem(client, job_count, payload):
    response = client.post("/v1/jobs", content=payload, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == PROBLEM + "malformed-json"
    assert "not valid JSON" in problem["detail"]
    assert job_count() == 0


def test_a_body_that_is_not_an_object_is_rejected(client, job_count):
    response = client.post("/v1/jobs", json=["bundled:smollm2-135m"])
    assert response.status_code == 422
    assert response.json()["type"] == PROBLEM + "validation-error"
    assert job_count() == 0
