"""The fused SVDQuant W4A4 + low-rank Triton kernels against their PyTorch references: the
smoothed int4 codes and group scales bit for bit (and as the layer's activation fake-quant),
the int4 group sums exactly, the GEMM with its low-rank epilogue, and a whole
LowRankQuantizedLinear made by the project's SVDQuant against its own forward."""

import pytest
import torch
from torch import nn

pytest.importorskip("triton", reason="triton is not installed (its wheels are Linux-only)")

from quantcore.algorithms.svdquant import SVDQuantOptions, svdquant_linear  # noqa: E402
from quantcore.kernels.reference import (  # noqa: E402
    quantize_int4_groups_reference,
    quantize_lowrank_input_reference,
    w4a4_lowrank_linear_reference,
    w4a4_lowrank_reference,
)
from quantcore.kernels.w4a4_lowrank import (  # noqa: E402
    QuantizeConfig,
    W4A4Config,
    lowrank_w4a4_linear,
    quantize_config,
    quantize_lowrank_input,
    w4a4_config,
    w4a4_lowrank_matmul,
)
from quantcore.modules.low_rank import LowRankQuantizedLinear  # noqa: E402
from quantcore.modules.quantized_linear import QuantizedLinear, fake_quant_activations  # noqa: E402
from quantcore.packing import pack_codes  # noqa: E402
from quantcore.recipe import preset  # noqa: E402
from quantcore.schemes import QuantScheme  # noqa: E402

N = 96  # one full 64-wide column tile and one masked half tile
W4 = QuantScheme(bits=4, granularity="group", group_size=64)
A4 = QuantScheme(bits=4, granularity="group", group_size=64, dynamic=True)


def rel_error(got: torch.Tensor, expect: torch.Tensor) -> float:
    return ((got.float() - expect.float()).norm() / expect.float().norm()).item()


