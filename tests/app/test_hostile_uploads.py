"""POST /v1/models and /v1/datasets against the hostile-upload corpus (bench/hostile_corpus.py):
path traversal, absolute paths, links and devices in archives, too many members, bombs,
bodies over the limit, pickles with a payload, torch.save checkpoints, truncated
safetensors, GGUF files whose header lies, remote code. Every one is refused with a problem
of a stable type, and leaves no row, no folder, no file anywhere it aimed, and runs no
payload. bench/reliability.py sends the same corpus, in-process, and counts the refusals."""

from __future__ import annotations

import asyncio
import io
import pickle

import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from bench import hostile_corpus
from bench.model_builders import gguf_bytes

PROBLEM = "https://qforge.dev/problems/"
MB = 2**20
# Small enough that the cases over the limit stay cheap, large enough for the bombs to be
# stopped by their ratio (bench/hostile_corpus.py: MIN_LIMIT).
LIMIT = 32 * MB
CASES = hostile_corpus.case_names()


@pytest.fixture
def service_env() -> dict[str, str]:
    return {"QFORGE_MAX_UPLOAD_BYTES": str(LIMIT)}


@pytest.fixture(scope="module")
def corpus_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def corpus(corpus_folder) -> dict[str, hostile_corpus.HostileUpload]:
    """Built once for the module; each case's content is made when its test first sends it."""
    return {upload.name: upload for upload in hostile_corpus.build_corpus(corpus_folder, LIMIT)}


def test_the_corpus_is_built_for_the_same_cases_as_it_names():
    assert len(CASES) == len(set(CASES)) == 65


@pytest.mark.timeout(120)  # the gguf package's own reader loops forever on the 2^60 array
@pytest.mark.parametrize("name", CASES)
def test_a_hostile_upload_is_refused_and_leaves_nothing(client, settings, corpus, corpus_folder, tmp_path, name):
    upload = corpus[name]
    outcome = hostile_corpus.observe(client, upload, corpus_folder, settings.data_dir)
    response = outcome.response
    assert response.status_code == upload.status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == PROBLEM + upload.slug, problem
    for word in upload.words:
        assert word in problem["detail"], problem["detail"]
    if upload.member is not None:
        assert problem["member"] == upload.member
    assert client.get(upload.endpoint).json()["total"] == 0
    for folder in (settings.models_dir, settings.datasets_dir):
        assert not folder.exists() or list(folder.iterdir()) == []
    # nothing written outside, wherever it aimed
    assert [*tmp_path.rglob("*evil*"), *corpus_folder.rglob("*evil*")] == [] == outcome.escapes
    assert upload.marker is None or not upload.marker.exists()


def test_the_whole_corpus_is_refused_as_expected(client, settings, tmp_path):
    result = hostile_corpus.run_corpus(client, tmp_path / "corpus", settings.data_dir, LIMIT)
    assert (result.sent, result.refused, result.accepted, result.wrong) == (len(CASES), len(CASES), [], [])
    assert (result.markers, result.rows_left, result.leftovers, result.escapes) == ([], [], [], [])
    assert client.get("/v1/models").json()["total"] == client.get("/v1/datasets").json()["total"] == 0


def careless_service(data_dir) -> FastAPI:
    """Takes GGUF files, unpickles pickles before it refuses them (leaving their row and
    folder behind), and answers anything else with the wrong problem."""
    app, rows, problem = FastAPI(), [], "application/problem+json"

    @app.post("/v1/models")
    async def upload(request: Request):
        content = await (await request.form())["file"].read()
        if content.startswith(b"GGUF"):
            rows.append("gguf")
            return JSONResponse({"id": "gguf"}, status_code=201)
        if content.startswith(b"\x80"):
            pickle.loads(content)["weight"].close()
            rows.append("pickle")
            (data_dir / "models" / "pickle.partial").mkdir(parents=True)
            return JSONResponse({"type": PROBLEM + "unsafe-model-format", "detail": "a pickle"}, status_code=415,
                                media_type=problem)
        return JSONResponse({"type": PROBLEM + "oops", "detail": ""}, status_code=400, media_type=problem)

    @app.get("/v1/models")
    def listing():
        return {"total": len(rows)}

    @app.delete("/v1/models/{model_id}", status_code=204)
    def delete(model_id: str):
        rows.remove(model_id)

    return app


