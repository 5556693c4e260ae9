"""GPTQ and AWQ checkpoint layouts (qweight / qzeros / scales / g_idx), for the loaders built
on them (AutoGPTQ / GPTQModel, optimum, AutoAWQ, and the serving engines that read the same
tensors).

Both store unsigned b-bit codes u (0 .. 2^b-1) with a zero point per group and dequantize as
    W[o, i] = scales[g, o] · (u[i, o] - zero[g, o]),   g = g_idx[i]
Our symmetric grid is signed (q = -2^(b-1) .. 2^(b-1)-1, Z = 0): it is u = q + 2^(b-1) with
zero 2^(b-1). The layouts differ in how they pack 32-bit words:

GPTQ ("gptq" checkpoint format v1 for symmetric weights, "gptq_v2" with zero points):
    qweight (in · b / 32, out) int32   word r of column o holds inputs r·(32/b) + j at bit b·j
    qzeros  (groups, out · b / 32) int32   packed along the outputs the same way; v1 stores
                                       zero − 1 (the format's historical offset, which cannot
                                       hold a zero point of 0: hence v2, without it, whenever
                                       the weights have zero points)
    scales  (groups, out) fp16
    g_idx   (in,) int32              the group of each input (i // group_size: our groups are
                                     always in the original column order, act-order or not)
AWQ ("gemm" version):
    qweight (in, out / 8) int32      word c holds outputs 8c + ORDER[j] at bit 4j,
                                     ORDER = 0, 2, 4, 6, 1, 3, 5, 7
    qzeros  (groups, out / 8) int32   zeros packed the same way (no offset)
    scales  (groups, out) fp16

GPTQ is written for 2, 4 and 8 bits (32 is a multiple of them; 3-bit words straddle), AWQ
for 4 bits, both for group-wise or per-channel integer weights without activation
quantization. What does not fit is refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from quantcore.export.artifact import quantized_layers
from quantcore.export.compressed_tensors import ExportError
from quantcore.modules.low_rank import LowRankQuantizedLinear
from quantcore.modules.quantized_linear import QuantizedLinear
from quantcore.schemes import Granularity

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def export_packed_checkpoint(model: nn.Module, tokenizer: Any, folder: Path, layout: str) -> dict:
    """Write `model` to `folder` in the GPTQ or AWQ layout (`layout` "gptq" or "awq"):
    model.safetensors, config.json with its quantization_config, the tokenizer. Returns
    that quantization_config."""
    if layout not in ("gptq", "awq"):
        raise ExportError(f"unknown packed layout '{layout}': gptq or awq")
    layers = quantized_layers(model)
    if not layers:
        raise ExportError("the model has no quantized layers to export")
    schemes = set()
    for name, layer in layers.items():
        _check(name, layer, layout)
        schemes.add((layer.weight_scheme.bits, _group_size(layer)))
    if len(schemes) != 1:
        raise ExportError(f"the {layout} layout has one bit width and group size per model; this one mixes {sorted(schemes)}")
    bits, group_size = schemes.pop()
    symmetric = _symmetric(layers)

    tensors: dict[str, torch.Tensor] = {}
    prefixes = tuple(f"{name}." for name in layers)
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key.startswith(prefixes) or id(tensor) in seen:
            continue  # quantized layers are written below; a tied tensor once
        seen.add(id(tensor))
        tensors[key] = tensor.detach().contiguous().clone()
    for name, layer in layers.items():
        packed = pack_gptq(layer, zero_offset=1 if symmetric else 0) if layout == "gptq" else pack_awq(layer)
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().to(torch.float16).contiguous()

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if layout == "gptq":
        config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": symmetric,
                  "checkpoint_format": "gptq" if symmetric else "gptq_v2"}
    else:
        config = {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm"}
    ignored = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    if ignored:
        config["modules_to_not_convert"] = ignored
    model_config = model.config.to_dict()
    model_config["quantization_config"] = config
    (folder / "config.json").write_text(json.dumps(model_config, indent=2, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return config


def _check(name: str, layer: nn.Module, layout: str) -> None:
    if isinstance(layer, LowRankQuantizedLinear):
        raise ExportError(f"{name}: the {layout} layout has no low-rank branch (SVDQuant): use the qforge format")
    scheme = layer.weight_scheme
    if scheme.is_fp8:
        raise ExportError(f"{name}: the {layout} layout holds integer weights, not {scheme.type.value}")
    if layer.activation_scheme is not None:
        raise ExportError(f"{name}: the {layout} layout is weight-only; this layer quantizes its activations too")
    if scheme.granularity == Granularity.TENSOR:
        raise ExportError(f"{name}: the {layout} layout has per-group or per-channel scales, not one per tensor")
    allowed = (2, 4, 8) if layout == "gptq" else (4,)
    if scheme.bits not in allowed:
        raise ExportError(f"{name}: the {layout} layout packs {', '.join(map(str, allowed))}-bit weights, not {scheme.bits}-bit")
    if layer.out_features % (32 // scheme.bits):
        raise ExportError(f"{name}: {layer.out_features} outputs do not fill whole 32-bit words")


def _group_size(layer: QuantizedLinear) -> int:
    scheme = layer.weight_scheme
    return scheme.group_size if scheme.granularity == Granularity.GROUP else -1  # -1: per channel, as the formats write it


def _symmetric(layers: dict[str, QuantizedLinear]) -> bool:
    return all(layer.weight_scheme.symmetric for layer in layers.values())


def unsigned_codes_and_zeros(layer: QuantizedLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes u (in, out), zeros (groups, out) on the unsigned grid, scales (groups, out) fp16."""
    scheme = layer.weight_scheme
    codes = layer.weight_codes().to(torch.int32)  # (out, in), signed when symmetric
    groups = layer.scale.reshape(layer.out_features, -1).shape[1]
    scales = layer.scale.reshape(layer.out_features, groups).to(torch.float16)
    if scheme.symmetric:
        shift = 2 ** (scheme.bits - 1)
        codes = codes + shift
        zeros = torch.full((layer.out_features, groups), shift, dtype=torch.int32)
    else:
        zeros = layer.zero_point.reshape(layer.out_features, groups).to(torch.int32)
    return codes.T.contiguous().numpy(), zeros.T.contiguous().numpy(), scales.T.contiguous().numpy()


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack (rows, cols) unsigned values along rows: word r holds rows r·k + j at bit bits·j."""
    per_word = 32 // bits
    masked = values.astype(np.int64) & (2**bits - 1)  # a negative value must not spill into its neighbours
    grouped = masked.astype(np.uint32).reshape(values.shape[0] // per_word, per_word, values.shape[1])
    words = np.zeros((grouped.shape[0], values.shape[1]), dtype=np.uint32)
    for j in range(per_word):
        words |= grouped[:, j, :] << np.uint32(bits * j)
    return words.view(np.int32)


def pack_gptq(layer: QuantizedLinear, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """`zero_offset` 1: checkpoint format v1 (zeros stored minus one); 0: v2."""
    bits = layer.weight_scheme.bits
    codes, zeros, scales = unsigned_codes_and_zeros(layer)
    if codes.shape[0] % (32 // bits):
        raise ExportError(f"{layer.in_features} inputs do not fill whole 32-bit words at {bits} bits")
    group = _group_size(layer)
    g_idx = np.arange(layer.in_features, dtype=np.int32) // (group if group > 0 else layer.in_features)
    qzeros = _pack_rows((zeros - zero_offset).T, bits).T  # packed along the outputs
    return {
        "qweight": torch.from_numpy(_pack_rows(codes, bits)),
        "qzeros": torch.from_numpy(np.ascontiguousarray(qzeros)),
        "scales": torch.from_numpy(scales),
        "g_idx": torch.from_numpy(g_idx),
    }


def _pack_awq_columns(values: np.ndarray) -> np.ndarray:
    """(rows, cols) 4-bit values -> (rows, cols / 8) int32, AutoAWQ's interleaved order."""
    grouped = values.astype(np.uint32).reshape(values.shape[0], values.shape[1] // 8, 8)
    words = np.zeros(grouped.shape[:2], dtype=np.uint32)
    for j, column in enumerate(AWQ_ORDER):
        words |= grouped[:, :, column] << np.uint32(4 * j)
    return words.view(np.int32)


def pack_awq(layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    codes, zeros, scales = unsigned_codes_and_zeros(layer)
    return {
        "qweight": torch.from_numpy(_pack_awq_columns(codes)),
        "qzeros": torch.from_numpy(_pack_awq_columns(zeros)),
        "scales": torch.from_numpy(scales),
    }
