"""Classic PTQ and QAT jobs: a small classifier (a CNN) and array data, the four levels of
effort of the roadmap seed as two job types.

    ptq  level 1-2: rtn, dfq (data-free; with data, empirical bias correction), adaround,
         brecq; then static activation quantization calibrated on the data
    qat  level 3-4: fine-tuning through fake-quantizers (`quantcore.algorithms.qat`), with
         per-epoch progress, early stopping and the loss curve in the report

    load model and data → float accuracy → quantize → quantized accuracy → export artifact

Labels are optional: without them, accuracy is agreement with the float model's predictions,
and QAT distills the float model's outputs. Everything the job writes goes under `output_dir`.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import shutil
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator
from safetensors.torch import save_file
from torch import nn

from quantcore.algorithms.qat import QATOptions, prepare_qat, train_qat
from quantcore.algorithms.quantsim import export_quantsim, per_tensor_schemes, static_quantsim, wrap_layers
from quantcore.export.artifact import write_json, write_manifest
from quantcore.job import JobRequest, environment
from quantcore.job_pipeline import seed_everything
from quantcore.models.classifiers import Arrays, check_fits, load_arrays, load_classifier


UPLOAD = re.compile(r"^upload:[0-9a-f]{32}$")


def _check_ref(value: str) -> str:
    value = value.strip()
    if value.startswith("upload:") and not UPLOAD.match(value):
        raise ValueError(f"'{value}': an upload is named 'upload:<id>', the id the upload returned")
    return value


class ClassicData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: str = Field("bundled:digits", max_length=4096, description="calibration / training arrays: 'bundled:digits' or an .npz")
    evaluation: str | None = Field(None, max_length=4096, description="held-out arrays; default: bundled data's test split, "
                                   "or `evaluation_fraction` of the training arrays")
    evaluation_fraction: float = Field(0.2, gt=0, lt=1)
    calibration_samples: int = Field(256, ge=1, le=100_000, description="PTQ calibration samples (from train)")

    @field_validator("train", "evaluation")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return None if v is None else _check_ref(v)


class RegularizeSpec(BaseModel):
    """Quantization-friendly float fine-tuning before PTQ (`range_regularizers.py`)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["kure", "linf", "margin", "soft_min_max"] = "kure"
    strength: float = Field(0.01, ge=0, le=1000)
    epochs: int = Field(5, ge=1, le=1000)
    learning_rate: float = Field(1e-3, gt=0, le=1)


class FinetuneSpec(RegularizeSpec):
    """A `finetune` job: quantization-friendly float training on its own; the artifact is the
    fine-tuned float model, and the report shows what it buys under round-to-nearest."""

    preview_bits: int = Field(3, ge=2, le=8, description="per-tensor RTN width of the before/after preview")


class PTQSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["rtn", "dfq", "adaround", "brecq"] = "adaround"
    weight_bits: int = Field(4, ge=2, le=8)
    activation_bits: int | None = Field(8, ge=2, le=8, description="None keeps activations float")
    first_last_bits: int | None = Field(8, ge=2, le=8)
    iterations: int = Field(2000, ge=1, le=100_000, description="AdaRound / BRECQ steps per layer or block")
    regularize: RegularizeSpec | None = Field(None, description="fine-tune the float model with R² / KURE first")


class ClassicJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["ptq", "qat", "finetune"]
    model: str = Field("bundled:digits-cnn", max_length=4096, description="'bundled:digits-cnn' or a folder with model.safetensors + config.json")
    data: ClassicData = Field(default_factory=ClassicData)
    ptq: PTQSpec | None = None
    qat: QATOptions | None = None
    finetune: FinetuneSpec | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("model")
    @classmethod
    def _ref(cls, v: str) -> str:
        return _check_ref(v)

    def spec(self) -> dict:
        """What the job does, as stored beside it (the counterpart of a recipe)."""
        return {"kind": self.kind, self.kind: getattr(self, self.kind).model_dump(mode="json")}

    @model_validator(mode="after")
    def _one_spec(self) -> "ClassicJobRequest":
        for other in ("ptq", "qat", "finetune"):
            if other != self.kind and getattr(self, other) is not None:
                raise ValueError(f"{other}: a '{self.kind}' job takes a '{self.kind}' spec, not '{other}'")
        if getattr(self, self.kind) is None:
            setattr(self, self.kind, {"ptq": PTQSpec, "qat": QATOptions, "finetune": FinetuneSpec}[self.kind]())
        return self


