"""Fixtures of the algorithm tests: a tiny llama whose weights give calibration-based
algorithms something to exploit, and the error measure their whole-model tests compare by."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


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
