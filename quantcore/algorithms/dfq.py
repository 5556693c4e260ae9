"""DFQ: Nagel, van Baalen, Blankevoort, Welling, "Data-Free Quantization Through Weight
Equalization and Bias Correction" (ICCV 2019), the math on a traced model.

1. BatchNorm folding. conv → BN becomes one conv, per output channel:
       W' = W · γ/σ,  b' = (b − μ) · γ/σ + β,   σ = sqrt(var + ε)
   BN's β and γ are kept: they are the mean and std the folded conv's output channel is
   expected to have, which steps 3 and 4 use instead of data.
2. Cross-layer equalization (§4.1). For layer1 → f → layer2 where f is positive
   homogeneous per channel (ReLU, max/avg pooling, a mean over space) and layer1 feeds
   nothing else, f(x / s) = f(x) / s for s > 0, so output channel i of layer1 may be divided
   by s_i and input channel i of layer2 multiplied by s_i without changing the model.
       s_i = sqrt(r1_i · r2_i) / r2_i     (r1_i: max |W1| of output channel i,
                                           r2_i: max |W2| of input channel i)
   leaves both channels with the range sqrt(r1_i r2_i), the best per-tensor precision for
   the pair (eq. 8-10). A residual add joins two producers' channel spaces (a/s + b/s =
   (a + b)/s): all producers and consumers of such a space form one group, r1 and r2 taken
   as the largest over the group's producers and consumers (our extension; the paper
   equalizes pairs). A space also read by a concat or the output is left alone. Repeated
   over every group until the scales settle (a layer may sit in two groups).
3. Bias absorption (§4.2). With layer1's pre-activation x_i ~ N(β_i, γ_i²) (from BN),
   c_i = max(0, β_i − 3γ_i) lies below almost every x_i, and then ReLU(x − c) = ReLU(x) − c:
   b1 −= c and b2 += W2 · c. Exact where x_i ≥ c_i and layer2 has no zero padding (padded
   zeros are not shifted by c): at a padded border the absorbed c is wrong by W2 · c.
4. Bias correction (§4.3). Quantizing W to W̃ adds ε = W̃ − W, which shifts the output's
   mean by ε · E[x]: b −= ε · E[x]. Analytic: E[x] of an input ReLU(N(β, γ²)) is the clipped
   normal mean γ φ(β/γ) + β Φ(β/γ); empirical: the shift itself measured on data (which
   also gets a conv's borders right).
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from quantcore.pipeline import run_observed
from quantcore.targets import set_module

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Modules that map channel i of their input to channel i of their output and commute with a
# positive per-channel scale: f(x / s) = f(x) / s.
CHANNELWISE_HOMOGENEOUS = (nn.ReLU, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass
class ChannelStats:
    """Expected mean β and std γ of each output channel of a layer, before its activation."""

    mean: torch.Tensor
    std: torch.Tensor
    relu: bool = True  # a ReLU follows (the input of the next layer is ReLU(N(β, γ²)))


def _trace(model: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(model)


def _module(model: nn.Module, node: fx.Node) -> nn.Module | None:
    return model.get_submodule(node.target) if node.op == "call_module" else None


# --------------------------------------------------------------------------------------
# 1. BatchNorm folding
# --------------------------------------------------------------------------------------
def fold_batchnorm(model: nn.Module) -> dict[str, ChannelStats]:
    """Fold every BatchNorm that directly follows a conv/linear (its only user) into it, in
    place; the BN becomes nn.Identity. Returns each folded layer's (β, γ)."""
    graph = _trace(model).graph
    stats: dict[str, ChannelStats] = {}
    for node in graph.nodes:
        bn = _module(model, node)
        if not isinstance(bn, BATCHNORMS):
            continue
        producer = node.args[0]
        layer = _module(model, producer) if isinstance(producer, fx.Node) else None
        if not isinstance(layer, WEIGHTED) or len(producer.users) != 1:
            continue
        sigma = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight.detach() if bn.affine else torch.ones_like(sigma)
        beta = bn.bias.detach() if bn.affine else torch.zeros_like(sigma)
        factor = gamma / sigma
        with torch.no_grad():
            layer.weight.mul_(factor.reshape(-1, *[1] * (layer.weight.dim() - 1)))
            bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(beta)
            new_bias = (bias - bn.running_mean) * factor + beta
            layer.bias = nn.Parameter(new_bias.clone())
        set_module(model, node.target, nn.Identity())
        stats[producer.target] = ChannelStats(mean=beta.clone(), std=gamma.abs().clone(), relu=_followed_by_relu(model, node))
    return stats


