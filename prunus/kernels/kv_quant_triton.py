"""Triton flash-decoding over a KIVI-style quantized cache (`prunus.kernels.kv_quant`: layout and semantics).

Same scheme as `decode_attention_triton` (whose reduce kernel and helpers it shares): grid (splits + 1,
b * hk, row blocks); a program takes all query rows of one KV group. Programs `split < S` read a slice of the
quantized entries as packed bytes and unpack in registers; program `S` attends the full-precision residual
block and then the new tokens (causal). A key block of BLOCK_N entries lies inside one key group
(BLOCK_N divides G, splits are whole groups), so the per-channel key scale and minimum fold into the query:
q.k = (q * scale) . k_int + q . min; the integer codes (exact in fp16/bf16) go straight into the `tl.dot`.
Values: when a token's channels form one group (G >= dv) the per-token scale folds into the probabilities
((p * scale) @ v_int + p . min); otherwise values are dequantized in registers. 4-bit codes are never
interleaved back: the low nibbles are the even channels and the high nibbles the odd ones, so the query is
split into even and odd channels for the scores, and the output accumulates even and odd channels apart.
decode_attention_quantized_scores (for policies that evict by attention over a quantized cache) takes each entry's
probability, summed over the group's rows, from the scores the attention kernel stored (RAW, read back by
`decode_attention_triton._probs_kernel`: 4 bytes a row and entry), or for many rows a group from
`_quant_scores_kernel`, which recomputes them with the rows' log-sum-exp from the reduce: key blocks of the
packed codes, then the residual, then the new tokens (causal).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from prunus.kernels import decode_attention_triton as dat
from prunus.kernels.decode_attention_triton import (
    _entry_probs,
    _load_rows,
    _online_softmax,
    _scan,
    _stage1_program,
    _store_partial,
    _tile,
)

DEFAULT_CONFIG = dict(BLOCK_N=64, num_warps=4, num_stages=3)


@triton.jit
def _key_scores(q32, kq, ks_ptr, km_ptr, cols, col_ok, DT: tl.constexpr):
    """(q * scale) . k_int and q . min over the channels `cols` of one key group (q32 fp32 [BLOCK_H, C])."""
    ks = tl.load(ks_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    km = tl.load(km_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    s = tl.dot((q32 * ks[None, :]).to(DT), tl.trans(kq.to(DT)), input_precision="ieee")
    return s + tl.sum(q32 * km[None, :], axis=1)[:, None]


@triton.jit
def _values(p, vq, vs_base, vm_base, j, valid, stride_vs, cols, VG: tl.constexpr, ONE_GROUP: tl.constexpr,
            DT: tl.constexpr):
    """p [BLOCK_H, BLOCK_N] @ V for value codes vq [BLOCK_N, C] of channels `cols` (fp32 result)."""
    if ONE_GROUP:
        vs = tl.load(vs_base + j * stride_vs, mask=valid, other=0.0).to(tl.float32)
        vm = tl.load(vm_base + j * stride_vs, mask=valid, other=0.0).to(tl.float32)
        out = tl.dot((p * vs[None, :]).to(DT), vq.to(DT), input_precision="ieee")
        return out + tl.sum(p * vm[None, :], axis=1)[:, None]
    else:
        idx = j[:, None] * stride_vs + (cols // VG)[None, :]
        vs = tl.load(vs_base + idx, mask=valid[:, None], other=0.0).to(tl.float32)
        vm = tl.load(vm_base + idx, mask=valid[:, None], other=0.0).to(tl.float32)
        v = (vq.to(tl.float32) * vs + vm).to(DT)
        return tl.dot(p.to(DT), v, input_precision="ieee")


@triton.jit
def _quant_stage1_kernel(q_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, kr_ptr, vr_ptr, kn_ptr, vn_ptr,
                         o_ptr, ml_ptr, raw_ptr, n_q, r, t, group, HK, S, split_len, ML_STRIDE, RAW_STRIDE, qk_scale,
                         sqb, sqh, sqt, skqb, skqh, skqn, sksb, sksh, sksg, svqb, svqh, svqn, svsb, svsh, svsn,
                         skrb, skrh, skrn, svrb, svrh, svrn, sknb, sknh, sknn, svnb, svnh, svnn,
                         BITS: tl.constexpr, G: tl.constexpr, VG: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         BLOCK_N: tl.constexpr, RAW: tl.constexpr = False):
    """RAW: the rows' scaled scores also go to raw [b * HK, M, RAW_STRIDE] (quantized entry j at column j, residual
    entry j at n_q + j, new token j at n_q + r + j), as in `decode_attention_triton._stage1_kernel`."""
    split, bg, b, g, M, rows, row_ok, tok = _stage1_program(HK, group, t, BLOCK_H)
    raw_rows = raw_ptr + (bg * M + rows)[:, None].to(tl.int64) * RAW_STRIDE
    DT: tl.constexpr = q_ptr.dtype.element_ty
    LANES: tl.constexpr = 8 // BITS  # channels per byte
    BD: tl.constexpr = BLOCK_D // LANES
    BDV: tl.constexpr = BLOCK_DV // LANES
    ONE_GROUP: tl.constexpr = VG == DV
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    if split < S:
        offs_n = tl.arange(0, BLOCK_N)
        cd = tl.arange(0, BD)  # byte columns
        cdv = tl.arange(0, BDV)
        kq_base = kq_ptr + b * skqb + g * skqh
        vq_base = vq_ptr + b * svqb + g * svqh
        vs_base = vs_ptr + b * svsb + g * svsh
        vm_base = vm_ptr + b * svsb + g * svsh
        q_lo = _load_rows(q_ptr, rows, row_ok, b, g, t, group, sqb, sqh, sqt, cd * LANES, cd * LANES < D)
        q_lo = q_lo.to(tl.float32)
        acc_lo = tl.zeros([BLOCK_H, BDV], dtype=tl.float32)
        if BITS == 4:
            q_hi = _load_rows(q_ptr, rows, row_ok, b, g, t, group, sqb, sqh, sqt, cd * 2 + 1, cd * 2 + 1 < D)
            q_hi = q_hi.to(tl.float32)
            acc_hi = tl.zeros([BLOCK_H, BDV], dtype=tl.float32)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, n_q)
        for start in range(lo, hi, BLOCK_N):
            j = start + offs_n
            valid = j < hi
            meta = b * sksb + g * sksh + (start // G) * sksg
            kb = _tile(kq_base, j, valid, skqn, cd, D // LANES, BD)
            if BITS == 8:
                s = _key_scores(q_lo, kb, ks_ptr + meta, km_ptr + meta, cd, cd < D, DT)
            else:
                s = (_key_scores(q_lo, kb & 0xF, ks_ptr + meta, km_ptr + meta, cd * 2, cd * 2 < D, DT)
                     + _key_scores(q_hi, kb >> 4, ks_ptr + meta, km_ptr + meta, cd * 2 + 1, cd * 2 + 1 < D, DT))
            s = s * qk_scale
            if RAW:
                tl.store(raw_rows + j[None, :], s, mask=row_ok[:, None] & valid[None, :])
            p, alpha, m_i, l_i = _online_softmax(m_i, l_i, s, valid[None, :])
            vb = _tile(vq_base, j, valid, svqn, cdv, DV // LANES, BDV)
            if BITS == 8:
                acc_lo = acc_lo * alpha[:, None] + _values(p, vb, vs_base, vm_base, j, valid, svsn, cdv, VG,
                                                           ONE_GROUP, DT)
            else:
                acc_lo = acc_lo * alpha[:, None] + _values(p, vb & 0xF, vs_base, vm_base, j, valid, svsn, cdv * 2,
                                                           VG, ONE_GROUP, DT)
                acc_hi = acc_hi * alpha[:, None] + _values(p, vb >> 4, vs_base, vm_base, j, valid, svsn,
                                                           cdv * 2 + 1, VG, ONE_GROUP, DT)
        _store_partial(o_ptr, ml_ptr, acc_lo, m_i, l_i, bg, split, S + 1, rows, row_ok, M, ML_STRIDE, DV,
                       cdv * LANES, cdv * LANES < DV, True)
        if BITS == 4:
            _store_partial(o_ptr, ml_ptr, acc_hi, m_i, l_i, bg, split, S + 1, rows, row_ok, M, ML_STRIDE, DV,
                           cdv * 2 + 1, cdv * 2 + 1 < DV, False)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = _load_rows(q_ptr, rows, row_ok, b, g, t, group, sqb, sqh, sqt, offs_d, offs_d < D)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
        acc, m_i, l_i = _scan(acc, m_i, l_i, q, kr_ptr + b * skrb + g * skrh, vr_ptr + b * svrb + g * svrh,
                              skrn, svrn, 0, r, tok, qk_scale, False, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N,
                              raw_rows, row_ok[:, None], n_q, RAW)
        acc, m_i, l_i = _scan(acc, m_i, l_i, q, kn_ptr + b * sknb + g * sknh, vn_ptr + b * svnb + g * svnh,
                              sknn, svnn, 0, t, tok, qk_scale, True, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N,
                              raw_rows, row_ok[:, None], n_q + r, RAW)
        _store_partial(o_ptr, ml_ptr, acc, m_i, l_i, bg, split, S + 1, rows, row_ok, M, ML_STRIDE, DV, offs_dv,
                       offs_dv < DV, True)


@triton.jit
def _quant_scores_kernel(q_ptr, kq_ptr, ks_ptr, km_ptr, kr_ptr, kn_ptr, lse_ptr, probs_ptr, n_q, r, t, group, HK,
                         q_blocks, r_blocks, qk_scale, sqb, sqh, sqt, skqb, skqh, skqn, sksb, sksh, sksg,
                         skrb, skrh, skrn, sknb, sknh, sknn, spb, sph,
                         BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """probs[b, g, j] = sum over the group's rows of 2^(q.k_j * qk_scale - lse_row): blocks of quantized keys
    (scores from the packed codes as in the attention kernel), then of the residual, then of the new tokens."""
    blk = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // HK
    g = bg % HK
    M = group * t
    DT: tl.constexpr = q_ptr.dtype.element_ty
    LANES: tl.constexpr = 8 // BITS
    BD: tl.constexpr = BLOCK_D // LANES
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    if blk < q_blocks:
        start = blk * BLOCK_N  # BLOCK_N divides G: the block lies in one key group
        j = start + tl.arange(0, BLOCK_N)
        valid = j < n_q
        cd = tl.arange(0, BD)
        kb = _tile(kq_ptr + b * skqb + g * skqh, j, valid, skqn, cd, D // LANES, BD)
        meta = b * sksb + g * sksh + (start // G) * sksg
        for r0 in range(0, M, BLOCK_H):
            rows = r0 + tl.arange(0, BLOCK_H)
            row_ok = rows < M
            q_lo = _load_rows(q_ptr, rows, row_ok, b, g, t, group, sqb, sqh, sqt, cd * LANES, cd * LANES < D)
            if BITS == 8:
                s = _key_scores(q_lo.to(tl.float32), kb, ks_ptr + meta, km_ptr + meta, cd, cd < D, DT)
            else:
                q_hi = _load_rows(q_ptr, rows, row_ok, b, g, t, group, sqb, sqh, sqt, cd * 2 + 1, cd * 2 + 1 < D)
                s = (_key_scores(q_lo.to(tl.float32), kb & 0xF, ks_ptr + meta, km_ptr + meta, cd * 2, cd * 2 < D, DT)
                     + _key_scores(q_hi.to(tl.float32), kb >> 4, ks_ptr + meta, km_ptr + meta, cd * 2 + 1,
                                   cd * 2 + 1 < D, DT))
            lse = tl.load(lse_ptr + bg * M + rows, mask=row_ok, other=0.0)
            visible = row_ok[:, None] & valid[None, :]
            total += tl.sum(tl.where(visible, tl.exp2(s * qk_scale - lse[:, None]), 0.0), axis=0)
        out_j = j
    else:
        offs_d = tl.arange(0, BLOCK_D)
        if blk < q_blocks + r_blocks:
            j = (blk - q_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = j < r
            k = _tile(kr_ptr + b * skrb + g * skrh, j, valid, skrn, offs_d, D, BLOCK_D)
            causal = 0
            out_j = n_q + j
        else:
            j = (blk - q_blocks - r_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = j < t
            k = _tile(kn_ptr + b * sknb + g * sknh, j, valid, sknn, offs_d, D, BLOCK_D)
            causal = 1
            out_j = n_q + r + j
        total = _entry_probs(k, j, valid, causal, q_ptr, lse_ptr, b, g, bg, t, group, sqb, sqh, sqt, qk_scale,
                             offs_d, D, BLOCK_H, BLOCK_N)
    tl.store(probs_ptr + b * spb + g * sph + out_j, total, mask=valid)


def _same_strides(a: torch.Tensor, b: torch.Tensor):
    """The scale and minimum tensors are addressed with one set of strides."""
    a, b = dat._last_contiguous(a), dat._last_contiguous(b)
    return (a, b) if a.stride() == b.stride() else (a.contiguous(), b.contiguous())


def decode_attention_quantized(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new,
                               scale: float, bits: int, group_size: int, config: dict | None = None,
                               num_splits: int | None = None, want_lse: bool = False,
                               raw: torch.Tensor | None = None):
    """The op on the kernel (shapes checked by the op); group_size a power of two >= 16. With `want_lse`,
    (out, the rows' log2-sum-exp [b * hk, group * t]). `raw` (fp32, b * hk * group * t * (n_q + r + t) elements):
    the rows' scaled scores are stored there too."""
    q, k_q, v_q, k_res, v_res, k_new, v_new = map(dat._last_contiguous, (q, k_q, v_q, k_res, v_res, k_new, v_new))
    k_scale, k_min = _same_strides(k_scale, k_min)
    v_scale, v_min = _same_strides(v_scale, v_min)
    b, h, t, d = q.shape
    hk, n_q, r, dv = k_q.shape[1], k_q.shape[2], k_res.shape[2], v_res.shape[-1]
    group = h // hk
    rows = group * t
    block_h = dat._rows_block(rows)
    row_blocks = triton.cdiv(rows, block_h)
    S, split_len = dat.plan_splits(n_q, b * hk * row_blocks, q.device, num_splits, align=group_size)
    config = dict(config or DEFAULT_CONFIG)
    config["BLOCK_N"] = min(config["BLOCK_N"], group_size)
    out = torch.empty(b, h, t, dv, dtype=q.dtype, device=q.device)
    o, ml = dat.partials(b * hk, S + 1, rows, dv, q.device)
    lanes = 8 // bits
    _quant_stage1_kernel[(S + 1, b * hk, row_blocks)](
        q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new, o, ml,
        raw if raw is not None else o, n_q, r, t, group, hk, S, split_len, ml.numel() // 2, n_q + r + t,
        scale * dat.LOG2E,
        *q.stride()[:3], *k_q.stride()[:3], *k_scale.stride()[:3], *v_q.stride()[:3], *v_scale.stride()[:3],
        *k_res.stride()[:3], *v_res.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3],
        BITS=bits, G=group_size, VG=min(group_size, dv), D=d, DV=dv, BLOCK_H=block_h,
        BLOCK_D=dat._pow2(d, 16 * lanes), BLOCK_DV=dat._pow2(dv, 16 * lanes), RAW=raw is not None, **config)
    lse = dat.reduce(o, ml, out, S + 1, group, hk, want_lse)
    return (out, lse) if want_lse else out


