"""True-sequential calibration of a llama-style decoder block, in one pass.

GPTQ's reference driver runs each block twice over the calibration set: once in float to
collect every layer's Hessian, once quantized to produce the next block's inputs. Its
`--true-sequential` option goes further and quantizes the layers in the order they run,
each calibrated on the outputs of the layers already quantized before it.

For a llama-style block the order is fixed, so both can be had in one pass: the block is
run segment by segment over all calibration samples, and between segments the group of
layers whose inputs were just observed is quantized:

    x ─ input_layernorm ─► h          observe q, k, v     then quantize them
    h ─ attention(q, k, v) ─► a       observe o_proj      then quantize it
    x + o_proj(a) = x₂ ─ post_attention_layernorm ─► h₂
                                      observe gate, up    then quantize them
    act(gate(h₂)) ⊙ up(h₂) = p        observe down_proj   then quantize it
    x₂ + down_proj(p)                 the next block's input

The samples run in chunks of about CHUNK_TOKENS tokens stacked into one tensor (when their
shapes and extra arguments agree, and a batch computes what its samples compute alone), so
every matmul and every XᵀX of the Hessians sees thousands of rows: that is where a CPU
reaches its full speed, and a tensor normed once is reused by the segment that reads it.
Each segment keeps one tensor per chunk (h, then a, then h₂ and p), so memory stays at a few
activations per sample; p, the widest, is stored in float16 when it fits. The residual adds
are done in place. Every block is first checked on one sample against its own forward: a
block that computes anything else (another architecture, extra norms) is not `supported`
and the caller falls back to the two-pass driver.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from quantcore.pipeline import CalibrationBlock, compute_copy, run_block

log = logging.getLogger(__name__)

LLAMA_MODULES = (
    "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.act_fn",
)
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


class _Captured(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def _attention_input_of_o_proj(work: nn.Module, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run the attention up to o_proj and return o_proj's input."""

    def stop(module, args):
        raise _Captured(args[0])

    handle = work.self_attn.o_proj.register_forward_pre_hook(stop)
    try:
        work.self_attn(hidden_states=h, **kwargs)
    except _Captured as captured:
        return captured.value
    finally:
        handle.remove()
    raise RuntimeError("the attention never reached o_proj")


def _mlp_product(work: nn.Module, h2: torch.Tensor) -> torch.Tensor:
    mlp = work.mlp
    return mlp.act_fn(mlp.gate_proj(h2)) * mlp.up_proj(h2)


