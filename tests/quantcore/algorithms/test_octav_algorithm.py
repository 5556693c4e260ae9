"""OCTAV against independent references: a dense grid search of the paper's MSE model J(s)
(and of its two-sided form for asymmetric grids), a grid search of the real fake-quant error,
and min-max; then the `octav` algorithm and `observer: octav` in parsed recipes."""

import pytest
import torch
from torch import nn

from quantcore import quantize
from quantcore.algorithms.octav import noise_coefficient, octav_clip, octav_clip_asymmetric, octav_range
from quantcore.qparams import fake_quant, qparams_from_range
from quantcore.recipe import Recipe
from quantcore.schemes import QuantScheme


def sample(kind: str, n: int = 8000, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n)
    if kind == "laplace":
        return torch.distributions.Laplace(0.0, 1.0).sample((n,))
    if kind == "student_t":
        return torch.distributions.StudentT(3.0).sample((n,))
    return torch.distributions.Gamma(2.0, 1.0).sample((n,)) - 1.0  # skewed: short left side, long right tail


def model_mse(x: torch.Tensor, s: torch.Tensor, c: float) -> torch.Tensor:
    """The paper's J(s) = c·s²·P(|X| ≤ s) + E[(|X| − s)²·1{|X| > s}] at every candidate s, from its definition."""
    a = x.abs().double()[None, :]
    out = []
    for chunk in s.double().split(200):
        t = chunk[:, None]
        out.append(c * chunk**2 * (a <= t).double().mean(1) + ((a - t).clamp(min=0) ** 2).mean(1))
    return torch.cat(out)


def model_mse_two_sided(x: torch.Tensor, a: float, b: torch.Tensor, c: float) -> torch.Tensor:
    """J(a, b) = c·(b − a)²·P(a ≤ X ≤ b) + E[(a − X)²·1{X < a}] + E[(X − b)²·1{X > b}] for every b."""
    v, t = x.double()[None, :], b.double()[:, None]
    inside = ((v >= a) & (v <= t)).double().mean(1)
    return c * (b.double() - a) ** 2 * inside + ((a - v).clamp(min=0) ** 2).mean(1) + ((v - t).clamp(min=0) ** 2).mean(1)


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_clip_is_the_minimum_of_the_mse_model(kind, bits):
    x = sample(kind)
    c = noise_coefficient(bits)
    s = octav_clip(x[None, :], bits)[0]
    grid = torch.linspace(1e-3, float(x.abs().max()), 2000)
    errors = model_mse(x, grid, c)
    best = float(grid[errors.argmin()])
    # The recursion drops the c·s²·p(s) term of J′ (the paper's approximation): it matters at few bits.
    excess = {2: 0.02, 3: 0.003, 4: 0.001, 8: 1e-4}[bits]
    assert float(model_mse(x, s[None], c)[0]) <= float(errors.min()) * (1 + excess)
    assert abs(float(s) - best) <= {2: 0.1, 3: 0.03, 4: 0.02, 8: 0.01}[bits] * best
    # s is the fixed point of the paper's iteration
    a = x.abs().double()
    above = a > float(s)
    inside, outside = (~above).double().mean(), above.double().mean()
    assert float(s) == pytest.approx(float((a * above).mean() / (c * inside + outside)), rel=1e-5)


def test_noise_coefficient_is_the_rounding_noise_of_our_grids():
    # symmetric: S = s / qmax with qmax = 2^{B−1} − 1; the paper's 4^{−B}/3 assumes Δ = 2s / 2^B
    assert noise_coefficient(4) == pytest.approx((1 / 7) ** 2 / 12)
    assert noise_coefficient(8) == pytest.approx(4.0**-8 / 3, rel=0.02)
    assert noise_coefficient(4, symmetric=False) == pytest.approx((1 / 15) ** 2 / 12)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_clip_is_the_minimum_of_the_two_sided_model(bits):
    x = sample("gamma", n=4000)
    c = noise_coefficient(bits, symmetric=False)
    a, b = (float(v[0]) for v in octav_clip_asymmetric(x[None, :], bits))
    assert float(x.min()) <= a <= 0 <= b <= float(x.max())
    sides = torch.linspace(0, float(x.max()), 200)
    brute = min(float(model_mse_two_sided(x, float(lo), sides, c).min()) for lo in torch.linspace(float(x.min()), 0, 100))
    ours = float(model_mse_two_sided(x, a, torch.tensor([b]), c)[0])
    assert ours <= brute * (1 + {2: 0.05, 3: 0.03, 4: 0.01, 8: 0.002}[bits])


