"""The calibration pipeline: calibration data flows through the model one block at a time.

As GPTQ's sequential driver does, the inputs of the first block are captured once (the
model runs up to it and stops), then for each block in turn:

    1. the recipe stage observes the block on the cached inputs (`CalibrationBlock.forward`
       with hooks on its layers) and quantizes it in place,
    2. the cached inputs are replaced by the *quantized* block's outputs,

so each block is calibrated on what the already-quantized model actually feeds it. Only one
block's activations are held at a time; the rest of the model is never run, and its
weights stay wherever the loader put them (memory-mapped safetensors are not paged in
until their block comes up).

Calibration forwards run on a throw-away copy of the block in the *compute dtype*:
bfloat16 where this machine multiplies bf16 faster than fp32 (CPUs with AVX-512 BF16 or
AMX, GPUs), float32 elsewhere, decided by the CPU's flags or a short measurement
(`choose_compute_dtype`).
Quantization itself (Hessians' Cholesky, weight updates, S/Z) always happens in float32
on the model's own weights.

Blocks are found by the usual container names: `model.layers` (llama-style decoders),
`encoder.layer` (BERT), `transformer.h` (GPT-2 style), or the children of an nn.Sequential.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from quantcore.memory import spill_rewritten_weights, trim_heap
from quantcore.memory import release_replaced as release_replaced_weights

log = logging.getLogger(__name__)

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


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside tuples, e.g. rotary cos/sin) in `dtype`; the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def _same_or(previous: Any, value: Any) -> Any:
    """`previous` when it holds the same tensors as `value` (so only one copy is kept)."""
    if isinstance(value, torch.Tensor) and isinstance(previous, torch.Tensor):
        same = previous.shape == value.shape and previous.dtype == value.dtype and torch.equal(previous, value)
        return previous if same else value
    if isinstance(value, (tuple, list)) and isinstance(previous, type(value)) and len(previous) == len(value):
        merged = [_same_or(p, v) for p, v in zip(previous, value)]
        return previous if all(m is p for m, p in zip(merged, previous)) else type(value)(merged)
    return value


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, samples: list[Any], dtype: torch.dtype | None = None
) -> BlockInputs:
    """Run each sample up to `first_block` and record what it receives (floats cast to `dtype`)."""
    hidden, kwargs = [], []

    def grab(module, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        extra = {} if len(args) <= 1 else {"_extra_args": args[1:]}
        if dtype is not None:
            h, kw, extra = _cast_floats(h, dtype), {k: _cast_floats(v, dtype) for k, v in kw.items()}, _cast_floats(extra, dtype)
        hidden.append(h)
        current = {**kw, **extra}
        if kwargs:  # equal-length samples get the same masks and rotary tables: keep one copy
            current = {k: _same_or(kwargs[-1].get(k), v) for k, v in current.items()}
        kwargs.append(current)
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


def run_observed(model: nn.Module, names: Iterable[str], batches: Iterable[Any], fn: Callable[[str, torch.Tensor], None]) -> None:
    """Run `model` on each batch without gradients, calling `fn(name, x)` with the input of
    each named submodule whenever it runs."""
    with torch.no_grad(), observe_inputs({name: model.get_submodule(name) for name in names}, fn):
        for batch in batches:
            model(batch)


def contains(block_name: str, module_name: str) -> bool:
    """Is `module_name` the block itself or inside it? (The blocks of an nn.Sequential may be layers.)"""
    return module_name == block_name or module_name.startswith(block_name + ".")


def compute_copy(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `block` that computes in `dtype`. Quantized modules provide their own
    (`compute_module(dtype)`: the weight dequantized once, activation quantization kept);
    everything else is copied and cast."""
    if hasattr(block, "compute_module"):  # the blocks of an nn.Sequential may be single layers
        return block.compute_module(dtype)
    replacements: dict[str, nn.Module] = {}
    for name, module in block.named_modules():
        inside_replaced = any(name.startswith(done + ".") for done in replacements)
        if name and hasattr(module, "compute_module") and not inside_replaced:
            replacements[name] = module.compute_module(dtype)
    # Deep-copy without the quantized modules (their replacements are already fresh).
    memo = {id(block.get_submodule(name)): None for name in replacements}
    work = copy.deepcopy(block, memo)
    for name, module in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(work.get_submodule(parent) if parent else work, child, module)
    return work.to(dtype)


