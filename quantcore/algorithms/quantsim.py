"""Simulated quantization of a whole network: every conv/linear layer wrapped so that its
weight and its input pass through fake-quantizers (x ↦ x̂ = S · (clamp(⌊x/S⌉ + Z, l, u) − Z)).

This is the common ground of the classic PTQ and QAT algorithms on a CNN: PTQ calibrates the
quantizers' S (and Z) on data and keeps them fixed; QAT trains the network through them, and
the QAT papers differ in which quantizer parameters are learned and in how a gradient passes
the rounding (each paper's quantizer is a `FakeQuantizer` subclass in its own file: `lsq.py`,
`pact.py`, ...).

Conventions:
* a quantizer is per tensor (one S per weight, one per layer input), as in the QAT papers;
* its grid is signed [−2^(b−1), 2^(b−1) − 1] or unsigned [0, 2^b − 1]; unless told, a
  quantizer picks unsigned when the first tensor it sees has no negative value (the output of
  a ReLU), so post-ReLU activations spend no level on negatives;
* `first_last_bits` keeps the first and the last layer at 8 bits (weights and inputs), the
  convention of the papers whose tables we compare with (PACT, LSQ, AdaRound, BRECQ): the
  first layer has too few weights per output to average out rounding, the last too few
  outputs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantcore.observers import make_observer
from quantcore.schemes import Granularity, QuantScheme

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """⌊x⌉ forward, identity backward: the straight-through estimator (Bengio et al., 2013)."""
    return x + (torch.round(x) - x).detach()


def grid(bits: int, signed: bool) -> tuple[int, int]:
    """(l, u) of a `bits`-bit integer grid."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


