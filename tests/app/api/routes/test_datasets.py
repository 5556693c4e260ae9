"""POST/GET/DELETE /v1/datasets: an upload is checked from its content, summarised, stored
under <data_dir>/datasets/<id>/, and refused with a problem naming what is wrong."""

import hashlib
import io
import json

import numpy as np
import pytest

from app.core.config import get_settings

PROBLEM = "https://qforge.dev/problems/"


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def jsonl(*samples, raw: str = "") -> bytes:
    return ("\n".join(json.dumps(s) for s in samples) + "\n" + raw).encode()


@pytest.fixture
def upload(client):
    def post(content: bytes, filename: str = "data.npz", **fields):
        return client.post("/v1/datasets", files={"file": (filename, content)}, data=fields)

    return post


def leftovers(settings) -> list[str]:
    """Everything under the datasets folder: no partial upload may stay behind."""
    return sorted(p.name for p in settings.datasets_dir.glob("*")) if settings.datasets_dir.exists() else []


def test_npz_upload_is_summarised_and_stored(upload, client, settings):
    rng = np.random.default_rng(0)
    x = rng.random((30, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 4, 30)
    content = npz(x=x, y=y)
    response = upload(content, name="digits calibration")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert response.headers["location"] == f"/v1/datasets/{dataset['id']}"
    assert dataset["name"] == "digits calibration"
    assert (dataset["format"], dataset["kind"]) == ("npz", "arrays")
    assert dataset["samples"] == 30 and dataset["x_shape"] == [1, 8, 8]
    assert dataset["has_labels"] and dataset["classes"] == len(set(y.tolist()))
    assert dataset["bytes"] == len(content) and dataset["sha256"] == hashlib.sha256(content).hexdigest()
    stored = settings.datasets_dir / dataset["id"] / "data.npz"
    assert stored.read_bytes() == content
    assert leftovers(settings) == [dataset["id"]]
    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset


def test_format_is_found_from_the_content_not_the_name(upload):
    x = np.arange(12, dtype=np.int64).reshape(4, 3)
    response = upload(npz(x=x), filename="samples.bin")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["format"] == "npz" and dataset["name"] == "samples.bin"  # the file's name by default
    assert dataset["x_shape"] == [3] and not dataset["has_labels"] and dataset["classes"] is None


def test_jsonl_arrays_with_labels(upload):
    samples = [{"x": [[i, i + 1.5], [0, -1]], "y": i % 3} for i in range(7)]
    response = upload(jsonl(*samples), filename="train.jsonl")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert (dataset["format"], dataset["kind"]) == ("jsonl", "arrays")
    assert dataset["samples"] == 7 and dataset["x_shape"] == [2, 2]
    assert dataset["has_labels"] and dataset["classes"] == len({s["y"] for s in samples})


def test_jsonl_text(upload, settings):
    content = b"\xef\xbb\xbf" + jsonl({"text": "The quick brown fox."}, {"text": "Jumps."}, {"text": ""})
    response = upload(content, filename="calib.jsonl")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert (dataset["format"], dataset["kind"], dataset["samples"]) == ("jsonl", "text", 3)
    assert dataset["x_shape"] is None and not dataset["has_labels"] and dataset["classes"] is None
    assert (settings.datasets_dir / dataset["id"] / "data.jsonl").read_bytes() == content


X = np.zeros((4, 2, 2), dtype=np.float32)
NAN = X.copy()
NAN[2, 1, 0] = np.nan

NPZ_CASES = {
    "object array": (dict(x=np.array([{"a": 1}, None] * 2, dtype=object).reshape(2, 2)), ["allow_pickle", "objects"]),
    "no x": (dict(y=np.arange(4)), ["no array 'x'"]),
    "unknown key": (dict(x=X, labels=np.arange(4)), ["unexpected array 'labels'"]),
    "NaN": (dict(x=NAN), ["non-finite", "sample 2"]),
    "y length": (dict(x=X, y=np.arange(3)), ["y has 3 labels but x has 4 samples"]),
    "float labels": (dict(x=X, y=np.zeros(4)), ["integer class labels"]),
    "negative label": (dict(x=X, y=np.array([0, 1, -2, 1])), ["0 or more", "sample 2"]),
    "one dimension": (dict(x=np.arange(5.0)), ["at least 2 dimensions"]),
    "strings": (dict(x=np.array([["a", "b"]])), ["numbers"]),
}


@pytest.mark.parametrize("arrays, words", list(NPZ_CASES.values()), ids=list(NPZ_CASES))
def test_bad_npz_is_422_naming_the_problem(upload, settings, arrays, words):
    response = upload(npz(**arrays))
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert problem["type"] == PROBLEM + "invalid-dataset"
    for word in words:
        assert word in problem["detail"]
    assert leftovers(settings) == []


def test_too_many_samples(upload, monkeypatch):
    monkeypatch.setenv("QFORGE_MAX_DATASET_SAMPLES", "3")
    get_settings.cache_clear()
    response = upload(npz(x=X))
    assert response.status_code == 422
    assert "QFORGE_MAX_DATASET_SAMPLES" in response.json()["detail"]


JSONL_CASES = {
    "bad JSON": (jsonl({"x": [1]}, {"x": [2]}, raw='{"x": [3],\n'), 3, "not valid JSON"),
    "ragged x": (jsonl({"x": [[1, 2], [3]]}), 1, "same length"),
    "shape changes": (jsonl({"x": [1, 2]}, {"x": [1, 2]}, {"x": [1, 2, 3]}), 3, "shape [3] but line 1's has [2]"),
    "kinds mixed": (jsonl({"x": [1]}, {"text": "hi"}), 2, "one kind"),
    "unknown key": (jsonl({"text": "a"}, {"text": "b", "lang": "en"}), 2, "unexpected key 'lang'"),
    "label missing": (jsonl({"x": [1], "y": 0}, {"x": [2]}), 2, "has no label y"),
    "label not int": (jsonl({"x": [1], "y": 0}, {"x": [2], "y": 1.5}), 2, "integer class label"),
    "NaN": (jsonl({"x": [1.0]}, raw='{"x": [NaN]}\n'), 2, "non-finite"),
    "string values": (jsonl({"x": ["1", "2"]}), 1, "numbers"),
    "not an object": (jsonl({"text": "a"}, raw="[1, 2]\n"), 2, "JSON object"),
}


@pytest.mark.parametrize("content, line, words", list(JSONL_CASES.values()), ids=list(JSONL_CASES))
def test_bad_jsonl_is_422_naming_the_line(upload, settings, content, line, words):
    response = upload(content, filename="d.jsonl")
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"] == PROBLEM + "invalid-dataset"
    assert problem["detail"].startswith(f"line {line}: ") and problem["line"] == line
    assert words in problem["detail"]
    assert leftovers(settings) == []


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\x93NUMPY\x01\x00", ".npy"),
        (b"[{\"x\": [1]}]", "JSON array"),
        (b"\x80\x04\x95...", "pickle"),
        (b"x,y\n1,2\n", "neither"),
    ],
    ids=["npy", "json array", "pickle", "csv"],
)
def test_unknown_format_is_415(upload, content, words):
    response = upload(content, filename="data.npz")
    assert response.status_code == 415
    problem = response.json()
    assert problem["type"] == PROBLEM + "unsupported-dataset-format"
    assert words in problem["detail"] and ".jsonl" in problem["detail"]


