"""Artifacts users deploy: per format, bytes on disk, load time and perplexity after reload.

For each preset a real qforge job (`quantcore.job.run_job`) quantizes SmolLM2-135M and writes
every requested format; then each artifact is reloaded in a fresh Python process by the
reader its users have, and the perplexity measured again on the DESIGN.md split:

    qforge               quantcore.export.load_quantized
    compressed-tensors   transformers' AutoModelForCausalLM.from_pretrained (decompressed by
                         the compressed-tensors library on the first forward, counted in load)
    gguf                 transformers' from_pretrained(gguf_file=...), which dequantizes the
                         GGUF blocks to float (llama.cpp is not on this machine)

Columns: the job's own perplexity, the reloaded one and their relative difference; the
artifact folder's bytes and its quantized linear layers' bytes against fp16; load seconds
(reading the files up to a model that has run one token); peak RSS of the reload process.

With `--llama-perplexity PATH` (llama.cpp's `llama-perplexity` program, built from source:
no wheel ships it) each GGUF file is also run by llama.cpp itself, on the same evaluation
text, beside the source model's own GGUF file. llama.cpp scores the second half of each
512-token window, so its figures compare with each other, not with the columns before.

    python bench/export.py [--presets w4a16-gptq-g64,w8a8-smoothquant] [--tokens 16384]
        [--llama-perplexity PATH] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SEED = 0
SMOLLM2 = "bundled:smollm2-135m"
FORMATS = ["qforge", "compressed-tensors", "gguf"]  # gguf: Q4_0 for 4-bit recipes, Q8_0 for 8-bit ones
# the export issue's targets, per format
TARGETS = {
    "compressed-tensors": "reload ppl within 0.5 % of the job's; linear bytes ≤ 0.30 × fp16 at W4 g64",
    "gguf Q8_0": "reload ppl within 1 % of fp32",
    "gguf Q4_0": "reported",
}


def quantize(preset: str, tokens: int, out: Path) -> dict:
    """Run the job in this process, keep its artifact folders under `out`."""
    from quantcore.job import EvaluationSpec, JobRequest, run_job

    request = JobRequest(model=SMOLLM2, recipe=preset, export=FORMATS, evaluation=EvaluationSpec(perplexity_tokens=tokens), seed=SEED)
    report = run_job(request, out)
    return {"report_perplexity": report["metrics"]["quantized"]["perplexity"],
            "baseline_perplexity": report["metrics"]["baseline"]["perplexity"],
            "quantize_s": report["timings"]["quantize_s"],
            "artifacts": report["artifacts"]}


def reload(fmt: str, location: str, tokens: int) -> dict:
    """Load one artifact as its users would, run one token, then measure perplexity."""
    import torch

    from quantcore.eval import evaluate_perplexity
    from quantcore.job import EvaluationSpec

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    path = Path(location)
    if fmt == "qforge":
        from quantcore.export import load_quantized

        loaded = load_quantized(path)
        model, tokenizer = loaded.model, loaded.tokenizer
    elif fmt == "compressed-tensors":
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:  # a .gguf file
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.no_grad():
        model(torch.tensor([[tokenizer.bos_token_id or 0]]))
    load_s = time.perf_counter() - start
    ppl = evaluate_perplexity(model, tokenizer, EvaluationSpec(perplexity_tokens=tokens))
    return {"load_s": load_s, "perplexity": ppl, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def evaluation_text(tokens: int, dest: Path) -> Path:
    """The DESIGN.md evaluation tokens (the first `tokens` of them), as text for llama.cpp."""
    from transformers import AutoTokenizer

    from quantcore.eval.data import split_tokens, tokenize_benchmark
    from quantcore.models import resolve_model_ref

    source = resolve_model_ref(SMOLLM2, allow_local_paths=False)
    tokenizer = AutoTokenizer.from_pretrained(str(source.path), gguf_file=source.gguf_file)
    evaluation = split_tokens(tokenize_benchmark(tokenizer))[1][:tokens]
    dest.write_text(tokenizer.decode(evaluation))
    return dest


def float_gguf(dest: Path) -> Path:
    """The float model (what every job starts from) exported by qforge as an F16 GGUF file:
    in llama.cpp it should score as the source file does, which checks the export itself."""
    from quantcore.export.gguf_export import export_gguf
    from quantcore.models import load_model

    loaded = load_model(SMOLLM2)
    export_gguf(loaded.model, loaded.tokenizer, dest, "F16", name="smollm2-135m (float)",
                source_gguf=loaded.ref.path / loaded.ref.gguf_file)
    return dest


def llama_cpp_perplexity(program: str, gguf_file: Path, text: Path) -> float:
    """llama.cpp's own perplexity of a GGUF file (512-token windows, 2 threads)."""
    import re

    run = subprocess.run([program, "-m", str(gguf_file), "-f", str(text), "-c", "512", "-b", "512", "-t", "2"],
                         capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
    if run.returncode != 0 or found is None:
        raise SystemExit(f"llama-perplexity failed on {gguf_file}:\n{(run.stdout + run.stderr)[-3000:]}")
    return float(found.group(1))


def _child(args: list[str], out: Path) -> dict:
    subprocess.run([sys.executable, __file__, *args, "--out", str(out)], check=True)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="w4a16-gptq-g64,w8a8-smoothquant")
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (DESIGN.md: 16384)")
    parser.add_argument("--results", type=Path, help="also write the table into this markdown file")
    parser.add_argument("--section", default="Export: artifacts reloaded by their readers")
    parser.add_argument("--llama-perplexity", help="llama.cpp's llama-perplexity program: also run each GGUF file there")
    parser.add_argument("--quantize", help=argparse.SUPPRESS)
    parser.add_argument("--reload", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quantize:
        args.out.write_text(json.dumps(quantize(args.quantize, args.tokens, args.out.parent / "job")))
        return 0
    if args.reload:
        args.out.write_text(json.dumps(reload(args.reload[0], args.reload[1], args.tokens)))
        return 0

    from common import run_header, write_section

    header = run_header(SEED, model=SMOLLM2, calibration="128 x 512 tokens", evaluation_tokens=args.tokens)
    print("\n".join(header), flush=True)
    rows: list[dict] = []
    llama_reference = llama_float = None
    if args.llama_perplexity:
        from quantcore.models import resolve_model_ref

        text = evaluation_text(args.tokens, Path(tempfile.mkdtemp()) / "evaluation.txt")
        source = resolve_model_ref(SMOLLM2, allow_local_paths=False)
        source_gguf = source.path / source.gguf_file
        llama_reference = llama_cpp_perplexity(args.llama_perplexity, source_gguf, text)
        print(f"llama.cpp perplexity of the source GGUF ({source_gguf.name}): {llama_reference:.3f}", flush=True)
        llama_float = llama_cpp_perplexity(args.llama_perplexity, float_gguf(text.parent / "float-F16.gguf"), text)
        print(f"llama.cpp perplexity of the float model exported by qforge as F16: {llama_float:.3f}", flush=True)
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            job = _child(["--quantize", preset, "--tokens", str(args.tokens)], Path(tmp) / "job.json")
            for artifact in job["artifacts"]:
                folder = Path(tmp) / "job" / artifact["folder"]
                fmt, location = artifact["format"], folder
                if "gguf" in artifact:
                    fmt, location = f"gguf {artifact['gguf']['type']}", folder / artifact["gguf"]["file"]
                measured = _child(["--reload", artifact["format"], str(location), "--tokens", str(args.tokens)],
                                  Path(tmp) / f"reload-{artifact['format']}.json")
                row = {"preset": preset, "format": fmt, "job": job, **measured,
                       "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
                       "linear_ratio": artifact["sizes"].get("linear", {}).get("ratio_to_float16"),
                       "requantized": len(artifact.get("gguf", {}).get("requantized_layers", []))}
                if llama_reference is not None and "gguf" in artifact:
                    row["llama_cpp"] = llama_cpp_perplexity(args.llama_perplexity, location, text)
                    row["llama_reference"] = llama_reference
                rows.append(row)
                print(f"{preset} {fmt}: job ppl {job['report_perplexity']:.3f}, reloaded {row['perplexity']:.3f}, "
                      f"load {row['load_s']:.1f} s, {row['bytes'] / 1e6:.1f} MB", flush=True)
                if args.results:  # after every row: an interrupted run keeps what it measured
                    write_section(args.results, args.section, header, _table(rows, llama_reference, llama_float),
                                  " ".join(["python"] + sys.argv))
    print("\n" + _table(rows, llama_reference, llama_float))
    return 0


def _table(rows: list[dict], llama_reference: float | None = None, llama_float: float | None = None) -> str:
    lines = []
    if rows:
        lines.append(f"SmolLM2-135M fp32 perplexity: {rows[0]['job']['baseline_perplexity']:.3f}")
    if llama_reference is not None:
        lines.append("")
        lines.append(f"llama.cpp perplexity of the source model's GGUF file (Q4_1, what qforge dequantizes to fp32): "
                     f"{llama_reference:.3f}; of that fp32 model exported by qforge as F16: {llama_float:.3f}")
    lines += [
        "",
        "| preset | format | job ppl | reloaded ppl | vs job | vs fp32 | artifact MB | linear bytes / fp16 | load s | reload peak RSS GB | llama.cpp ppl | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        job_ppl, fp32 = r["job"]["report_perplexity"], r["job"]["baseline_perplexity"]
        fmt = r["format"] + (f" ({r['requantized']} layers requantized)" if r.get("requantized") else "")
        ratio = "–" if r["linear_ratio"] is None else f"{r['linear_ratio']:.4f}"
        llama = f"{r['llama_cpp']:.3f}" if "llama_cpp" in r else "–"
        lines.append(
            f"| {r['preset']} | {fmt} | {job_ppl:.3f} | {r['perplexity']:.3f} | {(r['perplexity'] / job_ppl - 1) * 100:+.3f} % | "
            f"{(r['perplexity'] / fp32 - 1) * 100:+.2f} % | {r['bytes'] / 1e6:.1f} | {ratio} | {r['load_s']:.1f} | "
            f"{r['peak_rss'] / 1e9:.2f} | {llama} | {TARGETS.get(r['format'], '')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
