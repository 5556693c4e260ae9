"""Packing against a naive bit-by-bit reference."""

import pytest
import torch

from quantcore.packing import pack_codes, packed_numel, unpack_codes


def naive_pack(codes: list[int], bits: int) -> list[int]:
    stream = []
    for c in codes:
        stream += [(c >> i) & 1 for i in range(bits)]  # little-endian bits of each code
    stream += [0] * ((-len(codes)) % 8 * bits)
    return [sum(stream[8 * j + i] << i for i in range(8)) for j in range(len(stream) // 8)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(3, 7), (16, 64), (1,)])
def test_pack_matches_naive_and_round_trips(bits, shape):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, shape, generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(codes.numel(), bits)
    if bits < 8:
        assert packed.tolist() == naive_pack(codes.flatten().tolist(), bits)
    assert torch.equal(unpack_codes(packed, bits, shape), codes.to(torch.uint8))


def test_int4_is_two_per_byte_low_nibble_first():
    packed = pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), 4)
    assert packed.tolist() == [0x21, 0x43, 0x65, 0x87]


def test_out_of_range_codes_rejected():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([16]), 4)


@pytest.mark.parametrize("bits", [3, 4])
def test_unpack_stays_on_the_codes_device(bits):
    """The shift tables follow the packed tensor: a GPU layer's reference path unpacks on the GPU
    (here the meta device stands in for it; a CPU table would not broadcast against it)."""
    packed = torch.empty(packed_numel(12 * 16, bits), dtype=torch.uint8, device="meta")
    codes = unpack_codes(packed, bits, (12, 16))
    assert codes.device.type == "meta" and codes.shape == (12, 16)
