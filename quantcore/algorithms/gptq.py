"""GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023), the math only.

For one linear layer with weight W (rows × columns) and calibration inputs X, GPTQ minimises
‖XWᵀ − XQᵀ‖² column by column: quantize column i, then spread its error over the columns not
yet quantized, weighted by the inverse Hessian H⁻¹ of the layer's squared error (H = 2XᵀX).

    1. H = 2/n Σ x xᵀ over the calibration inputs                         (add_batch)
    2. dead inputs (H_ii = 0): H_ii = 1 and W[:, i] = 0
    3. act-order (optional): permute columns by decreasing H_ii
    4. dampening: H += λI, λ = damp · mean(diag H)
    5. U = upper Cholesky factor of H⁻¹ (the rows of H⁻¹ GPTQ needs, in closed form)
    6. for each block of `block_size` columns, for each column i in it:
           q_i = quantize(w_i);  e_i = (w_i − q_i) / U_ii
           w_j −= e_i · U_ij for the later columns j of the block
       then the lazy batch update of all columns after the block: W −= E · U[block, rest]
    7. group-wise S/Z: computed from the updated weights when a group's first column comes up
       (static_groups: from the original W for every group, before any update; act-order
       always uses static groups so a group's S/Z never depends on the permuted order)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantcore.observers import make_observer
from quantcore.qparams import QParams, qparams_from_range
from quantcore.schemes import Granularity, QuantScheme


@dataclass
class GPTQResult:
    Q: torch.Tensor  # dequantized weight, on the grid of `qparams`
    qparams: QParams  # grouped-view shaped, as QuantizedLinear stores them
    loss: float  # Σ (w − q)² / U_ii², GPTQ's own error estimate
    perm: torch.Tensor | None
    row_losses: torch.Tensor  # the same, per row of W (a stacked matrix's layers take their rows' share)


class GPTQ:
    """Accumulates one layer's Hessian from its calibration inputs, then quantizes its weight."""

    flush_rows = 2048  # inputs are multiplied in batches of this many rows: XᵀX is faster tall
    # Rows never interact (each is solved against the same H⁻¹), so layers that share a
    # Hessian can be quantized as one stacked matrix: one Cholesky and one column loop.
    stacks_rows = True

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self._xtx = torch.zeros(columns, columns, dtype=torch.float32)  # Σ x xᵀ
        self.nsamples = 0
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0

    def add_batch(self, X: torch.Tensor) -> None:
        """Fold more layer inputs (..., columns) into H = 2/n Σ x xᵀ."""
        X = X.detach().reshape(-1, self.columns)
        self._pending.append(X)
        self._pending_rows += X.shape[0]
        if self._pending_rows >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        X = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_rows = [], 0
        self.nsamples += X.shape[0]
        add_upper_gram(self._xtx, X)

    @property
    def H(self) -> torch.Tensor:
        self._flush()
        return (torch.triu(self._xtx) + torch.triu(self._xtx, diagonal=1).T) * (2 / max(self.nsamples, 1))

    @H.setter
    def H(self, value: torch.Tensor) -> None:  # tests and callers with a Hessian of their own
        self._pending, self._pending_rows = [], 0
        self.nsamples = 2
        self._xtx = value.float().clone()

    def quantize(
        self,
        W: torch.Tensor,
        scheme: QuantScheme,
        damp: float = 0.01,
        block_size: int = 128,
        act_order: bool = False,
        static_groups: bool = False,
        scale_dtype: torch.dtype = torch.float16,
    ) -> GPTQResult:
        W = W.detach().float().clone()
        rows, columns = W.shape
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        group = scheme.group_size if scheme.granularity == Granularity.GROUP else columns
        if columns % group != 0:
            raise ValueError(f"group_size {group} does not divide the input dimension {columns}")
        # S/Z per group of original columns, stored (groups, rows) so that the column loop reads
        # one contiguous row per column; filled up front when static.
        scaleT = torch.empty(columns // group, rows)
        zeroT = torch.zeros(columns // group, rows)
        fixed = static_groups or act_order or scheme.granularity != Granularity.GROUP
        row_scheme = _per_row(scheme)

        def set_group(g: int, weights: torch.Tensor) -> None:
            observer = make_observer(row_scheme)
            observer.update(weights)
            qp = qparams_from_range(*observer.range(), row_scheme, scale_dtype)
            scaleT[g] = qp.scale.reshape(-1)
            zeroT[g] = qp.zero_point.reshape(-1)

        if scheme.granularity == Granularity.TENSOR:
            set_group(0, W.reshape(1, -1))
            scaleT[:] = scaleT[0, 0]
            zeroT[:] = zeroT[0, 0]
        elif fixed:
            for g in range(columns // group):
                set_group(g, W[:, g * group : (g + 1) * group])

        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
        original_column = perm if perm is not None else torch.arange(columns)

        H += damp * torch.mean(torch.diag(H)) * torch.eye(columns)
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        # Work on Wᵀ: one column of W is then one contiguous row, which is what the loop reads
        # and updates once per column. Python ints and floats for what the loop only indexes.
        WT = W.T.contiguous()
        QT = torch.empty_like(WT)
        losses = torch.zeros(rows)
        column_order = original_column.tolist()
        groups_of = [c // group for c in column_order]
        starts_group = [not fixed and c % group == 0 for c in column_order]
        symmetric = scheme.symmetric
        qmin, qmax = scheme.qmin, scheme.qmax
        for start in range(0, columns, block_size):
            end = min(start + block_size, columns)
            W1, U1 = WT[start:end].clone(), U[start:end, start:end]
            E1 = torch.zeros_like(W1)  # (w − q) / U_ii of each column of the block
            diagonal = U1.diagonal().tolist()
            for i in range(end - start):
                g = groups_of[start + i]
                if starts_group[start + i]:
                    set_group(g, _current_group(WT, W1, E1, U, start, i, group).T)
                w, q = W1[i], QT[start + i]
                # qparams.fake_quant written out for one column: this loop runs once per column
                if symmetric:
                    torch.div(w, scaleT[g], out=q).round_().clamp_(qmin, qmax).mul_(scaleT[g])
                else:
                    torch.div(w, scaleT[g], out=q).round_().add_(zeroT[g]).clamp_(qmin, qmax).sub_(zeroT[g]).mul_(scaleT[g])
                err = torch.sub(w, q, out=E1[i]).div_(diagonal[i])
                W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)
            losses += E1.square().sum(dim=0) / 2
            WT[end:] -= U[start:end, end:].T @ E1
        Q = QT.T.contiguous()

        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        scale, zero = scaleT.T, zeroT.T
        if scheme.granularity == Granularity.TENSOR:
            scale, zero = scale[:1, :1], zero[:1, :1]
        shape = _grouped_shape(scheme, rows, columns)
        qparams = QParams(scale=scale.reshape(shape), zero_point=zero.reshape(shape), scheme=scheme)
        return GPTQResult(Q=Q, qparams=qparams, loss=float(losses.sum()), perm=perm, row_losses=losses)


GRAM_BLOCK = 192  # columns per block row of add_upper_gram: wide enough to keep the GEMMs efficient


def add_upper_gram(accumulator: torch.Tensor, X: torch.Tensor) -> None:
    """accumulator += XᵀX on and above the diagonal blocks only: XᵀX is symmetric, so the
    blocks below the diagonal repeat the ones above (with 1536 columns in blocks of 192,
    this is 9/16 of the multiplies). The blocks below are left as they were: read the
    result through its upper triangle (`GPTQ.H`). X in another dtype than the accumulator
    (bfloat16 calibration forwards) is multiplied in the accumulator's: a bfloat16 product
    rounds each entry to 8 bits, which leaves XᵀX with negative eigenvalues of a few
    thousandths of its largest, more than the dampening covers, and the Cholesky fails."""
    X = X.to(accumulator.dtype)
    columns = X.shape[1]
    for start in range(0, columns, GRAM_BLOCK):
        end = min(start + GRAM_BLOCK, columns)
        accumulator[start:end, start:].addmm_(X[:, start:end].T, X[:, start:])


def _current_group(WT, W1, E1, U, start: int, i: int, group: int) -> torch.Tensor:
    """The up-to-date weights of the group starting at column start + i, as (group, rows)
    rows of Wᵀ. Inside the block they are in W1; columns past the block still owe the
    block's pending lazy update (−Uᵀ · E1 for the columns quantized so far), applied here so
    that the result does not depend on block_size."""
    inside = W1[i : i + group]
    missing = group - inside.shape[0]
    if missing <= 0:
        return inside
    end = start + W1.shape[0]
    beyond = WT[end : end + missing] - U[start : start + i, end : end + missing].T @ E1[:i]
    return torch.cat([inside, beyond], dim=0)


def _per_row(scheme: QuantScheme) -> QuantScheme:
    """The scheme's grid with one S/Z per row of whatever the observer is given."""
    return scheme.model_copy(update={"granularity": Granularity.CHANNEL, "group_size": None})


def _grouped_shape(scheme: QuantScheme, rows: int, columns: int) -> tuple[int, ...]:
    if scheme.granularity == Granularity.GROUP:
        return (rows, columns // scheme.group_size, 1)
    if scheme.granularity == Granularity.TENSOR:
        return (1, 1)
    return (rows, 1)
