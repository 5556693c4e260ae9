"""The fp8 W8A8 Triton kernels against their PyTorch references: per-token e4m3 quantization
bit for bit (ties to even, subnormals, signed zeros), the fp8 GEMM's float32 sums exactly
where they are exact and within float32 rounding where they are not, and a whole layer built
by the fp8-rtn scheme against the reference and against the unquantized layer."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is not installed (its wheels are Linux-only)")

from quantcore.kernels import interpreting  # noqa: E402
from quantcore.kernels.fp8 import Fp8Config, fp8_linear, fp8_matmul, fp8_supported, quantize_per_token_fp8  # noqa: E402
from quantcore.kernels.reference import (  # noqa: E402
    fp8_linear_reference,
    fp8_w8a8_reference,
    quantize_per_token_fp8_reference,
)
from quantcore.schemes import QuantScheme  # noqa: E402

N = 96
FP8W = QuantScheme(type="fp8_e4m3", bits=8, symmetric=True, granularity="channel")  # recipe "fp8-rtn"
E4M3 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def _needs_fp8_gpu(device):
    """A GPU without fp8 (compute capability < 8.9) skips the file, with the reason. The
    interpreter never does: were its probe to fail, the tests below should say where."""
    if not interpreting():
        support = fp8_supported(device)
        if not support:
            pytest.skip(f"fp8 kernels cannot run here: {support.reason}")


def bits(q: torch.Tensor) -> torch.Tensor:
    """The stored bytes, so equality also tells -0.0 from 0.0."""
    return q.view(torch.uint8)


def tokens(batch: int, k: int, device: str, seed: int = 0) -> torch.Tensor:
    """Rows whose magnitudes span four decades, as activations across tokens do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=g) * torch.logspace(-2, 2, batch).view(batch, 1)
    return x.to(device)


def assert_float32_sum_close(got, x_q, x_scale, w_q, w_scale, bias=None):
    """got against the exact (float64) reference, element by element, to 1e-6 of what bounds
    the float32 sum's rounding: each of the K additions errs by at most 2^-24 of the partial
    sum, |partial sum| ≤ ‖x_q[m]‖·‖w_q[n]‖ (Cauchy-Schwarz), and the errors are of random
    sign, so in practice they total ~1 ulp of ‖x_q[m]‖·‖w_q[n]‖; 1e-6 ≈ 17 ulp. Relative to
    the element itself it could not work: an output that nearly cancels keeps the absolute
    error of the terms. Scales and bias add two roundings each, relative to |y| and |bias|."""
    expect = fp8_w8a8_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype=torch.float64)
    k, n = x_q.shape[-1], w_q.shape[0]
    s_x = x_scale.double().reshape(-1, 1) if x_scale.numel() > 1 else x_scale.double().reshape(1, 1)
    s_w = w_scale.double().reshape(1, -1) if w_scale.numel() > 1 else w_scale.double().reshape(1, 1)
    row_norms = x_q.double().reshape(-1, k).norm(dim=1, keepdim=True) * s_x.abs()
    col_norms = w_q.double().norm(dim=1).reshape(1, n) * s_w.abs()
    bound = 1e-6 * (row_norms * col_norms + (bias.double().abs() if bias is not None else 0.0))
    err = (got.double().reshape(-1, n) - expect.reshape(-1, n)).abs()
    assert got.shape == expect.shape
    assert (err <= bound).all(), f"worst error {(err / bound).max().item():.3g} x the bound"


# ------------------------------------------------------------------ per-token quantization
@pytest.mark.parametrize("k", [576, 192, 100])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_quantize_per_token_fp8_is_bit_exact(device, k, batch):
    x = tokens(batch, k, device, seed=k + batch)
    q, s = quantize_per_token_fp8(x, block=64)  # several chunks per row, the last one partial when k = 100
    q_ref, s_ref = quantize_per_token_fp8_reference(x)
    assert q.dtype == E4M3 and q.shape == x.shape and s.shape == (batch,)
    assert torch.equal(s, s_ref)
    assert torch.equal(bits(q), bits(q_ref))


