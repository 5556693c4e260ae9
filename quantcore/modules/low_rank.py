"""`LowRankQuantizedLinear`: SVDQuant's layer, a 4-bit GEMM beside a 16-bit low-rank branch.

    x̂ = x / smooth                               per-input-channel smoothing (fused into the
                                                 activation quantization in SVDQuant's kernel)
    y = Q(x̂) · Q(R)ᵀ + (x̂ · L2ᵀ) · L1ᵀ + b       R: the quantized residual (a QuantizedLinear)
                                                 L1 (out × r), L2 (r × in): the low-rank branch

Storage: the residual's packed codes and scales, L1, L2 and `smooth` in float16.

On CUDA inputs, with fast paths enabled on the residual (`enable_fast_path`), the layer runs
as the fused Triton kernels of `quantcore.kernels.w4a4_lowrank` (`gpu_paths.choose_lowrank`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantcore.modules import gpu_paths
from quantcore.modules.quantized_linear import QuantizedLinear


class LowRankQuantizedLinear(nn.Module):
    def __init__(self, residual: QuantizedLinear, rank: int, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = residual.in_features, residual.out_features, rank
        self.residual = residual
        self.register_buffer("lora_up", torch.zeros(self.out_features, rank, dtype=dtype))  # L1
        self.register_buffer("lora_down", torch.zeros(rank, self.in_features, dtype=dtype))  # L2
        self.register_buffer("smooth", torch.ones(self.in_features, dtype=dtype))
        self._gpu_path: gpu_paths.GpuPath | None | bool = False  # False: not chosen yet

    @property
    def weight_scheme(self):
        return self.residual.weight_scheme

    @property
    def activation_scheme(self):
        return self.residual.activation_scheme

    @property
    def bias(self):
        return self.residual.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.residual, "fast_path", "off") != "off" and x.device.type == "cuda":  # (compute modules have none)
            if self._gpu_path is False:
                self._gpu_path = gpu_paths.choose_lowrank(self, x.device)
            if self._gpu_path is not None:
                return self._gpu_path(x, self)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        x_hat = x / self.smooth.to(x.dtype)
        low_rank = F.linear(F.linear(x_hat, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        return self.residual(x_hat) + low_rank

    def _apply(self, fn, recurse=True):
        self._gpu_path = False  # moved or cast: choose again
        return super()._apply(fn, recurse)

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this layer applies to x when activations are not quantized."""
        w_hat = self.residual.dequantize_weight(torch.float32) + self.lora_up.float() @ self.lora_down.float()
        return (w_hat / self.smooth.float()).to(dtype)

    def compute_module(self, dtype: torch.dtype) -> nn.Module:
        """For calibration forwards of later blocks: the same computation in `dtype`."""
        work = LowRankQuantizedLinear.__new__(LowRankQuantizedLinear)
        nn.Module.__init__(work)
        work.in_features, work.out_features, work.rank = self.in_features, self.out_features, self.rank
        work.residual = self.residual.compute_module(dtype)
        work._gpu_path = None  # calibration forwards run the reference
        for name in ("lora_up", "lora_down", "smooth"):
            work.register_buffer(name, getattr(self, name).to(dtype))
        return work

    def storage_bytes(self) -> int:
        branch = sum(b.numel() * b.element_size() for b in (self.lora_up, self.lora_down, self.smooth))
        return self.residual.storage_bytes() + branch

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
