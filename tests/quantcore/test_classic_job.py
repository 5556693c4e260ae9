"""Classic PTQ / QAT jobs end to end on a user's own classifier and arrays: the report's
numbers are checked against a separate evaluation of the artifact's weights, and bad input
(pickles, unknown architectures, unusable arrays) is refused with a message that says why."""

import json
import pickle

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_model

from quantcore.classic_job import ClassicJobRequest, run_classic_job
from quantcore.models.classifiers import DataError, load_arrays, load_classifier
from quantcore.models.digits_cnn import digits_split, train_digits_cnn
from quantcore.models.refs import UnsafeModelError, UnsupportedModelError


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: thread hand-offs cost more than they save


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A user's upload: a briefly trained CNN as safetensors + config.json, and digits as .npz."""
    folder = tmp_path_factory.mktemp("upload")
    split = digits_split(0)
    model = train_digits_cnn(split, seed=0, epochs=4)
    (folder / "model").mkdir()
    save_model(model, str(folder / "model" / "model.safetensors"))
    (folder / "model" / "config.json").write_text(json.dumps({"architecture": "digits-cnn", "width": 16}))
    np.savez(folder / "train.npz", x=split.train_x[:600].numpy(), y=split.train_y[:600].numpy())
    np.savez(folder / "test.npz", x=split.test_x.numpy(), y=split.test_y.numpy())
    np.savez(folder / "unlabelled.npz", x=split.train_x[:400].numpy())
    with open(folder / "train.jsonl", "w") as f:
        for x, y in zip(split.train_x[:50], split.train_y[:50]):
            f.write(json.dumps({"x": x.tolist(), "y": int(y)}) + "\n")
    return folder


def _top1(logits, labels):
    return float((logits.argmax(1) == labels).float().mean()) * 100


def test_ptq_job_reports_what_its_artifact_computes(user_files, tmp_path):
    request = ClassicJobRequest(kind="ptq", model=str(user_files / "model"),
                                data={"train": str(user_files / "train.npz"), "evaluation": str(user_files / "test.npz")},
                                ptq={"method": "rtn", "weight_bits": 4, "activation_bits": None})
    events = []
    report = run_classic_job(request, tmp_path, progress=lambda *e: events.append(e))
    assert [e[0] for e in events][0] == "load" and events[-1][0] == "export"

    # Re-evaluate independently: a plain float DigitsCNN, BN folded by hand, carrying the
    # artifact's weights, must give the accuracy the report claims.
    float_model = load_classifier(str(user_files / "model"))
    tensors = load_file(str(tmp_path / "artifact" / "model.safetensors"))
    test = load_arrays(str(user_files / "test.npz"))
    with torch.no_grad():
        for name in ("stem", "body1", "body2", "branch3", "branch1", "mix"):
            block = float_model.get_submodule(name)
            block[0].weight.copy_(tensors[f"{name}.0.weight"])
            block[0].bias = torch.nn.Parameter(tensors[f"{name}.0.bias"])
            block[1] = torch.nn.Identity()
        float_model.head.weight.copy_(tensors["head.weight"])
        float_model.head.bias.copy_(tensors["head.bias"])
        accuracy = _top1(float_model(test.x), test.y)
    assert abs(accuracy - report["metrics"]["quantized"]["top1"]) < 1e-3  # the report keeps 4 decimals
    # 4-bit layers hold at most 16 distinct values, the 8-bit first and last at most 256
    for layer in report["layers"]:
        limit = 16 if layer["name"] not in ("stem.0", "head") else 256
        assert int(tensors[f"{layer['name']}.weight"].unique().numel()) <= limit
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert {"model.safetensors", "report.json", "quantization.json"} <= set(manifest["files"])


def test_qat_job_without_labels_distills_and_records_every_epoch(user_files, tmp_path):
    request = ClassicJobRequest(kind="qat", model=str(user_files / "model"), data={"train": str(user_files / "unlabelled.npz")},
                                qat={"method": "lsq", "weight_bits": 4, "activation_bits": 4, "epochs": 2})
    epochs = []
    report = run_classic_job(request, tmp_path, progress=lambda s, c, t, m="": epochs.append(c) if s == "quantize" else None)
    assert report["training"]["options"]["loss"] == "distill_mse"
    assert [r["epoch"] for r in report["training"]["epochs"]] == [1, 2] and epochs == [1, 2]
    assert set(report["metrics"]["quantized"]) == {"agreement_with_float"}
    assert report["metrics"]["baseline"]["agreement_with_float"] == 100.0


def test_jsonl_arrays_read_as_the_same_samples_as_npz(user_files):
    npz, jsonl = load_arrays(str(user_files / "train.npz")), load_arrays(str(user_files / "train.jsonl"))
    assert torch.equal(jsonl.x, npz.x[:50]) and torch.equal(jsonl.y, npz.y[:50])


