"""Attention of new tokens over an explicit KV cache (`torch.ops.prunus.decode_attention`), and the scores
the eviction policies read.

Shapes (GQA: `h` query heads share `hk` key/value heads, `h % hk == 0`, query head i reads kv head
i // (h // hk)):
- `q` [b, h, t, d]: the new tokens' queries (after RoPE).
- `k_past` [b, hk, n, d], `v_past` [b, hk, n, dv]: the cache, compacted by whatever policy kept it; its
  entries are visible to every new token. `n` may be 0.
- `k_new` [b, hk, t, d], `v_new` [b, hk, t, dv]: the new tokens' own keys/values; new token i sees new
  tokens j <= i (causal among themselves).
- `past_lengths` (optional) int32/int64 [b, hk]: for a per-head (ragged) cache padded to a common `n`, head
  (b, g) holds only its first `past_lengths[b, g]` entries; the rest are never read.
-> `out` [b, h, t, dv] in q's dtype (what SDPA would give on the concatenated, GQA-repeated cache).

`decode_attention_scores` returns, besides `out`, `probs` fp32 [b, hk, n + t]: the attention probability
each cached then new entry received, summed over the query heads of its group and over the t new tokens
(H2O's accumulated attention, TOVA's current-query attention).

`attention_scores(q, k, window, scale)` fp32 [b, hk, s]: the causal attention probability the last `window`
queries of a prefill pay each key, summed over those queries and over the query heads of each group (the
SnapKV observation window; `window = s` gives H2O's accumulated attention over the whole prompt). Computed
in chunks of queries so memory stays O(chunk * s).

On CUDA, `decode_attention` and `decode_attention_scores` run the Triton flash-decoding kernels of
`decode_attention_triton` (GQA-aware, split over the sequence, past and new entries read in place, entries
beyond `past_lengths` never read); `attention_scores` (prefill-time, once per prompt) runs its reference.
The quantized-cache variant is `prunus.kernels.kv_quant.decode_attention_quantized`.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

SCORE_CHUNK = 256  # queries per chunk in attention_scores


def _check(q, k_past, v_past, k_new, v_new):
    b, h, t, d = q.shape
    hk = k_past.shape[1]
    if h % hk or k_new.shape[1] != hk or k_past.shape[-1] != d or k_new.shape[2] != t:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} does not fit k_past {tuple(k_past.shape)} / "
                         f"k_new {tuple(k_new.shape)}")


def _past_mask(past_lengths, n, t, device):
    """Boolean [b, hk, 1, n + t]: which cached entries each head really holds (new entries always)."""
    idx = torch.arange(n + t, device=device)
    return ((idx < past_lengths.to(device)[..., None]) | (idx >= n))[:, :, None, :]


def decode_attention_reference(q, k_past, v_past, k_new, v_new, scale: float, past_lengths=None,
                               return_probs: bool = False):
    """Plain torch (fp32 softmax) for any device: the definition the kernels are tested against."""
    _check(q, k_past, v_past, k_new, v_new)
    b, h, t, d = q.shape
    hk, n = k_past.shape[1], k_past.shape[2]
    group = h // hk
    k = torch.cat([k_past, k_new], dim=2).float()
    v = torch.cat([v_past, v_new], dim=2).float()
    qg = q.float().reshape(b, hk, group * t, d)  # query heads of a group stacked: row = head_in_group * t + i
    logits = qg @ k.transpose(-1, -2) * scale  # [b, hk, group * t, n + t]
    i = torch.arange(t, device=q.device).repeat(group)[:, None]
    j = torch.arange(n + t, device=q.device)[None, :]
    visible = (j < n) | (j - n <= i)
    visible = visible[None, None]
    if past_lengths is not None:
        held = _past_mask(past_lengths, n, t, q.device)
        visible = visible & held
        v = v.masked_fill(~held[:, :, 0, :, None], 0.0)  # padding may hold anything (NaN): 0 * NaN is NaN
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = (probs @ v).reshape(b, h, t, -1).to(q.dtype)
    if return_probs:
        return out, probs.sum(dim=2)
    return out


def decode_attention_sdpa(q, k_past, v_past, k_new, v_new, scale: float) -> torch.Tensor:
    """The same attention through torch SDPA on the concatenated cache (the CPU path: no mask for t = 1)."""
    _check(q, k_past, v_past, k_new, v_new)
    t, n = q.shape[2], k_past.shape[2]
    k = torch.cat([k_past, k_new], dim=2)
    v = torch.cat([v_past, v_new], dim=2)
    mask = None
    if t > 1:
        mask = torch.ones(t, n + t, dtype=torch.bool, device=q.device).tril(n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


@torch.library.custom_op("prunus::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k_past: torch.Tensor, v_past: torch.Tensor, k_new: torch.Tensor,
                     v_new: torch.Tensor, scale: float, past_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    if past_lengths is None and q.dtype == k_past.dtype == v_past.dtype:
        return decode_attention_sdpa(q, k_past, v_past, k_new, v_new, scale)
    return decode_attention_reference(q, k_past, v_past, k_new, v_new, scale, past_lengths)


@decode_attention.register_fake
def _(q, k_past, v_past, k_new, v_new, scale, past_lengths=None):
    return q.new_empty(*q.shape[:3], v_past.shape[-1])


@torch.library.custom_op("prunus::decode_attention_scores", mutates_args=())
def decode_attention_scores(q: torch.Tensor, k_past: torch.Tensor, v_past: torch.Tensor, k_new: torch.Tensor,
                            v_new: torch.Tensor, scale: float,
                            past_lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_attention_reference(q, k_past, v_past, k_new, v_new, scale, past_lengths, return_probs=True)


@decode_attention_scores.register_fake
def _(q, k_past, v_past, k_new, v_new, scale, past_lengths=None):
    b, hk = k_past.shape[:2]
    total = k_past.shape[2] + k_new.shape[2]
    return q.new_empty(*q.shape[:3], v_past.shape[-1]), q.new_empty(b, hk, total, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# CUDA: the flash-decoding kernels of `decode_attention_triton`

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL_HEAD_DIM = 256  # beyond, one program's tiles outgrow the registers: the reference runs


@functools.cache
def _kernels():
    """The Triton kernel module, or None where Triton is missing (the ops then run their references)."""
    try:
        from prunus.kernels import decode_attention_triton
    except ImportError:
        return None
    return decode_attention_triton


def kernel_fits(q, *kv) -> bool:
    """Whether the Triton kernels take these tensors: one float dtype throughout, head dims up to 256."""
    return (_kernels() is not None and q.dtype in FLOAT_DTYPES and all(x.dtype == q.dtype for x in kv)
            and max(q.shape[-1], kv[1].shape[-1]) <= MAX_KERNEL_HEAD_DIM and q.shape[2] > 0)


@decode_attention.register_kernel("cuda")
def _(q, k_past, v_past, k_new, v_new, scale, past_lengths=None):
    if not kernel_fits(q, k_past, v_past, k_new, v_new):
        return decode_attention_reference(q, k_past, v_past, k_new, v_new, scale, past_lengths)
    _check(q, k_past, v_past, k_new, v_new)
    return _kernels().decode_attention(q, k_past, v_past, k_new, v_new, scale, past_lengths)


@decode_attention_scores.register_kernel("cuda")
def _(q, k_past, v_past, k_new, v_new, scale, past_lengths=None):
    if not kernel_fits(q, k_past, v_past, k_new, v_new):
        return decode_attention_reference(q, k_past, v_past, k_new, v_new, scale, past_lengths, return_probs=True)
    _check(q, k_past, v_past, k_new, v_new)
    return _kernels().decode_attention_scores(q, k_past, v_past, k_new, v_new, scale, past_lengths)


def attention_scores_reference(q, k, window: int, scale: float) -> torch.Tensor:
    b, h, s, d = q.shape
    hk = k.shape[1]
    group = h // hk
    w = min(window, s)
    scores = q.new_zeros(b, hk, s, dtype=torch.float32)
    kf = k.float()
    for start in range(s - w, s, SCORE_CHUNK):
        stop = min(start + SCORE_CHUNK, s)
        qc = q[:, :, start:stop].float().reshape(b, hk, group, stop - start, d)
        logits = torch.einsum("bgrid,bgjd->bgrij", qc, kf) * scale
        pos = torch.arange(start, stop, device=q.device)[:, None]
        logits = logits.masked_fill(torch.arange(s, device=q.device)[None, :] > pos, float("-inf"))
        scores += torch.softmax(logits, dim=-1).sum(dim=(2, 3))
    return scores


@torch.library.custom_op("prunus::attention_scores", mutates_args=())
def attention_scores(q: torch.Tensor, k: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    return attention_scores_reference(q, k, window, scale)


@attention_scores.register_fake
def _(q, k, window, scale):
    return q.new_empty(k.shape[0], k.shape[1], k.shape[2], dtype=torch.float32)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