def _followed_by_relu(model: nn.Module, node: fx.Node) -> bool:
    users = list(node.users)
    return len(users) == 1 and _is_relu(model, users[0])


def _is_relu(model: nn.Module, node: fx.Node) -> bool:
    return isinstance(_module(model, node), nn.ReLU) or node.target in (torch.relu, nn.functional.relu)


# --------------------------------------------------------------------------------------
# 2. Cross-layer equalization
# --------------------------------------------------------------------------------------
@dataclass
class EqualizationGroup:
    """Layers that share one channel space: the producers' output channels, summed by residual
    adds, reach the consumers' input channels through positive-homogeneous channel-wise ops
    only. Dividing channel i of every producer by s_i and multiplying it into every consumer
    leaves the model unchanged. A pair layer1 → ReLU → layer2 is the simplest group."""

    producers: list[str]
    consumers: list[str]


def _is_add(node: fx.Node) -> bool:
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    return len(tensors) == 2 and (
        (node.op == "call_function" and node.target in (operator.add, torch.add)) or (node.op == "call_method" and node.target == "add")
    )


def _channelwise(model: nn.Module, node: fx.Node) -> bool:
    return (isinstance(_module(model, node), CHANNELWISE_HOMOGENEOUS) or _is_spatial_mean(node)
            or _is_relu(model, node) or _is_add(node))


def equalization_groups(model: nn.Module) -> list[EqualizationGroup]:
    """Every channel space between conv/linear layers that equalization may rescale. A space
    also read by anything else (a concat, the model output, a reshape) is left alone: that
    reader would see the scaled channels."""
    graph = _trace(model).graph
    weighted = {node for node in graph.nodes if isinstance(_module(model, node), WEIGHTED)}
    assigned: set[fx.Node] = set()
    groups = []
    for start in graph.nodes:
        if start not in weighted or start in assigned:
            continue
        producers, consumers, seen, valid = {start}, [], set(), True
        frontier = [start]
        while frontier:
            node = frontier.pop()
            neighbours = list(node.users)
            if node not in weighted:  # a channel-wise op: its inputs share the space too
                neighbours += [a for a in node.args if isinstance(a, fx.Node)]
            for other in neighbours:
                if other in weighted:
                    if other in node.users:  # reads the space
                        valid &= other.args[0] is node
                        if other not in consumers:
                            consumers.append(other)
                    elif other not in producers:  # writes it
                        producers.add(other)
                        frontier.append(other)
                elif other not in seen:
                    seen.add(other)
                    if _channelwise(model, other):
                        frontier.append(other)
                    else:  # a concat, the output, a reshape: it would see the scaled channels
                        valid = False
        assigned |= producers
        # a layer both reading and writing the space (x + f(W x)) would need s on both sides
        valid &= not producers.intersection(consumers)
        if valid and consumers and _compatible(model, producers, consumers):
            order = [n.target for n in graph.nodes if n in producers]
            groups.append(EqualizationGroup(order, [n.target for n in consumers]))
    return groups


def _compatible(model: nn.Module, producers, consumers) -> bool:
    channels = {model.get_submodule(n.target).weight.shape[0] for n in producers}
    for n in consumers:
        layer = model.get_submodule(n.target)
        if getattr(layer, "groups", 1) != 1:
            return False
        channels.add(layer.weight.shape[1])
    return len(channels) == 1


def _is_spatial_mean(node: fx.Node) -> bool:
    """x.mean(dim=...) over dimensions after the channel dimension."""
    if node.op != "call_method" or node.target != "mean":
        return False
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = (dims,) if isinstance(dims, int) else dims
    return dims is not None and all(d >= 2 for d in dims)


