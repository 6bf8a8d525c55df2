"""Triton flash-decoding over a cache whose older keys keep some channels only (ThinK): the kernels behind
`torch.ops.prunus.decode_attention_pruned_keys` (shapes and semantics: `prunus.passes.kv.pruned_keys`).

The past is n = n_p + n_r entries: n_p pruned keys [.., d_kept] then n_r recent keys [.., d], one value tensor
over all of them. Same scheme as `decode_attention_triton` (whose reduce, scores kernel and helpers it shares):
grid (splits, b * hk, row blocks), a program takes all query rows of one KV group. A split's slice of the past
runs as two scans: its pruned entries with the query's kept channels (gathered in registers by the head's
channel indices, so a pruned key is read at its stored width, d_kept, not d) and its recent entries with the
whole query; the last split then attends the new tokens (causal). The probabilities the policy reads come from
the scores the stage-1 kernel stored (RAW, read back by `decode_attention_triton._probs_kernel`: 4 bytes a row
and entry) or, for many rows a group, from `decode_attention_triton._scores_kernel` run twice with the rows'
log-sum-exp: once over the pruned keys with the gathered query, once over the recent and new keys.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from prunus.kernels import decode_attention_triton as dat
from prunus.kernels.decode_attention_triton import _load_rows, _scan, _stage1_finish, _stage1_program

DEFAULT_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3)


@triton.jit
def _pruned_stage1_kernel(q_ptr, ch_ptr, kp_ptr, kr_ptr, vp_ptr, kn_ptr, vn_ptr, o_ptr, ml_ptr, raw_ptr,
                          n_p, n_r, t, group, HK, S, split_len, ML_STRIDE, RAW_STRIDE, qk_scale,
                          sqb, sqh, sqt, scb, sch, skpb, skph, skpn, skrb, skrh, skrn, svpb, svph, svpn,
                          sknb, sknh, sknn, svnb, svnh, svnn,
                          D: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                          BLOCK_N: tl.constexpr, RAW: tl.constexpr = False):
    """RAW: the rows' scaled scores also go to raw [b * HK, M, RAW_STRIDE] (pruned entry j at column j, recent
    entry j at n_p + j, new token j at n_p + n_r + j), as in `decode_attention_triton._stage1_kernel`."""
    split, bg, b, g, M, rows, row_ok, tok = _stage1_program(HK, group, t, BLOCK_H)
    raw_rows = raw_ptr + (bg * M + rows)[:, None].to(tl.int64) * RAW_STRIDE
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, rows, row_ok, b, g, t, group, sqb, sqh, sqt, offs_d, offs_d < D)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    vp_base = vp_ptr + b * svpb + g * svph
    if split < S:
        lo = split * split_len
        hi = tl.minimum(lo + split_len, n_p + n_r)
        offs_k = tl.arange(0, BLOCK_DK)
        kept = offs_k < DK
        channels = tl.load(ch_ptr + b * scb + g * sch + offs_k, mask=kept, other=0)
        q_kept = _load_rows(q_ptr, rows, row_ok, b, g, t, group, sqb, sqh, sqt, channels, kept)
        acc, m_i, l_i = _scan(acc, m_i, l_i, q_kept, kp_ptr + b * skpb + g * skph, vp_base, skpn, svpn,
                              lo, tl.minimum(hi, n_p), tok, qk_scale, False, DK, DV, BLOCK_DK, BLOCK_DV, BLOCK_N,
                              raw_rows, row_ok[:, None], 0, RAW)
        # recent entry i is past entry n_p + i: its key in k_recent, its value n_p rows into v_past
        acc, m_i, l_i = _scan(acc, m_i, l_i, q, kr_ptr + b * skrb + g * skrh, vp_base + n_p * svpn, skrn, svpn,
                              tl.maximum(lo, n_p) - n_p, hi - n_p, tok, qk_scale, False, D, DV, BLOCK_D,
                              BLOCK_DV, BLOCK_N, raw_rows, row_ok[:, None], n_p, RAW)
    _stage1_finish(acc, m_i, l_i, q, kn_ptr + b * sknb + g * sknh, vn_ptr + b * svnb + g * svnh, sknn, svnn, split,
                   bg, rows, row_ok, M, t, tok, o_ptr, ml_ptr, ML_STRIDE, qk_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N,
                   raw_rows, n_p + n_r, RAW)


def _scores(q, k_past, k_new, lse, probs, n: int, scale: float, with_new: bool):
    """`_scores_kernel` into `probs` (a [b, hk, *] view): entries of k_past, then (with_new) of k_new."""
    b, h, t, d = q.shape
    hk = k_past.shape[1]
    block_n = 16 if dat.INTERPRET else 64
    past_blocks = triton.cdiv(n, block_n)
    blocks = past_blocks + (triton.cdiv(t, block_n) if with_new else 0)
    if blocks == 0:
        return
    dat._scores_kernel[(blocks, b * hk)](
        q, k_past, k_new, probs, lse, probs, n, t, h // hk, hk, past_blocks, scale * dat.LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k_past.stride(0), k_past.stride(1), k_past.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2), 0, 0, probs.stride(0), probs.stride(1),
        HAS_LENGTHS=False, D=d, BLOCK_H=dat._rows_block(h // hk * t), BLOCK_D=dat._pow2(d), BLOCK_N=block_n)


def decode_attention_pruned_keys(q, channels, k_pruned, k_recent, v_past, k_new, v_new, scale: float,
                                 config: dict | None = None, num_splits: int | None = None,
                                 raw_scores: bool | None = None):
    """The op on the kernels: (out [b, h, t, dv] in q's dtype, probs fp32 [b, hk, n_p + n_r + t]).

    raw_scores: the probabilities from the scores the attention kernel stored (`dat._probs_kernel`, 4 bytes a row
    and entry), or recomputed by reading the keys again. None: the one that reads fewer bytes."""
    q, channels, k_pruned, k_recent, v_past, k_new, v_new = map(
        dat._last_contiguous, (q, channels, k_pruned, k_recent, v_past, k_new, v_new))
    b, h, t, d = q.shape
    hk, n_p, kept = k_pruned.shape[1], k_pruned.shape[2], k_pruned.shape[3]
    n_r, dv = k_recent.shape[2], v_past.shape[-1]
    n = n_p + n_r
    group = h // hk
    rows = group * t
    block_h = dat._rows_block(rows)
    row_blocks = triton.cdiv(rows, block_h)
    S, split_len = dat.plan_splits(n, b * hk * row_blocks, q.device, num_splits)
    programs = max(S, 1)
    out = torch.empty(b, h, t, dv, dtype=q.dtype, device=q.device)
    o, ml = dat.partials(b * hk, programs, rows, dv, q.device)
    config = dict(config or DEFAULT_CONFIG)
    raw = dat.score_buffer(b, hk, rows, n + t, kept * k_pruned.element_size(), q.device, raw_scores)
    _pruned_stage1_kernel[(programs, b * hk, row_blocks)](
        q, channels, k_pruned, k_recent, v_past, k_new, v_new, o, ml, raw if raw is not None else o, n_p, n_r, t,
        group, hk, S, split_len, ml.numel() // 2, n + t, scale * dat.LOG2E, *q.stride()[:3], *channels.stride()[:2],
        *k_pruned.stride()[:3], *k_recent.stride()[:3], *v_past.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3],
        D=d, DK=kept, DV=dv, BLOCK_H=block_h, BLOCK_D=dat._pow2(d), BLOCK_DK=dat._pow2(kept),
        BLOCK_DV=dat._pow2(dv), RAW=raw is not None, **config)
    lse = dat.reduce(o, ml, out, programs, group, hk, True)
    if raw is not None:
        return out, dat.probs_from_scores(raw, lse, b, hk, n, t, group)
    probs = torch.empty(b, hk, n + t, dtype=torch.float32, device=q.device)
    # the pruned entries' probabilities: the query's kept channels (a few KB) against the pruned keys
    index = channels.repeat_interleave(group, dim=1)[:, :, None, :].expand(b, h, t, kept)
    _scores(q.gather(3, index).contiguous(), k_pruned, k_new, lse, probs, n_p, scale, with_new=False)
    _scores(q, k_recent, k_new, lse, probs[:, :, n_p:], n_r, scale, with_new=True)
    return out, probs
