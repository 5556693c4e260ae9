"""Fixtures of the algorithm tests: a tiny llama whose weights give calibration-based
algorithms something to exploit, the error measure their whole-model tests compare by, and
an untrained digits CNN whose BatchNorm looks trained."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantcore.models.digits_cnn import DigitsCNN


def _structured_llama() -> LlamaForCausalLM:
    """Random normal weights give GPTQ or AdaRound little to exploit: low rank plus noise, so
    that inputs to later layers are correlated. Seeded: every call builds the same model."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(0.02 * (torch.randn(p.shape[0], 4) @ torch.randn(4, p.shape[1]) + 0.3 * torch.randn_like(p)))
    return model


def _logits_error(model, reference, inputs) -> float:
    with torch.no_grad():
        return sum((model(x).logits - reference(x).logits).pow(2).mean().item() for x in inputs)


@pytest.fixture
def structured_llama():
    return _structured_llama


@pytest.fixture
def logits_error():
    return _logits_error


def _seeded_cnn(seed: int = 0, width: int = 16) -> DigitsCNN:
    """A seeded, untrained DigitsCNN with the BN statistics of a trained network, so that
    folding them changes the weights."""
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.4)
    return model.eval()


@pytest.fixture
def seeded_cnn():
    return _seeded_cnn
