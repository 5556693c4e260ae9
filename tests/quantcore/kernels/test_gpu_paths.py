"""QuantizedLinear's GPU dispatch (`quantcore.modules.gpu_paths`): each scheme with a Triton
kernel gets it, and the kernel's output is the layer's reference forward. Run on CPU tensors
through Triton's interpreter here (the compiled kernels on a GPU are test_gpu.py's)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (its wheels are Linux-only)")

from quantcore.modules import gpu_paths  # noqa: E402
from quantcore.schemes import QuantScheme  # noqa: E402

W8 = QuantScheme(bits=8, granularity="channel")
A8 = QuantScheme(bits=8, granularity="token", dynamic=True)
A8_TENSOR = QuantScheme(bits=8, granularity="tensor", dynamic=True)
FP8W = QuantScheme(type="fp8_e4m3", bits=8, symmetric=True, granularity="channel")
FP8A = QuantScheme(type="fp8_e4m3", bits=8, symmetric=True, granularity="token", dynamic=True)
W4 = QuantScheme(bits=4, granularity="group", group_size=64)
W4_ASYM = QuantScheme(bits=4, symmetric=False, granularity="group", group_size=64)

CASES = {
    "w4a16-sym": (W4, None, "w4a16"),
    "w4a16-asym": (W4_ASYM, None, "w4a16"),
    "w8a8": (W8, A8, "w8a8"),
    "fp8-w8a8": (FP8W, FP8A, "fp8"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", [1, 5])
def test_each_kernel_path_is_the_reference_forward(quantized_layer, device, case, batch):
    weights, acts, name = CASES[case]
    layer = quantized_layer(48, 192, weights, acts, seed=batch)
    path = gpu_paths.choose(layer, torch.device(device))
    assert path is not None and path.name == name
    g = torch.Generator().manual_seed(batch)
    x = (torch.randn(2, batch, 192, generator=g) * 3).to(device)  # leading dims as a model's (batch, tokens, features)
    got = path(x, layer)
    expect = layer.forward_reference(x)
    assert got.shape == expect.shape and got.dtype == x.dtype
    # the same codes and scales as the reference; only the order of the float sums differs
    assert ((got - expect).norm() / expect.norm()).item() < 1e-5


@pytest.mark.parametrize(
    "weights,acts",
    [(W8, A8_TENSOR), (QuantScheme(bits=3, granularity="channel"), None), (W8, None)],
    ids=["w8a8-per-tensor", "w3", "w8a16"],
)
def test_schemes_without_a_kernel_keep_the_reference(quantized_layer, device, weights, acts):
    layer = quantized_layer(48, 192, weights, acts)
    assert gpu_paths.choose(layer, torch.device(device)) is None


def test_svdquant_layer_gets_the_fused_kernels(device):
    """A LowRankQuantizedLinear as the w4a4-svdquant-r32 preset builds it takes the fused
    W4A4 + low-rank kernels, whose output is the layer's reference forward."""
    from torch import nn

    from quantcore.modules.low_rank import LowRankQuantizedLinear
    from quantcore.modules.quantized_linear import QuantizedLinear

    a4 = QuantScheme(bits=4, granularity="group", group_size=64, dynamic=True)
    torch.manual_seed(0)
    residual = QuantizedLinear.from_float(nn.Linear(192, 48), W4, a4)
    layer = LowRankQuantizedLinear(residual, rank=16)
    layer.lora_up.copy_(torch.randn(48, 16) * 0.05)
    layer.lora_down.copy_(torch.randn(16, 192) * 0.05)
    layer.smooth.copy_(torch.rand(192) + 0.5)
    layer = layer.to(device)
    path = gpu_paths.choose_lowrank(layer, torch.device(device))
    assert path is not None and path.name == "w4a4_lowrank"
    x = (torch.randn(2, 3, 192) * 2).to(device)
    expect = layer.forward_reference(x)
    got = path(x, layer)
    assert got.shape == expect.shape
    assert ((got - expect).norm() / expect.norm()).item() < 1e-5
    # another group size for the activations than the weights: no fused kernel
    other = LowRankQuantizedLinear(
        QuantizedLinear.from_float(nn.Linear(192, 48), W4, QuantScheme(bits=4, granularity="group", group_size=32, dynamic=True)), 16
    )
    assert gpu_paths.choose_lowrank(other, torch.device(device)) is None
