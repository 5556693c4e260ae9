"""Quantized modules with real low-bit storage."""

from quantcore.modules.quantized_linear import QuantizedLinear, enable_fast_path

__all__ = ["QuantizedLinear", "enable_fast_path"]
