"""GPTQ (Frantar et al., 2023): quantize columns one at a time, spreading each column's rounding error over
the columns not yet quantized through the inverse Hessian H = 2 X^T X of the layer's calibration inputs.
Lazy block updates of 128 columns; group parameters are fixed when a group's first column is reached.
"""
from __future__ import annotations

import torch

from prunus.passes.quant import grids
from prunus.passes.quant.encode import QuantizedWeight, encode


def gptq(w, scheme: str, group_size: int, dtype, stats, *, block: int = 128, damp: float = 0.01,
         symmetric: bool = False) -> QuantizedWeight:
    if scheme not in ("int4_weight", "int8_weight"):
        return encode(scheme, w, group_size, dtype)
    w = w.clone().double()
    n, k = w.shape
    h = 2 * stats.xtx / max(stats.tokens, 1)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q_int = torch.zeros(n, k, dtype=torch.int16)
    if scheme == "int8_weight":
        scale = grids.int8_params(w.float()).double()
    else:
        groups = -(-k // group_size)
        scales = torch.zeros(n, groups, dtype=torch.double)
        zeros = torch.zeros(n, groups, dtype=torch.double)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, d = w1[:, i], h1[i, i]
            j = i1 + i
            if scheme == "int8_weight":
                qi = (col / scale).round().clamp(-127, 127)
                deq = qi * scale
            else:
                grp = j // group_size
                if j % group_size == 0:
                    cur = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group_size]
                    s, z = grids.int4_params(cur.float(), group_size, symmetric)
                    scales[:, grp], zeros[:, grp] = s[:, 0].double(), z[:, 0].double()
                s, z = scales[:, grp], zeros[:, grp]
                qi = (col / s + z).round().clamp(0, 15)
                deq = (qi - z) * s
            q_int[:, j] = qi.to(torch.int16)
            e = (col - deq) / d
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if scheme == "int8_weight":
        return encode(scheme, w.float(), group_size, dtype, q=q_int.to(torch.int8), scale=scale.float())
    return encode(scheme, w.float(), group_size, dtype, q=q_int.to(torch.uint8), scale=scales.float(),
                  zero=zeros.float())