def _job_kind(value: Any) -> str | None:
    kind = value.get("kind", "recipe") if isinstance(value, dict) else getattr(value, "kind", "recipe")
    return {"recipe": "recipe", "ptq": "classic", "qat": "classic", "finetune": "classic"}.get(kind)


# What POST /v1/jobs takes: a recipe job (LLMs, encoders; no `kind`) or a classic ptq / qat job.
JobSpec = Annotated[
    Union[Annotated[JobRequest, Tag("recipe")], Annotated[ClassicJobRequest, Tag("classic")]],
    Discriminator(_job_kind, custom_error_type="invalid_kind",
                  custom_error_message="kind must be 'ptq', 'qat' or 'finetune' (classic jobs), or absent for a recipe job"),
]
JOB_SPEC: TypeAdapter = TypeAdapter(JobSpec)

Locate = Callable[[str, str], Path]  # ("model" | "data", "upload:<id>") -> where the upload's files are


def _open(ref: str, what: str, locate: Locate | None, allow_local_paths: bool) -> tuple[str, bool]:
    """An upload's files are the service's own: they are read even where client paths are not."""
    if ref.startswith("upload:"):
        if locate is None:
            raise ValueError(f"'{ref}': uploads are resolved by the qforge service; pass a path instead")
        return str(locate(what, ref)), True
    return ref, allow_local_paths


def _split(request: ClassicJobRequest, allow_local_paths: bool, locate: Locate | None = None) -> tuple[Arrays, Arrays]:
    data = request.data
    train = load_arrays(*_arrays_args(data.train, "train", request.seed, locate, allow_local_paths))
    if data.evaluation is not None:
        return train, load_arrays(*_arrays_args(data.evaluation, "test", request.seed, locate, allow_local_paths))
    if data.train.startswith("bundled:"):
        return train, load_arrays(data.train, "test", request.seed)
    order = torch.randperm(len(train.x), generator=torch.Generator().manual_seed(request.seed))
    held = max(1, int(len(order) * data.evaluation_fraction))
    if held >= len(order):
        raise ValueError(f"data.train: {len(order)} samples are too few to hold out an evaluation share")

    def part(index):
        return Arrays(train.x[index], None if train.y is None else train.y[index])

    return part(order[held:]), part(order[:held])


def _arrays_args(ref: str, part: str, seed: int, locate: Locate | None, allow_local_paths: bool) -> tuple:
    path, allowed = _open(ref, "data", locate, allow_local_paths)
    return path, part, seed, allowed


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])


def _accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((outputs.argmax(1) == labels).float().mean()) * 100, 4)


def _regularize(model: nn.Module, spec: RegularizeSpec, train: Arrays, seed: int, progress) -> list[dict]:
    """Fine-tune the float model on its task (or, without labels, on its own outputs) plus the
    range regularizer; returns the per-epoch records."""
    import torch.nn.functional as F

    from quantcore.algorithms.range_regularizers import regularized_finetune

    if train.y is not None:
        targets, loss = train.y, F.cross_entropy
    else:
        targets, loss = _predict(model, train.x), F.mse_loss

    def epoch_done(epoch: int, record: dict) -> None:
        progress("quantize", epoch, spec.epochs, f"{spec.kind} fine-tuning, epoch {epoch}: task loss {record['task_loss']:.4g}, "
                 f"{spec.kind} {record['regularizer']:.4g}")

    records = regularized_finetune(model, (train.x, targets), loss, spec.kind, spec.strength, spec.epochs,
                                   spec.learning_rate, seed, epoch_done)
    model.eval()
    return records


