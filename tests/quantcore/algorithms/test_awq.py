"""AWQ against independent references: the folded scaling is an exact rewrite of the float
model, the scale and clip searches pick what a direct search on the layer's real outputs
picks, and the result beats round-to-nearest."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantcore import quantize
from quantcore.algorithms.awq import _Inputs, search_clip, search_scale
from quantcore.algorithms.smoothing import SmoothingPair
from quantcore.qparams import fake_quant, qparams_from_range
from quantcore.recipe import Recipe
from quantcore.schemes import QuantScheme

G16 = {"type": "int", "bits": 4, "granularity": "group", "group_size": 16}


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # salient input channels, as in real LLMs
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


@pytest.mark.parametrize("scope", ["layers", "module"])
def test_scaling_alone_leaves_the_float_model_unchanged(scope):
    model, data = tiny_llama(), samples()
    before = logits(model, data)
    stage = {"algorithm": "awq", "weights": G16, "options": {"quantize": False, "clip": False, "search_scope": scope}}
    assert quantize(model, {"stages": [stage]}, calibration=data, compute_dtype="float32") == []
    after = logits(model, data)
    assert float((after - before).norm() / before.norm()) < 1e-5


def layer_with_salient_inputs(rows=24, columns=32, tokens=400):
    torch.manual_seed(2)
    X = torch.randn(tokens, columns)
    X[:, [1, 9]] *= 25  # salient channels
    return X, torch.randn(rows, columns) * 0.1


def direct_error(X, W, W_hat):
    return float((X @ (W - W_hat).T).pow(2).sum())


@pytest.mark.parametrize("duo_scaling", [False, True])
def test_scale_search_matches_a_direct_search_on_the_real_outputs(duo_scaling):
    X, W = layer_with_salient_inputs()
    scheme = QuantScheme(bits=3, granularity="group", group_size=8)
    producer = nn.LayerNorm(32)
    consumer = nn.Linear(32, 24, bias=False)
    consumer.weight.data = W.clone()
    pair = SmoothingPair("p", producer, ["c"], [consumer])
    inputs = _Inputs(X.T @ X, X.abs().mean(dim=0))
    s, alpha, _ = search_scale(pair, inputs, scheme, grid=10, duo_scaling=duo_scaling)
    # the reference implementation's weight term: |W| over its group's max, averaged over rows
    w_mean = torch.stack([(W[:, g:g + 8].abs() / W[:, g:g + 8].abs().amax(dim=1, keepdim=True)) for g in range(0, 32, 8)], 1)
    w_mean = w_mean.reshape(W.shape[0], 32).mean(dim=0)

    def quantized(Wx):
        from quantcore.observers import make_observer
        o = make_observer(scheme)
        o.update(Wx)
        return fake_quant(Wx, o.qparams())

    errors = {}
    for step in range(10):  # the paper's search, written out on X itself
        a = step / 10
        t = X.abs().mean(dim=0).pow(a)
        if duo_scaling:
            t = t / (w_mean.pow(1 - a) + 1e-4)
        t = t / (t.max() * t.min()).sqrt()
        errors[a] = direct_error(X, W, quantized(W * t) / t)
    assert alpha == min(errors, key=errors.get)
    assert errors[alpha] < 0.8 * errors[0.0]  # α = 0 is plain RTN: scaling helps here


def test_module_scope_picks_the_alpha_of_least_folded_mlp_output_error():
    """The module search scores candidates without folding (weights replaced by Q(W s)/s); the
    reference folds each candidate for real (norm divided by s, W multiplied by s, quantized)
    and runs the whole decoder layer's MLP on the rescaled norm output."""
    import copy

    from quantcore.algorithms.awq import _ModuleSamples, search_scale_on_module
    from quantcore.algorithms.smoothing import smoothing_pairs
    from quantcore.observers import fake_quant_weight

    model, data = tiny_llama(), samples()
    layer = model.model.layers[0]
    captured = _ModuleSamples(layer.mlp)
    handle = layer.mlp.register_forward_hook(captured.record, with_kwargs=True)
    norm_outputs = []
    hook = layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: norm_outputs.append(out.detach()))
    logits(model, data)
    handle.remove()
    hook.remove()
    pair = next(p for p in smoothing_pairs("model.layers.0", layer) if p.producer_name.endswith("post_attention_layernorm"))
    X = torch.cat([x.reshape(-1, 64) for x in norm_outputs])
    absmean = X.abs().mean(dim=0)
    scheme = QuantScheme(**G16)
    s, alpha, _ = search_scale_on_module(pair, captured, absmean, scheme, grid=8, duo_scaling=False)
    errors = {}
    for step in range(8):
        a = step / 8
        t = absmean.clamp(min=1e-4).pow(a)
        t = t / (t.max() * t.min()).sqrt()
        mlp = copy.deepcopy(layer.mlp)
        with torch.no_grad():
            for linear in (mlp.gate_proj, mlp.up_proj):
                linear.weight.copy_(fake_quant_weight(linear.weight * t, scheme))
            errors[a] = sum(float((mlp(x / t) - out).pow(2).sum()) for x, out in zip(norm_outputs, captured.outputs))
    assert alpha == min(errors, key=errors.get), errors
    torch.testing.assert_close(layer.mlp.gate_proj.weight, tiny_llama().model.layers[0].mlp.gate_proj.weight)  # restored


def test_clip_search_matches_a_per_group_brute_force():
    X, W = layer_with_salient_inputs(rows=6, columns=16)
    scheme = QuantScheme(bits=3, granularity="group", group_size=8)
    clipped = search_clip(W, X.T @ X, scheme, grid=10, min_ratio=0.5)
    row_scheme = QuantScheme(bits=3, granularity="channel")
    for r in range(6):
        for g in range(2):
            cols = slice(8 * g, 8 * g + 8)
            w, Xg = W[r : r + 1, cols], X[:, cols]
            best = min(
                (1 - 0.05 * k for k in range(11)),
                key=lambda ratio: direct_error(Xg, w, fake_quant(
                    w, qparams_from_range(w.min() * ratio * torch.ones(1, 1), w.max() * ratio * torch.ones(1, 1), row_scheme))),
            )
            expect = w.clamp(w.min() * best, w.max() * best)
            torch.testing.assert_close(clipped[r : r + 1, cols], expect)


@pytest.mark.parametrize("scope", ["layers", "module"])
def test_awq_beats_round_to_nearest_on_the_model(scope):
    data = samples()
    reference = logits(tiny_llama(), data)
    errors = {}
    awq = {"algorithm": "awq", "weights": G16, "options": {"search_scope": scope}}
    for name, stage in {"rtn": {"algorithm": "rtn", "weights": G16}, "awq": awq}.items():
        model = tiny_llama()
        results = quantize(model, {"stages": [stage]}, calibration=data, compute_dtype="float32")
        assert len(results) == 14
        errors[name] = float((logits(model, data) - reference).norm() / reference.norm())
    assert errors["awq"] < 0.9 * errors["rtn"], errors


def test_awq_then_gptq_chains():
    data = samples()
    model = tiny_llama()
    recipe = {"stages": [{"algorithm": "awq", "weights": G16, "options": {"quantize": False}},
                         {"algorithm": "gptq", "weights": G16}]}
    results = quantize(model, recipe, calibration=data, compute_dtype="float32")
    assert len(results) == 14 and all("gptq_loss" in r for r in results)


def test_activations_are_rejected():
    with pytest.raises(ValueError, match="weight-only"):
        Recipe.parse({"stages": [{"algorithm": "awq", "weights": G16,
                                  "activations": {"bits": 8, "granularity": "token", "dynamic": True}}]})
