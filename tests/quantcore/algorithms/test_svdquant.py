"""SVDQuant against its invariants: low rank plus residual rebuilds the smoothed weight exactly,
the branch is the best rank-r approximation (Eckart-Young), the layer computes what its
parts say, it survives an artifact round trip, and at W4A4 it beats SmoothQuant then RTN."""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantcore import quantize
from quantcore.algorithms.svdquant import SVDQuantOptions, decompose, svdquant_linear
from quantcore.export import load_quantized
from quantcore.export.artifact import save_artifact, write_manifest
from quantcore.modules.low_rank import LowRankQuantizedLinear
from quantcore.recipe import Stage

W4 = {"type": "int", "bits": 4, "granularity": "group", "group_size": 16}
A4 = {"type": "int", "bits": 4, "granularity": "group", "group_size": 16, "dynamic": True}


def test_low_rank_plus_residual_is_the_smoothed_weight_and_the_best_rank_r():
    torch.manual_seed(0)
    W = torch.randn(48, 64) @ torch.diag(torch.linspace(0.1, 3, 64))
    act = torch.rand(64) * 10
    smooth, L1, L2, R = decompose(W, act, rank=8, alpha=0.5)
    torch.testing.assert_close(L1 @ L2 + R, W * smooth, rtol=1e-5, atol=1e-5)
    singular = torch.linalg.svdvals((W * smooth).double())
    torch.testing.assert_close(R.double().pow(2).sum(), singular[8:].pow(2).sum(), rtol=1e-4, atol=1e-6)
    expect = act.pow(0.5) / W.abs().amax(dim=0).pow(0.5)  # SmoothQuant's migration at alpha 0.5
    torch.testing.assert_close(smooth, expect)


def test_the_layer_computes_its_parts():
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    stage = Stage.model_validate({"algorithm": "svdquant", "weights": {"bits": 8, "granularity": "channel"}})
    layer = svdquant_linear(linear, torch.rand(64) * 5, stage, SVDQuantOptions(rank=4))
    x = torch.randn(3, 5, 64)
    x_hat = x / layer.smooth.float()
    expect = x_hat @ layer.residual.dequantize_weight().T + linear.bias + x_hat @ layer.lora_down.float().T @ layer.lora_up.float().T
    torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-5)
    # 8-bit residual, float activations: within a few 8-bit steps of the original layer
    with torch.no_grad():
        assert float((layer(x) - linear(x)).norm() / linear(x).norm()) < 0.02


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] = torch.tensor([20.0, -30.0])
            layer.post_attention_layernorm.weight[[5, 41]] = torch.tensor([15.0, 25.0])
    return model


def samples(n=6, length=16):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (1, length), generator=g) for _ in range(n)]


def logits(model, data):
    with torch.no_grad():
        return torch.cat([model(x).logits for x in data])


def test_w4a4_svdquant_beats_smoothquant_then_rtn(tmp_path):
    data = samples()
    reference = logits(tiny_llama(), data)
    recipes = {
        "smoothquant+rtn": [{"algorithm": "smoothquant", "options": {"alpha": 0.5}},
                            {"algorithm": "rtn", "weights": W4, "activations": A4}],
        "svdquant": [{"algorithm": "svdquant", "weights": W4, "activations": A4, "options": {"rank": 8}}],
    }
    errors = {}
    for name, stages in recipes.items():
        model = tiny_llama()
        quantize(model, {"stages": stages}, calibration=data, compute_dtype="float32")
        errors[name] = float((logits(model, data) - reference).norm() / reference.norm())
        if name == "svdquant":
            assert isinstance(model.model.layers[1].mlp.down_proj, LowRankQuantizedLinear)
            save_artifact(model, None, tmp_path, "causal_lm", {})
            write_manifest(tmp_path)
            reloaded = load_quantized(tmp_path).model
            torch.testing.assert_close(logits(reloaded, data), logits(model, data), rtol=0, atol=0)
    assert errors["svdquant"] < errors["smoothquant+rtn"], errors
