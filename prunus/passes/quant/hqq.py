"""HQQ, half-quadratic quantization (Badri & Shaji, 2023): calibration-free, optimizes the zero points.

Minimizes ||W - s (Q - z)||_p^p with p < 1 (robust to outliers) by alternating a generalized shrinkage
of the error and a closed-form zero-point update; scales stay min-max. Zero points become real numbers,
which the int4 op and ONNX's MatMulNBits both accept.
"""
from __future__ import annotations

import torch

from prunus.passes.quant import grids
from prunus.passes.quant.encode import QuantizedWeight, encode


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp(min=1e-8).pow(p - 1))


def hqq(w, scheme: str, group_size: int, dtype, stats=None, *, p: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01, iters: int = 20) -> QuantizedWeight:
    if scheme != "int4_weight":
        return encode(scheme, w, group_size, dtype)
    n, k = w.shape
    g = grids.pad_groups(w, group_size).reshape(n, -1, group_size)
    scale, zero = grids.int4_params(w, group_size)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1).clone()
    best_err, best_z = float("inf"), z.clone()
    for _ in range(iters):
        q = (g / s + z).round().clamp(0, 15)
        err_w = g - (q - z) * s
        err = err_w.abs().pow(p).mean().item()
        if err < best_err:
            best_err, best_z = err, z.clone()
        elif err > best_err * 1.0001:
            break
        w_e = _shrink(err_w, beta, p)
        z = (q - (g - w_e) / s).mean(-1, keepdim=True)
        beta *= kappa
    z = best_z
    q = (g / s + z).round().clamp(0, 15).to(torch.uint8).reshape(n, -1)[:, :k]
    return encode(scheme, w, group_size, dtype, q=q, scale=scale, zero=z.squeeze(-1))
