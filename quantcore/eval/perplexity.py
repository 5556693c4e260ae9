"""Perplexity on the benchmark split: non-overlapping windows over the first N evaluation
tokens, exp of the mean next-token negative log-likelihood over all predicted tokens."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantcore.eval.data import split_tokens, tokenize_benchmark


def perplexity_on_tokens(
    model: nn.Module,
    tokens: torch.Tensor,
    window: int,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    windows = [tokens[i : i + window] for i in range(0, tokens.numel() - 1, window)]
    windows = [w for w in windows if w.numel() > 1]
    nll_sum, count = 0.0, 0
    with torch.inference_mode():
        for i, ids in enumerate(windows):
            logits = model(ids.unsqueeze(0)).logits[0, :-1].float()
            nll_sum += F.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += ids.numel() - 1
            if progress:
                progress(i + 1, len(windows))
    return math.exp(nll_sum / count)


def evaluate_perplexity(model: nn.Module, tokenizer, spec, progress: Callable[[int, int], None] | None = None) -> float:
    """Perplexity with the split and sizes of an `EvaluationSpec` (perplexity_tokens, window)."""
    _, evaluation = split_tokens(tokenize_benchmark(tokenizer))
    tokens = evaluation[: spec.perplexity_tokens]
    return perplexity_on_tokens(model, tokens, spec.window, progress)
