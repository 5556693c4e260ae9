"""compressed-tensors export, checked by the readers users have: transformers'
`from_pretrained` (through the compressed-tensors library's decompression) and the library's
own decompressor, never by our loader."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from quantcore import quantize
from quantcore.export.compressed_tensors import ExportError, export_compressed_tensors
from quantcore.modules.quantized_linear import QuantizedLinear

pytest.importorskip("compressed_tensors")


def _export(tmp_path, preset, model):
    quantize(model, preset)
    folder = tmp_path / preset
    config = export_compressed_tensors(model, None, folder)
    return model, folder, config


def _quantized(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("preset, bits", [("w4a16-rtn-g64", 4), ("w3a16-rtn-g64", 3)])
def test_weight_only_reloads_in_transformers_with_the_same_logits(tmp_path, preset, bits, tiny_llama):
    model, folder, config = _export(tmp_path, preset, tiny_llama)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        expect = model(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        got = reloaded(ids).logits
    # the same weights on the same grid, dequantized by another library: the same model
    assert torch.equal(got, expect)
    group = config["config_groups"]["group_0"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    assert group["weights"] == {**group["weights"], "num_bits": bits, "group_size": 64, "strategy": "group", "symmetric": True}
    assert group["targets"] == ["Linear"] and config["ignore"] == ["lm_head"]
    # bits per weight as stored: packed into int32, one scale per 64 weights
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        assert packed.dtype == torch.int32
        assert packed.numel() * 32 == 64 * 128 * bits
        assert "model.layers.0.mlp.down_proj.weight" not in f.keys()


def test_export_leaves_the_model_as_it_was(tmp_path, tiny_llama):
    model = tiny_llama
    quantize(model, "w4a16-rtn-g64")
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    export_compressed_tensors(model, None, tmp_path / "ct")
    assert len(_quantized(model)) == 14
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_asymmetric_zero_points_decompress_to_our_weights(tmp_path, tiny_llama):
    """compressed-tensors' grid is signed: our unsigned codes and zero points move down by 8
    together. (transformers 5.24 with compressed-tensors 0.20 cannot reload asymmetric
    pack-quantized checkpoints at all: it expects the zero points unpacked; vLLM reads them
    packed, as the library writes them. So the check here is the library's own decompressor.)"""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    model, folder, config = _export(tmp_path, "w4a16-rtn-g64-asym", tiny_llama)
    group = config["config_groups"]["group_0"]
    assert group["weights"]["symmetric"] is False
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for name, layer in _quantized(model).items():
            state = {k: f.get_tensor(f"{name}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")}
            weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
            assert torch.equal(weight.float(), layer.dequantize_weight()), name


def test_w8a8_declares_token_activations_and_keeps_the_weights(tmp_path, tiny_llama):
    model, folder, config = _export(tmp_path, "w8a8-rtn", tiny_llama)
    group = config["config_groups"]["group_0"]
    assert config["format"] == "int-quantized"
    assert group["input_activations"] == {**group["input_activations"], "num_bits": 8, "strategy": "token", "dynamic": True}
    assert group["weights"]["strategy"] == "channel"
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():  # the first forward decompresses the weights
        ours, theirs = model(ids).logits, reloaded(ids).logits
    for name, layer in _quantized(model).items():
        assert torch.equal(reloaded.get_submodule(name).weight, layer.dequantize_weight()), name
    # activations are re-quantized per token at run time by each runtime on its own grid
    # (compressed-tensors divides by 127.5, we by 127): close, not equal
    assert (ours - theirs).abs().max() < 0.05 * ours.abs().max()


def test_svdquant_low_rank_branch_is_refused(tmp_path, tiny_llama):
    from quantcore.modules.low_rank import LowRankQuantizedLinear
    from quantcore.targets import set_module

    model = tiny_llama
    quantize(model, "w4a16-rtn-g64")
    layer = model.model.layers[0].mlp.down_proj
    set_module(model, "model.layers.0.mlp.down_proj", LowRankQuantizedLinear(layer, 4, torch.float16))
    with pytest.raises(ExportError, match="low-rank"):
        export_compressed_tensors(model, None, tmp_path / "ct")


def test_config_json_is_the_models_own_plus_quantization_config(tmp_path, tiny_llama):
    model, folder, _ = _export(tmp_path, "w4a16-rtn-g64", tiny_llama)
    written = json.loads((folder / "config.json").read_text())
    assert written["hidden_size"] == model.config.hidden_size
    assert written["quantization_config"]["quantization_status"] == "compressed"


def test_fp8_weights_reload_in_transformers(tmp_path, tiny_llama):
    model, folder, config = _export(tmp_path, "fp8-rtn", tiny_llama)
    # weight-only fp8 is the library's "naive-quantized" layout: the weight stored as e4m3
    assert config["format"] == "naive-quantized"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
    assert config["config_groups"]["group_0"]["weights"]["type"] == "float"
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():  # the first forward decompresses the weights
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    for name, layer in _quantized(model).items():
        assert torch.equal(reloaded.get_submodule(name).weight.float(), layer.dequantize_weight()), name


def test_fp8_dynamic_activations_reload_in_transformers(tmp_path, tiny_llama):
    """fp8-w8a8 is compressed-tensors' FP8_DYNAMIC scheme: e4m3 weights per channel, e4m3
    activations quantized per token at run time, which the library applies itself on reload."""
    model, folder, config = _export(tmp_path, "fp8-w8a8", tiny_llama)
    group = config["config_groups"]["group_0"]
    assert config["format"] == "float-quantized"
    assert group["weights"]["type"] == "float" and group["weights"]["strategy"] == "channel"
    act = group["input_activations"]
    assert (act["type"], act["strategy"], act["dynamic"], act["num_bits"]) == ("float", "token", True, 8)
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        got, expect = reloaded(ids).logits, model(ids).logits
    # the same e4m3 codes of the same per-token scales; the library computes S = max|x| / 448
    # in its own order of operations, so a code may land one step away: compare as a whole
    assert ((got - expect).norm() / expect.norm()).item() < 1e-3
