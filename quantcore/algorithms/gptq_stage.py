"""GPTQ as a recipe stage: the wiring between the math in `gptq.py` and a model.

Block by block (`quantcore.pipeline.run_blockwise`). On llama-style blocks, one
true-sequential pass (`quantcore.segments`): q/k/v, o, gate/up and down are each
calibrated on the outputs of the layers quantized before them. On any other block,
hooks on the targeted Linears add their inputs to each layer's Hessian H = 2XᵀX while the
calibration samples run through the block. A pass over one sample first finds the
order the layers run in and which share an input; then each group is calibrated by one pass
through the block as it now is, the groups before it already quantized (swapped for
QuantizedLinear), and quantized (true-sequential; `true_sequential: false` quantizes every
layer from a single float pass). The quantized block's outputs become the next block's
inputs. OBQ (`obq.py`) shares this wiring with its own solver.

Layers fed the very same tensor (q/k/v projections after one norm, gate/up after another)
share one Hessian, accumulated once: the same arithmetic, done a third of the times.
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore import segments
from quantcore.algorithms.base import LayerResult, StageContext, replace_with_quantized
from quantcore.algorithms.gptq import GPTQ
from quantcore.pipeline import BlockInputs, CalibrationBlock, contains, find_blocks, run_blockwise
from quantcore.recipe import Stage
from quantcore.registry import Algorithm, register
from quantcore.qparams import QParams
from quantcore.schemes import Granularity, QuantType
from quantcore.targets import select_modules


class GPTQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    damp: float = Field(0.01, gt=0, le=1, description="dampening, as a fraction of the mean diagonal of H")
    block_size: int = Field(128, ge=1, le=4096, description="columns per lazy batch update")
    act_order: bool = Field(False, description="quantize columns in order of decreasing H_ii")
    static_groups: bool = Field(False, description="fix every group's S/Z from the weight before any update")
    true_sequential: bool = Field(
        True,
        description="quantize the layers group by group (q/k/v, o, gate/up, down), each calibrated on the "
        "already-quantized layers before it: one pass on llama-style blocks, one per group on others",
    )


def check_stage(stage: Stage) -> None:
    assert stage.weights is not None
    if stage.weights.type != QuantType.INT:
        raise ValueError(f"weights.type: {stage.algorithm} quantizes to integer grids")
    act = stage.activations
    if act is not None and not act.dynamic:
        raise ValueError(f"activations: {stage.algorithm} leaves activations to run-time quantization; set dynamic: true")


def accumulate_hessians(
    block: CalibrationBlock,
    layers: dict[str, nn.Linear],
    make_solver: Callable[[int], GPTQ] = GPTQ,
    also: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, GPTQ]:
    """Run the block's calibration inputs with a hook on each of `layers` that folds its input
    into that layer's Hessian. Layers that receive the same tensor share one accumulator: the
    first time a layer runs, its input is compared with the previous hooked layer's input.
    `also(name, x)` sees every input that is folded in, under the accumulator owner's name."""
    solvers: dict[str, GPTQ] = {}
    owner: dict[str, str] = {}  # layer -> the layer whose hook feeds its accumulator
    previous: list[tuple[str, torch.Tensor]] = []  # kept alive, so its address cannot be reused

    def observer(name: str) -> Callable[[torch.Tensor], None]:
        def observe(x: torch.Tensor) -> None:
            if name not in owner:
                if previous and _same_tensor(previous[0][1], x):
                    owner[name] = owner[previous[0][0]]
                    solvers[name] = solvers[owner[name]]
                else:
                    owner[name] = name
                    solvers[name] = make_solver(layers[name].in_features)
                previous[:] = [(name, x)]
            if owner[name] == name:
                solvers[name].add_batch(x)
                if also is not None:
                    also(name, x)

        return observe

    block.forward({name: observer(name) for name in layers})
    missing = [name for name in layers if name not in solvers]
    if missing:
        raise RuntimeError(f"the calibration forward never reached {', '.join(missing)}")
    return solvers


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def apply(
    model: nn.Module,
    stage: Stage,
    context: StageContext,
    solver: type[GPTQ] = GPTQ,
    options_model: type[BaseModel] = GPTQOptions,
) -> list[LayerResult]:
    """Block by block: accumulate each target layer's Hessian, then quantize it with `solver`
    (GPTQ, or OBQ, which shares the wiring)."""
    assert stage.weights is not None
    options = options_model.model_validate(stage.options)
    solve_options = options.model_dump(exclude={"true_sequential"})
    targets = calibrated_targets(model, stage, context)
    scale_dtype = getattr(torch, stage.scale_dtype)
    results: list[LayerResult] = []

    def quantize_layers(names: list[str], accumulated: GPTQ) -> None:
        """Quantize `names`, layers that share the Hessian in `accumulated`: stacked into one
        matrix when the solver allows it and the scheme keeps S/Z per row (rows are solved
        independently, so this is the same result as one layer at a time, for less work)."""
        stackable = accumulated.stacks_rows and stage.weights.granularity != Granularity.TENSOR
        for stack in [names] if stackable else [[name] for name in names]:
            linears = [targets[name] for name in stack]
            W = torch.cat([linear.weight.detach().float() for linear in linears])
            result = accumulated.quantize(W, stage.weights, scale_dtype=scale_dtype, **solve_options)
            start = 0
            for name, linear in zip(stack, linears):
                rows = slice(start, start + linear.out_features)
                start = rows.stop
                qparams = QParams(scale=result.qparams.scale[rows], zero_point=result.qparams.zero_point[rows], scheme=stage.weights)
                layer = replace_with_quantized(model, name, linear, stage, qparams=qparams, weight=result.Q[rows])
                layer.extra[f"{stage.algorithm}_loss"] = round(float(result.row_losses[rows].sum()), 6)
                results.append(layer)

    def quantize_block(block: CalibrationBlock) -> None:
        layers = block.layers(targets)
        if options.true_sequential and segments.supports(block):
            solvers: dict[str, GPTQ] = {}

            def observe(group: tuple[str, ...], x: torch.Tensor) -> None:
                names = [f"{block.name}.{n}" for n in group if f"{block.name}.{n}" in layers]
                if names and names[0] not in solvers:
                    shared = solver(layers[names[0]].in_features)
                    solvers.update({name: shared for name in names})
                if names:
                    solvers[names[0]].add_batch(x)

            def quantize_group(group: list[str]) -> None:
                names = [f"{block.name}.{n}" for n in group if f"{block.name}.{n}" in layers]
                if names:
                    quantize_layers(names, solvers[names[0]])
                for name in names:
                    del solvers[name]

            segments.run_true_sequential(block, observe, quantize_group)
            return
        if not options.true_sequential:
            for names, shared in _sharing(accumulate_hessians(block, layers, solver)):
                quantize_layers(names, shared)
            return
        # Any other block, true-sequential the general way: a pass over the first sample finds
        # the order the layers run in and which share an input; then each group is calibrated
        # on the block as it is now, with the groups before it quantized (one pass per group).
        first = BlockInputs(block.inputs.hidden[:1], block.inputs.kwargs[:1])
        probe = CalibrationBlock(block.name, block.module, first, block.compute_dtype)
        for group, _ in _sharing(accumulate_hessians(probe, layers, solver)):
            for names, shared in _sharing(accumulate_hessians(block, {name: layers[name] for name in group}, solver)):
                quantize_layers(names, shared)

    run_blockwise(model, context.calibration, quantize_block, context.progress, context.compute_dtype, context.release_memory,
                  spill_dir=context.spill_dir)
    return results


