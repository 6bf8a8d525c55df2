"""FLOPs of one node at the example sizes (symbolic sizes take their example value)."""
from __future__ import annotations

import math

import torch
import torch.fx

from prunus.ir.ops import ATTENTION, MATMUL, quantized_linear_shape

aten = torch.ops.aten


def _size(s) -> int:
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        return int(hint) if hint is not None else 1
    return int(s)


def _shape(node) -> list[int]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return [_size(s) for s in val.shape] if isinstance(val, torch.Tensor) else []


def node_flops(node: torch.fx.Node) -> int:
    """2*M*N*K for matmul-like ops, 4*B*H*Lq*Lk*D for attention (halved when causal), else 0."""
    if node.op != "call_function":
        return 0
    if node.target in ATTENTION:
        q, k = _shape(node.args[0]), _shape(node.args[1])
        if len(q) < 2 or len(k) < 2:
            return 0
        flops = 4 * math.prod(q) * k[-2]
        causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
        return flops // 2 if causal else flops
    quantized = quantized_linear_shape(node)
    if quantized is not None:
        out = _shape(node)
        return 2 * math.prod(out) * quantized[1]
    if node.target in MATMUL:
        out = _shape(node)
        if not out:
            return 0
        if node.target in (aten.conv1d.default, aten.conv2d.default):
            w = _shape(node.args[1])
            return 2 * math.prod(out) * math.prod(w[1:])
        a = _shape(node.args[1] if node.target in (aten.addmm.default, aten.baddbmm.default) else node.args[0])
        return 2 * math.prod(out) * (a[-1] if a else 1)
    return 0