def test_ties_go_to_even_codes_at_every_binade(device):
    """Every midpoint between neighbouring e4m3 values (subnormals included), both signs, in
    a row whose max is 448 so that S = 1 and the midpoints reach the cast as they are. A tie
    must land on the even code (last mantissa bit 0); values just off a tie go to the nearer
    side; the 126.2 -> 128 carry into the exponent that Triton's own interpreter cast drops."""
    finite = torch.arange(0, 0x7F, dtype=torch.uint8).view(E4M3).float()  # 0 .. 448, increasing
    mid = (finite[:-1] + finite[1:]) / 2  # exact in float32
    above = torch.nextafter(mid, torch.full_like(mid, 1e9))
    row = torch.cat([mid, -mid, above, -above, torch.tensor([126.2, -0.0, -1e-4, 448.0])])
    x = row.reshape(1, -1).to(device)
    q, s = quantize_per_token_fp8(x, block=128)
    assert s.item() == 1.0
    assert torch.equal(bits(q), bits(quantize_per_token_fp8_reference(x)[0]))
    codes = bits(q)[0].cpu().long()
    n = mid.numel()
    assert (codes[: 2 * n] & 1 == 0).all()  # ties: even mantissa
    assert torch.equal(codes[2 * n : 3 * n] & 0x7F, torch.arange(1, n + 1))  # just above a tie: the upper neighbour
    assert q[0, -4].item() == 128.0
    assert codes[-3].item() == 0x80 and codes[-2].item() == 0x80  # -0.0 and a negative underflow keep the sign


def test_quantize_handles_zero_rows_half_precision_and_leading_dims(device):
    x = torch.tensor([[3.0, -0.5, 448.0, 0.01, -200.0, 1e-3], [0.0] * 6, [-896.0, 1.0, 0.0, 2.0, 0.0, -3.0]], device=device)
    q, s = quantize_per_token_fp8(x)
    assert q[0].float().tolist() == [3.0, -0.5, 448.0, 0.009765625, -192.0, 0.001953125]  # -200: a tie, to 1.5·2^7
    assert bits(q[1]).tolist() == [0] * 6 and s[1].item() == 1.0
    assert s[2].item() == 2.0 and q[2].float().tolist() == [-448.0, 0.5, 0.0, 1.0, 0.0, -1.5]
    q3, s3 = quantize_per_token_fp8(x.reshape(3, 1, 6).to(torch.float16))  # leading dims kept, fp16 in
    assert q3.shape == (3, 1, 6) and s3.shape == (3, 1)
    assert torch.equal(bits(q3.reshape(3, 6)), bits(q))
    xh = tokens(5, 192, device).to(torch.float16).reshape(5, 1, 192)
    qh, sh = quantize_per_token_fp8(xh)
    qh_ref, sh_ref = quantize_per_token_fp8_reference(xh)
    assert torch.equal(bits(qh), bits(qh_ref)) and torch.equal(sh, sh_ref)


# ------------------------------------------------------------------ the GEMM
@pytest.mark.parametrize("k", [576, 100])
@pytest.mark.parametrize("batch", [1, 17])
def test_sums_of_integer_codes_are_exact(device, k, batch):
    """Integers up to 16 are e4m3 values and |sum| ≤ 576·16² < 2^24, so here the float32 sum
    is exact and any error in indexing, masking or the transposed tile shows as inequality."""
    g = torch.Generator().manual_seed(k + batch)
    x_q = torch.randint(-16, 17, (batch, k), generator=g).float().to(E4M3).to(device)
    w_q = torch.randint(-16, 17, (N, k), generator=g).float().to(E4M3).to(device)
    ones = torch.ones(1, device=device)
    got = fp8_matmul(x_q, ones, w_q, ones)
    expect = (x_q.cpu().float().long() @ w_q.cpu().float().long().T).float()
    assert torch.equal(got.cpu(), expect)


@pytest.mark.parametrize("k", [576, 192])
@pytest.mark.parametrize("batch", [1, 3, 17, 70])
@pytest.mark.parametrize("bias", [True, False])
def test_matmul_matches_reference(quantized_layer, device, k, batch, bias):
    layer = quantized_layer(N, k, FP8W, seed=batch)
    assert layer.qweight.dtype == E4M3 and layer.scale.shape == (N, 1)
    x_q, x_scale = quantize_per_token_fp8_reference(tokens(batch, k, device))
    b = layer.bias if bias else None
    got = fp8_matmul(x_q, x_scale, layer.qweight, layer.scale, b)
    assert got.dtype == torch.float32
    assert_float32_sum_close(got, x_q, x_scale, layer.qweight, layer.scale, b)


