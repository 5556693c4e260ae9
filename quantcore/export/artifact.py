"""The qforge artifact: a folder that rebuilds the quantized model with no recipe re-run.

    model.safetensors    every tensor of the model; quantized Linears as packed codes
                         (`<layer>.qweight`), scales and zero points, the rest as saved
    config.json          the source model's transformers config
    quantization.json    format version, model class and, per quantized layer, its schemes
    recipe.json          the job request as run (model, recipe, calibration, evaluation, seed)
    report.json          metrics, sizes, timings, per-layer error, versions
    tokenizer files
    manifest.json        sha256 and size of every file above (written last)

`load_quantized(path)` checks the manifest, rebuilds the model skeleton from config.json,
swaps in `QuantizedLinear` modules as quantization.json says, and loads the tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import nn

from quantcore.modules.low_rank import LowRankQuantizedLinear
from quantcore.modules.quantized_linear import QuantizedLinear, enable_fast_path
from quantcore.schemes import QuantScheme
from quantcore.targets import set_module

FORMAT = "qforge"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
CHUNK = 1 << 20


class ArtifactError(ValueError):
    """An artifact folder is incomplete, corrupted or of an unknown format."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's quantized layers: QuantizedLinear, and LowRankQuantizedLinear counted as one
    layer (not also its residual)."""
    layers: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, LowRankQuantizedLinear)) and not any(name.startswith(p + ".") for p in layers):
            layers[name] = m
    return layers


def _quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def save_artifact(model: nn.Module, tokenizer: Any, folder: Path, kind: str, documents: dict[str, dict]) -> None:
    """Write weights, config, tokenizer, quantization map and the given JSON documents
    (e.g. {"recipe.json": ..., "report.json": ...}); call `write_manifest` when complete."""
    folder.mkdir(parents=True, exist_ok=True)
    st_save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    model.config.to_json_file(str(folder / "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    layers = {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "weight_scheme": m.weight_scheme.model_dump(mode="json"),
            "activation_scheme": m.activation_scheme.model_dump(mode="json") if m.activation_scheme else None,
            "scale_dtype": _dtype_name(m.scale_dtype),
        }
        for name, m in _quantized_linears(model).items()
    }
    low_rank = {
        name: {"rank": m.rank, "dtype": _dtype_name(m.lora_up.dtype)}
        for name, m in model.named_modules()
        if isinstance(m, LowRankQuantizedLinear)
    }
    write_json(
        folder / "quantization.json",
        {"format": FORMAT, "format_version": FORMAT_VERSION, "model_class": type(model).__name__, "kind": kind,
         "layers": layers, "low_rank": low_rank},
    )
    for name, document in documents.items():
        write_json(folder / name, document)


def write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


def write_manifest(folder: Path) -> dict:
    files = {
        p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files}
    write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def verify_manifest(folder: Path) -> None:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_FILE}: not a complete qforge artifact")
    for name, entry in json.loads(path.read_text())["files"].items():
        target = folder / name
        if not target.is_file():
            raise ArtifactError(f"artifact file '{name}' listed in the manifest is missing")
        if file_sha256(target) != entry["sha256"]:
            raise ArtifactError(f"artifact file '{name}' does not match its sha256 in the manifest (corrupted?)")


def tensor_bytes(weights_file: Path) -> dict[str, int]:
    """Bytes of each tensor as stored, read from the safetensors header (no tensor is loaded)."""
    with open(weights_file, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def archive_artifact(folder: Path, dest: Path) -> dict:
    """One uncompressed tar of the folder (weights do not compress), written atomically;
    returns its sha256 and size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    with tarfile.open(partial, "w") as tar:
        tar.add(folder, arcname=folder.name)
    digest = file_sha256(partial)
    os.replace(partial, dest)
    return {"sha256": digest, "bytes": dest.stat().st_size}


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------
@dataclass
class QuantizedModel:
    model: nn.Module
    tokenizer: Any
    kind: str
    quantization: dict
    report: dict | None
    path: Path


def _model_skeleton(folder: Path, quantization: dict) -> nn.Module:
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    cls = getattr(transformers, quantization["model_class"], None)
    if cls is None:
        raise ArtifactError(f"model class '{quantization['model_class']}' is not available in this transformers version")
    return cls(config)


def load_quantized(path: str | Path, verify: bool = True, fast_path: bool = True) -> QuantizedModel:
    """Rebuild the quantized model (eval mode, CPU) and its tokenizer from an artifact folder.
    `fast_path`: layers take the fastest CPU path that reproduces the reference's numbers
    (`quantcore.modules.enable_fast_path`); False keeps every layer on the reference."""
    folder = Path(path)
    if (folder / "quantization.json").is_file() is False:
        inner = [p for p in folder.iterdir() if (p / "quantization.json").is_file()] if folder.is_dir() else []
        if len(inner) != 1:
            raise ArtifactError(f"{folder} is not a qforge artifact folder (no quantization.json)")
        folder = inner[0]
    if verify:
        verify_manifest(folder)
    quantization = json.loads((folder / "quantization.json").read_text())
    if quantization.get("format") != FORMAT or quantization.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"unsupported artifact format {quantization.get('format')} v{quantization.get('format_version')}")
    model = _model_skeleton(folder, quantization)
    layers = quantization["layers"]
    for name, spec in quantization.get("low_rank", {}).items():
        residual = _empty_quantized_linear(layers[f"{name}.residual"])
        set_module(model, name, LowRankQuantizedLinear(residual, spec["rank"], getattr(torch, spec["dtype"])))
    for name, spec in layers.items():
        set_module(model, name, _empty_quantized_linear(spec))
    missing, unexpected = st_load_model(model, str(folder / WEIGHTS_FILE), strict=False)
    if unexpected or [k for k in missing if not _is_tied(model, k)]:
        raise ArtifactError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    if fast_path:
        enable_fast_path(model)
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    report_path = folder / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    return QuantizedModel(model, tokenizer, quantization["kind"], quantization, report, folder)


def _empty_quantized_linear(spec: dict) -> QuantizedLinear:
    act = spec["activation_scheme"]
    return QuantizedLinear(
        spec["in_features"],
        spec["out_features"],
        spec["bias"],
        QuantScheme.model_validate(spec["weight_scheme"]),
        QuantScheme.model_validate(act) if act else None,
        scale_dtype=getattr(torch, spec["scale_dtype"]),
    )


def _is_tied(model: nn.Module, key: str) -> bool:
    """True when `key` is a parameter that shares storage with another, loaded one."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return key in keys
