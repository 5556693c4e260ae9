"""Model references and loading, against transformers' own loaders as the reference."""

import time

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from quantcore.models import ModelNotFoundError, UnsafeModelError, bundled_models, load_model, resolve_model_ref


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder, safe_serialization=True)
    # a tokenizer from the bundled MiniLM vocabulary is enough for loading
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(resolve_model_ref("bundled:minilm-l6").path).save_pretrained(folder)
    return folder, model


def test_folder_and_single_file_load_same_logits(tiny_folder, tmp_path):
    folder, source = tiny_folder
    ids = torch.randint(0, 96, (1, 12))
    expect = source(ids).logits
    loaded = load_model(str(folder))
    assert loaded.kind == "causal_lm" and loaded.ref.source == "path"
    torch.testing.assert_close(loaded.model(ids).logits, expect, rtol=0, atol=0)

    single = tmp_path / "single"
    single.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, single / "weights.safetensors")
    for f in folder.iterdir():
        if f.suffix == ".json" or f.name.startswith("tokenizer") or f.name == "vocab.txt":
            (single / f.name).write_bytes(f.read_bytes())
    (single / "model.safetensors").unlink(missing_ok=True)
    loaded = load_model(str(single / "weights.safetensors"))
    torch.testing.assert_close(loaded.model(ids).logits, expect, rtol=0, atol=0)


def test_pickles_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeModelError, match="pickle"):
        resolve_model_ref(str(tmp_path))
    with pytest.raises(UnsafeModelError, match="pickle"):
        resolve_model_ref(str(tmp_path / "pytorch_model.bin"))


def test_local_paths_can_be_refused(tiny_folder):
    with pytest.raises(ModelNotFoundError, match="local paths are not accepted"):
        resolve_model_ref(str(tiny_folder[0]), allow_local_paths=False)


def test_unknown_refs_name_the_alternatives():
    with pytest.raises(ModelNotFoundError, match="bundled:smollm2-135m"):
        resolve_model_ref("bundled:nope")
    with pytest.raises(ModelNotFoundError, match="hub id"):
        resolve_model_ref("not a model")
    with pytest.raises(ModelNotFoundError):
        resolve_model_ref("org/bad--name")
    assert set(bundled_models()) == {"smollm2-135m", "minilm-l6"}


def test_uncached_hub_id_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache.*offline"):
        resolve_model_ref("HuggingFaceTB/SmolLM2-360M")
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_bundled_smollm2_cached_folder_matches_gguf():
    """The converted folder must be the GGUF model exactly (transformers' GGUF loader is the reference)."""
    ref = resolve_model_ref("bundled:smollm2-135m")
    loaded = load_model(ref)
    assert loaded.kind == "causal_lm" and loaded.model.config.tie_word_embeddings
    reference = AutoModelForCausalLM.from_pretrained(ref.path, gguf_file=ref.gguf_file, dtype=torch.float32).eval()
    ids = loaded.tokenizer("def quantize(x): return round(x)", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_bundled_minilm_is_an_encoder():
    loaded = load_model("bundled:minilm-l6")
    assert loaded.kind == "encoder"
    enc = loaded.tokenizer(["a sentence"], return_tensors="pt")
    assert loaded.model(**enc).last_hidden_state.shape[-1] == 384
