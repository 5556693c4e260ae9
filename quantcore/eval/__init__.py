"""Evaluation: perplexity, embedding similarity, per-layer error, on the fixed benchmark split."""

from quantcore.eval.embedding import benchmark_paragraphs, embedding_cosine, sentence_embeddings
from quantcore.eval.layer_error import sqnr_db
from quantcore.eval.perplexity import evaluate_perplexity, perplexity_on_tokens

__all__ = [
    "benchmark_paragraphs",
    "embedding_cosine",
    "evaluate_perplexity",
    "perplexity_on_tokens",
    "sentence_embeddings",
    "sqnr_db",
]
