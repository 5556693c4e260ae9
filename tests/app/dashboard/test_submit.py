"""Submitting from the dashboard: the form makes the same job POST /v1/jobs makes, and each
validation error (quantcore's own message) comes back beside the field it names."""

import io
import json

import numpy as np
import pytest
import yaml
from pydantic import ValidationError
from safetensors.torch import save_file

from quantcore.classic_job import ClassicJobRequest
from quantcore.models import ModelNotFoundError, resolve_model_ref
from quantcore.models.digits_cnn import DigitsCNN
from quantcore.recipe import Recipe, preset

SMOLLM = "bundled:smollm2-135m"


def form(**changes) -> dict:
    """The recipe form as a browser sends it with the defaults (checkboxes ticked: present)."""
    fields = {
        "kind": "recipe", "idempotency_key": "", "model_source": "bundled", "bundled_model": SMOLLM, "hub_id": "",
        "preset": "w4a16-rtn-g64", "recipe": preset("w4a16-rtn-g64").to_yaml(), "calibration.dataset": "pydoc-topics",
        "calibration.num_samples": "128", "calibration.seq_len": "512", "evaluation.enabled": "on",
        "evaluation.baseline": "on", "evaluation.perplexity_tokens": "2048", "evaluation.embedding_paragraphs": "512",
        "export": ["qforge"], "seed": "0", "action": "submit",
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def quantcore_message(text: str) -> str:
    with pytest.raises(ValidationError) as raised:
        Recipe.parse(text)
    return raised.value.errors()[0]["msg"].removeprefix("Value error, ")


def test_the_form_makes_the_job_the_api_makes_for_the_same_request(client, submit):
    response = client.post("/jobs/new", data=form(**{"export": ["compressed-tensors", "qforge"], "seed": "7"}),
                           follow_redirects=False)
    assert response.status_code == 303, response.text
    job_id = response.headers["location"].rsplit("/", 1)[-1]
    from_page = client.get(f"/v1/jobs/{job_id}").json()
    body = {"model": SMOLLM, "recipe": "w4a16-rtn-g64", "evaluation": {"perplexity_tokens": 2048}, "seed": 7,
            "export": ["compressed-tensors", "qforge"]}
    from_api = submit(body).json()
    assert from_page["request"] == from_api["request"]
    assert from_page["status"] == "queued"


def test_unticked_evaluation_boxes_turn_evaluation_off(client):
    data = form(**{"evaluation.enabled": None, "evaluation.baseline": None})
    job_id = client.post("/jobs/new", data=data, follow_redirects=False).headers["location"].rsplit("/", 1)[-1]
    evaluation = client.get(f"/v1/jobs/{job_id}").json()["request"]["evaluation"]
    assert evaluation["enabled"] is False and evaluation["baseline"] is False


@pytest.mark.parametrize("recipe, where", [
    ("name: x\nstages:\n  - algorithm: rtn\n    weights: {type: int, bits: 12}\n", "stages[0].weights (line 4): "),
    ("name: x\nstages:\n  - algorithm: rtn\n    weightz: {bits: 4}\n", "stages[0].weightz (line 4): "),
    ("name: x\nstages:\n  - algorithm: rtn\n    weights: {bits: 4}\n  - algorithm: nope\n", "stages[1] (line 5): "),
])
def test_a_recipe_error_names_the_field_and_line_beside_the_editor(client, job_count, html, recipe, where):
    response = client.post("/jobs/new", data=form(recipe=recipe))
    assert response.status_code == 422
    page = html(response.text)
    editor = page.by_id("f-recipe")
    assert editor.attrs["aria-invalid"] == "true" and editor.attrs["aria-describedby"] == "recipe-error"
    assert page.by_id("recipe-error").text == where + quantcore_message(recipe)
    assert editor.raw == recipe  # kept, to fix
    assert job_count() == 0


def test_yaml_that_does_not_parse_says_so(client, html):
    page = html(client.post("/jobs/new", data=form(recipe="stages: [unclosed")).text)
    assert "neither a preset name nor valid YAML" in page.by_id("recipe-error").text


def test_other_fields_get_their_own_messages(client, html):
    hub_id = "nobody-here/no-such-model"
    with pytest.raises(ModelNotFoundError) as missing:
        resolve_model_ref(hub_id, allow_local_paths=False)
    page = html(client.post("/jobs/new", data=form(model_source="hub", hub_id=hub_id)).text)
    assert page.by_id("model-error").text == str(missing.value)

    page = html(client.post("/jobs/new", data=form(**{"calibration.num_samples": "0", "export": None})).text)
    assert page.by_id("f-calibration.num_samples").attrs["aria-invalid"] == "true"
    assert page.by_id("calibration-num_samples-error").text == "Input should be greater than or equal to 1"
    assert "at least 1 item" in page.by_id("export-error").text
    summary = [li.text for li in page.find_all("div", role="alert")[0].find_all("li")]
    assert len(summary) == 2 and summary[0].startswith("Calibration windows")


def test_a_double_submit_makes_one_job(client, job_count):
    data = form(idempotency_key="9f1c2d")
    first = client.post("/jobs/new", data=data, follow_redirects=False)
    again = client.post("/jobs/new", data=data, follow_redirects=False)
    assert first.headers["location"] == again.headers["location"]
    assert job_count() == 1


def test_each_rendering_carries_a_fresh_idempotency_key(client, html):
    keys = {html(client.get("/jobs/new").text).find_all("input", name="idempotency_key")[0].attrs["value"] for _ in range(2)}
    assert len(keys) == 2


def test_a_preset_fills_the_editor_with_or_without_javascript(client, html):
    editor = html(client.get("/jobs/new/editor?preset=w8a8-smoothquant").text).by_id("f-recipe")
    assert Recipe.parse(editor.raw) == preset("w8a8-smoothquant")
    page = html(client.post("/jobs/new", data=form(action="preset", preset="w4a16-gptq-g64", recipe="")).text)
    assert Recipe.parse(page.by_id("f-recipe").raw) == preset("w4a16-gptq-g64")
    assert page.by_id("f-evaluation.perplexity_tokens").attrs["value"] == "2048"  # the rest of the form kept
    spec = yaml.safe_load(html(client.get("/jobs/new/editor?kind=classic&preset=qat").text).by_id("f-recipe").raw)
    assert ClassicJobRequest.model_validate(spec) == ClassicJobRequest(kind="qat")


def digits_cnn_file(tmp_path) -> bytes:
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in DigitsCNN(width=4).state_dict().items()}, str(path))
    return path.read_bytes()


