"""Artifact round trip: what load_quantized rebuilds computes exactly what was saved."""

import json
import tarfile

import pytest
import torch

from quantcore import quantize
from quantcore.export import ArtifactError, archive_artifact, load_quantized, save_artifact, write_manifest
from quantcore.export.artifact import file_sha256, tensor_bytes


@pytest.mark.parametrize("preset", ["w4a16-rtn-g64-asym", "w3a16-rtn-g64", "w8a8-rtn", "fp8-rtn"])
def test_round_trip_reproduces_logits(tmp_path, preset, tiny_llama):
    model = tiny_llama
    quantize(model, preset)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        expect = model(ids).logits
    folder = tmp_path / "artifact"
    save_artifact(model, None, folder, "causal_lm", {"report.json": {"hello": 1}})
    write_manifest(folder)
    loaded = load_quantized(folder, fast_path=False)  # the reference path: bit for bit
    with torch.no_grad():
        got = loaded.model(ids).logits
    assert torch.equal(got, expect)
    assert loaded.report == {"hello": 1}
    fast = load_quantized(folder)  # the CPU's fast paths (where it has them): the same up to float rounding
    with torch.no_grad():
        torch.testing.assert_close(fast.model(ids).logits, expect, rtol=1e-4, atol=1e-4)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.model.embed_tokens.weight.data_ptr()


def test_packed_sizes_and_manifest(tmp_path, tiny_llama):
    model = tiny_llama
    quantize(model, "w4a16-rtn-g64")
    folder = tmp_path / "artifact"
    save_artifact(model, None, folder, "causal_lm", {})
    manifest = write_manifest(folder)
    sizes = tensor_bytes(folder / "model.safetensors")
    # q_proj 64x64 int4 packed: 2048 bytes; one fp16 scale per 64 weights: 64*1*2 bytes
    assert sizes["model.layers.0.self_attn.q_proj.qweight"] == 64 * 64 // 2
    assert sizes["model.layers.0.self_attn.q_proj.scale"] == 64 * 2
    assert manifest["files"]["model.safetensors"]["sha256"] == file_sha256(folder / "model.safetensors")

    info = archive_artifact(folder, tmp_path / "out" / "a.tar")
    assert info["sha256"] == file_sha256(tmp_path / "out" / "a.tar")
    with tarfile.open(tmp_path / "out" / "a.tar") as tar:
        assert "artifact/manifest.json" in tar.getnames()


def test_corruption_detected(tmp_path, tiny_llama):
    model = tiny_llama
    quantize(model, "w8a16-rtn")
    folder = tmp_path / "artifact"
    save_artifact(model, None, folder, "causal_lm", {})
    write_manifest(folder)
    quant = json.loads((folder / "quantization.json").read_text())
    quant["layers"] = {}
    (folder / "quantization.json").write_text(json.dumps(quant))
    with pytest.raises(ArtifactError, match="sha256"):
        load_quantized(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="not a qforge artifact"):
        load_quantized(tmp_path / "empty")
