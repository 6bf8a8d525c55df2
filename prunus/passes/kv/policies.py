"""KV-cache policies: which entries a layer keeps, as a scorer over shared selection machinery.

The uniform policies keep, per layer and per KV head, at most `budget` entries of the cache (a compacted
[b, kv_heads, budget, d] tensor: the memory really shrinks; adakv and duo budget per head, see below). Entries are scored (higher is kept) at
prefill end from what the prefill graph reports, and again at every decode step from the attention
the new tokens paid; when a layer holds more than its budget, the lowest-scored entries go. The first
`sink` positions and the last `window` positions are never evicted. Keys are cached after RoPE, so an
entry stays valid wherever it sits; kept entries are stored in position order. Under `kv_quant` a layer's
cache is a `quantized.QuantizedLayerCache`: the same ranking, but quantized entries leave a key group at a time.

Scorers (ALGORITHMS.md section 3):
- streaming (StreamingLLM): score = position: sinks plus the most recent entries.
- h2o (H2O): attention accumulated over all queries so far (prefill: all prompt queries).
- tova (TOVA): the attention of the latest query only, averaged over the layer's heads.
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

Per-head budgets and key channels (their layouts are in `storage.py`):
- adakv (Ada-KV, arXiv:2407.11550): SnapKV scores, but a layer's `budget x kv_heads` entries are shared by its
  heads: a flattened top-k over all heads' scores, each head first keeping its sinks, its window and the
  `FLOOR` fraction of the budget it ranks highest (Ada-KV's safeguard). Heads end up with different lengths
  (`RaggedLayerCache`); new entries go to each head's own end and eviction keeps the per-layer total.
- think (ThinK, arXiv:2407.21018): prunes key channels. Per head, channel j scores
  ||Q_obs[:, j] K[:, j]^T||_F = ||Q_obs[:, j]|| ||K[:, j]|| (Q_obs: the last `window` queries of the prompt, of
  all query heads of the group); the top `key_ratio` fraction of the channels is kept for good (`ChannelCache`).
  As in ThinK, the last `window` entries keep every channel; an entry is pruned when it leaves the window, and
  decoding computes q.k over the kept channels for pruned entries (`pruned_keys.py`). Tokens: with a budget or
  ratio, SnapKV's selection; without one, every token.
- kvzip (KVzip, arXiv:2505.23416): query-agnostic. After prefill the prompt is fed again after itself (positions
  s .. 2s - 1) through the decode graph, as the model reconstructing its context; an entry scores the attention
  the reconstruction pays it, summed over its queries and the group's query heads (KVzip takes the maximum; the
  prompt has no "repeat the context" instruction, as a pass has no tokenizer). Costs a second pass over the prompt
  whose attention spans 2s entries; the reconstruction's own entries are dropped. Decoding: SnapKV's running score.
- duo (DuoAttention, arXiv:2410.10819): retrieval heads keep every entry, streaming heads their sinks and most
  recent entries up to `budget` (default sink + window). Which heads retrieve is decided once per graph
  (`duo.py`) and recorded in the spec (`retrieval_heads`); each group has its own cache (`HeadGroupCache`).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from prunus.kernels.kv_evict import updated_scores
from prunus.passes.kv.storage import ChannelCache, HeadGroupCache, LayerCache, RaggedLayerCache

ALL_QUERIES = 2 ** 31 - 1  # prefill window meaning "every query" (H2O)


def new_positions(position: int):
    """(b, hk, t, device) -> the positions [b, hk, t] of a step's t new entries, the last one `position - 1`;
    each shape is built once and shared by the layers (the caches copy it, nothing writes into it)."""
    @functools.cache
    def positions(b: int, hk: int, t: int, device: torch.device) -> torch.Tensor:
        return torch.arange(position - t, position, device=device).expand(b, hk, t)
    return positions


class Policy:
    """Base: no scores, no budget (the full cache)."""

    prefill_window: int | None = None  # last queries whose attention the prefill graph must report
    decode_probs = False  # whether decoding needs each step's attention probabilities
    query_window: int | None = None  # last queries whose per-channel norms the prefill graph must report
    reconstruct = False  # scores come from feeding the prompt again after itself (KVzip), through the decode graph
    ragged = False  # heads hold different numbers of entries: the decode graph takes their lengths
    grouped = False  # heads split into groups cached apart (`head_groups`): the decode graph attends per group
    key_channels = False  # older keys keep some channels only: the decode graph takes them (and the recent keys)

    def __init__(self, *, budget: int = 0, ratio: float = 0.0, sink: int = 4, window: int = 32, pool: int = 7,
                 chunk: int = 10, reuse: int = 2, slack: int = 0, num_layers: int = 1):
        self.budget, self.ratio, self.sink, self.window = budget, ratio, sink, window
        self.slack = slack  # decoding lets a layer grow this far past its budget before evicting back to it
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

    def head_groups(self, num_kv_heads: list[int]) -> list[list[list[int]]] | None:
        """Per layer, the KV heads of each separately cached group (None: one cache for all heads)."""
        return None

    def key_width(self, head_dim: int) -> int:
        """Key channels kept per head (by the entries a policy prunes)."""
        return head_dim

    def key_elements(self, entries: int, num_kv_heads: int, head_dim: int) -> int:
        """Key elements a layer holds for `entries` entries over its heads."""
        return entries * head_dim

    def layer_entries(self, context: int, num_kv_heads: list[int]) -> list[int]:
        """Entries each layer holds over all its KV heads once a `context`-token prompt is compressed."""
        return [hk * (context if b is None else min(b, context))
                for hk, b in zip(num_kv_heads, self.layer_budgets(context))]

    @classmethod
    def quantizable(cls) -> bool:
        """Whether `kv_quant`'s rectangular, full-width storage can hold this policy's cache."""
        return not (cls.ragged or cls.key_channels or cls.grouped)

    # -- scores ---------------------------------------------------------------------------------
    def prefill_score(self, i: int, cache: LayerCache, scores: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def decode_score(self, i: int, cache: LayerCache, probs_old, k_new, v_new, probs_new, pos_new):
        """(updated scores of the cached entries, scores of the new entries); by default from `decode_update`."""
        update = self.decode_update(i, cache, probs_old, k_new, v_new, probs_new, pos_new)
        if update is None:
            raise NotImplementedError
        decay, add, fresh = update
        return updated_scores(cache.score, decay, add), pos_new.float() if fresh is None else fresh

    def decode_update(self, i: int, cache: LayerCache, probs_old, k_new, v_new, probs_new, pos_new):
        """A decode step's scores as (decay, add, fresh): the cached entries' become score * decay + add (no
        term where add is None; add alone where decay is 0), the new entries' `fresh` (None: their positions).
        At the budget the in-place eviction applies it in the pass that ranks the entries, one launch a layer
        (`LayerCache.replace`). None where a policy's scores take another form (it overrides `decode_score`)."""
        return None

    # -- driving --------------------------------------------------------------------------------
    def after_prefill(self, caches: list[LayerCache], scores: list | None, context: int,
                      query_norms: list | None = None) -> None:
        """Score and evict each layer's prefill entries (a policy may replace a cache by another layout)."""
        self.budgets = self.layer_budgets(context)
        for i, cache in enumerate(caches):
            if self.budgets[i] is None:
                continue
            cache.score = self.prefill_score(i, cache, scores[i] if scores else None).float()
            self._evict(cache, self.budgets[i], context)

    def after_step(self, caches: list[LayerCache], new: list, probs: list | None, position: int) -> None:
        """Append each layer's new (k, v) entries at positions before `position`, then evict to the budget."""
        positions = new_positions(position)
        fusable = type(self).decode_score is Policy.decode_score  # a decode_score of its own is the rule
        for i, (cache, (k, v)) in enumerate(zip(caches, new)):
            pos = positions(*k.shape[:3], k.device)
            if self.budgets[i] is None:
                cache.append(k, v, pos)
                continue
            n = cache.length
            p = probs[i] if probs else None
            scored = (i, cache, None if p is None else p[..., :n], k, v, None if p is None else p[..., n:], pos)
            if fusable and self._in_place(cache, k, self.budgets[i]) and \
                    (update := self.decode_update(*scored)) is not None:
                decay, add, fresh = update
                cache.replace(k, v, pos, fresh, self.sink, self.recent_from(position), decay, add)
                continue
            old, fresh = self.decode_score(*scored)
            cache.score = old.float()
            self._add(cache, k, v, pos, fresh.float(), self.budgets[i], position)

    def _in_place(self, cache: LayerCache, k, budget: int) -> bool:
        """Whether a step's entry replaces an evicted one in place: one new token at the budget."""
        return k.shape[2] == 1 and not self.slack and cache.length == budget and type(cache) is LayerCache

    def _add(self, cache: LayerCache, k, v, pos, score, budget: int, position: int) -> None:
        """Append new entries and evict back to `budget`; at the budget, one entry in and one out, the new one
        overwrites the evicted slot in place (`LayerCache.replace`) instead of a cat and a gather of the cache."""
        if self._in_place(cache, k, budget):
            cache.replace(k, v, pos, score, self.sink, self.recent_from(position))
            return
        cache.append(k, v, pos, score)
        self._evict(cache, budget, position, self.slack)

    def protected(self, pos: torch.Tensor, position: int) -> torch.Tensor:
        """Entries never evicted: the first `sink` positions and the last `window` (at least the newest one,
        whose own attention has not been scored yet) before `position`."""
        return (pos < self.sink) | (pos >= self.recent_from(position))

    def recent_from(self, position: int) -> int:
        """The first position of the protected recent window."""
        return position - max(self.window, 1)

    def _evict(self, cache: LayerCache, budget: int, position: int, slack: int = 0) -> None:
        """Back to `budget` entries once the cache holds more than `budget + slack`."""
        if cache.length <= budget + slack:
            return
        protected = self.protected(cache.pos, position)
        cache.shrink(cache.score.masked_fill(protected, float("inf")), budget)


