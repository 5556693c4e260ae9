"""GPTQ and AWQ checkpoint layouts, unpacked by naive readers written from the formats'
descriptions (one weight at a time, Python integers), never by the packing code."""

import json

import pytest
import torch
from safetensors import safe_open

from quantcore import quantize
from quantcore.export.compressed_tensors import ExportError
from quantcore.export.packed_checkpoints import export_packed_checkpoint
from quantcore.modules.quantized_linear import QuantizedLinear

AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ's unpacking: column k of a word is nibble REVERSE[k]


def naive_gptq_weight(qweight, qzeros, scales, g_idx, bits, zero_offset):
    per, mask = 32 // bits, 2**bits - 1
    out, inputs = scales.shape[1], g_idx.numel()
    weight = torch.empty(out, inputs)
    for i in range(inputs):
        g = int(g_idx[i])
        for o in range(out):
            u = (int(qweight[i // per, o]) & 0xFFFFFFFF) >> (bits * (i % per)) & mask
            z = ((int(qzeros[g, o // per]) & 0xFFFFFFFF) >> (bits * (o % per)) & mask) + zero_offset
            weight[o, i] = float(scales[g, o]) * (u - z)
    return weight


def naive_awq_weight(qweight, qzeros, scales, group_size):
    out, inputs = scales.shape[1], qweight.shape[0]
    weight = torch.empty(out, inputs)
    for i in range(inputs):
        g = i // group_size
        for o in range(out):
            shift = 4 * AWQ_REVERSE_ORDER[o % 8]
            u = (int(qweight[i, o // 8]) & 0xFFFFFFFF) >> shift & 15
            z = (int(qzeros[g, o // 8]) & 0xFFFFFFFF) >> shift & 15
            weight[o, i] = float(scales[g, o]) * (u - z)
    return weight


def _layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _tensors(folder, name, keys):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return [f.get_tensor(f"{name}.{k}") for k in keys]


@pytest.mark.parametrize("preset, offset, checkpoint_format", [
    ("w4a16-rtn-g64", 1, "gptq"), ("w4a16-rtn-g64-asym", 0, "gptq_v2"), ("w8a16-rtn", 1, "gptq")])
def test_gptq_layout_unpacks_to_our_weights(tiny_llama, tmp_path, preset, offset, checkpoint_format):
    quantize(tiny_llama, preset)
    config = export_packed_checkpoint(tiny_llama, None, tmp_path, "gptq")
    assert config["checkpoint_format"] == checkpoint_format
    bits = config["bits"]
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        layer = _layers(tiny_llama)[name]
        qweight, qzeros, scales, g_idx = _tensors(tmp_path, name, ("qweight", "qzeros", "scales", "g_idx"))
        assert qweight.dtype == torch.int32 and scales.dtype == torch.float16
        assert torch.equal(naive_gptq_weight(qweight, qzeros, scales, g_idx, bits, offset), layer.dequantize_weight()), name
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["quantization_config"]["quant_method"] == "gptq" and written["hidden_size"] == 64


def test_symmetric_4bit_gptq_zeros_are_the_formats_constant(tiny_llama, tmp_path):
    """Every symmetric 4-bit GPTQ checkpoint stores its zeros as 8 − 1 = 7 in each nibble."""
    quantize(tiny_llama, "w4a16-rtn-g64")
    export_packed_checkpoint(tiny_llama, None, tmp_path, "gptq")
    (qzeros,) = _tensors(tmp_path, "model.layers.0.mlp.up_proj", ("qzeros",))
    assert (qzeros == 0x77777777).all()


def test_awq_layout_unpacks_to_our_weights(tiny_llama, tmp_path):
    quantize(tiny_llama, "w4a16-rtn-g64-asym")
    config = export_packed_checkpoint(tiny_llama, None, tmp_path, "awq")
    assert config == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
                      "modules_to_not_convert": ["lm_head"]}
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.gate_proj"):
        qweight, qzeros, scales = _tensors(tmp_path, name, ("qweight", "qzeros", "scales"))
        assert torch.equal(naive_awq_weight(qweight, qzeros, scales, 64), _layers(tiny_llama)[name].dequantize_weight()), name


def test_what_the_layouts_cannot_hold_is_refused(tiny_llama, tmp_path):
    quantize(tiny_llama, "w3a16-rtn-g64")
    with pytest.raises(ExportError, match="not 3-bit"):
        export_packed_checkpoint(tiny_llama, None, tmp_path / "gptq", "gptq")
    with pytest.raises(ExportError, match="not 3-bit"):
        export_packed_checkpoint(tiny_llama, None, tmp_path / "awq", "awq")


def test_activation_quantization_is_refused(tiny_llama, tmp_path):
    quantize(tiny_llama, "w8a8-rtn")
    with pytest.raises(ExportError, match="weight-only"):
        export_packed_checkpoint(tiny_llama, None, tmp_path, "gptq")
