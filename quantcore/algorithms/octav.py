"""OCTAV: Sakr, Dai, Tian, McDanel, Hwang, Khailany, Venkataramani, "Optimal Clipping and
Magnitude-aware Differentiation for Improved Quantization-aware Training" (ICML 2022).

Clipping X at ±s before quantizing with B bits trades rounding noise (a finer grid) against
clipping error (values beyond s). The paper models the mean squared error as

    J(s) = (4^{−B}/3) · s² · E[1{|X| ≤ s}]  +  E[(|X| − s)² · 1{|X| > s}]

and minimises it by Newton-Raphson on J′ (dropping the Dirac terms of the indicators), which
collapses to the fixed-point iteration

    s_{n+1} = E[|X| · 1{|X| > s_n}] / ( (4^{−B}/3) · E[1{|X| ≤ s_n}] + E[1{|X| > s_n}] ).

Which B. (4^{−B}/3) · s² is Δ²/12, the noise of uniform rounding with step Δ = 2s / 2^B: 2^B
levels across [−s, s], so the paper's B counts the sign bit, like our `bits` (not B − 1). Our
signed grid stores S = s / qmax with qmax = 2^{B−1} − 1 (codes −qmax..qmax cover [−s, s]; the
extra code −2^{B−1} lies beyond the clip), so its real step is Δ = s / qmax, a little coarser
than 2s / 2^B (2× at 2 bits, 14 % at 4, 0.4 % at 8). We use that exact step: c = Δ²/(12 s²) =
1 / (12 · qmax²) takes the place of 4^{−B}/3 in both formulas, so the noise the iteration
weighs is that of the grid the tensor is stored on. Everything else is the paper's.

The recursion leaves the c · s² · p(s) term (p the density of |X| at s) out of J′, so its fixed
point is J's minimum only approximately: J there is within about 1 % of its minimum at 2 bits,
0.2 % at 3 and 0.02 % from 4 bits on (the tests hold it to a grid search of J). `octav_clip`
starts from s₀ = E|X| and evaluates the expectations exactly on the sorted sample (prefix
sums), so each step costs O(G log n) after one sort; about 10 steps settle a large weight.

Asymmetric grids (our extension; the paper clips symmetrically). An unsigned grid of 2^B − 1
steps over [a, b] has c′ = 1 / (12 · (2^B − 1)²) and the same model with two sides,

    J(a, b) = c′ (b − a)² P(a ≤ X ≤ b) + E[(a − X)² 1{X < a}] + E[(X − b)² 1{X > b}].

The paper's Newton step taken for each side in turn (Gauss-Seidel) gives

    b ← ( E[X · 1{X > b}] + c′ · a · P(a ≤ X ≤ b) ) / ( c′ · P(a ≤ X ≤ b) + P(X > b) )
    a ← ( E[X · 1{X < a}] + c′ · b · P(a ≤ X ≤ b) ) / ( c′ · P(a ≤ X ≤ b) + P(X < a) )

whose fixed point, for data symmetric about 0, is the symmetric one (b = −a = s, c = 4c′). Each side
is kept on its side of 0 (a ≤ 0 ≤ b, as `qparams_from_range` requires), so skewed data (a long
positive tail, all-positive values) gets its own clip on each side rather than one about a
midpoint. A side with no data beyond it is not moved. Dropping the density terms costs more
here (two sides): J is within about 2.5 % of its minimum at 2 bits, 1.5 % at 3, 0.5 % at 4.

fp8 grids are not uniform, so the model does not apply: their range is min-max.

Used as an observer (`observer: octav` in any weight scheme: RTN, GPTQ's groups, AWQ), and as
the `octav` algorithm: round-to-nearest with every range set by OCTAV.
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore.algorithms.base import LayerResult, StageContext, replace_with_quantized
from quantcore.algorithms.rtn import check_stage as check_rtn_stage
from quantcore.observers import make_observer
from quantcore.recipe import Stage
from quantcore.registry import Algorithm, register
from quantcore.schemes import QuantScheme, QuantType
from quantcore.targets import select_modules


def noise_coefficient(bits: int, symmetric: bool = True) -> float:
    """c with rounding noise Δ²/12 = c · s² (symmetric, range ±s) or c · (b − a)² (asymmetric)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return 1.0 / (12.0 * qmax**2)
    return 1.0 / (12.0 * (2**bits - 1) ** 2)


