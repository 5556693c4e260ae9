"""The job pipeline: load → baseline → quantize (recipe stages) → evaluate → export.

Each step reports progress as (stage, current, total, message) and times itself; the
report gathers metrics, sizes measured from the written artifact, per-layer error, the
recipe as run and the library versions. The float baseline of a causal LM is cached per
model and evaluation split, since it never changes and costs as much as the quantized
evaluation.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantcore import registry
from quantcore.algorithms.base import LayerResult, StageContext
from quantcore.cache import cache_dir
from quantcore.eval.data import calibration_samples
from quantcore.eval import benchmark_paragraphs, embedding_cosine, evaluate_perplexity, sentence_embeddings
from quantcore.export.artifact import quantized_layers, save_artifact, tensor_bytes, write_json, write_manifest
from quantcore.export.model_card import model_card
from quantcore.job import JobRequest, environment
from quantcore.memory import spill_float_weights, trim_heap
from quantcore.targets import select_modules


class RecipeApplicationError(ValueError):
    """The recipe is valid but cannot be applied to this model (no layer matched, ...)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Clock:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[f"{name}_s"] = round(time.perf_counter() - start, 3)
        return result


def execute(request: JobRequest, output_dir: Path, progress, allow_local_paths: bool = True, locate=None) -> dict:
    from quantcore.models import load_model

    seed_everything(request.seed)
    clock = _Clock()

    progress("load", 0, 1, request.model)
    loaded = clock.run("load", load_model, request.model, allow_local_paths=allow_local_paths, locate=locate)
    model, tokenizer, kind = loaded.model, loaded.tokenizer, loaded.kind
    progress("load", 1, 1, f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")
    float_bytes = {dt_: sum(p.numel() for p in model.parameters()) * size for dt_, size in (("float32", 4), ("float16", 2))}

    evaluation = request.evaluation
    baseline: dict[str, Any] = {}
    reference_embeddings = None
    if evaluation.enabled:
        if kind == "causal_lm" and evaluation.baseline:
            baseline = clock.run("baseline", _baseline_perplexity, loaded, evaluation, progress)
        elif kind == "encoder":
            texts = benchmark_paragraphs(evaluation)
            reference_embeddings = clock.run(
                "baseline", sentence_embeddings, model, tokenizer, texts, lambda c, t: progress("baseline", c, t, "float embeddings")
            )
            baseline = {"embedding_cosine": 1.0, "paragraphs": len(texts)}

    layers: list[LayerResult] = clock.run(
        "quantize", _apply_recipe, model, tokenizer, request, progress, kind == "encoder", output_dir / "spill"
    )

    quantized: dict[str, Any] = {}
    if evaluation.enabled:
        progress("evaluate", 0, 1, "starting")  # the stage is visible before its first window
        if kind == "causal_lm":
            ppl = clock.run(
                "evaluate", evaluate_perplexity, model, tokenizer, evaluation, lambda c, t: progress("evaluate", c, t, "perplexity")
            )
            quantized = {"perplexity": ppl}
        else:
            texts = benchmark_paragraphs(evaluation)
            embeddings = clock.run(
                "evaluate", sentence_embeddings, model, tokenizer, texts, lambda c, t: progress("evaluate", c, t, "embeddings")
            )
            quantized = {"embedding_cosine": embedding_cosine(reference_embeddings, embeddings), "paragraphs": len(texts)}

    formats = request.export
    progress("export", 0, len(formats), "writing " + ", ".join(formats))
    report = {
        "format": "qforge-report/1",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "model": {"ref": request.model, "name": loaded.ref.name, "kind": kind, "class": type(model).__name__},
        "recipe": request.recipe.model_dump(mode="json"),
        "request": request.model_dump(mode="json"),
        "seed": request.seed,
        "metrics": {"baseline": baseline, "quantized": quantized, "delta": _delta(baseline, quantized)},
        # QuantizedLinear's reference path: the numbers describe the scheme, on any machine
        "evaluation_path": "reference",
        "layers": [layer.as_dict() for layer in layers],
        "timings": clock.timings,
        "versions": environment(),
        "artifacts": [],
    }
    start = time.perf_counter()
    folders = []
    for index, fmt in enumerate(formats):
        folder = output_dir / artifact_folder(fmt)
        if folder.exists():
            shutil.rmtree(folder)  # a retried job starts its export afresh
        entry: dict[str, Any] = {"format": fmt, "folder": folder.name}
        if fmt == "qforge":
            save_artifact(model, tokenizer, folder, kind, {"recipe.json": report["request"]})
        elif fmt == "compressed-tensors":
            from quantcore.export.compressed_tensors import export_compressed_tensors

            export_compressed_tensors(model, tokenizer, folder)
        elif fmt in ("gptq", "awq"):
            from quantcore.export.packed_checkpoints import export_packed_checkpoint

            export_packed_checkpoint(model, tokenizer, folder, fmt)
        else:
            from quantcore.export.gguf_export import export_gguf

            gguf_type = request.gguf_type()
            source_gguf = loaded.ref.path / loaded.ref.gguf_file if loaded.ref.gguf_file else None
            written = export_gguf(model, tokenizer, folder / f"{loaded.ref.name}-{gguf_type}.gguf".replace("/", "-"), gguf_type,
                                  name=f"{loaded.ref.name} ({request.recipe.name})", source_gguf=source_gguf)
            entry["gguf"] = written.as_dict()
        if fmt != "qforge":
            write_json(folder / "recipe.json", report["request"])
        entry["sizes"] = _sizes(folder, model, float_bytes) if any(folder.glob("*.safetensors")) else _file_sizes(folder)
        report["artifacts"].append(entry)
        folders.append(folder)
        progress("export", index + 1, len(formats), f"{fmt} written")
    # the main artifact's, or the first that stores linear layers as tensors (not GGUF blocks)
    report["sizes"] = next((a["sizes"] for a in report["artifacts"] if "linear" in a["sizes"]), report["artifacts"][0]["sizes"])
    report["timings"]["export_s"] = round(time.perf_counter() - start, 3)
    for folder, entry in zip(folders, report["artifacts"]):  # each carries the whole report, a card, then its manifest
        write_json(folder / "report.json", report)
        gguf_file = entry.get("gguf", {}).get("file", "")
        (folder / "README.md").write_text(model_card(report, entry["format"], folder.name, gguf_file))
        write_manifest(folder)
    return report


def artifact_folder(fmt: str) -> str:
    """The folder, inside a job's output_dir, that holds its artifact in format `fmt`."""
    return "artifact" if fmt == "qforge" else f"artifact-{fmt.split('-')[0] if fmt.startswith('gguf') else fmt}"


def _file_sizes(folder: Path) -> dict:
    return {"artifact_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())}


def _apply_recipe(
    model, tokenizer, request: JobRequest, progress, encoder: bool = False, spill_dir: Path | None = None
) -> list[LayerResult]:
    results: list[LayerResult] = []
    calibration = None
    for index, stage in enumerate(request.recipe.stages):
        algorithm = registry.get(stage.algorithm)
        label = f"stage {index + 1}/{len(request.recipe.stages)} {stage.algorithm}"
        progress("quantize", 0, 1, f"{label}: starting")  # the stage is visible before its first layer
        if algorithm.requires_calibration and calibration is None:
            spec = request.calibration
            calibration = calibration_samples(tokenizer, spec.num_samples, spec.seq_len, encoder=encoder)
        context = StageContext(
            progress=lambda c, t, m="": progress("quantize", c, t, f"{label}: {m}"),
            calibration=calibration if algorithm.requires_calibration else None,
            seed=request.seed,
            compute_dtype=request.calibration.compute_dtype,
            release_memory=True,
            spill_dir=spill_dir / f"stage{index + 1}" if spill_dir is not None else None,
        )
        if not select_modules(model, stage.targets, stage.ignore):
            raise RecipeApplicationError(
                f"stages[{index}] ({stage.algorithm}) matched no module: targets {stage.targets}, ignore {stage.ignore}"
                + (" (earlier stages already quantized them)" if index else "")
            )
        results.extend(algorithm.apply(model, stage, context))
        trim_heap()  # the stage's calibration activations are gone: give their memory back
        if spill_dir is not None and index + 1 < len(request.recipe.stages):
            # a transforming stage (smoothing, AWQ scales) rewrote float weights into anonymous
            # memory: map them from disk so the next stage holds one block of them at a time
            spill_float_weights(model, spill_dir / f"stage{index + 1}.pt")
    return results


def _baseline_perplexity(loaded, evaluation, progress) -> dict:
    """Float perplexity, from the cache when this model and split were evaluated before."""
    key_source = json.dumps(
        {"ref": loaded.ref.ref, "path": str(loaded.ref.path), "mtime": _mtime(loaded.ref.path),
         "eval": evaluation.model_dump(mode="json"), "torch": torch.__version__},
        sort_keys=True,
    )
    path = cache_dir() / "baselines" / (hashlib.sha256(key_source.encode()).hexdigest()[:24] + ".json")
    if path.is_file():
        cached = json.loads(path.read_text())
        progress("baseline", 1, 1, "float perplexity (cached)")
        return {**cached, "cached": True}
    ppl = evaluate_perplexity(
        loaded.model, loaded.tokenizer, evaluation, lambda c, t: progress("baseline", c, t, "float perplexity")
    )
    result = {"perplexity": ppl}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return {**result, "cached": False}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _delta(baseline: dict, quantized: dict) -> dict:
    out = {}
    if "perplexity" in baseline and "perplexity" in quantized:
        out["perplexity_increase_pct"] = round(100 * (quantized["perplexity"] / baseline["perplexity"] - 1), 4)
    if "embedding_cosine" in quantized:
        out["embedding_cosine_loss"] = round(1 - quantized["embedding_cosine"], 6)
    return out


def _sizes(folder: Path, model, float_bytes: dict[str, int]) -> dict:
    """Parameter bytes as stored in the artifact, linear layers apart from the rest."""
    stored = {k: b for weights in sorted(folder.glob("*.safetensors")) for k, b in tensor_bytes(weights).items()}
    layers = quantized_layers(model)
    prefixes = tuple(f"{name}." for name in layers)
    linear_stored = sum(b for k, b in stored.items() if k.startswith(prefixes))
    linear_fp16 = sum(m.in_features * m.out_features * 2 + (m.out_features * 2 if m.bias is not None else 0) for m in layers.values())
    total = sum(stored.values())
    return {
        "float32_parameter_bytes": float_bytes["float32"],
        "float16_parameter_bytes": float_bytes["float16"],
        "artifact_parameter_bytes": total,
        "compression_vs_float32": round(float_bytes["float32"] / total, 4),
        "linear": {
            "layers": len(layers),
            "float16_bytes": linear_fp16,
            "quantized_bytes": linear_stored,
            "ratio_to_float16": round(linear_stored / linear_fp16, 4) if linear_fp16 else None,
        },
    }
