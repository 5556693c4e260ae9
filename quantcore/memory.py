"""Giving memory back while a model is quantized block by block (Linux; a no-op elsewhere).

Transformers loads safetensors weights as a private memory map of the file: a block's
float weights become resident when the block is first run and would stay resident after
the block's layers are replaced by quantized ones, so without help the process grows by
the whole float model. `release_file_pages` drops the resident pages that lie entirely
inside a tensor's bytes, only when they belong to a file mapping (so the memory is the
file's, not the only copy of anything); `trim_heap` returns freed heap memory to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


def _file_mapping(address: int) -> tuple[int, int] | None:
    """(start, end) of the file-backed mapping holding `address`, or None (anonymous, unknown)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(v, 16) for v in fields[0].split("-"))
                if start <= address < end:
                    path = fields[5].strip() if len(fields) == 6 else ""
                    return (start, end) if path.startswith("/") else None
    except OSError:
        return None
    return None


def release_file_pages(tensor: torch.Tensor) -> int:
    """Drop from memory the whole pages of `tensor`'s bytes when they are a file's memory map.
    Call it only for tensors nothing will read again: a page that was written to (copy on
    write) is discarded, and a later read sees the file's bytes. Returns the bytes released."""
    if _libc is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    mapping = _file_mapping(begin)
    if mapping is None:
        return 0
    page = mmap.PAGESIZE
    first = max(-(-begin // page) * page, mapping[0])
    last = min(end // page * page, mapping[1])
    if last <= first:
        return 0
    if _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) != 0:
        log.debug("madvise failed: errno %d", ctypes.get_errno())
        return 0
    return last - first


def release_replaced(model: torch.nn.Module, tensors: list[torch.Tensor]) -> int:
    """`release_file_pages` for those of `tensors` that are no longer parameters of `model`
    (a quantized layer replaced them; one still shared with a live module is kept)."""
    kept = {id(p) for p in model.parameters()}
    return sum(release_file_pages(t.data) for t in tensors if id(t) not in kept)


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc keeps it otherwise)."""
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def spill_rewritten_weights(module: torch.nn.Module, path: Path, min_bytes: int = 1 << 20) -> int:
    """After a stage rewrote `module`'s float weights in place (smoothing or AWQ scales folded
    in), move every float parameter of at least `min_bytes` to a file at `path`, map it back
    from there and drop both copies' pages from memory: the values are bit-for-bit the
    rewritten ones, and they stay out of memory until read again. Unlike
    `spill_float_weights` this also moves weights that still lie in a file's private mapping:
    an in-place rewrite turned their pages into private copies, which only leave memory when
    released once nothing points at them. Returns the bytes spilled."""
    return _spill(module, path, min_bytes, anonymous_only=False)


def spill_float_weights(model: torch.nn.Module, path: Path, min_bytes: int = 1 << 20) -> int:
    """Move the model's float parameters that live only in anonymous memory (a stage rewrote
    them, e.g. smoothing scales folded into the weights) into a file at `path` and map them
    back from it, so the next stage's block-by-block pass can release them page by page
    (`release_file_pages`) as it replaces them, instead of starting with the whole rewritten
    model resident. Values are bit-for-bit unchanged. The file is unlinked at once where the
    OS allows it (the mapping keeps it alive). Returns the bytes spilled."""
    return _spill(model, path, min_bytes, anonymous_only=True)


def _spill(module: torch.nn.Module, path: Path, min_bytes: int, anonymous_only: bool) -> int:
    """Save the chosen float parameters to `path`, point them at its memory map, unlink it.
    Without `anonymous_only`, parameters already in a file mapping move too, and both the old
    and the new pages are released (the block-by-block spill)."""
    if _libc is None:
        return 0
    chosen = {
        name: p
        for name, p in module.named_parameters()  # tied weights appear once
        if p.device.type == "cpu" and p.is_floating_point() and p.numel() * p.element_size() >= min_bytes
        and not (anonymous_only and _file_mapping(p.data_ptr()) is not None)
    }
    if not chosen:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: p.detach() for name, p in chosen.items()}, path)
    mapped = torch.load(path, mmap=True, weights_only=True)
    for name, p in chosen.items():
        old, p.data = p.data, mapped[name]
        if not anonymous_only:
            release_file_pages(old)  # the rewritten private pages of the source file's mapping
            release_file_pages(p.data)
        del old
    try:
        path.unlink()
    except OSError:
        log.debug("kept %s: it cannot be removed while mapped", path)
    trim_heap()  # the rewritten copies that lived in anonymous memory
    return sum(p.numel() * p.element_size() for p in chosen.values())
