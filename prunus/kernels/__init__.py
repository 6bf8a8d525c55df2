"""Hand-written kernels and their torch.library ops (`torch.ops.prunus.*`), with reference implementations.

Depends on torch only at import; Triton is imported where a kernel runs (CUDA, or TRITON_INTERPRET=1).
"""
from prunus.kernels.quant_linear import (
    dequantize_int4,
    dequantize_int8,
    linear_fp8,
    linear_int4,
    linear_int8,
    linear_w8a8,
    pack_int4,
    quantize_activations_int8,
    unpack_int4,
)

__all__ = ["dequantize_int4", "dequantize_int8", "linear_fp8", "linear_int4", "linear_int8", "linear_w8a8",
           "pack_int4", "quantize_activations_int8", "unpack_int4"]
