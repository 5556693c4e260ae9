"""Block-by-block calibration against running the whole model: with nothing quantized the
last block's outputs equal the model's own, and with every block quantized up front they
equal the quantized model's (so each block saw the quantized blocks before it)."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from quantcore import quantize
from quantcore.calibration import find_blocks, observe_inputs, run_block, run_blockwise
from quantcore.recipe import Recipe


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def final_norm_input(model, samples):
    """Reference: the input of the final norm when the whole model runs."""
    seen = []
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for s in samples:
            model(s)
    handle.remove()
    return seen


def test_noop_blockwise_pass_reproduces_the_model():
    model = tiny_llama()
    samples = [torch.randint(0, 64, (1, 10)) for _ in range(3)]
    expect = final_norm_input(model, samples)
    seen = {}

    def record_last(name, block, inputs):
        if name == "model.layers.2":
            seen["out"] = [run_block(block, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]

    events = []
    run_blockwise(model, samples, record_last, lambda c, t, m="": events.append((c, t)))
    assert events == [(0, 3), (1, 3), (2, 3), (3, 3)]
    for got, want in zip(seen["out"], expect):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_each_block_sees_the_quantized_blocks_before_it():
    recipe = Recipe.parse({"stages": [{"algorithm": "rtn", "weights": {"bits": 3}}]})
    samples = [torch.randint(0, 64, (1, 12)) for _ in range(2)]

    reference = tiny_llama()
    quantize(reference, recipe)
    expect = final_norm_input(reference, samples)

    model = tiny_llama()
    seen = {}

    def quantize_then_record(name, block, inputs):
        quantize(block, recipe)
        if name == "model.layers.2":
            seen["out"] = [run_block(block, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]

    run_blockwise(model, samples, quantize_then_record)
    for got, want in zip(seen["out"], expect):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bert_and_sequential_blocks():
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64), add_pooling_layer=False).eval()
    assert [n for n, _ in find_blocks(bert)] == ["encoder.layer.0", "encoder.layer.1"]
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        expect = bert(ids).last_hidden_state
    seen = {}

    def record(name, block, inputs):
        if name.endswith(".1"):
            seen["out"] = run_block(block, inputs.hidden[0], inputs.kwargs[0])

    run_blockwise(bert, [{"input_ids": ids}], record)
    torch.testing.assert_close(seen["out"], expect, rtol=0, atol=1e-5)

    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    names = []
    collected = []

    def observe(name, block, inputs):
        names.append(name)
        if isinstance(block, nn.Linear):
            with observe_inputs({name: block}, lambda n, x: collected.append((n, x.shape))):
                for h in inputs.hidden:
                    block(h)

    run_blockwise(seq, [torch.randn(5, 4)], observe)
    assert names == ["0", "1", "2"] and collected == [("0", (5, 4)), ("2", (5, 8))]


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot find the blocks"):
        find_blocks(nn.Linear(2, 2))
