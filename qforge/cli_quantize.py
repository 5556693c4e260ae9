"""`qforge quantize`: one job on this machine, no server: the same `quantcore.job.run_job`
a worker runs, the same request model, so the artifact and report are the same as the
service's. The folder it writes (`--out`) holds `artifact/` (and `artifact-<format>/` per
further export format), each with its report.json; `qforge report OUT --check ...` holds
that report to a budget."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from qforge.cli_jobs import add_job_options, job_fields, recipe_arg
from qforge.exits import BadInput, ExitCode, LocalJobFailed


def cmd_quantize(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from qforge.console import JobDisplay
    from quantcore.job import JobCancelled, JobRequest, run_job
    from quantcore.job_pipeline import artifact_folder
    from quantcore.models import ModelNotFoundError, resolve_model_ref

    recipe = recipe_arg(args.recipe)
    try:
        request = JobRequest.model_validate({
            "model": args.model,
            "recipe": recipe.read_text() if isinstance(recipe, Path) else recipe,
            **job_fields(args),
        })
        resolve_model_ref(request.model, allow_local_paths=True)  # an unknown model is found now, not after loading
    except ValidationError as exc:
        raise BadInput(f"invalid job: {exc}") from None
    except (ModelNotFoundError, ValueError) as exc:
        raise BadInput(str(exc)) from None

    out = Path(args.out)
    try:
        with JobDisplay(f"quantize {request.model}") as display:
            report = run_job(request, out, progress=display.local, allow_local_paths=True)
    except (KeyboardInterrupt, JobCancelled):
        raise
    except Exception as exc:  # the job's failure, reported as the service would: type and message
        message = str(exc).strip()
        raise LocalJobFailed(f"{type(exc).__name__}: {message}" if message else type(exc).__name__) from exc
    finally:
        shutil.rmtree(out / "spill", ignore_errors=True)  # float weights a multi-stage recipe spilled to disk

    folders = [out / artifact_folder(fmt) for fmt in request.export]
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        delta = report["metrics"].get("delta", {})
        summary = ", ".join(f"{k} {v:g}" for k, v in delta.items())
        print(f"{folders[0]}" + "".join(f"\n{f}" for f in folders[1:]))
        print(f"done in {report['timings']['total_s']:.0f} s" + (f"; {summary}" if summary else ""), flush=True)
    return ExitCode.OK


def add_command(commands) -> None:
    quantize = commands.add_parser(
        "quantize", help="run a job on this machine, no server: the worker's pipeline, with progress bars"
    )
    quantize.add_argument("model", help="bundled:<name>, a local model folder or file, or a cached hub id")
    add_job_options(quantize)
    quantize.add_argument("--out", required=True, help="folder for artifact/ (with its report.json)")
    quantize.add_argument("--json", action="store_true", help="print the report as JSON")
    quantize.set_defaults(func=cmd_quantize)
