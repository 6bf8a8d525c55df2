"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights before W8A8 quantization.

s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha); the weight is multiplied by s and the op divides its input
by s before quantizing activations per token, so both sides become easy to quantize.
"""
from __future__ import annotations

from prunus.passes.quant.encode import QuantizedWeight, encode


def smoothquant(w, scheme: str, group_size: int, dtype, stats, *, alpha: float = 0.5) -> QuantizedWeight:
    x_max = stats.absmax.float().clamp(min=1e-5)
    w_max = w.abs().amax(0).clamp(min=1e-5)
    s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
    q = encode(scheme, w * s, group_size, dtype)
    q.smooth = s.to(dtype)
    return q
