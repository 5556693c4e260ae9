"""SVDQuant: Li, Lin, Zhang, Cai, Li, Guo, Xie, Meng, Zhu, Han, "SVDQuant: Absorbing Outliers
by Low-Rank Components for 4-Bit Diffusion Models" (ICLR 2025).

At 4 bits for both weights and activations, smoothing alone is not enough: moving the
activation outliers into the weights makes the weights hard to quantize instead. SVDQuant
gives the weight's outliers to a small 16-bit branch:

    1. smooth (SmoothQuant's migration, per input channel j):
           λ_j = max|X_j|^α / max|W_j|^(1−α),   X̂ = X diag(λ)⁻¹,  Ŵ = W diag(λ)
    2. low-rank branch: the rank-r truncated SVD of the smoothed weight,
           Ŵ = U Σ Vᵀ,   L1 = U_r Σ_r,   L2 = V_rᵀ     (L1 L2 = the best rank-r approximation)
    3. the residual R = Ŵ − L1 L2, whose singular values above the r-th are all that is
       left, is quantized to 4 bits (group-wise), and so are the activations X̂:
           X W ᵀ ≈ Q(X̂) Q(R)ᵀ + X̂ L2ᵀ L1ᵀ

The layer is `LowRankQuantizedLinear`; λ stays in it (the paper's kernel applies it inside
the activation quantization), so any Linear can be smoothed, not only those after a norm.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore.algorithms.base import LayerResult, StageContext
from quantcore.algorithms.gptq_stage import calibrated_targets
from quantcore.algorithms.smoothing import migration_scales
from quantcore.eval.layer_error import sqnr_db
from quantcore.modules.low_rank import LowRankQuantizedLinear
from quantcore.modules.quantized_linear import QuantizedLinear
from quantcore.observers import make_observer
from quantcore.pipeline import CalibrationBlock, run_blockwise
from quantcore.recipe import Stage
from quantcore.registry import Algorithm, register
from quantcore.schemes import QuantType
from quantcore.targets import set_module


class SVDQuantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(32, ge=1, le=1024, description="rank r of the 16-bit low-rank branch")
    alpha: float = Field(0.5, ge=0, le=1, description="smoothing migration strength")


def check_stage(stage: Stage) -> None:
    assert stage.weights is not None
    if stage.weights.type != QuantType.INT:
        raise ValueError("weights.type: svdquant quantizes the residual to an integer grid")
    act = stage.activations
    if act is not None and not act.dynamic:
        raise ValueError("activations: svdquant quantizes activations per call; set dynamic: true")


def decompose(W: torch.Tensor, act_absmax: torch.Tensor, rank: int, alpha: float):
    """(λ, L1, L2, R) with W diag(λ) = L1 L2 + R exactly (up to float rounding)."""
    smooth = migration_scales(act_absmax, W.abs().amax(dim=0), alpha)
    W_hat = W * smooth
    U, S, Vh = torch.linalg.svd(W_hat.double(), full_matrices=False)
    r = min(rank, S.numel())
    L1 = (U[:, :r] * S[:r]).float()
    L2 = Vh[:r].float()
    return smooth, L1, L2, W_hat - L1 @ L2


def svdquant_linear(linear: nn.Linear, act_absmax: torch.Tensor, stage: Stage, options: SVDQuantOptions) -> LowRankQuantizedLinear:
    W = linear.weight.detach().float()
    smooth, L1, L2, R = decompose(W, act_absmax, options.rank, options.alpha)
    # The branch is stored in float16: the residual is taken against the stored branch.
    L1, L2, smooth = L1.half(), L2.half(), smooth.half()
    R = W * smooth.float() - L1.float() @ L2.float()
    observer = make_observer(stage.weights)
    observer.update(R)
    residual_linear = nn.Linear(W.shape[1], W.shape[0], bias=linear.bias is not None)
    residual_linear.weight.data = R
    if linear.bias is not None:
        residual_linear.bias.data = linear.bias.detach().float().clone()
    residual = QuantizedLinear.from_float(
        residual_linear, stage.weights, stage.activations, observer.qparams(), getattr(torch, stage.scale_dtype)
    )
    layer = LowRankQuantizedLinear(residual, L1.shape[1])
    layer.lora_up.copy_(L1)
    layer.lora_down.copy_(L2)
    layer.smooth.copy_(smooth)
    return layer


def apply(model: nn.Module, stage: Stage, context: StageContext) -> list[LayerResult]:
    assert stage.weights is not None
    options = SVDQuantOptions.model_validate(stage.options)
    targets = calibrated_targets(model, stage, context)
    results: list[LayerResult] = []

    def quantize_block(block: CalibrationBlock) -> None:
        layers = block.layers(targets)
        absmax: dict[str, torch.Tensor] = {}

        def observer(name: str):
            def observe(x: torch.Tensor) -> None:
                m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
                absmax[name] = m if name not in absmax else torch.maximum(absmax[name], m)

            return observe

        block.forward({name: observer(name) for name in layers})
        for name, linear in layers.items():
            layer = svdquant_linear(linear, absmax[name], stage, options)
            set_module(model, name, layer)
            results.append(
                LayerResult(
                    name=name,
                    shape=(layer.out_features, layer.in_features),
                    weight_scheme=stage.weights.short_name(),
                    activation_scheme=stage.activations.short_name() if stage.activations else None,
                    sqnr_db=sqnr_db(linear.weight.detach().float(), layer.effective_weight()),
                    float16_bytes=linear.weight.numel() * 2,
                    quantized_bytes=layer.storage_bytes(),
                    extra={"svdquant_rank": layer.rank},
                )
            )

    run_blockwise(model, context.calibration, quantize_block, context.progress, context.compute_dtype, context.release_memory,
                  spill_dir=context.spill_dir)
    return results


register(
    Algorithm(
        name="svdquant",
        summary="SVDQuant: smoothing, a 16-bit low-rank branch, a 4-bit residual (Li et al., 2025)",
        options=SVDQuantOptions,
        apply=apply,
        check_stage=check_stage,
        requires_calibration=True,
    )
)
