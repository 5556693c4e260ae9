"""compressed-tensors export: the checkpoint format vLLM and transformers load as is.

A quantized model is written the way llm-compressor writes one, with the `compressed-tensors`
library doing the layout: each `QuantizedLinear` becomes an `nn.Linear` carrying its
dequantized weight, the compressed-tensors `QuantizationScheme` equivalent to ours and our
scales (and zero points); the library then re-derives the integer codes from those (exact:
the weight is already on the grid) and packs them (`pack-quantized` for 2..7-bit integer
weights, `int-quantized` for int8 W8A8, `float-quantized` for fp8, as it infers), and
`config.json` gets the `quantization_config` section the loaders read.

Conventions that differ from ours and are translated here:
* compressed-tensors' integer grid is always signed (-2^(b-1) .. 2^(b-1)-1); our asymmetric
  grid is unsigned (0 .. 2^b-1). Both dequantize as (q - Z)·S, so an asymmetric zero point
  moves down by 2^(b-1) together with the codes.
* per-channel and per-group scales are 2-D (rows, groups); ours carry a trailing 1.

What the format cannot hold is refused (`ExportError`), never approximated: SVDQuant's
low-rank branch, and activation schemes it has no strategy for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantcore.export.artifact import quantized_layers
from quantcore.modules.low_rank import LowRankQuantizedLinear
from quantcore.modules.quantized_linear import QuantizedLinear
from quantcore.schemes import Granularity, QuantScheme
from quantcore.targets import set_module

FORMAT = "compressed-tensors"


class ExportError(ValueError):
    """The model holds something the requested format cannot represent."""


def quantization_args(scheme: QuantScheme, is_weight: bool) -> Any:
    """Our scheme as compressed-tensors' `QuantizationArgs`."""
    from compressed_tensors.quantization import QuantizationArgs

    strategy = {
        Granularity.TENSOR: "tensor",
        Granularity.CHANNEL: "channel",
        Granularity.GROUP: "group",
        Granularity.TOKEN: "token",
    }[scheme.granularity]
    if not is_weight:
        if scheme.granularity == Granularity.GROUP:
            raise ExportError("compressed-tensors has no per-group activation strategy for integer activations")
        if scheme.granularity == Granularity.CHANNEL:
            raise ExportError("per-channel activation scales cannot be exported to compressed-tensors")
    return QuantizationArgs(
        num_bits=scheme.bits,
        type="float" if scheme.is_fp8 else "int",
        symmetric=scheme.symmetric,
        strategy=strategy,
        group_size=scheme.group_size,
        dynamic=scheme.dynamic if not is_weight else False,
        observer=None,
    )


def _ct_schemes(layers: dict[str, QuantizedLinear]) -> dict[str, Any]:
    """compressed-tensors' scheme of each layer: one shared `QuantizationScheme` per distinct
    (weights, activations) pair, targeting "Linear" when the whole model shares one (the
    loaders then read unquantized Linears such as lm_head from the `ignore` list) or the
    layers' names when schemes are mixed."""
    from compressed_tensors.quantization import QuantizationScheme

    groups: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        if layer.weight_scheme.type.value == "fp8_e5m2":
            raise ExportError(f"{name}: compressed-tensors stores fp8 weights as e4m3 only")
        act = layer.activation_scheme
        key = (layer.weight_scheme.model_dump_json(exclude={"observer"}), act.model_dump_json(exclude={"observer"}) if act else None)
        groups.setdefault(key, []).append(name)
    schemes: dict[str, Any] = {}
    for names in groups.values():
        first = layers[names[0]]
        act = first.activation_scheme
        scheme = QuantizationScheme(
            targets=["Linear"] if len(groups) == 1 else names,
            weights=quantization_args(first.weight_scheme, is_weight=True),
            input_activations=quantization_args(act, is_weight=False) if act is not None else None,
        )
        schemes.update({name: scheme for name in names})
    return schemes


def _as_ct_linear(layer: QuantizedLinear, scheme: Any, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear holding `layer`'s dequantized weight and its qparams in compressed-tensors'
    parameter names and conventions, not yet compressed."""
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(layer.dequantize_weight(dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(dtype).clone(), requires_grad=False)
    initialize_module_for_quantization(linear, scheme, force_zero_point=False)

    scheme = layer.weight_scheme
    scale = layer.scale.detach().to(dtype).reshape(linear.weight_scale.shape)
    linear.weight_scale.data.copy_(scale)
    if not scheme.symmetric:
        shift = 2 ** (scheme.bits - 1)  # unsigned grid -> compressed-tensors' signed one
        zero = layer.zero_point.to(torch.int16) - shift
        linear.weight_zero_point.data.copy_(zero.reshape(linear.weight_zero_point.shape).to(linear.weight_zero_point.dtype))
    if layer.input_scale is not None:  # static per-tensor activations
        linear.input_scale.data.copy_(layer.input_scale.to(dtype).reshape(linear.input_scale.shape))
        if layer.input_zero_point is not None:
            shift = 2 ** (layer.activation_scheme.bits - 1)
            zero = layer.input_zero_point.to(torch.int16) - shift
            linear.input_zero_point.data.copy_(zero.reshape(linear.input_zero_point.shape).to(linear.input_zero_point.dtype))
    return linear


def export_compressed_tensors(model: nn.Module, tokenizer: Any, folder: Path) -> dict:
    """Write `model` (its QuantizedLinear layers compressed, everything else as it is) to
    `folder` as a compressed-tensors checkpoint: safetensors weights, config.json with its
    `quantization_config`, the tokenizer. The model is left as it was. Returns the
    `quantization_config` written."""
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus

    layers = quantized_layers(model)
    low_rank = [name for name, m in layers.items() if isinstance(m, LowRankQuantizedLinear)]
    if low_rank:
        raise ExportError(
            f"compressed-tensors cannot hold SVDQuant's 16-bit low-rank branch ({low_rank[0]}, ...): "
            "export this model in the qforge format"
        )
    if not layers:
        raise ExportError("the model has no quantized layers to export")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    schemes = _ct_schemes(layers)

    folder.mkdir(parents=True, exist_ok=True)
    originals: dict[str, nn.Module] = {}
    try:
        # One layer at a time: each dequantized weight is packed before the next is made.
        for name, layer in layers.items():
            linear = _as_ct_linear(layer, schemes[name], dtype)
            originals[name] = layer
            set_module(model, name, linear)
            compress_module(linear)
            linear.quantization_status = QuantizationStatus.COMPRESSED
        compressor = ModelCompressor.from_pretrained_model(model)
        compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
        model.save_pretrained(str(folder), safe_serialization=True)
        compressor.update_config(str(folder))
    finally:
        for name, layer in originals.items():
            set_module(model, name, layer)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return json.loads((folder / "config.json").read_text())["quantization_config"]
