"""Per-layer weight error as signal-to-quantization-noise ratio."""

from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """10·log10(‖W‖² / ‖W − Ŵ‖²); +inf when the two are identical."""
    signal = reference.double().pow(2).sum().item()
    noise = (reference.double() - approximation.double()).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise)
