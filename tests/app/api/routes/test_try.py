"""POST /v1/jobs/{id}/try on a stored artifact: a small random Llama with SmolLM2's tokenizer,
quantized to int4 (so the int4 CPU kernel runs), archived into the artifact store as a worker
would; the generated tokens are checked against generating from the same artifact directly."""

from __future__ import annotations

import hashlib

import pytest
import torch

from app.artifact_store import store_for
from app.models import JobStatus, utcnow

PROBLEM = "https://qforge.dev/problems/"


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantcore import quantize
    from quantcore.export import archive_artifact, save_artifact, write_manifest
    from quantcore.models import resolve_model_ref

    source = resolve_model_ref("bundled:smollm2-135m", allow_local_paths=False)
    tokenizer = AutoTokenizer.from_pretrained(str(source.path), gguf_file=source.gguf_file)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    quantize(model, "w4a16-rtn-g64")
    folder = tmp_path_factory.mktemp("tiny") / "artifact"
    save_artifact(model, tokenizer, folder, "causal_lm", {"report.json": {"model": {"ref": "bundled:smollm2-135m"}}})
    write_manifest(folder)
    archive = folder.parent / "tiny.tar"
    info = archive_artifact(folder, archive)
    return folder, archive, info


def test_try_generates_what_the_artifact_generates(client, submit, set_job, settings, tiny_artifact, tmp_path):
    from quantcore.export import load_quantized
    from quantcore.generate import generate

    folder, archive, info = tiny_artifact
    job_id = submit().json()["id"]
    staged = tmp_path / "staged.tar"
    staged.write_bytes(archive.read_bytes())
    store_for(settings).put(f"{job_id}.tar", staged)
    entry = {"format": "qforge", "folder": "artifact", "file": f"{job_id}.tar", **info}
    set_job(job_id, status=JobStatus.SUCCEEDED, finished_at=utcnow(), report={"artifacts": [entry]},
            artifact_path=entry["file"], artifact_sha256=info["sha256"], artifact_bytes=info["bytes"])
    assert info["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()

    response = client.post(f"/v1/jobs/{job_id}/try", json={"prompt": "Lists are", "max_new_tokens": 6})
    assert response.status_code == 200, response.text
    result = response.json()
    local = load_quantized(folder)
    expect = generate(local.model, local.tokenizer, "Lists are", 6)
    assert result["quantized"]["token_ids"] == expect.token_ids
    assert result["quantized"]["text"] == expect.text and result["float"] is None
    assert result["quantized"]["decode_tokens_per_s"] >= 0

    again = client.post(f"/v1/jobs/{job_id}/try", json={"prompt": "Lists are", "max_new_tokens": 6})
    assert again.json()["quantized"]["token_ids"] == expect.token_ids  # from the model kept loaded

    too_long = client.post(f"/v1/jobs/{job_id}/try", json={"max_new_tokens": 1000})
    assert too_long.status_code == 422


def test_try_needs_a_finished_job_with_a_qforge_artifact(client, submit, set_job):
    job_id = submit().json()["id"]
    queued = client.post(f"/v1/jobs/{job_id}/try", json={})
    assert queued.status_code == 409 and queued.json()["type"] == PROBLEM + "job-not-finished"
    entry = {"format": "gguf", "folder": "artifact-gguf", "file": f"{job_id}.tar", "sha256": "0" * 64, "bytes": 1}
    set_job(job_id, status=JobStatus.SUCCEEDED, finished_at=utcnow(), report={"artifacts": [entry]},
            artifact_path=entry["file"], artifact_sha256=entry["sha256"], artifact_bytes=1)
    gguf_only = client.post(f"/v1/jobs/{job_id}/try", json={})
    assert gguf_only.status_code == 409 and gguf_only.json()["type"] == PROBLEM + "try-needs-qforge-artifact"
