"""ToMe token merging (Bolya et al., 2023, "Token Merging: Your ViT But Faster") as graph nodes.

Bipartite soft matching: set A holds the odd positions past the sink tokens (never the last token), set B
the rest; each A token is matched to its most similar B token by cosine similarity of the layer's keys
(averaged over heads), the `r` best-matched A tokens are merged into their matches (size-weighted
average), and the survivors stay in their original order. Sizes travel on, and every later attention adds
log(size) to its logits (proportional attention), so a merged token weighs as the tokens it stands for.
Below keep 0.5 several matching rounds run at the same point (each merges at most half the tokens).
"""
from __future__ import annotations

import math
import operator
from fractions import Fraction

import torch
import torch.fx

from prunus.errors import PassError
from prunus.passes.tokens import graph_edit as ge
from prunus.passes.tokens.scores import sdpa_operands

aten = torch.ops.aten


def _rounds(ratio: float) -> list[float]:
    n = max(1, math.ceil(math.log(ratio) / math.log(0.5) - 1e-9)) if ratio < 1 else 1
    return [ratio ** (1 / n)] * n


def _merged(length, sink: int, keep: float, em: ge.Emitter | None = None):
    """Tokens merged away in one round: floor((length - sink - 1) * (1 - keep)), at most |A|."""
    frac = Fraction(1 - keep).limit_denominator(1000)
    if isinstance(length, int):
        return (length - sink - 1) * frac.numerator // frac.denominator
    base = em(operator.sub, length, sink + 1)
    return em(operator.floordiv, em(operator.mul, base, frac.numerator), frac.denominator)




def _take(em, x, idx, hidden: int | None):
    """x [b, n] or [b, n, hidden] at positions idx [b, k] along dim 1."""
    if hidden is None:
        return em(aten.gather.default, x, 1, idx)
    index = em(aten.expand.default, em(aten.unsqueeze.default, idx, -1), [-1, -1, hidden])
    return em(aten.gather.default, x, 1, index)


def _scatter_sum(em, x, dst, hidden: int | None):
    zeros = em(aten.zeros_like.default, x)
    if hidden is None:
        return em(aten.scatter_add.default, zeros, 1, dst, x)
    index = em(aten.expand.default, em(aten.unsqueeze.default, dst, -1), [-1, -1, hidden])
    return em(aten.scatter_add.default, zeros, 1, index, x)


def tome(em: ge.Emitter, point: torch.fx.Node, site, length, ratio: float, sink: int, pass_name: str):
    """Merge the stream at `point` down to `ratio` of its tokens.

    Returns (merged stream [b, k, h], surviving positions [b, k], sizes fp32 [b, k], k).
    """
    val = point.meta["val"]
    hidden = int(val.shape[2])
    if site.kind != "sdpa":
        raise PassError(pass_name, "tome reads the keys of an SDPA attention", node=site.node.name)
    keys = sdpa_operands(site.node)["k"]  # [b, hk, s, d]
    metric = em(aten.mean.dim, em(aten._to_copy.default, keys, dtype=torch.float32), [1])  # [b, s, d]
    dim = int(keys.meta["val"].shape[-1])
    x = em(aten._to_copy.default, point, dtype=torch.float32)
    sizes = em(aten.ones_like.default, em(aten.select.int, x, 2, 0))
    pos = em.arange(length)
    kept = em(aten.expand.default, em(aten.unsqueeze.default, pos, 0), [em.size(point, 0), -1])
    n = length
    for keep in _rounds(ratio):
        r = _merged(n, sink, keep, em)
        pos = em.arange(n)
        rev = em(aten.flip.default, pos, [0])
        in_a = em(aten.bitwise_and.Tensor, em(aten.eq.Scalar, em(aten.remainder.Scalar, pos, 2), 1),
                  em(aten.bitwise_and.Tensor, em(aten.ge.Scalar, pos, sink), em(aten.gt.Scalar, rev, 0)))
        unit = em(aten.div.Tensor, metric, em(aten.clamp_min.default,
                                              em(aten.linalg_vector_norm.default, metric, 2, [-1], True), 1e-6))
        sim = em(aten.bmm.default, unit, em(aten.transpose.int, unit, 1, 2))  # [b, n, n]
        sim = em(aten.masked_fill.Scalar, sim, em(aten.view.default, in_a, [1, 1, n]), -math.inf)
        best = em(aten.max.dim, sim, -1)
        best_sim = em(aten.masked_fill.Scalar, em(operator.getitem, best, 0),
                      em(aten.logical_not.default, in_a), -math.inf)
        merged = em(operator.getitem, em(aten.topk.default, best_sim, r, -1, True, False), 1)  # [b, r]
        ident = em(aten.expand.default, em(aten.unsqueeze.default, pos, 0), [em.size(point, 0), -1])
        dst = em(aten.scatter.src, ident, 1, merged, em(aten.gather.default, em(operator.getitem, best, 1), 1, merged))
        flags = em(aten.scatter.value, em(aten.ones_like.default, sizes), 1, merged, 0.0)
        n = n - r if isinstance(n, int) else em(operator.sub, n, r)
        idx = ge.select(em, flags, n)
        weights = em(aten.unsqueeze.default, sizes, -1)
        new_sizes = _take(em, _scatter_sum(em, sizes, dst, None), idx, None)
        norm = em(aten.unsqueeze.default, new_sizes, -1)
        x = em(aten.div.Tensor, _take(em, _scatter_sum(em, em(aten.mul.Tensor, x, weights), dst, hidden), idx, hidden),
               norm)
        metric = em(aten.div.Tensor, _take(em, _scatter_sum(em, em(aten.mul.Tensor, metric, weights), dst, dim), idx,
                                           dim), norm)
        sizes = new_sizes
        kept = em(aten.gather.default, kept, 1, idx)
    stream = em(aten._to_copy.default, x, dtype=val.dtype)
    return stream, kept, sizes, n


def proportional_attention(em: ge.Emitter, region: set, sizes: torch.fx.Node, pass_name: str) -> int:
    """Add log(size) of each key to the logits of every attention in `region` (after rewiring)."""
    count = 0
    for node in list(region):
        if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
            continue
        ops = sdpa_operands(node)
        if ops["is_causal"]:
            raise PassError(pass_name, "proportional attention needs a bidirectional attention", node=node.name)
        bias = em(aten.unsqueeze.default, em(aten.unsqueeze.default, em(aten.log.default, sizes), 1), 1)
        bias = em(aten._to_copy.default, bias, dtype=ops["q"].meta["val"].dtype)
        mask = ops["mask"]
        if mask is None:
            new = bias
        elif _dtype(mask) == torch.bool:
            new = em(aten.where.ScalarOther, mask, bias, -math.inf)
        else:
            new = em(aten.add.Tensor, mask, bias)
        if len(node.args) > 3:
            node.args = node.args[:3] + (new,) + node.args[4:]
        else:
            node.kwargs = {**node.kwargs, "attn_mask": new}
        count += 1
    return count


def _dtype(node: torch.fx.Node) -> torch.dtype:
    """The dtype of a node, looking through gathers and expands the pass created (they carry no meta yet)."""
    while "val" not in node.meta:
        node = node.args[0]
    return node.meta["val"].dtype
