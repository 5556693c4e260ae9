"""The submit form: its fields turned into the request body POST /v1/jobs takes, and the
validation errors of that body turned back into messages beside the fields.

Validation is the API's: quantcore's pydantic `JobRequest` (with its `Recipe`) and
`ClassicJobRequest`, each with the service's `callback_url` (`app.webhooks`); this module
only builds their input and finds, for an error's location, the form field
and, inside the YAML text, the line it points at.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from app.errors import validation_problem
from app.webhooks import ClassicJobSubmission, JobSubmission
from quantcore.algorithms.qat import QATOptions
from quantcore.classic_job import ClassicJobRequest, FinetuneSpec, PTQSpec
from quantcore.job import CalibrationSpec, EvaluationSpec, ExportFormat, JobRequest
from quantcore.recipe import PRESETS, preset

EXPORT_FORMATS: tuple[str, ...] = typing.get_args(ExportFormat)
CALIBRATION_DATASETS: tuple[str, ...] = typing.get_args(CalibrationSpec.model_fields["dataset"].annotation)
CALIBRATION_FIELDS = ("dataset", "num_samples", "seq_len")
EVALUATION_NUMBERS = ("perplexity_tokens", "embedding_paragraphs")
EVALUATION_SWITCHES = ("enabled", "baseline")  # checkboxes: absent from a submitted form means off
CLASSIC_SPECS: dict[str, type[BaseModel]] = {"ptq": PTQSpec, "qat": QATOptions, "finetune": FinetuneSpec}
DEFAULT_PRESET = "w4a16-rtn-g64"
# Form fields an error location can point at; any other location is inside the YAML text.
FIELDS = frozenset({
    "model", "recipe", "export", "seed", "callback_url", "data.train", "data.evaluation", "data.calibration_samples",
    *(f"calibration.{k}" for k in CALIBRATION_FIELDS),
    *(f"evaluation.{k}" for k in (*EVALUATION_NUMBERS, *EVALUATION_SWITCHES)),
})

LABELS = {
    "model": "Model", "recipe": "Recipe", "export": "Export formats", "seed": "Seed", "callback_url": "Webhook URL",
    "calibration.dataset": "Calibration dataset", "calibration.num_samples": "Calibration windows",
    "calibration.seq_len": "Tokens per window", "evaluation.perplexity_tokens": "Perplexity tokens",
    "evaluation.embedding_paragraphs": "Paragraphs", "data.train": "Training data", "data.evaluation": "Evaluation data",
    "data.calibration_samples": "Calibration samples", "upload_model": "Checkpoint upload", "upload_dataset": "Data upload",
}


@dataclass
class FormErrors(Exception):
    """Messages per form field ("" for the form as a whole)."""

    fields: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, message: str) -> None:
        self.fields.setdefault(name, []).append(message)


def default_values(kind: str, model: str | None = None) -> dict[str, Any]:
    """A fresh form: the pydantic defaults, the quickest preset, the first export format."""
    calibration, evaluation = CalibrationSpec(), EvaluationSpec()
    values: dict[str, Any] = {
        "kind": kind,
        "seed": "0",
        "export": ["qforge"],
        **{f"calibration.{k}": str(getattr(calibration, k)) for k in CALIBRATION_FIELDS},
        **{f"evaluation.{k}": str(getattr(evaluation, k)) for k in EVALUATION_NUMBERS},
        **{f"evaluation.{k}": getattr(evaluation, k) for k in EVALUATION_SWITCHES},
        "data.train": "bundled:digits",
        "data.evaluation": "",
        "data.calibration_samples": "256",
    }
    if kind == "classic":
        values.update(model_source="upload" if model else "bundled", uploaded_model=model or "",
                      bundled_model="bundled:digits-cnn", preset="ptq", recipe=classic_starting_point("ptq"))
    else:
        values.update(model_source="bundled", bundled_model="bundled:smollm2-135m", hub_id="",
                      preset=DEFAULT_PRESET, recipe=preset(DEFAULT_PRESET).to_yaml())
    return values


def starting_point(kind: str, name: str) -> str:
    """The editor's text for a preset (recipe jobs) or a spec's defaults (classic jobs);
    empty for a name that is neither."""
    if kind == "classic":
        return classic_starting_point(name) if name in CLASSIC_SPECS else ""
    return preset(name).to_yaml() if name in PRESETS else ""


def classic_starting_point(kind: str) -> str:
    """A classic job's spec with every default written out, to edit."""
    return yaml.safe_dump({"kind": kind, kind: CLASSIC_SPECS[kind]().model_dump(mode="json")}, sort_keys=False)


