"""DFQ against its invariants: folding and equalization are exact rewrites of the float model,
equalization equalizes the pair's ranges (the paper's eq. 10), bias absorption is exact where
the pre-activation stays above c, and bias correction removes the mean output shift."""

import math

import pytest
import torch
from torch import nn

from quantcore.algorithms.dfq import (
    ChannelStats,
    absorb_biases,
    clipped_normal_mean,
    correct_bias,
    cross_layer_equalization,
    data_free_quantize,
    equalization_groups,
    expected_input,
    expected_shift,
    fold_batchnorm,
    input_channel_means,
    measured_shift,
)
from quantcore.models.digits_cnn import DigitsCNN


def random_cnn(seed=0):
    """An untrained test-bed CNN with BN statistics and affine parameters far from identity."""
    torch.manual_seed(seed)
    model = DigitsCNN().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.2, 3)
                module.weight.uniform_(0.1, 4)
                module.bias.uniform_(-1, 1)
    return model


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_folding_and_equalization_leave_the_float_output_unchanged():
    model = random_cnn()
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    stats = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert set(stats) == {"stem.0", "body1.0", "body2.0", "branch3.0", "branch1.0", "mix.0"}
    with torch.no_grad():
        assert relative_error(model(x), before) < 1e-5
    groups = cross_layer_equalization(model, stats)
    # the stem and body2 write one channel space (the residual add), which body1 and, after
    # the max-pool, both branches read; the branches feed a concat, so they stay unscaled
    assert [(g.producers, sorted(g.consumers)) for g in groups] == [
        (["stem.0", "body2.0"], ["body1.0", "branch1.0", "branch3.0"]),
        (["body1.0"], ["body2.0"]),
        (["mix.0"], ["head"]),
    ]
    with torch.no_grad():
        assert relative_error(model(x), before) < 1e-5


def test_equalization_gives_both_layers_of_a_pair_the_same_channel_ranges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 2, 8).unsqueeze(1))  # ranges over 4 decades
    r1_before = model[0].weight.abs().amax(dim=1)
    r2_before = model[2].weight.abs().amax(dim=0)
    assert [(g.producers, g.consumers) for g in equalization_groups(model)] == [(["0"], ["2"])]
    cross_layer_equalization(model)
    r1, r2 = model[0].weight.abs().amax(dim=1), model[2].weight.abs().amax(dim=0)
    assert torch.allclose(r1, r2, rtol=1e-5)
    assert torch.allclose(r1, torch.sqrt(r1_before * r2_before), rtol=1e-5)  # eq. 10: sqrt(r1 r2)


def test_bias_absorption_is_exact_where_the_preactivation_stays_above_c():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(4096, 8)
    with torch.no_grad():
        model[1].bias.copy_(torch.linspace(-1, 8, 16))  # β ≫ 3γ on the later channels: c > 0 there
        model.train()
        model[1].momentum = None  # running statistics = this data's
        model(x)
        model.eval()
        before = model(x)
    stats = fold_batchnorm(model)
    groups = cross_layer_equalization(model, stats)
    pre = model[0](x)
    c = (stats["0"].mean - 3 * stats["0"].std).clamp(min=0)
    assert (c > 0).sum() >= 4
    bias1 = model[0].bias.detach().clone()
    absorb_biases(model, groups, stats)
    with torch.no_grad():
        after = model(x)
    above = (pre >= c).all(dim=1)  # rows whose every pre-activation stayed above c
    assert above.sum() > 100
    assert torch.allclose(after[above], before[above], atol=1e-5)
    assert torch.allclose(model[0].bias, bias1 - c)  # c left layer1 (and went into layer2's bias)


def test_clipped_normal_mean_matches_sampling():
    g = torch.Generator().manual_seed(0)
    for mean, std in [(0.0, 1.0), (1.5, 0.5), (-2.0, 1.0), (0.3, 3.0)]:
        samples = torch.randn(2_000_000, generator=g, dtype=torch.float64) * std + mean
        expected = float(samples.clamp(min=0).mean())
        got = float(clipped_normal_mean(torch.tensor(mean), torch.tensor(std)))
        assert got == pytest.approx(expected, abs=4 * std / math.sqrt(2_000_000) + 1e-6)


