"""Loading the tiny Llama from each format must give the source model's logits exactly."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, LlamaConfig, T5Config, ViTConfig

from quantcore.models import ModelNotFoundError, UnsupportedModelError, load_model, model_kind


@pytest.fixture(scope="module")
def ids(tiny_llama):
    return torch.randint(0, tiny_llama.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_folder(tiny_llama, tiny_folder, ids):
    loaded = load_model(str(tiny_folder))
    assert loaded.kind == "causal_lm" and not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(tiny_llama, ids), rtol=0, atol=0)


def test_single_safetensors_file_with_config_beside(tiny_llama, tiny_folder, tmp_path, ids):
    for f in tiny_folder.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            shutil.copy(f, tmp_path)
    shutil.copy(tiny_folder / "model.safetensors", tmp_path / "my-weights.safetensors")
    loaded = load_model(str(tmp_path / "my-weights.safetensors"))
    assert loaded.ref.path == tmp_path / "my-weights.safetensors"
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(tiny_llama, ids), rtol=0, atol=0)


def test_gguf_file(tiny_llama, tiny_folder, tiny_gguf, ids):
    loaded = load_model(str(tiny_gguf))
    assert loaded.kind == "causal_lm" and loaded.ref.gguf_file == tiny_gguf.name
    assert not hasattr(loaded.config, "quantization_config") and loaded.model.hf_quantizer is None
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(tiny_llama, ids), rtol=0, atol=0)
    # the tokenizer rebuilt from the GGUF vocabulary splits text as the folder's tokenizer does
    folder_tokenizer = load_model(str(tiny_folder)).tokenizer
    text = "ab cab! x"
    assert loaded.tokenizer(text).input_ids == folder_tokenizer(text).input_ids


def test_causal_lm_tokenizer_gets_a_pad_token(tiny_folder):
    tokenizer = load_model(str(tiny_folder)).tokenizer
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    batch = tokenizer(["ab", "ab c d"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 5) and batch.attention_mask[0].sum() == 1


def test_other_dtype(tiny_llama, tiny_folder, ids):
    loaded = load_model(str(tiny_folder), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(_logits(loaded.model, ids).float(), _logits(tiny_llama, ids), rtol=0.05, atol=0.05)


def test_missing_weights_are_refused_not_randomized(tiny_folder, tmp_path):
    shutil.copytree(tiny_folder, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelNotFoundError, match="missing.*layers.1.mlp.up_proj"):
        load_model(str(tmp_path / "m"))


def test_missing_tokenizer_is_a_clear_error(tiny_folder, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_folder / name, tmp_path)
    with pytest.raises(ModelNotFoundError, match="no usable tokenizer"):
        load_model(str(tmp_path))


def test_model_kind_from_config():
    assert model_kind(LlamaConfig(architectures=["LlamaForCausalLM"])) == "causal_lm"
    assert model_kind(LlamaConfig()) == "causal_lm"  # as read from GGUF: a model type, no architecture
    assert model_kind(BertConfig(architectures=["BertModel"])) == "encoder"
    assert model_kind(BertConfig(architectures=["BertForMaskedLM"])) == "encoder"
    with pytest.raises(UnsupportedModelError, match="unsupported architecture.*T5ForConditionalGeneration"):
        model_kind(T5Config(architectures=["T5ForConditionalGeneration"]))
    with pytest.raises(UnsupportedModelError, match="ViTModel"):
        model_kind(ViTConfig(architectures=["ViTModel"]))
    with pytest.raises(UnsupportedModelError):
        model_kind(LlamaConfig(architectures=["LlamaForSequenceClassification"]))


def test_unsupported_architecture_in_a_folder(tiny_folder, tmp_path):
    shutil.copytree(tiny_folder, tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "no-such-model-type"}')
    with pytest.raises(UnsupportedModelError, match="no-such-model-type"):
        load_model(str(tmp_path / "m"))
