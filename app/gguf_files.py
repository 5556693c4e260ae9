"""Checking an uploaded GGUF file before anything else reads it.

The `gguf` package's reader (which transformers uses) trusts the header: an array that claims
2^60 items past the end of the file makes it loop on empty reads forever, and tensor offsets
are never compared with the file's size. So the header is walked here first, every count and
length held against the bytes that remain, and every tensor's data must lie inside the file
without overlapping another's (overlaps would let a small file describe many large tensors,
each dequantized in full by the loader). Only then do the reader and transformers see it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from app.errors import Problem

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_TENSORS = 1 << 16  # large MoE checkpoints hold a few thousand
MAX_KV = 1 << 16
MAX_KEY = 1024
MAX_STRING = 16 * 2**20  # chat templates are kilobytes; this is far beyond any real value
MAX_ARRAY = 1 << 24  # vocabularies are at most a few hundred thousand tokens
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# value type -> struct format of a scalar; 8 is a string, 9 an array
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
KEPT_IN_CONFIG = 200
SEQ2SEQ = {"t5", "umt5"}  # transformers reads them, but recipe jobs quantize causal LMs and encoders  # scalar metadata fields shown as the upload's config


def invalid(what: str) -> Problem:
    return Problem(422, "invalid-model", "Invalid model file", f"the GGUF file is not valid: {what}")


@dataclass
class GGUFSummary:
    architecture: str
    tensors: int
    parameters: int
    has_tokenizer: bool
    metadata: dict[str, Any] = field(default_factory=dict)  # scalar fields, tokenizer.* left out


class _Reader:
    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size, self.offset = f, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.offset:
            raise invalid(f"{what} needs {n:,} bytes at offset {self.offset:,}, past the end of the file ({self.size:,} bytes)")
        data = self.f.read(n)
        self.offset += n
        return data

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        length = self.scalar("<Q", what)
        if length > limit:
            raise invalid(f"{what} claims {length:,} bytes (at most {limit:,})")
        return self.take(length, what).decode("utf-8", "replace")

    def value(self, kind: int, what: str, nested: bool = False):
        if kind in SCALARS:
            return self.scalar(SCALARS[kind], what)
        if kind == STRING:
            return self.string(what)
        if kind == ARRAY and not nested:
            item = self.scalar("<I", what)
            count = self.scalar("<Q", what)
            smallest = 8 if item == STRING else struct.calcsize(SCALARS.get(item, "<B"))
            if item not in SCALARS and item != STRING:
                raise invalid(f"{what} is an array of type {item}, which GGUF does not define (or an array of arrays)")
            if count > MAX_ARRAY or count * smallest > self.size - self.offset:
                raise invalid(f"{what} claims {count:,} items, more than the file can hold")
            values = [self.value(item, what, nested=True) for _ in range(count)]
            return None if len(values) > 64 else values  # long arrays (vocabularies) are checked, not kept
        raise invalid(f"{what} has value type {kind}, which GGUF does not define")


def inspect(path: Path) -> GGUFSummary:
    """Walk the header and check every tensor lies inside the file; a problem says why the
    file is refused. (Whether transformers can build the model is checked after this.)"""
    size = path.stat().st_size
    with open(path, "rb") as f:
        summary = _walk(_Reader(f, size))
    if not summary.tensors:
        raise invalid("it holds no tensors")
    if not summary.has_tokenizer:
        raise invalid("it holds no tokenizer (tokenizer.ggml.model), which jobs need to calibrate and evaluate")
    _check_architecture(summary.architecture)
    return summary


def _check_architecture(architecture: str) -> None:
    """transformers must implement the architecture. Its own check (reading the file with the
    gguf package) takes seconds per 50k-token vocabulary, so the names are compared here; the
    worker loads the file the way transformers does."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # spelled differently in llama.cpp and transformers (as transformers maps them on load)
    name = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}.get(
        architecture, architecture)
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"} - SEQ2SEQ)
    if name not in supported:
        detail = (f"the GGUF file's architecture '{architecture[:64]}' is not one transformers reads as a causal "
                  f"language model; supported: {', '.join(supported)}")
        raise Problem(422, "unsupported-architecture", "Unsupported architecture", detail)


