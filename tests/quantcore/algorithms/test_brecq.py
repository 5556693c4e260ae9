"""BRECQ against independent references: the blocks recompose the model exactly and keep the
residual and the concat whole; the Fisher diagonals equal (∂L/∂z)² taken with forward hooks
and autograd.grad on the original model; the block reconstruction never ends above the
Fisher-weighted loss of round-to-nearest computed by hand; and after brecq_model every
weight is an integer multiple of a per-tensor min-max step computed here."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantcore.algorithms.adaround import AdaRoundOptions
from quantcore.algorithms.brecq import brecq_model, find_blocks, fisher_diagonals, reconstruct_block
from quantcore.algorithms.dfq import fold_batchnorm
from quantcore.schemes import QuantScheme

ORDER = ["stem.0", "body1.0", "body2.0", "branch3.0", "branch1.0", "mix.0", "head"]
BLOCKS = [["stem.0"], ["body1.0", "body2.0"], ["branch3.0", "branch1.0"], ["mix.0"], ["head"]]
# the tensor each block hands on, as seen from the original model: the input of the next
# block's first layer (for the last block, the logits)
BLOCK_OUTPUTS = ["body1.0", "branch3.0", "mix.0", "head", None]
FAST = AdaRoundOptions(iterations=200, learning_rate=3e-2)


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: thread hand-offs cost more than they save


@pytest.fixture
def folded_cnn(seeded_cnn):
    def build(seed=0):
        model = seeded_cnn(seed)
        fold_batchnorm(model)
        return model

    return build


def images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    blur = nn.AvgPool2d(3, stride=1, padding=1)  # neighbouring pixels correlated, like digits
    return blur(torch.rand(n, 1, 8, 8, generator=g))


def labels(n=64, seed=0):
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed + 100))


def per_tensor_step(W, bits):
    """Symmetric per-tensor min-max step, by hand: max|W| / (2^(b−1) − 1)."""
    return float(W.abs().max()) / (2 ** (bits - 1) - 1)


# --- blocks ---------------------------------------------------------------------------------


def test_blocks_recompose_the_model_and_keep_residual_and_concat_whole(folded_cnn):
    model = folded_cnn()
    x = images()
    blocks = find_blocks(model)
    assert [b.layers for b in blocks] == BLOCKS
    with torch.no_grad():
        h = x
        for block in blocks:
            h = block.module(h)
        assert torch.equal(h, model(x))
    # the blocks share the model's layers (reconstruction writes into the model)
    assert blocks[1].module.get_submodule("body1.0") is model.get_submodule("body1.0")


def test_a_plain_chain_is_cut_after_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    blocks = find_blocks(model)
    assert [b.layers for b in blocks] == [["0"], ["2"], ["4"]]
    x = torch.randn(7, 5)
    h = x
    for block in blocks:
        h = block.module(h)
    assert torch.equal(h, model(x))


def test_two_inputs_are_refused():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    with pytest.raises(ValueError):
        find_blocks(TwoInputs())


# --- Fisher diagonals -----------------------------------------------------------------------


def hooked_gradients(model, x, target):
    """∂L/∂z at each block boundary of the original model, by forward pre-hooks and
    autograd.grad; L the mean cross-entropy (the normalisation makes the reduction moot)."""
    captured = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: captured.setdefault(name, args[0])) for name in BLOCK_OUTPUTS[:-1]]
    logits = model(x)
    for h in handles:
        h.remove()
    zs = [captured[name] for name in BLOCK_OUTPUTS[:-1]] + [logits]
    loss = F.cross_entropy(logits, target if target is not None else logits.argmax(1).detach())
    return torch.autograd.grad(loss, zs)


@pytest.mark.parametrize("with_labels", [True, False])
def test_fisher_diagonals_equal_squared_output_gradients(with_labels, folded_cnn):
    model = folded_cnn(1)
    x, y = images(32, 1), labels(32, 1)
    reference_model = copy.deepcopy(model)
    diagonals = fisher_diagonals(find_blocks(model), x, y if with_labels else None)
    grads = hooked_gradients(reference_model, x, y if with_labels else None)
    assert len(diagonals) == len(grads) == 5
    for d, g in zip(diagonals, grads):
        g2 = g.detach().pow(2)
        expected = g2 / g2.mean()
        assert d.shape == g.shape
        assert float(d.mean()) == pytest.approx(1.0, rel=1e-5)
        assert torch.allclose(d, expected, rtol=1e-4, atol=1e-6)
    # no gradient left behind on the model's parameters
    assert all(p.grad is None for p in model.parameters())


# --- block reconstruction -------------------------------------------------------------------


def nearest_loss_by_hand(block, x_float, x_quant, fisher, bits):
    """Σ F·(ẑ − z)² / (samples · pixels), ẑ the block with every weight rounded to nearest on a
    per-tensor symmetric min-max grid, z the float block on the float input."""
    with torch.no_grad():
        target = block.module(x_float)
        rounded = copy.deepcopy(block.module)
        for name in block.layers:
            W = rounded.get_submodule(name).weight
            step = per_tensor_step(W, bits)
            W.copy_(torch.clamp(torch.round(W / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step)
        out = rounded(x_quant)
    positions = target[0].numel() // target.shape[1]
    return float((fisher * (out - target).pow(2)).sum() / (len(x_float) * positions))


def fisher_loss(block, target, x_quant, fisher):
    with torch.no_grad():
        out = block.module(x_quant)
    positions = target[0].numel() // target.shape[1]
    return float((fisher * (out - target).pow(2)).sum() / (len(x_quant) * positions))


@pytest.mark.parametrize("block_index,bits", [(1, 3), (2, 3), (3, 2)])
def test_reconstruct_block_never_ends_above_round_to_nearest(block_index, bits, folded_cnn):
    model = folded_cnn(2)
    x, y = images(48, 2), labels(48, 2)
    blocks = find_blocks(model)
    fisher = fisher_diagonals(blocks, x, y)[block_index]
    with torch.no_grad():
        h = x
        for block in blocks[:block_index]:
            h = block.module(h)
    x_float = h
    x_quant = h + 0.02 * torch.randn(h.shape, generator=torch.Generator().manual_seed(5))  # an upstream error
    block = blocks[block_index]
    originals = {n: block.module.get_submodule(n).weight.detach().clone() for n in block.layers}
    schemes = {n: QuantScheme(bits=bits, granularity="tensor") for n in block.layers}
    by_hand = nearest_loss_by_hand(block, x_float, x_quant, fisher, bits)
    with torch.no_grad():
        float_target = block.module(x_float)

    result = reconstruct_block(block, x_float, x_quant, fisher, schemes, FAST, seed=0)
    assert result.layers == BLOCKS[block_index]
    assert result.loss_nearest == pytest.approx(by_hand, rel=1e-4)
    assert result.loss_learned <= by_hand * (1 + 1e-5)
    # the weights left in the block are the ones scored, on their grids, rounded up or down
    assert fisher_loss(block, float_target, x_quant, fisher) == pytest.approx(result.loss_learned, rel=1e-4)
    for name, W in originals.items():
        step = per_tensor_step(W, bits)
        codes = block.module.get_submodule(name).weight.detach() / step
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        floor, ceil = torch.floor(W / step).clamp(lo, hi), torch.ceil(W / step).clamp(lo, hi)
        assert bool(((codes.round() == floor) | (codes.round() == ceil)).all())


def test_brecq_model_puts_every_weight_on_its_grid_and_beats_nearest(folded_cnn):
    model = folded_cnn(4)
    x, y = images(64, 4), labels(64, 4)
    bits = 3
    float_model = copy.deepcopy(model)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in ORDER}
    schemes = {n: QuantScheme(bits=bits, granularity="tensor") for n in ORDER}
    reported = []
    results = brecq_model(model, schemes, x, y, FAST, seed=0, progress=lambda d, t, m: reported.append((d, t)))
    assert [r.layers for r in results] == BLOCKS
    assert reported == [(i, len(BLOCKS)) for i in range(1, len(BLOCKS) + 1)]
    assert all(r.loss_learned <= r.loss_nearest for r in results)
    assert results[1].loss_learned < 0.8 * results[1].loss_nearest  # the residual block gains
    for name, W in originals.items():
        step = per_tensor_step(W, bits)
        codes = model.get_submodule(name).weight.detach() / step
        assert torch.allclose(codes, codes.round(), atol=1e-4), name
        assert codes.round().min() >= -4 and codes.round().max() <= 3, name
    # the whole model against the same model rounded to nearest, on the calibration data
    nearest = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, W in originals.items():
            step = per_tensor_step(W, bits)
            nearest.get_submodule(name).weight.copy_(torch.clamp(torch.round(W / step), -4, 3) * step)
        reference = float_model(x)
        error = float((model(x) - reference).pow(2).mean())
        nearest_error = float((nearest(x) - reference).pow(2).mean())
    assert error < nearest_error


def test_missing_scheme_is_refused(folded_cnn):
    model = folded_cnn()
    schemes = {n: QuantScheme(bits=4, granularity="tensor") for n in ORDER if n != "mix.0"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="mix.0"):
        brecq_model(model, schemes, images(8), None, FAST)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
