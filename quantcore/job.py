"""One quantization job, start to finish, with no server: the unit the worker runs.

    load model → baseline evaluation → apply recipe stages → evaluate quantized →
    export artifact folder (with report.json and a sha256 manifest)

`run_job` reports progress through a callback `progress(stage, current, total, message)`;
the callback may raise `JobCancelled` to stop the job between steps (the service uses this
for cancellation). Everything the job writes goes under `output_dir`.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quantcore.recipe import Recipe

STAGES = ("load", "baseline", "quantize", "evaluate", "export")


class JobCancelled(Exception):
    """Raised from a progress callback to stop a job; the job leaves no artifact."""


class ProgressFn(Protocol):
    def __call__(self, stage: str, current: int, total: int, message: str = "") -> None: ...


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    dataset: Literal["pydoc-topics"] = "pydoc-topics"
    perplexity_tokens: int = Field(16384, ge=512, le=1_048_576, description="evaluation tokens for perplexity")
    window: int = Field(512, ge=16, le=8192, description="non-overlapping window length")
    embedding_paragraphs: int = Field(512, ge=1, le=100_000, description="paragraphs for encoder cosine")
    baseline: bool = Field(True, description="also evaluate the float model (cached per model and split)")


class CalibrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: Literal["pydoc-topics"] = "pydoc-topics"
    num_samples: int = Field(
        128, ge=1, le=4096, description="windows of seq_len tokens (an encoder: paragraphs holding as many tokens in all)"
    )
    seq_len: int = Field(512, ge=16, le=8192, description="tokens per window")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of calibration forwards; auto: bfloat16 where this machine runs it faster"
    )


ExportFormat = Literal["qforge", "compressed-tensors", "gguf", "gguf-q8_0", "gguf-q4_0", "gguf-f16", "gptq", "awq"]
PACKED_BITS = {"gptq": (2, 4, 8), "awq": (4,)}  # what quantcore.export.packed_checkpoints can pack


class JobRequest(BaseModel):
    """What a user submits: the model, the recipe, and how to calibrate and evaluate."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        max_length=4096,
        description="'bundled:<name>', 'upload:<id>' (the service's uploads), a hub id 'org/name' (local cache only), "
        "or a local path",
    )
    recipe: Recipe
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    export: list[ExportFormat] = Field(
        default_factory=lambda: ["qforge"],
        min_length=1,
        description="artifact formats to write, each a separate download; the first is the job's main artifact. "
        "qforge: reloads with quantcore.export.load_quantized; compressed-tensors: loads in vLLM and transformers; "
        "gguf-q8_0 / gguf-q4_0 / gguf-f16: llama.cpp (llama-architecture models), gguf: q4_0 for recipes of 4 bits "
        "or fewer, else q8_0; gptq / awq: those loaders' qweight/qzeros/scales layouts (weight-only)",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe_from_preset_or_text(cls, v: Any) -> Any:
        return Recipe.parse(v) if isinstance(v, str) else v

    @field_validator("export")
    @classmethod
    def _distinct_formats(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each export format may be listed once")
        return v

    @model_validator(mode="after")
    def _formats_can_hold_the_recipe(self) -> "JobRequest":
        # Refused at submission rather than after an hour of calibration.
        if len({fmt for fmt in self.export if fmt.startswith("gguf")}) > 1:
            raise ValueError("export: one GGUF type per job")
        for fmt in self.export:
            if fmt != "qforge" and any(stage.algorithm == "svdquant" for stage in self.recipe.stages):
                raise ValueError(f"export: {fmt} has no low-rank branch for svdquant's 16-bit L1·L2; use the qforge format")
            for stage in self.recipe.stages if fmt in PACKED_BITS else []:
                if stage.activations is not None:
                    raise ValueError(f"export: the {fmt} layout is weight-only; stage {stage.algorithm} quantizes activations")
                if stage.weights is not None and stage.weights.bits not in PACKED_BITS[fmt]:
                    raise ValueError(f"export: the {fmt} layout packs {PACKED_BITS[fmt]}-bit weights, not {stage.weights.bits}-bit")
        return self

    def gguf_type(self) -> str | None:
        """The GGUF tensor type the export asks for, if any."""
        for fmt in self.export:
            if fmt == "gguf":
                bits = [stage.weights.bits for stage in self.recipe.stages if stage.weights is not None]
                return "Q4_0" if bits and min(bits) <= 4 else "Q8_0"
            if fmt.startswith("gguf-"):
                return fmt.removeprefix("gguf-").upper()
        return None


def _noop_progress(stage: str, current: int, total: int, message: str = "") -> None:
    return None


def environment() -> dict[str, str]:
    """Library versions and machine, written into every report and benchmark."""
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("qforge", "transformers", "safetensors", "gguf", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    versions["machine"] = f"{platform.machine()}, {_cpu_name()}, {os.cpu_count()} cores"
    versions["threads"] = str(torch.get_num_threads())
    return versions


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def run_job(
    request: JobRequest,
    output_dir: Path,
    progress: ProgressFn | Callable[..., None] | None = None,
    allow_local_paths: bool = True,
    locate: Callable[[str], Path] | None = None,
) -> dict:
    """Run `request` and write the artifact folder to `output_dir / "artifact"`; return the report.

    A service passes `allow_local_paths=False` so a request cannot name files on the worker, and
    `locate` to find the folder of an 'upload:<id>' model."""
    from quantcore.job_pipeline import execute

    progress = progress or _noop_progress
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = execute(request, output_dir, progress, allow_local_paths, locate)
    report["timings"]["total_s"] = round(time.time() - started, 3)
    return report
