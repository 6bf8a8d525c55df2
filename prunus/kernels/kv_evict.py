"""In-place eviction at a full KV cache (`prunus.passes.kv.storage.LayerCache.replace`): in each (sequence, KV
head) one new entry overwrites the lowest-scored entry that is not protected.

Shapes: the cache score float [b, hk, n], pos int [b, hk, n], k [b, hk, n, d], v [b, hk, n, dv], all written
in place (they must not overlap themselves: no broadcast views); the new entry new_k [b, hk, 1, d],
new_v [b, hk, 1, dv], new_pos and new_score [b, hk, 1] (any strides), cast to the cache's dtypes. Entries at
positions below `sink` or from `recent_from` on are protected; among the others the first lowest score goes
(torch.argmin's rule), and slot 0 when all are protected.

The scores can first be updated by the step (`decay`, `add` [b, hk, n], any strides): score * decay + add (add
alone where decay is 0), written back before ranking; `new_score` None scores the new entry by its position. A
policy whose decode scores take that form (streaming, h2o, snapkv, tova, knorm: `Policy.decode_update`) then
pays one launch a layer for the whole eviction, not one for each term of its score.

On CUDA one Triton kernel per call (`kv_evict_triton`); the reference launches about ten (mask, argmin, four
scatters), which a decode step pays per layer. A plain function, not a torch.library op: it runs between
decode steps, never inside a graph.
"""
from __future__ import annotations

import functools

import torch


def updated_scores(score: torch.Tensor, decay: float, add: torch.Tensor | None) -> torch.Tensor:
    """score * decay + add: no term where add is None, add alone where decay is 0 (`score` itself where neither
    changes it)."""
    if decay == 0:
        if add is None:
            raise ValueError("decay 0 replaces the scores by `add`: pass it")
        return add
    if decay == 1 and add is None:
        return score
    return score * decay if add is None else score * decay + add


def replace_lowest_reference(score, pos, k, v, new_k, new_v, new_pos, new_score, sink: int, recent_from: int,
                             decay: float = 1.0, add: torch.Tensor | None = None):
    """Plain torch for any device: the definition the kernel is tested against."""
    updated = updated_scores(score, decay, add)
    if updated is not score:
        score.copy_(updated)
    if new_score is None:
        new_score = new_pos
    ranked = score.masked_fill((pos < sink) | (pos >= recent_from), float("inf"))
    slot = ranked.argmin(dim=-1, keepdim=True)  # [b, hk, 1]
    for old, new in ((k, new_k), (v, new_v), (pos, new_pos), (score, new_score)):
        index = slot if old.dim() == 3 else slot[..., None].expand(*slot.shape, old.shape[-1])
        old.scatter_(2, index, new.to(old.dtype))


@functools.cache
def _kernels():
    """The Triton kernel module, or None where Triton is missing (the reference then runs)."""
    try:
        from prunus.kernels import kv_evict_triton
    except ImportError:
        return None
    return kv_evict_triton


def replace_lowest(score: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, new_k: torch.Tensor,
                   new_v: torch.Tensor, new_pos: torch.Tensor, new_score: torch.Tensor | None, sink: int,
                   recent_from: int, decay: float = 1.0, add: torch.Tensor | None = None) -> None:
    fn = _kernels().replace_lowest if score.is_cuda and _kernels() is not None else replace_lowest_reference
    fn(score, pos, k, v, new_k, new_v, new_pos, new_score, sink, recent_from, decay, add)
