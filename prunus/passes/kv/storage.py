"""How a layer's kept KV entries are stored between decode steps: the layouts the decode graphs read.

- `LayerCache`: every KV head holds the same number of entries, k [b, hk, n, d], v [b, hk, n, dv] (the
  uniform policies). `ChannelCache` (ThinK) stores the keys of entries older than the recent window with the
  kept channels only, [b, hk, n_p, d_kept], and the window's keys whole.
- `RaggedLayerCache`: heads hold different numbers of entries (Ada-KV). Head (b, g)'s entries sit in the first
  `lengths[b, g]` slots of a tensor padded to the longest head, in position order; the decode graph takes
  `lengths` as `past_lengths` and never reads the padding. Allocated memory is the longest head times the heads
  (`nbytes`), what the heads really hold is `held_bytes` (the figure a paged or varlen layout would reach).
- `HeadGroupCache`: the KV heads of a layer split, once per graph, into groups that each keep a rectangular
  cache of their own length (DuoAttention's retrieval heads, everything; its streaming heads, sink + window).
  No padding: each group's tensors are exactly what it holds; the decode graph attends per group.

Every layout keeps, per entry, its position (`pos`) and the policy's score (`score`), bookkeeping that the byte
counts leave out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunus.kernels.kv_evict import replace_lowest


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` [b, hk, m] of x [b, hk, n, c] along the sequence dim."""
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def _bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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

    def head_lengths(self) -> torch.Tensor:
        """Entries each (sequence, KV head) holds, [b, hk]."""
        return torch.full(self.k.shape[:2], self.length, dtype=torch.long)

    def nbytes(self) -> int:
        return _bytes(self.k, self.v)

    def held_bytes(self) -> int:
        """Bytes of the entries the heads really hold (the same as `nbytes` here: no padding)."""
        return self.nbytes()

    def append(self, k, v, pos, score=None) -> None:
        self.k = torch.cat([self.k, k], dim=2)
        self.v = torch.cat([self.v, v], dim=2)
        self.pos = torch.cat([self.pos, pos], dim=2)
        if self.score is not None and score is not None:
            self.score = torch.cat([self.score, score], dim=2)

    def keep(self, idx: torch.Tensor) -> None:
        """Keep entries `idx` [b, hk, m] (any order; stored in the cache's order)."""
        idx = idx.sort(dim=-1).values
        self.k, self.v = gather_rows(self.k, idx), gather_rows(self.v, idx)
        self.pos = self.pos.gather(2, idx)
        if self.score is not None:
            self.score = self.score.gather(2, idx)

    def shrink(self, ranked: torch.Tensor, budget: int) -> None:
        """Keep the `budget` entries ranked highest (`ranked` [b, hk, n]: scores, inf where protected)."""
        self.keep(ranked.topk(budget, dim=-1).indices)

    def replace(self, k, v, pos, score, sink: int, recent_from: int, decay: float = 1.0, add=None) -> None:
        """Write one new entry (k [b, hk, 1, d], v, pos, score) over each head's lowest-scored entry among those
        not protected (positions below `sink` or from `recent_from` on), in place (`kernels.replace_lowest`): the
        entries `append` then `shrink` back to n keep, at O(b hk d) instead of copying the cache twice. The
        entries stop being in position order; attention does not depend on their order, and nothing reads it
        (positions travel in `pos`). The scores become score * decay + add first (add alone where decay is 0),
        in the same pass; a `score` of None scores the new entry by its position."""
        for name in ("k", "v", "pos", "score"):
            old = getattr(self, name)
            # broadcast bookkeeping from the prefill, or a view another layer may share: written in place below
            if old.stride(2) == 0 or not old.is_contiguous() or old._base is not None:
                setattr(self, name, old.clone(memory_format=torch.contiguous_format))
        if self.score.dtype != torch.float32:
            self.score = self.score.float()
        replace_lowest(self.score, self.pos, self.k, self.v, k, v, pos, score, sink, recent_from, decay, add)

    def graph_inputs(self) -> tuple:
        """The tensors the decode graph takes for this layer's cache."""
        return self.k, self.v


class ChannelCache(LayerCache):
    """ThinK's layout: entries older than the last `window` positions keep only the key channels `channels`
    [b, hk, d_kept] (k [b, hk, n_p, d_kept]); the recent ones keep every channel (k_recent [b, hk, n_r, d]);
    v, pos and score cover the older then the recent entries. An entry is pruned when it leaves the window. The
    recent entries are the same positions in every head (eviction protects them), so both parts stay rectangular."""

    def __init__(self, cache: LayerCache, channels: torch.Tensor, window: int):
        self.channels, self.window = channels, window
        self.v, self.pos, self.score = cache.v, cache.pos, cache.score
        self.k, self.k_recent = cache.k[:, :, :0].gather(3, self._index(0)), cache.k
        self._prune()

    def _index(self, n: int) -> torch.Tensor:
        return self.channels[:, :, None, :].expand(*self.channels.shape[:2], n, self.channels.shape[-1])

    def _prune(self) -> None:
        """Move the recent entries that left the window to the pruned part."""
        recent = self.pos[0, 0, self.k.shape[2]:]
        old = int((recent < int(recent.max()) + 1 - self.window).sum()) if recent.numel() else 0
        if old:
            self.k = torch.cat([self.k, self.k_recent[:, :, :old].gather(3, self._index(old))], dim=2)
            self.k_recent = self.k_recent[:, :, old:]

    @property
    def length(self) -> int:
        return self.v.shape[2]

    def nbytes(self) -> int:
        return _bytes(self.k, self.k_recent, self.v)

    def graph_inputs(self) -> tuple:
        return self.k, self.k_recent, self.v, self.channels

    def append(self, k, v, pos, score=None) -> None:
        self.k_recent = torch.cat([self.k_recent, k], dim=2)
        self.v = torch.cat([self.v, v], dim=2)
        self.pos = torch.cat([self.pos, pos], dim=2)
        if self.score is not None and score is not None:
            self.score = torch.cat([self.score, score], dim=2)
        self._prune()

    def keep(self, idx: torch.Tensor) -> None:
        """Keep entries `idx` [b, hk, m], which include every recent entry (the policies protect the window)."""
        idx = idx.sort(dim=-1).values
        self.k = gather_rows(self.k, idx[..., :idx.shape[-1] - self.k_recent.shape[2]])
        self.v, self.pos = gather_rows(self.v, idx), self.pos.gather(2, idx)
        if self.score is not None:
            self.score = self.score.gather(2, idx)


