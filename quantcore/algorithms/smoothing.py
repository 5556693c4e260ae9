"""Per-channel scale migration, shared by SmoothQuant, AWQ and SVDQuant.

Dividing the j-th input channel of a group of Linear layers by s_j and multiplying the j-th
column of their weights by s_j leaves their outputs unchanged: XWᵀ = (X diag(s)⁻¹)(W diag(s))ᵀ.
The division is free when it can be folded into whatever produced X:

    norm → linears      X = γ ⊙ norm(h) (+ β): divide γ (and β) by s   (RMSNorm, LayerNorm)
    linear → linears    X = W_p h + b_p: divide the rows of W_p (and b_p) by s, when X is
                        that linear's output up to per-channel-linear ops (attention's
                        softmax(QKᵀ)·V for V → output projection, act(gate) ⊙ up for up → down)

Which producer feeds which layers is a property of the architecture, not of the tensors:
a LayerNorm whose output also feeds a residual connection (BERT's post-LN blocks) cannot
be scaled without changing the block. So the pairs are listed per architecture below, as
llm-compressor and AutoAWQ list them, and a pair is used only when its modules exist and
their shapes match.

Grouped-query attention (SmolLM2: 9 query heads share 3 value heads) gives V fewer channels
than the output projection takes: value channel (k, d) feeds O's input channels (h, d) of
every query head h in k's group. One scale per value channel, repeated over its group's
heads on O's side, still cancels exactly; its statistics are the max over the group. Such
pairs are built only on request (`grouped=True`), for callers that reduce their statistics
with `to_producer` (SmoothQuant); AWQ and SVDQuant search scales per consumer channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# (producer, consumers), names relative to a block.
PAIRS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # llama-style decoders (SmolLM2, Llama, Mistral, Qwen2)
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),  # with grouped-query attention: only if `grouped`
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
    # BERT encoders: the LayerNorms feed residual connections, so only value → output
    ("attention.self.value", ("attention.output.dense",)),
)


@dataclass
class SmoothingPair:
    producer_name: str  # full module names
    producer: nn.Module
    consumer_names: list[str]
    consumers: list[nn.Linear]
    # grouped-query attention: each producer channel feeds `repeat` consumer channels,
    # consumer channel (k, r, d) ↔ producer channel (k, d) with d < head_dim
    repeat: int = 1
    head_dim: int = 0

    @property
    def channels(self) -> int:
        """Producer channels: one scale each."""
        return self.consumers[0].in_features // self.repeat

    def to_producer(self, per_consumer_channel: torch.Tensor) -> torch.Tensor:
        """A per-consumer-channel max statistic, reduced to one value per producer channel."""
        if self.repeat == 1:
            return per_consumer_channel
        return per_consumer_channel.reshape(-1, self.repeat, self.head_dim).amax(dim=1).reshape(-1)

    def to_consumer(self, s: torch.Tensor) -> torch.Tensor:
        """Per-producer-channel scales, repeated over the consumer channels each one feeds."""
        if self.repeat == 1:
            return s
        return s.reshape(-1, 1, self.head_dim).expand(-1, self.repeat, -1).reshape(-1)

    def weight_absmax(self) -> torch.Tensor:
        """max_i |W_ij| over the rows of every consumer: one value per input channel j."""
        return torch.stack([c.weight.detach().abs().amax(dim=0) for c in self.consumers]).amax(dim=0).float()

    def apply(self, s: torch.Tensor) -> None:
        """Divide the producer's output channels by s (one per producer channel) and multiply
        the consumers' columns they feed by s."""
        s = s.float()
        wide = self.to_consumer(s)
        with torch.no_grad():
            producer = self.producer
            if isinstance(producer, nn.Linear):
                producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
            else:
                producer.weight.div_(s.to(producer.weight.dtype))
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
            for consumer in self.consumers:
                consumer.weight.mul_(wide.to(consumer.weight.dtype))


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), torch.Tensor)


def _grouped_query_repeat(block: nn.Module, producer_name: str, producer: nn.Linear, width: int) -> tuple[int, int]:
    """(repeat, head_dim) when `producer` is the value projection of grouped-query attention
    whose output projection takes `width` channels; (0, 0) when it is not."""
    attention = block.get_submodule(producer_name.rsplit(".", 1)[0]) if "." in producer_name else block
    head_dim = getattr(attention, "head_dim", None)
    if not producer_name.endswith("v_proj") or not isinstance(head_dim, int) or head_dim <= 0:
        return 0, 0
    out = producer.out_features
    if out % head_dim or width % out or width // out < 2:
        return 0, 0
    return width // out, head_dim


def smoothing_pairs(
    block_name: str, block: nn.Module, targets: dict[str, nn.Module] | None = None, grouped: bool = False
) -> list[SmoothingPair]:
    """The foldable (producer, consumers) pairs of `block`. With `targets`, only pairs whose
    consumers are all targeted (left-in-float layers are not smoothed); with `grouped`, also
    grouped-query attention's value → output pair."""
    pairs = []
    for producer_name, consumer_names in PAIRS:
        try:
            producer = block.get_submodule(producer_name)
            consumers = [block.get_submodule(name) for name in consumer_names]
        except AttributeError:
            continue
        if not all(isinstance(c, nn.Linear) for c in consumers):
            continue
        width = consumers[0].in_features
        if any(c.in_features != width for c in consumers):
            continue
        repeat, head_dim = 1, 0
        if isinstance(producer, nn.Linear):
            if producer.out_features != width:
                repeat, head_dim = _grouped_query_repeat(block, producer_name, producer, width) if grouped else (0, 0)
                if not repeat:
                    continue  # e.g. grouped-query attention, for a caller that cannot share scales
        elif not (_is_norm(producer) and producer.weight.shape == (width,)):
            continue
        full = [f"{block_name}.{name}" for name in consumer_names]
        if targets is not None and not all(name in targets for name in full):
            continue
        pairs.append(SmoothingPair(f"{block_name}.{producer_name}", producer, full, consumers, repeat, head_dim))
    return pairs


def migration_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1−α), kept finite where a channel is all zero."""
    eps = 1e-5
    s = act_absmax.clamp(min=eps).pow(alpha) / weight_absmax.clamp(min=eps).pow(1 - alpha)
    return s.clamp(min=eps)
