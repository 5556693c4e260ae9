"""Calibration windows: consecutive slices of the DESIGN.md calibration tokens; for an encoder,
framed by its special tokens the way it sees real inputs ([CLS] … [SEP])."""

import torch

from quantcore.eval.data import ENCODER_MAX_TOKENS, split_tokens, tokenize_benchmark, calibration_windows
from quantcore.models.loading import load_model


def test_decoder_windows_are_consecutive_slices_of_the_calibration_tokens():
    tokenizer = load_model("bundled:smollm2-135m").tokenizer
    calibration, _ = split_tokens(tokenize_benchmark(tokenizer))
    windows = calibration_windows(tokenizer, 3, 64)
    assert [w.shape for w in windows] == [(1, 64)] * 3
    torch.testing.assert_close(torch.cat(windows, dim=1)[0], calibration[:192])


def test_encoder_windows_are_framed_by_cls_and_sep_and_capped():
    tokenizer = load_model("bundled:minilm-l6").tokenizer
    calibration, _ = split_tokens(tokenize_benchmark(tokenizer))
    windows = calibration_windows(tokenizer, 3, 512, encoder=True)
    assert [w.shape for w in windows] == [(1, ENCODER_MAX_TOKENS)] * 3
    body = ENCODER_MAX_TOKENS - 2
    for i, window in enumerate(windows):
        ids = window[0]
        assert ids[0].item() == tokenizer.cls_token_id and ids[-1].item() == tokenizer.sep_token_id
        torch.testing.assert_close(ids[1:-1], calibration[i * body : (i + 1) * body])
    short = calibration_windows(tokenizer, 2, 16, encoder=True)
    assert [w.shape for w in short] == [(1, 16)] * 2
