"""What an uploaded model file is, found from its bytes (and, for pickles, also its name).

Only safetensors is accepted: a JSON header and raw tensor data, nothing that can run code
when loaded. Refused as `unsafe-model-format` (415), and never opened beyond their first
bytes or their zip directory:

- files named like pickles (.pt, .pth, .bin, .pkl, .pickle, .ckpt), refused before upload;
- a pickle by content: protocol 2-5 pickles start 0x80 0x02..0x05 (the legacy, non-zip
  torch.save writes protocol 2);
- a zip holding `data.pkl` (any `*.pkl`): what torch.save writes since PyTorch 1.6;
- a torch.export program (.pt2, a zip with `<name>/archive_format` = "pt2"). The archive is
  recognised but not accepted: torch.export.load unpickles parts of it (its sample inputs
  always, some weights and constants too, retrying with weights_only=False when the safe
  unpickler fails), so it cannot be loaded without running a pickle.
Anything else that is not safetensors (GGUF, other zips, unknown bytes) is
`unsupported-model-format` (415); a safetensors file whose header does not hold is
`invalid-model` (422).
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from app.errors import Problem

PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"})
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
ACCEPTED = ["a .safetensors file with a form field config naming its architecture"]
CONVERT = (
    "Convert it where you trust it: load the model in PyTorch, then "
    'from safetensors.torch import save_model; save_model(model, "model.safetensors"), and upload '
    'model.safetensors with a form field config such as {"architecture": "digits-cnn", "width": 16}.'
)


@dataclass(frozen=True)
class SafetensorsSummary:
    shapes: dict[str, list[int]]

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def parameters(self) -> int:
        """Elements over all tensors (buffers such as BatchNorm statistics included)."""
        return sum(math.prod(shape) for shape in self.shapes.values())


def unsafe(what: str) -> Problem:
    detail = f"{what}: loading it could run arbitrary code, so qforge never does. {CONVERT}"
    return Problem(415, "unsafe-model-format", "Unsafe model format", detail, accepted=ACCEPTED)


def unsupported(what: str) -> Problem:
    detail = f"{what}; qforge accepts {ACCEPTED[0]}. {CONVERT}"
    return Problem(415, "unsupported-model-format", "Unsupported model format", detail, accepted=ACCEPTED)


def invalid(what: str) -> Problem:
    return Problem(422, "invalid-model", "Invalid model file", what)


def check_filename(filename: str) -> None:
    """Refuse a pickle by its name, before any of it is received."""
    suffix = PurePosixPath(filename.lower()).suffix
    if suffix in PICKLE_SUFFIXES:
        raise unsafe(f"'{filename}' is a {suffix} file, a pickle (what torch.save writes)")


def inspect(path: Path) -> SafetensorsSummary:
    """The tensors of a safetensors file, or a problem saying why the file is refused."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        raise unsafe(f"the file is a pickle (protocol {head[1]}), as torch.save writes")
    if head.startswith(ZIP_MAGIC):
        raise _refuse_zip(path)
    if head.startswith(b"GGUF"):
        raise unsupported("the file is GGUF, which qforge does not accept yet")
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    header_bytes = int.from_bytes(head[:8], "little")
    if len(head) < 9 or head[8:9] != b"{" or not 2 <= header_bytes <= size - 8:
        raise unsupported("the file is not a safetensors file")
    return _read_safetensors(path)


def _refuse_zip(path: Path) -> Problem:
    """The problem for a zip upload: a torch.save checkpoint, a torch.export program, or neither."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            formats = [n for n in names if PurePosixPath(n).name == "archive_format"]
            is_pt2 = any(archive.getinfo(n).file_size <= 16 and archive.read(n).strip() == b"pt2" for n in formats)
    except (zipfile.BadZipFile, OSError) as exc:
        return unsupported(f"the file starts like a zip archive but cannot be read as one ({exc})")
    if is_pt2:
        return Problem(
            415,
            "unsafe-model-format",
            "Unsafe model format",
            "the file is a torch.export program (.pt2), which qforge does not accept yet: torch.export.load "
            "unpickles parts of the archive (its sample inputs always, some weights and constants too, retrying "
            "with weights_only=False when the safe unpickler fails), so it cannot be loaded without running a "
            f"pickle. Upload the weights instead. {CONVERT}",
            accepted=ACCEPTED,
        )
    if pickled := [n for n in names if n.endswith(".pkl")]:
        return unsafe(f"the file is a zip holding '{pickled[0]}': a torch.save checkpoint, which is a pickle")
    return unsupported("the file is a zip archive but neither a checkpoint nor a model qforge reads")


def _read_safetensors(path: Path) -> SafetensorsSummary:
    from safetensors import SafetensorError, safe_open

    try:
        # Reads only the header (names, dtypes, shapes, offsets) and checks it covers the file.
        with safe_open(str(path), framework="numpy") as f:
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise invalid(f"the safetensors header is not valid: {exc}") from None
    if not shapes:
        raise invalid("the safetensors file holds no tensors")
    return SafetensorsSummary(shapes)
