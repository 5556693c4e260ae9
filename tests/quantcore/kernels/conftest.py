"""Kernel tests run everywhere: compiled on a CUDA GPU, through Triton's interpreter on CPU.

Triton reads TRITON_INTERPRET when triton.language and a kernel are defined, so the root
tests/conftest.py sets it first, before any test module is collected (one collected earlier
may import triton.language through its dependencies); setting it again here covers running
this folder with another root. Shapes are SmolLM2's (K = 576 = 9 x 64,
group 64; K = 384 for group 128, which does not divide 576) with a small N, so the
interpreter (NumPy, one program at a time) runs the folder in seconds."""

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quantcore.kernels import interpreting  # noqa: E402
from quantcore.modules.quantized_linear import QuantizedLinear  # noqa: E402
from quantcore.schemes import QuantScheme  # noqa: E402


@pytest.fixture
def device() -> str:
    return "cpu" if interpreting() else "cuda"


@pytest.fixture
def quantized_layer(device):
    """Builds a QuantizedLinear of random weights (with bias) by the project's own quantizer,
    on the test device, so the kernels are fed the buffers an artifact holds."""

    def build(n: int, k: int, weights: QuantScheme, activations: QuantScheme | None = None, seed: int = 0):
        torch.manual_seed(seed)
        return QuantizedLinear.from_float(nn.Linear(k, n), weights, activations).to(device)

    return build
