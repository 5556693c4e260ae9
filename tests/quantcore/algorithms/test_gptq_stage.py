"""GPTQ as a recipe stage on a whole (small) model: it must beat RTN where it counts, on the
model's output for held-out inputs, and refuse what it cannot do with a clear message."""

import pytest
import torch

from quantcore import quantize
from quantcore.modules import QuantizedLinear

RECIPE = {"stages": [{"algorithm": "gptq", "weights": {"bits": 3, "granularity": "group", "group_size": 32}}]}


def test_gptq_beats_rtn_on_held_out_inputs(structured_llama, logits_error):
    reference = structured_llama()
    calibration = [torch.randint(0, 128, (1, 32)) for _ in range(16)]
    held_out = [torch.randint(0, 128, (1, 32)) for _ in range(8)]

    gptq = structured_llama()
    layers = quantize(gptq, RECIPE, calibration=calibration)
    assert len(layers) == 14 and all("gptq_loss" in layer for layer in layers)
    assert all(isinstance(gptq.get_submodule(layer["name"]), QuantizedLinear) for layer in layers)

    rtn = structured_llama()
    quantize(rtn, {"stages": [{**RECIPE["stages"][0], "algorithm": "rtn"}]})
    assert logits_error(gptq, reference, held_out) < 0.9 * logits_error(rtn, reference, held_out)


def test_gptq_refuses_what_it_cannot_do(structured_llama):
    model = structured_llama()
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(model, RECIPE)
    stage = {**RECIPE["stages"][0], "ignore": []}
    with pytest.raises(ValueError, match="lm_head lie outside"):
        quantize(model, {"stages": [stage]}, calibration=[torch.randint(0, 128, (1, 8))])
    with pytest.raises(ValueError, match="options.damp"):
        quantize(model, {"stages": [{**RECIPE["stages"][0], "options": {"damp": -1}}]})


class _TwoLayerBlock(torch.nn.Module):
    """Not a llama block: GPTQ's general true-sequential path handles it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("true_sequential", [True, False])
def test_later_layers_are_calibrated_on_the_quantized_layers_before_them(true_sequential):
    """fc2's Hessian comes from relu(Q1 x + b) when true-sequential (Q1: fc1 as quantized),
    from the float relu(W1 x + b) otherwise: recomputed by hand with the GPTQ solver."""
    from quantcore.algorithms.gptq import GPTQ
    from quantcore.schemes import QuantScheme

    torch.manual_seed(0)
    model = torch.nn.Sequential(_TwoLayerBlock())
    W1, b1, W2 = (t.detach().clone() for t in (model[0].fc1.weight, model[0].fc1.bias, model[0].fc2.weight))
    data = [torch.randn(64, 16) for _ in range(4)]
    scheme = QuantScheme(bits=3, granularity="group", group_size=8)
    stage = {"algorithm": "gptq", "ignore": [], "weights": scheme.model_dump(), "options": {"true_sequential": true_sequential}}
    quantize(model, {"stages": [stage]}, calibration=data, compute_dtype="float32")

    X = torch.cat(data)
    first = GPTQ(16)
    first.add_batch(X)
    Q1 = first.quantize(W1, scheme).Q
    second = GPTQ(32)
    second.add_batch(torch.relu(X @ (Q1 if true_sequential else W1).T + b1))
    Q2 = second.quantize(W2, scheme).Q
    assert torch.allclose(model[0].fc1.dequantize_weight(), Q1, atol=1e-6)
    assert torch.allclose(model[0].fc2.dequantize_weight(), Q2, atol=1e-6)


class _SharedInputBlock(torch.nn.Module):
    """Two layers fed the same tensor (as q/k/v are), then one fed their concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = torch.nn.Linear(16, 8), torch.nn.Linear(16, 24), torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.out(torch.cat([self.a(x), self.b(x)], dim=-1))


@pytest.mark.parametrize("act_order", [False, True])
def test_layers_sharing_an_input_get_what_each_would_get_alone(act_order):
    """The stage quantizes layers that share a Hessian as one stacked matrix; each must come
    out as GPTQ on that layer alone with the same Hessian (weights, S/Z and its loss)."""
    from quantcore.algorithms.gptq import GPTQ
    from quantcore.schemes import QuantScheme

    torch.manual_seed(0)
    model = torch.nn.Sequential(_SharedInputBlock())
    originals = {name: model[0].get_submodule(name).weight.detach().clone() for name in ("a", "b")}
    data = [torch.randn(64, 16) @ torch.randn(16, 16) for _ in range(4)]
    scheme = QuantScheme(bits=3, granularity="group", group_size=8)
    stage = {"algorithm": "gptq", "ignore": [], "weights": scheme.model_dump(), "options": {"act_order": act_order}}
    layers = {layer["name"]: layer for layer in quantize(model, {"stages": [stage]}, calibration=data, compute_dtype="float32")}

    for name, W in originals.items():
        alone = GPTQ(16)
        alone.add_batch(torch.cat(data))
        expected = alone.quantize(W, scheme, act_order=act_order)
        quantized = model[0].get_submodule(name)
        torch.testing.assert_close(quantized.dequantize_weight(), expected.Q, rtol=0, atol=1e-6)
        torch.testing.assert_close(quantized.weight_qparams().scale, expected.qparams.scale.float())
        assert layers[f"0.{name}"]["gptq_loss"] == pytest.approx(expected.loss, rel=1e-4, abs=1e-6)