def decode_attention_quantized_scores(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new,
                                      scale: float, bits: int, group_size: int, config: dict | None = None,
                                      num_splits: int | None = None, raw_scores: bool | None = None):
    """(out, probs fp32 [b, hk, n_q + r + t]): the attention, then each entry's probability summed over its
    group's rows. raw_scores: from the scores the attention kernel stored (`dat._probs_kernel`, 4 bytes a row and
    entry), or recomputed from the packed keys with the rows' log-sum-exp (reads K again, not V: D * bits / 8
    bytes an entry and its group's scale and minimum). None: the one that reads fewer bytes."""
    q, k_q, k_res, k_new = map(dat._last_contiguous, (q, k_q, k_res, k_new))
    k_scale, k_min = _same_strides(k_scale, k_min)
    b, h, t, d = q.shape
    hk, n_q, r = k_q.shape[1], k_q.shape[2], k_res.shape[2]
    group = h // hk
    raw = dat.score_buffer(b, hk, group * t, n_q + r + t, d * bits // 8, q.device, raw_scores)
    out, lse = decode_attention_quantized(q, k_q, k_scale, k_min, v_q, v_scale, v_min, k_res, v_res, k_new, v_new,
                                          scale, bits, group_size, config, num_splits, want_lse=True, raw=raw)
    if raw is not None:  # the quantized entries and the residual are one past of n_q + r entries
        return out, dat.probs_from_scores(raw, lse, b, hk, n_q + r, t, group)
    block_n = min(16 if dat.INTERPRET else 64, group_size)
    probs = torch.empty(b, hk, n_q + r + t, dtype=torch.float32, device=q.device)
    q_blocks, r_blocks = triton.cdiv(n_q, block_n), triton.cdiv(r, block_n)
    _quant_scores_kernel[(q_blocks + r_blocks + triton.cdiv(t, block_n), b * hk)](
        q, k_q, k_scale, k_min, k_res, k_new, lse, probs, n_q, r, t, group, hk, q_blocks, r_blocks,
        scale * dat.LOG2E, *q.stride()[:3], *k_q.stride()[:3], *k_scale.stride()[:3], *k_res.stride()[:3],
        *k_new.stride()[:3], probs.stride(0), probs.stride(1),
        BITS=bits, G=group_size, D=d, BLOCK_H=dat._rows_block(group * t), BLOCK_D=dat._pow2(d, 16 * (8 // bits)),
        BLOCK_N=block_n)
    return out, probs
