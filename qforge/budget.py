"""Quality budgets for a pipeline: checks such as `perplexity_ratio<=1.05` held against the
numbers of a job's report.

A report's metrics become flat names: each quantized metric under its own name
(`perplexity`, `embedding_cosine`, `top1`), its float value as `<name>_baseline`, the
quotient as `<name>_ratio`, the report's deltas as they are (`perplexity_increase_pct`,
`top1_points`), and the sizes (`compression_vs_float32`, `linear_ratio_to_float16`,
`artifact_parameter_bytes`) and `total_s`.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from qforge.exits import BadInput

OPERATORS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_CHECK = re.compile(rf"^\s*([a-z][a-z0-9_]*)\s*(<=|>=|==|<|>)\s*({_NUMBER})\s*$")


class Check(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str
    op: Literal["<=", "<", ">=", ">", "=="]
    limit: float

    @classmethod
    def parse(cls, text: str) -> Check:
        match = _CHECK.match(text)
        if match is None:
            raise BadInput(f"check '{text}': write METRIC OP NUMBER, e.g. 'perplexity_ratio<=1.05' (OP: <=, <, >=, >, ==)")
        return cls(metric=match.group(1), op=match.group(2), limit=float(match.group(3)))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.limit:g}"


class CheckResult(BaseModel):
    check: Check
    value: float
    passed: bool


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of a report (quantcore's `qforge-report/1`, LLM, encoder or classic job)."""
    metrics = report.get("metrics") or {}
    baseline, quantized = metrics.get("baseline") or {}, metrics.get("quantized") or {}
    out: dict[str, float] = {}
    for name, value in quantized.items():
        if not _number(value):
            continue
        out[name] = float(value)
        if _number(baseline.get(name)):
            out[f"{name}_baseline"] = float(baseline[name])
            if baseline[name]:
                out[f"{name}_ratio"] = value / baseline[name]
    out |= {name: float(value) for name, value in (metrics.get("delta") or {}).items() if _number(value)}
    sizes = report.get("sizes") or {}
    for name in ("compression_vs_float32", "artifact_parameter_bytes"):
        if _number(sizes.get(name)):
            out[name] = float(sizes[name])
    if _number((sizes.get("linear") or {}).get("ratio_to_float16")):
        out["linear_ratio_to_float16"] = float(sizes["linear"]["ratio_to_float16"])
    if _number((report.get("timings") or {}).get("total_s")):
        out["total_s"] = float(report["timings"]["total_s"])
    return out


def check_budget(report: dict[str, Any], checks: list[Check]) -> list[CheckResult]:
    """Every check's outcome. A metric the report lacks is an error in the check, not a
    failed budget: e.g. `perplexity_ratio` without a baseline evaluation."""
    metrics = report_metrics(report)
    results = []
    for check in checks:
        if check.metric not in metrics:
            raise BadInput(f"check '{check}': this report has no '{check.metric}'; it has {', '.join(sorted(metrics))}")
        value = metrics[check.metric]
        results.append(CheckResult(check=check, value=value, passed=OPERATORS[check.op](value, check.limit)))
    return results