def _walk(r: _Reader) -> GGUFSummary:
    if r.take(4, "the magic") != MAGIC:
        raise invalid("it does not start with 'GGUF'")
    version = r.scalar("<I", "the version")
    if version not in VERSIONS:
        raise invalid(f"version {version} (big-endian files read as a huge number); qforge reads versions 2 and 3")
    tensor_count = r.scalar("<Q", "the tensor count")
    kv_count = r.scalar("<Q", "the metadata count")
    if tensor_count > MAX_TENSORS or kv_count > MAX_KV:
        raise invalid(f"the header claims {tensor_count:,} tensors and {kv_count:,} metadata fields "
                      f"(at most {MAX_TENSORS:,} and {MAX_KV:,})")
    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        key = r.string(f"metadata key {index}", MAX_KEY)
        if key in metadata:
            raise invalid(f"metadata key '{key[:200]}' appears twice")
        metadata[key] = r.value(r.scalar("<I", f"the type of '{key[:200]}'"), f"metadata '{key[:200]}'")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise invalid(f"general.alignment {alignment!r} is not a power of two")
    tensors = [_tensor_info(r, index) for index in range(tensor_count)]
    data_start = -(-r.offset // alignment) * alignment
    parameters = _check_tensor_data(tensors, data_start, alignment, r.size)
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise invalid("it names no general.architecture")
    shown = {k: v for k, v in metadata.items() if not k.startswith("tokenizer.") and v is not None}
    kept = dict(list(shown.items())[:KEPT_IN_CONFIG])
    has_tokenizer = isinstance(metadata.get("tokenizer.ggml.model"), str)
    return GGUFSummary(architecture[:64], len(tensors), parameters, has_tokenizer, kept)


def _tensor_info(r: _Reader, index: int) -> tuple[str, list[int], int, int]:
    name = r.string(f"the name of tensor {index}", MAX_KEY)
    n_dims = r.scalar("<I", f"the dimensions of '{name[:200]}'")
    if not 1 <= n_dims <= MAX_DIMS:
        raise invalid(f"tensor '{name[:200]}' has {n_dims} dimensions (1 to {MAX_DIMS})")
    dims = [r.scalar("<Q", f"the shape of '{name[:200]}'") for _ in range(n_dims)]
    ggml_type = r.scalar("<I", f"the type of '{name[:200]}'")
    offset = r.scalar("<Q", f"the offset of '{name[:200]}'")
    return name, dims, ggml_type, offset


def _check_tensor_data(tensors: list[tuple[str, list[int], int, int]], data_start: int, alignment: int, size: int) -> int:
    """Every tensor's bytes inside the file, aligned, and apart from the others; the parameter count."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    spans, names, parameters = [], set(), 0
    for name, dims, ggml_type, offset in tensors:
        if name in names:
            raise invalid(f"tensor '{name[:200]}' appears twice")
        names.add(name)
        try:
            block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise invalid(f"tensor '{name[:200]}' has type {ggml_type}, which GGML does not define") from None
        elements = 1
        for d in dims:
            elements *= d
        if elements == 0 or dims[0] % block:
            raise invalid(f"tensor '{name[:200]}' has shape {dims}, not whole blocks of {block}")
        nbytes = elements // block * type_bytes
        if offset % alignment or data_start + offset + nbytes > size:
            raise invalid(f"tensor '{name[:200]}' claims {nbytes:,} bytes at offset {offset:,}: "
                          f"{'misaligned' if offset % alignment else 'past the end of the file'} ({size:,} bytes)")
        spans.append((offset, offset + nbytes, name))
        parameters += elements
    spans.sort()
    for (_, end, before), (start, _, after) in zip(spans, spans[1:]):
        if start < end:
            raise invalid(f"the data of tensors '{before[:200]}' and '{after[:200]}' overlap")
    return parameters
