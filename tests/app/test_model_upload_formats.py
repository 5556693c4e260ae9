"""An HF folder (as .tar.gz or .zip) and a GGUF file are accepted, stored as the worker reads
them, and usable by a recipe job as 'upload:<id>'; an upload ref a job cannot use is a 422
at submission, as is a hub id the hub would not accept."""

from __future__ import annotations

import hashlib
import math

import pytest

from bench.model_builders import HIDDEN, folder_files, tar_bytes, tiny_gguf, tiny_hf_folder, zip_bytes

PROBLEM = "https://qforge.dev/problems/"
SMOLLM2_VOCAB = 49152


def llama_parameters(vocab: int, hidden: int, kv: int, ffn: int) -> int:
    """A one-layer Llama with tied embeddings, counted from its shapes."""
    attention = hidden * hidden * 2 + kv * hidden * 2  # q, o; k, v
    return vocab * hidden + attention + 3 * ffn * hidden + 3 * hidden  # embedding, mlp, two norms and the final one


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return tiny_hf_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf")


@pytest.fixture
def upload(client):
    def post(content: bytes, filename: str, **fields):
        response = client.post("/v1/models", files={"file": (filename, content)}, data=fields)
        assert response.status_code == 201, response.text
        return response.json()

    return post


@pytest.mark.parametrize("pack", ["tar.gz", "zip"])
def test_an_hf_folder_archive_is_stored_and_summarised(upload, client, settings, hf_folder, pack):
    files = folder_files(hf_folder)
    # tar czf model.tar.gz tiny-llama/ puts the folder inside; a zip of the files has them at its top
    content = tar_bytes(files, prefix="tiny-llama/") if pack == "tar.gz" else zip_bytes(files)
    model = upload(content, f"tiny-llama.{pack}", name="tiny llama")
    assert (model["name"], model["format"], model["architecture"]) == ("tiny llama", "hf-folder", "LlamaForCausalLM")
    assert model["config"]["model_type"] == "llama" and model["config"]["hidden_size"] == HIDDEN
    assert model["tensors"] == 11  # embedding, 4 attention, 3 mlp, 2 norms, the final norm
    assert model["parameters"] == llama_parameters(30522, HIDDEN, HIDDEN // 2, 32)
    assert model["bytes"] == len(content) and model["sha256"] == hashlib.sha256(content).hexdigest()
    stored = settings.models_dir / model["id"]
    assert {p.name: p.read_bytes() for p in stored.iterdir()} == files  # the folder itself, byte for byte
    assert sorted(p.name for p in settings.models_dir.iterdir()) == [model["id"]]  # no staging left
    assert client.get(f"/v1/models/{model['id']}").json() == model
    assert client.delete(f"/v1/models/{model['id']}").status_code == 204
    assert not stored.exists()


def test_a_gguf_file_is_stored_and_summarised(upload, settings, gguf_file):
    content = gguf_file.read_bytes()
    model = upload(content, "tiny-llama.gguf")
    assert (model["name"], model["format"], model["architecture"]) == ("tiny-llama.gguf", "gguf", "llama")
    assert model["tensors"] == 11
    assert model["parameters"] == llama_parameters(SMOLLM2_VOCAB, HIDDEN, HIDDEN // 2, 32)
    assert model["config"]["llama.embedding_length"] == HIDDEN and model["config"]["general.name"] == "tiny-llama"
    assert not any(key.startswith("tokenizer.") for key in model["config"])  # the vocabulary is not echoed
    assert (settings.models_dir / model["id"] / "model.gguf").read_bytes() == content


def test_a_gguf_upload_is_a_model_a_job_can_name(upload, client, settings, gguf_file):
    from quantcore.models import resolve_model_ref
    from worker.tasks import upload_folder

    model = upload(gguf_file.read_bytes(), "tiny-llama.gguf")
    ref = f"upload:{model['id']}"
    response = client.post("/v1/jobs", json={"model": ref, "recipe": "w8a16-rtn"})
    assert response.status_code == 202, response.text
    found = resolve_model_ref(ref, allow_local_paths=False, locate=lambda r: upload_folder(settings, "model", r))
    assert (found.source, found.path, found.gguf_file) == ("upload", settings.models_dir / model["id"], "model.gguf")


def test_an_uploaded_hf_folder_runs_as_a_recipe_job_through_the_worker(upload, client, settings, hf_folder, monkeypatch):
    from worker import tasks

    model = upload(tar_bytes(folder_files(hf_folder)), "tiny-llama.tar.gz")
    body = {"model": f"upload:{model['id']}", "recipe": "w8a16-rtn",
            "evaluation": {"perplexity_tokens": 512, "window": 128}}
    job = client.post("/v1/jobs", json=body).json()
    monkeypatch.setattr("worker.progress.MIN_WRITE_INTERVAL_S", 0.0)
    tasks.run_quantization_job.run(job["id"])
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done.get("error")
    report = client.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["model"]["ref"] == f"upload:{model['id']}" and report["model"]["class"] == "LlamaForCausalLM"
    ppl = report["metrics"]["quantized"]["perplexity"]
    assert math.isfinite(ppl) and ppl > 1


def test_unknown_or_unsuitable_upload_refs_are_422_at_submission(upload, client, tmp_path, hf_folder, job_count):
    from safetensors.torch import save_file
    import torch

    def refused(body: dict, *words: str) -> None:
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["errors"][0]["loc"] == ["body", "model"]
        for word in words:
            assert word in problem["detail"], problem["detail"]

    refused({"model": "upload:" + "0" * 32, "recipe": "w8a16-rtn"}, "no uploaded model", "POST /v1/models")
    refused({"model": "upload:../../etc", "recipe": "w8a16-rtn"}, "upload:<id>")
    save_file({"w": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    classic = upload((tmp_path / "m.safetensors").read_bytes(), "m.safetensors", config='{"architecture": "digits-cnn"}')
    refused({"model": f"upload:{classic['id']}", "recipe": "w8a16-rtn"}, "classic", "digits-cnn")
    llm = upload(tar_bytes(folder_files(hf_folder)), "tiny-llama.tar.gz")
    refused({"kind": "ptq", "model": f"upload:{llm['id']}"}, "hf-folder", "recipe job")
    assert job_count() == 0


@pytest.mark.parametrize("ref", ["org/na--me", "org/..name", "org/name.", "-org/name", "org/" + "n" * 97, "org/na me"])
def test_a_hub_id_the_hub_would_refuse_is_422(client, job_count, ref):
    response = client.post("/v1/jobs", json={"model": ref, "recipe": "w8a16-rtn"})
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"] == PROBLEM + "unknown-model" and problem["errors"][0]["loc"] == ["body", "model"]
    assert "not a valid hub id" in problem["detail"] or "neither a bundled model" in problem["detail"]
    assert job_count() == 0
