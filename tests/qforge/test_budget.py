"""Budget checks on a report's numbers, the CLI's exit codes for each outcome, and the
progress display (a bar on a terminal, a line per step in a log)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from qforge.budget import Check, check_budget, report_metrics
from qforge.client.errors import JobFailed, QforgeError, ServerUnavailable, WaitTimeout
from qforge.console import JobDisplay
from qforge.exits import BadInput, ExitCode, exit_code

LLM_REPORT = {
    "metrics": {"baseline": {"perplexity": 10.0, "cached": True}, "quantized": {"perplexity": 10.4},
                "delta": {"perplexity_increase_pct": 4.0}},
    "sizes": {"compression_vs_float32": 3.2, "artifact_parameter_bytes": 1000, "linear": {"ratio_to_float16": 0.27}},
    "timings": {"total_s": 42.5},
}


def test_a_report_becomes_flat_metric_names():
    assert report_metrics(LLM_REPORT) == pytest.approx({
        "perplexity": 10.4, "perplexity_baseline": 10.0, "perplexity_ratio": 1.04, "perplexity_increase_pct": 4.0,
        "compression_vs_float32": 3.2, "artifact_parameter_bytes": 1000, "linear_ratio_to_float16": 0.27, "total_s": 42.5,
    })
    classic = {"metrics": {"baseline": {"top1": 98.0}, "quantized": {"top1": 97.0}, "delta": {"top1_points": -1.0}}}
    assert report_metrics(classic) == pytest.approx({"top1": 97.0, "top1_baseline": 98.0, "top1_ratio": 97 / 98,
                                                     "top1_points": -1.0})


@pytest.mark.parametrize(("text", "passed"), [
    ("perplexity_ratio<=1.05", True), ("perplexity_ratio <= 1.03", False), ("perplexity_ratio<1.04", False),
    ("compression_vs_float32>=3", True), ("top1_points>-1", None), ("total_s < 1e2", True), ("perplexity==10.4", True),
])
def test_checks_compare_a_metric_with_a_limit(text, passed):
    if passed is None:  # a metric this report does not have is a mistake in the check
        with pytest.raises(BadInput, match="this report has no 'top1_points'; it has "):
            check_budget(LLM_REPORT, [Check.parse(text)])
        return
    [result] = check_budget(LLM_REPORT, [Check.parse(text)])
    assert result.passed is passed


@pytest.mark.parametrize("text", ["perplexity", "perplexity_ratio=<1", "ratio<=abc", "Perplexity<=1", "x<=1;rm -rf"])
def test_a_malformed_check_is_bad_input(text):
    with pytest.raises(BadInput, match="METRIC OP NUMBER"):
        Check.parse(text)


def test_each_outcome_has_its_exit_code():
    from app.schemas import JobOut

    job = JobOut.model_validate({
        "id": "a" * 32, "status": "failed", "model": "m", "recipe": {}, "request": {}, "progress": {}, "error": "boom",
        "cancel_requested": False, "attempts": 1, "created_at": "2026-01-01T00:00:00Z", "started_at": None,
        "finished_at": None, "updated_at": "2026-01-01T00:00:00Z", "heartbeat_at": None,
    })
    assert exit_code(JobFailed(job)) == ExitCode.JOB_FAILED == 3
    assert exit_code(WaitTimeout(job, 5)) == ExitCode.TIMEOUT == 4
    assert exit_code(QforgeError(422, "t", "Invalid", "d")) == ExitCode.BAD_INPUT == 2
    assert exit_code(QforgeError(503, "t", "Busy", "d")) == exit_code(ServerUnavailable("x")) == ExitCode.UNAVAILABLE == 5
    assert exit_code(BadInput("x")) == ExitCode.BAD_INPUT and exit_code(RuntimeError("bug")) is None
    assert ExitCode.BUDGET_EXCEEDED == 6


def test_the_display_draws_a_bar_on_a_terminal_and_lines_in_a_log():
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    with JobDisplay("job abc", terminal) as display:
        display.local("quantize", 105, 210, "layer 105")
    assert "job abc" in terminal.file.getvalue() and "50%" in terminal.file.getvalue()  # quantize is 2/5 + half of 1/5

    log = Console(file=io.StringIO(), force_terminal=False, width=40)
    with JobDisplay("job abc", log) as display:
        for layer in range(1, 211):
            display.local("quantize", layer, 210, "a message longer than the forty columns of this console")
        display.local("evaluate", 0, 1)
    lines = log.file.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("job abc: running: quantize 1/210 (40 %) a message longer")
