"""The fixed benchmark split of DESIGN.md, so numbers compare across runs and machines.

Text: the standard library's pydoc topics, joined in sorted key order, tokenized whole.
Calibration = the first 60 % of the tokens, evaluation = the last 20 %. The 20 % between
them is left unused so that calibration and evaluation never touch.
"""

from __future__ import annotations

from functools import lru_cache

import torch

CALIBRATION_FRACTION = 0.6
EVALUATION_FRACTION = 0.2


@lru_cache(maxsize=1)
def benchmark_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def tokenize_benchmark(tokenizer) -> torch.Tensor:
    """All benchmark tokens as a 1-D LongTensor (no special tokens added)."""
    return tokenizer(benchmark_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]


def split_tokens(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) slices of the token stream."""
    n = ids.numel()
    return ids[: int(n * CALIBRATION_FRACTION)], ids[int(n * (1 - EVALUATION_FRACTION)) :]


def calibration_windows(tokenizer, num_samples: int, seq_len: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows from the start of the calibration tokens."""
    calibration, _ = split_tokens(tokenize_benchmark(tokenizer))
    count = min(num_samples, calibration.numel() // seq_len)
    return [calibration[i * seq_len : (i + 1) * seq_len].unsqueeze(0) for i in range(count)]


def evaluation_paragraphs(count: int) -> list[str]:
    """Paragraphs (blank-line separated, non-empty) from the evaluation part of the text,
    i.e. the last 20 % of paragraphs, first `count` of them."""
    paragraphs = [p.strip() for p in benchmark_text().split("\n\n") if p.strip()]
    start = int(len(paragraphs) * (1 - EVALUATION_FRACTION))
    return paragraphs[start : start + count]