def _ptq(model: nn.Module, spec: PTQSpec, train: Arrays, calibration_samples: int, seed: int, progress) -> dict[str, int]:
    """Quantize in place; returns each layer's weight bits."""
    from quantcore.algorithms.adaround import AdaRoundOptions, adaround_model
    from quantcore.algorithms.brecq import brecq_model
    from quantcore.algorithms.dfq import data_free_quantize, fold_batchnorm, round_to_nearest, weight_quantizer

    calibration = train.x[:calibration_samples]
    labels = None if train.y is None else train.y[:calibration_samples]
    fold_batchnorm(model)  # a deployed network has no BN; DFQ would fold it first anyway
    schemes = per_tensor_schemes(model, spec.weight_bits, spec.first_last_bits)
    steps = [2]  # the weights' steps + 1 for the activations; AdaRound and BRECQ count layers or blocks

    def step(done: int, total: int, message: str) -> None:
        steps[0] = total + 1
        progress("quantize", done, total + 1, f"{spec.method} {message}")

    progress("quantize", 0, 2, f"{spec.method}: weights")
    if spec.method == "rtn":
        round_to_nearest(model, schemes)
    elif spec.method == "dfq":
        per_layer = {name: weight_quantizer(scheme) for name, scheme in schemes.items()}
        data_free_quantize(model, None, data=[calibration], example_input=calibration[:1], per_layer=per_layer)
    elif spec.method == "adaround":
        adaround_model(model, None, [calibration], AdaRoundOptions(iterations=spec.iterations), seed, per_layer=schemes,
                       progress=step)
    else:
        brecq_model(model, schemes, calibration, labels, AdaRoundOptions(iterations=spec.iterations), seed,
                    progress=step)
    progress("quantize", steps[0] - 1, steps[0], f"{spec.method}: activations")
    if spec.activation_bits is not None:
        static_quantsim(model, spec.activation_bits, [calibration], spec.first_last_bits)
    else:  # weights are on their grids already; wrap so the export describes every layer alike
        wrap_layers(model, {name: s.bits for name, s in schemes.items()}, None, lambda *_: None, lambda *_: None)
    progress("quantize", steps[0], steps[0], f"{spec.method}: done")
    return {name: scheme.bits for name, scheme in schemes.items()}


def _rtn_preview(model: nn.Module, bits: int, x: torch.Tensor, reference: torch.Tensor) -> float:
    """Accuracy of a copy under per-tensor round-to-nearest (first and last layer at 8 bits)."""
    from quantcore.algorithms.dfq import fold_batchnorm, round_to_nearest

    rounded = copy.deepcopy(model).eval()
    fold_batchnorm(rounded)
    round_to_nearest(rounded, per_tensor_schemes(rounded, bits))
    return _accuracy(_predict(rounded, x), reference)


def _finetune_job(model: nn.Module, request: ClassicJobRequest, train: Arrays, held_out: Arrays, reference, metric: str,
                  baseline: dict, folder: Path, progress) -> tuple[dict, dict]:
    """Fine-tune with the regularizer; write the float model (safetensors + config.json)."""
    spec = request.finetune
    assert spec is not None
    before = _rtn_preview(model, spec.preview_bits, held_out.x, reference)
    records = _regularize(model, spec, train, request.seed, progress)
    after_float = _accuracy(_predict(model, held_out.x), reference)
    after = _rtn_preview(model, spec.preview_bits, held_out.x, reference)
    progress("evaluate", 1, 1, f"fine-tuned {metric} {after_float:.2f} %, RTN W{spec.preview_bits}: {before:.2f} → {after:.2f} %")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    write_json(folder / "config.json", getattr(model, "qforge_config", {"architecture": type(model).__name__}))
    metrics = {"baseline": baseline, "finetuned": {metric: after_float},
               "rtn_preview": {"bits": spec.preview_bits, "before": {metric: before}, "after": {metric: after}}}
    return metrics, {"finetune": spec.model_dump(mode="json"), "epochs": records}


