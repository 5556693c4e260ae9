"""BRECQ: Li, Gong, Tan, Yang, Hu, Zhang, Yu, Wang, Gu, "BRECQ: Pushing the Limit of
Post-Training Quantization by Block Reconstruction" (ICLR 2021).

AdaRound reconstructs one layer's output at a time, which ignores how the layers of a block
interact (the second conv of a residual block can make up for the first's error, which
layer-wise reconstruction never lets it do); reconstructing the whole network at once
overfits the small calibration set. BRECQ reconstructs one *block* at a time (a residual
block, a transformer block) and weighs each output element by how much the task loss cares
about it, a second-order argument (section 3.2-3.3):

    min_V  E[ Δzᵀ diag((∂L/∂z)²) Δz ] + λ Σ_layers Σ (1 − |2h(V) − 1|^β)      (eq. 10)

z is the block's output, Δz = ẑ − z its error with the soft AdaRound weights of every layer
in the block (and the quantized model's input to the block), and diag((∂L/∂z)²) the
Fisher-information diagonal, a stand-in for the block output's Hessian of the task loss.
The rounding and its annealed regulariser are AdaRound's (`adaround.LearnedRounding`).

Blocks are found in the traced graph (torch.fx) as the regions between *cut points*: nodes
whose value is, at that point of the forward pass, the only one still needed later. A
residual block has no cut point inside (its input stays alive until the add), nor has a
concat of branches, so each lands whole in one block; a plain chain is cut after each layer
and its activation function. The model is the composition of its blocks.

Choices of ours: the Fisher diagonal is normalised to mean 1 per block, so λ weighs the
regulariser against the error as AdaRound's does; the gradients come from the float model's
cross-entropy on the calibration labels (or on its own predictions when none are given).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call

from quantcore.algorithms.adaround import AdaRoundOptions, LearnedRounding, harden, learn_roundings
from quantcore.algorithms.quantsim import WEIGHTED


@dataclass
class Block:
    layers: list[str]  # the conv/linear layers inside, in graph order
    module: fx.GraphModule  # one tensor in (the previous block's output), one tensor out


@dataclass
class BlockResult:
    layers: list[str]
    loss_nearest: float  # Fisher-weighted output error with round-to-nearest weights
    loss_learned: float  # the same with the learned rounding (never above loss_nearest)


def _cut_points(graph: fx.Graph) -> list[fx.Node]:
    """Nodes after which only their own value is still needed by later nodes."""
    nodes = [n for n in graph.nodes if n.op != "output"]
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index.get(u, len(nodes)) for u in n.users), default=index[n]) for n in nodes}
    cuts = []
    for i, node in enumerate(nodes):
        live = [n for n in nodes[: i + 1] if last_use[n] > i and n.op != "get_attr"]
        if live == [node]:
            cuts.append(node)
    return cuts


def find_blocks(model: nn.Module) -> list[Block]:
    """`model` split into blocks at the cut points of its traced graph; regions without a
    conv/linear layer (an activation, a pooling) join the block before them."""
    traced = fx.symbolic_trace(model)
    graph, modules = traced.graph, dict(model.named_modules())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError("BRECQ's block split needs a model with a single tensor input")
    cuts = _cut_points(graph)
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    segments: list[list[fx.Node]] = [[]]
    for node in nodes:
        segments[-1].append(node)
        if node in cuts:
            segments.append([])
    segments = [s for s in segments if s]

    def layers_in(segment):
        return [str(n.target) for n in segment if n.op == "call_module" and isinstance(modules[str(n.target)], WEIGHTED)]

    merged: list[list[fx.Node]] = []
    for segment in segments:
        if merged and (not layers_in(segment) or not layers_in(merged[-1])):
            merged[-1].extend(segment)
        else:
            merged.append(list(segment))
    blocks, block_input = [], placeholders[0]
    for segment in merged:
        sub = fx.Graph()
        env = {block_input: sub.placeholder("x")}
        for node in segment:
            env[node] = sub.node_copy(node, lambda n: env[n])
        sub.output(env[segment[-1]])
        blocks.append(Block(layers_in(segment), fx.GraphModule(model, sub)))
        block_input = segment[-1]
    return blocks


def fisher_diagonals(blocks: list[Block], x: torch.Tensor, labels: torch.Tensor | None) -> list[torch.Tensor]:
    """(∂L/∂z)² at every block output z, L the float model's cross-entropy, normalised to mean 1.
    Gradients are taken with respect to the outputs only: the parameters are left alone
    (frozen or not, with or without gradients of the caller's)."""
    with torch.enable_grad():
        outputs, h = [], x.detach().requires_grad_(True)
        for block in blocks:
            h = block.module(h)
            outputs.append(h)
        target = labels if labels is not None else h.argmax(dim=1).detach()
        grads = torch.autograd.grad(F.cross_entropy(h, target, reduction="sum"), outputs)
    diagonals = []
    for g in grads:
        g2 = g.detach().pow(2)
        diagonals.append(g2 / g2.mean().clamp_min(1e-30))
    return diagonals


def reconstruct_block(block: Block, inputs_float: torch.Tensor, inputs_quantized: torch.Tensor, fisher: torch.Tensor,
                      schemes: dict, options: AdaRoundOptions, seed: int = 0) -> BlockResult:
    """Learn the rounding of every layer of `block` jointly, on the Fisher-weighted error of
    the block's output (eq. 10); the layers' weights are set to the result."""
    with torch.no_grad():
        target = block.module(inputs_float)
    # keyed by parameter name, as functional_call takes the weights
    roundings = {f"{name}.weight": LearnedRounding.on_grid(block.module.get_submodule(name).weight.detach().float(),
                                                           schemes[name]) for name in block.layers}
    generator = torch.Generator().manual_seed(seed)
    samples = inputs_quantized.shape[0]
    positions = target[0].numel() // target.shape[1]  # output rows per sample (pixels), 1 for logits
    batch = max(1, min(samples, options.batch_rows // positions))

    def error(weights: dict, index) -> torch.Tensor:
        out = functional_call(block.module, weights, (inputs_quantized[index],))
        return (fisher[index] * (out - target[index]).pow(2)).sum() / (len(index) * positions)

    learn_roundings(roundings, lambda weights: error(weights, torch.randint(0, samples, (batch,), generator=generator)),
                    options)
    loss_nearest, loss_learned, chosen = harden(roundings, lambda weights: error(weights, torch.arange(samples)))
    with torch.no_grad():
        for key, weight in chosen.items():
            block.module.get_parameter(key).copy_(weight)
    return BlockResult(block.layers, loss_nearest=loss_nearest, loss_learned=loss_learned)


def brecq_model(model: nn.Module, schemes: dict, data: torch.Tensor, labels: torch.Tensor | None = None,
                options: AdaRoundOptions | None = None, seed: int = 0, progress=None) -> list[BlockResult]:
    """BRECQ every block of `model` in place (weights on the grids `schemes` gives per layer
    name), in order: each block learns on the input of the model quantized so far, against the
    float model's block output. `progress(done, total, message)` is called after each block."""
    options = options or AdaRoundOptions()
    model.eval()
    blocks = find_blocks(model)
    missing = [name for block in blocks for name in block.layers if name not in schemes]
    if missing:
        raise ValueError(f"no quantization scheme for layers {missing}")
    fisher = fisher_diagonals(blocks, data, labels)
    with torch.no_grad():
        float_inputs, h = [], data
        for block in blocks:
            float_inputs.append(h)
            h = block.module(h)
    results, quantized = [], data
    for index, block in enumerate(blocks):
        if block.layers:
            results.append(reconstruct_block(block, float_inputs[index], quantized, fisher[index], schemes, options,
                                             seed + index))
        if progress is not None:
            progress(index + 1, len(blocks), f"block {index + 1}/{len(blocks)}: {', '.join(block.layers) or 'no layers'}")
        with torch.no_grad():
            quantized = block.module(quantized)
    return results
