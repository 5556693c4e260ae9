"""The LLM PTQ algorithms on SmolLM2's real weights and activations: smoothing is an exact
rewrite of the real model, and on a real layer with real calibration inputs OBQ's exact
machinery in GPTQ's order matches GPTQ, and both beat RTN in layer-output error."""

import copy

import pytest
import torch

from quantcore import quantize
from quantcore.algorithms.gptq import GPTQ
from quantcore.algorithms.obq import OBQ
from quantcore.eval.data import calibration_samples
from quantcore.observers import make_observer
from quantcore.qparams import fake_quant, qparams_from_range
from quantcore.schemes import QuantScheme

pytestmark = pytest.mark.slow


def test_smoothing_alone_leaves_smollm2_unchanged(smollm2):
    model = copy.deepcopy(smollm2.second.model)
    model.model.layers = model.model.layers[:4]  # four real blocks keep the test quick
    samples = calibration_samples(smollm2.second.tokenizer, 2, 64)
    with torch.no_grad():
        before = torch.cat([model(s).logits for s in samples])
    quantize(model, {"stages": [{"algorithm": "smoothquant", "options": {"alpha": 0.5}}]}, calibration=samples,
             compute_dtype="float32")
    quantize(model, {"stages": [{"algorithm": "awq", "weights": {"bits": 4, "granularity": "group", "group_size": 64},
                                 "options": {"quantize": False, "clip": False}}]}, calibration=samples,
             compute_dtype="float32")
    with torch.no_grad():
        after = torch.cat([model(s).logits for s in samples])
    assert float((after - before).norm() / before.norm()) < 1e-5


@pytest.mark.parametrize("bits", [3, 4])
def test_obq_gptq_rtn_on_a_real_layer(smollm2, bits):
    model = smollm2.second.model
    block = model.model.layers[2]
    inputs = []
    handle = block.self_attn.k_proj.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, 576)))
    with torch.no_grad():
        for sample in calibration_samples(smollm2.second.tokenizer, 4, 256):
            model(sample)
    handle.remove()
    X = torch.cat(inputs)
    W = block.self_attn.k_proj.weight.detach()[:32].float()  # 32 real rows: OBQ keeps one 576x576 H⁻¹ each
    scheme = QuantScheme(bits=bits, granularity="group", group_size=64)

    def error(Q):
        return float((X @ (W - Q).T).pow(2).sum())

    def solve(cls, **options):
        s = cls(576)
        s.add_batch(X)
        return s.quantize(W, scheme, **options).Q

    observer = make_observer(scheme)
    observer.update(W)
    rtn = fake_quant(W, qparams_from_range(*observer.range(), scheme, torch.float16))
    errors = {"gptq": error(solve(GPTQ, static_groups=True)), "obq": error(solve(OBQ)),
              "obq_in_gptq_order": error(solve(OBQ, greedy=False)), "rtn": error(rtn)}
    # OBQ's exact per-row updates in GPTQ's order reproduce GPTQ's error (H⁻¹ via Cholesky vs
    # elimination: close, not equal); both orders beat round-to-nearest. The greedy order is
    # not better than GPTQ's here (about twice its error at 3 bits): see obq.py.
    assert abs(errors["obq_in_gptq_order"] - errors["gptq"]) < 0.1 * errors["gptq"], errors
    assert errors["gptq"] < 0.5 * errors["rtn"], errors
    assert errors["obq"] < 0.7 * errors["rtn"], errors