def test_the_runner_counts_what_a_careless_service_does(tmp_path, monkeypatch):
    corpus = {u.name: u for u in hostile_corpus.build_corpus(tmp_path / "corpus")}
    chosen = [corpus[name] for name in ("GGUF with no tensors", "pickle named weights", "zip symlink")]
    monkeypatch.setattr(hostile_corpus, "build_corpus", lambda *args: chosen)
    data_dir = tmp_path / "data"
    with TestClient(careless_service(data_dir)) as client:
        result = hostile_corpus.run_corpus(client, tmp_path / "corpus", data_dir)
        # the accepted GGUF is deleted again; the pickle's row stays
        assert client.get("/v1/models").json()["total"] == 1
    assert (result.sent, result.refused, result.accepted) == (3, 1, ["GGUF with no tensors"])
    assert len(result.wrong) == 1 and result.wrong[0].startswith("zip symlink: 400")
    assert chosen[1].marker.parent == tmp_path / "corpus"
    assert result.markers == [f"pickle named weights: {chosen[1].marker}"]
    assert result.rows_left == ["pickle named weights: 1 row(s)"]
    assert result.leftovers == ["pickle named weights: models/pickle.partial"]
    assert result.sent == result.refused + len(result.accepted) + len(result.wrong)


def test_the_pickle_payloads_are_real(tmp_path):
    """Unpickling the corpus's payloads does create their markers: their absence after an
    upload means the service never unpickled them."""
    corpus = {upload.name: upload for upload in hostile_corpus.build_corpus(tmp_path)}
    bare = corpus["pickle named weights"]
    pickle.loads(bare.content)["weight"].close()
    checkpoint = corpus["torch.save checkpoint"]
    torch.load(io.BytesIO(checkpoint.content), weights_only=False)["hook"].close()
    objects = corpus["npz of Python objects"]
    np.load(io.BytesIO(objects.content), allow_pickle=True)["x"][0].close()
    assert bare.marker.exists() and checkpoint.marker.exists() and objects.marker.exists()
    assert len({bare.marker, checkpoint.marker, objects.marker}) == 3


def test_the_size_cases_are_stopped_by_what_they_claim(corpus):
    """The bombs by their ratio (100:1 plus 16 MiB of slack), not by the limit; the content
    over the limit by the limit, not by the ratio; the bodies over the limit are over it."""
    for name in ("zip bomb", "tar.gz bomb"):
        assert len(corpus[name].content) * 100 + 16 * MB < min(hostile_corpus.BOMB, LIMIT)
    over = corpus["tar.gz whose content is over the limit"].content
    assert len(over) < LIMIT < len(over) * 100 + 16 * MB
    assert len(corpus["model body over the limit"].content) > LIMIT
    assert corpus["model body over the limit, streamed"].stream_bytes > LIMIT


def test_the_honest_gguf_of_the_corpus_is_accepted(client):
    """The control: each lie in the corpus is what gets the file refused, not the way it is written."""
    response = client.post("/v1/models", files={"file": ("tiny.gguf", gguf_bytes())})
    assert response.status_code == 201, response.text
    assert (response.json()["format"], response.json()["tensors"], response.json()["parameters"]) == ("gguf", 1, 32)


def test_an_oversized_body_is_refused_while_it_streams(tmp_path):
    """No Content-Length: the limit holds on the bytes read, and reading stops there. (Driven
    below the TestClient, which reads a request body whole before the app sees it.)"""
    from starlette.requests import Request

    from app import upload_stream
    from app.errors import Problem

    boundary = "hostile-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model.tar\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    chunks = [head, *(bytes(MB) for _ in range(100)), f"\r\n--{boundary}--\r\n".encode()]  # 100 MiB in all
    pulled = []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": chunks[len(pulled) - 1], "more_body": len(pulled) < len(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/v1/models", "query_string": b"",
             "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]}
    dest = tmp_path / "staging" / "upload"
    with pytest.raises(Problem) as refusal:
        asyncio.run(upload_stream.receive(Request(scope, receive), dest, MB, frozenset()))
    assert (refusal.value.status, refusal.value.slug) == (413, "upload-too-large")
    assert len(pulled) <= 3  # the head and one MiB, perhaps the next: not the 100 MiB sent
    assert dest.stat().st_size <= MB
