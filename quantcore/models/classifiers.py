"""Small classifiers (CNNs) for the classic PTQ / QAT jobs, and their array data.

A classifier is named like the LLMs:

    bundled:digits-cnn     the test-bed CNN, trained in the repo (`digits_cnn.py`)
    <folder>               model.safetensors + config.json {"architecture": <name>, **arguments}

Only architectures qforge knows can be built from a config (`ARCHITECTURES`): the weights
come from safetensors, which cannot run code, and the code comes from qforge, never from the
upload. Data are arrays: `bundled:digits` (DESIGN.md's split) or an .npz file holding `x`
(samples first) and optionally integer labels `y`, read with allow_pickle=False.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model
from torch import nn

from quantcore.models.digits_cnn import DigitsCNN, digits_split, pretrained_digits_cnn
from quantcore.models.refs import PICKLE_SUFFIXES, ModelNotFoundError, UnsafeModelError, UnsupportedModelError

ARCHITECTURES: dict[str, type[nn.Module]] = {"digits-cnn": DigitsCNN}
BUNDLED_CLASSIFIERS = ("bundled:digits-cnn",)
BUNDLED_DATA = ("bundled:digits",)


class DataError(ValueError):
    """Array data that cannot be used; the message says which file and what is wrong."""


@dataclass
class Arrays:
    x: torch.Tensor  # (N, ...) float32
    y: torch.Tensor | None  # (N,) int64 labels, or None


def load_classifier(ref: str, seed: int = 0, allow_local_paths: bool = True) -> nn.Module:
    if ref == "bundled:digits-cnn":
        model = pretrained_digits_cnn(seed)
        model.qforge_config = {"architecture": "digits-cnn"}  # what a fine-tuned copy's config.json says
        return model
    if ref.startswith("bundled:"):
        raise ModelNotFoundError(f"unknown bundled classifier '{ref}'; available: {', '.join(BUNDLED_CLASSIFIERS)}")
    if not allow_local_paths:
        raise ModelNotFoundError(f"'{ref}': name a bundled classifier ({', '.join(BUNDLED_CLASSIFIERS)}) or an uploaded model")
    folder = Path(ref).expanduser()
    if folder.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeModelError(f"'{ref}' is a pickle, which runs code when loaded: save the weights with "
                               "safetensors.torch.save_model(model, 'model.safetensors') and add a config.json")
    weights, config_file = folder / "model.safetensors", folder / "config.json"
    if not weights.is_file() or not config_file.is_file():
        raise ModelNotFoundError(f"'{ref}' must be a folder with model.safetensors and config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelNotFoundError(f"{config_file.name}: not valid JSON ({exc})") from None
    saved = dict(config) if isinstance(config, dict) else {}
    architecture = config.pop("architecture", None) if isinstance(config, dict) else None
    if architecture not in ARCHITECTURES:
        raise UnsupportedModelError(f"config.json: architecture {architecture!r} is not one qforge builds; "
                                    f"known: {', '.join(ARCHITECTURES)}")
    try:
        model = ARCHITECTURES[architecture](**config)
    except TypeError as exc:
        raise UnsupportedModelError(f"config.json: bad arguments for {architecture}: {exc}") from None
    try:
        load_model(model, str(weights), strict=True)
    except (RuntimeError, KeyError) as exc:
        raise UnsupportedModelError(f"model.safetensors does not fit {architecture} with this config: {exc}") from None
    model.qforge_config = saved
    return model.eval()


def load_arrays(ref: str, part: str = "train", seed: int = 0, allow_local_paths: bool = True) -> Arrays:
    """`part` ('train' or 'test') only matters for bundled data, which come split."""
    if ref == "bundled:digits":
        split = digits_split(seed)
        return Arrays(split.train_x, split.train_y) if part == "train" else Arrays(split.test_x, split.test_y)
    if ref.startswith("bundled:"):
        raise DataError(f"unknown bundled data '{ref}'; available: {', '.join(BUNDLED_DATA)}")
    if not allow_local_paths:
        raise DataError(f"'{ref}': name bundled data ({', '.join(BUNDLED_DATA)}) or an uploaded dataset")
    path = Path(ref).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.npz")) + sorted(path.glob("*.jsonl"))
        if len(found) != 1:
            raise DataError(f"'{ref}': expected one .npz or .jsonl file in the folder, found {len(found)}")
        path = found[0]
    if path.suffix == ".jsonl":
        return _jsonl_arrays(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:  # ValueError: an object array (a pickle inside)
        raise DataError(f"{path.name}: not a readable .npz of plain arrays ({exc})") from None
    return check_arrays(arrays, path.name)


def _jsonl_arrays(path: Path) -> Arrays:
    """One {"x": nested list of numbers, "y": optional label} per line."""
    xs, ys = [], []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                xs.append(np.asarray(record["x"], dtype=np.float32))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{path.name}, line {number}: not an object with a numeric 'x' ({exc})") from None
            if "y" in record:
                ys.append(record["y"])
    if not xs:
        raise DataError(f"{path.name}: no samples")
    if len({x.shape for x in xs}) != 1:
        raise DataError(f"{path.name}: every 'x' must have the same shape")
    if ys and len(ys) != len(xs):
        raise DataError(f"{path.name}: some lines have a label 'y' and others not")
    arrays = {"x": np.stack(xs)}
    if ys:
        try:
            arrays["y"] = np.asarray(ys, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise DataError(f"{path.name}: every 'y' must be an integer label") from None
    return check_arrays(arrays, path.name)


def check_arrays(arrays: dict[str, np.ndarray], where: str) -> Arrays:
    unknown = set(arrays) - {"x", "y"}
    if unknown:
        raise DataError(f"{where}: unexpected arrays {sorted(unknown)}; expected 'x' and optionally 'y'")
    if "x" not in arrays:
        raise DataError(f"{where}: no array 'x' (the samples, first dimension = sample)")
    x = arrays["x"]
    if x.dtype.kind not in "fiu" or x.ndim < 2 or len(x) == 0:
        raise DataError(f"{where}: 'x' must be a numeric array with samples first and at least 2 dimensions, got "
                        f"{x.dtype} {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"{where}: 'x' holds NaN or infinite values")
    y = arrays.get("y")
    if y is not None:
        if y.dtype.kind not in "iu" or y.shape != (len(x),):
            raise DataError(f"{where}: 'y' must be integer labels of shape ({len(x)},), got {y.dtype} {y.shape}")
        if (y < 0).any():
            raise DataError(f"{where}: 'y' labels must be non-negative class indices")
    return Arrays(torch.from_numpy(x.astype(np.float32)), None if y is None else torch.from_numpy(y.astype(np.int64)))


def check_fits(model: nn.Module, data: Arrays) -> int:
    """The number of classes the model outputs; raises DataError when the data do not fit it."""
    try:
        with torch.no_grad():
            out = model.eval()(data.x[:2])
    except RuntimeError as exc:
        raise DataError(f"the model cannot take samples of shape {tuple(data.x.shape[1:])}: {exc}") from None
    if out.dim() != 2:
        raise DataError(f"the model's output has shape {tuple(out.shape)}; a classifier gives (batch, classes)")
    classes = out.shape[1]
    if data.y is not None and int(data.y.max()) >= classes:
        raise DataError(f"label {int(data.y.max())} is out of range for a model with {classes} outputs")
    return classes
