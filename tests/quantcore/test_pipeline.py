"""Block-by-block calibration against running the whole model: with nothing quantized the
last block's outputs equal the model's own, and with every block quantized up front they
equal the quantized model's (so each block saw the quantized blocks before it)."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from quantcore import quantize
from quantcore.pipeline import find_blocks, observe_inputs, run_block, run_blockwise
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

    def record_last(block):
        if block.name == "model.layers.2":
            seen["out"] = [run_block(block.module, h, kw) for h, kw in zip(block.inputs.hidden, block.inputs.kwargs)]

    events = []
    run_blockwise(model, samples, record_last, lambda c, t, m="": events.append((c, t)), compute_dtype=torch.float32)
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

    def quantize_then_record(block):
        quantize(block.module, recipe)
        if block.name == "model.layers.2":
            seen["out"] = [run_block(block.module, h, kw) for h, kw in zip(block.inputs.hidden, block.inputs.kwargs)]

    run_blockwise(model, samples, quantize_then_record, compute_dtype=torch.float32)
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

    def record(block):
        if block.name.endswith(".1"):
            seen["out"] = run_block(block.module, block.inputs.hidden[0], block.inputs.kwargs[0])

    run_blockwise(bert, [{"input_ids": ids}], record, compute_dtype=torch.float32)
    torch.testing.assert_close(seen["out"], expect, rtol=0, atol=1e-5)

    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    names = []
    collected = []

    def observe(block):
        names.append(block.name)
        if isinstance(block.module, nn.Linear):
            with observe_inputs({block.name: block.module}, lambda n, x: collected.append((n, x.shape))):
                for h in block.inputs.hidden:
                    block.module(h)

    run_blockwise(seq, [torch.randn(5, 4)], observe, compute_dtype=torch.float32)
    assert names == ["0", "1", "2"] and collected == [("0", (5, 4)), ("2", (5, 8))]


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot find the blocks"):
        find_blocks(nn.Linear(2, 2))


def test_quantized_blocks_advance_like_the_quantized_model_and_bf16_stays_close():
    """The pipeline's own forward (compute copies with dequantized weights) against the
    quantized model run whole; in bf16 within bf16's precision."""
    recipe = Recipe.parse({"stages": [{"algorithm": "rtn", "weights": {"bits": 4}}]})
    samples = [torch.randint(0, 64, (1, 12)) for _ in range(2)]
    reference = tiny_llama()
    quantize(reference, recipe)
    expect = final_norm_input(reference, samples)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        model = tiny_llama()
        seen = {}

        def quantize_block(block):
            quantize(block.module, recipe)
            if block.name == "model.layers.2":
                block.advance()  # the last block: the pipeline advancing it again feeds nothing
                seen["out"] = list(block.inputs.hidden)

        run_blockwise(model, samples, quantize_block, compute_dtype=dtype)
        for got, want in zip(seen["out"], expect, strict=True):
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_layers_fed_the_same_tensor_share_one_hessian_equal_to_the_direct_sum():
    from quantcore.algorithms.gptq_stage import accumulate_hessians

    model = tiny_llama()
    samples = [torch.randint(0, 64, (1, 10)) for _ in range(3)]
    # Reference: the input_layernorm output of block 0 over all samples, read off the full model.
    normed = []
    handle = model.model.layers[0].input_layernorm.register_forward_hook(lambda m, a, out: normed.append(out.detach()))
    with torch.no_grad():
        for s in samples:
            model(s)
    handle.remove()
    X = torch.cat([x.reshape(-1, 32) for x in normed]).double()
    expect = (2 * X.T @ X / X.shape[0]).float()

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.0.")}
    seen = {}

    def quantize_block(block):
        if block.name == "model.layers.0":
            seen.update(accumulate_hessians(block, block.layers(linears)))

    run_blockwise(model, samples, quantize_block, compute_dtype=torch.float32)
    attn = "model.layers.0.self_attn."
    mlp = "model.layers.0.mlp."
    assert seen[attn + "q_proj"] is seen[attn + "k_proj"] is seen[attn + "v_proj"]
    assert seen[mlp + "gate_proj"] is seen[mlp + "up_proj"]
    distinct = {id(s) for s in seen.values()}
    assert len(distinct) == 4  # qkv, o, gate/up, down
    torch.testing.assert_close(seen[attn + "q_proj"].H, expect, rtol=1e-4, atol=1e-5)


