"""BRECQ as a recipe stage: block reconstruction (`brecq.py`'s objective) on the blocks of a
transformer, where torch.fx cannot trace the model and the blocks come from the pipeline.

For each transformer block (`quantcore.pipeline.run_blockwise`), the roundings of all its
targeted Linears are learned together (AdaRound's `LearnedRounding`) so that the block, fed
the quantized model's hidden states, reproduces the float block's output:

    min_V  Σ_tokens Δzᵀ diag(F) Δz + λ Σ (1 − |2h(V) − 1|^β)

F is the Fisher diagonal (∂L/∂z)² of the float model's own next-token loss at each block
output, for a causal LM (`fisher: "lm"`); an encoder has no task loss on its embeddings, so
there F = 1 (`fisher: "none"`, the paper's "MSE" ablation), which is also `auto`'s choice for
anything but a causal LM. F is normalised to mean 1 per block, as in `brecq.py`.

Reconstruction runs on the first `samples` calibration samples (the Fisher is kept for those,
in float16: blocks × samples × tokens × hidden values). Dynamic activation quantization is
simulated inside the block while the roundings learn; static activation scales are not
supported by this stage.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field
from torch import nn
from torch.func import functional_call

from quantcore.algorithms import adaround_stage
from quantcore.algorithms.adaround import AdaRoundOptions, LearnedRounding, harden, learn_roundings
from quantcore.algorithms.base import LayerResult, StageContext, is_static, replace_with_quantized
from quantcore.algorithms.gptq_stage import calibrated_targets
from quantcore.modules.quantized_linear import fake_quant_activations
from quantcore.pipeline import CalibrationBlock, find_blocks, run_block, run_blockwise
from quantcore.recipe import Stage
from quantcore.registry import Algorithm, register

FISHER_BYTES_LIMIT = 2 << 30


class BRECQStageOptions(AdaRoundOptions):
    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(500, ge=1, le=100_000, description="steps per block, one sample each")
    samples: int = Field(16, ge=1, le=4096, description="calibration samples the blocks are reconstructed on")
    fisher: Literal["auto", "lm", "none"] = Field("auto", description="weigh the output error by the LM-loss Fisher")


def check_stage(stage: Stage) -> None:
    adaround_stage.check_stage(stage)  # the same learned roundings, on the same grids
    if is_static(stage.activations):
        raise ValueError(f"activations: {stage.algorithm} supports dynamic activations (dynamic: true) only")


def _is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "lm_head") and hasattr(model, "generation_config")


def lm_fisher(model: nn.Module, samples: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """(∂L/∂z)² at every block output z for each sample (float16), L the float model's mean
    next-token loss on the sample itself; only the hidden states take gradients."""
    blocks = find_blocks(model)
    grads: dict[str, list[torch.Tensor]] = {name: [] for name, _ in blocks}
    elements = sum(s.numel() for s in samples) * getattr(model.config, "hidden_size", 1) * len(blocks)
    if elements * 2 > FISHER_BYTES_LIMIT:
        raise ValueError(f"options.samples: the Fisher of {len(samples)} samples would take {elements * 2 / 1e9:.1f} GB; "
                         "use fewer samples or fisher: none")

    def keep(name: str):
        def hook(_module, _args, output):
            z = output[0] if isinstance(output, (tuple, list)) else output
            z.register_hook(lambda g: grads[name].append(g.detach().pow(2).to(torch.float16)))
        return hook

    def grad_from_here(_module, args, kwargs):  # weights stay frozen: only activations carry gradients
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    handles = [module.register_forward_hook(keep(name)) for name, module in blocks]
    handles.append(blocks[0][1].register_forward_pre_hook(grad_from_here, with_kwargs=True))
    requires = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            for sample in samples:
                model(input_ids=sample, labels=sample).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    out = {}
    for name, per_sample in grads.items():
        mean = torch.stack([g.float().mean() for g in per_sample]).mean().clamp_min(1e-30)
        out[name] = [(g.float() / mean).to(torch.float16) for g in per_sample]
    return out


def apply(model: nn.Module, stage: Stage, context: StageContext) -> list[LayerResult]:
    assert stage.weights is not None
    options = BRECQStageOptions.model_validate(stage.options)
    targets = calibrated_targets(model, stage, context)
    assert context.calibration is not None
    samples = context.calibration[: options.samples]
    use_lm = options.fisher == "lm" or (options.fisher == "auto" and _is_causal_lm(model))
    if use_lm and not _is_causal_lm(model):
        raise ValueError("options.fisher: 'lm' needs a causal language model; use 'none' for encoders")
    fisher = lm_fisher(model, samples) if use_lm else None
    scale_dtype = getattr(torch, stage.scale_dtype)
    generator = torch.Generator().manual_seed(context.seed)
    results: list[LayerResult] = []

    def quantize_block(block: CalibrationBlock) -> None:
        layers = block.layers(targets)
        if not layers:
            return
        module, inputs = block.module, block.inputs
        with torch.no_grad():
            targets_z = [run_block(module, h.float(), kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
        weights_of = {name[len(block.name) + 1 :] + ".weight": layer for name, layer in layers.items()}
        roundings = {key: LearnedRounding.on_grid(layer.weight.detach().float(), stage.weights, scale_dtype)
                     for key, layer in weights_of.items()}
        hooks = []
        if stage.activations is not None:  # the block computes as it will at run time (STE, so the
            # error still reaches the layers before each quantized input)
            def quantize_input(_module, args):
                x = args[0]
                return (x + (fake_quant_activations(x.detach(), stage.activations) - x).detach(),)

            hooks = [layer.register_forward_pre_hook(quantize_input) for layer in layers.values()]

        def error(weights: dict, i: int) -> torch.Tensor:
            # the pipeline's block call, with the given weights in place of the module's own
            call = lambda *args, **kwargs: functional_call(module, weights, args, kwargs)  # noqa: E731
            out = run_block(call, inputs.hidden[i].float(), inputs.kwargs[i])
            squared = (out - targets_z[i]).pow(2)
            if fisher is not None:
                squared = squared * fisher[block.name][i].float()
            return squared.sum() / (squared.numel() // squared.shape[-1])

        count = len(inputs.hidden)
        try:  # one sample per step
            learn_roundings(roundings, lambda w: error(w, int(torch.randint(0, count, (1,), generator=generator))), options)
            loss_nearest, loss_learned, chosen = harden(roundings, lambda w: sum(float(error(w, i)) for i in range(count)))
        finally:
            for handle in hooks:
                handle.remove()
        for key, layer in weights_of.items():
            name = f"{block.name}.{key.removesuffix('.weight')}"
            result = replace_with_quantized(model, name, layer, stage, qparams=roundings[key].qparams, weight=chosen[key])
            result.extra.update(brecq_block=block.name, brecq_loss_nearest=round(loss_nearest, 6),
                                brecq_loss=round(loss_learned, 6),
                                brecq_fisher="lm" if fisher is not None else "none")
            results.append(result)

    run_blockwise(model, samples, quantize_block, context.progress, "float32", context.release_memory,
                  spill_dir=context.spill_dir)
    return results


register(
    Algorithm(
        name="brecq",
        summary="BRECQ: roundings learned per block on the Fisher-weighted block output (Li et al., 2021)",
        options=BRECQStageOptions,
        apply=apply,
        check_stage=check_stage,
        requires_calibration=True,
    )
)
