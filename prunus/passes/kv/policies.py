"""KV-cache policies: which entries a layer keeps, as a scorer over shared selection machinery.

Every policy keeps, per layer and per KV head, at most `budget` entries of the cache (a compacted
[b, kv_heads, budget, d] tensor: the memory really shrinks). Entries are scored (higher is kept) at
prefill end from what the prefill graph reports, and again at every decode step from the attention
the new tokens paid; when a layer holds more than its budget, the lowest-scored entries go. The first
`sink` positions and the last `window` positions are never evicted. Keys are cached after RoPE, so an
entry stays valid wherever it sits; kept entries are stored in position order. Under `kv_quant` a layer's
cache is a `quantized.QuantizedLayerCache`: the same ranking, but quantized entries leave a key group at a time.

Scorers (ALGORITHMS.md section 3):
- streaming (StreamingLLM): score = position: sinks plus the most recent entries.
- h2o (H2O): attention accumulated over all queries so far (prefill: all prompt queries).
- tova (TOVA): the attention of the latest query only.
- snapkv (SnapKV): at prefill end, attention of the last `window` queries, smoothed with a 1-D average
  pool of width `pool` so neighbours survive together.
- pyramidkv (PyramidKV): SnapKV scores, budgets shrinking linearly with depth (mean = budget).
- chunkkv (ChunkKV): SnapKV scores summed over the heads and over chunks of `chunk` tokens, whole chunks kept
  (every head keeps the same chunks); layers in groups of `reuse` share the first layer's selection.
- vatp (VATP): SnapKV attention times the value's L1 norm.
- knorm: score = -||k||_2 (low-norm keys draw attention).
In decoding, the window-query scorers (snapkv, pyramidkv, chunkkv, vatp) keep a running score
`score * (1 - 1/window) + attention`: the attention of roughly the last `window` queries, the decode-time
analogue of their observation window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ALL_QUERIES = 2 ** 31 - 1  # prefill window meaning "every query" (H2O)


@dataclass
class LayerCache:
    """One layer's kept entries: k [b, hk, n, d], v [b, hk, n, dv], their positions and scores [b, hk, n]."""
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    score: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def append(self, k, v, pos, score=None) -> None:
        self.k = torch.cat([self.k, k], dim=2)
        self.v = torch.cat([self.v, v], dim=2)
        self.pos = torch.cat([self.pos, pos], dim=2)
        if self.score is not None and score is not None:
            self.score = torch.cat([self.score, score], dim=2)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep entries `idx` [b, hk, m] (any order; stored sorted by position)."""
        idx = idx.sort(dim=-1).values
        self.k, self.v = gather_rows(self.k, idx), gather_rows(self.v, idx)
        self.pos = self.pos.gather(2, idx)
        if self.score is not None:
            self.score = self.score.gather(2, idx)

    def shrink(self, ranked: torch.Tensor, budget: int) -> None:
        """Keep the `budget` entries ranked highest (`ranked` [b, hk, n]: scores, inf where protected)."""
        self.keep(ranked.topk(budget, dim=-1).indices)

    def graph_inputs(self) -> tuple:
        """The tensors the decode graph takes for this layer's cache."""
        return self.k, self.v


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` [b, hk, m] of x [b, hk, n, c] along the sequence dim."""
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


class Policy:
    """Base: no scores, no budget (the full cache)."""

    prefill_window: int | None = None  # last queries whose attention the prefill graph must report
    decode_probs = False  # whether decoding needs each step's attention probabilities

    def __init__(self, *, budget: int = 0, ratio: float = 0.0, sink: int = 4, window: int = 32, pool: int = 7,
                 chunk: int = 10, reuse: int = 2, num_layers: int = 1):
        self.budget, self.ratio, self.sink, self.window = budget, ratio, sink, window
        self.pool, self.chunk, self.reuse, self.num_layers = pool, chunk, reuse, num_layers
        self.budgets: list[int | None] = [None] * num_layers

    # -- budgets --------------------------------------------------------------------------------
    def layer_budgets(self, context: int) -> list[int | None]:
        """Entries each layer may keep, fixed at prefill (a ratio is of the prompt length)."""
        if not self.budget and not self.ratio:
            return [None] * self.num_layers
        total = self.budget or math.ceil(self.ratio * context)
        total = max(total, self.sink + self.window)
        return [total] * self.num_layers

    # -- scores ---------------------------------------------------------------------------------
    def prefill_score(self, i: int, cache: LayerCache, scores: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def decode_score(self, i: int, cache: LayerCache, probs_old, k_new, v_new, probs_new, pos_new):
        """(updated scores of the cached entries, scores of the new entries)."""
        raise NotImplementedError

    # -- driving --------------------------------------------------------------------------------
    def after_prefill(self, caches: list[LayerCache], scores: list | None, context: int) -> None:
        self.budgets = self.layer_budgets(context)
        for i, cache in enumerate(caches):
            if self.budgets[i] is None:
                continue
            cache.score = self.prefill_score(i, cache, scores[i] if scores else None).float()
            self._evict(cache, self.budgets[i], context)

    def after_step(self, caches: list[LayerCache], new: list, probs: list | None, position: int) -> None:
        """Append each layer's new (k, v) entries at positions before `position`, then evict to the budget."""
        for i, (cache, (k, v)) in enumerate(zip(caches, new)):
            b, hk, t = k.shape[:3]
            pos = torch.arange(position - t, position, device=k.device).expand(b, hk, t)
            if self.budgets[i] is None:
                cache.append(k, v, pos)
                continue
            n = cache.length
            p = probs[i] if probs else None
            old, fresh = self.decode_score(i, cache, None if p is None else p[..., :n], k, v,
                                           None if p is None else p[..., n:], pos)
            cache.score = old.float()
            cache.append(k, v, pos, fresh.float())
            self._evict(cache, self.budgets[i], position)

    def _evict(self, cache: LayerCache, budget: int, position: int) -> None:
        if cache.length <= budget:
            return
        protected = (cache.pos < self.sink) | (cache.pos >= position - self.window)
        cache.shrink(cache.score.masked_fill(protected, float("inf")), budget)


class Full(Policy):
    """Keep everything."""

    def layer_budgets(self, context):
        return [None] * self.num_layers


class Streaming(Policy):
    def prefill_score(self, i, cache, scores):
        return cache.pos.float()

    def decode_score(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        return cache.score, pos_new.float()


class H2O(Policy):
    prefill_window = ALL_QUERIES
    decode_probs = True

    def prefill_score(self, i, cache, scores):
        return scores

    def decode_score(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        return cache.score + probs_old, probs_new


class TOVA(Policy):
    prefill_window = 1
    decode_probs = True

    def prefill_score(self, i, cache, scores):
        return scores

    def decode_score(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        return probs_old, probs_new


class SnapKV(Policy):
    decode_probs = True

    @property
    def prefill_window(self):
        return self.window

    def pooled(self, scores: torch.Tensor) -> torch.Tensor:
        if self.pool <= 1:
            return scores
        b, hk, n = scores.shape
        flat = scores.reshape(b * hk, 1, n)
        pooled = F.avg_pool1d(flat, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)
        return pooled[..., :n].reshape(b, hk, n)

    def prefill_score(self, i, cache, scores):
        return self.pooled(scores)

    def decode_score(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        decay = 1.0 - 1.0 / max(self.window, 1)
        return cache.score * decay + probs_old, probs_new


class PyramidKV(SnapKV):
    beta = 20  # the smallest layer budget is budget / beta (PyramidKV's default)

    def layer_budgets(self, context):
        flat = super().layer_budgets(context)
        if flat[0] is None or self.num_layers == 1:
            return flat
        mean, floor = flat[0], self.sink + self.window
        low = max(floor, mean // self.beta)
        high = 2 * mean - low
        steps = self.num_layers - 1
        return [max(floor, round(high - (high - low) * i / steps)) for i in range(self.num_layers)]


class ChunkKV(SnapKV):
    def __init__(self, **kw):
        super().__init__(**kw)
        self._group_scores = None

    def prefill_score(self, i, cache, scores):
        if i % max(self.reuse, 1) == 0 or self._group_scores is None:
            token = scores.sum(dim=1, keepdim=True)  # [b, 1, n]: every head keeps the same chunks
            b, _, n = token.shape
            pad = (-n) % self.chunk
            chunks = F.pad(token, (0, pad)).reshape(b, 1, -1, self.chunk).sum(-1)
            per_token = chunks.repeat_interleave(self.chunk, dim=-1)[..., :n]
            # ties inside a chunk break towards its later tokens, so whole chunks go together
            self._group_scores = per_token + 1e-6 * torch.arange(n, device=token.device) / max(n, 1)
        return self._group_scores.expand(cache.pos.shape).clone()


class VATP(SnapKV):
    def prefill_score(self, i, cache, scores):
        return self.pooled(scores) * cache.v.float().abs().sum(-1)

    def decode_score(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        decay = 1.0 - 1.0 / max(self.window, 1)
        return (cache.score * decay + probs_old * cache.v.float().abs().sum(-1),
                probs_new * v_new.float().abs().sum(-1))


class KNorm(Policy):
    def prefill_score(self, i, cache, scores):
        return -cache.k.float().norm(dim=-1)

    def decode_score(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        return cache.score, -k_new.float().norm(dim=-1)


POLICIES = {"full": Full, "streaming": Streaming, "h2o": H2O, "tova": TOVA, "snapkv": SnapKV,
            "pyramidkv": PyramidKV, "chunkkv": ChunkKV, "vatp": VATP, "knorm": KNorm}