class FakeQuantizer(nn.Module):
    """x ↦ x̂ on a `bits`-bit grid. Subclasses set their parameters from the first tensor they
    see (`initialize`) and define the forward map (`quantize`), whose autograd graph is the
    paper's gradient rule."""

    # A quantizer whose parameters stand in for the weights (a codebook) learns at the weights'
    # rate; the others' (steps, clips, offsets) have their own.
    trains_like_weights = False

    def __init__(self, bits: int, signed: bool | None = None) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {bits}")
        self.bits = bits
        self.signed = signed
        self.activation = False  # set when it quantizes a layer's input batches rather than a weight
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def qmin(self) -> int:
        return grid(self.bits, bool(self.signed))[0]

    @property
    def qmax(self) -> int:
        return grid(self.bits, bool(self.signed))[1]

    def initialize(self, x: torch.Tensor) -> None:
        """Set the quantizer's parameters from a first tensor (a weight, or a batch of inputs)."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            if self.signed is None:
                self.signed = bool((x < 0).any())
            with torch.no_grad():
                self.initialize(x.detach())
            self.initialized.fill_(True)
        return self.quantize(x)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


class StaticQuantizer(FakeQuantizer):
    """Fixed S and Z (calibrated, then frozen): what a PTQ'd integer network computes. The
    gradient is the clipped straight-through estimator (1 inside the grid's range, 0 outside),
    so this is also the plain "fake quant with STE" of QAT when `track` is set:

    * track="current": S, Z follow the tensor's min-max at every training step (weights);
    * track="ema": S, Z follow an exponential moving average of the batches' min-max (inputs),
      frozen in eval mode.
    """

    def __init__(self, bits: int, signed: bool | None = None, observer: str = "minmax",
                 track: str | None = None, momentum: float = 0.1) -> None:
        super().__init__(bits, signed)
        if track not in (None, "current", "ema"):
            raise ValueError(f"track must be None, 'current' or 'ema', got {track!r}")
        self.observer_name, self.track, self.momentum = observer, track, momentum
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))
        self._observer = None

    def scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.bits, symmetric=bool(self.signed), granularity=Granularity.TENSOR,
                           observer=self.observer_name)

    def set_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """S and Z that map [low, high] (widened to hold 0) onto the grid. A signed grid uses its
        extra negative level −2^(b−1) when the negative end is the longer one."""
        low, high = torch.clamp(low.detach().float(), max=0), torch.clamp(high.detach().float(), min=0)
        self.low.copy_(low)
        self.high.copy_(high)
        if self.signed:
            scale = torch.maximum(-low / -self.qmin, high / self.qmax)
            zero = torch.zeros_like(scale)
        else:
            scale = (high - low) / (self.qmax - self.qmin)
            zero = None
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if zero is None:
            zero = (self.qmin - torch.round(low / scale)).clamp(self.qmin, self.qmax)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero)

    # --- calibration over many batches -----------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        if self.signed is None:
            self.signed = bool((x < 0).any())
        if self._observer is None:
            self._observer = make_observer(self.scheme())
        self._observer.update(x.detach().reshape(1, -1))

    def finish_calibration(self) -> None:
        if self._observer is None:
            raise RuntimeError("finish_calibration() before any observe(x)")
        low, high = self._observer.range()
        self.set_range(low.reshape(()), high.reshape(()))
        self._observer = None
        self.initialized.fill_(True)

    def initialize(self, x: torch.Tensor) -> None:
        self.observe(x)
        self.finish_calibration()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track is not None:
            with torch.no_grad():
                low, high = torch.aminmax(x.detach().float())
                if self.track == "ema":
                    low = self.low + self.momentum * (low - self.low)
                    high = self.high + self.momentum * (high - self.high)
                self.set_range(low, high)
        S, Z = self.scale, self.zero_point
        q = torch.clamp(round_ste(x / S) + Z, self.qmin, self.qmax)  # clamp: gradient 0 outside
        return (q - Z) * S


class QuantSimLayer(nn.Module):
    """A conv or linear layer computing layer(input_quantizer(x)) with weight_quantizer(W)."""

    def __init__(self, layer: nn.Module, weight_quantizer: FakeQuantizer | None,
                 input_quantizer: FakeQuantizer | None) -> None:
        super().__init__()
        if not isinstance(layer, WEIGHTED):
            raise TypeError(f"QuantSimLayer wraps Linear and Conv layers, not {type(layer).__name__}")
        self.layer, self.weight_quantizer, self.input_quantizer = layer, weight_quantizer, input_quantizer

    def quantized_weight(self) -> torch.Tensor:
        W = self.layer.weight
        return W if self.weight_quantizer is None else self.weight_quantizer(W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        W, layer = self.quantized_weight(), self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, W, layer.bias)
        return layer._conv_forward(x, W, layer.bias)


class _LayerTracer(fx.Tracer):
    """Traces through everything but the (possibly wrapped) layers."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, WEIGHTED + (QuantSimLayer,)) or super().is_leaf_module(m, qualname)


def weighted_layers(model: nn.Module) -> list[str]:
    """Names of the conv/linear layers (wrapped or not) in the order the forward pass calls
    them (traced with torch.fx; module order when the model does not trace)."""
    modules = dict(model.named_modules())
    kinds = WEIGHTED + (QuantSimLayer,)
    try:
        graph = _LayerTracer().trace(model)
        order = [str(n.target) for n in graph.nodes if n.op == "call_module" and isinstance(modules.get(str(n.target)), kinds)]
        if order:
            return list(dict.fromkeys(order))
    except Exception:  # noqa: BLE001 - untraceable models fall back to definition order
        pass
    names = [name for name, m in modules.items() if isinstance(m, kinds)]
    return [n for n in names if not any(n.startswith(w + ".") for w in names)]


def bits_per_layer(model: nn.Module, bits: int, first_last_bits: int | None = 8) -> dict[str, int]:
    """`bits` for every conv/linear layer, except the first and last at `first_last_bits`."""
    names = weighted_layers(model)
    chosen = {name: bits for name in names}
    if first_last_bits is not None and names:
        chosen[names[0]] = chosen[names[-1]] = first_last_bits
    return chosen


def per_tensor_schemes(model: nn.Module, bits: int, first_last_bits: int | None = 8) -> dict[str, QuantScheme]:
    """One per-tensor weight scheme per conv/linear layer, at `bits_per_layer`'s widths."""
    return {name: QuantScheme(bits=b, granularity=Granularity.TENSOR)
            for name, b in bits_per_layer(model, bits, first_last_bits).items()}


QuantizerFactory = Callable[[str, nn.Module, int], "FakeQuantizer | None"]


def wrap_layers(model: nn.Module, weight_bits: dict[str, int], activation_bits: dict[str, int] | None,
                make_weight_quantizer: QuantizerFactory, make_input_quantizer: QuantizerFactory) -> dict[str, QuantSimLayer]:
    """Replace each named layer of `model` (in place) by a QuantSimLayer. The factories get
    (name, layer, bits); `activation_bits=None` leaves inputs float."""
    wrapped = {}
    for name, bits in weight_bits.items():
        layer = model.get_submodule(name)
        input_quantizer = None
        if activation_bits is not None and name in activation_bits:
            input_quantizer = make_input_quantizer(name, layer, activation_bits[name])
            if input_quantizer is not None:
                input_quantizer.activation = True
        wrapped[name] = QuantSimLayer(layer, make_weight_quantizer(name, layer, bits), input_quantizer)
        model.set_submodule(name, wrapped[name])
    return wrapped


def quantsim_layers(model: nn.Module) -> dict[str, QuantSimLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantSimLayer)}