def test_ptq_job_with_kure_fine_tuning_first_moves_weights_toward_uniform(user_files, tmp_path):
    from quantcore.algorithms.range_regularizers import kurtosis

    request = ClassicJobRequest(kind="ptq", model=str(user_files / "model"), data={"train": str(user_files / "train.npz")},
                                ptq={"method": "rtn", "weight_bits": 8, "activation_bits": None,
                                     "regularize": {"kind": "kure", "strength": 1.0, "epochs": 3}})
    report = run_classic_job(request, tmp_path)
    assert [r["epoch"] for r in report["training"]["epochs"]] == [1, 2, 3]
    # KURE pulls each layer's kurtosis toward a uniform's 1.8: the mean gap shrinks
    from quantcore.algorithms.dfq import fold_batchnorm

    before = load_classifier(str(user_files / "model"))
    fold_batchnorm(before)  # the artifact's weights are BN-folded: compare like with like
    after = load_file(str(tmp_path / "artifact" / "model.safetensors"))
    names = ["body1.0", "body2.0", "branch3.0", "branch1.0", "mix.0"]
    gap_before = sum(abs(float(kurtosis(before.get_submodule(n).weight.detach())) - 1.8) for n in names)
    gap_after = sum(abs(float(kurtosis(after[f"{n}.weight"])) - 1.8) for n in names)
    assert gap_after < 0.7 * gap_before


def test_finetune_job_writes_a_loadable_float_model_and_a_fair_preview(user_files, tmp_path):
    data = {"train": str(user_files / "train.npz"), "evaluation": str(user_files / "test.npz")}
    request = ClassicJobRequest(kind="finetune", model=str(user_files / "model"), data=data,
                                finetune={"kind": "soft_min_max", "strength": 0.01, "epochs": 2, "preview_bits": 3})
    report = run_classic_job(request, tmp_path / "finetune")
    assert [r["epoch"] for r in report["training"]["epochs"]] == [1, 2]
    # the artifact folder is a model folder qforge loads again, and it scores what the report says
    reloaded = load_classifier(str(tmp_path / "finetune" / "artifact"))
    test = load_arrays(str(user_files / "test.npz"))
    with torch.no_grad():
        assert abs(_top1(reloaded(test.x), test.y) - report["metrics"]["finetuned"]["top1"]) < 1e-3
    # the "before" preview is what a separate RTN ptq job gets on the original model
    rtn = run_classic_job(ClassicJobRequest(kind="ptq", model=str(user_files / "model"), data=data,
                                            ptq={"method": "rtn", "weight_bits": 3, "activation_bits": None}),
                          tmp_path / "rtn")
    assert report["metrics"]["rtn_preview"]["before"]["top1"] == rtn["metrics"]["quantized"]["top1"]
    with pytest.raises(ValidationError, match="a 'finetune' job takes a 'finetune' spec"):
        ClassicJobRequest(kind="finetune", ptq={"method": "rtn"})


def test_requests_and_inputs_that_cannot_work_are_refused(user_files, tmp_path):
    with pytest.raises(ValidationError, match="a 'ptq' job takes a 'ptq' spec"):
        ClassicJobRequest(kind="ptq", qat={"method": "lsq"})
    with pytest.raises(ValidationError, match="method"):
        ClassicJobRequest(kind="ptq", ptq={"method": "magic"})

    pickled = tmp_path / "model.pt"
    pickled.write_bytes(pickle.dumps({"weight": [1, 2]}))
    with pytest.raises(UnsafeModelError, match="pickle"):
        load_classifier(str(pickled))
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((user_files / "model" / "model.safetensors").read_bytes())
    (other / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    with pytest.raises(UnsupportedModelError, match="resnet50"):
        load_classifier(str(other))
    (other / "config.json").write_text(json.dumps({"architecture": "digits-cnn", "width": 8}))
    with pytest.raises(UnsupportedModelError, match="does not fit"):
        load_classifier(str(other))
    with pytest.raises(ValueError, match="local paths|bundled"):
        load_classifier(str(user_files / "model"), allow_local_paths=False)

    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="plain arrays"):
        load_arrays(str(tmp_path / "objects.npz"))
    np.savez(tmp_path / "nan.npz", x=np.full((4, 1, 8, 8), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match="NaN"):
        load_arrays(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "labels.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 2, 42]))
    request = ClassicJobRequest(kind="ptq", model=str(user_files / "model"), data={"train": str(tmp_path / "labels.npz")},
                                ptq={"method": "rtn"})
    with pytest.raises(DataError, match="label 42 is out of range"):
        run_classic_job(request, tmp_path / "job")