def _rtn_per_tensor(W, bits=4):
    S = W.abs().max() / (2 ** (bits - 1) - 1)
    return (W / S).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * S


@pytest.mark.parametrize("layer", [nn.Linear(12, 5), nn.Conv2d(3, 4, 3, padding=1)])
def test_empirical_bias_correction_removes_the_mean_output_shift(layer):
    torch.manual_seed(0)
    shape = (512, 12) if isinstance(layer, nn.Linear) else (64, 3, 6, 6)
    x = torch.rand(shape) * 2 + 0.5  # a positive-mean input, as after a ReLU
    float_layer = nn.Sequential(layer).eval()
    with torch.no_grad():
        reference = float_layer(x)
        W = layer.weight.detach().clone()
        layer.weight.copy_(_rtn_per_tensor(W))
        shifted = float_layer(x)
        layer.weight.copy_(W)
    dims = [0] if isinstance(layer, nn.Linear) else [0, 2, 3]
    shift_before = (shifted - reference).mean(dim=dims)
    assert float(shift_before.abs().max()) > 1e-3
    correct_bias(layer, _rtn_per_tensor(W), measured_shift(float_layer, "0", _rtn_per_tensor(W), [x]))
    with torch.no_grad():
        shift_after = (float_layer(x) - reference).mean(dim=dims)
    assert float(shift_after.abs().max()) < 1e-5


def test_analytic_bias_correction_uses_the_clipped_normal_mean_of_the_producer():
    """Inputs drawn as ReLU(N(β, γ²)) per channel: the correction from (β, γ) alone removes
    the shift up to sampling error."""
    torch.manual_seed(0)
    beta, gamma = torch.linspace(-1, 2, 12), torch.linspace(0.5, 1.5, 12)
    x = (torch.randn(200_000, 12) * gamma + beta).clamp(min=0)
    layer = nn.Linear(12, 5)
    with torch.no_grad():
        reference = layer(x)
    W = layer.weight.detach().clone()
    mean = expected_input(ChannelStats(beta, gamma, relu=True))
    assert torch.allclose(mean, input_channel_means(nn.Sequential(layer), ["0"], [x])["0"], atol=0.01)
    correct_bias(layer, _rtn_per_tensor(W), expected_shift(layer, _rtn_per_tensor(W), mean))
    with torch.no_grad():
        shift = (layer(x) - reference).mean(dim=0)
    error = _rtn_per_tensor(W) - W
    naive_shift = (x @ error.T).mean(dim=0)
    assert float(shift.abs().max()) < 0.05 * float(naive_shift.abs().max())


def test_data_free_quantize_corrects_the_layers_whose_input_statistics_it_knows():
    model = random_cnn()
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
    report = data_free_quantize(model, lambda W: W, absorb=False)  # an exact "quantizer"
    with torch.no_grad():
        assert relative_error(model(x), before) < 1e-5
    # body1 is fed by the stem's BN+ReLU, body2 by body1's, mix by the concat of both branches;
    # the stem sees the image, the branches a max-pool, the head a spatial mean: no statistics
    assert report.corrected == {"body1.0": "analytic", "body2.0": "analytic", "mix.0": "analytic"}
    assert report.uncorrected == ["stem.0", "branch3.0", "branch1.0", "head"]

    model = random_cnn()
    report = data_free_quantize(model, _rtn_per_tensor, data=[x])
    assert set(report.corrected.values()) == {"empirical"} and len(report.corrected) == 7


class _SelfResidual(nn.Module):
    """conv2 both reads and writes the residual stream: no per-channel scale can pass it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 3, 1)
        self.conv4 = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = x + torch.relu(self.conv2(x))
        return self.conv4(torch.relu(self.conv3(x)))


def test_a_layer_inside_its_own_residual_is_not_equalized():
    torch.manual_seed(0)
    model = _SelfResidual()
    x = torch.randn(8, 2, 6, 6)
    with torch.no_grad():
        before = model(x)
    groups = cross_layer_equalization(model)
    assert [(g.producers, g.consumers) for g in groups] == [(["conv3"], ["conv4"])]
    with torch.no_grad():
        assert relative_error(model(x), before) < 1e-5