def _quantize(model: nn.Module, request: ClassicJobRequest, train: Arrays, progress) -> tuple[dict | None, dict[str, int]]:
    """PTQ or QAT in place; returns the training record (None for PTQ without fine-tuning) and,
    for PTQ, each layer's weight bits."""
    if request.kind == "ptq":
        assert request.ptq is not None
        training = None
        if request.ptq.regularize is not None:
            records = _regularize(model, request.ptq.regularize, train, request.seed, progress)
            training = {"regularize": request.ptq.regularize.model_dump(mode="json"), "epochs": records}
        return training, _ptq(model, request.ptq, train, request.data.calibration_samples, request.seed, progress)

    assert request.qat is not None
    options = request.qat
    if train.y is None and options.loss == "cross_entropy":
        options = options.model_copy(update={"loss": "distill_mse"})  # no labels: learn the float model's outputs
    teacher = copy.deepcopy(model) if options.loss == "distill_mse" else None  # the float model, before it changes
    prepare_qat(model, options, train.x[: request.data.calibration_samples])

    def epoch_done(epoch: int, record: dict) -> None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch")
        progress("quantize", epoch, options.epochs, f"epoch {epoch}: {shown}")

    labels = train.y if train.y is not None else torch.zeros(len(train.x), dtype=torch.long)
    report = train_qat(model, train.x, labels, options, epoch_done, teacher=teacher)
    training = {"options": options.model_dump(mode="json"), "epochs": report.epochs,
                "best_epoch": report.best_epoch, "stopped_early": report.stopped_early}
    return training, {}


def _report(request: ClassicJobRequest, model: nn.Module, classes: int, metrics: dict, layers: list, training, timings) -> dict:
    return {
        "format": "qforge-report/1",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "kind": request.kind,
        "model": {"ref": request.model, "class": type(model).__name__, "classes": classes},
        "request": request.model_dump(mode="json"),
        "seed": request.seed,
        "metrics": metrics,
        "layers": layers,
        "training": training,
        "timings": timings,
        "versions": environment(),
    }


def run_classic_job(request: ClassicJobRequest, output_dir: Path, progress=None, allow_local_paths: bool = True,
                    locate: Locate | None = None) -> dict:
    """Run `request`; the artifact folder goes to `output_dir / "artifact"`; returns the report.
    `locate` finds the files of 'upload:<id>' references (the service's uploads)."""
    progress = progress or (lambda stage, current, total, message="": None)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(request.seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    progress("load", 0, 1, request.model)
    model_path, model_allowed = _open(request.model, "model", locate, allow_local_paths)
    model = load_classifier(model_path, request.seed, model_allowed)
    train, held_out = _split(request, allow_local_paths, locate)
    classes = check_fits(model, train)
    check_fits(model, held_out)
    progress("load", 1, 1, f"{type(model).__name__}, {len(train.x)} training and {len(held_out.x)} evaluation samples")
    timings["load_s"] = round(time.perf_counter() - started, 3)

    float_outputs = _predict(model, held_out.x)
    reference = held_out.y if held_out.y is not None else float_outputs.argmax(1)
    metric = "top1" if held_out.y is not None else "agreement_with_float"
    baseline = {metric: _accuracy(float_outputs, reference)}
    progress("baseline", 1, 1, f"float {metric} {baseline[metric]:.2f} %")

    folder = output_dir / "artifact"
    if folder.exists():
        shutil.rmtree(folder)  # a retried job starts its export afresh
    folder.mkdir(parents=True)
    start = time.perf_counter()
    if request.kind == "finetune":
        metrics, training = _finetune_job(model, request, train, held_out, reference, metric, baseline, folder, progress)
        timings["finetune_s"] = round(time.perf_counter() - start, 3)
        layers: list[dict] = []
    else:
        training, ptq_bits = _quantize(model, request, train, progress)
        timings["quantize_s"] = round(time.perf_counter() - start, 3)
        quantized = {metric: _accuracy(_predict(model, held_out.x), reference)}
        progress("evaluate", 1, 1, f"quantized {metric} {quantized[metric]:.2f} %")
        metrics = {"baseline": baseline, "quantized": quantized,
                   "delta": {f"{metric}_points": round(quantized[metric] - baseline[metric], 4)}}

        progress("export", 0, 1, "writing artifact")
        tensors, described = export_quantsim(model)
        for name, bits in ptq_bits.items():  # PTQ'd weights are on their grids: no weight quantizer left to describe them
            described[name]["weight"] = {"method": request.ptq.method, "bits": bits, "granularity": "tensor"}
        save_file(tensors, str(folder / "model.safetensors"))
        write_json(folder / "quantization.json", {"format": "qforge-quantsim/1", "layers": described})
        layers = [{"name": name, **entry} for name, entry in described.items()]

    report = _report(request, model, classes, metrics, layers, training, timings)
    write_json(folder / "report.json", report)
    write_manifest(folder)
    progress("export", 1, 1, "artifact written")
    report["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    return report