class Full(Policy):
    """Keep everything."""

    def layer_budgets(self, context):
        return [None] * self.num_layers


class Streaming(Policy):
    def prefill_score(self, i, cache, scores):
        return cache.pos.float()

    def decode_update(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        return 1.0, None, None


class H2O(Policy):
    prefill_window = ALL_QUERIES
    decode_probs = True

    def prefill_score(self, i, cache, scores):
        return scores

    def decode_update(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        return 1.0, probs_old, probs_new


class TOVA(Policy):
    """The latest query's attention averaged over the layer's heads (TOVA's reference code): every head of a
    layer keeps the same positions. Scoring each KV head on its own loses the passkey on SmolLM2 where the
    averaged form finds it (benchmarks/kv_kvpress.py)."""
    prefill_window = 1
    decode_probs = True

    @staticmethod
    def _head_mean(x):
        return x.mean(dim=1, keepdim=True).expand(x.shape)

    def prefill_score(self, i, cache, scores):
        return self._head_mean(scores)

    def decode_update(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        return 0.0, self._head_mean(probs_old), self._head_mean(probs_new)


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

    def decode_update(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        return 1.0 - 1.0 / max(self.window, 1), probs_old, probs_new


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

    def decode_update(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        decay, _, _ = super().decode_update(i, cache, probs_old, k_new, v_new, probs_new, pos_new)
        return decay, probs_old * cache.v.float().abs().sum(-1), probs_new * v_new.float().abs().sum(-1)


class KNorm(Policy):
    def prefill_score(self, i, cache, scores):
        return -cache.k.float().norm(dim=-1)

    def decode_update(self, i, cache, probs_old, k_new, v_new, probs_new, pos_new):
        return 1.0, None, -k_new.float().norm(dim=-1)


class KVzip(SnapKV):
    prefill_window = None
    reconstruct = True

    def prefill_score(self, i, cache, scores):
        return scores


class AdaKV(SnapKV):
    ragged = True
    FLOOR = 0.2  # each head keeps at least this fraction of the even per-head budget (Ada-KV's safeguard)

    def after_prefill(self, caches, scores, context, query_norms=None):
        for i, cache in enumerate(caches):
            caches[i] = RaggedLayerCache(cache, torch.ones_like(cache.pos, dtype=torch.bool))
        super().after_prefill(caches, scores, context)

    def _evict(self, cache: RaggedLayerCache, budget: int, position: int, slack: int = 0) -> None:
        """Keep the layer's `budget x kv_heads` best entries, shared by its heads (per sequence)."""
        valid = cache.valid()
        total = budget * cache.k.shape[1]
        if int(cache.lengths.sum(-1).max()) <= total + slack * cache.k.shape[1]:
            return
        protected = valid & self.protected(cache.pos, position)
        ranked = cache.score.masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
        floor = min(int(self.FLOOR * budget), cache.length)
        if floor:
            own = torch.zeros_like(valid).scatter(2, ranked.topk(floor, dim=-1).indices, True)
            ranked = ranked.masked_fill(own & valid, float("inf"))
        flat = ranked.flatten(1)
        kept = torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.topk(total, dim=-1).indices, True)
        cache.keep_mask(kept.view_as(valid) & valid)


class ThinK(SnapKV):
    key_channels = True

    def __init__(self, *, key_ratio: float = 0.5, **kw):
        super().__init__(**kw)
        self.key_ratio = key_ratio

    @property
    def _evicts(self) -> bool:
        return bool(self.budget or self.ratio)

    @property
    def prefill_window(self):
        return self.window if self._evicts else None

    @property
    def decode_probs(self):
        return self._evicts

    @property
    def query_window(self):
        return self.window

    def key_width(self, head_dim):
        return max(1, math.ceil(self.key_ratio * head_dim))

    def key_elements(self, entries, num_kv_heads, head_dim):
        recent = num_kv_heads * min(self.window, entries // num_kv_heads)
        return recent * head_dim + (entries - recent) * self.key_width(head_dim)

    def after_prefill(self, caches, scores, context, query_norms=None):
        super().after_prefill(caches, scores, context)
        for i, cache in enumerate(caches):
            caches[i] = self.prune_channels(cache, query_norms[i])

    def prune_channels(self, cache: LayerCache, query_norms: torch.Tensor) -> ChannelCache:
        """Keep each head's top channels by ||Q_obs[:, j]|| ||K[:, j]|| (query_norms [b, h, d]: the per-channel
        norms of the observation window's queries)."""
        b, hk, _, d = cache.k.shape
        q = query_norms.float().reshape(b, hk, -1, d).pow(2).sum(2).sqrt()  # all query heads of the group
        score = q * cache.k.float().norm(dim=2)
        channels = score.topk(self.key_width(d), dim=-1).indices.sort(dim=-1).values
        return ChannelCache(cache, channels, self.window)


class Duo(Streaming):
    grouped = True

    def __init__(self, *, retrieval: float = 0.5, retrieval_heads: list | None = None, **kw):
        super().__init__(**kw)
        self.retrieval, self.retrieval_heads = retrieval, retrieval_heads

    def head_groups(self, num_kv_heads):
        if self.retrieval_heads is None:
            raise ValueError("duo needs its retrieval heads: resolve the spec with prunus.passes.kv.duo first")
        return [[sorted(r), [h for h in range(hk) if h not in r]] for r, hk in zip(self.retrieval_heads, num_kv_heads)]

    def layer_entries(self, context, num_kv_heads):
        if self.retrieval_heads is None:  # not classified yet: the requested fraction of every layer's heads
            retrieval = [round(self.retrieval * hk) for hk in num_kv_heads]
        else:
            retrieval = [len(r) for r in self.retrieval_heads]
        return [r * context + (hk - r) * min(b, context)
                for r, hk, b in zip(retrieval, num_kv_heads, self.layer_budgets(context))]

    def after_prefill(self, caches, scores, context, query_norms=None):
        self.budgets = self.layer_budgets(context)
        groups = self.head_groups([c.k.shape[1] for c in caches])
        for i, cache in enumerate(caches):
            caches[i] = HeadGroupCache(cache, groups[i])
            for group in self._streaming(i, caches[i]):
                group.score = group.pos.float()
                self._evict(group, self.budgets[i], context)

    def after_step(self, caches, new, probs, position):
        positions = new_positions(position)
        for i, (cache, (k, v)) in enumerate(zip(caches, new)):
            b, _, t = k.shape[:3]
            streaming = self._streaming(i, cache)
            for heads, group, kg, vg in zip(cache.heads, cache.groups, cache.split(k), cache.split(v)):
                pos = positions(b, len(heads), t, k.device)
                if any(group is s for s in streaming):
                    self._add(group, kg, vg, pos, pos.float(), self.budgets[i], position)
                else:
                    group.append(kg, vg, pos, pos.float())

    def _streaming(self, i: int, cache: HeadGroupCache) -> list[LayerCache]:
        retrieval = set(self.retrieval_heads[i])
        return [g for heads, g in zip(cache.heads, cache.groups) if not set(heads) <= retrieval]


POLICIES = {"full": Full, "streaming": Streaming, "h2o": H2O, "tova": TOVA, "snapkv": SnapKV,
            "pyramidkv": PyramidKV, "chunkkv": ChunkKV, "vatp": VATP, "knorm": KNorm, "adakv": AdaKV,
            "think": ThinK, "duo": Duo, "kvzip": KVzip}
