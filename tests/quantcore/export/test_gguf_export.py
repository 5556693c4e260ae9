"""GGUF export, read back by the readers llama.cpp users have: the gguf package's reader and
dequantizers, and transformers' `gguf_file=` loader (which undoes llama.cpp's rotary layout)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from quantcore import quantize
from quantcore.export.compressed_tensors import ExportError
from quantcore.export.gguf_export import export_gguf
from quantcore.modules.quantized_linear import QuantizedLinear

# a byte-level BPE vocabulary: printable ASCII, one merge, the space marker, end of text
TOKENS = [chr(c) for c in range(33, 126)] + ["ab", "Ġ", "<|endoftext|>"]


@pytest.fixture
def bpe_tokenizer():
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(TOKENS)}, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TOKENS[-1], bos_token=TOKENS[-1])


def _g32(bits):
    weights = {"bits": bits, "symmetric": True, "granularity": "group", "group_size": 32}
    return {"name": f"w{bits}-g32", "stages": [{"algorithm": "rtn", "weights": weights}]}


def _export(model, tokenizer, tmp_path, file_type):
    path = tmp_path / f"model-{file_type}.gguf"
    return export_gguf(model, tokenizer, path, file_type), path


def _reload(path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


def _linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("bits, file_type", [(4, "Q4_0"), (8, "Q8_0")])
def test_a_matching_grid_is_written_code_for_code(tiny_llama, bpe_tokenizer, tmp_path, bits, file_type):
    model = tiny_llama
    model.resize_token_embeddings(len(TOKENS))
    quantize(model, _g32(bits))
    export, path = _export(model, bpe_tokenizer, tmp_path, file_type)
    assert len(export.exact) == 14 and export.requantized == []

    reader = GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType[file_type]
    assert types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    # v_proj has no rotary permutation: its blocks dequantize, by the gguf package, to our weight
    stored = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
    theirs = dequantize(stored.data, stored.tensor_type).reshape(64 // 2, 64)
    np.testing.assert_array_equal(theirs, model.model.layers[1].self_attn.v_proj.dequantize_weight().numpy())

    reloaded = _reload(path)
    for name, layer in _linears(model).items():  # q/k too: transformers undid the permutation
        assert torch.equal(reloaded.get_submodule(name).weight, layer.dequantize_weight()), name
    # the float embedding (the tied output matrix too) is written Q8_0: within its rounding
    embedding = model.model.embed_tokens.weight.detach()
    step = embedding.reshape(len(TOKENS), -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(embedding.shape) / 127
    # half a step, plus the fp16 rounding of the block scale times up to 127 steps (127 · 2⁻¹¹ < 0.07)
    assert ((reloaded.model.embed_tokens.weight - embedding).abs() <= step * 0.57).all()
    # with that embedding, norms, rotary layout and metadata make the same model
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(reloaded.model.embed_tokens.weight)
    ids = torch.randint(0, len(TOKENS), (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_another_grid_is_requantized_within_the_types_rounding(tiny_llama, bpe_tokenizer, tmp_path):
    model = tiny_llama
    model.resize_token_embeddings(len(TOKENS))
    quantize(model, "w4a16-rtn-g64")  # group 64: not Q8_0's blocks of 32
    export, _ = _export(model, bpe_tokenizer, tmp_path, "Q8_0")
    assert export.exact == [] and len(export.requantized) == 14
    reloaded = _reload(export.path)
    for name, layer in _linears(model).items():
        ours = layer.dequantize_weight()
        blocks = ours.reshape(ours.shape[0], -1, 32).abs().amax(-1, keepdim=True)
        # Q8_0 rounds to the nearest of 255 steps of its block's max: half a step at most,
        # plus the fp16 rounding of the block scale times up to 127 steps (127 · 2⁻¹¹ < 0.07)
        bound = (blocks / 127 * 0.57).expand(-1, -1, 32).reshape(ours.shape)
        assert ((reloaded.get_submodule(name).weight - ours).abs() <= bound).all(), name


def test_float_model_and_tokenizer_round_trip(tiny_llama, bpe_tokenizer, tmp_path):
    model = tiny_llama
    model.resize_token_embeddings(len(TOKENS))
    _, path = _export(model, bpe_tokenizer, tmp_path, "F16")
    reloaded = _reload(path)
    ids = torch.randint(0, len(TOKENS), (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=2e-3)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "ab cab! {x}"
    assert tokenizer(text)["input_ids"][-len(bpe_tokenizer(text)["input_ids"]):] == bpe_tokenizer(text)["input_ids"]
    fields = GGUFReader(str(path)).fields
    eos = fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == len(TOKENS) - 1


def test_what_gguf_cannot_hold_is_refused(tiny_llama, bpe_tokenizer, tmp_path):
    with pytest.raises(ExportError, match="Q4_K"):
        export_gguf(tiny_llama, bpe_tokenizer, tmp_path / "m.gguf", "Q4_K")
    tiny_llama.config.model_type = "gpt2"
    with pytest.raises(ExportError, match="llama-architecture"):
        export_gguf(tiny_llama, bpe_tokenizer, tmp_path / "m.gguf", "Q8_0")
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_gguf_cannot_describe_fails_before_any_file_is_left(tiny_llama, tmp_path):
    backend = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ExportError, match="neither byte-level BPE nor SentencePiece"):
        export_gguf(tiny_llama, wordpiece, tmp_path / "m.gguf", "Q8_0")
    assert list(tmp_path.iterdir()) == []


def _field(path, key):
    field_ = GGUFReader(str(path)).fields.get(key)
    return None if field_ is None else field_.contents()


def test_llama_cpp_tokenizer_settings_and_name(tiny_llama, bpe_tokenizer, tmp_path):
    """llama.cpp splits text before BPE by the file's `tokenizer.ggml.pre`: a byte-level BPE
    tokenizer is GPT-2's split ("default" is a different regex); general.name is the one
    given, never the config's local folder."""
    import gguf

    model = tiny_llama
    model.resize_token_embeddings(len(TOKENS))
    model.config._name_or_path = "/somewhere/on/the/exporting/machine"
    path = tmp_path / "plain.gguf"
    export = export_gguf(model, bpe_tokenizer, path, "F16", name="tiny (w4a16-rtn-g64)")
    assert export.pre_tokenizer == "gpt-2" and _field(path, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(path, "general.name") == "tiny (w4a16-rtn-g64)"

    # a model read from a GGUF file keeps that file's tokenizer settings
    source = tmp_path / "source.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    writer.add_tokenizer_pre("smollm")
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path = tmp_path / "from-gguf.gguf"
    export = export_gguf(model, bpe_tokenizer, path, "F16", source_gguf=source)
    assert export.pre_tokenizer == "smollm"
    assert (_field(path, "tokenizer.ggml.pre"), _field(path, "tokenizer.ggml.add_bos_token")) == ("smollm", False)
    assert _field(path, "tokenizer.ggml.add_space_prefix") is False
    assert _field(path, "general.name") == "qforge model"


def test_a_llama3_style_tokenizer_is_llama_bpe(tmp_path):
    from tokenizers import Regex

    from quantcore.export.gguf_export import LLAMA3_SPLIT, _pre_tokenizer_name

    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(TOKENS)}, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(str(tmp_path))
    assert _pre_tokenizer_name(tmp_path) == "llama-bpe"
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # nothing llama.cpp names: its default, reported
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(str(tmp_path))
    assert _pre_tokenizer_name(tmp_path) is None
