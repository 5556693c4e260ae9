"""RTN on SmolLM2-135M on the DESIGN.md split: the foundation issue's acceptance figures.

For each configuration this runs a real qforge job (quantcore.job.run_job: load, quantize,
evaluate, export the artifact), then reloads the artifact with `load_quantized` and
measures its perplexity again. Prints one markdown table with the independent reference
figures beside ours.

    python bench/rtn_smollm2.py [--tokens 16384] [--configs w8-channel,w4-g64,...] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from quantcore.eval import evaluate_perplexity
from quantcore.export import load_quantized
from quantcore.job import EvaluationSpec, JobRequest, run_job

sys.path.insert(0, str(Path(__file__).parent))
from common import run_header, write_section  # noqa: E402

SEED = 0

# name -> (weights scheme, independent reference perplexity from the issue)
CONFIGS = {
    "w8-channel": ({"bits": 8, "granularity": "channel"}, 11.81),
    "w4-g64": ({"bits": 4, "granularity": "group", "group_size": 64}, 17.02),
    "w4-channel": ({"bits": 4, "granularity": "channel"}, 23.15),
    "w3-g64": ({"bits": 3, "granularity": "group", "group_size": 64}, 133.9),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (DESIGN.md: 16384)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--results", type=Path, help="also write the table into this markdown file's RTN section")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    header = run_header(SEED, evaluation_tokens=args.tokens)
    print("\n".join(header), flush=True)

    spec = EvaluationSpec(perplexity_tokens=args.tokens)
    rows = []
    baseline = None
    for name in args.configs.split(","):
        weights, reference = CONFIGS[name]
        recipe = {"name": f"rtn-{name}", "stages": [{"algorithm": "rtn", "weights": {"type": "int", "symmetric": True, **weights}}]}
        request = JobRequest(model="bundled:smollm2-135m", recipe=recipe, evaluation=spec, seed=SEED)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = run_job(request, Path(tmp))
            job_s = time.perf_counter() - start
            baseline = report["metrics"]["baseline"]["perplexity"]
            ppl = report["metrics"]["quantized"]["perplexity"]
            start = time.perf_counter()
            reloaded = load_quantized(Path(tmp) / "artifact")
            reload_ppl = evaluate_perplexity(reloaded.model, reloaded.tokenizer, spec)
            reload_s = time.perf_counter() - start
        linear = report["sizes"]["linear"]
        rows.append(
            (name, reference, ppl, 100 * (ppl / reference - 1), reload_ppl, 100 * abs(reload_ppl / ppl - 1),
             linear["ratio_to_float16"], report["sizes"]["artifact_parameter_bytes"], job_s, reload_s)
        )
        print(f"{name}: ppl {ppl:.3f} (reference {reference}), reloaded {reload_ppl:.3f}, "
              f"linear/fp16 {linear['ratio_to_float16']:.4f}, job {job_s:.0f}s", flush=True)

    lines = [
        f"fp32 baseline perplexity: {baseline:.3f} (reference 11.81)",
        "",
        "| config | reference ppl | ppl | vs reference | reloaded ppl | reload diff | linear bytes / fp16 | artifact param bytes | job s | reload+eval s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:+.2f} % | {r[4]:.3f} | {r[5]:.4f} % | {r[6]:.4f} | {r[7]:,} | {r[8]:.0f} | {r[9]:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if args.results:
        write_section(args.results, "RTN on SmolLM2-135M", header, table, " ".join(["python"] + sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
