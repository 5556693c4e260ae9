"""Bit packing of integer codes into bytes: the real low-bit storage of quantized weights.

Codes are unsigned (0 .. 2^b - 1; signed grids are offset by -l before packing). Any width
b in 2..8 uses one rule: eight consecutive codes make a b-byte little-endian word,

    word = c0 | c1 << b | c2 << 2b | ... | c7 << 7b        (8·b bits = b bytes)

so int4 stores two codes per byte with the first code in the low nibble (the layout of
GPTQ/AWQ/llama.cpp nibbles), int2 four per byte, int3 eight codes in three bytes, and int8
is stored as is. The tensor is flattened row-major and padded to a multiple of 8 codes.
"""

from __future__ import annotations

import math

import torch

_CODES_PER_WORD = 8


def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed for `numel` codes of `bits` bits."""
    if bits == 8:
        return numel
    return math.ceil(numel / _CODES_PER_WORD) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, values < 2^bits) into a flat uint8 tensor."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if bits == 8:
        return flat.to(torch.uint8)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    pad = (-flat.numel()) % _CODES_PER_WORD
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(_CODES_PER_WORD, dtype=torch.int64, device=flat.device) * bits
    # Fields are disjoint, so the sum is their bitwise OR.
    words = (flat.view(-1, _CODES_PER_WORD) << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 codes of the given shape."""
    numel = math.prod(shape)
    if bits == 8:
        return packed.reshape(shape).to(torch.uint8)
    if 8 % bits == 0:
        # Widths that divide a byte (2, 4) never straddle bytes: shift uint8s directly,
        # several times faster than assembling words (this runs on every reference forward).
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
        codes = (packed.unsqueeze(1) >> shifts) & (2**bits - 1)
        return codes.reshape(-1)[:numel].reshape(shape)
    words_bytes = packed.to(torch.int64).view(-1, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    words = (words_bytes << byte_shifts).sum(dim=1)
    shifts = torch.arange(_CODES_PER_WORD, dtype=torch.int64, device=packed.device) * bits
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8).reshape(shape)
