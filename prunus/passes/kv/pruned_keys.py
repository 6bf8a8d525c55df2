"""Decode attention over a cache whose older keys keep some channels only (ThinK, arXiv:2407.21018):
`torch.ops.prunus.decode_attention_pruned_keys`.

Shapes (GQA as in `prunus.kernels.decode_attention`: `h` query heads over `hk` KV heads):
- `q` [b, h, t, d], `channels` int64 [b, hk, d_kept]: the key channels each KV head keeps.
- `k_pruned` [b, hk, n_p, d_kept]: the older entries' keys, those channels only; q.k over them reads the same
  channels of q (the dropped channels contribute nothing, as if zero in the key).
- `k_recent` [b, hk, n_r, d]: the most recent entries' keys, every channel (ThinK leaves the window unpruned).
- `v_past` [b, hk, n_p + n_r, dv]: all cached values, older first; `k_new`/`v_new` [b, hk, t, *]: the new tokens'
  own entries, full width, causal among themselves.
-> (`out` [b, h, t, dv] in q's dtype, `probs` fp32 [b, hk, n_p + n_r + t]: attention per entry summed over the
group's query heads and the t new tokens, as `decode_attention_scores` returns it).
One softmax over both key segments and the new entries. On CUDA the op runs the flash-decoding kernels of
`prunus.kernels.pruned_keys_triton` (pruned keys read at their stored width); elsewhere, and for shapes the
kernels do not take, the reference.
"""
from __future__ import annotations

import functools

import torch

from prunus.kernels.decode_attention import FLOAT_DTYPES, MAX_KERNEL_HEAD_DIM


def decode_attention_pruned_keys_reference(q, channels, k_pruned, k_recent, v_past, k_new, v_new, scale: float):
    """(out, probs) in fp32 arithmetic: the gathered query channels against the pruned keys, the whole query
    against the recent and new keys, one softmax."""
    b, h, t, d = q.shape
    hk, n_p, kept = k_pruned.shape[1], k_pruned.shape[2], channels.shape[-1]
    group = h // hk
    qg = q.float().reshape(b, hk, group * t, d)  # query heads of a group stacked: row = head_in_group * t + i
    q_kept = qg.gather(3, channels[:, :, None, :].expand(b, hk, group * t, kept))
    older = q_kept @ k_pruned.float().transpose(-1, -2)
    recent = qg @ torch.cat([k_recent, k_new], dim=2).float().transpose(-1, -2)
    logits = torch.cat([older, recent], dim=-1) * scale  # [b, hk, group * t, n + t]
    n = n_p + k_recent.shape[2]
    i = torch.arange(t, device=q.device).repeat(group)[:, None]
    j = torch.arange(n + t, device=q.device)[None, :]
    probs = torch.softmax(logits.masked_fill((j >= n) & (j - n > i), float("-inf")), dim=-1)
    out = probs @ torch.cat([v_past, v_new], dim=2).float()
    return out.reshape(b, h, t, -1).to(q.dtype), probs.sum(dim=2)


@torch.library.custom_op("prunus::decode_attention_pruned_keys", mutates_args=())
def decode_attention_pruned_keys(q: torch.Tensor, channels: torch.Tensor, k_pruned: torch.Tensor,
                                 k_recent: torch.Tensor, v_past: torch.Tensor, k_new: torch.Tensor,
                                 v_new: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over [pruned keys (kept channels), recent keys, new tokens] (shapes: module docstring)."""
    return decode_attention_pruned_keys_reference(q, channels, k_pruned, k_recent, v_past, k_new, v_new, scale)


@decode_attention_pruned_keys.register_fake
def _(q, channels, k_pruned, k_recent, v_past, k_new, v_new, scale):
    b, hk = k_pruned.shape[:2]
    total = v_past.shape[2] + k_new.shape[2]
    return q.new_empty(*q.shape[:3], v_past.shape[-1]), q.new_empty(b, hk, total, dtype=torch.float32)


@functools.cache
def _kernels():
    try:
        from prunus.kernels import pruned_keys_triton
    except ImportError:
        return None
    return pruned_keys_triton


@decode_attention_pruned_keys.register_kernel("cuda")
def _(q, channels, k_pruned, k_recent, v_past, k_new, v_new, scale):
    args = (q, channels, k_pruned, k_recent, v_past, k_new, v_new, scale)
    if (_kernels() is None or q.dtype not in FLOAT_DTYPES or q.shape[2] == 0
            or any(x.dtype != q.dtype for x in (k_pruned, k_recent, v_past, k_new, v_new))
            or max(q.shape[-1], v_past.shape[-1]) > MAX_KERNEL_HEAD_DIM):
        return decode_attention_pruned_keys_reference(*args)
    return _kernels().decode_attention_pruned_keys(*args)