def test_a_cpu_without_native_bf16_calibrates_in_float32_without_timing_anything(monkeypatch):
    from quantcore import pipeline

    pipeline._bf16_is_faster.cache_clear()
    monkeypatch.setattr(pipeline, "_cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(pipeline.torch, "randn", lambda *a, **k: (_ for _ in ()).throw(AssertionError("timed")))
    try:
        assert pipeline.choose_compute_dtype("auto") == torch.float32
    finally:
        pipeline._bf16_is_faster.cache_clear()
    assert pipeline.choose_compute_dtype("bfloat16") == torch.bfloat16


def test_weights_rewritten_by_a_stage_are_spilled_block_by_block_unchanged(tmp_path):
    """A transforming stage (here: every weight doubled in place, as folding scales does)
    with spill_dir: each block's rewritten weights end up mapped from a spill file, with the
    values the stage wrote, and the model computes what it would without spilling."""
    from quantcore.memory import _file_mapping

    samples = [torch.randint(0, 64, (1, 10)) for _ in range(2)]
    big = 1 << 18  # weights of at least this many elements count as rewritten

    def model_with_big_mlps():
        model = tiny_llama()
        for layer in model.model.layers:  # large enough to be spilled (>= 1 MiB each)
            layer.mlp.gate_proj = nn.Linear(32, big // 32 * 2, bias=False)
            layer.mlp.up_proj = nn.Linear(32, big // 32 * 2, bias=False)
            layer.mlp.down_proj = nn.Linear(big // 32 * 2, 32, bias=False)
        torch.manual_seed(1)
        for p in model.parameters():
            nn.init.normal_(p, std=0.02)
        return model.eval()

    def double(block):
        with torch.no_grad():
            for p in block.module.parameters():
                p.mul_(2.0)

    plain, spilled = model_with_big_mlps(), model_with_big_mlps()
    run_blockwise(plain, samples, double, compute_dtype=torch.float32)
    run_blockwise(spilled, samples, double, compute_dtype=torch.float32, spill_dir=tmp_path / "spill")
    for (name, a), b in zip(plain.named_parameters(), spilled.parameters()):
        assert torch.equal(a, b), name
    gate = spilled.model.layers[1].mlp.gate_proj.weight
    assert _file_mapping(gate.data_ptr()) is not None  # mapped from the spill file
    assert list((tmp_path / "spill").iterdir()) == []  # each file unlinked once mapped


def test_observed_pass_sees_every_input_a_full_forward_sees():
    """Samples after the first stop once their last observed call is made: the observations
    are still every input of every observed layer, equal to a full forward's."""
    from quantcore.pipeline import capture_block_inputs, forward_observed

    model = tiny_llama()
    samples = [torch.randint(0, 64, (1, 10)) for _ in range(3)]
    block = model.model.layers[1]
    inputs = capture_block_inputs(model, model.model.layers[0], samples)
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
    expected = {name: [] for name in names}
    with torch.no_grad(), observe_inputs({n: block.get_submodule(n) for n in names}, lambda n, x: expected[n].append(x.clone())):
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            run_block(block, h, kw)
    got = {name: [] for name in names}
    forward_observed(block, zip(inputs.hidden, inputs.kwargs), {n: (lambda x, n=n: got[n].append(x.clone())) for n in names},
                     torch.float32)
    for name in names:
        assert len(got[name]) == 3
        for a, b in zip(got[name], expected[name]):
            assert torch.equal(a, b), name
