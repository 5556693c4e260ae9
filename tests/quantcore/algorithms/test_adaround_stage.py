"""AdaRound as a recipe stage on a whole (small) llama: every layer's learned rounding is no
worse than nearest on its own reconstruction loss, the model beats round-to-nearest on
held-out inputs, and what the stage cannot do is refused with a clear message."""

import pytest
import torch

from quantcore import quantize
from quantcore.modules import QuantizedLinear

WEIGHTS = {"bits": 3, "granularity": "channel"}
OPTIONS = {"iterations": 150, "max_rows": 256}


def test_adaround_stage_beats_nearest_rounding(structured_llama, logits_error):
    reference = structured_llama()
    calibration = [torch.randint(0, 128, (1, 32)) for _ in range(16)]
    held_out = [torch.randint(0, 128, (1, 32)) for _ in range(8)]
    model = structured_llama()
    layers = quantize(model, {"stages": [{"algorithm": "adaround", "weights": WEIGHTS, "options": OPTIONS}]},
                      calibration=calibration)
    assert len(layers) == 14
    for layer in layers:
        assert isinstance(model.get_submodule(layer["name"]), QuantizedLinear)
        assert layer["adaround_loss"] <= layer["adaround_loss_nearest"]
    assert sum(layer["adaround_flipped"] > 0 for layer in layers) >= 10  # it did learn something

    rtn = structured_llama()
    quantize(rtn, {"stages": [{"algorithm": "rtn", "weights": WEIGHTS}]})
    assert logits_error(model, reference, held_out) < 0.9 * logits_error(rtn, reference, held_out)


def test_adaround_stage_with_static_activations_stores_input_scales(structured_llama):
    model = structured_llama()
    stage = {"algorithm": "adaround", "weights": {"bits": 8, "granularity": "channel"},
             "activations": {"bits": 8, "granularity": "tensor", "symmetric": False}, "options": {"iterations": 20}}
    quantize(model, {"stages": [stage]}, calibration=[torch.randint(0, 128, (1, 16)) for _ in range(4)])
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj, QuantizedLinear) and q_proj.input_scale is not None and float(q_proj.input_scale) > 0


def test_adaround_stage_refuses_what_it_cannot_do(structured_llama):
    model = structured_llama()
    stage = {"algorithm": "adaround", "weights": WEIGHTS, "options": OPTIONS}
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(model, {"stages": [stage]})
    with pytest.raises(ValueError, match="weights.granularity"):
        quantize(model, {"stages": [{**stage, "weights": {"bits": 4, "granularity": "group", "group_size": 32}}]})
    with pytest.raises(ValueError, match="options.iterations"):
        quantize(model, {"stages": [{**stage, "options": {"iterations": 0}}]})
