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
ENCODER_MAX_TOKENS = 256  # all-MiniLM-L6-v2's sentence-transformers max_seq_length, as in eval.embedding


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


def calibration_windows(tokenizer, num_samples: int, seq_len: int, encoder: bool = False) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows from the start of the calibration tokens.

    An encoder sees each input framed by its special tokens ([CLS] … [SEP] for BERT), and
    those positions carry activations unlike any other (the [CLS] outlier channels), so with
    `encoder` each window is framed the same way, and no longer than `ENCODER_MAX_TOKENS`,
    the length it is evaluated (and, for sentence embedders, used) at.
    """
    calibration, _ = split_tokens(tokenize_benchmark(tokenizer))
    head, tail = _special_frame(tokenizer) if encoder else ([], [])
    if encoder:
        seq_len = min(seq_len, ENCODER_MAX_TOKENS)
    body = seq_len - len(head) - len(tail)
    if body < 1:
        raise ValueError(f"calibration seq_len {seq_len} leaves no room between the special tokens")
    count = min(num_samples, calibration.numel() // body)
    before, after = torch.tensor(head, dtype=calibration.dtype), torch.tensor(tail, dtype=calibration.dtype)
    return [torch.cat([before, calibration[i * body : (i + 1) * body], after]).unsqueeze(0) for i in range(count)]


def _special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text's own tokens."""
    marker = tokenizer("a", add_special_tokens=False).input_ids
    framed = tokenizer("a").input_ids
    for start in range(len(framed) - len(marker) + 1):
        if framed[start : start + len(marker)] == marker:
            return framed[:start], framed[start + len(marker) :]
    return [], []


def evaluation_paragraphs(count: int) -> list[str]:
    """Paragraphs (blank-line separated, non-empty) from the evaluation part of the text,
    i.e. the last 20 % of paragraphs, first `count` of them."""
    paragraphs = [p.strip() for p in benchmark_text().split("\n\n") if p.strip()]
    start = int(len(paragraphs) * (1 - EVALUATION_FRACTION))
    return paragraphs[start : start + count]