def _output_range(W: torch.Tensor) -> torch.Tensor:
    return W.detach().abs().reshape(W.shape[0], -1).amax(dim=1)


def _input_range(W: torch.Tensor) -> torch.Tensor:
    return W.detach().abs().transpose(0, 1).reshape(W.shape[1], -1).amax(dim=1)


def equalize_group(model: nn.Module, group: EqualizationGroup) -> torch.Tensor:
    """Rescale one group in place with s_i = sqrt(r1_i r2_i) / r2_i, r1_i the largest range of
    output channel i over the producers, r2_i of input channel i over the consumers; returns s."""
    producers = [model.get_submodule(n) for n in group.producers]
    consumers = [model.get_submodule(n) for n in group.consumers]
    r1 = torch.stack([_output_range(layer.weight) for layer in producers]).amax(dim=0)
    r2 = torch.stack([_input_range(layer.weight) for layer in consumers]).amax(dim=0)
    s = torch.sqrt(r1 * r2) / r2
    s = torch.where((r1 > 0) & (r2 > 0), s, torch.ones_like(s))  # a dead channel stays as it is
    with torch.no_grad():
        for layer in producers:
            layer.weight.div_(s.reshape(-1, *[1] * (layer.weight.dim() - 1)))
            if layer.bias is not None:
                layer.bias.div_(s)
        for layer in consumers:
            layer.weight.mul_(s.reshape(1, -1, *[1] * (layer.weight.dim() - 2)))
    return s


def cross_layer_equalization(
    model: nn.Module, stats: dict[str, ChannelStats] | None = None, iterations: int = 20, tolerance: float = 1e-4
) -> list[EqualizationGroup]:
    """Equalize every group until no scale moves by more than `tolerance` (relative); keeps
    `stats` (the layers' expected output mean and std) in step with the rescaling."""
    groups = equalization_groups(model)
    for _ in range(iterations):
        largest_change = 0.0
        for group in groups:
            s = equalize_group(model, group)
            largest_change = max(largest_change, float((s - 1).abs().max()))
            for name in group.producers:
                if stats and name in stats:
                    stats[name].mean, stats[name].std = stats[name].mean / s, stats[name].std / s
        if largest_change < tolerance:
            break
    return groups


# --------------------------------------------------------------------------------------
# 3. Bias absorption
# --------------------------------------------------------------------------------------
def absorb_biases(model: nn.Module, groups: list[EqualizationGroup], stats: dict[str, ChannelStats], sigmas: float = 3.0) -> None:
    """For each group with one producer, followed by a ReLU: c = max(0, β − 3γ) moves from the
    producer's bias into every consumer's (b2 += W2 · c, summed over the consumer's kernel).
    (With several producers a residual add sits between them and the ReLU's c does not pass.)"""
    for group in groups:
        if len(group.producers) != 1 or group.producers[0] not in stats or not stats[group.producers[0]].relu:
            continue
        name1 = group.producers[0]
        c = (stats[name1].mean - sigmas * stats[name1].std).clamp(min=0)
        with torch.no_grad():
            model.get_submodule(name1).bias.sub_(c)
            for name2 in group.consumers:
                layer2 = model.get_submodule(name2)
                shift = _weight_times_channel_vector(layer2.weight, c)
                if layer2.bias is None:
                    layer2.bias = nn.Parameter(shift.clone())
                else:
                    layer2.bias.add_(shift)
        stats[name1].mean = stats[name1].mean - c


