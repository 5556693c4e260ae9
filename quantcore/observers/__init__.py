"""Observers: statistics of a tensor collected over `update(x)` calls, turned into (S, Z).

An observer follows one tensor (a weight, or one layer's activations over calibration
batches) and decides the range [a, b] that the scheme's grid will cover; `qparams()` then
maps that range to S and Z with `quantcore.qparams.qparams_from_range`, which also widens it
to contain 0. Every reduction goes through `grouped_view`, so per-tensor, per-channel and
per-group statistics all have the shape of S (the grouped view with its last dim reduced to 1).

    minmax          running min / max                              (the default; exact range)
    moving_average  exponential moving average of per-batch min / max (PyTorch's observer)
    percentile      lower / upper percentile of the values seen     (clips rare outliers)
    histogram       histogram, then the range of least expected MSE  (PyTorch's HistogramObserver)
    mse             grid search of the clip ratio of least actual MSE (GPTQ's `Quantizer.find_params`)
    octav           OCTAV's MSE-optimal clip, by its fixed-point iteration (Sakr et al., 2022)

    observer = make_observer(scheme)
    for batch in calibration:
        observer.update(batch)
    qp = observer.qparams()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from quantcore.qparams import QParams, fake_quant, grouped_view, qparams_from_range
from quantcore.schemes import QuantScheme


class Observer(ABC):
    """Collects statistics of one tensor under one scheme; produces its QParams.

    Subclasses implement `update`, `range` and `reset`; `qparams` maps the range onto the
    grid. A subclass whose S/Z are not a function of a range may override `qparams` too.
    """

    def __init__(self, scheme: QuantScheme) -> None:
        self.scheme = scheme
        # Shape of S for the tensor being observed, fixed by the first update: an observer
        # follows one tensor, so a later batch with different groups is a caller's error.
        self._stat_shape: torch.Size | None = None

    @abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Fold another observation of the tensor into the statistics."""

    @abstractmethod
    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range [a, b] the grid should cover, each shaped like S."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything observed (the scheme is kept)."""

    def qparams(self) -> QParams:
        lo, hi = self.range()
        return qparams_from_range(lo, hi, self.scheme)

    # --- helpers for subclasses -------------------------------------------------------------
    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as a float (G, n) matrix: one row per (S, Z) pair, checked against earlier updates."""
        xg = grouped_view(x.detach(), self.scheme).float()
        shape = xg.shape[:-1] + (1,)
        if self._stat_shape is None:
            self._stat_shape = shape
        elif shape != self._stat_shape:
            raise ValueError(
                f"{type(self).__name__}: this update has quantization groups of shape {tuple(shape)} "
                f"but earlier ones had {tuple(self._stat_shape)}; use one observer per tensor"
            )
        return xg.reshape(-1, xg.shape[-1])

    def _as_stat(self, v: torch.Tensor) -> torch.Tensor:
        """A per-group vector (G,) reshaped like S."""
        assert self._stat_shape is not None
        return v.reshape(self._stat_shape)

    def _require_data(self, observed: bool) -> None:
        if not observed:
            raise RuntimeError(f"{type(self).__name__}: no data observed yet; call update(x) before qparams()")


# The subclasses import `Observer` from this package, so they are imported after it is defined.
from quantcore.observers.histogram import HistogramObserver
from quantcore.observers.minmax import MinMaxObserver
from quantcore.observers.moving_average import MovingAverageMinMaxObserver
from quantcore.observers.mse import MSEObserver
from quantcore.observers.octav import OctavObserver
from quantcore.observers.percentile import PercentileObserver

OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "histogram": HistogramObserver,
    "mse": MSEObserver,
    "octav": OctavObserver,
}


def make_observer(scheme: QuantScheme, **options: Any) -> Observer:
    """The observer that `scheme.observer` names; `options` go to its constructor."""
    name = scheme.observer
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer '{name}'; choose one of: {', '.join(OBSERVERS)}")
    return OBSERVERS[name](scheme, **options)


def fake_quant_weight(W: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """W rounded to `scheme`'s grid, with the range its observer picks from W alone."""
    observer = make_observer(scheme)
    observer.update(W)
    return fake_quant(W, observer.qparams())


__all__ = [
    "OBSERVERS",
    "fake_quant_weight",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "OctavObserver",
    "PercentileObserver",
    "make_observer",
]