def _sorted_with_prefix(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row sorted ascending, and its prefix sums: prefix[:, k] = sum of the k smallest."""
    xs = x.double().sort(dim=-1).values
    prefix = torch.cat([torch.zeros_like(xs[:, :1]), xs.cumsum(dim=-1)], dim=-1)
    return xs, prefix


def _count_at_most(xs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """How many values of each sorted row are ≤ t (one t per row)."""
    return torch.searchsorted(xs, t[:, None].contiguous(), right=True)[:, 0]


def _count_below(xs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """How many values of each sorted row are < t."""
    return torch.searchsorted(xs, t[:, None].contiguous(), right=False)[:, 0]


def _iterate(
    step: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor, iterations: int, tol: float, memory: int = 8
) -> torch.Tensor:
    """v ← step(v) for the state v (G, k) of every row, until every row has settled.

    On a finite sample the step is piecewise constant, and a fixed point that falls between two
    sample values can be hopped around forever: the iterates of such a row repeat with a short
    period. A row settles when its relative change is at most `tol` or when it returns to one of
    its last `memory` states; a cycling row gets the mean of its cycle, so the result does not
    depend on where in the cycle `iterations` stops.
    """

    def close(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return ((new - old).abs() <= tol * old.abs().clamp(min=1e-30)).all(dim=-1)

    history = [v]
    period = torch.zeros(v.shape[0], dtype=torch.long, device=v.device)  # 0: not (yet) seen cycling
    for _ in range(iterations):
        v = step(v)
        for back, old in enumerate(reversed(history), start=1):
            period = torch.where((period == 0) & (v == old).all(dim=-1), back, period)
        history = (history + [v])[-memory:]
        if (close(v, history[-2]) | (period > 0)).all():
            break
    states = torch.stack(history)
    for p in range(2, len(history) + 1):
        v = torch.where((period == p)[:, None], states[-p:].mean(dim=0), v)
    return v


def octav_clip(x: torch.Tensor, bits: int, iterations: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """OCTAV's clipping scalar s of each row of `x` (G, n) for a signed `bits`-bit grid: (G,).

    Rows are independent (per-tensor is one row, per-channel or per-group one row each).
    s ≤ max|x|; a row of zeros gets s = 1 (any s represents it exactly), never 0 or NaN.
    """
    c = noise_coefficient(bits, symmetric=True)
    a, prefix = _sorted_with_prefix(x.abs())
    n, amax, total = a.shape[-1], a[:, -1], prefix[:, -1]

    def step(state: torch.Tensor) -> torch.Tensor:
        s = state[:, 0]
        inside = _count_at_most(a, s)  # n · E[1{|X| ≤ s}]
        outside = n - inside  # n · E[1{|X| > s}]
        beyond = total - prefix.gather(-1, inside[:, None])[:, 0]  # n · E[|X| · 1{|X| > s}]
        s_next = beyond / (c * inside + outside).clamp(min=1e-300)
        return torch.where(outside > 0, s_next, s)[:, None]  # nothing beyond s: no clipping to do

    s0 = total / n  # E|X|: below max|X| unless every |x| is equal, where it is the answer
    s = torch.minimum(_iterate(step, s0[:, None], iterations, tol)[:, 0], amax)
    return torch.where(amax > 0, s, torch.ones_like(s)).to(x.dtype)


def octav_clip_asymmetric(
    x: torch.Tensor, bits: int, iterations: int = 50, tol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-sided clip [a, b] ∋ 0 of each row of `x` (G, n) for an unsigned `bits`-bit grid."""
    c = noise_coefficient(bits, symmetric=False)
    xs, prefix = _sorted_with_prefix(x)
    n, total = xs.shape[-1], prefix[:, -1]
    zero = torch.zeros_like(total)

    def step(state: torch.Tensor) -> torch.Tensor:
        a, b = state[:, 0], state[:, 1]
        below_a, at_most_b = _count_below(xs, a), _count_at_most(xs, b)
        inside, above = at_most_b - below_a, n - at_most_b
        beyond = total - prefix.gather(-1, at_most_b[:, None])[:, 0]  # n · E[X · 1{X > b}]
        b_next = (beyond + c * a * inside) / (c * inside + above).clamp(min=1e-300)
        b = torch.where(above > 0, b_next.clamp(min=0), b)
        inside, below = _count_at_most(xs, b) - below_a, below_a
        under = prefix.gather(-1, below_a[:, None])[:, 0]  # n · E[X · 1{X < a}]
        a_next = (under + c * b * inside) / (c * inside + below).clamp(min=1e-300)
        a = torch.where(below > 0, a_next.clamp(max=0), a)
        return torch.stack([a, b], dim=-1)

    # Start inside the data: the mean of each side (0 for a side without data).
    negatives, non_positives = _count_below(xs, zero), _count_at_most(xs, zero)
    a0 = prefix.gather(-1, negatives[:, None])[:, 0] / negatives.clamp(min=1)
    b0 = (total - prefix.gather(-1, non_positives[:, None])[:, 0]) / (n - non_positives).clamp(min=1)
    a, b = _iterate(step, torch.stack([a0, b0], dim=-1), iterations, tol).unbind(dim=-1)
    a, b = torch.maximum(a, torch.minimum(xs[:, 0], zero)), torch.minimum(b, torch.maximum(xs[:, -1], zero))
    empty = a == b  # a row of zeros: any range represents it exactly
    return torch.where(empty, -torch.ones_like(a), a).to(x.dtype), torch.where(empty, torch.ones_like(b), b).to(x.dtype)


def octav_range(
    rows: torch.Tensor, scheme: QuantScheme, iterations: int = 50, tol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """OCTAV's clip range [lo, hi] of each row of `rows` (G, n) for `scheme`'s grid: two (G,)."""
    if scheme.is_fp8:
        return rows.amin(dim=-1), rows.amax(dim=-1)
    if scheme.symmetric:
        s = octav_clip(rows, scheme.bits, iterations, tol)
        return -s, s
    return octav_clip_asymmetric(rows, scheme.bits, iterations, tol)


# -------------------------------------------------------------------------- the algorithm
class OctavOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(50, ge=1, le=1000, description="fixed-point iterations at most")


def check_stage(stage: Stage) -> None:
    assert stage.weights is not None
    if stage.weights.type != QuantType.INT:
        raise ValueError("weights.type: octav clips for integer grids")
    if stage.weights.observer not in ("minmax", "octav"):
        raise ValueError(f"weights.observer: octav sets the range itself; got '{stage.weights.observer}'")
    check_rtn_stage(stage)


def apply(model: nn.Module, stage: Stage, context: StageContext) -> list[LayerResult]:
    assert stage.weights is not None
    options = OctavOptions.model_validate(stage.options)
    scheme = stage.weights.model_copy(update={"observer": "octav"})
    layers = select_modules(model, stage.targets, stage.ignore)
    results = []
    for i, (name, linear) in enumerate(layers):
        observer = make_observer(scheme, iterations=options.iterations)
        observer.update(linear.weight.detach().float())
        results.append(replace_with_quantized(model, name, linear, stage, qparams=observer.qparams()))
        context.progress(i + 1, len(layers), name)
    return results


register(
    Algorithm(
        name="octav",
        summary="OCTAV: MSE-optimal clipping by its Newton-Raphson iteration, then round-to-nearest (Sakr et al., 2022)",
        options=OctavOptions,
        apply=apply,
        check_stage=check_stage,
    )
)
