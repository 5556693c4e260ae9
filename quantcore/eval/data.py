"""The fixed benchmark split of DESIGN.md, so numbers compare across runs and machines.

Text: the standard library's pydoc topics, joined in sorted key order, tokenized whole.
Calibration = the first 60 % of the tokens, evaluation = the last 20 %. The 20 % between
them is left unused so that calibration and evaluation never touch. Encoders are calibrated
and evaluated on whole paragraphs instead (the text split at blank lines): the first 60 % of
paragraphs and the last 20 %.
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


def calibration_windows(tokenizer, num_samples: int, seq_len: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows from the start of the calibration tokens (decoders)."""
    calibration, _ = split_tokens(tokenize_benchmark(tokenizer))
    count = min(num_samples, calibration.numel() // seq_len)
    return [calibration[i * seq_len : (i + 1) * seq_len].unsqueeze(0) for i in range(count)]


def calibration_paragraphs(tokenizer, token_budget: int) -> list[torch.Tensor]:
    """An encoder's calibration samples: whole paragraphs of the calibration part (the first
    60 % of paragraphs; evaluation takes the last 20 %), each tokenized as the encoder sees a
    real input ([CLS] … [SEP], at most `ENCODER_MAX_TOKENS`), in order, until they hold
    `token_budget` tokens.

    Why not fixed windows as for decoders: a sentence embedder is used on sentences and
    paragraphs (here a median of 32 tokens), and its attention, above all to [CLS] and [SEP],
    differs on long windows. GPTQ's Hessians from 256-token windows gave MiniLM W4 g64 an
    embedding cosine of 0.976, from paragraphs holding the same number of tokens 0.987.
    """
    if token_budget < 1:
        raise ValueError("calibration token budget must be positive")
    paragraphs = _paragraphs()
    samples, total = [], 0
    for paragraph in paragraphs[: int(len(paragraphs) * CALIBRATION_FRACTION)]:
        ids = tokenizer(paragraph, truncation=True, max_length=ENCODER_MAX_TOKENS, return_tensors="pt").input_ids
        if samples and total + ids.shape[1] > token_budget:
            break
        samples.append(ids)
        total += ids.shape[1]
    return samples


def calibration_samples(tokenizer, num_samples: int, seq_len: int, encoder: bool = False) -> list[torch.Tensor]:
    """What a job calibrates on: `num_samples` windows of `seq_len` tokens for a decoder; for
    an encoder, paragraphs holding as many tokens in all (`calibration_paragraphs`)."""
    if encoder:
        return calibration_paragraphs(tokenizer, num_samples * seq_len)
    return calibration_windows(tokenizer, num_samples, seq_len)


def _paragraphs() -> list[str]:
    return [p.strip() for p in benchmark_text().split("\n\n") if p.strip()]


def evaluation_paragraphs(count: int) -> list[str]:
    """Paragraphs (blank-line separated, non-empty) from the evaluation part of the text,
    i.e. the last 20 % of paragraphs, first `count` of them."""
    paragraphs = _paragraphs()
    start = int(len(paragraphs) * (1 - EVALUATION_FRACTION))
    return paragraphs[start : start + count]