@torch.no_grad()
def calibrate_inputs(model: nn.Module, data: list[torch.Tensor]) -> None:
    """Calibrate every StaticQuantizer on layer inputs from `data`, in the order the layers run,
    each seeing the inputs of the network quantized up to it (its own quantizer still off)."""
    layers = quantsim_layers(model)
    pending = {name: layer.input_quantizer for name, layer in layers.items()
               if isinstance(layer.input_quantizer, StaticQuantizer)}
    for name in pending:
        layers[name].input_quantizer = None  # off until calibrated
    order = [name for name in weighted_layers(model) if name in pending] or list(pending)
    model.eval()
    for name in order:
        quantizer = pending[name]
        handle = layers[name].register_forward_pre_hook(lambda _m, args: quantizer.observe(args[0]))
        try:
            for batch in data:
                model(batch)
        finally:
            handle.remove()
        quantizer.finish_calibration()
        layers[name].input_quantizer = quantizer


def static_quantsim(model: nn.Module, activation_bits: int | None, data: list[torch.Tensor] | None,
                    first_last_bits: int | None = 8, observer: str = "mse") -> dict[str, QuantSimLayer]:
    """Quantize the inputs of a model whose weights are already on their grids (after RTN, DFQ,
    AdaRound, ...): wrap every layer with a calibrated StaticQuantizer on its input. The
    weights are left as they are (no weight quantizer)."""
    if activation_bits is None:
        return {}
    if not data:
        raise ValueError("static activation quantization needs calibration data")
    bits = bits_per_layer(model, activation_bits, first_last_bits)
    wrapped = wrap_layers(model, bits, bits, lambda *_: None,
                          lambda _n, _l, b: StaticQuantizer(b, observer=observer))
    calibrate_inputs(model, data)
    return wrapped


@torch.no_grad()
def export_quantsim(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """What a deployment needs from a simulated-quantized model: the plain model's state dict
    with every wrapped layer's weight replaced by its quantized value, each input quantizer's
    parameters and buffers under `<layer>.input_quantizer.<name>`, and a description per layer
    (quantizer kinds, bits, signedness, distinct weight values)."""
    model.eval()
    layers = quantsim_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    spec: dict[str, dict] = {}
    for key, value in model.state_dict().items():
        wrapped = next((name for name in layers if key.startswith(f"{name}.")), None)
        if wrapped is None:
            tensors[key] = value.detach().clone()
        elif key.startswith(f"{wrapped}.layer."):
            tensors[f"{wrapped}.{key.removeprefix(f'{wrapped}.layer.')}"] = value.detach().clone()
        elif key.startswith(f"{wrapped}.input_quantizer."):
            tensors[key] = value.detach().clone().float()
    for name, layer in layers.items():
        weight = layer.quantized_weight().detach().clone()
        tensors[f"{name}.weight"] = weight
        entry: dict = {"distinct_weight_values": int(weight.unique().numel())}
        for role, quantizer in (("weight", layer.weight_quantizer), ("input", layer.input_quantizer)):
            if quantizer is not None:
                entry[role] = {"quantizer": type(quantizer).__name__, "bits": quantizer.bits, "signed": quantizer.signed}
        spec[name] = entry
    return {k: v.contiguous() for k, v in tensors.items()}, spec
