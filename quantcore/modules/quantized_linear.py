"""`QuantizedLinear`: a Linear layer that really stores low-bit weights.

Storage (what goes into the artifact's safetensors):
    qweight      uint8, the weight codes packed by `quantcore.packing` (int8 / fp8 codes
                 are kept as their own dtype, one byte each)
    scale        S per group, float16 by default, shaped like the weight's grouped view
    zero_point   Z per group (asymmetric grids only), uint8
    bias         float, as in the source layer
    input_scale  static activation schemes only: the calibrated per-tensor S of the input,
                 float32, shape (1,) (and `input_zero_point`, uint8, for asymmetric grids);
                 the names compressed-tensors gives them

Two ways to compute:
* reference: dequantize the weight (x̂ = (q - Z)·S) and run a float matmul; activations,
  when the scheme quantizes them, are fake-quantized per call. This is the definition
  every fast path is tested against.
* fast CPU paths (`quantcore.modules.cpu_paths`): W8A8 in int8 through oneDNN or fbgemm,
  and weight-only int4 through our C++ kernel, each tested against the reference.
* GPU paths (`quantcore.modules.gpu_paths`): the Triton kernels for W4A16, int8 W8A8 and
  fp8 W8A8 on CUDA inputs.

The reference path is the default, so a job computes the same numbers on every machine and
the report's metrics describe the scheme, not the CPU. `enable_fast_path(model)` (which
`load_quantized` calls for inference) makes each layer take the fastest path this CPU has
that reproduces the reference up to float rounding; `approximate=True` also allows the int8
path of CPUs without VNNI, whose 7-bit activations measured 13.93 perplexity on SmolLM2
against 13.03 for the 8-bit reference (fp32 12.66, first 4096 evaluation tokens).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from quantcore.modules import cpu_paths, gpu_paths
from quantcore.packing import pack_codes, unpack_codes
from quantcore.qparams import QParams, calculate_qparams, fake_quant, grouped_view, quantize
from quantcore.schemes import Granularity, QuantScheme, QuantType, check_activation_scheme

log = logging.getLogger(__name__)

DEFAULT_SCALE_DTYPE = torch.float16


def fake_quant_activations(x: torch.Tensor, scheme: QuantScheme, static: QParams | None = None) -> torch.Tensor:
    """Activation quantization: with `static` qparams (calibrated ahead of time, per tensor)
    on that fixed grid; otherwise per call, S/Z per tensor, per token, or per group of inputs
    within each token. Computed in float32 and returned in x's dtype."""
    tokens = x.reshape(-1, x.shape[-1]).float()
    if static is None and _symmetric_int_rows(scheme):
        return _fake_quant_symmetric(tokens, scheme).reshape(x.shape).to(x.dtype)
    qp = static if static is not None else calculate_qparams(tokens, scheme)
    return fake_quant(tokens, qp).reshape(x.shape).to(x.dtype)


def _symmetric_int_rows(scheme: QuantScheme) -> bool:
    return scheme.type == QuantType.INT and scheme.symmetric and scheme.granularity in (Granularity.TOKEN, Granularity.TENSOR)


