"""Static activation scales: one S (and Z) per layer input, calibrated ahead of time and
stored in the layer, checked against the grid written out by hand and against the inputs
captured from the float model."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantcore import quantize
from quantcore.export import load_quantized, save_artifact, write_manifest
from quantcore.modules.quantized_linear import QuantizedLinear
from quantcore.qparams import QParams
from quantcore.recipe import Recipe
from quantcore.schemes import QuantScheme

W8 = {"type": "int", "bits": 8, "granularity": "channel"}
A8_STATIC = {"type": "int", "bits": 8, "granularity": "tensor", "dynamic": False}
A8_TOKEN = {"type": "int", "bits": 8, "granularity": "token", "dynamic": True}


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # outlier input channels, as in real LLM activations
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] = torch.tensor([20.0, -30.0])
    return model


def samples(n=6, length=16):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (1, length), generator=g) for _ in range(n)]


def logits(model, data):
    with torch.no_grad():
        return torch.cat([model(x).logits for x in data])


@pytest.mark.parametrize("symmetric", [True, False])
def test_layer_quantizes_its_input_on_the_stored_grid(symmetric):
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    act = QuantScheme(bits=8, granularity="tensor", symmetric=symmetric)
    S, Z = 0.01, (0 if symmetric else 100)
    qp = QParams(scale=torch.tensor([S]), zero_point=torch.tensor([float(Z)]), scheme=act)
    layer = QuantizedLinear.from_float(linear, QuantScheme(**W8), act, input_qparams=qp)
    x = torch.randn(5, 16)  # beyond ±1.27 (symmetric) the grid clips
    lo, hi = (-128, 127) if symmetric else (0, 255)
    x_hat = ((x / S).round() + Z).clamp(lo, hi).sub(Z) * S
    expected = x_hat @ layer.dequantize_weight().T + linear.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert float(layer.input_scale) == pytest.approx(S)
    assert (layer.input_zero_point is None) == symmetric


def test_static_layer_refuses_to_be_built_without_calibrated_scales():
    with pytest.raises(ValueError, match="input_qparams"):
        QuantizedLinear.from_float(nn.Linear(4, 4), QuantScheme(**W8), QuantScheme(**A8_STATIC))


def test_static_activations_must_be_per_tensor():
    with pytest.raises(ValueError, match="per tensor"):
        Recipe.parse({"stages": [{"algorithm": "smoothquant", "weights": W8,
                                  "activations": {"bits": 8, "granularity": "channel"}}]})


def test_smoothquant_calibrates_each_input_scale_on_the_smoothed_float_block():
    """Block 0 sees the same inputs in the pipeline as in the float model, so its static
    scales must be max|X| / 127 of the inputs captured from the model smoothed but not quantized."""
    data = samples()
    smoothed = tiny_llama()
    quantize(smoothed, {"stages": [{"algorithm": "smoothquant", "options": {"alpha": 0.5}}]},
             calibration=data, compute_dtype="float32")
    absmax: dict[str, float] = {}
    block = smoothed.model.layers[0]
    hooks = [
        module.register_forward_pre_hook(
            lambda m, a, name=name: absmax.__setitem__(name, max(absmax.get(name, 0.0), float(a[0].abs().max())))
        )
        for name, module in block.named_modules() if isinstance(module, nn.Linear)
    ]
    logits(smoothed, data)
    for hook in hooks:
        hook.remove()

    model = tiny_llama()
    stage = {"algorithm": "smoothquant", "weights": W8, "activations": A8_STATIC, "options": {"alpha": 0.5}}
    quantize(model, {"stages": [stage]}, calibration=data, compute_dtype="float32")
    assert len(absmax) == 7
    for name, value in absmax.items():
        layer = model.model.layers[0].get_submodule(name)
        assert float(layer.input_scale) == pytest.approx(value / 127, rel=1e-5), name


def test_static_w8a8_stays_close_to_float_and_survives_the_artifact(tmp_path):
    data = samples()
    reference = logits(tiny_llama(), data)
    errors = {}
    for name, act in {"static": A8_STATIC, "token": A8_TOKEN}.items():
        model = tiny_llama()
        stage = {"algorithm": "smoothquant", "weights": W8, "activations": act, "options": {"alpha": "search"}}
        quantize(model, {"stages": [stage]}, calibration=data, compute_dtype="float32")
        errors[name] = float((logits(model, data) - reference).norm() / reference.norm())
    # One scale per tensor is coarser than one per token, but int8 still tracks the float model.
    assert errors["token"] <= errors["static"] < 0.05, errors

    original = _static_model(data)
    folder = tmp_path / "artifact"
    save_artifact(original, None, folder, "causal_lm", {})
    write_manifest(folder)
    loaded = load_quantized(folder).model
    assert torch.equal(logits(loaded, data), logits(original, data))
    q_proj = loaded.model.layers[1].self_attn.q_proj
    assert float(q_proj.input_scale) == float(original.model.layers[1].self_attn.q_proj.input_scale) > 0


def _static_model(data):
    model = tiny_llama()
    stage = {"algorithm": "smoothquant", "weights": W8, "activations": A8_STATIC, "options": {"alpha": 0.5}}
    quantize(model, {"stages": [stage]}, calibration=data, compute_dtype="float32")
    return model
