"""Triton kernel behind `prunus.kernels.kv_evict.replace_lowest` (semantics: see there): one launch per layer.

Imported only where a kernel runs (CUDA, or the CPU under TRITON_INTERPRET=1). Grid (b * hk,): a program scans
its head's scores and positions in blocks of BLOCK_N (first updating the scores as the policy's decode step
asks, written back in the same pass), keeping a running (minimum, first index), then writes the new entry's key,
value, position and score into that slot. Any strides are accepted.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_BLOCK_N = 2048  # a layer's budget (2K entries) in one block; longer caches loop


@triton.jit(do_not_specialize=["recent_from"])  # changes every step: no recompile as it crosses multiples of 16
def _replace_lowest_kernel(score_ptr, pos_ptr, k_ptr, v_ptr, nk_ptr, nv_ptr, np_ptr, ns_ptr, add_ptr, decay, n, HK,
                           sink, recent_from, ssb, ssh, ssn, spb, sph, spn, skb, skh, skn, skd, svb, svh, svn, svd,
                           snkb, snkh, snkd, snvb, snvh, snvd, snpb, snph, snsb, snsh, sab, sah, san,
                           D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_DV: tl.constexpr, UPDATE: tl.constexpr, HAS_ADD: tl.constexpr,
                           SCORE_FROM_POS: tl.constexpr):
    """UPDATE: 0 scores as they are, 1 score * decay (+ add where HAS_ADD), 2 add alone; updated scores are
    written back before they are ranked. SCORE_FROM_POS: the new entry's score is its position (ns_ptr unused)."""
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
        if UPDATE == 2:
            score = tl.load(add_ptr + b * sab + h * sah + j * san, mask=valid).to(tl.float32)
        else:
            score = tl.load(score_base + j * ssn, mask=valid).to(tl.float32)
            if UPDATE == 1:
                score = score * decay
                if HAS_ADD:
                    score += tl.load(add_ptr + b * sab + h * sah + j * san, mask=valid).to(tl.float32)
        if UPDATE != 0:
            score = score.to(score_ptr.dtype.element_ty)  # ranked as stored
            tl.store(score_base + j * ssn, score, mask=valid)
            score = score.to(tl.float32)
        pos = tl.load(pos_base + j * spn, mask=valid)
        ranked = tl.where(valid & (pos >= sink) & (pos < recent_from), score, float("inf"))
        low, at = tl.min(ranked, axis=0, return_indices=True, return_indices_tie_break_left=True)
        # strictly lower: on a tie the earlier block keeps the slot, as torch.argmin takes the first minimum
        slot = tl.where(low < best, start + at.to(tl.int64), slot)
        best = tl.minimum(low, best)
    if UPDATE != 0:
        tl.debug_barrier()  # the slot's updated score (any thread's store above) lands before the new entry's
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
    if SCORE_FROM_POS:
        new_score = new_pos.to(tl.float32)
    else:
        new_score = tl.load(ns_ptr + b * snsb + h * snsh)
    tl.store(score_base + slot * ssn, new_score.to(score_ptr.dtype.element_ty))


def replace_lowest(score, pos, k, v, new_k, new_v, new_pos, new_score, sink: int, recent_from: int,
                   decay: float = 1.0, add=None, block_n: int | None = None) -> None:
    """The op on the kernel, in place; `block_n` (a power of two) overrides the scan's block (tests)."""
    b, hk, n = score.shape
    d, dv = k.shape[-1], v.shape[-1]
    block_n = block_n or min(triton.next_power_of_2(n), MAX_BLOCK_N)
    if decay == 0 and add is None:
        raise ValueError("decay 0 replaces the scores by `add`: pass it")
    update = 2 if decay == 0 else int(decay != 1 or add is not None)
    added = add if add is not None else score  # a placeholder pointer where there is nothing to add
    fresh = new_score if new_score is not None else new_pos
    _replace_lowest_kernel[(b * hk,)](
        score, pos, k, v, new_k, new_v, new_pos, fresh, added, float(decay), n, hk, sink, recent_from,
        *score.stride(), *pos.stride(), *k.stride(), *v.stride(),
        *new_k.stride()[:2], new_k.stride(3), *new_v.stride()[:2], new_v.stride(3),
        *new_pos.stride()[:2], *fresh.stride()[:2], *added.stride(),
        D=d, DV=dv, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv),
        UPDATE=update, HAS_ADD=add is not None, SCORE_FROM_POS=new_score is None,
        enable_fp_fusion=False)  # score * decay + add rounded twice, as torch computes it