class RaggedLayerCache:
    """Per-head lengths over a padded tensor (see the module docstring); the `LayerCache` interface."""

    def __init__(self, cache: LayerCache, kept: torch.Tensor):
        """The entries of `cache` where `kept` [b, hk, n] is true, each head compacted to the front."""
        self.k, self.v, self.pos, self.score = cache.k, cache.v, cache.pos, cache.score
        self.lengths = torch.full(cache.k.shape[:2], cache.length, dtype=torch.long, device=cache.k.device)
        self.keep_mask(kept)

    @property
    def length(self) -> int:
        """Slots per head (the longest head's entries)."""
        return self.k.shape[2]

    def valid(self) -> torch.Tensor:
        """[b, hk, n]: which slots hold an entry."""
        return torch.arange(self.length, device=self.k.device) < self.lengths[..., None]

    def head_lengths(self) -> torch.Tensor:
        return self.lengths.cpu()

    def nbytes(self) -> int:
        """Allocated bytes: every head padded to the longest."""
        return _bytes(self.k, self.v)

    def held_bytes(self) -> int:
        per_entry = (self.k.shape[-1] * self.k.element_size() + self.v.shape[-1] * self.v.element_size())
        return int(self.lengths.sum()) * per_entry

    def graph_inputs(self) -> tuple:
        return self.k, self.v, self.lengths

    def keep_mask(self, kept: torch.Tensor) -> None:
        """Keep the held entries where `kept` [b, hk, n] is true, in position order, padded to the longest head."""
        kept = kept & self.valid()
        counts = kept.sum(-1)
        width = int(counts.max()) if counts.numel() else 0
        order = torch.where(kept, self.pos, torch.iinfo(self.pos.dtype).max).sort(dim=-1).indices[..., :width]
        self.k, self.v = gather_rows(self.k, order), gather_rows(self.v, order)
        self.pos = self.pos.gather(2, order)
        if self.score is not None:
            self.score = self.score.gather(2, order)
        self.lengths = counts
        self._clear_padding()

    def _clear_padding(self) -> None:
        pad = ~self.valid()
        self.pos = self.pos.masked_fill(pad, -1)
        if self.score is not None:
            self.score = self.score.masked_fill(pad, float("-inf"))

    def append(self, k, v, pos, score=None) -> None:
        """New entries k [b, hk, t, d] at each head's own end (slots lengths .. lengths + t - 1)."""
        t = k.shape[2]
        width = int((self.lengths + t).max())
        if width > self.length:
            grow = width - self.length
            self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:2], grow, self.k.shape[-1])], dim=2)
            self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:2], grow, self.v.shape[-1])], dim=2)
            self.pos = torch.cat([self.pos, self.pos.new_full((*self.pos.shape[:2], grow), -1)], dim=2)
            if self.score is not None:
                self.score = torch.cat([self.score, self.score.new_full((*self.score.shape[:2], grow),
                                                                         float("-inf"))], dim=2)
        slots = self.lengths[..., None] + torch.arange(t, device=k.device)
        self.k = self.k.scatter(2, slots[..., None].expand_as(k), k)
        self.v = self.v.scatter(2, slots[..., None].expand_as(v), v)
        self.pos = self.pos.scatter(2, slots, pos)
        if self.score is not None and score is not None:
            self.score = self.score.scatter(2, slots, score.to(self.score.dtype))
        self.lengths = self.lengths + t


class HeadGroupCache:
    """A layer's KV heads split into fixed groups, each a `LayerCache` over its own heads (see the module
    docstring). `groups` lists the heads of each group (ascending); empty groups are left out."""

    def __init__(self, cache: LayerCache, groups: list[list[int]]):
        self.heads = [list(h) for h in groups if h]
        self.num_heads = cache.k.shape[1]
        self.groups = [LayerCache(cache.k[:, h], cache.v[:, h], cache.pos[:, h],
                                  None if cache.score is None else cache.score[:, h]) for h in self.heads]

    @property
    def length(self) -> int:
        """The longest group's entries."""
        return max(g.length for g in self.groups)

    def head_lengths(self) -> torch.Tensor:
        out = torch.empty(self.groups[0].k.shape[0], self.num_heads, dtype=torch.long)
        for heads, group in zip(self.heads, self.groups):
            out[:, heads] = group.length
        return out

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)

    def held_bytes(self) -> int:
        return self.nbytes()

    def graph_inputs(self) -> tuple:
        return tuple(x for g in self.groups for x in g.graph_inputs())

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [b, hk, ...] cut into the groups' heads."""
        return [x[:, h] for h in self.heads]
