"""What the pages show, taken from the API's own job schema (`JobOut`) and the stored report:
stage bars, metric rows, sizes and timings. Nothing is measured here; values are the
report's, only arranged for a table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.models import JobStatus
from app.schemas import JobOut
from quantcore.job import STAGES

STAGE_LABELS = {
    "load": "Load model",
    "baseline": "Baseline evaluation",
    "quantize": "Quantize (layer by layer)",
    "evaluate": "Evaluate quantized",
    "export": "Export artifacts",
}


@dataclass(frozen=True)
class StageBar:
    stage: str
    label: str
    value: float  # 0..1
    detail: str


def stage_bars(job: JobOut) -> list[StageBar]:
    """One bar per pipeline stage: the ones before the current stage are full, the current
    one shows step i of N (layers or blocks while quantizing, windows while evaluating)."""
    p = job.progress
    index = STAGES.index(p.stage) if p.stage in STAGES else -1
    bars = []
    for i, stage in enumerate(STAGES):
        if job.status == JobStatus.SUCCEEDED or i < index:
            value, detail = 1.0, "done"
        elif i == index:
            value = min(p.current / p.total, 1.0) if p.total > 0 else 0.0
            detail = f"{p.current} of {p.total}" if p.total > 0 else "starting"
            if job.status.terminal:  # failed or cancelled here
                detail += f" ({job.status.value})"
        else:
            value, detail = 0.0, "not started" if not job.status.terminal else "skipped"
        bars.append(StageBar(stage, STAGE_LABELS.get(stage, stage), value, detail))
    return bars


def job_recipe_name(job: JobOut) -> str:
    """A recipe job's recipe name, or a classic job's kind and method."""
    recipe = job.recipe or {}
    if "kind" in recipe:
        spec = recipe.get(recipe["kind"]) or {}
        return f"{recipe['kind']} {spec.get('method', '')}".strip()
    return str(recipe.get("name", "custom"))


@dataclass(frozen=True)
class MetricRow:
    name: str
    before: Any
    after: Any
    change: float | None


def metric_rows(report: dict[str, Any]) -> list[MetricRow]:
    """Each numeric metric of the baseline beside the quantized (or fine-tuned) model's."""
    metrics = report.get("metrics") or {}
    before = _numbers(metrics.get("baseline"))
    after = _numbers(metrics.get("quantized") or metrics.get("finetuned"))
    rows = []
    for name in [*before, *(k for k in after if k not in before)]:
        b, a = before.get(name), after.get(name)
        rows.append(MetricRow(name, b, a, a - b if a is not None and b is not None else None))
    return rows


def delta_rows(report: dict[str, Any]) -> dict[str, Any]:
    return _numbers((report.get("metrics") or {}).get("delta"))


def size_rows(report: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(label, kind, value) for the sizes a recipe job's report measured from its artifact;
    kind is "bytes", "ratio" or "count"."""
    sizes = report.get("sizes") or {}
    rows: list[tuple[str, str, Any]] = []
    for key, label in (
        ("float32_parameter_bytes", "Parameters in float32"),
        ("float16_parameter_bytes", "Parameters in float16"),
        ("artifact_parameter_bytes", "Parameters as stored in the artifact"),
    ):
        if key in sizes:
            rows.append((label, "bytes", sizes[key]))
    if "compression_vs_float32" in sizes:
        rows.append(("Compression vs float32", "ratio", sizes["compression_vs_float32"]))
    linear = sizes.get("linear") or {}
    if linear:
        rows.append(("Quantized linear layers", "count", linear.get("layers")))
        rows.append(("Linear layers in float16", "bytes", linear.get("float16_bytes")))
        rows.append(("Linear layers quantized", "bytes", linear.get("quantized_bytes")))
        if linear.get("ratio_to_float16"):
            rows.append(("Linear compression vs float16", "ratio", round(1 / linear["ratio_to_float16"], 4)))
    return rows


def timing_rows(report: dict[str, Any]) -> list[tuple[str, float]]:
    timings = report.get("timings") or {}
    return [(key.removesuffix("_s"), value) for key, value in timings.items() if isinstance(value, (int, float))]


def _numbers(section: Any) -> dict[str, float]:
    if not isinstance(section, dict):
        return {}
    return {k: v for k, v in section.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
