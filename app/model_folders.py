"""What an uploaded Hugging Face model folder (unpacked by `app.archives`) must be before it is
stored: config.json, weights only in safetensors, a tokenizer, an architecture transformers
implements itself. Nothing in it ever runs:

- pickles (pytorch_model.bin, *.pt, ...) are refused by name as they are unpacked, and any
  member that starts like a pickle or a zip (what torch.save writes) by its first bytes;
- Python files are refused, and so is a config naming code to run (`auto_map`): transformers
  would only run it with trust_remote_code, which qforge never sets, so such a model could
  never load; saying so now beats a failed job;
- every safetensors header is read and must cover its file (a truncated file is 422).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from app.errors import Problem
from app.model_files import PICKLE_SUFFIXES, ZIP_MAGIC, invalid, is_pickle, read_safetensors, unsafe, unsupported

# numpy's formats can hold pickles, joblib is one
REFUSED_SUFFIXES = PICKLE_SUFFIXES | {".npy", ".npz", ".joblib"}
CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".sh", ".exe"})
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
MAX_CONFIG_BYTES = 2**20
IGNORED_AT_TOP = ("__MACOSX", ".DS_Store")  # what macOS's archiver adds beside the folder


@dataclass(frozen=True)
class FolderSummary:
    config: dict[str, Any]
    architecture: str
    tensors: int
    parameters: int


def remote_code(what: str) -> Problem:
    detail = (f"{what}: qforge never runs code from an upload (transformers loads with trust_remote_code=False), "
              "so only architectures transformers implements itself are accepted; remove the code and auto_map, "
              "or upload a model of a built-in architecture")
    return Problem(422, "remote-code-refused", "Model needs remote code", detail)


def check_member(name: str, relative: PurePosixPath, head: bytes | None = None) -> None:
    """Refuse an archive member by its name (head None), then by its first bytes."""
    suffix = relative.suffix.lower()
    if head is None:
        if suffix in REFUSED_SUFFIXES:
            raise unsafe(f"the archive holds '{name[:200]}', a {suffix} file (a pickle, as torch.save writes)")
        if suffix in CODE_SUFFIXES:
            raise remote_code(f"the archive holds '{name[:200]}', executable code")
        return
    if is_pickle(head):
        raise unsafe(f"the archive member '{name[:200]}' is a pickle (protocol {head[1]}) whatever its name")
    if head.startswith(ZIP_MAGIC):
        raise unsafe(f"the archive member '{name[:200]}' is a zip archive (torch.save writes zips of pickles)")


def find_root(dest: Path, archive_kind: str) -> Path:
    """The folder holding config.json: the archive's top, or its one top folder (as `tar czf
    model.tar.gz my-model/` makes)."""
    if (dest / "config.json").is_file():
        return dest
    top = [p for p in dest.iterdir() if p.name not in IGNORED_AT_TOP]
    if len(top) == 1 and top[0].is_dir() and (top[0] / "config.json").is_file():
        return top[0]
    raise unsupported(f"the file is a {archive_kind} archive without a Hugging Face model folder "
                      "(config.json at its top, or in its one top folder)")


def inspect(root: Path) -> FolderSummary:
    """Check the unpacked folder `root`; a problem says why it is refused."""
    config = _read_config(root / "config.json")
    for name in REMOTE_CODE_FILES:
        if (root / name).is_file() and "auto_map" in _read_json(root / name):
            raise remote_code(f"{name} has an auto_map naming Python classes to run")
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise invalid("the folder holds no *.safetensors weights beside config.json (pickled weights are refused)")
    shapes: dict[str, list[int]] = {}
    for path in weights:
        shapes |= {f"{path.name}:{k}": v for k, v in read_safetensors(path, path.name).shapes.items()}
    _check_index(root)
    check_with_transformers(root)
    architectures = config.get("architectures") or [config.get("model_type")]
    return FolderSummary(config, str(architectures[0])[:64], len(shapes), sum(math.prod(s) for s in shapes.values()))


def _read_json(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise invalid(f"{path.name} is larger than {MAX_CONFIG_BYTES:,} bytes")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid(f"{path.name} is not a JSON object")
    return data


def _read_config(path: Path) -> dict[str, Any]:
    config = _read_json(path)
    if not isinstance(config.get("model_type"), str):
        raise invalid("config.json names no model_type")
    return config


def _check_index(root: Path) -> None:
    """A sharded checkpoint's index must name only shards that are there."""
    index = root / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise invalid("model.safetensors.index.json has no weight_map")
    for shard in sorted(set(map(str, weight_map.values()))):
        if "/" in shard or "\\" in shard or not (root / shard).is_file():
            raise invalid(f"model.safetensors.index.json names '{shard[:200]}', which is not in the folder")


def check_with_transformers(folder: Path) -> str:
    """Config and tokenizer read by transformers, as the worker will (no weights); the model's kind."""
    from quantcore.models import ModelNotFoundError, UnsupportedModelError
    from quantcore.models.loading import check_loadable

    try:
        return check_loadable(folder)[1]
    except UnsupportedModelError as exc:
        raise Problem(422, "unsupported-architecture", "Unsupported architecture", str(exc)) from None
    except ModelNotFoundError as exc:
        raise invalid(str(exc).replace(str(folder), "the upload")) from None
    except Exception as exc:  # hostile metadata can break a parser anywhere; it is the file's fault
        raise invalid(f"transformers cannot read it: {type(exc).__name__}: {str(exc)[:500]}") from None