@dataclass
class CalibrationBlock:
    """One block as a stage sees it: `module` is the model's own block, which the stage
    quantizes in place; `forward` runs the calibration inputs through a compute-dtype copy."""

    name: str
    module: nn.Module
    inputs: BlockInputs
    compute_dtype: torch.dtype
    advanced: bool = False  # set by a stage that already replaced the inputs by the block's outputs

    def layers(self, candidates: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The entries of `candidates` (full module names) that lie inside this block."""
        return {name: m for name, m in candidates.items() if contains(self.name, name)}

    def forward(self, observe: dict[str, Callable[[torch.Tensor], None]] | None = None) -> None:
        """Run every calibration input through the block, calling `observe[name](x)` with the
        input of the block's layer `name` (a full module name) each time that layer runs."""
        relative = {name[len(self.name) + 1 :]: fn for name, fn in (observe or {}).items()}
        forward_observed(self.module, zip(self.inputs.hidden, self.inputs.kwargs), relative, self.compute_dtype)

    def advance(self) -> None:
        """Replace each cached input by the block's output (as the block is now), one sample
        at a time, so inputs and outputs are never all held at once."""
        work = compute_copy(self.module, self.compute_dtype)
        hidden = self.inputs.hidden
        with torch.no_grad():
            for i, kwargs in enumerate(self.inputs.kwargs):
                hidden[i] = run_block(work, hidden[i], kwargs)


def forward_observed(
    block: nn.Module,
    samples: Iterable[tuple[torch.Tensor, dict[str, Any]]],
    observe: dict[str, Callable[[torch.Tensor], None]],
    compute_dtype: torch.dtype,
) -> None:
    """Run (hidden, kwargs) samples through a compute copy of `block`, calling `observe[name](x)`
    with the input of its submodule `name` (relative to the block) each time that one runs.

    Only the inputs are wanted, so each sample after the first stops as soon as the last
    observed call has been seen (the first sample counts the calls): in a llama block that
    skips the down projection, an eighth of the pass."""
    work = compute_copy(block, compute_dtype)
    hooks = {name: work.get_submodule(name) for name in observe}
    calls_per_sample: int | None = None
    calls = 0

    def seen(name: str, x: torch.Tensor) -> None:
        nonlocal calls
        observe[name](x)
        calls += 1
        if calls == calls_per_sample:
            raise _ObservedAll

    with torch.no_grad(), observe_inputs(hooks, seen):
        for hidden, kwargs in samples:
            calls = 0
            try:
                run_block(work, hidden, kwargs)
            except _ObservedAll:
                continue
            calls_per_sample = calls_per_sample or calls or None


class _ObservedAll(Exception):
    """Stops a block's forward once every observed call of the sample has been made."""


def _cpu_has_native_bf16() -> bool | None:
    """Does this CPU multiply bfloat16 natively (AVX-512 BF16 or AMX)? None where /proc/cpuinfo
    does not say (not Linux, not x86)."""
    from quantcore.kernels.cpu import cpu_flags

    flags = cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None


@functools.lru_cache(maxsize=None)
def _bf16_is_faster() -> bool:
    """Once per process: is a bf16 matmul at calibration shapes faster than fp32 here? A CPU
    that says it has no native bf16 answers no without a measurement (bf16 is several times
    slower there, and a timing taken while other processes load the machine can say
    anything); elsewhere the best of several timings decides."""
    native = _cpu_has_native_bf16()
    if native is False:
        return False
    a, b = torch.randn(256, 576), torch.randn(576, 576)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - start)
        timings[dtype] = best
    return timings[torch.bfloat16] < 0.8 * timings[torch.float32]


def choose_compute_dtype(requested: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if _bf16_is_faster() else torch.float32


def _rewrote_floats(module: nn.Module, before: list[torch.Tensor]) -> bool:
    """Does the block still hold large float weights after its stage (which then rewrote them
    in place rather than replacing them by quantized layers)?"""
    kept = {id(p) for p in before}
    return any(id(p) in kept and p.is_floating_point() and p.numel() >= 1 << 18 for p in module.parameters())


def run_blockwise(
    model: nn.Module,
    samples: list[Any],
    quantize_block: Callable[[CalibrationBlock], None],
    progress: Callable[[int, int, str], None] = lambda current, total, message="": None,
    compute_dtype: torch.dtype | str = "auto",
    release_replaced: bool = False,
    spill_dir: Path | None = None,
) -> None:
    """Calibrate block by block: `quantize_block(block)` quantizes `block.module` in place
    (it may call `block.forward` to observe it); the quantized block's outputs become the
    next block's inputs. With `release_replaced`, the memory-mapped float weights that a
    block's quantization replaced are dropped from memory (`quantcore.memory`), so the
    process holds one block of float weights at a time, not the model's. With `spill_dir`,
    the float weights a block's stage rewrote in place (smoothing or AWQ scales folded in)
    are moved to a file there and mapped back, block by block, for the same reason."""
    if not samples:
        raise ValueError("calibration needs at least one sample")
    dtype = compute_dtype if isinstance(compute_dtype, torch.dtype) else choose_compute_dtype(compute_dtype)
    blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0][1], samples, dtype)
    log.info("calibrating %d blocks on %d samples in %s", len(blocks), len(samples), dtype)
    progress(0, len(blocks), "captured the first block's inputs")
    for index, (name, module) in enumerate(blocks):
        block = CalibrationBlock(name, module, inputs, dtype)
        before = list(module.parameters())
        quantize_block(block)
        if not block.advanced:
            block.advance()
        if spill_dir is not None and _rewrote_floats(module, before):
            spill_rewritten_weights(module, spill_dir / f"{name}.pt")
        if release_replaced:
            released = release_replaced_weights(model, before)
            log.debug("%s: released %d bytes of replaced float weights", name, released)
            trim_heap()  # and the freed activations of the block's segments
        progress(index + 1, len(blocks), name)
