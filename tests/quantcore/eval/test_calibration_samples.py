"""Calibration samples: for a decoder, consecutive slices of the DESIGN.md calibration tokens;
for an encoder, whole paragraphs of the calibration part framed by its special tokens the way
it sees real inputs ([CLS] … [SEP]), never one of the evaluation paragraphs."""

import torch

from quantcore.eval.data import (
    ENCODER_MAX_TOKENS,
    benchmark_text,
    calibration_samples,
    evaluation_paragraphs,
    split_tokens,
    tokenize_benchmark,
)
from quantcore.models.loading import load_model


def test_decoder_windows_are_consecutive_slices_of_the_calibration_tokens():
    tokenizer = load_model("bundled:smollm2-135m").tokenizer
    calibration, _ = split_tokens(tokenize_benchmark(tokenizer))
    windows = calibration_samples(tokenizer, 3, 64)
    assert [w.shape for w in windows] == [(1, 64)] * 3
    torch.testing.assert_close(torch.cat(windows, dim=1)[0], calibration[:192])


def test_encoder_samples_are_the_first_paragraphs_framed_and_within_the_token_budget():
    tokenizer = load_model("bundled:minilm-l6").tokenizer
    paragraphs = [p.strip() for p in benchmark_text().split("\n\n") if p.strip()]
    samples = calibration_samples(tokenizer, 8, 64, encoder=True)
    lengths = [s.shape[1] for s in samples]
    assert sum(lengths) <= 8 * 64
    # the next paragraph would not have fitted: the budget is used, not just respected
    following = tokenizer(paragraphs[len(samples)], truncation=True, max_length=ENCODER_MAX_TOKENS).input_ids
    assert sum(lengths) + len(following) > 8 * 64
    for paragraph, sample in zip(paragraphs, samples):
        ids = sample[0].tolist()
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        words = tokenizer(paragraph, add_special_tokens=False).input_ids
        assert ids[1:-1] == words[: ENCODER_MAX_TOKENS - 2]


def test_encoder_samples_are_capped_and_never_evaluation_paragraphs():
    tokenizer = load_model("bundled:minilm-l6").tokenizer
    samples = calibration_samples(tokenizer, 4096, 512, encoder=True)  # more than the calibration part holds
    assert max(s.shape[1] for s in samples) == ENCODER_MAX_TOKENS
    paragraphs = [p.strip() for p in benchmark_text().split("\n\n") if p.strip()]
    assert len(samples) == int(len(paragraphs) * 0.6)
    # disjoint by position: calibration is the first 60 % of paragraphs, evaluation the last 20 %
    first_evaluation = evaluation_paragraphs(1)[0]
    assert paragraphs.index(first_evaluation) >= len(samples)
