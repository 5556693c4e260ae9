"""EWGS: Lee, Kim, Ham, "Network Quantization with Element-wise Gradient Scaling" (CVPR 2021).

The straight-through estimator passes the gradient of the rounding's output unchanged to its
input, g_{x_n} = g_{x_q}, whatever the discretization error x_n − x_q. EWGS scales each
element of the gradient by that error and by the gradient's sign:

    g_{x_n} = g_{x_q} · (1 + δ · sign(g_{x_q}) · (x_n − x_q)),    δ ≥ 0

x_n is the clipped, normalized input of the discretizer and x_q = ⌊x_n⌉ its output. Descent
moves x_n by −g: when that is away from the side x_n lies on (g and x_n − x_q of the same
sign), x_n has more than half a step to travel before x_q changes, and the gradient is
enlarged; when it is toward that side (x_n is already near the next level), it is damped.
δ = 0 is the STE.

Units of δ. The paper normalizes the discretizer's input to [0, 1] (its levels 0, 1/L, ..., 1,
L = 2^b − 1), so its x_n − x_q lies in [−1/(2L), 1/(2L)]. Our grid is LSQ's, in integer units:

    v̂ = ⌊clamp(v/s, −Q_N, Q_P)⌉ · s,     x_n = clamp(v/s, −Q_N, Q_P),   x_q = ⌊x_n⌉

where x_n − x_q lies in [−½, ½]. The two are the same affine map apart, (x_n + Q_N)/L, so the
paper's rule, written in our units, is

    g_{x_n} = g_{x_q} · (1 + δ · sign(g_{x_q}) · (x_n − x_q) / L)

and `delta` means what the paper's δ means (the same number behaves the same at every bit
width). At 1 bit (the authors' fixed-δ runs, L = 1) the two units coincide.

δ from the Hessian (`delta="hessian"`). The paper derives δ from a first-order expansion of
the gradient about x_q, g_{x_n} ≈ g_{x_q} + H (x_n − x_q), with H the loss's Hessian w.r.t. x_q
replaced by its average diagonal, Tr(H)/N, and the gradient's magnitude by a representative
value G = 3σ(g_{x_q}) (three standard deviations of the gradient's elements):

    δ = (Tr(H)/N) / G,      clipped at 0

Tr(H) is estimated with Hutchinson's method (E[vᵀHv] over Rademacher v, one Hessian-vector
product each), per quantizer (per layer, separately for weights and activations), averaged
over a few batches, and refreshed periodically (the authors' code: every epoch, on 10 batches;
δ is 0, the STE, until the first estimate). That needs the network's loss, which a quantizer
does not see: call `update_hessian_deltas(model, loss_of_batch, batches)` from the training
loop. δ is scale-equivariant (H scales with the square of the unit, g with the unit), so we
estimate it in integer units and multiply by L to report the paper's δ.

The step s is LSQ's, unchanged: a learned parameter initialized to 2⟨|v|⟩/√Q_P whose gradient
is scaled by 1/√(N · Q_P) (see `lsq.py`), so a comparison of EWGS against LSQ isolates the
gradient rule of the rounding. (The paper's own quantizer learns an interval [l, u] and an
output scale instead; the gradient rule is what EWGS proposes.)

The fixed default δ = 1e-3 is the value of the authors' released fixed-δ configuration.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore.algorithms.lsq import LSQQuantizer, scale_gradient


class EWGSOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delta: Annotated[float, Field(ge=0)] | Literal["hessian"] = Field(
        1e-3, description="δ in the paper's units (grid normalized to [0, 1]); 'hessian': see update_hessian_deltas"
    )


class EWGSRound(torch.autograd.Function):
    """x_q = ⌊x_n⌉ forward; g_{x_n} = g_{x_q} · (1 + δ′ · sign(g_{x_q}) · (x_n − x_q)) backward, with
    δ′ the scaling factor per unit of x_n (δ / L for the paper's δ)."""

    @staticmethod
    def forward(ctx, x_n: torch.Tensor, delta_per_unit: torch.Tensor) -> torch.Tensor:
        x_q = torch.round(x_n)
        ctx.save_for_backward(x_n - x_q, delta_per_unit)
        return x_q

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        error, delta_per_unit = ctx.saved_tensors
        return g * (1 + delta_per_unit * torch.sign(g) * error), None


class EWGSQuantizer(LSQQuantizer):
    """LSQ's learned-step grid with EWGS's backward through the rounding.

    Options: `delta` (float ≥ 0, default 1e-3, in the paper's units) or `delta="hessian"`
    (δ starts at 0 and is set by `update_hessian_deltas`).
    """

    def __init__(self, bits: int, signed: bool | None = None, **options: Any) -> None:
        parsed = EWGSOptions(**options)  # pydantic's ValidationError is a ValueError
        super().__init__(bits, signed)
        self.options = parsed
        self.hessian = self.options.delta == "hessian"
        self.register_buffer("delta", torch.tensor(0.0 if self.hessian else float(self.options.delta)))
        self._capture = False  # set by update_hessian_deltas: keep x_q of the next forward
        self._x_q: torch.Tensor | None = None

    @property
    def L(self) -> int:
        """Steps of the grid: the paper's 2^b − 1, over which it normalizes x_n to [0, 1]."""
        return self.Q_N + self.Q_P

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = scale_gradient(self.s, self.gradient_scale(x))
        x_n = torch.clamp(x / s, -self.Q_N, self.Q_P)
        x_q = EWGSRound.apply(x_n, (self.delta / self.L).to(x_n.dtype))
        if self._capture:
            self._x_q = x_q
        return x_q * s

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, delta={'hessian: ' if self.hessian else ''}{float(self.delta):.3g}"


def _hutchinson_trace(g: torch.Tensor, x: torch.Tensor, probes: int, generator: torch.Generator) -> float:
    """Tr(∂g/∂x) ≈ mean over Rademacher v of vᵀ (∂g/∂x) v, one Hessian-vector product per v."""
    if not g.requires_grad:  # the loss is linear in x: H = 0
        return 0.0
    total = 0.0
    for _ in range(probes):
        v = torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1
        (Hv,) = torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True, allow_unused=True)
        total += 0.0 if Hv is None else float((v * Hv).sum())
    return total / probes


