"""What an uploaded dataset holds, found from its bytes (not its name) and checked without
trusting it. Two formats:

- `.npz` (numpy.savez): an array `x` (numeric, samples first, at least 2 dimensions, finite)
  and optionally `y` (integer labels 0 or more, one per sample). Read with
  allow_pickle=False: an object array is refused, never unpickled.
- `.jsonl`: one JSON object per line, all of one kind: {"x": nested list of numbers, "y": label}
  (y optional, every x the same shape) or {"text": "..."} (text calibration data).

Each refusal is a 422 `invalid-dataset` problem naming the array, sample or line at fault.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import Problem
from app.models import DatasetFormat, DatasetKind
from app.upload_stream import too_large

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
BOM = b"\xef\xbb\xbf"
ACCEPTED = (
    "accepted: .npz (numpy.savez(path, x=x, y=y): samples x and optional integer labels y) or "
    '.jsonl (one JSON object per line: {"x": [...], "y": 3} or {"text": "..."})'
)
CHUNK_SAMPLES = 4096  # samples checked for NaN at once, to bound the temporary mask


@dataclass(frozen=True)
class DatasetSummary:
    format: DatasetFormat
    kind: DatasetKind
    samples: int
    x_shape: list[int] | None  # one sample's shape; None for text
    has_labels: bool
    classes: int | None  # distinct labels; None without labels


def invalid(detail: str, **extra: Any) -> Problem:
    return Problem(422, "invalid-dataset", "Invalid dataset", detail, **extra)


def inspect(path: Path, max_samples: int, max_bytes: int) -> DatasetSummary:
    """The summary of a dataset file, or a problem saying why it is not one."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        raise invalid("the file is empty")
    if head.startswith(ZIP_MAGIC):
        return inspect_npz(path, max_samples, max_bytes)
    text = head.removeprefix(BOM).lstrip()
    if text.startswith(b"{"):
        return inspect_jsonl(path, max_samples)
    if text.startswith(b"["):
        what = "a JSON array, not JSON Lines: write one object per line instead"
    elif head.startswith(b"\x93NUMPY"):
        what = "a single .npy array: save x and y together with numpy.savez"
    elif head[:1] == b"\x80" and 2 <= head[1] <= 5:
        what = "a pickle, which qforge never loads (it could run code)"
    else:
        what = "neither an .npz archive nor JSON Lines"
    detail = f"the file is {what}; {ACCEPTED}"
    raise Problem(415, "unsupported-dataset-format", "Unsupported dataset format", detail)


def inspect_npz(path: Path, max_samples: int, max_bytes: int) -> DatasetSummary:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except zipfile.BadZipFile as exc:
        raise invalid(f"not a readable .npz (zip) archive: {exc}") from None
    keys = set()
    for entry in entries:
        key = entry.filename.removesuffix(".npy")
        if key == entry.filename:
            raise invalid(f"'{entry.filename}' is not an array: an .npz made by numpy.savez holds only .npy entries")
        if key not in ("x", "y"):
            raise invalid(f"unexpected array '{key}': a dataset holds x (the samples) and optionally y (labels)")
        keys.add(key)
    if "x" not in keys:
        raise invalid("no array 'x': save the samples as x, e.g. numpy.savez(path, x=x, y=y)")
    # Each entry's unpacked size, as declared, bounds what zipfile will inflate: no zip bombs.
    if sum(entry.file_size for entry in entries) > max_bytes:
        raise too_large(max_bytes, "the .npz unpacked")
    with np.load(path, allow_pickle=False) as npz:
        x = _load(npz, "x")
        y = _load(npz, "y") if "y" in keys else None
    n = _check_x(x, max_samples)
    classes = _check_y(y, n) if y is not None else None
    return DatasetSummary(DatasetFormat.NPZ, DatasetKind.ARRAYS, n, list(x.shape[1:]), y is not None, classes)


