"""The CLI commands that talk to a qforge server through the SDK: submit, wait, status,
report, download, cancel, presets. `report` also reads the report of a local run
(`qforge quantize`), so one budget check serves both.

What a script reads goes to stdout (a job id, a path, JSON); progress and messages go to
stderr. The exit code says what happened (`qforge.exits`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from qforge.exits import BadInput, ExitCode

RECIPE_FILE_SUFFIXES = (".yaml", ".yml", ".json")


# --------------------------------------------------------------------------------------
# options shared by several commands
# --------------------------------------------------------------------------------------
def connection_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--server", help="the API's base URL (QFORGE_SERVER, default http://127.0.0.1:8000)")
    parent.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (QFORGE_API_KEY)")
    return parent


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """What a job does besides its model and recipe; only the options given are sent."""
    parser.add_argument("--recipe", required=True, help="a preset name (see `qforge presets`) or a YAML/JSON recipe file")
    parser.add_argument("--perplexity-tokens", type=int, help="evaluation tokens for perplexity (default 16384)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the float model's evaluation")
    parser.add_argument("--no-eval", action="store_true", help="skip evaluation altogether (no metrics to check)")
    parser.add_argument("--calibration-samples", type=int, help="calibration windows (default 128)")
    parser.add_argument("--export", action="append", metavar="FORMAT",
                        help="an artifact format, repeatable: qforge (default), compressed-tensors, gguf, gptq, awq, ...")
    parser.add_argument("--seed", type=int)


def job_fields(args: argparse.Namespace) -> dict[str, Any]:
    evaluation: dict[str, Any] = {}
    if args.perplexity_tokens is not None:
        evaluation["perplexity_tokens"] = args.perplexity_tokens
    if args.no_baseline:
        evaluation["baseline"] = False
    if args.no_eval:
        evaluation["enabled"] = False
    fields: dict[str, Any] = {"evaluation": evaluation} if evaluation else {}
    if args.calibration_samples is not None:
        fields["calibration"] = {"num_samples": args.calibration_samples}
    if args.export:
        fields["export"] = args.export
    if args.seed is not None:
        fields["seed"] = args.seed
    return fields


def recipe_arg(value: str) -> Path | str:
    """A recipe file (read by the caller) or a preset name (checked where it is used)."""
    path = Path(value)
    if path.is_file():
        return path
    if value.endswith(RECIPE_FILE_SUFFIXES) or os.sep in value:
        raise BadInput(f"recipe file '{value}' not found")
    return value


def _client(args: argparse.Namespace):
    from qforge.client import Client
    from qforge.client._shared import server_url

    return Client(args.server, args.api_key or os.environ.get("QFORGE_API_KEY") or _local_key(server_url(args.server)))


def _local_key(server: str) -> str | None:
    """The key `qforge serve` saved for its user on the embedded default (<data dir>/api.key,
    see app.tenants.bootstrap), when the server is this machine's: so that the two README
    commands work together with no key to copy. Never sent to another host."""
    from urllib.parse import urlsplit

    if urlsplit(server).hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    path = Path(os.environ.get("QFORGE_DATA_DIR") or ".qforge").expanduser() / "api.key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------
def _describe(job) -> str:
    lines = [f"id        {job.id}", f"status    {job.status.value}", f"model     {job.model}",
             f"recipe    {job.recipe.get('name', '?')}"]
    p = job.progress
    if p.stage:
        lines.append(f"progress  {p.stage}" + (f" {p.current}/{p.total}" if p.total > 1 else "") + f", {p.percent:.0f} %")
    if job.error:
        lines.append(f"error     {job.error}")
    for artifact in job.artifacts:
        lines.append(f"artifact  {artifact.format or 'qforge'}: {artifact.bytes:,} bytes, sha256 {artifact.sha256}")
    return "\n".join(lines)


def _follow(qf, job_id: str, args: argparse.Namespace):
    """Wait with a progress display; with --json the job is printed however it ended."""
    from qforge.client import JobCancelled, JobFailed, WaitTimeout
    from qforge.console import JobDisplay

    try:
        with JobDisplay(f"job {job_id[:8]}") as display:
            job = qf.wait(job_id, timeout=args.timeout, progress=display.job)
    except (JobFailed, JobCancelled, WaitTimeout) as stopped:
        if args.json:
            _print_json(stopped.job.model_dump(mode="json"))
        raise
    return job


def cmd_submit(args: argparse.Namespace) -> int:
    recipe = recipe_arg(args.recipe)
    with _client(args) as qf:
        fields = job_fields(args)
        if args.callback_url:
            fields["callback_url"] = args.callback_url
        job = qf.submit(args.model, recipe, idempotency_key=args.idempotency_key, **fields)
        if not args.json:
            print(job.id, flush=True)  # now: a pipeline has the id even if the wait fails
        if args.wait:
            job = _follow(qf, job.id, args)
            _err(f"job {job.id} succeeded")
    if args.json:
        _print_json(job.model_dump(mode="json"))
    return ExitCode.OK


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as qf:
        job = _follow(qf, args.job_id, args)
    _print_json(job.model_dump(mode="json")) if args.json else print(job.id)
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as qf:
        job = qf.get(args.job_id)
    _print_json(job.model_dump(mode="json")) if args.json else print(_describe(job))
    return ExitCode.JOB_FAILED if job.status.value in ("failed", "cancelled") else ExitCode.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as qf:
        job = qf.cancel(args.job_id)
    if job.status.value == "cancelled":
        print(f"{job.id} cancelled")
    else:
        print(f"{job.id} cancel requested: it is running, and stops within about a second")
    return ExitCode.OK


def cmd_download(args: argparse.Namespace) -> int:
    from qforge.console import bytes_display

    with _client(args) as qf:
        show, close = bytes_display(f"job {args.job_id[:8]}")
        try:
            path = qf.download(args.job_id, args.out, format=args.format, progress=show)
        finally:
            close()
    _err(f"{path}: {path.stat().st_size:,} bytes, sha256 verified")
    print(path)
    return ExitCode.OK


def cmd_presets(args: argparse.Namespace) -> int:
    with _client(args) as qf:
        presets = qf.presets()
    if args.json:
        _print_json([p.model_dump(mode="json") for p in presets])
        return ExitCode.OK
    width = max(len(p.name) for p in presets)
    for p in presets:
        print(f"{p.name:<{width}}  {p.description}")
    return ExitCode.OK


# --------------------------------------------------------------------------------------
# reports and budgets
# --------------------------------------------------------------------------------------
def local_report(path: Path) -> dict[str, Any]:
    """A report.json, an artifact folder, or the --out folder of `qforge quantize`."""
    candidates = [path] if path.is_file() else [path / "report.json", path / "artifact" / "report.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except ValueError as exc:
                raise BadInput(f"{candidate}: not a JSON report: {exc}") from None
    raise BadInput(f"{path}: no report.json here (nor in {path / 'artifact'})")


def cmd_report(args: argparse.Namespace) -> int:
    from qforge.budget import Check, check_budget, report_metrics

    checks = [Check.parse(text) for text in args.check or []]  # a typo fails before any request
    if Path(args.job).exists():
        report = local_report(Path(args.job))
    elif os.sep in args.job or args.job.endswith(".json"):  # a path, not an id: say so, not "job not found"
        raise BadInput(f"{args.job}: no such file or folder")
    else:
        with _client(args) as qf:
            report = qf.report(args.job)
    results = check_budget(report, checks)
    if args.json:
        _print_json(report)
    else:
        print(f"model     {report.get('model', {}).get('ref', '?')}")
        print(f"recipe    {report.get('recipe', {}).get('name', report.get('kind', '?'))}")
        for name, value in report_metrics(report).items():
            print(f"{name:<26}{int(value) if value.is_integer() else f'{value:.6g}'}")
    say = _err if args.json else print  # stdout stays the report when it is JSON
    for result in results:
        say(f"{'PASS' if result.passed else 'FAIL'}  {result.check}  (is {result.value:.6g})")
    failed = [r for r in results if not r.passed]
    if failed:
        _err(f"budget exceeded: {len(failed)} of {len(results)} checks failed")
        return ExitCode.BUDGET_EXCEEDED
    return ExitCode.OK


# --------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------
def add_commands(commands) -> None:
    conn = connection_options()

    submit = commands.add_parser("submit", parents=[conn], help="submit a job to a server (--wait to follow it)")
    submit.add_argument("model", help="bundled:<name>, upload:<id>, or a hub id the server has cached")
    add_job_options(submit)
    submit.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    submit.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds (exit 4)")
    submit.add_argument("--idempotency-key",
                        help="the same key returns the same job: set it in CI so a retried step does not quantize twice")
    submit.add_argument("--json", action="store_true", help="print the job as JSON instead of its id")
    submit.add_argument("--callback-url", help="POST a signed event here when the job ends (see docs/service.md, webhooks)")
    submit.set_defaults(func=cmd_submit)

    wait = commands.add_parser("wait", parents=[conn], help="follow a job until it ends")
    wait.add_argument("job_id")
    wait.add_argument("--timeout", type=float, help="give up after this many seconds (exit 4)")
    wait.add_argument("--json", action="store_true")
    wait.set_defaults(func=cmd_wait)

    status = commands.add_parser("status", parents=[conn], help="a job's status and progress (exit 3 if it failed)")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    report = commands.add_parser("report", parents=[conn], help="a job's report; --check holds it to a budget (exit 6)")
    report.add_argument("job", metavar="ID|PATH", help="a job id, or a local report.json / `qforge quantize --out` folder")
    report.add_argument("--check", action="append", metavar="EXPR",
                        help="METRIC OP NUMBER, repeatable, e.g. 'perplexity_ratio<=1.05', 'compression_vs_float32>=3'; "
                        "the metrics are those `qforge report` lists")
    report.add_argument("--json", action="store_true", help="print the whole report as JSON")
    report.set_defaults(func=cmd_report)

    download = commands.add_parser("download", parents=[conn], help="download a job's artifact, sha256-checked")
    download.add_argument("job_id")
    download.add_argument("--out", default=".", help="a file, or a folder for qforge-<id>.tar (default: .)")
    download.add_argument("--format", help="another exported format (compressed-tensors, gguf-q4_0, ...)")
    download.set_defaults(func=cmd_download)

    cancel = commands.add_parser("cancel", parents=[conn], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=cmd_cancel)

    presets = commands.add_parser("presets", parents=[conn], help="the named recipes")
    presets.add_argument("--json", action="store_true", help="with each full recipe")
    presets.set_defaults(func=cmd_presets)
