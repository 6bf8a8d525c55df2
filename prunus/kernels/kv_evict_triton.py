"""Triton kernel behind `prunus.kernels.kv_evict.replace_lowest` (semantics: see there): one launch per layer.

Imported only where a kernel runs (CUDA, or the CPU under TRITON_INTERPRET=1). Grid (b * hk,): a program scans
its head's scores and positions in blocks of BLOCK_N, keeping a running (minimum, first index), then writes the
new entry's key, value, position and score into that slot. Any strides are accepted.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_BLOCK_N = 2048  # a layer's budget (2K entries) in one block; longer caches loop


@triton.jit(do_not_specialize=["recent_from"])  # changes every step: no recompile as it crosses multiples of 16
def _replace_lowest_kernel(score_ptr, pos_ptr, k_ptr, v_ptr, nk_ptr, nv_ptr, np_ptr, ns_ptr, n, HK, sink,
                           recent_from, ssb, ssh, ssn, spb, sph, spn, skb, skh, skn, skd, svb, svh, svn, svd,
                           snkb, snkh, snkd, snvb, snvh, snvd, snpb, snph, snsb, snsh,
                           D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DV: tl.constexpr):
    b = (tl.program_id(0) // HK).to(tl.int64)
    h = (tl.program_id(0) % HK).to(tl.int64)
    score_base = score_ptr + b * ssb + h * ssh
    pos_base = pos_ptr + b * spb + h * sph
    offs = tl.arange(0, BLOCK_N)
    best = tl.full([], float("inf"), tl.float32)
    slot = tl.full([], 0, tl.int64)
    for start in range(0, n, BLOCK_N):
        j = start + offs
        valid = j < n
        score = tl.load(score_base + j * ssn, mask=valid).to(tl.float32)
        pos = tl.load(pos_base + j * spn, mask=valid)
        ranked = tl.where(valid & (pos >= sink) & (pos < recent_from), score, float("inf"))
        low, at = tl.min(ranked, axis=0, return_indices=True, return_indices_tie_break_left=True)
        # strictly lower: on a tie the earlier block keeps the slot, as torch.argmin takes the first minimum
        slot = tl.where(low < best, start + at.to(tl.int64), slot)
        best = tl.minimum(low, best)
    offs_d = tl.arange(0, BLOCK_D)
    new_k = tl.load(nk_ptr + b * snkb + h * snkh + offs_d * snkd, mask=offs_d < D)
    tl.store(k_ptr + b * skb + h * skh + slot * skn + offs_d * skd, new_k.to(k_ptr.dtype.element_ty),
             mask=offs_d < D)
    offs_dv = tl.arange(0, BLOCK_DV)
    new_v = tl.load(nv_ptr + b * snvb + h * snvh + offs_dv * snvd, mask=offs_dv < DV)
    tl.store(v_ptr + b * svb + h * svh + slot * svn + offs_dv * svd, new_v.to(v_ptr.dtype.element_ty),
             mask=offs_dv < DV)
    new_pos = tl.load(np_ptr + b * snpb + h * snph)
    tl.store(pos_base + slot * spn, new_pos.to(pos_ptr.dtype.element_ty))
    new_score = tl.load(ns_ptr + b * snsb + h * snsh)
    tl.store(score_base + slot * ssn, new_score.to(score_ptr.dtype.element_ty))


def replace_lowest(score, pos, k, v, new_k, new_v, new_pos, new_score, sink: int, recent_from: int,
                   block_n: int | None = None) -> None:
    """The op on the kernel, in place; `block_n` (a power of two) overrides the scan's block (tests)."""
    b, hk, n = score.shape
    d, dv = k.shape[-1], v.shape[-1]
    block_n = block_n or min(triton.next_power_of_2(n), MAX_BLOCK_N)
    _replace_lowest_kernel[(b * hk,)](
        score, pos, k, v, new_k, new_v, new_pos, new_score, n, hk, sink, recent_from,
        *score.stride(), *pos.stride(), *k.stride(), *v.stride(),
        *new_k.stride()[:2], new_k.stride(3), *new_v.stride()[:2], new_v.stride(3),
        *new_pos.stride()[:2], *new_score.stride()[:2],
        D=d, DV=dv, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv))
