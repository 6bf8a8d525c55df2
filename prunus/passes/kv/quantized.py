"""A layer's KV cache stored KIVI-style (arXiv:2402.02750): quantized entries plus a full-precision residual.

Storage (the layout of `prunus.kernels.kv_quant`, G = group_size, B = bits): the oldest entries are packed
uint8 codes, keys per channel in groups of G tokens, values per token in groups of min(G, dv) channels, each
group with a scale and a minimum; the most recent entries stay in full precision (the residual). New entries
go to the residual; once it holds `residual + G` entries or more, its oldest entries are quantized, a whole
number of groups at a time, so that `residual` to `residual + G - 1` stay in full precision. Every entry is
quantized once and never requantized. Scales and minimums are stored in the cache's dtype when it is a 16-bit
float, else in bfloat16 (fp32's range in 2 bytes; the quantizer widens the grid to cover each group, so the
error stays within half a step).

Eviction (`shrink`, driven by any `kv_cache` policy): the policy ranks entries as for a full-precision
cache; quantized entries then leave a whole key group at a time, a group ranked by the sum of its entries'
scores (as ChunkKV ranks chunks) and protected if any entry is (a sink or the recent window), so no group is
ever split and requantized. Residual entries are the most recent ones; they are evicted one by one, by the
policy's ranking, only when no unprotected group is left to evict. Removing a group may take the cache up to
G - 1 entries below the budget; it never exceeds it. Every head of every sequence keeps the same number of
groups and residual entries (the tensors stay rectangular); which ones is chosen per head.
"""
from __future__ import annotations

import math

import torch

from prunus.kernels.kv_quant import (
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
    value_group,
)
from prunus.passes.kv.storage import gather_rows


