"""Bundled models: the SmolLM2 conversion cache, and MiniLM against a BERT written out by hand."""

import json
import math
import os
import threading

import numpy as np
import pytest
import torch
from gguf import GGUFReader, dequantize
from safetensors.torch import load_file

from quantcore.models import ModelRef, load_model, resolve_model_ref
from quantcore.models.bundled import converted_folder, model_cache, publish_atomically


def test_model_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("QFORGE_MODEL_CACHE", str(tmp_path / "mc"))
    assert model_cache() == tmp_path / "mc"
    monkeypatch.delenv("QFORGE_MODEL_CACHE")
    monkeypatch.setenv("QFORGE_CACHE_DIR", str(tmp_path / "qc"))
    assert model_cache() == tmp_path / "qc" / "models"


def test_converted_folder_changes_with_the_gguf_file(monkeypatch, tmp_path):
    monkeypatch.setenv("QFORGE_MODEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"x")
    ref = ModelRef("bundled:smollm2-135m", "bundled", tmp_path, "m.gguf", "smollm2-135m")
    before = converted_folder(ref)
    assert before.parent == tmp_path / "cache" and before.name.startswith("smollm2-135m-")
    os.utime(tmp_path / "m.gguf", ns=(0, 123))
    assert converted_folder(ref) != before


def test_publish_race_leaves_one_complete_folder(tmp_path):
    target = tmp_path / "model"
    both_writing = threading.Barrier(2)

    def writer(tag):
        def write(tmp):
            (tmp / "weights").write_text(tag)
            both_writing.wait(timeout=10)  # both have half-written folders before either renames
            (tmp / "config.json").write_text(tag)
        return write

    results = []
    threads = [threading.Thread(target=lambda t=t: results.append(publish_atomically(target, writer(t)))) for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target]
    assert (target / "weights").read_text() == (target / "config.json").read_text()  # one writer's files, whole
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the loser's folder is gone


def test_stale_temporary_folders_are_reclaimed(tmp_path):
    stale, fresh = tmp_path / ".model.dead.tmp", tmp_path / ".model.live.tmp"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (0, 0))
    publish_atomically(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.live.tmp", "model"]


def test_failed_write_publishes_nothing(tmp_path):
    def write(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        publish_atomically(tmp_path / "model", write)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_converted_folder_is_the_gguf_model(smollm2):
    """Logits, tokenizer and tying of the cached folder against the model read from GGUF."""
    assert smollm2.gguf_reads == 1  # the second load read the cache
    files = sorted(p.name for p in smollm2.folder.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".gguf")) for f in files)
    config = json.loads((smollm2.folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True

    reference, tokenizer = smollm2.gguf_model, smollm2.gguf_tokenizer
    text = "def quantize(x): return round(x / S) + Z  <|im_start|>user\nHéllo 世界<|im_end|>"
    for loaded in (smollm2.first, smollm2.second):
        model = loaded.model
        assert loaded.kind == "causal_lm" and not model.training
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
        assert loaded.tokenizer(text).input_ids == tokenizer(text).input_ids
        assert loaded.tokenizer.pad_token is not None and loaded.tokenizer.chat_template == tokenizer.chat_template
    ids = tokenizer([text, "The capital of France is"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expect = reference(**ids).logits
        torch.testing.assert_close(smollm2.second.model(**ids).logits, expect, rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_weights_are_the_gguf_tensors_dequantized(smollm2):
    """Two tensors against gguf-py's own numpy dequantizer: Q8_0 embedding, Q4_1 down projection.
    (Rows of quantized blocks; the first 4096 embedding rows keep the check quick.)"""
    ref = resolve_model_ref("bundled:smollm2-135m")
    tensors = {t.name: t for t in GGUFReader(ref.path / ref.gguf_file).tensors}
    model = smollm2.second.model
    for name, weight in (("token_embd.weight", model.model.embed_tokens.weight[:4096]),
                         ("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight)):
        t = tensors[name]
        rows = t.data[: weight.shape[0]]
        expect = torch.from_numpy(np.asarray(dequantize(rows, t.tensor_type), dtype=np.float32))
        torch.testing.assert_close(weight.detach(), expect.reshape(weight.shape), rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_cached_load_is_quick(smollm2):
    assert smollm2.second_s < 10, f"cached load took {smollm2.second_s:.1f} s"


def bert_by_hand(w: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """BERT's forward for one unpadded sequence, from the safetensors weights (Devlin et al., 2019)."""
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]

    def norm(x, p):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w[p + ".weight"], w[p + ".bias"], eps)

    def linear(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    n = ids.shape[0]
    e = "embeddings."
    h = w[e + "word_embeddings.weight"][ids] + w[e + "position_embeddings.weight"][:n] + w[e + "token_type_embeddings.weight"][0]
    h = norm(h, e + "LayerNorm")
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (linear(h, p + f"attention.self.{m}").view(n, heads, -1).transpose(0, 1) for m in ("query", "key", "value"))
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        h = norm(h + linear(attention.transpose(0, 1).reshape(n, -1), p + "attention.output.dense"), p + "attention.output.LayerNorm")
        inner = torch.nn.functional.gelu(linear(h, p + "intermediate.dense"))  # exact (erf) GELU
        h = norm(h + linear(inner, p + "output.dense"), p + "output.LayerNorm")
    return h


@pytest.mark.slow
def test_minilm_embeddings_match_bert_written_by_hand():
    loaded = load_model("bundled:minilm-l6")
    assert loaded.kind == "encoder" and loaded.ref.source == "bundled"
    tokenizer = loaded.tokenizer
    assert tokenizer("hello world").input_ids == [101, 7592, 2088, 102]  # bert-base-uncased vocabulary ids
    sentences = ["Quantization maps floats to a few integer levels.", "A short one."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**batch).last_hidden_state
    mask = batch.attention_mask.unsqueeze(-1).float()
    got = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # sentence-transformers pooling

    weights = load_file(loaded.ref.path / "model.safetensors")
    config = json.loads((loaded.ref.path / "config.json").read_text())
    for sentence, embedding in zip(sentences, got):
        h = bert_by_hand(weights, config, torch.tensor(tokenizer(sentence).input_ids))
        torch.testing.assert_close(embedding, torch.nn.functional.normalize(h.mean(0), dim=-1), rtol=0, atol=1e-5)
