"""W8A8 (int8 per-channel weights, int8 per-token dynamic activations) on SmolLM2-135M:
the reference path (fake-quantized activations, float matmul) against the fbgemm int8 path,
in perplexity and in time per linear layer, in one run.

    python bench/w8a8_smollm2.py [--tokens 4096] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from quantcore import quantize
from quantcore.eval import evaluate_perplexity
from quantcore.job import EvaluationSpec
from quantcore.models import load_model
from quantcore.modules import QuantizedLinear, cpu_paths, enable_fast_path
from quantcore.schemes import QuantScheme

sys.path.insert(0, str(Path(__file__).parent))
from common import run_header, write_section  # noqa: E402

SEED = 0


def time_ms(fn, repeat: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1000


def layer_timings() -> list[str]:
    rows = []
    w8 = QuantScheme(type="int", bits=8, granularity="channel")
    a8 = QuantScheme(type="int", bits=8, granularity="token", dynamic=True)
    for out_f, in_f in ((1536, 576), (576, 1536), (4096, 4096)):
        linear = nn.Linear(in_f, out_f, bias=False)
        q = QuantizedLinear.from_float(linear, w8, a8)
        for batch in (1, 16, 512):
            x = torch.randn(batch, in_f)
            with torch.inference_mode():
                fp32 = time_ms(lambda: linear(x))
                path = cpu_paths.choose(q, approximate=True)
                fast = time_ms(lambda: path(x, q))
                ref = time_ms(lambda: q.forward_reference(x))
            rows.append(f"| {out_f}x{in_f} | {batch} | {fp32:.3f} | {ref:.3f} | {fast:.3f} | {fp32 / fast:.2f}x |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    header = run_header(SEED, evaluation_tokens=args.tokens)
    print("\n".join(header), flush=True)
    spec = EvaluationSpec(perplexity_tokens=args.tokens)
    loaded = load_model("bundled:smollm2-135m")
    fp32 = evaluate_perplexity(loaded.model, loaded.tokenizer, spec)
    quantize(loaded.model, "w8a8-rtn")
    reference = evaluate_perplexity(loaded.model, loaded.tokenizer, spec)
    enable_fast_path(loaded.model, approximate=True)
    fast = evaluate_perplexity(loaded.model, loaded.tokenizer, spec)
    lines = [
        "| path | perplexity |",
        "|---|---|",
        f"| fp32 | {fp32:.3f} |",
        f"| W8A8 reference (8-bit per-token activations) | {reference:.3f} |",
        f"| W8A8 fbgemm int8 ({'exact codes: this CPU has VNNI' if cpu_paths.has_vnni() else 'reduce_range: 7-bit activations'}) | {fast:.3f} |",
        "",
        "| linear | rows | fp32 ms | reference ms | int8 ms | int8 speedup |",
        "|---|---|---|---|---|---|",
        *layer_timings(),
    ]
    table = "\n".join(lines)
    print(table)
    if args.results:
        write_section(args.results, "W8A8 on SmolLM2-135M (CPU)", header, table, " ".join(["python"] + sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