def _sharing(solvers: dict[str, GPTQ]) -> list[tuple[list[str], GPTQ]]:
    """The layers of `solvers` grouped by the accumulator they share, in the order they ran."""
    groups: dict[int, tuple[list[str], GPTQ]] = {}
    for name, accumulated in solvers.items():
        groups.setdefault(id(accumulated), ([], accumulated))[0].append(name)
    return list(groups.values())


def calibrated_targets(model: nn.Module, stage: Stage, context: StageContext) -> dict[str, nn.Linear]:
    """The stage's target layers, checked for what a block-by-block algorithm needs."""
    if not context.calibration:
        raise ValueError(f"{stage.algorithm} needs calibration data: run it as a job, or pass calibration samples")
    targets = dict(select_modules(model, stage.targets, stage.ignore))
    block_names = [name for name, _ in find_blocks(model)]
    outside = [name for name in targets if not any(contains(b, name) for b in block_names)]
    if outside:
        raise ValueError(
            f"{stage.algorithm} quantizes the layers inside the model's blocks; {', '.join(outside)} lie outside: "
            "add them to 'ignore' or quantize them in an rtn stage"
        )
    return targets


register(
    Algorithm(
        name="gptq",
        summary="GPTQ: Hessian-aware rounding with lazy batch updates (Frantar et al., 2022)",
        options=GPTQOptions,
        apply=apply,
        check_stage=check_stage,
        requires_calibration=True,
    )
)
