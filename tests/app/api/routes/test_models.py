"""POST/GET/DELETE /v1/models: safetensors with a config is accepted and summarised; every
pickle (torch.save, zip or legacy, or a raw pickle under any name) is refused with 415."""

import hashlib
import io
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from app.core.config import get_settings

PROBLEM = "https://qforge.dev/problems/"
CONFIG = {"architecture": "digits-cnn", "width": 4}


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))


def safetensors_bytes(state: dict[str, torch.Tensor], tmp_path) -> bytes:
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    return path.read_bytes()


def torch_save_bytes(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def upload(client):
    def post(content: bytes, filename: str = "model.safetensors", config: dict | str | None = CONFIG, **fields):
        if config is not None:
            fields["config"] = config if isinstance(config, str) else json.dumps(config)
        return client.post("/v1/models", files={"file": (filename, content)}, data=fields)

    return post


def leftovers(settings) -> list[str]:
    return sorted(p.name for p in settings.models_dir.glob("*")) if settings.models_dir.exists() else []


def test_safetensors_with_a_config_is_summarised_and_stored(upload, client, settings, tmp_path):
    state = small_cnn().state_dict()
    content = safetensors_bytes(state, tmp_path)
    response = upload(content, name="my cnn")
    assert response.status_code == 201, response.text
    model = response.json()
    assert response.headers["location"] == f"/v1/models/{model['id']}"
    assert model["name"] == "my cnn" and model["format"] == "safetensors"
    assert model["architecture"] == "digits-cnn" and model["config"] == CONFIG
    assert model["tensors"] == len(state)  # BatchNorm's running stats and counter included
    assert model["parameters"] == sum(t.numel() for t in state.values())
    assert model["bytes"] == len(content) and model["sha256"] == hashlib.sha256(content).hexdigest()
    assert (settings.models_dir / model["id"] / "model.safetensors").read_bytes() == content
    assert leftovers(settings) == [model["id"]]
    assert client.get(f"/v1/models/{model['id']}").json() == model


@pytest.mark.parametrize(
    "config, status, slug, words",
    [
        ({"architecture": "resnet50"}, 422, "unknown-architecture", ["unknown architecture 'resnet50'", "digits-cnn"]),
        ({"width": 16}, 422, "validation-error", ["config.architecture", "required"]),
        ("{not json", 422, "validation-error", ["config", "not valid JSON"]),
        ('{"architecture": "digits-cnn", "width": NaN}', 422, "validation-error", ["NaN"]),
        ("[1, 2]", 422, "validation-error", ["JSON object"]),
        (None, 422, "validation-error", ["config", "required"]),
    ],
    ids=["unknown architecture", "no architecture", "bad JSON", "NaN", "not an object", "missing"],
)
def test_bad_config_is_refused(upload, settings, tmp_path, config, status, slug, words):
    response = upload(safetensors_bytes(small_cnn().state_dict(), tmp_path), config=config)
    assert response.status_code == status, response.text
    problem = response.json()
    assert problem["type"] == PROBLEM + slug
    for word in words:
        assert word in problem["detail"]
    assert leftovers(settings) == []


PICKLES = {
    "torch.save zip": lambda: torch_save_bytes(small_cnn().state_dict()),
    "torch.save legacy": lambda: torch_save_bytes(small_cnn().state_dict(), _use_new_zipfile_serialization=False),
    "pickle.dumps": lambda: pickle.dumps({"weight": [1.0, 2.0]}),
    "pickle protocol 2": lambda: pickle.dumps({"weight": [1.0, 2.0]}, protocol=2),
}


@pytest.mark.parametrize("make", list(PICKLES.values()), ids=list(PICKLES))
def test_a_pickle_named_safetensors_is_refused_by_its_content(upload, settings, make):
    response = upload(make(), filename="model.safetensors")
    assert response.status_code == 415, response.text
    problem = response.json()
    assert problem["type"] == PROBLEM + "unsafe-model-format"
    assert "pickle" in problem["detail"] and "save_model(model, " in problem["detail"]
    assert leftovers(settings) == []


@pytest.mark.parametrize("filename", ["model.pt", "weights.PTH", "pytorch_model.bin", "m.pkl", "last.ckpt"])
def test_a_pickle_is_refused_by_its_name_before_it_is_stored(upload, settings, filename):
    response = upload(torch_save_bytes({"w": torch.ones(2)}), filename=filename)
    assert response.status_code == 415
    problem = response.json()
    assert problem["type"] == PROBLEM + "unsafe-model-format" and filename in problem["detail"]
    assert leftovers(settings) == []


def test_a_torch_export_program_is_recognised_and_refused(upload, tmp_path):
    program = torch.export.export(nn.Linear(4, 2), (torch.randn(1, 4),))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    response = upload((tmp_path / "model.pt2").read_bytes(), filename="model.pt2")
    assert response.status_code == 415
    problem = response.json()
    assert problem["type"] == PROBLEM + "unsafe-model-format"
    assert "torch.export program" in problem["detail"] and "unpickles" in problem["detail"]


@pytest.mark.parametrize(
    "content, status, slug, words",
    [
        (b"PK\x05\x06" + bytes(18), 415, "unsupported-model-format", "zip archive"),
        (b"hello, model", 415, "unsupported-model-format", "not a safetensors file"),
        (b"", 415, "unsupported-model-format", "not a safetensors file"),
    ],
    ids=["empty zip", "text", "empty"],
)
def test_other_formats_are_unsupported(upload, content, status, slug, words):
    response = upload(content)
    assert response.status_code == status
    assert response.json()["type"] == PROBLEM + slug and words in response.json()["detail"]


def test_a_broken_safetensors_header_is_422(upload, tmp_path):
    content = safetensors_bytes({"w": torch.ones(4, 4)}, tmp_path)
    response = upload(content[:-8])  # the header promises more data than the file holds
    assert response.status_code == 422
    problem = response.json()
    assert problem["type"] == PROBLEM + "invalid-model" and "safetensors header" in problem["detail"]
    empty = upload(safetensors_bytes({}, tmp_path))
    assert empty.status_code == 422 and "no tensors" in empty.json()["detail"]


def test_over_the_limit_is_413_and_leaves_nothing(upload, client, monkeypatch, settings, tmp_path):
    monkeypatch.setenv("QFORGE_MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()
    response = upload(safetensors_bytes({"w": torch.ones(64, 64)}, tmp_path))
    assert response.status_code == 413 and response.json()["type"] == PROBLEM + "upload-too-large"
    assert leftovers(settings) == []
    assert client.get("/v1/models").json()["total"] == 0


def test_list_get_delete(upload, client, settings, tmp_path):
    content = safetensors_bytes({"w": torch.ones(3)}, tmp_path)
    ids = [upload(content, name=f"m{i}").json()["id"] for i in range(3)]
    page = client.get("/v1/models", params={"limit": 2}).json()
    assert page["total"] == 3 and [m["id"] for m in page["items"]] == ids[::-1][:2]

    assert client.delete(f"/v1/models/{ids[0]}").status_code == 204
    assert not (settings.models_dir / ids[0]).exists()
    gone = client.get(f"/v1/models/{ids[0]}")
    assert gone.status_code == 404 and gone.json()["type"] == PROBLEM + "model-not-found"
    assert client.delete(f"/v1/models/{ids[0]}").status_code == 404
    assert [m["id"] for m in client.get("/v1/models").json()["items"]] == ids[:0:-1]


def test_the_forms_are_documented(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path, fields in (("/v1/models", {"file", "config", "name"}), ("/v1/datasets", {"file", "name"})):
        schema = paths[path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert set(schema["properties"]) == fields and schema["required"] == ["file"]


@pytest.mark.parametrize("header_bytes", [640, 896, 1152, 1408])
def test_a_safetensors_header_length_that_starts_like_a_pickle_is_still_safetensors(upload, header_bytes):
    """A header of 0x280 bytes is written 80 02 00..: the first two bytes of a protocol-2 pickle."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    content = header_bytes.to_bytes(8, "little") + header.ljust(header_bytes) + torch.ones(2).numpy().tobytes()
    assert content[0] == 0x80 and 2 <= content[1] <= 5
    response = upload(content)
    assert response.status_code == 201, response.text
    assert response.json()["tensors"] == 1 and response.json()["parameters"] == 2