def update_hessian_deltas(
    model: nn.Module,
    loss_of_batch: Callable[[Any], torch.Tensor],
    batches: Iterable[Any],
    probes: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """Set δ = (Tr(H)/N) / (3σ(g_{x_q})), clipped at 0, for every EWGSQuantizer of `model` made
    with delta="hessian", averaged over `batches` (`loss_of_batch(batch)` runs the model and
    returns the loss); returns the new δ by quantizer name. The paper's schedule: every epoch,
    on 10 batches."""
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, EWGSQuantizer) and m.hessian}
    if not quantizers:
        return {}
    generator = torch.Generator().manual_seed(seed)
    sums = dict.fromkeys(quantizers, 0.0)
    count = 0
    for batch in batches:
        for q in quantizers.values():
            q._capture, q._x_q = True, None
        try:
            loss = loss_of_batch(batch)
        finally:
            for q in quantizers.values():
                q._capture = False
        seen = {name: q._x_q for name, q in quantizers.items() if q._x_q is not None}
        for q in quantizers.values():
            q._x_q = None
        count += 1
        if not seen:
            continue
        # g = ∂loss/∂x_q with its own graph, so that H v = ∂(gᵀv)/∂x_q
        grads = torch.autograd.grad(loss, list(seen.values()), create_graph=True, allow_unused=True)
        for (name, x_q), g in zip(seen.items(), grads):
            if g is None:
                continue
            G = 3 * float(g.detach().std()) if g.numel() > 1 else 0.0  # the paper's representative |g|
            if G > 0:
                trace = _hutchinson_trace(g, x_q, probes, generator)
                sums[name] += trace / x_q.numel() / G
    deltas = {}
    for name, q in quantizers.items():
        # δ in integer units, times L: the paper's δ (see the module docstring)
        delta = max(0.0, sums[name] / max(count, 1)) * q.L
        q.delta.fill_(delta)
        deltas[name] = delta
    return deltas
