"""AdaRound against its definition: every weight ends on the floor or the ceiling of W/S (on
the fixed grid), the learned rounding reconstructs the layer's output better than nearest
rounding, and never worse."""

import pytest
import torch
from torch import nn

from quantcore.algorithms.adaround import AdaRoundOptions, adaround_layer, adaround_model, rectified_sigmoid

FAST = AdaRoundOptions(iterations=600, learning_rate=3e-2)


def grid(W, bits=3):
    scale = W.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
    return scale, torch.zeros_like(scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def test_rectified_sigmoid_reaches_0_and_1_exactly():
    h = rectified_sigmoid(torch.tensor([-10.0, 0.0, 10.0]))
    assert h.tolist() == pytest.approx([0.0, 0.5, 1.0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learned_rounding_beats_nearest_on_the_layer_output(seed):
    torch.manual_seed(seed)
    layer = nn.Linear(32, 16)
    # correlated inputs with a mean, as in real layers (with independent zero-mean inputs,
    # nearest rounding is already optimal: the error's Hessian is diagonal)
    x = torch.randn(512, 32) @ torch.randn(32, 32) + 0.5
    scale, zero, qmin, qmax = grid(layer.weight.detach())
    result = adaround_layer(layer, x, x, scale, zero, qmin, qmax, FAST, seed)
    W = layer.weight.detach()
    codes = result.weight / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the grid
    floor, ceil = torch.floor(W / scale).clamp(qmin, qmax), torch.ceil(W / scale).clamp(qmin, qmax)
    assert bool(((codes.round() == floor) | (codes.round() == ceil)).all())  # only up or down
    nearest = torch.round(W / scale).clamp(qmin, qmax) * scale
    by_hand = float((x @ nearest.T - x @ W.T).pow(2).sum() / len(x))
    assert result.loss_nearest == pytest.approx(by_hand, rel=1e-4)
    assert result.loss_learned < 0.8 * result.loss_nearest and result.flipped > 0.05


def test_conv_layers_and_the_model_driver():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    blur = nn.AvgPool2d(3, stride=1, padding=1)  # neighbouring pixels correlated, as in images
    data = [blur(torch.randn(16, 2, 6, 6)) + 0.3 for _ in range(2)]
    from quantcore.schemes import QuantScheme

    with torch.no_grad():
        reference = torch.cat([model(x) for x in data])
    reported = []
    results = adaround_model(model, QuantScheme(bits=3, granularity="channel"), data, FAST,
                             progress=lambda d, t, m: reported.append((d, t, m)))
    assert list(results) == ["0", "2"]
    assert reported == [(1, 2, "layer 1/2: 0"), (2, 2, "layer 2/2: 2")]
    assert all(r.loss_learned <= r.loss_nearest for r in results.values())
    assert results["0"].loss_learned < results["0"].loss_nearest
    with torch.no_grad():
        error = float((torch.cat([model(x) for x in data]) - reference).pow(2).mean())
    # the same model rounded to nearest, for comparison
    torch.manual_seed(0)
    nearest = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    with torch.no_grad():
        for layer in (nearest[0], nearest[2]):
            W = layer.weight
            S = W.abs().reshape(W.shape[0], -1).amax(dim=1).reshape(-1, 1, 1, 1) / 3
            W.copy_((W / S).round().clamp(-4, 3) * S)
        nearest_error = float((torch.cat([nearest(x) for x in data]) - reference).pow(2).mean())
    assert error < nearest_error
