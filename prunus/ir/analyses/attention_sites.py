"""Attention sites: for each attention, its q/k/v/o projections, RoPE, GQA repeat, mask and layer index.

Finds both `scaled_dot_product_attention` and explicit matmul -> softmax -> matmul attention, then walks
from the op's q/k/v inputs back (and from its output forward) through data-moving ops to the nearest
matmul with a weight. Fused projections (one matmul split into q, k, v) resolve to the same node.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.fx

from prunus.ir.graph import layer_index, module_path
from prunus.ir.ops import MATMUL, REPEAT, ROPE_MARKERS, SOFTMAX, TRANSPARENT, ATTENTION, weight_of

aten = torch.ops.aten


@dataclass
class AttentionSite:
    layer: int
    node: torch.fx.Node  # the SDPA op, or the softmax of an explicit attention
    kind: str  # "sdpa" or "explicit"
    q_proj: torch.fx.Node | None
    k_proj: torch.fx.Node | None
    v_proj: torch.fx.Node | None
    o_proj: torch.fx.Node | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool = False
    gqa_repeat: list = field(default_factory=list)  # repeat/expand nodes on the k and v paths
    mask: torch.fx.Node | None = None
    is_causal: bool = False
    module: str = ""

    @property
    def fused_qkv(self) -> bool:
        return self.q_proj is not None and self.q_proj is self.k_proj


def _walk_back(graph, start, *, stop_at_any_matmul=False):
    """BFS from `start` against the data flow through transparent ops; returns (projection, visited)."""
    seen, queue = set(), deque([start])
    while queue:
        n = queue.popleft()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op != "call_function":
            continue
        if n.target in MATMUL and (stop_at_any_matmul or weight_of(graph, n) is not None):
            return n, seen
        if n.target in TRANSPARENT:
            queue.extend(n.all_input_nodes)
    return None, seen


def _walk_forward(graph, start):
    seen, queue = set(), deque(start.users)
    while queue:
        n = queue.popleft()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if n.target in MATMUL and weight_of(graph, n) is not None:
            return n
        if n.target in TRANSPARENT:
            queue.extend(n.users)
    return None


def _shape(node) -> tuple:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _int(x) -> int:
    return int(x) if not isinstance(x, torch.SymInt) else int(x.node.hint if x.node.hint is not None else -1)


def _explicit_operands(graph, softmax: torch.fx.Node):
    """(q, k, v, out, mask) for softmax between `q @ k^T` and `p @ v`, or None if it is not attention."""
    scores, seen = _walk_back(graph, softmax.args[0], stop_at_any_matmul=True)
    if scores is None or weight_of(graph, scores) is not None:
        return None
    out = None
    queue, visited = deque(softmax.users), set()
    while queue:
        n = queue.popleft()
        if n in visited or n.op != "call_function":
            continue
        visited.add(n)
        if n.target in MATMUL:
            out = n if weight_of(graph, n) is None and n.args[0] in visited | {softmax} else None
            break
        if n.target in TRANSPARENT:
            queue.extend(n.users)
    if out is None:
        return None
    mask = None
    for n in seen:
        if n.op == "call_function" and n.target == aten.add.Tensor:
            other = [a for a in n.args if isinstance(a, torch.fx.Node) and a not in seen]
            if other:
                mask = other[0]
    k = scores.args[1]
    return scores.args[0], k, out.args[1], out, mask


def attention_sites(graph) -> list[AttentionSite]:
    sites = []
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in ATTENTION:
            q, k, v = node.args[:3]
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            is_causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
            out, kind = node, "sdpa"
            enable_gqa = node.kwargs.get("enable_gqa", False)
        elif node.target in SOFTMAX:
            found = _explicit_operands(graph, node)
            if found is None:
                continue
            q, k, v, out, mask = found
            is_causal, kind, enable_gqa = False, "explicit", False
        else:
            continue
        q_proj, q_seen = _walk_back(graph, q)
        k_proj, k_seen = _walk_back(graph, k)
        v_proj, v_seen = _walk_back(graph, v)
        repeats = [n for n in (k_seen | v_seen) if n.op == "call_function" and n.target in REPEAT]
        q_shape = _shape(q)
        num_heads = _int(q_shape[1]) if len(q_shape) == 4 else 1
        head_dim = _int(q_shape[-1]) if q_shape else 0
        k_shape = _shape(k)
        num_kv = _int(k_shape[1]) if len(k_shape) == 4 else num_heads
        if repeats and not enable_gqa:
            expand_in = [_shape(n.args[0]) for n in repeats if n.target == aten.expand.default]
            five_d = [s for s in expand_in if len(s) == 5]
            if five_d:
                num_kv = _int(five_d[0][1])
        path = module_path(node)
        sites.append(AttentionSite(
            layer=-1, node=node, kind=kind, q_proj=q_proj, k_proj=k_proj, v_proj=v_proj,
            o_proj=_walk_forward(graph, out), num_heads=num_heads, num_kv_heads=num_kv, head_dim=head_dim,
            rope=any(n.op == "call_function" and n.target in ROPE_MARKERS for n in q_seen | k_seen),
            gqa_repeat=sorted(repeats, key=lambda n: n.name), mask=mask if isinstance(mask, torch.fx.Node) else None,
            is_causal=is_causal, module=path,
        ))
    for order, site in enumerate(sites):
        idx = layer_index(site.module)
        site.layer = idx if idx is not None else order
    return sites
