"""QAT preparation and training loop against independent references: the wrapped layers and
their bit widths listed by hand, the BN-folded float model against the unfolded one, seeded
reproducibility, early stopping driven by a scripted validation loss, the options' bounds,
and for every method a W2A2 training step whose quantized weights and inputs have at most
2^bits distinct values (the invariant every quantizer must keep)."""

import copy

import pytest
import torch
from torch import nn

from quantcore.algorithms import qat
from quantcore.algorithms.qat import QATOptions, prepare_qat, train_qat
from quantcore.algorithms.quantsim import QuantSimLayer, StaticQuantizer
from quantcore.models.digits_cnn import digits_split

ORDER = ["stem.0", "body1.0", "body2.0", "branch3.0", "branch1.0", "mix.0", "head"]
ENDS = ("stem.0", "head")


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: thread hand-offs cost more than they save


@pytest.fixture(scope="module")
def digits():
    split = digits_split()
    return split.train_x[:300], split.train_y[:300]


# --- prepare_qat ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lsq", "pact", "ste"])
def test_prepare_wraps_every_layer_with_8_bit_ends_and_folds_bn(method, digits, seeded_cnn):
    x = digits[0][:64]
    model = seeded_cnn()
    with torch.no_grad():
        reference = model(x)
    prepare_qat(model, QATOptions(method=method, weight_bits=3, activation_bits=4))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, QuantSimLayer)}
    assert sorted(wrapped) == sorted(ORDER)
    # every conv/linear sits inside a QuantSimLayer
    bare = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(bare) == sorted(f"{n}.layer" for n in ORDER)
    for name, layer in wrapped.items():
        wq, iq = layer.weight_quantizer, layer.input_quantizer
        if name in ENDS:
            assert (wq.bits, iq.bits) == (8, 8), name
            assert isinstance(wq, StaticQuantizer) and isinstance(iq, StaticQuantizer), name
        else:
            assert (wq.bits, iq.bits) == (3, 4), name
        assert iq.activation is True and wq.activation is False
    # the folded float model (quantizers off) computes the unfolded model
    for layer in wrapped.values():
        layer.weight_quantizer = layer.input_quantizer = None
    with torch.no_grad():
        assert torch.allclose(model(x), reference, atol=1e-5)


def test_prepare_without_first_last_bits_and_with_float_activations(seeded_cnn):
    model = prepare_qat(seeded_cnn(), QATOptions(weight_bits=4, activation_bits=None, first_last_bits=None))
    for name in ORDER:
        layer = model.get_submodule(name)
        assert layer.input_quantizer is None
        assert layer.weight_quantizer.bits == 4, name


def test_adaround_start_needs_calibration(seeded_cnn):
    with pytest.raises(ValueError):
        prepare_qat(seeded_cnn(), QATOptions(init="adaround"))


def test_a_ptq_start_puts_the_ptq_weights_under_the_quantizers(digits, seeded_cnn):
    """init='dfq': the wrapped layers hold what DFQ itself gives on the same grids, and their
    4-bit weights are already on a 16-level grid before any training."""
    from quantcore.algorithms.dfq import data_free_quantize, weight_quantizer
    from quantcore.algorithms.quantsim import bits_per_layer
    from quantcore.schemes import QuantScheme

    calibration = digits[0][:64]
    reference = seeded_cnn()
    per_layer = {name: weight_quantizer(QuantScheme(bits=b, granularity="tensor"))
                 for name, b in bits_per_layer(reference, 4).items()}
    data_free_quantize(reference, None, data=[calibration], per_layer=per_layer)

    model = prepare_qat(seeded_cnn(), QATOptions(init="dfq", weight_bits=4), calibration)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantSimLayer):
            W = layer.layer.weight.detach()
            assert torch.allclose(W, reference.get_submodule(name).weight, atol=1e-6)
            if name not in ("stem.0", "head"):
                assert W.unique().numel() <= 16


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"weight_bits": 1}, {"weight_bits": 9}, {"activation_bits": 1}, {"method": "nope"}, {"epochs": 0},
    {"learning_rate": 0.0}, {"validation_fraction": 1.0}, {"patience": 0}, {"loss": "hinge"}, {"unknown": 1},
])
def test_options_reject_bad_values(bad):
    with pytest.raises(ValueError):
        QATOptions(**bad)


def test_method_table_covers_the_declared_methods():
    assert set(qat._method_table()) == set(QATOptions.model_fields["method"].annotation.__args__)


# --- train_qat ------------------------------------------------------------------------------


def _train(model, digits, seed, progress=None, **overrides):
    options = QATOptions(method="lsq", weight_bits=4, activation_bits=4, epochs=2, batch_size=64, seed=seed,
                         **overrides)
    prepare_qat(model, options)
    report = train_qat(model, *digits, options, progress=progress)
    return model, report


