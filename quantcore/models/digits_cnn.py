"""The vision test bed of the classic PTQ and QAT algorithms: a small CNN with BatchNorm for
scikit-learn's 8x8 digits (DESIGN.md: stratified 70/30 split, seed 0).

It is small enough to train in seconds on a CPU and has the structures that make those
algorithms' corner cases happen:

    stem      conv-BN-ReLU                          (BN folding)
    body      conv-BN-ReLU → conv-BN-ReLU, + stem   (equalization through ReLU; a residual add,
                                                     where equalization must stop)
    branches  conv-BN-ReLU 3x3 ‖ conv-BN-ReLU 1x1   (a concat: two producers, one consumer)
    mix       conv-BN-ReLU, global average pool, linear head

`pretrained_digits_cnn()` trains it once per seed and caches the weights (safetensors).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from quantcore.cache import cache_dir

CLASSES = 10


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn_relu(1, width, 3)
        self.body1 = conv_bn_relu(width, width, 3)
        self.body2 = conv_bn_relu(width, width, 3)
        self.pool = nn.MaxPool2d(2)
        self.branch3 = conv_bn_relu(width, width, 3)
        self.branch1 = conv_bn_relu(width, width, 1)
        self.mix = conv_bn_relu(2 * width, 2 * width, 3)
        self.head = nn.Linear(2 * width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.body2(self.body1(x))
        x = self.pool(x)
        x = torch.cat([self.branch3(x), self.branch1(x)], dim=1)
        x = self.mix(x)
        return self.head(x.mean(dim=(2, 3)))


@dataclass
class DigitsSplit:
    train_x: torch.Tensor  # (N, 1, 8, 8), pixel values scaled to [0, 1]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def digits_split(seed: int = 0) -> DigitsSplit:
    """scikit-learn's digits, stratified 70/30 (DESIGN.md)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    train_x, test_x, train_y, test_y = train_test_split(
        x, digits.target, test_size=0.3, stratify=digits.target, random_state=seed
    )
    return DigitsSplit(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x), torch.from_numpy(test_y))


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x[i : i + batch]).argmax(dim=1) for i in range(0, len(x), batch)])
    return float((predictions == y).float().mean()) * 100


def train_digits_cnn(split: DigitsSplit, seed: int = 0, epochs: int = 30, batch: int = 64, lr: float = 3e-3) -> DigitsCNN:
    """Adam with a cosine schedule, seeded: the same seed gives the same weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(split.train_x) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(split.train_x), generator=generator)
        for i in range(0, len(order), batch):
            index = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(split.train_x[index]), split.train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def pretrained_digits_cnn(seed: int = 0, split: DigitsSplit | None = None) -> DigitsCNN:
    """The trained test-bed CNN, from the cache when this seed was trained before."""
    path = cache_dir() / "digits_cnn" / f"seed{seed}.safetensors"
    if path.is_file():
        model = DigitsCNN()
        load_model(model, str(path))
        return model.eval()
    model = train_digits_cnn(split or digits_split(), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(f"{path}.partial")
    save_model(model, str(partial))
    partial.replace(path)  # a crash mid-write never leaves a truncated cache entry
    return model