@pytest.fixture
def tiny_limit(monkeypatch, settings):
    monkeypatch.setenv("QFORGE_MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()
    return get_settings()


def test_over_the_limit_is_413_while_streaming_and_leaves_nothing(upload, tiny_limit, client):
    response = upload(jsonl(*[{"text": "a" * 50}] * 40), filename="big.jsonl")  # about 2.4 kB
    assert response.status_code == 413
    problem = response.json()
    assert problem["type"] == PROBLEM + "upload-too-large" and problem["limit_bytes"] == 1000
    assert leftovers(tiny_limit) == []
    assert client.get("/v1/datasets").json()["total"] == 0


def test_over_the_limit_without_content_length_is_413(client, tiny_limit):
    def chunks():  # a generator body is sent chunked: no Content-Length to refuse it by
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n\r\n'
        for _ in range(100):
            yield b'{"text": "0123456789"}\n'
        yield b"\r\n--b--\r\n"

    response = client.post("/v1/datasets", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    assert leftovers(tiny_limit) == []


def test_a_declared_length_far_over_the_limit_is_refused_before_reading(upload, tiny_limit):
    response = upload(b"0" * 400_000)
    assert response.status_code == 413
    assert leftovers(tiny_limit) == []


def test_the_form_is_checked(client, upload):
    missing = client.post("/v1/datasets", data={"name": "no file"}, files={"other": ("a", b"b")})
    assert missing.status_code == 422 and "other" in missing.json()["detail"]
    no_file = client.post("/v1/datasets", files={"name": (None, "just a name")})
    assert no_file.status_code == 422 and no_file.json()["errors"][0]["loc"] == ["body", "file"]
    as_json = client.post("/v1/datasets", json={"file": "x"})
    assert as_json.status_code == 415 and as_json.json()["type"] == PROBLEM + "unsupported-media-type"
    too_long = upload(npz(x=X), name="n" * 256)
    assert too_long.status_code == 422 and "name" in too_long.json()["detail"]


def test_list_get_delete(upload, client, settings):
    ids = [upload(npz(x=X), name=f"d{i}").json()["id"] for i in range(3)]
    page = client.get("/v1/datasets", params={"limit": 2}).json()
    assert page["total"] == 3 and [d["id"] for d in page["items"]] == ids[::-1][:2]
    assert [d["id"] for d in client.get("/v1/datasets", params={"offset": 2}).json()["items"]] == [ids[0]]

    assert client.delete(f"/v1/datasets/{ids[1]}").status_code == 204
    assert not (settings.datasets_dir / ids[1]).exists()
    gone = client.get(f"/v1/datasets/{ids[1]}")
    assert gone.status_code == 404 and gone.json()["type"] == PROBLEM + "dataset-not-found"
    assert client.delete(f"/v1/datasets/{ids[1]}").status_code == 404
    assert client.get("/v1/datasets").json()["total"] == 2
    assert client.get("/v1/datasets/nope").json()["type"] == PROBLEM + "dataset-not-found"
