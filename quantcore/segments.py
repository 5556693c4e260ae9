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

Each segment keeps one tensor per sample (a, then x₂ and p), so memory stays at a few
activations per sample; p, the widest, is stored in float16 when it fits. The residual adds
are done in place in the block's inputs, and a and p live in one buffer each for all samples
(`_SampleStore`): one large allocation, returned to the system whole when freed, where a
fresh tensor per sample and block left the allocator's heap more fragmented block after
block (we measured the peak creeping up ~20 MB a block on SmolLM2). Every block is first checked on
one sample against its own forward: a block that computes anything else (another
architecture, extra norms) returns None and the caller falls back to the two-pass driver.
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


class _SampleStore:
    """One tensor per sample, kept in a single preallocated buffer when every sample has the
    first one's shape (calibration windows do); a sample that does not fit the buffer (another
    shape, or outside float16's range when storing compactly) is kept on its own."""

    def __init__(self, count: int, compact: bool = False) -> None:
        self.count, self.compact = count, compact
        self.buffer: torch.Tensor | None = None
        self.own: dict[int, torch.Tensor] = {}

    def put(self, i: int, value: torch.Tensor) -> None:
        if self.buffer is None:
            dtype = torch.float16 if self.compact and value.dtype == torch.float32 else value.dtype
            self.buffer = torch.empty((self.count, *value.shape), dtype=dtype)
        fits = value.shape == self.buffer.shape[1:] and (
            self.buffer.dtype == value.dtype or float(value.abs().amax()) < 6e4
        )
        if fits:
            self.buffer[i].copy_(value)
        else:
            self.own[i] = value

    def get(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        if i in self.own:
            return self.own[i].to(dtype)
        assert self.buffer is not None
        return self.buffer[i].to(dtype)


def _add_into(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y, written into x's storage when the dtypes agree (the residual stream, updated in place)."""
    if x.dtype == y.dtype:
        return x.add_(y)
    return x.to(y.dtype) + y


def run_true_sequential(
    block: CalibrationBlock,
    observe: Callable[[tuple[str, ...], torch.Tensor], None],
    quantize_group: Callable[[list[str]], None],
) -> None:
    """Observe and quantize the block's layer groups in execution order, then advance the
    block's inputs to its (fully quantized) outputs. `observe(relative_names, x)` sees the
    input that a group of layers shares, once per sample; `quantize_group(relative_names)`
    must quantize those layers in `block.module` in place before the next segment runs."""
    hidden, all_kwargs = block.inputs.hidden, block.inputs.kwargs
    dtype = block.compute_dtype

    def fresh() -> nn.Module:
        return compute_copy(block.module, dtype)

    with torch.no_grad():
        work = fresh()
        for x in hidden:  # q, k, v see the normed block input
            observe(GROUPS[0], work.input_layernorm(x))
        quantize_group(list(GROUPS[0]))

        work, attention = fresh(), _SampleStore(len(hidden))
        for i, (x, kwargs) in enumerate(zip(hidden, all_kwargs)):
            a = _attention_input_of_o_proj(work, work.input_layernorm(x), kwargs)
            observe(GROUPS[1], a)
            attention.put(i, a)
            del a
        quantize_group(list(GROUPS[1]))

        work = fresh()
        for i, x in enumerate(hidden):
            hidden[i] = x2 = _add_into(x, work.self_attn.o_proj(attention.get(i, dtype)))
            observe(GROUPS[2], work.post_attention_layernorm(x2))
        del attention, x2
        quantize_group(list(GROUPS[2]))

        work, products = fresh(), _SampleStore(len(hidden), compact=True)
        for i, x2 in enumerate(hidden):
            p = _mlp_product(work, work.post_attention_layernorm(x2.to(dtype)))
            observe(GROUPS[3], p)
            products.put(i, p)
            del p
        quantize_group(list(GROUPS[3]))

        work = fresh()
        for i, x2 in enumerate(hidden):
            hidden[i] = _add_into(x2, work.mlp.down_proj(products.get(i, dtype)))
        del products
    block.advanced = True
