"""The vision test bed: trains to DESIGN.md's bar, reproducibly, and caches its weights."""

import torch

from quantcore.models.digits_cnn import DigitsCNN, digits_split, pretrained_digits_cnn, top1, train_digits_cnn


def test_split_is_stratified_70_30():
    split = digits_split(0)
    assert len(split.train_x) + len(split.test_x) == 1797
    assert abs(len(split.test_x) / 1797 - 0.3) < 0.001
    train_share = torch.bincount(split.train_y, minlength=10).float() / len(split.train_y)
    test_share = torch.bincount(split.test_y, minlength=10).float() / len(split.test_y)
    assert float((train_share - test_share).abs().max()) < 0.01
    assert float(split.train_x.max()) == 1.0 and split.train_x.shape[1:] == (1, 8, 8)


def test_trained_cnn_reaches_97_percent_and_is_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("QFORGE_CACHE_DIR", str(tmp_path))
    split = digits_split(0)
    model = pretrained_digits_cnn(0, split)
    assert top1(model, split.test_x, split.test_y) >= 97.0
    cached = list(tmp_path.rglob("*.safetensors"))
    assert len(cached) == 1
    again = pretrained_digits_cnn(0, split)  # from the cache
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    retrained = train_digits_cnn(split, seed=0, epochs=2)
    twice = train_digits_cnn(split, seed=0, epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(retrained.state_dict().values(), twice.state_dict().values()))
    assert isinstance(model, DigitsCNN)
