"""RTN against a naive per-element loop written from the definition."""

import math

import pytest
import torch
from torch import nn

from quantcore import quantize
from quantcore.modules.quantized_linear import QuantizedLinear
from quantcore.recipe import Recipe


def naive_rtn(w: torch.Tensor, bits: int, symmetric: bool, group: int | None) -> torch.Tensor:
    """Element by element: S and Z per row (or per group of the row), then round each weight."""
    out = torch.empty_like(w)
    rows, cols = w.shape
    size = group or cols
    for r in range(rows):
        for start in range(0, cols, size):
            block = [float(v) for v in w[r, start : start + size]]
            lo, hi = min(min(block), 0.0), max(max(block), 0.0)
            if symmetric:
                qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
                s = max(-lo, hi) / qmax
                z = 0
            else:
                qmin, qmax = 0, 2**bits - 1
                s = (hi - lo) / qmax
                z = qmin - round(lo / s)
            for c, v in enumerate(block):
                q = min(max(round(v / s) + z, qmin), qmax)
                out[r, start + c] = (q - z) * s
    return out


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 24)
        self.down = nn.Linear(24, 32)
        self.lm_head = nn.Linear(32, 10)


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, None), (4, False, 8), (3, True, 8), (8, True, None), (2, False, None)])
def test_rtn_matches_naive_loop(bits, symmetric, group):
    torch.manual_seed(bits)
    model = TwoLayer()
    original = {n: m.weight.detach().clone() for n, m in model.named_children()}
    granularity = "group" if group else "channel"
    recipe = Recipe.parse(
        {
            "stages": [
                {
                    "algorithm": "rtn",
                    "weights": {"bits": bits, "symmetric": symmetric, "granularity": granularity, "group_size": group},
                    # float32 scales so the naive double-precision loop is the exact reference
                    "scale_dtype": "float32",
                }
            ]
        }
    )
    layers = quantize(model, recipe)
    assert [layer["name"] for layer in layers] == ["up", "down"]  # lm_head ignored by default
    assert isinstance(model.lm_head, nn.Linear)
    for name in ("up", "down"):
        module = getattr(model, name)
        assert isinstance(module, QuantizedLinear)
        expect = naive_rtn(original[name], bits, symmetric, group)
        torch.testing.assert_close(module.dequantize_weight(), expect, rtol=0, atol=1e-5)
        err = (original[name] - expect).pow(2).sum() / original[name].pow(2).sum()
        layer = next(item for item in layers if item["name"] == name)
        assert layer["sqnr_db"] == pytest.approx(-10 * math.log10(err.item()), abs=0.01)


def test_ignore_patterns():
    model = TwoLayer()
    quantize(model, {"stages": [{"algorithm": "rtn", "ignore": ["re:^d", "lm_*"], "weights": {"bits": 8}}]})
    assert isinstance(model.up, QuantizedLinear)
    assert isinstance(model.down, nn.Linear) and isinstance(model.lm_head, nn.Linear)


@pytest.mark.parametrize(
    "stage,message",
    [
        ({"algorithm": "dfq", "weights": {"bits": 4}}, "not implemented"),
        ({"algorithm": "nope", "weights": {"bits": 4}}, "unknown algorithm 'nope'"),
        ({"algorithm": "rtn"}, "needs a 'weights' scheme"),
        ({"algorithm": "rtn", "weights": {"bits": 4}, "options": {"damp": 0.1}}, "options.damp"),
        ({"algorithm": "rtn", "weights": {"bits": 4}, "colour": 1}, "colour"),
        ({"algorithm": "rtn", "weights": {"bits": 4, "dynamic": True}}, "dynamic must be false"),
        ({"algorithm": "rtn", "targets": ["Conv2d"], "weights": {"bits": 4}}, "unsupported target"),
    ],
)
def test_bad_stages_rejected_with_named_field(stage, message):
    with pytest.raises(ValueError, match=message):
        Recipe.parse({"stages": [stage]})