def _fake_quant_symmetric(tokens: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """`fake_quant(tokens, calculate_qparams(tokens, scheme))` for symmetric integer grids per
    token or per tensor, written out: the same numbers with fewer passes over memory and no
    int8 round trip (it runs on every input of every W8A8 layer)."""
    # max |x| as an inf-norm: one pass, no |x| temporary
    absmax = torch.linalg.vector_norm(tokens, float("inf"), dim=-1 if scheme.granularity == Granularity.TOKEN else None, keepdim=True)
    scale = absmax / scheme.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (tokens / scale).round_().clamp_(scheme.qmin, scheme.qmax).mul_(scale)


fast_path_available = cpu_paths.fbgemm_available  # the int8 path's engine (kept for callers)


class QuantizedLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_scheme: QuantScheme,
        activation_scheme: QuantScheme | None = None,
        scale_dtype: torch.dtype = DEFAULT_SCALE_DTYPE,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_scheme = weight_scheme
        self.activation_scheme = activation_scheme
        self.scale_dtype = scale_dtype
        # Shapes follow the grouped view of an (out, in) weight, so S broadcasts directly.
        probe = grouped_view(torch.empty(out_features, in_features, device="meta"), weight_scheme)
        scale_shape = (*probe.shape[:-1], 1)
        if weight_scheme.is_fp8:
            qweight = torch.empty(out_features, in_features, dtype=weight_scheme.storage_dtype)
        elif weight_scheme.bits == 8:
            qweight = torch.empty(out_features, in_features, dtype=weight_scheme.storage_dtype)
        else:
            n = math.ceil(out_features * in_features / 8) * weight_scheme.bits
            qweight = torch.empty(n, dtype=torch.uint8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", torch.empty(scale_shape, dtype=scale_dtype))
        if weight_scheme.symmetric:
            self.zero_point = None
        else:
            self.register_buffer("zero_point", torch.empty(scale_shape, dtype=torch.uint8))
        if bias:
            self.register_buffer("bias", torch.empty(out_features))
        else:
            self.bias = None
        if activation_scheme is not None:
            check_activation_scheme(activation_scheme)
        static = activation_scheme is not None and not activation_scheme.dynamic
        # Registered (as None when unused) so that assigning a tensor later keeps them buffers.
        self.register_buffer("input_scale", torch.ones(1) if static else None)
        self.register_buffer(
            "input_zero_point", torch.zeros(1, dtype=torch.uint8) if static and not activation_scheme.symmetric else None
        )
        self.fast_path = "off"  # "off" (reference), "exact" or "approximate": see the module docstring
        self._cpu_path: cpu_paths.Int8Path | cpu_paths.Int4Path | None | bool = False  # False: not chosen yet
        self._gpu_path: gpu_paths.GpuPath | None | bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_scheme: QuantScheme,
        activation_scheme: QuantScheme | None = None,
        qparams: QParams | None = None,
        scale_dtype: torch.dtype = DEFAULT_SCALE_DTYPE,
        weight: torch.Tensor | None = None,
        input_qparams: QParams | None = None,
    ) -> "QuantizedLinear":
        """Quantize `linear` (or `weight`, e.g. one an algorithm already adjusted) with `qparams`
        (min-max of the weight when not given). A static activation scheme needs the input's
        calibrated `input_qparams` (see `quantcore.algorithms.base.calibrate_inputs`)."""
        w = (linear.weight if weight is None else weight).detach().float()
        qp = qparams or calculate_qparams(w, weight_scheme, scale_dtype)
        # Store S at its storage precision and choose codes against that stored value.
        scale = qp.scale.to(scale_dtype)
        qp = QParams(scale=scale.float(), zero_point=qp.zero_point, scheme=weight_scheme)
        q = quantize(w, qp)
        mod = cls(w.shape[1], w.shape[0], linear.bias is not None, weight_scheme, activation_scheme, scale_dtype)
        mod.qweight = cls._pack(q, weight_scheme)
        mod.scale = scale.reshape(mod.scale.shape).clone()
        if not weight_scheme.symmetric:
            mod.zero_point = qp.zero_point.reshape(mod.zero_point.shape).to(torch.uint8)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().float().clone()
        if mod.input_scale is not None:
            if input_qparams is None:
                raise ValueError("a static activation scheme needs input_qparams calibrated on the layer's inputs")
            mod.set_input_qparams(input_qparams)
        return mod

    def set_input_qparams(self, qparams: QParams) -> None:
        """Store the calibrated per-tensor S (and Z) of a static activation scheme."""
        if self.input_scale is None:
            raise ValueError("this layer quantizes its activations per call (or not at all): it has no static input scale")
        if qparams.scale.numel() != 1:
            raise ValueError(f"static activation qparams are per tensor, got {qparams.scale.numel()} scales")
        self.input_scale = qparams.scale.detach().float().reshape(1).clone()
        if self.input_zero_point is not None:
            self.input_zero_point = qparams.zero_point.detach().reshape(1).to(torch.uint8)

    def input_qparams(self) -> QParams | None:
        """The static activation qparams, or None when activations are dynamic or float."""
        if self.input_scale is None:
            return None
        zero = self.input_zero_point.float() if self.input_zero_point is not None else torch.zeros(1)
        return QParams(scale=self.input_scale.float(), zero_point=zero, scheme=self.activation_scheme)

    @staticmethod
    def _pack(q: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        if scheme.is_fp8 or scheme.bits == 8:
            return q.contiguous()
        unsigned = q.to(torch.int16) - int(scheme.qmin)
        return pack_codes(unsigned, scheme.bits)

    # ------------------------------------------------------------------ weights
    def weight_codes(self) -> torch.Tensor:
        """Signed/unsigned codes on the scheme's grid, shape (out, in)."""
        s = self.weight_scheme
        if s.is_fp8 or s.bits == 8:
            return self.qweight
        unsigned = unpack_codes(self.qweight, s.bits, (self.out_features, self.in_features))
        return (unsigned.to(torch.int16) + int(s.qmin)).to(torch.int8 if s.symmetric else torch.uint8)

    def weight_qparams(self) -> QParams:
        zp = self.zero_point.float() if self.zero_point is not None else torch.zeros_like(self.scale, dtype=torch.float32)
        return QParams(scale=self.scale.float(), zero_point=zp, scheme=self.weight_scheme)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        qp = self.weight_qparams()
        qg = grouped_view(self.weight_codes(), self.weight_scheme).float()
        w = (qg - qp.zero_point) * qp.scale if not self.weight_scheme.is_fp8 else qg * qp.scale
        return w.reshape(self.out_features, self.in_features).to(dtype)

    # ------------------------------------------------------------------ compute
    def cpu_path(self) -> cpu_paths.Int8Path | cpu_paths.Int4Path | None:
        """The CPU path `forward` takes when fast paths are on (chosen once; None: the reference)."""
        if self._cpu_path is False:
            self._cpu_path = cpu_paths.choose(self, approximate=self.fast_path == "approximate")
        return self._cpu_path

    def path_for(self, device: torch.device):
        """The fast path for inputs on `device`: a CPU path, a Triton kernel on CUDA (chosen
        once each), or None for the reference."""
        if device.type == "cpu":
            return self.cpu_path()
        if device.type == "cuda":
            if self._gpu_path is False:
                self._gpu_path = gpu_paths.choose(self, device)
            return self._gpu_path
        return None

    @property
    def has_fast_path(self) -> bool:
        return self.fast_path != "off" and self.path_for(self.qweight.device) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path != "off" and (path := self.path_for(x.device)) is not None:
            return path(x, self)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_scheme is not None:
            x = fake_quant_activations(x, self.activation_scheme, self.input_qparams())
        w = self.dequantize_weight(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, bias)

    def _apply(self, fn, recurse=True):
        self._cpu_path = self._gpu_path = False  # moved or cast: choose again from the stored codes
        return super()._apply(fn, recurse)

    def compute_module(self, dtype: torch.dtype) -> nn.Module:
        """This layer's computation with the weight dequantized once, in `dtype`: what the
        calibration pipeline runs for the blocks after this one."""
        return DequantizedLinear(self.dequantize_weight(dtype), self.bias, self.activation_scheme, self.input_qparams())

    def extra_repr(self) -> str:
        act = self.activation_scheme.short_name() if self.activation_scheme else "float"
        if self.input_scale is not None:
            act += f" (S={float(self.input_scale):.4g})"
        return f"in={self.in_features}, out={self.out_features}, weight={self.weight_scheme.short_name()}, act={act}"

    def storage_bytes(self) -> int:
        buffers = (self.qweight, self.scale, self.zero_point, self.input_scale, self.input_zero_point)
        return sum(b.numel() * b.element_size() for b in buffers if b is not None)


class DequantizedLinear(nn.Module):
    """A fixed dequantized weight, with the activation quantization of its QuantizedLinear."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        activation_scheme: QuantScheme | None,
        input_qparams: QParams | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(weight.dtype), requires_grad=False)
        self.activation_scheme = activation_scheme
        self.input_qparams = input_qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_scheme is not None:
            x = fake_quant_activations(x, self.activation_scheme, self.input_qparams)
        return F.linear(x, self.weight, self.bias)


def enable_fast_path(model: nn.Module, enabled: bool = True, approximate: bool = False) -> int:
    """Let every QuantizedLinear take the fastest CPU path it has (`approximate`: also those that
    do not reproduce the reference's numbers); returns how many layers have one."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.fast_path = "off" if not enabled else "approximate" if approximate else "exact"
            module._cpu_path = module._gpu_path = False
            count += int(module.has_fast_path)
    return count
