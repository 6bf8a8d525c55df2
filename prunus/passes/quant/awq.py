"""AWQ, activation-aware weight quantization (Lin et al., 2024): protect the weights of salient input
channels by scaling them up before quantization and the input down by the same factor.

s = mean|X_j|^alpha (normalized), with alpha chosen on a grid to minimize ||X W^T - (X / s) Q(W s)^T||
over calibration rows. The inverse scale is applied to the input by an elementwise multiply before the op.
Linears that read one input (q/k/v, gate/up) share one scale, searched over their weights together, as AWQ does
(the quantize pass: `awq_scale` of the stacked weights, then `awq_apply` to each): one multiply then feeds them
all, and `fuse` can still merge them into one matmul.
"""
from __future__ import annotations

import torch

from prunus.passes.quant.encode import QuantizedWeight, encode
from prunus.passes.quant.grids import FAKE


def awq(w, scheme: str, group_size: int, dtype, stats, *, grid: int = 20, symmetric: bool = False) -> QuantizedWeight:
    return awq_apply(w, scheme, group_size, dtype, awq_scale(w, scheme, group_size, stats, grid=grid,
                                                               symmetric=symmetric), symmetric=symmetric)


def awq_scale(w, scheme: str, group_size: int, stats, *, grid: int = 20, symmetric: bool = False):
    """The per-input-channel scale s [K] that minimizes the output error of `w` [N, K] on the calibration rows,
    or None where no scale beats plain rounding (or there are no rows)."""
    x = stats.rows.float()
    if x.numel() == 0:
        return None
    ref = x @ w.t()
    x_mean = stats.mean_abs.float().clamp(min=1e-8)
    fake = lambda w, g: FAKE[scheme](w, g, symmetric)  # noqa: E731
    best = (torch.linalg.vector_norm(ref - x @ fake(w, group_size).t()).item(), None)
    for i in range(1, grid + 1):
        s = x_mean.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()
        err = torch.linalg.vector_norm(ref - (x / s) @ fake(w * s, group_size).t()).item()
        if err < best[0]:
            best = (err, s)
    return best[1]


def awq_apply(w, scheme: str, group_size: int, dtype, s, *, symmetric: bool = False) -> QuantizedWeight:
    """`w` scaled by s [K] and quantized, with 1 / s as the op's input scale (plain rounding where s is None)."""
    if s is None:
        return encode(scheme, w, group_size, dtype, symmetric=symmetric)
    q = encode(scheme, w * s, group_size, dtype, symmetric=symmetric)
    q.input_scale = (1.0 / s).to(dtype)
    return q
