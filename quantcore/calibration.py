"""Layer-by-layer calibration: calibration data flows through the model one block at a time.

As GPTQ's sequential driver does, the inputs of the first block are captured once (the
model runs up to it and stops), then for each block in turn:

    1. the algorithm observes the block on the cached inputs (hooks on its layers) and
       quantizes it in place,
    2. the cached inputs are replaced by the *quantized* block's outputs,

so each block is calibrated on what the already-quantized model actually feeds it. Only one
block's activations per sample are held at a time; the other blocks are never run.

Blocks are found by the usual container names: `model.layers` (llama-style decoders),
`encoder.layer` (BERT), `transformer.h` (GPT-2 style), or the children of an nn.Sequential.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

BLOCK_CONTAINERS = ("model.layers", "encoder.layer", "bert.encoder.layer", "transformer.h", "layers")


class _ReachedFirstBlock(Exception):
    """Stops the model's forward once the first block's inputs are captured."""


@dataclass
class BlockInputs:
    """What each calibration sample feeds a block: the hidden states and the other arguments
    (attention mask, position embeddings, ...), which are the same for every block."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.hidden)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    for path in BLOCK_CONTAINERS:
        try:
            container = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(container, nn.ModuleList) and len(container):
            return [(f"{path}.{i}", block) for i, block in enumerate(container)]
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    raise ValueError(
        f"cannot find the blocks of {type(model).__name__}: expected one of {', '.join(BLOCK_CONTAINERS)} "
        "as an nn.ModuleList, or an nn.Sequential"
    )


def _model_call(model: nn.Module, sample: Any) -> None:
    if isinstance(sample, dict):
        model(**sample)
    elif hasattr(model, "config"):  # transformers: no KV cache while calibrating
        model(sample, use_cache=False)
    else:
        model(sample)


def capture_block_inputs(model: nn.Module, first_block: nn.Module, samples: list[Any]) -> BlockInputs:
    """Run each sample up to `first_block` and record what it receives."""
    hidden, kwargs = [], []

    def grab(module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({**kw, **({} if len(args) <= 1 else {"_extra_args": args[1:]})})
        raise _ReachedFirstBlock

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for sample in samples:
                try:
                    _model_call(model, sample)
                except _ReachedFirstBlock:
                    pass
    finally:
        handle.remove()
    return BlockInputs(hidden, kwargs)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    extra = kwargs.get("_extra_args", ())
    rest = {k: v for k, v in kwargs.items() if k != "_extra_args"}
    out = block(hidden, *extra, **rest)
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def observe_inputs(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call `fn(name, x)` with the input of each named module whenever it runs."""
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: fn(name, args[0].detach()))
        for name, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_blockwise(
    model: nn.Module,
    samples: list[Any],
    quantize_block: Callable[[str, nn.Module, BlockInputs], None],
    progress: Callable[[int, int, str], None] = lambda current, total, message="": None,
) -> None:
    """Calibrate block by block: `quantize_block(name, block, inputs)` quantizes `block` in
    place (it may run the block on `inputs` to observe it); the quantized block's outputs
    become the next block's inputs."""
    if not samples:
        raise ValueError("calibration needs at least one sample")
    blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0][1], samples)
    progress(0, len(blocks), "captured the first block's inputs")
    for index, (name, block) in enumerate(blocks):
        quantize_block(name, block, inputs)
        with torch.no_grad():
            inputs.hidden = [run_block(block, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
        progress(index + 1, len(blocks), name)
