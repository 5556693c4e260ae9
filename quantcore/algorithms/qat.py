"""Quantization-aware training: fine-tune a network through fake-quantizers so that it learns
to live with its grid (levels 3-4 of the roadmap seed: more effort than PTQ, better low-bit
accuracy).

The loop is the same for every QAT paper; what differs is the quantizer (what is learned: the
step s for LSQ, also the offset β for LSQ+, the clip α for PACT, the thresholds for N2UQ, the
centroids for k-means/DKM; and how the gradient passes the rounding: plain STE, EWGS's
element-wise scaling, MAD). Each paper's quantizer lives in its own file; `METHODS` maps a
recipe's method name to the pair (weight quantizer, input quantizer) that method uses.

    model → fold BN → [optional PTQ start: DFQ or AdaRound] → wrap every conv/linear with
    quantizers (first and last layer at 8 bits) → train (Adam, cosine schedule, early stopping
    on a held-out share of the training data) → the model evaluates with frozen quantizers.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore.algorithms.lsq import LSQPlusQuantizer, LSQQuantizer
from quantcore.algorithms.pact import PACTQuantizer
from quantcore.algorithms.quantsim import (FakeQuantizer, StaticQuantizer, bits_per_layer, per_tensor_schemes,
                                          weighted_layers, wrap_layers)


def _ste_weight(bits: int) -> FakeQuantizer:
    return StaticQuantizer(bits, signed=True, track="current")


def _ste_input(bits: int) -> FakeQuantizer:
    return StaticQuantizer(bits, track="ema")


def _method_table() -> dict[str, tuple[Callable[[int], FakeQuantizer], Callable[[int], FakeQuantizer]]]:
    """(weight quantizer, input quantizer) per method, each made from a bit width."""
    from quantcore.algorithms.dkm import DKMQuantizer, KMeansQuantizer
    from quantcore.algorithms.ewgs import EWGSQuantizer
    from quantcore.algorithms.mad import MADQuantizer
    from quantcore.algorithms.n2uq import N2UQQuantizer

    lsq_weight = lambda b: LSQQuantizer(b, signed=True)  # noqa: E731
    return {
        "ste": (_ste_weight, _ste_input),  # min-max fake quant, straight-through estimator
        "lsq": (lsq_weight, LSQQuantizer),
        "lsq+": (lsq_weight, LSQPlusQuantizer),  # LSQ+: learned offsets for the inputs
        "pact": (lsq_weight, PACTQuantizer),  # PACT's clip on the inputs, LSQ weights
        "ewgs": (lambda b: EWGSQuantizer(b, signed=True), EWGSQuantizer),
        "mad": (lambda b: MADQuantizer(b, signed=True), MADQuantizer),  # OCTAV re-clipping + MAD
        "n2uq": (lsq_weight, N2UQQuantizer),  # N2UQ's learned thresholds on the inputs, LSQ weights
        "kmeans": (KMeansQuantizer, LSQQuantizer),  # codebook weights (2^b centroids), LSQ inputs
        "dkm": (DKMQuantizer, LSQQuantizer),  # differentiable k-means weights, LSQ inputs
    }


QATMethod = Literal["ste", "lsq", "lsq+", "pact", "ewgs", "mad", "n2uq", "kmeans", "dkm"]


class QATOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: QATMethod = "lsq"
    weight_bits: int = Field(4, ge=2, le=8)
    activation_bits: int | None = Field(8, ge=2, le=8, description="None keeps activations float")
    first_last_bits: int | None = Field(8, ge=2, le=8, description="bits of the first and last layer; None: as the rest")
    init: Literal["float", "dfq", "adaround"] = Field("float", description="start from the float weights or a PTQ result")
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=65_536)
    learning_rate: float = Field(1e-3, gt=0)
    quantizer_learning_rate: float = Field(1e-2, gt=0, description="for the quantizers' own parameters (s, β, α, ...)")
    weight_decay: float = Field(0.0, ge=0)
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="training samples held out for early stopping")
    patience: int | None = Field(None, ge=1, le=1000, description="stop after this many epochs without a better validation loss")
    loss: Literal["cross_entropy", "distill_mse"] = "cross_entropy"
    seed: int = Field(0, ge=0, le=2**31 - 1)


@dataclass
class QATReport:
    method: str
    epochs: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_loss, val_top1 (classification)
    best_epoch: int = 0
    stopped_early: bool = False


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_qat(model: nn.Module, options: QATOptions, calibration: torch.Tensor | None = None) -> nn.Module:
    """Fold BN, apply the PTQ start if asked, and wrap every conv/linear with the method's
    quantizers, in place. `calibration` (a batch of inputs) is needed for the PTQ starts."""
    from quantcore.algorithms.dfq import fold_batchnorm

    weight_bits = bits_per_layer(model, options.weight_bits, options.first_last_bits)
    if options.init == "dfq":
        _ptq_start(model, options, calibration)  # DFQ folds BN itself: it needs the statistics
    else:
        fold_batchnorm(model)  # a deployed network has no BN: train what will be deployed
        if options.init == "adaround":
            _ptq_start(model, options, calibration)
    names = weighted_layers(model)
    first_last = {names[0], names[-1]} if options.first_last_bits is not None else set()
    make_weight, make_input = _method_table()[options.method]
    activation_bits = None
    if options.activation_bits is not None:
        activation_bits = bits_per_layer(model, options.activation_bits, options.first_last_bits)

    def weight_quantizer(name: str, _layer: nn.Module, bits: int) -> FakeQuantizer:
        return _ste_weight(bits) if name in first_last else make_weight(bits)

    def input_quantizer(name: str, _layer: nn.Module, bits: int) -> FakeQuantizer:
        return _ste_input(bits) if name in first_last else make_input(bits)

    wrap_layers(model, weight_bits, activation_bits, weight_quantizer, input_quantizer)
    return model


def _ptq_start(model: nn.Module, options: QATOptions, calibration) -> None:
    """Replace the float weights by a PTQ result on the same grid: QAT then starts there."""
    from quantcore.algorithms.adaround import adaround_model
    from quantcore.algorithms.dfq import data_free_quantize, weight_quantizer

    schemes = per_tensor_schemes(model, options.weight_bits, options.first_last_bits)
    if options.init == "dfq":
        quantizers = {name: weight_quantizer(scheme) for name, scheme in schemes.items()}
        data_free_quantize(model, None, data=None if calibration is None else [calibration], per_layer=quantizers)
    else:
        if calibration is None:
            raise ValueError("init 'adaround' needs calibration data")
        adaround_model(model, None, [calibration], seed=options.seed, per_layer=schemes)


def _loss(options: QATOptions, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if options.loss == "cross_entropy":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def _penalties(model: nn.Module) -> torch.Tensor | float:
    return sum((m.penalty() for m in model.modules() if isinstance(m, FakeQuantizer) and hasattr(m, "penalty")), 0.0)


@torch.no_grad()
def _evaluate(model: nn.Module, options: QATOptions, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    outputs = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
    record = {"val_loss": float(_loss(options, outputs, y))}
    if options.loss == "cross_entropy":
        record["val_top1"] = float((outputs.argmax(1) == y).float().mean()) * 100
    return record


def train_qat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, options: QATOptions,
              progress: Callable[[int, dict], None] | None = None, teacher: nn.Module | None = None) -> QATReport:
    """Train a prepared model on (x, y): labels for cross-entropy, or, with
    loss='distill_mse', y ignored and the float `teacher`'s outputs as targets."""
    if options.loss == "distill_mse":
        if teacher is None:
            raise ValueError("loss 'distill_mse' needs the float teacher model")
        with torch.no_grad():
            teacher.eval()
            y = torch.cat([teacher(x[i : i + 256]) for i in range(0, len(x), 256)])
    _seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    order = torch.randperm(len(x), generator=generator)
    held = int(len(x) * options.validation_fraction)
    val_index, train_index = order[:held], order[held:]
    if len(train_index) == 0:
        raise ValueError("no training samples left after holding out the validation share")
    with torch.no_grad():  # initialise every quantizer on one batch, so its parameters exist for the optimizer
        model.train()
        model(x[train_index[: options.batch_size]])
    quantizer_params = {id(p) for m in model.modules() if isinstance(m, FakeQuantizer) and not m.trains_like_weights
                        for p in m.parameters()}
    params = [p for p in model.parameters() if id(p) not in quantizer_params]
    q_params = [p for p in model.parameters() if id(p) in quantizer_params]
    optimizer = torch.optim.Adam([
        {"params": params, "lr": options.learning_rate, "weight_decay": options.weight_decay},
        {"params": q_params, "lr": options.quantizer_learning_rate},
    ])
    steps = options.epochs * math.ceil(len(train_index) / options.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    report = QATReport(method=options.method)
    best_loss, best_state, since_best = math.inf, None, 0
    for epoch in range(1, options.epochs + 1):
        model.train()
        shuffled = train_index[torch.randperm(len(train_index), generator=generator)]
        total, seen = 0.0, 0
        for i in range(0, len(shuffled), options.batch_size):
            index = shuffled[i : i + options.batch_size]
            loss = _loss(options, model(x[index]), y[index])
            total, seen = total + loss.item() * len(index), seen + len(index)
            optimizer.zero_grad()
            (loss + _penalties(model)).backward()
            optimizer.step()
            schedule.step()
        record = {"epoch": epoch, "train_loss": total / seen}
        if held:
            record.update(_evaluate(model, options, x[val_index], y[val_index]))
        report.epochs.append(record)
        if progress is not None:
            progress(epoch, record)
        score = record.get("val_loss", record["train_loss"])
        if score < best_loss:
            best_loss, best_state, since_best, report.best_epoch = score, copy.deepcopy(model.state_dict()), 0, epoch
        else:
            since_best += 1
            if options.patience is not None and since_best >= options.patience:
                report.stopped_early = True
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return report
