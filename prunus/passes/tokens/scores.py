"""Token scorers, each emitting ATen nodes that compute a [batch, tokens] fp32 importance (higher = keep).

- `received_attention`: the attention probability each key receives from a set of queries (the last
  `window` for decoders, FastV / LazyLLM; the first (CLS) or all queries for encoders), summed over heads
  and queries. The captured graphs call fused SDPA, which never materialises probabilities, so they are
  recomputed explicitly from the site's q and k (after RoPE), with its mask or causal flag and scale.
- `pagerank`: Zero-TPrune's weighted PageRank over the head-averaged attention graph (Wang et al., 2024,
  "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph").
- `transition`: TransPrune's token transition variation, |x_out - x_in| / |x_in| across a layer (Li et al.,
  2025, "TransPrune"), which needs no attention probabilities.
Cascade (SpAtten) sums `received_attention` over layers; GemFilter reuses it at a selection layer.
"""
from __future__ import annotations

import math

import torch
import torch.fx

from prunus.passes.tokens.graph_edit import Emitter

aten = torch.ops.aten
_END = 2 ** 63 - 1


def sdpa_operands(node: torch.fx.Node) -> dict:
    """q, k, mask, is_causal, scale and GQA flag of an SDPA call, whichever way they were passed."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return {"q": bound["query"], "k": bound["key"], "mask": bound.get("attn_mask"),
            "is_causal": bool(bound.get("is_causal", False)), "scale": bound.get("scale"),
            "gqa": bool(bound.get("enable_gqa", False))}


def _rows(em: Emitter, x: torch.fx.Node, dim: int, queries: str, window: int) -> torch.fx.Node:
    if queries == "last":
        return em(aten.slice.Tensor, x, dim, -window, _END)
    if queries == "first":
        return em(aten.slice.Tensor, x, dim, 0, 1)
    return x


def attention_probs(em: Emitter, site, queries: str, window: int, length) -> torch.fx.Node:
    """fp32 [b, h, q, s]: the attention probabilities of the chosen queries at `site` (all keys)."""
    if site.kind == "explicit":  # the softmax is in the graph already
        probs = em(aten._to_copy.default, site.node, dtype=torch.float32)
        return _rows(em, probs, 2, queries, window)
    ops = sdpa_operands(site.node)
    q, k = ops["q"], ops["k"]
    qv, kv = q.meta["val"], k.meta["val"]
    scale = ops["scale"] if ops["scale"] is not None else 1.0 / math.sqrt(int(qv.shape[-1]))
    qf = _rows(em, em(aten._to_copy.default, q, dtype=torch.float32), 2, queries, window)
    kf = em(aten._to_copy.default, k, dtype=torch.float32)
    heads, kv_heads = int(qv.shape[1]), int(kv.shape[1])
    if heads != kv_heads:
        kf = em(aten.repeat_interleave.self_int, kf, heads // kv_heads, 1)
    logits = em(aten.mul.Scalar, em(aten.matmul.default, qf, em(aten.transpose.int, kf, -1, -2)), scale)
    mask = ops["mask"]
    if isinstance(mask, torch.fx.Node):
        mv = mask.meta["val"]
        rows = _rows(em, mask, 2, queries, window) if mv.shape[2] != 1 else mask
        if mv.dtype == torch.bool:
            logits = em(aten.masked_fill.Scalar, logits, em(aten.logical_not.default, rows), -math.inf)
        else:
            logits = em(aten.add.Tensor, logits, em(aten._to_copy.default, rows, dtype=torch.float32))
    if ops["is_causal"]:
        pos = em.arange(length)
        qpos = em(aten.unsqueeze.default, _rows(em, pos, 0, queries, window), 1)
        future = em(aten.gt.Tensor, em(aten.unsqueeze.default, pos, 0), qpos)
        logits = em(aten.masked_fill.Scalar, logits, future, -math.inf)
    return em(aten._softmax.default, logits, -1, False)


def received_attention(em: Emitter, site, queries: str, window: int, length) -> torch.fx.Node:
    """fp32 [b, s]: attention each token receives from the chosen queries, summed over heads and queries."""
    return em(aten.sum.dim_IntList, attention_probs(em, site, queries, window, length), [1, 2])


def pagerank(em: Emitter, site, length, iterations: int = 20) -> torch.fx.Node:
    """fp32 [b, s]: weighted PageRank of the head-averaged attention graph (token j gains from the queries
    attending to it, weighted by their own importance), from the uniform start."""
    graph = em(aten.mean.dim, attention_probs(em, site, "all", 0, length), [1])  # [b, s, s]
    score = em(aten.mean.dim, graph, [1], True)  # one step from uniform: [b, 1, s]
    for _ in range(iterations - 1):
        score = em(aten.bmm.default, score, graph)
        score = em(aten.div.Tensor, score, em(aten.sum.dim_IntList, score, [-1], True))
    return em(aten.squeeze.dim, score, 1)


def transition(em: Emitter, entry: torch.fx.Node, exit_: torch.fx.Node) -> torch.fx.Node:
    """fp32 [b, s]: |exit - entry| / |entry| per token across one layer."""
    x_in = em(aten._to_copy.default, entry, dtype=torch.float32)
    x_out = em(aten._to_copy.default, exit_, dtype=torch.float32)
    change = em(aten.linalg_vector_norm.default, em(aten.sub.Tensor, x_out, x_in), 2, [-1])
    base = em(aten.clamp_min.default, em(aten.linalg_vector_norm.default, x_in, 2, [-1]), 1e-6)
    return em(aten.div.Tensor, change, base)