def tokens(batch: int, k: int, device: str, seed: int = 0) -> torch.Tensor:
    """Rows whose magnitudes span four decades, with a few outlier channels, as LLM inputs have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=g) * torch.logspace(-2, 2, batch).view(batch, 1)
    x[:, ::37] *= 20
    return x.to(device)


def branch(n: int, k: int, rank: int, device: str, seed: int = 0):
    """smooth (positive, around 1), lora_down and lora_up in float16, as the layer stores them."""
    g = torch.Generator().manual_seed(seed)
    smooth = (torch.rand(k, generator=g) * 4 + 0.25).half()
    down = (torch.randn(rank, k, generator=g) / k**0.5).half()
    up = torch.randn(n, rank, generator=g).half()
    return smooth.to(device), down.to(device), up.to(device)


# ------------------------------------------------------------------ quantization + down-projection
@pytest.mark.parametrize("k", [576, 192])
@pytest.mark.parametrize("batch", [1, 17, 70])
@pytest.mark.parametrize("split_k", [1, 4], ids=["whole-k", "split-k"])
def test_quantize_is_bit_exact(device, k, batch, split_k):
    x = tokens(batch, k, device, seed=k + batch)
    smooth, down, _ = branch(N, k, 32, device, seed=batch)
    q, s, act = quantize_lowrank_input(x, smooth, down, 64, config=QuantizeConfig(block_m=16, split_k=split_k))
    q_ref, s_ref, act_ref = quantize_lowrank_input_reference(x, smooth, down, 64)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (batch, k // 64) and act.shape == (batch, 32)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    # fp32 dot against float64 sums (split-K adds partials with atomics): rounding only
    torch.testing.assert_close(act, act_ref, rtol=1e-5, atol=1e-5 * act_ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_codes_are_the_layers_activation_fake_quant(device, dtype):
    """codes · scales is what QuantizedLinear's reference feeds its matmul for the preset's
    activation scheme, bit for bit, x̂ included (divided in x's dtype as the layer does)."""
    x = tokens(5, 576, device, seed=3).to(dtype)
    smooth, down, _ = branch(N, 576, 32, device)
    q, s, _ = quantize_lowrank_input(x, smooth, down, 64)
    x_hat = x / smooth.to(dtype)
    dequantized = (q.float().reshape(5, 9, 64) * s.unsqueeze(-1)).reshape(5, 576)
    assert torch.equal(dequantized.to(dtype), fake_quant_activations(x_hat, A4))
    q_ref, s_ref = quantize_int4_groups_reference(x_hat, 64)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_rounds_half_to_even_and_handles_zero_groups(device):
    # group max 7 with smooth 1 makes S = 1, so the halves stay exact halves
    x = torch.zeros(2, 64, device=device)
    x[0, :6] = torch.tensor([2.5, -0.5, 1.5, -3.5, 0.49, 7.0])
    x[1, 0] = -14.0  # S = 2
    x[1, 1] = 5.0  # 2.5 -> 2
    smooth = torch.ones(64, device=device, dtype=torch.float16)
    down = torch.zeros(16, 64, device=device, dtype=torch.float16)
    q, s, act = quantize_lowrank_input(torch.cat([x, torch.zeros(1, 64, device=device)]), smooth, down, 64)
    assert q[0, :6].tolist() == [2, 0, 2, -4, 0, 7] and s[0].item() == 1.0
    assert q[1, :2].tolist() == [-7, 2] and s[1].item() == 2.0
    assert q[2].abs().sum().item() == 0 and s[2].item() == 1.0  # an all-zero group
    assert act.abs().sum().item() == 0


# ------------------------------------------------------------------ the GEMM and its epilogue
@pytest.mark.parametrize("k", [576, 192])
def test_int4_group_sums_are_exact(device, k):
    """Unit scales and no low-rank term: the output is Σ_k x_q w_q itself, |Σ| ≤ 576·64 < 2²⁴,
    so float32 holds every partial sum exactly and any error in unpacking or summing shows."""
    g = torch.Generator().manual_seed(k)
    x_q = torch.randint(-8, 8, (17, k), generator=g, dtype=torch.int8)
    w_q = torch.randint(-8, 8, (N, k), generator=g, dtype=torch.int8)
    qweight = pack_codes(w_q.to(torch.int16) + 8, 4)
    ones_x, ones_w = torch.ones(17, k // 64), torch.ones(N, k // 64, 1, dtype=torch.float16)
    act, up = torch.zeros(17, 16), torch.zeros(N, 16, dtype=torch.float16)
    args = [t.to(device) for t in (x_q, ones_x, qweight, ones_w, act, up)]
    got = w4a4_lowrank_matmul(*args, out_dtype=torch.float32)
    assert torch.equal(got.cpu(), (x_q.long() @ w_q.long().T).float())


@pytest.mark.parametrize("k", [576, 192])
@pytest.mark.parametrize("batch", [1, 3, 17, 70])
@pytest.mark.parametrize("rank", [32, 16])
@pytest.mark.parametrize("bias", [True, False])
def test_matmul_matches_reference(quantized_layer, device, k, batch, rank, bias):
    layer = quantized_layer(N, k, W4, A4, seed=batch)
    smooth, down, up = branch(N, k, rank, device, seed=batch + rank)
    x_q, x_s, act = quantize_lowrank_input_reference(tokens(batch, k, device, seed=batch), smooth, down, 64)
    b = layer.bias if bias else None
    got = w4a4_lowrank_matmul(x_q, x_s, layer.qweight, layer.scale, act, up, b, out_dtype=torch.float32)
    expect = w4a4_lowrank_reference(x_q, x_s, layer.qweight, layer.scale, act, up, b)
    assert got.shape == (batch, N) and got.dtype == torch.float32
    # exact integer group sums; fp32 products and sums of ~K/64 + r terms against float64
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


@pytest.mark.parametrize("split_k", [2, 4, 9])
def test_split_k_matches_reference(quantized_layer, device, split_k):
    """K = 576 is nine groups: 2 and 4 splits get unequal shares, 9 one group each; the
    low-rank term and the bias must be added once."""
    layer = quantized_layer(N, 576, W4, A4, seed=split_k)
    smooth, down, up = branch(N, 576, 32, device)
    x_q, x_s, act = quantize_lowrank_input_reference(tokens(3, 576, device), smooth, down, 64)
    got = w4a4_lowrank_matmul(x_q, x_s, layer.qweight, layer.scale, act, up, layer.bias, torch.float32,
                              config=W4A4Config(16, 32, split_k))
    expect = w4a4_lowrank_reference(x_q, x_s, layer.qweight, layer.scale, act, up, layer.bias)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


# ------------------------------------------------------------------ the whole layer
def svdquant_layer(n: int, k: int, rank: int, device: str, seed: int = 0) -> LowRankQuantizedLinear:
    """A layer made by the project's SVDQuant (smoothing, SVD, int4 residual) from the
    `w4a4-svdquant-r32` preset's stage, for a random Linear with bias and outlier inputs."""
    torch.manual_seed(seed)
    linear = nn.Linear(k, n)
    act_absmax = torch.rand(k) + 0.1
    act_absmax[::37] *= 50
    stage = preset("w4a4-svdquant-r32").stages[0]
    return svdquant_linear(linear, act_absmax, stage, SVDQuantOptions(rank=rank)).to(device)


@pytest.mark.parametrize("batch", [1, 3, 17, 70])
@pytest.mark.parametrize("rank", [32, 16])
def test_linear_is_the_layers_forward(device, batch, rank):
    layer = svdquant_layer(N, 576, rank, device, seed=batch)
    x = tokens(batch, 576, device, seed=batch)
    got = lowrank_w4a4_linear(x, layer)
    assert got.shape == (batch, N) and got.dtype == torch.float32
    r = layer.residual
    expect = w4a4_lowrank_linear_reference(x, layer.smooth, layer.lora_down, layer.lora_up, r.qweight, r.scale, r.bias)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    # The layer's own forward quantizes x̂ to the same codes (test_quantize_is_bit_exact), so
    # only float arithmetic differs: it multiplies the rounded fp32 values x_q·s_x and
    # (u - 8)·s_w and sums 576 products in fp32, where the kernel sums integers exactly and
    # scales once per group. That is a few fp32 ulps (1.2e-7) times √K-ish accumulation, far
    # under 1e-5 (one flipped code would cost ~1e-3). Compared as a whole: single outputs can
    # nearly cancel, where relative rounding error is unbounded.
    assert rel_error(got, layer(x)) < 1e-5


def test_linear_half_precision_and_leading_dims(device):
    layer = svdquant_layer(N, 576, 32, device)
    x = tokens(6, 576, device).reshape(2, 3, 576).half()
    got = lowrank_w4a4_linear(x, layer)
    assert got.shape == (2, 3, N) and got.dtype == torch.float16
    # same codes; the layer rounds x_q·s_x, Ŵ, its two branch products and the sum to fp16
    assert rel_error(got, layer(x)) < 3e-3
    # against float64 sums of the same codes: the kernel rounds lora_act and the output to fp16
    r = layer.residual
    expect = w4a4_lowrank_linear_reference(x, layer.smooth, layer.lora_down, layer.lora_up, r.qweight, r.scale, r.bias)
    assert rel_error(got, expect) < 2e-3


def test_rejects_other_schemes(device):
    residual = QuantizedLinear.from_float(nn.Linear(128, 32), QuantScheme(bits=4, granularity="group", group_size=64),
                                          QuantScheme(bits=4, granularity="group", group_size=32, dynamic=True))
    layer = LowRankQuantizedLinear(residual, 16).to(device)
    with pytest.raises(ValueError, match="groups of 64"):
        lowrank_w4a4_linear(torch.randn(1, 128, device=device), layer)
    residual = QuantizedLinear.from_float(nn.Linear(128, 32), QuantScheme(bits=4, granularity="group", group_size=64),
                                          QuantScheme(bits=8, granularity="token", dynamic=True))
    with pytest.raises(ValueError, match="activations: the fused W4A4 kernels take int4"):
        lowrank_w4a4_linear(torch.randn(1, 128, device=device), LowRankQuantizedLinear(residual, 16).to(device))
    with pytest.raises(ValueError, match="power of two"):
        quantize_lowrank_input(torch.randn(1, 96, device=device), torch.ones(96, device=device),
                               torch.zeros(16, 96, device=device), group_size=48)


def test_configs_fill_the_gpu():
    h200 = 132  # SMs
    # batch 64 on 4096 x 4096: 32 output tiles of 64 x 128, K split to give every SM a program
    cfg = w4a4_config(64, 4096, 4096 // 64, h200)
    assert (cfg.block_m, cfg.block_n) == (64, 128) and cfg.split_k * 32 >= h200
    assert w4a4_config(64, 11008, 64, h200).split_k * 86 >= h200
    assert w4a4_config(4096, 4096, 64, h200).split_k == 1  # prefill: 1024 tiles, no split
    assert w4a4_config(1, 576, 9, h200).split_k == 2  # never fewer than four groups per split
    assert quantize_config(64, 64, h200) == QuantizeConfig(64, 32)  # as split as two groups a program allows
    assert quantize_config(64, 64, 1).split_k == 2 and quantize_config(4096, 64, 132).split_k == 5
