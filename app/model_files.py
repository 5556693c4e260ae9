"""What an uploaded model file is, found from its bytes (and, for pickles, also its name).

Accepted are formats that cannot run code when loaded: safetensors (a JSON header and raw
tensor data, with a config naming a classic architecture), GGUF (`app.gguf_files`), and a
Hugging Face folder of safetensors as a .tar, .tar.gz or .zip (`app.archives`,
`app.model_folders`). Refused as `unsafe-model-format` (415), and never opened beyond their
first bytes or their zip directory:

- files named like pickles (.pt, .pth, .bin, .pkl, .pickle, .ckpt), refused before upload;
- a pickle by content: protocol 2-5 pickles start 0x80 0x02..0x05 (the legacy, non-zip
  torch.save writes protocol 2);
- a zip holding `data.pkl` (any `*.pkl`): what torch.save writes since PyTorch 1.6;
- a torch.export program (.pt2, a zip with `<name>/archive_format` = "pt2"). The archive is
  recognised but not accepted: torch.export.load unpickles parts of it (its sample inputs
  always, some weights and constants too, retrying with weights_only=False when the safe
  unpickler fails), so it cannot be loaded without running a pickle.
Unknown bytes are `unsupported-model-format` (415); a safetensors file whose header does not
hold is `invalid-model` (422).
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from app import archives
from app.errors import Problem

PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"})
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
ACCEPTED = [
    "a Hugging Face model folder (config.json, *.safetensors, tokenizer files) as .tar, .tar.gz or .zip",
    "a .gguf file",
    "a .safetensors file with a form field config naming its (classic) architecture",
]
CONVERT = (
    "Convert it where you trust it: for a transformers model, model.save_pretrained(folder, "
    "safe_serialization=True) and upload the folder as a .tar.gz or .zip; for a classic model, "
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
    detail = f"{what}; qforge accepts {'; '.join(ACCEPTED)}. {CONVERT}"
    return Problem(415, "unsupported-model-format", "Unsupported model format", detail, accepted=ACCEPTED)


def invalid(what: str) -> Problem:
    return Problem(422, "invalid-model", "Invalid model file", what)


def check_filename(filename: str) -> None:
    """Refuse a pickle by its name, before any of it is received."""
    suffix = PurePosixPath(filename.lower()).suffix
    if suffix in PICKLE_SUFFIXES:
        raise unsafe(f"'{filename}' is a {suffix} file, a pickle (what torch.save writes)")


def is_pickle(head: bytes) -> bool:
    """Protocol 2-5 pickles start 0x80 0x02..0x05. So does a safetensors file whose header is
    640 to 1535 bytes long (its first 8 bytes are that length), but its 9th byte opens the JSON
    header, where a pickle's is part of a frame length or an opcode's argument."""
    return head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5 and head[8:9] != b"{"


def detect(path: Path) -> str:
    """'safetensors', 'gguf', 'zip', 'tar' or 'tar.gz' by the file's bytes, or a problem saying
    why it is refused."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if is_pickle(head):
        raise unsafe(f"the file is a pickle (protocol {head[1]}), as torch.save writes")
    if head.startswith(ZIP_MAGIC):
        _refuse_checkpoint_zip(path)
        return "zip"
    if head.startswith(b"GGUF"):
        return "gguf"
    if kind := archives.kind(head):
        return kind
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    header_bytes = int.from_bytes(head[:8], "little")
    if len(head) < 9 or head[8:9] != b"{" or not 2 <= header_bytes <= size - 8:
        raise unsupported("the file is not a safetensors file")
    return "safetensors"


def inspect(path: Path) -> SafetensorsSummary:
    """The tensors of a safetensors file, or a problem saying why the file is refused."""
    return read_safetensors(path)


def _refuse_checkpoint_zip(path: Path) -> None:
    """Refuse a zip that is a torch.save checkpoint or a torch.export program; any other zip
    may be a model folder, for `app.archives` to unpack."""
    archives.check_zip_entries(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            formats = [n for n in names if PurePosixPath(n).name == "archive_format"]
            is_pt2 = any(archive.getinfo(n).file_size <= 16 and archive.read(n).strip() == b"pt2" for n in formats)
    except (zipfile.BadZipFile, OSError) as exc:
        raise unsupported(f"the file starts like a zip archive but cannot be read as one ({exc})") from None
    if is_pt2:
        raise Problem(
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
        raise unsafe(f"the file is a zip holding '{pickled[0]}': a torch.save checkpoint, which is a pickle")


def read_safetensors(path: Path, name: str = "the file") -> SafetensorsSummary:
    from safetensors import SafetensorError, safe_open

    try:
        # Reads only the header (names, dtypes, shapes, offsets) and checks it covers the file.
        with safe_open(str(path), framework="numpy") as f:
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError) as exc:
        raise invalid(f"the safetensors header of {name} is not valid: {exc}") from None
    if not shapes:
        raise invalid(f"the safetensors file {name} holds no tensors")
    return SafetensorsSummary(shapes)