def _weight_times_channel_vector(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W · v for an input constant per channel: Σ over input channels and kernel positions."""
    return (W.detach() * v.reshape(1, -1, *[1] * (W.dim() - 2))).reshape(W.shape[0], -1).sum(dim=1)


# --------------------------------------------------------------------------------------
# 4. Bias correction
# --------------------------------------------------------------------------------------
def clipped_normal_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[ReLU(x)] for x ~ N(mean, std²): std φ(mean/std) + mean Φ(mean/std)."""
    std = std.clamp(min=1e-12)
    z = mean / std
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    return std * pdf + mean * cdf


def expected_input(stats: ChannelStats) -> torch.Tensor:
    """E[x] of the next layer's input per channel, from the producer's (β, γ)."""
    return clipped_normal_mean(stats.mean, stats.std) if stats.relu else stats.mean


def expected_shift(
    layer: nn.Module, quantized_weight: torch.Tensor, input_mean: torch.Tensor, input_shape: torch.Size | None = None
) -> torch.Tensor:
    """The analytic mean output shift ε · E[x] (ε = W̃ − W) for an input whose mean is
    `input_mean` per channel at every position. Given a conv's `input_shape`, the mean is
    taken over the conv's output positions with its zero padding (at a border part of the
    kernel sees padding, not E[x]: on small images that is much of the kernel)."""
    if input_shape is None or isinstance(layer, nn.Linear):
        return _weight_times_channel_vector(quantized_weight - layer.weight.detach(), input_mean)
    constant = input_mean.reshape(1, -1, *[1] * (len(input_shape) - 2)).expand(1, *input_shape[1:])
    with torch.no_grad():
        y = _error_layer(layer, quantized_weight)(constant.contiguous())
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(dim=1)


def measured_shift(model: nn.Module, name: str, quantized_weight: torch.Tensor, data: list[torch.Tensor]) -> torch.Tensor:
    """The mean output shift of layer `name` of `model` measured on `data` (empirical bias
    correction): mean over samples and positions of the layer computed with ε = W̃ − W and
    no bias, on the inputs the layer actually sees."""
    layer = model.get_submodule(name)
    error_layer = _error_layer(layer, quantized_weight)
    total, count = 0, 0

    def record(_: str, x: torch.Tensor) -> None:
        nonlocal total, count
        y = error_layer(x).double()
        y = y.reshape(-1, y.shape[-1]) if isinstance(layer, nn.Linear) else y.transpose(0, 1).reshape(y.shape[1], -1).T
        total, count = total + y.sum(dim=0), count + y.shape[0]

    run_observed(model, [name], data, record)
    return (total / count).float()


def _error_layer(layer: nn.Module, quantized_weight: torch.Tensor) -> nn.Module:
    """A copy of `layer` computing ε x (ε = W̃ − W, no bias): the output change W̃ brings."""
    error_layer = copy.deepcopy(layer)
    with torch.no_grad():
        error_layer.weight.copy_(quantized_weight - layer.weight.detach())
    error_layer.bias = None
    return error_layer


def correct_bias(layer: nn.Module, quantized_weight: torch.Tensor, shift: torch.Tensor) -> None:
    """Set W̃ as the layer's weight and b −= shift, the mean output shift W̃ adds."""
    with torch.no_grad():
        layer.weight.copy_(quantized_weight)
        if layer.bias is None:
            layer.bias = nn.Parameter(-shift.clone())
        else:
            layer.bias.sub_(shift)


def input_channel_means(model: nn.Module, names: list[str], data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean of each input channel of the named layers over `data` (empirical E[x])."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: torch.Tensor) -> None:
        if isinstance(model.get_submodule(name), nn.Linear):  # features last
            x = x.reshape(-1, x.shape[-1]).T
        else:  # (N, C, *spatial)
            x = x.transpose(0, 1).reshape(x.shape[1], -1)
        sums[name] = sums.get(name, 0) + x.double().sum(dim=1)
        counts[name] = counts.get(name, 0) + x.shape[1]

    run_observed(model, names, data, record)
    return {name: (sums[name] / counts[name]).float() for name in names if name in sums}


# --------------------------------------------------------------------------------------
# The whole recipe
# --------------------------------------------------------------------------------------
@dataclass
class DFQReport:
    folded: list[str]
    equalized: list[EqualizationGroup]
    corrected: dict[str, str]  # layer -> "analytic" | "empirical"
    uncorrected: list[str]  # layers whose input mean nothing told (e.g. the first, without data)


def data_free_quantize(
    model: nn.Module,
    quantize_weight,
    data: list[torch.Tensor] | None = None,
    equalize: bool = True,
    absorb: bool = True,
    correct: bool = True,
    example_input: torch.Tensor | None = None,
    per_layer: dict | None = None,
) -> DFQReport:
    """Fold BN, equalize, absorb biases, then quantize every conv/linear weight in graph order
    with `quantize_weight(W) -> W̃` (in place: the layers stay float modules holding W̃) and
    correct each bias: from the producers' BN statistics, or, given `data`, measured with
    the layers before it already quantized. `example_input` (one input of the model's shape,
    its values unused) lets the analytic correction see each conv's input size and padding.
    `per_layer` maps layer names to their own quantize_weight (e.g. the first and last layer
    at 8 bits)."""
    shapes = layer_input_shapes(model, example_input) if example_input is not None else {}
    stats = fold_batchnorm(model)
    groups = cross_layer_equalization(model, stats) if equalize else []
    if absorb:
        absorb_biases(model, groups, stats)
    producers = input_producers(model)
    report = DFQReport(folded=list(stats), equalized=groups, corrected={}, uncorrected=[])
    for name, layer in _weighted_in_graph_order(model):
        quantized = (per_layer or {}).get(name, quantize_weight)(layer.weight.detach())
        shift = None
        if correct and data:
            shift, how = measured_shift(model, name, quantized, data), "empirical"
        elif correct and producers.get(name) and all(p in stats for p in producers[name]):
            mean = torch.cat([expected_input(stats[p]) for p in producers[name]])
            shift, how = expected_shift(layer, quantized, mean, shapes.get(name)), "analytic"
        if shift is None:
            with torch.no_grad():
                layer.weight.copy_(quantized)
            report.uncorrected.append(name)
        else:
            correct_bias(layer, quantized, shift)
            report.corrected[name] = how
    return report


def layer_input_shapes(model: nn.Module, example_input: torch.Tensor) -> dict[str, torch.Size]:
    """The input shape of every conv/linear when the model runs `example_input`."""
    shapes: dict[str, torch.Size] = {}
    names = [name for name, module in model.named_modules() if isinstance(module, WEIGHTED)]
    run_observed(model, names, [torch.zeros_like(example_input)], lambda name, x: shapes.__setitem__(name, x.shape))
    return shapes


def _weighted_in_graph_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    graph = _trace(model).graph
    return [(node.target, _module(model, node)) for node in graph.nodes if isinstance(_module(model, node), WEIGHTED)]


def input_producers(model: nn.Module) -> dict[str, list[str]]:
    """For each conv/linear, the layers whose outputs make up its input channel by channel:
    one producer through Identity (a folded BN) and ReLU, or several through a concat along
    channels. Layers fed anything else (a residual add, pooling, the model input) are absent."""
    graph = _trace(model).graph

    def walk(node) -> list[str] | None:
        while isinstance(node, fx.Node):
            module = _module(model, node)
            if isinstance(module, WEIGHTED):
                return [node.target]
            if isinstance(module, nn.Identity) or _is_relu(model, node):
                node = node.args[0]
                continue
            if node.target is torch.cat and node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) == 1:
                parts = [walk(part) for part in node.args[0]]
                return None if any(p is None for p in parts) else [name for part in parts for name in part]
            return None
        return None

    producers = {}
    for node in graph.nodes:
        if isinstance(_module(model, node), WEIGHTED) and node.args and isinstance(node.args[0], fx.Node):
            found = walk(node.args[0])
            if found:
                producers[node.target] = found
    return producers


def weight_quantizer(scheme):
    """W ↦ W̃ on `scheme`'s grid (its observer over W alone), for conv and linear weights:
    a conv's (out, in, kh, kw) weight is quantized as its (out, in·kh·kw) matrix."""
    from quantcore.observers import fake_quant_weight

    def quantize_weight(W: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(W.reshape(W.shape[0], -1).float(), scheme).reshape(W.shape)

    return quantize_weight


@torch.no_grad()
def round_to_nearest(model: nn.Module, schemes: dict) -> None:
    """Every named layer's weight rounded to nearest on its scheme's grid, in place."""
    for name, scheme in schemes.items():
        layer = model.get_submodule(name)
        layer.weight.copy_(weight_quantizer(scheme)(layer.weight.detach()))
