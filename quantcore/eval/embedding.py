"""Encoder quality: mean cosine similarity between quantized and float sentence embeddings
(mean pooling over the attention mask, L2-normalised, as sentence-transformers does for
all-MiniLM-L6-v2) on the benchmark's evaluation paragraphs."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantcore.eval.data import ENCODER_MAX_TOKENS, evaluation_paragraphs

MAX_SEQ_LEN = ENCODER_MAX_TOKENS  # all-MiniLM-L6-v2's sentence-transformers max_seq_length
BATCH = 32


def sentence_embeddings(
    model: nn.Module, tokenizer, texts: list[str], progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    out = []
    batches = range(0, len(texts), BATCH)
    with torch.inference_mode():
        for i, start in enumerate(batches):
            enc = tokenizer(texts[start : start + BATCH], padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt")
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(F.normalize(pooled, dim=-1))
            if progress:
                progress(i + 1, len(batches))
    return torch.cat(out)


def embedding_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean cosine similarity of row pairs."""
    return F.cosine_similarity(reference.float(), candidate.float(), dim=-1).mean().item()


def benchmark_paragraphs(spec) -> list[str]:
    return evaluation_paragraphs(spec.embedding_paragraphs)
