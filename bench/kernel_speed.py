"""Quantized execution speed: each fast path against the float reference, as ratios taken in
one run (the machines are shared and noisy: compare within a run, not across runs).

CPU (always):
  layers   per shape (SmolLM2's 576x1536 and 1536x576, and 4096x4096) and rows (1, 16, 64):
           fp32 F.linear; W8A8 through its engine (oneDNN on CPUs with AMX, fbgemm on the
           others), the raw op alone called from Python (codes prepared beforehand) and our
           path (per-token quantization and scaling included: the wrapper's overhead is the gap);
           W4 g64 through the int4 path (the kernel for rows ≤ 8; above, its one-pass
           dequantization + BLAS).
  model    SmolLM2-135M: a 512-token prefill as generation runs it (KV cache filled, logits
           of the last position only), fp32 against W8A8 (`w8a8-rtn`, fast path);
           greedy decoding of 32 tokens, fp32 against W4 (`w4a16-rtn-g64`, fast path), and
           whether the fast path produces the same tokens as the dequantize reference.
GPU (a CUDA device only): per shape (a 7B model's 4096x4096, 11008x4096, 4096x11008) and
batch (1, 16, 64), fp16 F.linear (cuBLAS) against the Triton kernels: W4A16 g128, int8
W8A8, fp8 W8A8 (compute capability ≥ 8.9), and SVDQuant's fused W4A4 r32 (against W4A16);
without a GPU these figures stay open and the script says so.

    python bench/kernel_speed.py [--repeat 30] [--results bench/RESULTS.md] [--gpu-only]
    TRITON_INTERPRET=1 python bench/kernel_speed.py --gpu-dry-run   # the GPU code on the CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

SEED = 0
SHAPES = [(1536, 576), (576, 1536), (4096, 4096)]  # (out, in)
ROWS = [1, 16, 64]
TARGETS = {
    "w8a8_batch16": "≥ 2.5x fp32 at 16 rows on 576x1536 and 4096x4096; wrapper within 15 % of the raw op",
    "prefill": "W8A8 prefill ≥ 1.8x fp32",
    "decode": "W4 decode ≥ 1.2x fp32 tokens/s; same greedy tokens as the reference for 32 tokens",
}


def median_ms(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def paired_ms(fn_a, fn_b, repeat: int) -> tuple[float, float]:
    """Medians of two functions timed call about, so that the machine's load drifts over both
    alike: the raw op and our path differ by microseconds, less than the drift between two
    separate runs of `median_ms` on a shared machine."""
    for _ in range(3):
        fn_a(), fn_b()
    times_a, times_b = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        fn_a()
        middle = time.perf_counter()
        fn_b()
        times_a.append(middle - start)
        times_b.append(time.perf_counter() - middle)
    return statistics.median(times_a) * 1000, statistics.median(times_b) * 1000


def layer_rows(repeat: int) -> list[str]:
    from quantcore.modules import QuantizedLinear, cpu_paths
    from quantcore.schemes import QuantScheme

    w8 = QuantScheme(type="int", bits=8, granularity="channel")
    a8 = QuantScheme(type="int", bits=8, granularity="token", dynamic=True)
    w4 = QuantScheme(type="int", bits=4, granularity="group", group_size=64)
    lines = [
        "| linear (out x in) | rows | fp32 ms | W8A8 raw op ms | W8A8 path ms | W8A8 vs fp32 | path / raw op | W4 path ms | W4 vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for out_f, in_f in SHAPES:
        torch.manual_seed(SEED)
        linear = nn.Linear(in_f, out_f)
        q8 = QuantizedLinear.from_float(linear, w8, a8)
        q4 = QuantizedLinear.from_float(linear, w4)
        exact = cpu_paths.has_vnni()
        path8 = cpu_paths.Int8Path(q8, exact=exact)
        path4 = cpu_paths.choose(q4)
        for rows in ROWS:
            x = torch.randn(rows, in_f)
            with torch.inference_mode():
                fp32 = median_ms(lambda: F.linear(x, linear.weight, linear.bias), repeat)
                s_x = x.abs().amax(dim=-1, keepdim=True) / 127
                if path8.engine == "onednn":  # the op from Python, int8 codes prepared beforehand
                    codes = torch.round(x / s_x).to(torch.int8)
                    raw_op = lambda: torch.ops.onednn.qlinear_pointwise(  # noqa: E731
                        codes, 1.0, 0, path8.packed, path8.w_scale, path8.w_zero, None, 1.0, 0, torch.float32, "none", [], "")
                elif exact:
                    codes = torch.round(x / s_x)
                    raw_op = lambda: torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(  # noqa: E731
                        codes, 1.0, 128, path8.packed)
                else:
                    scaled = x / (s_x * 127)
                    raw_op = lambda: torch.ops.quantized.linear_dynamic(scaled, path8.packed, True)  # noqa: E731
                # many more calls than the other columns: they are fractions of a millisecond
                raw, ours8 = paired_ms(raw_op, lambda: path8(x, q8), repeat * 10)
                # the int4 path: the kernel up to MAX_ROWS rows, its one-pass dequantization + BLAS above
                ours4 = median_ms(lambda: path4(x, q4), repeat) if path4 is not None else float("nan")
            lines.append(
                f"| {out_f}x{in_f} | {rows} | {fp32:.3f} | {raw:.3f} | {ours8:.3f} | {fp32 / ours8:.2f}x | "
                f"{ours8 / raw:.2f} | {ours4:.3f} | {fp32 / ours4:.2f}x |"
            )
    return lines


def model_rows(repeat: int, new_tokens: int) -> list[str]:
    from quantcore import quantize
    from quantcore.eval.data import split_tokens, tokenize_benchmark
    from quantcore.models import load_model
    from quantcore.modules import enable_fast_path

    loaded = load_model("bundled:smollm2-135m")
    fp32_model, tokenizer = loaded.model.eval(), loaded.tokenizer
    evaluation = split_tokens(tokenize_benchmark(tokenizer))[1]
    prefill_ids = evaluation[:512].unsqueeze(0)
    prompt = evaluation[:16].unsqueeze(0)

    def prefill_once(model) -> float:
        # as generation prefills: the cache filled, logits for the last position only
        start = time.perf_counter()
        model(prefill_ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start

    def decode_once(model) -> tuple[float, list[int]]:
        """Tokens/s of the new tokens (a 16-token prompt, greedy), and the tokens."""
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        return new_tokens / (time.perf_counter() - start), out[0, prompt.shape[1]:].tolist()

    def alternate(measure, a, b, rounds: int) -> tuple[float, float]:
        """Median of each model's runs, taken turn about so that the machine's load drifts
        over both alike (one warm-up each first)."""
        measure(a), measure(b)
        runs_a, runs_b = [], []
        for _ in range(rounds):
            runs_a.append(measure(a))
            runs_b.append(measure(b))
        return statistics.median(runs_a), statistics.median(runs_b)

    w8a8 = load_model("bundled:smollm2-135m").model.eval()
    quantize(w8a8, "w8a8-rtn")
    enabled8 = enable_fast_path(w8a8)
    with torch.inference_mode():
        fp32_s, w8a8_s = alternate(prefill_once, fp32_model, w8a8, 7)
    fp32_prefill, w8a8_prefill = fp32_s * 1000, w8a8_s * 1000
    del w8a8

    w4 = load_model("bundled:smollm2-135m").model.eval()
    quantize(w4, "w4a16-rtn-g64")
    with torch.inference_mode():
        reference_tps, reference_tokens = decode_once(w4)  # fast paths off: the dequantize reference
        enabled4 = enable_fast_path(w4)
        _, w4_tokens = decode_once(w4)
        fp32_tps, w4_tps = alternate(lambda m: decode_once(m)[0], fp32_model, w4, 5)
    same = sum(a == b for a, b in zip(w4_tokens, reference_tokens))
    return [
        "| model step | fp32 | quantized (fast path) | ratio | target |",
        "|---|---|---|---|---|",
        f"| SmolLM2 prefill, 512 tokens, W8A8 ({enabled8} layers on the int8 path) | {fp32_prefill:.0f} ms | "
        f"{w8a8_prefill:.0f} ms | {fp32_prefill / w8a8_prefill:.2f}x | {TARGETS['prefill']} |",
        f"| SmolLM2 greedy decode, {new_tokens} tokens, W4 g64 ({enabled4} layers on the int4 kernel) | {fp32_tps:.1f} tok/s | "
        f"{w4_tps:.1f} tok/s (reference path {reference_tps:.1f}) | {w4_tps / fp32_tps:.2f}x | {TARGETS['decode']} |",
        "",
        f"W4 fast path's greedy tokens equal to the dequantize reference's: {same} of {new_tokens}",
    ]


GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): a 7B model's square, MLP up and down
GPU_BATCHES = [1, 16, 64]
GPU_TARGETS = "W4A16 ≥ 3.5x fp16 at batch 1 and ≥ 2.5x at 16; W8A8 int8 ≥ 1.6x fp16 at 64; SVDQuant W4A4 r32 ≥ 2x W4A16 at 64"


def gpu_layers(shape: tuple[int, int], device: str) -> dict:
    """One layer of each scheme with the same random weight, built by the project's own
    quantizers (on the CPU) and moved to `device`: what an artifact loads as."""
    from quantcore.modules import QuantizedLinear
    from quantcore.modules.low_rank import LowRankQuantizedLinear
    from quantcore.schemes import QuantScheme

    out_f, in_f = shape
    torch.manual_seed(SEED)
    linear = nn.Linear(in_f, out_f, bias=False)
    w4 = QuantScheme(type="int", bits=4, granularity="group", group_size=128 if in_f % 128 == 0 else 64)
    w8 = QuantScheme(type="int", bits=8, granularity="channel")
    a8 = QuantScheme(type="int", bits=8, granularity="token", dynamic=True)
    f8 = QuantScheme(type="fp8_e4m3", bits=8, granularity="channel")
    a8f = QuantScheme(type="fp8_e4m3", bits=8, granularity="token", dynamic=True)
    w4g64 = QuantScheme(type="int", bits=4, granularity="group", group_size=64)
    a4g64 = QuantScheme(type="int", bits=4, granularity="group", group_size=64, dynamic=True)
    svdq = LowRankQuantizedLinear(QuantizedLinear.from_float(linear, w4g64, a4g64), rank=32)
    svdq.lora_up.normal_(0, 0.02), svdq.lora_down.normal_(0, 0.02), svdq.smooth.uniform_(0.5, 1.5)  # timing only
    return {
        "fp16": linear.weight.detach().to(torch.float16).to(device),
        "w4a16": QuantizedLinear.from_float(linear, w4).to(device),
        "w8a8": QuantizedLinear.from_float(linear, w8, a8).to(device),
        "fp8": QuantizedLinear.from_float(linear, f8, a8f).to(device),
        "svdq": svdq.to(device),
    }


def gpu_rows(dry_run: bool = False) -> list[str]:
    """The Triton kernels against fp16 cuBLAS (F.linear) on a CUDA device. `dry_run`: the
    same code on small shapes through Triton's interpreter on the CPU (set TRITON_INTERPRET=1
    first), timed by the clock: checks this function, measures nothing."""
    if not dry_run and not torch.cuda.is_available():
        return ["No CUDA device in this run: the GPU figures (W4A16, W8A8 int8, fp8, SVDQuant W4A4 against fp16 "
                "cuBLAS) stay open."]
    from quantcore.kernels.fp8 import fp8_linear, fp8_supported
    from quantcore.kernels.w4a4_lowrank import lowrank_w4a4_linear
    from quantcore.kernels.w4a16 import w4a16_matmul
    from quantcore.kernels.w8a8 import w8a8_linear

    if dry_run:
        device, shapes, batches = "cpu", [(96, 256)], [1, 3]
        timer = lambda fn: median_ms(fn, 2)  # noqa: E731
        name = "CPU (Triton interpreter, dry run)"
    else:
        import triton.testing

        device, shapes, batches = "cuda", GPU_SHAPES, GPU_BATCHES
        timer = lambda fn: triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")  # noqa: E731
        name = torch.cuda.get_device_name()
    has_fp8 = fp8_supported(device)
    lines = [
        f"GPU: {name}; fp8: {has_fp8.reason}",
        "",
        "| linear (out x in) | batch | fp16 cuBLAS ms | W4A16 ms | W4A16 vs fp16 | W8A8 int8 ms | W8A8 vs fp16 | "
        "fp8 W8A8 ms | fp8 vs fp16 | SVDQuant W4A4 r32 ms | W4A4 vs W4A16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        layers = gpu_layers(shape, device)
        w16, q4, q8, f8, svdq = (layers[k] for k in ("fp16", "w4a16", "w8a8", "fp8", "svdq"))
        for batch in batches:
            x = torch.randn(batch, shape[1], device=device).to(torch.float16)
            with torch.inference_mode():
                fp16 = timer(lambda: F.linear(x, w16))
                t4 = timer(lambda: w4a16_matmul(x, q4.qweight, q4.scale, q4.zero_point))
                t8 = timer(lambda: w8a8_linear(x, q8.qweight, q8.scale))
                tf8 = timer(lambda: fp8_linear(x, f8.qweight, f8.scale)) if has_fp8 else float("nan")
                tsv = timer(lambda: lowrank_w4a4_linear(x, svdq))
            lines.append(
                f"| {shape[0]}x{shape[1]} | {batch} | {fp16:.4f} | {t4:.4f} | {fp16 / t4:.2f}x | {t8:.4f} | {fp16 / t8:.2f}x | "
                f"{tf8:.4f} | {fp16 / tf8:.2f}x | {tsv:.4f} | {t4 / tsv:.2f}x |"
            )
    lines += ["", f"targets: {GPU_TARGETS}"]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per layer measurement (median taken)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-model", action="store_true", help="layers only")
    parser.add_argument("--gpu-only", action="store_true", help="the GPU table only (a CUDA device)")
    parser.add_argument("--gpu-dry-run", action="store_true",
                        help="run the GPU table's code on tiny shapes through Triton's interpreter (measures nothing)")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--section", help="the RESULTS.md section to rewrite (default: the CPU one, or the GPU one with --gpu-only)")
    args = parser.parse_args()
    args.section = args.section or (
        "Kernels: Triton kernels against fp16 cuBLAS (GPU)" if args.gpu_only else "Kernels: quantized execution against fp32 (CPU)"
    )
    warnings.filterwarnings("ignore")
    from common import run_header, write_section

    from quantcore.kernels import cpu as cpu_kernels
    from quantcore.modules import cpu_paths

    if args.gpu_dry_run:
        print("\n".join(gpu_rows(dry_run=True)))
        return 0
    torch.manual_seed(SEED)
    engine = "onednn" if cpu_kernels.available() and cpu_paths.onednn_int8_available() else "fbgemm"
    header = run_header(SEED, vnni=cpu_paths.has_vnni(), amx_int8=cpu_paths.has_amx_int8(), int8_engine=engine,
                        int4_kernel=cpu_kernels.available())
    print("\n".join(header), flush=True)
    lines = [] if args.gpu_only else layer_rows(args.repeat)
    print("\n".join(lines), flush=True)
    if not args.skip_model and not args.gpu_only:
        lines += ["", *model_rows(args.repeat, args.new_tokens)]
    lines += ["", *gpu_rows()]
    table = "\n".join(lines)
    print("\n" + table)
    if args.results:
        write_section(args.results, args.section, header, table, " ".join(["python"] + sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
