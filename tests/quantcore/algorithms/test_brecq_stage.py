"""BRECQ as a recipe stage on a tiny llama: the LM-loss Fisher it weighs by is the squared
gradient that autograd gives at each block's output, every block ends no worse than
round-to-nearest on its own objective, the model beats RTN on held-out inputs, and what the
stage cannot do is refused with a clear message."""

import pytest
import torch
from transformers import BertConfig, BertModel

from quantcore import quantize
from quantcore.algorithms.brecq_stage import lm_fisher
from quantcore.modules import QuantizedLinear

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHTS = {"bits": 3, "granularity": "channel"}


def test_lm_fisher_is_the_squared_gradient_at_each_block_output(structured_llama):
    model = structured_llama()
    sample = torch.randint(0, 128, (1, 16))
    fisher = lm_fisher(model, [sample])
    # independent: the model's own hidden states, differentiated by autograd
    out = model(input_ids=sample, labels=sample, output_hidden_states=True)
    first_block_outputs = out.hidden_states[1:-1]  # the last entry is after the final norm
    grads = torch.autograd.grad(out.loss, first_block_outputs)
    for index, g in enumerate(grads):
        expected = g.pow(2) / g.pow(2).mean()
        got = fisher[f"model.layers.{index}"][0].float()
        assert torch.allclose(got, expected, rtol=2e-3, atol=1e-3 * float(expected.max()))
    assert all(p.grad is None for p in model.parameters())  # the weights took no gradient


def test_brecq_stage_beats_nearest_and_rtn(structured_llama, logits_error):
    reference = structured_llama()
    calibration = [torch.randint(0, 128, (1, 32)) for _ in range(8)]
    held_out = [torch.randint(0, 128, (1, 32)) for _ in range(8)]
    model = structured_llama()
    stage = {"algorithm": "brecq", "weights": WEIGHTS, "options": {"iterations": 150, "samples": 8}}
    layers = quantize(model, {"stages": [stage]}, calibration=calibration)
    assert len(layers) == 14 and {layer["brecq_fisher"] for layer in layers} == {"lm"}
    for layer in layers:
        assert isinstance(model.get_submodule(layer["name"]), QuantizedLinear)
        assert layer["brecq_loss"] <= layer["brecq_loss_nearest"]
    assert sum(layer["brecq_loss"] < layer["brecq_loss_nearest"] for layer in layers) >= 7  # both blocks learned

    rtn = structured_llama()
    quantize(rtn, {"stages": [{"algorithm": "rtn", "weights": WEIGHTS}]})
    assert logits_error(model, reference, held_out) < 0.9 * logits_error(rtn, reference, held_out)


def test_brecq_stage_refuses_what_it_cannot_do(structured_llama):
    model = structured_llama()
    stage = {"algorithm": "brecq", "weights": WEIGHTS, "options": {"iterations": 5}}
    calibration = [torch.randint(0, 128, (1, 8))]
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(model, {"stages": [stage]})
    with pytest.raises(ValueError, match="dynamic activations"):
        quantize(model, {"stages": [{**stage, "activations": {"bits": 8, "granularity": "tensor"}}]}, calibration=calibration)
    with pytest.raises(ValueError, match="weights.granularity"):
        quantize(model, {"stages": [{**stage, "weights": {"bits": 4, "granularity": "group", "group_size": 32}}]})
    encoder = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64)).eval()
    with pytest.raises(ValueError, match="causal language model"):
        quantize(encoder, {"stages": [{**stage, "ignore": ["pooler.dense"], "options": {"fisher": "lm"}}]},
                 calibration=[{"input_ids": torch.randint(0, 64, (1, 8))}])
