"""Hand-written kernels and their torch.library ops (`torch.ops.prunus.*`), with reference implementations.

(The op `torch.ops.prunus.decode_attention` is not re-exported here: the name is its module's.)
Depends on torch only at import; Triton is imported where a kernel runs (CUDA, or TRITON_INTERPRET=1).
"""
from prunus.kernels.decode_attention import attention_scores, decode_attention_scores
from prunus.kernels.kv_evict import replace_lowest
from prunus.kernels.kv_quant import (
    decode_attention_quantized,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
)
from prunus.kernels.quant_linear import (
    dequantize_int4,
    dequantize_int8,
    embedding_int8,
    linear_fp8,
    linear_int4,
    linear_int8,
    linear_w8a8,
    pack_int4,
    quantize_activations_int8,
    unpack_int4,
)

__all__ = ["attention_scores", "decode_attention_quantized", "decode_attention_scores",
           "dequantize_keys", "dequantize_values", "quantize_keys", "quantize_values", "dequantize_int4",
           "dequantize_int8", "embedding_int8", "linear_fp8", "linear_int4", "linear_int8", "linear_w8a8",
           "pack_int4", "quantize_activations_int8", "replace_lowest", "unpack_int4"]