def test_every_code_with_one_weight_scale_and_small_tiles(device):
    """Random bytes cover every finite e4m3 code, subnormals to ±448, so products span 2^-18
    to 2^17; small tiles make K = 200 several full tiles and a masked one."""
    g = torch.Generator().manual_seed(3)

    def codes(*shape):
        b = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        b = torch.where(b & 0x7F == 0x7F, b - 1, b)  # 0x7F / 0xFF are NaN
        return b.view(E4M3).to(device)

    x_q, w_q = codes(5, 200), codes(N, 200)
    x_scale = torch.rand(5, generator=g).to(device)
    w_scale = torch.tensor([[0.003]], device=device)
    got = fp8_matmul(x_q, x_scale, w_q, w_scale, config=Fp8Config(16, 32, 32))
    assert_float32_sum_close(got, x_q, x_scale, w_q, w_scale)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_linear_is_the_reference_and_approximates_the_float_layer(quantized_layer, device, batch):
    """The whole fp8 W8A8 layer from float x. QuantizedLinear has no fp8 activation scheme to
    compare with, so: the kernels' numbers are `fp8_linear_reference`'s, and they stay near
    the unquantized layer. e4m3 rounds each value to within 2^-4 of itself, 2.5% rms across
    a binade, on both operands: about 3.5% rms on the output (3.4% at most measured here, per
    token); 5e-2 allows for that, not for a wrong scale or a lost bias."""
    layer = quantized_layer(N, 576, FP8W, seed=batch)
    torch.manual_seed(batch)  # the float layer the fixture quantized, rebuilt from its seed
    float_layer = nn.Linear(576, N).to(device)
    x = tokens(batch, 576, device, seed=batch).reshape(batch, 1, 576)  # a leading dim, as in (batch, seq, hidden)
    got = fp8_linear(x, layer.qweight, layer.scale, layer.bias)
    assert got.shape == (batch, 1, N) and got.dtype == torch.float32
    x_q, x_scale = quantize_per_token_fp8_reference(x)
    assert_float32_sum_close(got.reshape(batch, N), x_q.reshape(batch, 576), x_scale.reshape(batch), layer.qweight, layer.scale, layer.bias)
    with torch.no_grad():
        ref = float_layer(x)
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()  # per token: rows span four decades
    assert rel < 5e-2


def test_linear_in_half_precision(quantized_layer, device):
    layer = quantized_layer(N, 576, FP8W)
    x = tokens(3, 576, device).to(torch.float16)
    got = fp8_linear(x, layer.qweight, layer.scale, layer.bias)
    assert got.dtype == torch.float16
    expect = fp8_linear_reference(x, layer.qweight, layer.scale, layer.bias)
    # identical codes; the float32 sums differ from exact ones far below fp16's final rounding
    torch.testing.assert_close(got, expect, rtol=1e-3, atol=1e-3)


def test_rejects_wrong_dtypes_and_shapes(device):
    w_q = torch.zeros(8, 64, device=device).to(E4M3)
    with pytest.raises(TypeError, match="float8_e4m3fn operands"):
        fp8_matmul(torch.zeros(1, 64, dtype=torch.int8, device=device), torch.ones(1), w_q, torch.ones(8))
    with pytest.raises(TypeError, match="float8_e4m3fn operands"):
        fp8_matmul(w_q[:1], torch.ones(1), torch.zeros(8, 64, device=device).to(torch.float8_e5m2), torch.ones(8))
    with pytest.raises(ValueError, match="does not match K"):
        fp8_matmul(torch.zeros(1, 32, device=device).to(E4M3), torch.ones(1), w_q, torch.ones(8))
    with pytest.raises(ValueError, match="w_scale has 4 scales for 8 rows"):
        fp8_matmul(w_q[:1], torch.ones(1), w_q, torch.ones(4))


def test_fp8_supported_needs_compute_capability_8_9(monkeypatch):
    """The gate for compiled kernels, with the CUDA queries stubbed (no GPU here)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read per call; no kernel is launched below
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "GPU")
    for capability, ok in [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        support = fp8_supported("cuda")
        assert bool(support) is ok, support.reason
        if not ok:
            assert f"{capability[0]}.{capability[1]}" in support.reason and "8.9" in support.reason
    assert not fp8_supported("cpu") and "TRITON_INTERPRET" in fp8_supported("cpu").reason


def test_the_interpreter_runs_fp8(device):
    if not interpreting():
        pytest.skip("compiled kernels: the capability gate above decides")
    support = fp8_supported(device)
    assert support, support.reason
