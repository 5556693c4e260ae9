"""OCTAV: Sakr, Dai, Tian, McDanel, Hwang, Khailany, Venkataramani, "Optimal Clipping and
Magnitude-aware Differentiation for Improved Quantization-aware Training" (ICML 2022).

Clipping a tensor X at ±s before quantizing trades rounding noise (a finer grid) against
clipping error (values beyond s). The paper models the mean squared error as

    J(s) = c · s² · P(|X| ≤ s)  +  E[(|X| − s)² · 1{|X| > s}]

where c·s² is the rounding noise Δ²/12 of a grid with step Δ (c = 4^{−B}/3 in the paper,
for 2^B levels spread over [−s, s]). Setting dJ/ds = 0 gives a fixed point that the paper
iterates, Newton-Raphson style, and which converges in a few steps:

    s_{n+1} = E[|X| · 1{|X| > s_n}] / ( c · P(|X| ≤ s_n) + P(|X| > s_n) )

Our grids: a symmetric signed grid stores S = s / qmax (qmax = 2^{B−1} − 1), so Δ = s / qmax
and c = 1 / (12 · qmax²); an asymmetric grid spreads 2^B − 1 steps over [m − s, m + s]
around the midpoint m of the range, so c = 4 / (12 · (2^B − 1)²), applied to |X − m|.
The clip is never beyond the data: s ≤ max |X|. The recursion leaves out the c·s²·p(s) term
of dJ/ds (p the density of |X| at s), so its fixed point is J's minimum up to about 1 % of J
at 2 bits and 0.2 % from 3 bits on (measured against a grid search in the tests).

Used as an observer (`observer: octav` in any weight scheme: RTN, GPTQ's groups, AWQ), and as
the `octav` algorithm: round-to-nearest with every range set by OCTAV.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore.algorithms.base import LayerResult, StageContext, replace_with_quantized
from quantcore.observers import make_observer
from quantcore.recipe import Stage
from quantcore.registry import Algorithm, register
from quantcore.schemes import QuantScheme, QuantType
from quantcore.targets import select_modules


def noise_coefficient(scheme: QuantScheme) -> float:
    """c in J(s): the rounding noise Δ²/12 of the scheme's grid, per unit s²."""
    if scheme.symmetric:
        return 1.0 / (12.0 * float(scheme.qmax) ** 2)
    return 4.0 / (12.0 * float(scheme.qmax - scheme.qmin) ** 2)


def octav_clip(magnitude: torch.Tensor, c: float, iterations: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """The OCTAV clipping scalar of each row of `magnitude` (G, n) ≥ 0: shape (G,)."""
    a = magnitude.double()
    n = a.shape[-1]
    s = a.mean(dim=-1)  # below max|x| unless a row is constant, where it is the answer already
    for _ in range(iterations):
        above = a > s[:, None]
        beyond = (a * above).sum(dim=-1)
        count_above = above.sum(dim=-1)
        denominator = c * (n - count_above) + count_above
        s_next = torch.where(count_above > 0, beyond / denominator.clamp(min=1e-300), s)
        converged = bool(((s_next - s).abs() <= tol * s.abs().clamp(min=1e-30)).all())
        s = s_next
        if converged:
            break
    return torch.minimum(s, a.amax(dim=-1)).to(magnitude.dtype)


def octav_range(rows: torch.Tensor, scheme: QuantScheme, iterations: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """OCTAV's clip range [lo, hi] of each row of `rows` (G, n) for `scheme`'s grid."""
    c = noise_coefficient(scheme)
    if scheme.symmetric:
        s = octav_clip(rows.abs(), c, iterations)
        return -s, s
    lo, hi = rows.amin(dim=-1), rows.amax(dim=-1)
    middle = (lo + hi) / 2
    s = octav_clip((rows - middle[:, None]).abs(), c, iterations)
    return torch.maximum(middle - s, lo), torch.minimum(middle + s, hi)


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