def meta_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the scales and minimums for a cache of `cache_dtype`."""
    return cache_dtype if cache_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def quantized_bytes(n: int, num_kv_heads: int, head_dim: int, v_dim: int, cache_elem: int, quant: dict) -> int:
    """Bytes of one sequence's layer cache holding `n` entries under `quant` (the runtime's flush rule)."""
    bits, g, residual = quant["bits"], quant["group_size"], quant["residual"]
    n_q = max(0, (n - residual) // g * g)
    meta = 2  # a 16-bit scale or minimum (see `meta_dtype`)
    packed = n_q * (head_dim + v_dim) * bits // 8
    scales = 2 * meta * (n_q // g * head_dim + n_q * (v_dim // value_group(g, v_dim)))
    return num_kv_heads * (packed + scales + (n - n_q) * (head_dim + v_dim) * cache_elem)


class QuantizedLayerCache:
    """One layer's cache, quantized part then residual (the `LayerCache` interface the policies drive)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, *, bits: int, group_size: int,
                 residual: int):
        """Start with every entry of k [b, hk, n, d], v [b, hk, n, dv] in the residual (call `flush` after)."""
        self.bits, self.group, self.residual = bits, group_size, residual
        b, hk, _, d = k.shape
        dv, meta = v.shape[-1], meta_dtype(k.dtype)
        self.k_q = k.new_empty(b, hk, 0, d * bits // 8, dtype=torch.uint8)
        self.k_scale = k.new_empty(b, hk, 0, d, dtype=meta)
        self.k_min = torch.empty_like(self.k_scale)
        self.v_q = v.new_empty(b, hk, 0, dv * bits // 8, dtype=torch.uint8)
        self.v_scale = v.new_empty(b, hk, 0, dv // value_group(group_size, dv), dtype=meta)
        self.v_min = torch.empty_like(self.v_scale)
        self.k_res, self.v_res, self.pos = k, v, pos
        self.score: torch.Tensor | None = None

    @property
    def n_quantized(self) -> int:
        return self.k_q.shape[2]

    @property
    def length(self) -> int:
        return self.n_quantized + self.k_res.shape[2]

    @property
    def k(self) -> torch.Tensor:
        """All keys, dequantized (for scorers that read them; the decode graph reads the packed codes)."""
        deq = dequantize_keys(self.k_q, self.k_scale, self.k_min, self.bits, self.group)
        return torch.cat([deq.to(self.k_res.dtype), self.k_res], dim=2)

    @property
    def v(self) -> torch.Tensor:
        deq = dequantize_values(self.v_q, self.v_scale, self.v_min, self.bits, self.group)
        return torch.cat([deq.to(self.v_res.dtype), self.v_res], dim=2)

    def _quantized(self) -> tuple:
        return self.k_q, self.k_scale, self.k_min, self.v_q, self.v_scale, self.v_min

    def graph_inputs(self) -> tuple:
        return (*self._quantized(), self.k_res, self.v_res)

    def nbytes(self) -> int:
        """Packed codes, scales and minimums, and the full-precision residual."""
        return sum(t.numel() * t.element_size() for t in self.graph_inputs())

    def held_bytes(self) -> int:
        return self.nbytes()

    def head_lengths(self) -> torch.Tensor:
        return torch.full(self.k_res.shape[:2], self.length, dtype=torch.long)

    def append(self, k, v, pos, score=None) -> None:
        self.k_res = torch.cat([self.k_res, k], dim=2)
        self.v_res = torch.cat([self.v_res, v], dim=2)
        self.pos = torch.cat([self.pos, pos], dim=2)
        if self.score is not None and score is not None:
            self.score = torch.cat([self.score, score], dim=2)

    def flush(self) -> None:
        """Quantize the residual's oldest entries, whole groups, leaving `residual` to `residual + G - 1`."""
        m = (self.k_res.shape[2] - self.residual) // self.group * self.group
        if m <= 0:
            return
        meta = self.k_scale.dtype
        new = (*quantize_keys(self.k_res[:, :, :m], self.bits, self.group, meta),
               *quantize_values(self.v_res[:, :, :m], self.bits, self.group, meta))
        (self.k_q, self.k_scale, self.k_min, self.v_q, self.v_scale, self.v_min) = (
            torch.cat([old, part], dim=2) for old, part in zip(self._quantized(), new))
        self.k_res, self.v_res = self.k_res[:, :, m:].clone(), self.v_res[:, :, m:].clone()

    def shrink(self, ranked: torch.Tensor, budget: int) -> None:
        """Evict down to at most `budget` entries: whole quantized groups first, then residual entries."""
        excess = self.length - budget
        if excess <= 0:
            return
        g, n_q, r = self.group, self.n_quantized, self.k_res.shape[2]
        groups = n_q // g
        group_rank = ranked[..., :n_q].unflatten(-1, (groups, g)).sum(-1)
        evictable = int(group_rank.isfinite().sum(-1).min()) if groups else 0
        drop = min(groups, max(min(evictable, math.ceil(excess / g)), math.ceil((excess - r) / g)))
        from_residual = max(0, excess - drop * g)

        kept_groups = group_rank.topk(groups - drop, dim=-1).indices.sort(dim=-1).values
        tokens = (kept_groups[..., None] * g + torch.arange(g, device=ranked.device)).flatten(-2)
        self.k_q, self.v_q = gather_rows(self.k_q, tokens), gather_rows(self.v_q, tokens)
        self.k_scale, self.k_min = gather_rows(self.k_scale, kept_groups), gather_rows(self.k_min, kept_groups)
        self.v_scale, self.v_min = gather_rows(self.v_scale, tokens), gather_rows(self.v_min, tokens)

        kept_res = ranked[..., n_q:].topk(r - from_residual, dim=-1).indices.sort(dim=-1).values
        self.k_res, self.v_res = gather_rows(self.k_res, kept_res), gather_rows(self.v_res, kept_res)
        idx = torch.cat([tokens, n_q + kept_res], dim=-1)
        self.pos = self.pos.gather(2, idx)
        if self.score is not None:
            self.score = self.score.gather(2, idx)