def _load(npz, key: str) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise invalid(
                f"array '{key}' holds Python objects (dtype object), which numpy stores as pickles; "
                "they are never loaded (allow_pickle=False): save a numeric array instead"
            ) from None
        raise invalid(f"array '{key}' cannot be read: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise invalid(f"array '{key}' cannot be read: {exc}") from None


def _check_x(x: np.ndarray, max_samples: int) -> int:
    if x.dtype.kind not in "iuf":
        raise invalid(f"x must hold numbers (integer or float), got dtype {x.dtype}")
    if x.ndim < 2:
        raise invalid(f"x must have at least 2 dimensions (samples first, then one sample's shape); got {x.shape}")
    n = len(x)
    if n == 0 or x.size == 0:
        raise invalid(f"x holds no values (shape {x.shape})")
    if n > max_samples:
        raise invalid(f"x holds {n:,} samples; the limit is {max_samples:,} (QFORGE_MAX_DATASET_SAMPLES)")
    if x.dtype.kind == "f":
        flat = x.reshape(n, -1)
        for start in range(0, n, CHUNK_SAMPLES):
            bad = ~np.isfinite(flat[start : start + CHUNK_SAMPLES]).all(axis=1)
            if bad.any():
                first = start + int(bad.argmax())
                raise invalid(f"x holds non-finite values (NaN or infinity), first in sample {first}")
    return n


def _check_y(y: np.ndarray, n: int) -> int:
    if y.dtype.kind not in "iu":
        raise invalid(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.ndim != 1:
        raise invalid(f"y must have one label per sample, shape ({n},); got {y.shape}")
    if len(y) != n:
        raise invalid(f"y has {len(y)} labels but x has {n} samples")
    if (y < 0).any():
        i = int(y.argmin())
        raise invalid(f"labels must be 0 or more; y holds {y[i]} (sample {i})")
    return int(np.unique(y).size)


def inspect_jsonl(path: Path, max_samples: int) -> DatasetSummary:
    kind: DatasetKind | None = None
    first = 0  # the line that set the kind, shape and labelling
    shape: tuple[int, ...] | None = None
    labelled: bool | None = None
    labels: set[int] = set()
    samples = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines (a trailing newline) are no samples

            def bad(msg: str, lineno: int = lineno) -> Problem:
                return invalid(f"line {lineno}: {msg}", line=lineno)

            sample = _parse_line(raw.removeprefix(BOM) if lineno == 1 else raw, bad)
            line_kind = DatasetKind.TEXT if "text" in sample else DatasetKind.ARRAYS
            if kind is None:
                kind, first = line_kind, lineno
            elif line_kind != kind:
                shown = {DatasetKind.TEXT: '{"text": ...}', DatasetKind.ARRAYS: '{"x": ...}'}
                raise bad(f"a {shown[line_kind]} sample, but line {first} is {shown[kind]}; a dataset holds one kind")
            samples += 1
            if samples > max_samples:
                raise bad(f"more than {max_samples:,} samples (QFORGE_MAX_DATASET_SAMPLES)")
            if kind is DatasetKind.TEXT:
                continue
            x_shape = _sample_shape(sample["x"], bad)
            if shape is None:
                shape = x_shape
            elif x_shape != shape:
                raise bad(f"x has shape {list(x_shape)} but line {first}'s has {list(shape)}; all must be the same")
            if labelled is None:
                labelled = "y" in sample
            elif labelled != ("y" in sample):
                has = "has no label y, but line {} has one" if labelled else "has a label y, but line {} has none"
                raise bad(has.format(first))
            if labelled:
                labels.add(sample["y"])
    if kind is None:
        raise invalid("the file holds no samples")
    if kind is DatasetKind.TEXT:
        return DatasetSummary(DatasetFormat.JSONL, kind, samples, None, False, None)
    return DatasetSummary(
        DatasetFormat.JSONL, kind, samples, list(shape or ()), bool(labelled), len(labels) if labelled else None
    )


def _parse_line(raw: bytes, bad) -> dict[str, Any]:
    """One line as a sample: {"text": str} or {"x": ..., "y"?: int}; its x is checked by _sample_shape."""
    try:
        sample = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise bad(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(sample, dict) or not ("text" in sample or "x" in sample):
        raise bad('expected a JSON object {"x": [...], "y": <label>} or {"text": "..."}')
    allowed = {"text"} if "text" in sample else {"x", "y"}
    if extra := sorted(set(sample) - allowed):
        raise bad(f"unexpected key '{extra[0]}' (a sample holds {' and '.join(sorted(allowed))})")
    if "text" in sample and not isinstance(sample["text"], str):
        raise bad("text must be a string")
    y = sample.get("y", 0)
    if not isinstance(y, int) or isinstance(y, bool) or y < 0:
        raise bad(f"y must be an integer class label, 0 or more; got {json.dumps(y)}")
    return sample


def _sample_shape(x: Any, bad) -> tuple[int, ...]:
    try:
        values = np.array(x)
    except (ValueError, TypeError, OverflowError):  # ragged rows, huge integers
        values = None
    if values is None or values.dtype.kind not in "iuf" or values.ndim == 0:
        raise bad("x must be a (nested) list of numbers, every row the same length")
    if values.size == 0:
        raise bad("x is empty")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise bad("x holds a non-finite value (NaN or infinity)")
    return values.shape