def _segmented_forward(work: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The whole block, computed the way the segments compute it."""
    a = _attention_input_of_o_proj(work, work.input_layernorm(x), kwargs)
    x2 = x + work.self_attn.o_proj(a)
    return x2 + work.mlp.down_proj(_mlp_product(work, work.post_attention_layernorm(x2)))


def supports(block: CalibrationBlock) -> bool:
    """Is this a llama-style block whose segments reproduce its own forward?"""
    module = block.module
    for name in LLAMA_MODULES:
        try:
            module.get_submodule(name)
        except AttributeError:
            return False
    if not len(block.inputs) or "_extra_args" in block.inputs.kwargs[0]:
        return False
    work = compute_copy(module, block.compute_dtype)
    x, kwargs = block.inputs.hidden[0], block.inputs.kwargs[0]
    with torch.no_grad():
        expected = run_block(work, x, kwargs).float()
        got = _segmented_forward(work, x, kwargs).float()
    tolerance = 1e-4 if block.compute_dtype == torch.float32 else 2e-2
    error = float((got - expected).norm() / expected.norm().clamp(min=1e-12))
    if error > tolerance:
        log.info("%s: segments differ from the block's forward (%.2e); using the two-pass driver", block.name, error)
        return False
    return True


CHUNK_TOKENS = 2048  # rows per segment call: GEMMs run at full speed from a few hundred rows to a few thousand


class _Chunk:
    """Consecutive samples of one shape and the same extra arguments, stacked into rows of one
    tensor so that a segment runs on thousands of tokens at a time."""

    def __init__(self, samples: list[int], hidden: torch.Tensor, kwargs: dict) -> None:
        self.samples, self.hidden, self.kwargs = samples, hidden, kwargs


def _chunks(hidden: list[torch.Tensor], all_kwargs: list[dict], batched: bool) -> list[_Chunk]:
    """Group samples into chunks of about CHUNK_TOKENS tokens (one sample each unless
    `batched`): samples of one shape whose extra arguments are the very same objects
    (`capture_block_inputs` keeps one copy of equal masks and rotary tables)."""
    chunks: list[list[int]] = []
    for i, x in enumerate(hidden):
        if batched and chunks:
            last = chunks[-1]
            fits = (len(last) + 1) * x[0].numel() <= CHUNK_TOKENS * x.shape[-1]
            same = hidden[last[0]].shape == x.shape and _same_arguments(all_kwargs[last[0]], all_kwargs[i])
            if fits and same:
                last.append(i)
                continue
        chunks.append([i])
    return [_Chunk(c, torch.cat([hidden[i] for i in c]) if len(c) > 1 else hidden[c[0]], all_kwargs[c[0]]) for c in chunks]


def _same_arguments(a: dict, b: dict) -> bool:
    """The same extra arguments: tensors (and tuples of them) as the very same objects."""
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if x is y:
            continue
        if isinstance(x, (torch.Tensor, tuple, list)) or isinstance(y, (torch.Tensor, tuple, list)) or x != y:
            return False
    return True


def _broadcasts(block: CalibrationBlock) -> bool:
    """Do the first two samples, run as one batch, give what each gives alone? (Their extra
    arguments were captured for a batch of one: masks and rotary tables must broadcast.)"""
    hidden, kwargs = block.inputs.hidden, block.inputs.kwargs
    if len(hidden) < 2 or hidden[0].shape != hidden[1].shape or not _same_arguments(kwargs[0], kwargs[1]):
        return False
    if hidden[0].dim() < 2 or hidden[0].shape[0] != 1:
        return False
    work = compute_copy(block.module, block.compute_dtype)
    with torch.no_grad():
        together = _segmented_forward(work, torch.cat(hidden[:2]), kwargs[0]).float()
        alone = torch.cat([_segmented_forward(work, x, kwargs[0]) for x in hidden[:2]]).float()
    tolerance = 1e-4 if block.compute_dtype == torch.float32 else 2e-2
    return float((together - alone).norm() / alone.norm().clamp(min=1e-12)) <= tolerance


class _Store:
    """One tensor per chunk, in float16 when `compact` and the values fit (the MLP product,
    the widest activation), else as computed."""

    def __init__(self, compact: bool = False) -> None:
        self.compact = compact
        self.values: list[torch.Tensor] = []

    def append(self, value: torch.Tensor) -> None:
        fits = self.compact and value.dtype == torch.float32 and float(value.abs().amax()) < 6e4
        self.values.append(value.to(torch.float16) if fits else value)

    def get(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        return self.values[index].to(dtype)


def _add_into(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y, written into x's storage when the dtypes agree (the residual stream, updated in place)."""
    if x.dtype == y.dtype:
        return x.add_(y)
    return x.to(y.dtype) + y


def run_true_sequential(
    block: CalibrationBlock,
    observe: Callable[[tuple[str, ...], torch.Tensor], None],
    quantize_group: Callable[[list[str]], None],
    batched: bool = True,
) -> None:
    """Observe and quantize the block's layer groups in execution order, then advance the
    block's inputs to its (fully quantized) outputs. `observe(relative_names, x)` sees the
    input that a group of layers shares, a chunk of samples at a time; `quantize_group(relative_names)`
    must quantize those layers in `block.module` in place before the next segment runs.
    `batched=False` runs one sample at a time (for blocks whose extra arguments do not
    broadcast over a batch, see `supports`)."""
    dtype = block.compute_dtype
    hidden = block.inputs.hidden
    chunks = _chunks(hidden, block.inputs.kwargs, batched and _broadcasts(block))
    for chunk in chunks:  # the chunks hold the samples now: no second copy
        for sample in chunk.samples:
            hidden[sample] = None  # type: ignore[call-overload]  # refilled with the block's outputs below

    def fresh() -> nn.Module:
        return compute_copy(block.module, dtype)

    with torch.no_grad():
        # normed: what the next segment reads (h, then a, then h₂), one tensor per chunk
        work, normed = fresh(), []
        for chunk in chunks:  # q, k, v see the normed block input
            normed.append(work.input_layernorm(chunk.hidden))
            observe(GROUPS[0], normed[-1])
        quantize_group(list(GROUPS[0]))

        work = fresh()
        for index, chunk in enumerate(chunks):
            normed[index] = _attention_input_of_o_proj(work, normed[index], chunk.kwargs)
            observe(GROUPS[1], normed[index])
        quantize_group(list(GROUPS[1]))

        work = fresh()
        for index, chunk in enumerate(chunks):
            chunk.hidden = _add_into(chunk.hidden, work.self_attn.o_proj(normed[index]))
            normed[index] = work.post_attention_layernorm(chunk.hidden)
            observe(GROUPS[2], normed[index])
        quantize_group(list(GROUPS[2]))

        work, products = fresh(), _Store(compact=True)
        for index in range(len(chunks)):
            p = _mlp_product(work, normed[index])
            normed[index] = None  # type: ignore[call-overload]  # freed as we go
            observe(GROUPS[3], p)
            products.append(p)
            del p
        del normed
        quantize_group(list(GROUPS[3]))

        work = fresh()
        for index, chunk in enumerate(chunks):
            out = _add_into(chunk.hidden, work.mlp.down_proj(products.get(index, dtype)))
            products.values[index] = None  # type: ignore[call-overload]
            for row, sample in enumerate(chunk.samples):
                hidden[sample] = out[row : row + 1] if len(chunk.samples) > 1 else out
    block.advanced = True