def test_an_uploaded_checkpoint_and_data_run_as_a_classic_job(client, tmp_path, html):
    config = {"architecture": "digits-cnn", "width": 4}
    response = client.post("/uploads/model", files={"file": ("cnn.safetensors", digits_cnn_file(tmp_path))},
                           data={"config": json.dumps(config), "name": "my cnn"}, follow_redirects=False)
    assert response.status_code == 303, response.text
    model = client.get("/v1/models").json()["items"][0]
    assert model["name"] == "my cnn" and model["config"] == config
    page = html(client.get(response.headers["location"]).text)
    assert "selected" in page.find_all("option", value=f"upload:{model['id']}")[0].attrs
    assert "checked" in page.by_id("source-upload").attrs

    arrays = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(arrays, x=rng.random((40, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 40))
    response = client.post("/uploads/dataset", files={"file": ("train.npz", arrays.getvalue())}, data={"name": "mine"},
                           follow_redirects=False)
    assert response.status_code == 303, response.text
    dataset = client.get("/v1/datasets").json()["items"][0]

    spec = "kind: ptq\nptq: {method: rtn, weight_bits: 4}\n"
    data = {"kind": "classic", "model_source": "upload", "uploaded_model": f"upload:{model['id']}", "recipe": spec,
            "data.train": f"upload:{dataset['id']}", "data.evaluation": "", "data.calibration_samples": "32"}
    response = client.post("/jobs/new", data=data, follow_redirects=False)
    assert response.status_code == 303, response.text
    job = client.get(response.headers["location"].replace("/jobs/", "/v1/jobs/")).json()
    assert job["request"]["model"] == f"upload:{model['id']}" and job["request"]["kind"] == "ptq"
    assert job["request"]["ptq"]["method"] == "rtn" and job["request"]["data"]["train"] == f"upload:{dataset['id']}"
    assert job["request"]["data"]["calibration_samples"] == 32


def test_a_classic_spec_error_points_into_the_spec(client, html):
    data = {"kind": "classic", "model_source": "bundled", "bundled_model": "bundled:digits-cnn",
            "recipe": "kind: ptq\nptq:\n  method: rtn\n  weight_bits: 1\n", "data.train": "bundled:digits"}
    page = html(client.post("/jobs/new", data=data).text)
    assert page.by_id("recipe-error").text == "ptq.weight_bits (line 4): Input should be greater than or equal to 2"


def test_a_pickled_checkpoint_is_refused_at_the_upload_form(client, html):
    response = client.post("/uploads/model", files={"file": ("model.pt", b"\x80\x04junk")},
                           data={"config": '{"architecture": "digits-cnn"}', "name": "x"})
    assert response.status_code == 415
    assert "pickle" in html(response.text).by_id("upload_model-error").text


def test_a_webhook_url_goes_with_the_job_and_a_bad_one_is_named(client, submit, html):
    url = "http://127.0.0.1:9/hooks/qforge"
    response = client.post("/jobs/new", data=form(callback_url=url), follow_redirects=False)
    assert response.status_code == 303, response.text
    job = client.get(response.headers["location"].replace("/jobs/", "/v1/jobs/")).json()
    assert job["callback_url"] == url and job["webhook"]["state"] == "pending"
    assert "Webhook" in html(client.get(response.headers["location"]).text).by_id("state").text

    bad = "ftp://example.com/hook"
    api = submit({"model": SMOLLM, "recipe": "w4a16-rtn-g64", "callback_url": bad}).json()
    [error] = [e for e in api["errors"] if e["loc"][-1] == "callback_url"]
    page = html(client.post("/jobs/new", data=form(callback_url=bad)).text)
    assert page.by_id("callback_url-error").text == error["msg"]