def submitted_values(form) -> dict[str, Any]:
    """The submitted form as the template shows it back (strings; lists for checkboxes)."""
    values: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str) and k != "export"}
    values["export"] = form.getlist("export")
    for name in EVALUATION_SWITCHES:
        values[f"evaluation.{name}"] = f"evaluation.{name}" in form
    return values


def model_ref(values: dict[str, Any]) -> str:
    source = values.get("model_source", "bundled")
    key = {"hub": "hub_id", "upload": "uploaded_model"}.get(source, "bundled_model")
    return str(values.get(key, "")).strip()


def build_request(values: dict[str, Any]) -> JobRequest | ClassicJobRequest:
    """The validated request, or FormErrors naming each bad field."""
    classic = values.get("kind") == "classic"
    body = _classic_body(values) if classic else _recipe_body(values)
    if str(values.get("callback_url", "")).strip():
        body["callback_url"] = values["callback_url"].strip()
    if classic:
        return _validate(ClassicJobSubmission, body, values["recipe"], yaml_prefix=())
    return _validate(JobSubmission, body, values.get("recipe", ""), yaml_prefix=("recipe",))


def _recipe_body(values: dict[str, Any]) -> dict[str, Any]:
    # The YAML goes in as text: JobRequest parses it (or a preset name) as the API does.
    body: dict[str, Any] = {"model": model_ref(values), "recipe": values.get("recipe", ""), "export": values["export"]}
    body["calibration"] = _filled(values, "calibration", CALIBRATION_FIELDS)
    body["evaluation"] = _filled(values, "evaluation", EVALUATION_NUMBERS)
    for name in EVALUATION_SWITCHES:
        body["evaluation"][name] = bool(values.get(f"evaluation.{name}"))
    if str(values.get("seed", "")).strip():
        body["seed"] = values["seed"].strip()
    return body


def _classic_body(values: dict[str, Any]) -> dict[str, Any]:
    errors = FormErrors()
    try:
        spec = yaml.safe_load(values.get("recipe", "")) or {}
    except yaml.YAMLError as exc:
        errors.add("recipe", f"not valid YAML: {exc}")
        raise errors from None
    if not isinstance(spec, dict):
        errors.add("recipe", "the job spec must be a mapping, e.g. `kind: ptq` with a `ptq:` section")
        raise errors
    for key in ("model", "data", "callback_url"):
        if key in spec:
            errors.add("recipe", f"{key}: choose it with the form's own fields, not in the spec")
    if errors.fields:
        raise errors
    data = {"train": values.get("data.train", ""), **_filled(values, "data", ("evaluation", "calibration_samples"))}
    return {**spec, "model": model_ref(values), "data": data}


def _filled(values: dict[str, Any], section: str, names: tuple[str, ...]) -> dict[str, str]:
    """Fields left empty take the model's default."""
    return {name: v.strip() for name in names if (v := str(values.get(f"{section}.{name}", ""))).strip()}


def _validate(model: type[BaseModel], body: dict[str, Any], text: str, yaml_prefix: tuple) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        # the API's own wording of each error (validation_problem strips pydantic's prefixes)
        raise problem_errors(validation_problem(list(exc.errors())).extra["errors"], text, yaml_prefix) from None


def problem_errors(errors: list[dict[str, Any]], text: str = "", yaml_prefix: tuple = ("recipe",)) -> FormErrors:
    """Map a problem's errors (`loc`, `msg`) to form fields; a location inside the recipe or
    spec is named by its path and, where the YAML has it, its line."""
    out = FormErrors()
    for error in errors:
        loc = [part for part in error["loc"] if part != "body"]
        name = next((".".join(map(str, loc[:n])) for n in range(len(loc), 0, -1)
                     if ".".join(map(str, loc[:n])) in FIELDS and loc[:n] != list(yaml_prefix)), None)
        if name is not None:
            out.add(name, error["msg"])
        elif loc[: len(yaml_prefix)] == list(yaml_prefix) and (loc or not yaml_prefix):
            path = loc[len(yaml_prefix):]
            where = yaml_path(path)
            line = yaml_line(text, path)
            prefix = f"{where}{f' (line {line})' if line else ''}: " if where else ""
            out.add("recipe", prefix + error["msg"])
        else:
            out.add("", error["msg"])
    return out


def yaml_path(path: list) -> str:
    """stages[0].weights.bits: how the field would be written in the YAML."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out


def yaml_line(text: str, path: list) -> int | None:
    """The 1-based line of the deepest node of `path` the YAML text has, if any."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