def test_training_is_reproducible_and_reports_each_epoch(digits, seeded_cnn):
    calls = []
    model_a, report_a = _train(seeded_cnn(), digits, seed=1, progress=lambda epoch, record: calls.append((epoch, dict(record))))
    model_b, report_b = _train(seeded_cnn(), digits, seed=1)
    assert report_a.epochs == report_b.epochs
    assert all(torch.equal(p, q) for p, q in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert calls == [(1, report_a.epochs[0]), (2, report_a.epochs[1])]
    for record in report_a.epochs:
        assert set(record) == {"epoch", "train_loss", "val_loss", "val_top1"}
        assert all(torch.isfinite(torch.tensor(v)) for v in record.values())
        assert 0.0 <= record["val_top1"] <= 100.0
    assert not model_a.training
    _, report_c = _train(seeded_cnn(), digits, seed=2)
    assert report_c.epochs != report_a.epochs  # the seed does matter


def test_the_validation_metrics_are_those_of_the_held_out_samples(digits, monkeypatch, seeded_cnn):
    """val_loss/val_top1 recomputed by hand on the held-out share (the first 10 % of a seeded
    permutation of the samples)."""
    x, y = digits
    states = []
    original = qat._evaluate

    def spy(model, options, xv, yv):
        states.append((xv.clone(), yv.clone()))
        return original(model, options, xv, yv)

    monkeypatch.setattr(qat, "_evaluate", spy)
    options = QATOptions(method="lsq", weight_bits=4, activation_bits=4, epochs=1, seed=3)
    model = prepare_qat(seeded_cnn(), options)
    report = train_qat(model, x, y, options)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    held = order[: int(len(x) * 0.1)]
    assert torch.equal(states[0][0], x[held]) and torch.equal(states[0][1], y[held])
    with torch.no_grad():
        logits = model(x[held])
    loss = float(nn.functional.cross_entropy(logits, y[held]))
    top1 = float((logits.argmax(1) == y[held]).float().mean()) * 100
    assert report.epochs[0]["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert report.epochs[0]["val_top1"] == pytest.approx(top1)


@pytest.mark.parametrize("patience,losses,ran,best", [
    (1, [1.0, 2.0, 3.0, 4.0, 5.0], 2, 1),
    (2, [1.0, 0.5, 0.7, 0.6, 0.4], 4, 2),
    (2, [1.0, 0.9, 0.8, 0.7, 0.6], 5, 5),
    (None, [1.0, 2.0, 3.0, 4.0, 5.0], 5, 1),
])
def test_early_stopping_follows_the_validation_loss(digits, monkeypatch, patience, losses, ran, best, seeded_cnn):
    x, y = digits
    snapshots = []

    def scripted(model, _options, _x, _y):
        snapshots.append(copy.deepcopy(model.state_dict()))
        return {"val_loss": losses[len(snapshots) - 1]}

    monkeypatch.setattr(qat, "_evaluate", scripted)
    options = QATOptions(method="lsq", weight_bits=4, activation_bits=4, epochs=5, batch_size=128,
                         patience=patience, seed=0)
    model = prepare_qat(seeded_cnn(width=8), options)
    report = train_qat(model, x[:150], y[:150], options)
    assert len(report.epochs) == ran == len(snapshots)
    assert [r["val_loss"] for r in report.epochs] == losses[:ran]
    assert report.stopped_early is (ran < 5)
    assert report.best_epoch == best
    # the model is left at its best epoch
    final = model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in snapshots[best - 1].items())
    if best < ran:
        assert not all(torch.equal(final[k], v) for k, v in snapshots[ran - 1].items())


def test_distillation_needs_a_teacher_and_then_ignores_the_labels(digits, seeded_cnn):
    x, y = digits[0][:96], digits[1][:96]
    options = QATOptions(method="ste", weight_bits=4, activation_bits=8, epochs=1, loss="distill_mse")
    teacher = seeded_cnn()
    model = prepare_qat(copy.deepcopy(teacher), options)
    with pytest.raises(ValueError):
        train_qat(model, x, y, options)
    report = train_qat(model, x, None, options, teacher=teacher)
    assert set(report.epochs[0]) == {"epoch", "train_loss", "val_loss"}
    assert report.epochs[0]["train_loss"] >= 0


@pytest.mark.parametrize("method", sorted(qat._method_table()))
def test_every_method_trains_at_w2a2_and_keeps_at_most_4_levels(method, digits, seeded_cnn):
    bits = 2
    x, y = digits[0][:48], digits[1][:48]
    options = QATOptions(method=method, weight_bits=bits, activation_bits=bits, epochs=1, batch_size=24,
                         validation_fraction=0.0, seed=0)
    model = prepare_qat(seeded_cnn(width=8), options)
    before = {n: model.get_submodule(n).layer.weight.detach().clone() for n in ORDER}
    report = train_qat(model, x, y, options)
    assert len(report.epochs) == 1
    assert torch.isfinite(torch.tensor(report.epochs[0]["train_loss"]))
    assert not model.training
    assert any(not torch.equal(model.get_submodule(n).layer.weight, before[n]) for n in ORDER)  # it trained

    inputs = {}
    handles = [model.get_submodule(n).input_quantizer.register_forward_hook(
        lambda _m, _a, out, n=n: inputs.setdefault(n, out.detach())) for n in ORDER]
    with torch.no_grad():
        out = model(x)
        weights = {n: model.get_submodule(n).quantized_weight().detach() for n in ORDER}
    for h in handles:
        h.remove()
    assert bool(torch.isfinite(out).all())
    for name in ORDER:
        limit = 2**8 if name in ENDS else 2**bits
        assert weights[name].unique().numel() <= limit, (method, name, "weight")
        assert inputs[name].unique().numel() <= limit, (method, name, "input")
    assert all(weights[n].unique().numel() >= 2 for n in ORDER if n not in ENDS)  # not collapsed