def real_mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Mean (x − fake_quant(x))² of `x` for each candidate range [lo_k, hi_k] (one per row)."""
    lo, hi = lo.reshape(-1, 1).float(), hi.reshape(-1, 1).float()
    rows = x[None, :].expand(lo.shape[0], -1)
    qp = qparams_from_range(lo, hi, scheme.model_copy(update={"granularity": "channel"}))
    return (fake_quant(rows, qp) - rows).double().pow(2).mean(1)


@pytest.mark.parametrize("kind", ["laplace", "student_t", "gamma"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_is_as_good_as_a_brute_force_search_of_real_quantization(kind, symmetric):
    x = sample(kind, n=4000, seed=1)
    scheme = QuantScheme(bits=4, symmetric=symmetric, granularity="tensor")
    lo, hi = octav_range(x[None, :], scheme)
    ours = float(real_mse(x, lo, hi, scheme))
    if symmetric:
        t = torch.linspace(0.005, 1, 2000) * x.abs().max()
        brute = float(real_mse(x, -t, t, scheme).min())
    else:
        his = torch.linspace(0, float(x.max()), 200)
        los = torch.linspace(float(x.min()), 0, 100)
        brute = min(float(real_mse(x, lo_k.expand(200), his, scheme).min()) for lo_k in los)
    minmax = float(real_mse(x, x.min(), x.max(), scheme))
    assert ours <= brute * 1.03  # the model ignores where the grid's points fall: close, not equal
    assert ours < 0.7 * minmax  # heavy tails: clipping pays (0.28 to 0.58 here)


def test_rows_are_independent_and_degenerate_rows_are_safe():
    rows = [sample("laplace", 512, seed=2), 3 * sample("gaussian", 512, seed=3), torch.zeros(512), torch.full((512,), -2.0)]
    x = torch.stack(rows)
    s = octav_clip(x, 3)
    for r in range(2):
        torch.testing.assert_close(s[r], octav_clip(x[r : r + 1], 3)[0])
    assert s[2] == 1 and s[3] == 2  # zeros: any positive s; a constant: no clipping
    lo, hi = octav_clip_asymmetric(x, 3)
    assert torch.isfinite(lo).all() and torch.isfinite(hi).all() and (lo < hi).all()
    assert lo[3] == -2 and hi[3] == 0  # all negative: the range still reaches 0
    positive = octav_clip_asymmetric(x[:1].abs() + 0.5, 3)
    assert positive[0] == 0 and 0.5 < positive[1] < x[0].abs().max() + 0.5  # all positive: one side is clipped


@pytest.mark.parametrize("bits", [2, 3])
def test_rows_that_hop_around_their_fixed_point_do_not_depend_on_where_it_stops(bits):
    # Groups of 16 values: some rows' iterates cycle (period 2 or 3) around a fixed point that
    # falls between two sample values; each gets its cycle's mean, whatever the iteration count.
    rows = sample("gaussian", 16 * 4096, seed=5).reshape(-1, 16)
    runs = [octav_clip(rows, bits, iterations=k) for k in (40, 41, 42)]
    for run in runs[1:]:
        torch.testing.assert_close(run, runs[0], rtol=0, atol=0)
    runs = [torch.stack(octav_clip_asymmetric(rows, bits, iterations=k)) for k in (40, 41, 42)]
    for run in runs[1:]:
        torch.testing.assert_close(run, runs[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------ recipes
def heavy_tailed_weights() -> torch.Tensor:
    torch.manual_seed(4)
    return torch.distributions.StudentT(3.0).sample((48, 96)) * 0.05


def weight_mse(recipe: Recipe) -> float:
    weights = heavy_tailed_weights()
    model = nn.Sequential(nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 96))
    model[0].weight.data = weights.clone()
    model[2].weight.data = weights.T.contiguous()
    quantize(model, recipe)
    error = (model[0].dequantize_weight() - weights).pow(2).mean() + (model[2].dequantize_weight() - weights.T).pow(2).mean()
    return float(error)


@pytest.mark.parametrize(
    "weights,gain",
    # Rows of 96 values, groups of only 16: the fewer the values, the less clipping pays and the
    # rougher the model's Δ²/12 noise (the MSE observer, which measures real error, gets 0.70 there).
    [
        ({"bits": 3}, 0.75),
        ({"bits": 3, "symmetric": False}, 0.92),
        ({"bits": 3, "granularity": "group", "group_size": 16}, 0.95),
    ],
)
def test_recipes_with_octav_lower_weight_error_at_3_bits(weights, gain):
    def stage(algorithm, weights, **options):
        return Recipe.parse({"stages": [{"algorithm": algorithm, "weights": weights, "options": options}]})

    plain = weight_mse(stage("rtn", weights))
    as_observer = weight_mse(stage("rtn", {**weights, "observer": "octav"}))
    as_algorithm = weight_mse(stage("octav", weights, iterations=100))
    assert as_observer < gain * plain
    assert as_algorithm == pytest.approx(as_observer, rel=1e-6)


def test_octav_recipe_from_yaml_and_its_validation():
    recipe = Recipe.parse("stages:\n  - algorithm: octav\n    weights: {bits: 4, granularity: channel}\n")
    assert recipe.stages[0].algorithm == "octav"
    bad = [
        ({"iterations": 0}, {"bits": 4}, "iterations"),
        ({"grid": 10}, {"bits": 4}, "grid"),
        ({}, {"type": "fp8_e4m3"}, "integer"),
        ({}, {"bits": 4, "observer": "mse"}, "observer"),
    ]
    for options, weights, message in bad:
        with pytest.raises(ValueError, match=message):
            Recipe.parse({"stages": [{"algorithm": "octav", "weights": weights, "options": options}]})
