"""OBQ, the Optimal Brain Quantizer: Frantar, Alistarh, "Optimal Brain Compression: A Framework
for Accurate Post-Training Quantization and Pruning" (NeurIPS 2022).

The exact greedy method that GPTQ approximates, for small layers and as GPTQ's test oracle.
The layer's squared output error ‖XWᵀ − XŴᵀ‖² separates over the rows w of W, each with
the same Hessian H = 2XᵀX. For one row, OBQ repeatedly quantizes the weight whose rounding
costs least once the others compensate optimally (Optimal Brain Surgeon's formulas):

    p   = argmin_q (quant(w_q) − w_q)² / [H⁻¹]_qq          over the weights not yet quantized
          (but first any weight the updates pushed beyond the grid's ends: the paper quantizes
          such outliers at once, while many weights are left to compensate their error)
    δ   = −(w_p − quant(w_p)) / [H⁻¹]_pp · H⁻¹[:, p]        the optimal update of the others
    H⁻¹ ← H⁻¹ − H⁻¹[:, p] H⁻¹[p, :] / [H⁻¹]_pp              p leaves the problem (Gaussian elimination)

GPTQ fixes the order (the same for every row, left to right) so that the H⁻¹ updates are
shared by all rows; OBQ picks each row's own order, at the price of one H⁻¹ per row:
O(rows · columns³) time and rows · columns² memory. The greedy order is not always the
better one: on SmolLM2's real k_proj inputs at 3 bits it measured twice GPTQ's output error
(while OBQ forced to GPTQ's order matches GPTQ), whereas on random correlated inputs it is
as good or better (tests/quantcore/models/test_real_layers.py, .../algorithms/test_obq.py). The quantization grid (S/Z per channel,
group or tensor) is fixed from the original weights before the greedy loop, like GPTQ's
static groups, so the two are compared on the same grid.
"""

from __future__ import annotations

import functools

import torch
from pydantic import BaseModel, ConfigDict, Field

from quantcore.algorithms import gptq_stage

from quantcore.algorithms.gptq import GPTQ, GPTQResult, _grouped_shape
from quantcore.observers import make_observer
from quantcore.qparams import QParams, grouped_view, qparams_from_range
from quantcore.registry import Algorithm, register
from quantcore.schemes import QuantScheme

MAX_ELEMENTS = 1 << 26  # rows · columns² of the per-row inverse Hessians: 256 MiB of float32


class OBQ(GPTQ):
    """Same Hessian accumulation as GPTQ (`add_batch`); exact greedy quantization."""

    stacks_rows = False  # its per-row inverse Hessians grow with the rows: keep layers apart

    def quantize(
        self,
        W: torch.Tensor,
        scheme: QuantScheme,
        damp: float = 0.01,
        scale_dtype: torch.dtype = torch.float16,
        greedy: bool = True,
        **_: object,  # GPTQ's ordering options do not apply: OBQ chooses the order itself
    ) -> GPTQResult:
        """`greedy=False` quantizes left to right instead: GPTQ's order, through OBQ's exact
        per-row updates (a check of the machinery: it must then match GPTQ's error)."""
        W = W.detach().float().clone()
        rows, columns = W.shape
        if rows * columns * columns > MAX_ELEMENTS:
            raise ValueError(
                f"obq keeps one {columns}x{columns} inverse Hessian per row: a {rows}x{columns} layer needs "
                f"{rows * columns * columns:,} values, over the limit of {MAX_ELEMENTS:,}; use gptq for layers this size"
            )
        H = self.H.double()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        H += damp * torch.mean(torch.diag(H)) * torch.eye(columns, dtype=H.dtype)

        # The grid, fixed from the original weights: S/Z per element, broadcast from the groups.
        observer = make_observer(scheme)
        observer.update(W)
        qparams = qparams_from_range(*observer.range(), scheme, scale_dtype)
        shape = grouped_view(W, scheme).shape
        scale_e = qparams.scale.expand(shape).reshape(rows, columns)
        zero_e = qparams.zero_point.expand(shape).reshape(rows, columns)

        def quant(values: torch.Tensor) -> torch.Tensor:
            q = (torch.round(values / scale_e.double()) + zero_e.double()).clamp(scheme.qmin, scheme.qmax)
            return (q - zero_e.double()) * scale_e.double()

        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H)).expand(rows, columns, columns).clone()
        w = W.double()  # float64 throughout: hundreds of rank-1 eliminations of an ill-conditioned H⁻¹
        done = torch.zeros(rows, columns, dtype=torch.bool)
        losses = torch.zeros(rows, dtype=torch.float64)
        index = torch.arange(rows)
        for _ in range(columns):
            q = quant(w)
            d = torch.diagonal(Hinv, dim1=1, dim2=2)
            score = (q - w) ** 2 / d
            score[done] = float("inf")
            p = score.argmin(dim=1) if greedy else done.sum(dim=1)
            # Outliers first (the paper's fix): a weight pushed beyond the grid's ends, whose
            # error exceeds half a step, goes now, while many weights are left to compensate.
            overshoot = torch.where(done, 0.0, (q - w).abs() - scale_e / 2)
            worst = overshoot.argmax(dim=1)
            if greedy:
                p = torch.where(overshoot[index, worst] > 0, worst, p)
            w_p, q_p, d_p = w[index, p], q[index, p], d[index, p]
            column = Hinv[index, :, p]  # H⁻¹[:, p] of each row
            w -= ((w_p - q_p) / d_p)[:, None] * column
            w[index, p] = q_p  # exactly on the grid (the update above lands there up to rounding)
            losses += ((w_p - q_p) ** 2 / d_p / 2).double()
            Hinv -= column[:, :, None] * Hinv[index, p, :][:, None, :] / d_p[:, None, None]
            done[index, p] = True  # its row and column of H⁻¹ are now zero: later updates leave it be
        Q = quant(w).float()
        grouped = _grouped_shape(scheme, rows, columns)
        qparams = QParams(scale=qparams.scale.reshape(grouped), zero_point=qparams.zero_point.reshape(grouped), scheme=scheme)
        return GPTQResult(Q=Q, qparams=qparams, loss=float(losses.sum()), perm=None, row_losses=losses.float())


class OBQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    damp: float = Field(0.01, gt=0, le=1, description="dampening, as a fraction of the mean diagonal of H")
    true_sequential: bool = Field(True, description="as gptq's: llama-style blocks in one true-sequential pass")


register(
    Algorithm(
        name="obq",
        summary="OBQ: exact greedy per-row quantization, the reference GPTQ approximates (Frantar & Alistarh, 2022)",
        options=OBQOptions,
        apply=functools.partial(gptq_stage.apply, solver=OBQ, options_model=OBQOptions),
        check_stage=gptq_stage.check_stage,
        requires_calibration=True,
    )
)
