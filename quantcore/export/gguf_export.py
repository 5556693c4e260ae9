"""GGUF export for llama.cpp (and transformers' `gguf_file=`): llama-architecture models.

Written with the `gguf` package: its writer, its tensor-name map, its tokenizer readers
(`BpeVocab` / `LlamaHfVocab` / `SentencePieceVocab`, `SpecialVocab`) and its quantizers.

Tensor types. A file has one main type (`Q8_0`, `Q4_0` or `F16`); for each quantized linear:
* exact: when the layer's own grid *is* that type's grid it is written code for code, no
  rounding at all. Q8_0 is symmetric int8 in blocks of 32 with an fp16 scale, Q4_0 symmetric
  int4 in blocks of 32 with an fp16 scale (its stored nibble is the code + 8): a recipe with
  `symmetric: true, granularity: group, group_size: 32` at 8 or 4 bits.
* requantized: otherwise (group 64, per channel, zero points) the layer's dequantized weight
  is quantized again by the gguf package's quantizer, which adds that type's rounding. The
  report lists which layers were requantized.
Float matrices (the embedding, which a tied model also uses as its output, and layers the
recipe ignored) are written Q8_0 in a Q4_0 file (llama.cpp keeps its output matrix at a
higher precision for the same reason) and at the main type otherwise; norms stay F32.

llama.cpp computes rotary embeddings on interleaved pairs where transformers' Llama splits
each head in halves, so attn_q / attn_k rows are permuted as llama.cpp's converter does
(transformers' GGUF loader undoes it).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantcore.export.compressed_tensors import ExportError
from quantcore.modules.low_rank import LowRankQuantizedLinear
from quantcore.modules.quantized_linear import QuantizedLinear
from quantcore.schemes import Granularity

GGUF_TYPES = ("Q8_0", "Q4_0", "F16")
BLOCK = 32  # Q8_0 and Q4_0 block size


@dataclass
class GGUFExport:
    path: Path
    file_type: str
    exact: list[str] = field(default_factory=list)  # layers written code for code
    requantized: list[str] = field(default_factory=list)  # layers the gguf quantizer rounded again
    pre_tokenizer: str = "default"  # llama.cpp's name of how text is split before BPE

    def as_dict(self) -> dict:
        return {"file": self.path.name, "type": self.file_type, "exact_layers": len(self.exact),
                "requantized_layers": self.requantized, "pre_tokenizer": self.pre_tokenizer}


def export_gguf(
    model: nn.Module, tokenizer: Any, path: Path, file_type: str = "Q8_0", name: str | None = None,
    source_gguf: Path | None = None,
) -> GGUFExport:
    """Write a llama-architecture `model` (quantized or not) and its tokenizer to one GGUF file.
    `name` goes into general.name; `source_gguf`, the GGUF file the model was read from, if
    any, gives the tokenizer settings llama.cpp needs that a transformers tokenizer does not
    keep (its pre-tokenizer, whether to add BOS)."""
    import gguf

    if file_type not in GGUF_TYPES:
        raise ExportError(f"GGUF type '{file_type}' is not supported; choose one of {', '.join(GGUF_TYPES)} "
                          "(the gguf package has no Q4_K quantizer)")
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise ExportError(f"GGUF export supports llama-architecture models, not '{getattr(config, 'model_type', type(model).__name__)}'")
    if any(isinstance(m, LowRankQuantizedLinear) for m in model.modules()):
        raise ExportError("GGUF cannot hold SVDQuant's low-rank branch: export this model in the qforge format")
    if tokenizer is None:
        raise ExportError("GGUF export needs the model's tokenizer")
    main_type = gguf.GGMLQuantizationType[file_type]
    float_matrix_type = gguf.GGMLQuantizationType.Q8_0 if file_type == "Q4_0" else main_type

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        result = _write(model, tokenizer, partial, path, file_type, main_type, float_matrix_type, name, source_gguf)
    except BaseException:
        partial.unlink(missing_ok=True)  # never leave half a file that looks like a model
        raise
    partial.replace(path)
    return result


def _write(
    model: nn.Module, tokenizer: Any, partial: Path, path: Path, file_type: str, main_type, float_matrix_type,
    name: str | None, source_gguf: Path | None,
) -> GGUFExport:
    import gguf

    config = model.config
    # tensors are spooled to a temporary file past 256 MB instead of all held in memory
    writer = gguf.GGUFWriter(str(partial), "llama", use_temp_file=True)
    _write_metadata(writer, model, file_type, name)
    result = GGUFExport(path, file_type)
    result.pre_tokenizer = _write_tokenizer(writer, tokenizer, config.vocab_size, _source_tokenizer_settings(source_gguf))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    written: set[int] = set()
    for module_name, module in model.named_modules():
        tensors = _module_tensors(module_name, module)
        for hf_name, tensor, layer in tensors:
            if id(tensor) in written:  # tied: the output matrix is the embedding
                continue
            written.add(id(tensor))
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ExportError(f"no GGUF name for tensor '{hf_name}'")
            # every tensor of q_proj / k_proj, a bias too, holds one row per rotary channel
            permute = {"q_proj": heads, "k_proj": kv_heads}.get(module_name.rpartition(".")[2])
            if layer is not None and isinstance(layer, QuantizedLinear):
                data, qtype, exact = _quantized_layer(layer, main_type, permute, gguf)
                (result.exact if exact else result.requantized).append(module_name)
            elif tensor.dim() == 1:
                vector = tensor.detach().float()
                data, qtype = (_permute_rotary_rows(vector, permute) if permute else vector).numpy(), gguf.GGMLQuantizationType.F32
            else:
                weight = tensor.detach().float()
                if permute:
                    weight = _permute_rotary_rows(weight, permute)
                data, qtype = _encode(weight.numpy(), float_matrix_type, gguf)
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return result


def _module_tensors(name: str, module: nn.Module) -> list[tuple[str, torch.Tensor, nn.Module | None]]:
    """(HF tensor name, tensor, the linear layer it belongs to or None) for the tensors that
    `module` itself owns."""
    if isinstance(module, QuantizedLinear):
        out = [(f"{name}.weight", module.qweight, module)]
        return out + ([(f"{name}.bias", module.bias, None)] if module.bias is not None else [])
    if isinstance(module, nn.Linear):
        out = [(f"{name}.weight", module.weight, module)]
        return out + ([(f"{name}.bias", module.bias, None)] if module.bias is not None else [])
    if isinstance(module, nn.Embedding):
        return [(f"{name}.weight", module.weight, None)]
    own = list(module.named_parameters(recurse=False))
    return [(f"{name}.{p}", t, None) for p, t in own]


def _quantized_layer(layer: QuantizedLinear, main_type, heads: int | None, gguf) -> tuple[np.ndarray, Any, bool]:
    """The layer's weight in `main_type`: its own codes when its grid is that type's, else its
    dequantized weight quantized by the gguf package."""
    scheme = layer.weight_scheme
    bits = {gguf.GGMLQuantizationType.Q8_0: 8, gguf.GGMLQuantizationType.Q4_0: 4}.get(main_type)
    same_grid = (
        bits is not None and not scheme.is_fp8 and scheme.bits == bits and scheme.symmetric
        and scheme.granularity == Granularity.GROUP and scheme.group_size == BLOCK
        and layer.scale_dtype == torch.float16
    )
    if same_grid:
        codes = layer.weight_codes().to(torch.int16).reshape(layer.out_features, -1)
        scales = layer.scale.reshape(layer.out_features, -1)
        if heads:
            codes, scales = _permute_rotary_rows(codes, heads), _permute_rotary_rows(scales, heads)
        return _pack_blocks(codes.numpy(), scales.to(torch.float16).numpy(), bits), main_type, True
    weight = layer.dequantize_weight()
    if heads:
        weight = _permute_rotary_rows(weight, heads)
    data, qtype = _encode(weight.numpy(), main_type, gguf)
    return data, qtype, False


def _pack_blocks(codes: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Q8_0 / Q4_0 blocks from codes (rows, columns) and one fp16 scale per 32 columns, as
    ggml lays them out: each block is its scale (2 bytes) then 32 int8 codes (Q8_0), or 16
    bytes whose low nibbles are elements 0..15 and high nibbles 16..31, each code + 8 (Q4_0)."""
    rows, columns = codes.shape
    blocks = codes.reshape(rows, columns // BLOCK, BLOCK)
    d = scales.reshape(rows, columns // BLOCK, 1).astype(np.float16).view(np.uint8)  # (rows, blocks, 2)
    if bits == 8:
        q = blocks.astype(np.int8).view(np.uint8)
    else:
        nibbles = (blocks + 8).astype(np.uint8)
        q = nibbles[..., : BLOCK // 2] | (nibbles[..., BLOCK // 2 :] << np.uint8(4))
    return np.concatenate([d, q], axis=-1).reshape(rows, -1)


def _encode(weight: np.ndarray, qtype, gguf) -> tuple[np.ndarray, Any]:
    if qtype == gguf.GGMLQuantizationType.F16:
        return weight.astype(np.float16), qtype
    if weight.shape[-1] % BLOCK:
        return weight.astype(np.float16), gguf.GGMLQuantizationType.F16  # ggml blocks need whole rows
    return gguf.quants.quantize(weight.astype(np.float32), qtype), qtype


def _permute_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' halves (0..d/2-1 | d/2..d-1) to llama.cpp's
    interleaved pairs (0, d/2, 1, d/2+1, ...)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _write_metadata(writer, model: nn.Module, file_type: str, name: str | None) -> None:
    import gguf

    config = model.config
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise ExportError(f"rope scaling '{rope_type}' is not written by this GGUF export")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta if theta is not None else getattr(config, "rope_theta", 10000.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # never the config's _name_or_path: that is a folder on the machine that exported it
    writer.add_name(name or "qforge model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, "MOSTLY_" + file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# llama.cpp's names for pre-tokenizers, by the transformers pre_tokenizer that does the same
# splitting: GPT-2's byte-level regex alone, or Llama 3's split regex before a byte-level map.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _pre_tokenizer_name(folder: Path) -> str | None:
    """llama.cpp's pre-tokenizer for a saved byte-level BPE tokenizer, or None when unknown."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        if (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
            return "llama-bpe"
    return None


def _source_tokenizer_settings(source_gguf: Path | None) -> dict[str, Any]:
    """tokenizer.ggml.pre / add_bos_token / add_space_prefix of the GGUF file a model came from."""
    if source_gguf is None:
        return {}
    import gguf

    fields = gguf.GGUFReader(str(source_gguf)).fields
    settings = {}
    for key in ("pre", "add_bos_token", "add_space_prefix"):
        field_ = fields.get(f"tokenizer.ggml.{key}")
        if field_ is not None:
            settings[key] = field_.contents()
    return settings


def _write_tokenizer(writer, tokenizer: Any, vocab_size: int, source: dict[str, Any]) -> str:
    """Tokens, types, merges and special ids through the gguf package's readers of a saved
    tokenizer folder; returns the pre-tokenizer name written."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(str(folder))
        vocab = None
        for reader in (BpeVocab, LlamaHfVocab, SentencePieceVocab):
            try:
                vocab = reader(folder)
                break
            except (FileNotFoundError, ValueError, TypeError, KeyError):
                continue
        if vocab is None:
            raise ExportError("the tokenizer is neither byte-level BPE nor SentencePiece: GGUF export cannot write it")
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        special = _special_tokens(folder)
        for i, text in enumerate(tokens):  # special tokens inside the base vocabulary are control tokens too
            if (text.decode("utf-8", "replace") if isinstance(text, bytes) else text) in special:
                types[i] = gguf.TokenType.CONTROL
        for i in range(len(tokens), vocab_size):  # the embedding may have more rows than the tokenizer
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        # how llama.cpp splits text before BPE: the source GGUF's, else recognized from the
        # tokenizer, else llama.cpp's default (which splits differently: the report says so)
        pre = source.get("pre") or (_pre_tokenizer_name(folder) if vocab.tokenizer_model == "gpt2" else None) or "default"
        writer.add_tokenizer_pre(pre)
        add_bos = source.get("add_bos_token", getattr(tokenizer, "add_bos_token", None))
        if add_bos is not None:
            writer.add_add_bos_token(bool(add_bos))
        if "add_space_prefix" in source:
            writer.add_add_space_prefix(bool(source["add_space_prefix"]))
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special_vocab = SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        if add_bos is not None:
            special_vocab.add_special_token.pop("bos", None)  # written above: one key, one value
        special_vocab.add_to_gguf(writer, quiet=True)
    return pre


def _special_tokens(folder: Path) -> set[str]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return set()
    added = json.loads(path.read_text()).get("added_tokens") or []
    return {t["content"] for t in added if t.get("special")}
