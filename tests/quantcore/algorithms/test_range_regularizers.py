"""R² range regularizers and KURE against independent references: scipy's kurtosis, naive
loops over the papers' formulas, hand-derived gradients, and float fine-tunes with and
without the regularizer."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from quantcore.algorithms.range_regularizers import (
    MarginRange,
    RangeRegularizer,
    SoftMinMaxRange,
    kure_loss,
    kurtosis,
    linf_loss,
    margin_loss,
    regularized_finetune,
    soft_min_max_loss,
    weight_tensors,
)


def mlp(seed=0, gaussian=True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    if gaussian:  # PyTorch's default init is uniform (kurtosis 1.8 already); start from a Gaussian (3)
        for _, w in weight_tensors(model):
            nn.init.normal_(w, std=1 / math.sqrt(w.shape[1]))
    return model


def toy_regression(seed=0, n=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 4, generator=g)) @ torch.randn(4, 1, generator=g)
    return x, y


def test_weight_tensors_lists_conv_and_linear_weights_in_module_order():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv1d(4, 2, 1), nn.LayerNorm(2), nn.Linear(2, 5))
    names = [name for name, _ in weight_tensors(model)]
    assert names == ["0", "2", "4"]
    assert all(w is model[int(n)].weight for n, w in weight_tensors(model))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kurtosis_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    for sample in (rng.normal(size=(37, 11)), rng.standard_t(5, size=500), rng.exponential(size=(4, 3, 3))):
        expected = scipy.stats.kurtosis(sample.ravel(), fisher=False)  # Pearson, population moments
        assert float(kurtosis(torch.from_numpy(sample))) == pytest.approx(expected, rel=1e-10)


def test_uniform_has_kurtosis_1_8_and_no_kure_loss_gaussian_has_3():
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(200_000, generator=g, dtype=torch.float64) * 2 - 1
    gaussian = torch.randn(200_000, generator=g, dtype=torch.float64)
    assert float(kurtosis(uniform)) == pytest.approx(1.8, abs=0.01)
    assert float(kurtosis(gaussian)) == pytest.approx(3.0, abs=0.05)
    assert float(kure_loss([uniform])) < 1e-4
    # the mean over layers of the squared gap, from scipy's kurtosis
    k = [scipy.stats.kurtosis(t.numpy(), fisher=False) for t in (uniform, gaussian)]
    expected = ((k[0] - 1.8) ** 2 + (k[1] - 1.8) ** 2) / 2
    assert float(kure_loss([("u", uniform), ("g", gaussian)])) == pytest.approx(expected, rel=1e-9)
    assert float(kure_loss([gaussian], target=3.0)) == pytest.approx((k[1] - 3.0) ** 2, rel=1e-9)


def test_linf_is_the_sum_of_max_magnitudes_and_its_gradient_only_touches_the_argmax():
    torch.manual_seed(0)
    a = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.3, -2.0], [2.0, 1.0]], dtype=torch.float64, requires_grad=True)  # a tie
    loss = linf_loss([a, b])
    assert loss.item() == pytest.approx(np.abs(a.detach().numpy()).max() + 2.0)
    loss.backward()
    for w in (a, b):
        is_max = w.detach().abs() == w.detach().abs().max()
        assert bool((w.grad[~is_max] == 0).all())
        # at the extremes the gradient points outward (sign of w), so descent shrinks |w|
        assert bool((w.grad[is_max] * w.detach()[is_max].sign() > 0).all())


def naive_margin(weights, margins):
    total = 0.0
    for w, m in zip(weights, margins):
        total += abs(m) ** 2
        for value in w.flatten().tolist():
            if abs(value) > abs(m):
                total += abs(value) - abs(m)
    return total


def test_margin_loss_is_only_the_margin_penalty_when_all_weights_are_inside():
    torch.manual_seed(0)
    weights = [(torch.rand(4, 4, dtype=torch.float64) * 2 - 1).requires_grad_() for _ in range(2)]
    margins = torch.tensor([1.5, 1.0], dtype=torch.float64, requires_grad=True)
    loss = margin_loss(weights, margins)
    assert loss.item() == pytest.approx(1.5**2 + 1.0**2)  # the hinge part is zero
    loss.backward()
    assert all(bool((w.grad == 0).all()) for w in weights)
    assert margins.grad.tolist() == pytest.approx([3.0, 2.0])  # d|M|²/dM


def test_margin_loss_matches_a_naive_loop_and_its_margin_gradient():
    torch.manual_seed(1)
    weights = [torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64)]
    margins = torch.tensor([0.8, 0.5], dtype=torch.float64, requires_grad=True)
    loss = margin_loss(weights, margins)
    assert loss.item() == pytest.approx(naive_margin(weights, margins.tolist()), rel=1e-12)
    loss.backward()
    # d/dM [M² + Σ max(|w| − M, 0)] = 2M − #{|w| > M}
    expected = [2 * m - int((w.abs() > m).sum()) for w, m in zip(weights, margins.tolist())]
    assert margins.grad.tolist() == pytest.approx(expected)


def test_margin_range_starts_at_each_layers_range_and_is_learnable():
    model = mlp()
    ranges = MarginRange(weight_tensors(model))
    expected = [w.abs().max().item() for _, w in weight_tensors(model)]
    assert ranges.margins.tolist() == pytest.approx(expected)
    ranges(weight_tensors(model)).backward()
    assert ranges.margins.grad is not None and bool((ranges.margins.grad != 0).all())


def naive_soft_min_max(weights, alphas, eta):
    total = 0.0
    for w, a in zip(weights, alphas):
        values = w.flatten().tolist()
        top = max(values)  # shifting the exponents leaves the ratios unchanged and avoids overflow
        bottom = min(values)
        e_max = [math.exp(a * (v - top)) for v in values]
        e_min = [math.exp(-a * (v - bottom)) for v in values]
        s_max = sum(v * e for v, e in zip(values, e_max)) / sum(e_max)
        s_min = sum(v * e for v, e in zip(values, e_min)) / sum(e_min)
        total += (s_max - s_min) ** 2 + eta * math.exp(-a)
    return total


def test_soft_min_max_matches_a_naive_loop_and_tends_to_the_hard_range():
    torch.manual_seed(2)
    weights = [torch.randn(6, 6, dtype=torch.float64) * 0.1, torch.randn(10, dtype=torch.float64) + 0.5]
    alphas = torch.tensor([20.0, 1.5], dtype=torch.float64)
    expected = naive_soft_min_max(weights, alphas.tolist(), eta=0.3)
    assert float(soft_min_max_loss(weights, alphas, eta=0.3)) == pytest.approx(expected, rel=1e-12)
    w = weights[0]
    hard = float((w.max() - w.min()) ** 2)
    assert float(soft_min_max_loss([w], torch.tensor([1e4], dtype=torch.float64))) == pytest.approx(hard, rel=1e-6)


def test_soft_min_max_allows_an_asymmetric_range_linf_does_not():
    torch.manual_seed(3)
    w = torch.randn(64, dtype=torch.float64) * 0.1
    alphas = torch.tensor([30.0], dtype=torch.float64)
    # the span between the soft extremes does not move with the distribution's centre
    assert float(soft_min_max_loss([w + 0.7], alphas)) == pytest.approx(float(soft_min_max_loss([w], alphas)))
    assert float(linf_loss([w + 0.7])) > float(linf_loss([w])) + 0.5


def test_soft_min_max_range_learns_its_temperatures():
    model = mlp()
    ranges = SoftMinMaxRange(weight_tensors(model))
    expected = [10 / w.abs().max().item() for _, w in weight_tensors(model)]
    assert ranges.alphas.tolist() == pytest.approx(expected, rel=1e-6)
    ranges(weight_tensors(model)).backward()
    assert bool((ranges.alphas.grad != 0).all())


@pytest.mark.parametrize("kind", ["linf", "margin", "soft_min_max", "kure"])
def test_range_regularizer_scales_the_loss_and_exposes_only_its_own_parameters(kind):
    model = mlp()
    reg = RangeRegularizer(model, kind, strength=0.25)
    own = list(reg.parameters())
    assert len(own) == (1 if kind in ("margin", "soft_min_max") else 0)
    model_ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in model_ids for p in own)
    weights = [w.detach().numpy() for _, w in weight_tensors(model)]
    if kind == "linf":
        expected = sum(np.abs(w).max() for w in weights)
    elif kind == "margin":  # starts at M = max|W|: nothing outside, only Σ M²
        expected = sum(np.abs(w).max() ** 2 for w in weights)
    elif kind == "kure":
        expected = np.mean([(scipy.stats.kurtosis(w.ravel(), fisher=False) - 1.8) ** 2 for w in weights])
    else:
        expected = naive_soft_min_max(weights, [10 / np.abs(w).max() for w in weights], eta=1.0)
    assert reg().item() == pytest.approx(0.25 * expected, rel=1e-4)
    reg().backward()
    touched = [w.grad is not None and bool(w.grad.abs().sum() > 0) for _, w in weight_tensors(model)]
    # the margins start at the layers' ranges: no weight is outside yet, only the margins move
    assert touched == [kind != "margin"] * len(touched)


def total_kurtosis_gap(model):
    return sum(abs(scipy.stats.kurtosis(w.detach().numpy().ravel(), fisher=False) - 1.8) for _, w in weight_tensors(model))


def total_max_magnitude(model):
    return sum(float(w.detach().abs().max()) for _, w in weight_tensors(model))


EPOCHS = 8


def finetune(kind, strength, seed=0, **kwargs):
    model = mlp(seed)
    records = regularized_finetune(
        model, toy_regression(seed), nn.functional.mse_loss, kind, strength, EPOCHS, learning_rate=1e-2, seed=seed, **kwargs
    )
    return model, records


def test_kure_finetune_moves_the_weights_toward_a_uniform_distribution(one_thread):
    start = total_kurtosis_gap(mlp(0))
    plain, plain_records = finetune("kure", 0.0)
    kure, kure_records = finetune("kure", 1.0)
    assert total_kurtosis_gap(kure) < 0.5 * start
    assert total_kurtosis_gap(kure) < 0.5 * total_kurtosis_gap(plain)
    assert kure_records[-1]["task_loss"] < kure_records[0]["task_loss"]  # still learns the task
    assert plain_records[-1]["regularizer"] == 0.0


def test_linf_finetune_shrinks_the_largest_weights(one_thread):
    plain, _ = finetune("linf", 0.0)
    linf, records = finetune("linf", 0.05)
    assert total_max_magnitude(linf) < 0.85 * total_max_magnitude(plain)
    assert records[-1]["task_loss"] < records[0]["task_loss"]


def test_finetune_is_seeded_and_reports_every_epoch(one_thread):
    seen = []
    model_a, records_a = finetune("margin", 0.01, progress=lambda epoch, record: seen.append((epoch, record)))
    model_b, records_b = finetune("margin", 0.01)
    assert [epoch for epoch, _ in seen] == list(range(1, EPOCHS + 1))
    assert [record for _, record in seen] == records_a == records_b
    assert set(records_a[0]) == {"epoch", "task_loss", "regularizer"}
    for (_, a), (_, b) in zip(weight_tensors(model_a), weight_tensors(model_b)):
        assert torch.equal(a, b)


def test_bad_arguments_raise_value_errors():
    model = mlp()
    with pytest.raises(ValueError, match="unknown regularizer kind"):
        RangeRegularizer(model, "l2", 1.0)
    with pytest.raises(ValueError, match="strength"):
        RangeRegularizer(model, "linf", -0.1)
    with pytest.raises(ValueError, match="strength"):
        RangeRegularizer(model, "linf", float("nan"))
    with pytest.raises(ValueError, match="no Conv1d, Conv2d or Linear"):
        RangeRegularizer(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), "kure", 1.0)
    with pytest.raises(ValueError, match="no weight tensors"):
        linf_loss([])
    with pytest.raises(ValueError, match="one margin per layer"):
        margin_loss([torch.ones(3), torch.ones(3)], torch.ones(3))
    data = toy_regression()
    with pytest.raises(ValueError, match="unknown regularizer kind"):
        regularized_finetune(model, data, nn.functional.mse_loss, "l1", 1.0, 1, 1e-2, 0)
    with pytest.raises(ValueError, match="epochs"):
        regularized_finetune(model, data, nn.functional.mse_loss, "linf", 1.0, 0, 1e-2, 0)
    with pytest.raises(ValueError, match="learning_rate"):
        regularized_finetune(model, data, nn.functional.mse_loss, "linf", 1.0, 1, -1.0, 0)
    with pytest.raises(ValueError, match="same length"):
        regularized_finetune(model, (data[0], data[1][:10]), nn.functional.mse_loss, "linf", 1.0, 1, 1e-2, 0)
