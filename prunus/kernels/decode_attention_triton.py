"""Triton flash-decoding kernels behind `prunus.kernels.decode_attention` (op semantics: see there).

Imported only where a kernel runs (CUDA, or the CPU under TRITON_INTERPRET=1). Launchers take the op's tensors
plus optional `config` (block sizes, bypassing autotuning) and `num_splits` (past splits), which tests use to
reach every code path on small shapes.

Flash-decoding (Dao et al., "Flash-Decoding for long-context inference", 2023): decoding has one query row per
head, so a kernel that parallelises over heads alone leaves most of the GPU idle; the sequence is split instead.
- `_stage1_kernel`: grid (max(S, 1), b * hk, row blocks) for S past splits. One program takes all query rows
  of one KV group (the `group = h // hk` query heads times the t new tokens, row r = head_in_group * t + i), so
  each K/V entry is read from memory once and the scores are a tensor-core `tl.dot`. Program `split` runs an
  online softmax over its slice of the past cache, stopping at the head's `past_lengths` (entries beyond are
  never loaded); the last one then attends the new tokens' own keys with the causal mask (no extra program:
  on an H100, 16 splits x 8 heads + 8 more programs spilled into a second wave). Each writes an
  unnormalised fp32 partial output with its running max and sum (log2 domain).
- `_reduce_kernel`: one program per (group, row) merges the partials (log-sum-exp weights) into `out`,
  and optionally the row's log2-sum-exp (for the scores kernel).
- `_probs_kernel`: decode_attention_scores' `probs` from the scores stage 1 stored (RAW): 2^(s - lse) summed
  over the group's rows. Decoding has a few rows a KV group (4 for Llama-3-8B at one token), so the stored
  scores are 16 bytes an entry where its key is 256.
- `_scores_kernel`: the same `probs` by recomputing q.k per entry with the final log-sum-exp (reads K again,
  not V): for many rows a KV group, where storing their scores would cost more than the key.
The past and new K/V stay separate tensors (no concatenation); any strides on the batch, head and sequence
dims are accepted (the last dim must be contiguous), so a preallocated cache can be passed as a slice.
Head dims are padded to powers of two (>= 16, for `tl.dot`) with masks.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
MIN_SPLIT = 128  # past entries per split at least: shorter splits cost more in the reduce than they save
PROGRAMS_PER_SM = 2  # split the past until (b * hk * row blocks * splits) fills this many programs per SM
MAX_SPLITS = 128


# ---------------------------------------------------------------------------------------------------------
# shared pieces (also used by the quantized-cache kernel in kv_quant_triton)


@triton.jit
def _load_rows(ptr, rows, row_ok, b, g, t, group, stride_b, stride_h, stride_t, cols, col_ok):
    """Rows r of one KV group of a [b, h, t, d] tensor (head g * group + r // t, token r % t), columns `cols`."""
    head = g * group + rows // t
    p = ptr + b * stride_b + head[:, None] * stride_h + (rows % t)[:, None] * stride_t + cols[None, :]
    return tl.load(p, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _tile(base, j, valid, stride_n, offs, DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Entries j (rows of a [n, DIM] slice, last dim contiguous) as [BLOCK_N, BLOCK]; invalid rows are 0."""
    mask = valid[:, None]
    if BLOCK != DIM:  # no column mask on the hot path when the head dim is a power of two
        mask = mask & (offs < DIM)[None, :]
    return tl.load(base + j[:, None] * stride_n + offs[None, :], mask=mask, other=0)


@triton.jit
def _online_softmax(m_i, l_i, s, visible):
    """One online-softmax step over scores s [BLOCK_H, BLOCK_N] (log2 domain): (p, alpha, m, l)."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays empty
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _scan(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, lo, hi, tok, qk_scale,
          CAUSAL: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
          BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, raw_rows, raw_ok, raw_offset, RAW: tl.constexpr):
    """Attend entries lo..hi-1 of one K/V source; CAUSAL: entry j is visible to a row of new token i iff j <= i.
    RAW: also store each row's scaled scores (log2 domain) at raw_rows [BLOCK_H, 1] + raw_offset + j (rows where
    raw_ok), for `_probs_kernel`."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        j = start + offs_n
        valid = j < hi
        k = _tile(k_base, j, valid, stride_kn, offs_d, D, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if RAW:
            tl.store(raw_rows + (raw_offset + j)[None, :], s, mask=raw_ok & valid[None, :])
        visible = valid[None, :]
        if CAUSAL:
            visible = visible & (j[None, :] <= tok[:, None])
        p, alpha, m_i, l_i = _online_softmax(m_i, l_i, s, visible)
        v = _tile(v_base, j, valid, stride_vn, offs_dv, DV, BLOCK_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, m_i, l_i


@triton.jit
def _store_partial(o_ptr, ml_ptr, acc, m_i, l_i, bg, split, splits_total, rows, row_ok, M, ML_STRIDE, DV,
                   cols, col_ok, WRITE_ML: tl.constexpr):
    """Partials: o [b * hk, splits, M, DV] fp32 (columns `cols` of it); ml [2, b * hk, splits, M] (max, sum)."""
    slot = (bg * splits_total + split) * M + rows
    tl.store(o_ptr + slot[:, None] * DV + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
    if WRITE_ML:
        tl.store(ml_ptr + slot, m_i, mask=row_ok)
        tl.store(ml_ptr + ML_STRIDE + slot, l_i, mask=row_ok)


@triton.jit
def _stage1_program(HK, group, t, BLOCK_H: tl.constexpr):
    """A stage-1 program's place: (split, bg = b * HK + g, b, g, M = group * t, its rows of the M query rows
    (group heads x t tokens), which of them exist, each row's token)."""
    split = tl.program_id(0)
    bg = tl.program_id(1)
    M = group * t
    rows = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    return split, bg, bg // HK, bg % HK, M, rows, rows < M, rows % t


@triton.jit
def _stage1_finish(acc, m_i, l_i, q, kn_base, vn_base, sknn, svnn, split, bg, rows, row_ok, M, t, tok, o_ptr,
                   ml_ptr, ML_STRIDE, qk_scale, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, raw_rows, n, RAW: tl.constexpr):
    """The last split attends the t new tokens (causal; RAW: their scores stored after the n past entries'); every
    split then stores its partial."""
    splits = tl.num_programs(0)
    if split == splits - 1:
        acc, m_i, l_i = _scan(acc, m_i, l_i, q, kn_base, vn_base, sknn, svnn, 0, t, tok, qk_scale, True, D, DV,
                              BLOCK_D, BLOCK_DV, BLOCK_N, raw_rows, row_ok[:, None], n, RAW)
    offs_dv = tl.arange(0, BLOCK_DV)
    _store_partial(o_ptr, ml_ptr, acc, m_i, l_i, bg, split, splits, rows, row_ok, M, ML_STRIDE, DV, offs_dv,
                   offs_dv < DV, True)


# ---------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _stage1_kernel(q_ptr, kp_ptr, vp_ptr, kn_ptr, vn_ptr, len_ptr, o_ptr, ml_ptr, raw_ptr,
                   n, t, group, HK, S, split_len, ML_STRIDE, RAW_STRIDE, qk_scale, LEN_BUCKET,
                   sqb, sqh, sqt, skpb, skph, skpn, svpb, svph, svpn, sknb, sknh, sknn, svnb, svnh, svnn, slb, slh,
                   HAS_LENGTHS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, RAW: tl.constexpr):
    """RAW: each row's scaled scores also go to raw [b * HK, M, RAW_STRIDE] (entry j of the past at column j, new
    token j at n + j), which `_probs_kernel` turns into the entries' probabilities without reading K again."""
    split, bg, b, g, M, rows, row_ok, tok = _stage1_program(HK, group, t, BLOCK_H)
    raw_rows = raw_ptr + (bg * M + rows)[:, None].to(tl.int64) * RAW_STRIDE
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, rows, row_ok, b, g, t, group, sqb, sqh, sqt, offs_d, offs_d < D)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    if split < S:
        length = n
        if HAS_LENGTHS:
            length = tl.minimum(tl.load(len_ptr + b * slb + g * slh).to(tl.int32), n)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, length)
        acc, m_i, l_i = _scan(acc, m_i, l_i, q, kp_ptr + b * skpb + g * skph, vp_ptr + b * svpb + g * svph,
                              skpn, svpn, lo, hi, tok, qk_scale, False, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N,
                              raw_rows, row_ok[:, None], 0, RAW)
    _stage1_finish(acc, m_i, l_i, q, kn_ptr + b * sknb + g * sknh, vn_ptr + b * svnb + g * svnh, sknn, svnn, split,
                   bg, rows, row_ok, M, t, tok, o_ptr, ml_ptr, ML_STRIDE, qk_scale, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N,
                   raw_rows, n, RAW)


@triton.jit
def _reduce_kernel(o_ptr, ml_ptr, out_ptr, lse_ptr, t, group, HK, SPLITS, ML_STRIDE,
                   sob, soh, sot, WRITE_LSE: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr,
                   CHUNK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out[row] = sum_s 2^(m_s - m) o_s / sum_s 2^(m_s - m) l_s over the SPLITS partials of one row."""
    pid = tl.program_id(0)
    M = group * t
    bg = pid // M
    r = pid % M
    offs_s = tl.arange(0, BLOCK_S)
    slot = (bg * SPLITS + offs_s) * M + r
    m_s = tl.load(ml_ptr + slot, mask=offs_s < SPLITS, other=float("-inf"))
    l_s = tl.load(ml_ptr + ML_STRIDE + slot, mask=offs_s < SPLITS, other=0.0)
    m = tl.max(m_s, axis=0)  # finite: every row sees at least the first new token
    denom = tl.sum(tl.exp2(m_s - m) * l_s, axis=0)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_c = tl.arange(0, CHUNK_S)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, SPLITS, CHUNK_S):
        s_ok = s0 + offs_c < SPLITS
        c_slot = (bg * SPLITS + s0 + offs_c) * M + r
        w = tl.exp2(tl.load(ml_ptr + c_slot, mask=s_ok, other=float("-inf")) - m)
        o = tl.load(o_ptr + c_slot[:, None] * DV + offs_dv[None, :],
                    mask=s_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
        acc += tl.sum(o * w[:, None], axis=0)
    b = bg // HK
    head = (bg % HK) * group + r // t
    tl.store(out_ptr + b * sob + head * soh + (r % t) * sot + offs_dv, (acc / denom).to(out_ptr.dtype.element_ty),
             mask=offs_dv < DV)
    if WRITE_LSE:
        tl.store(lse_ptr + bg * M + r, m + tl.log2(denom))


@triton.jit
def _entry_probs(k, j, valid, causal, q_ptr, lse_ptr, b, g, bg, t, group, sqb, sqh, sqt, qk_scale, offs_d,
                 D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """Entries j (keys k [BLOCK_N, BLOCK_D]): sum over the group's rows of 2^(q.k * qk_scale - lse_row), over the
    entries each row sees (causal: new token j is seen by rows of tokens i >= j)."""
    M = group * t
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, M, BLOCK_H):
        rows = r0 + tl.arange(0, BLOCK_H)
        row_ok = rows < M
        q = _load_rows(q_ptr, rows, row_ok, b, g, t, group, sqb, sqh, sqt, offs_d, offs_d < D)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        lse = tl.load(lse_ptr + bg * M + rows, mask=row_ok, other=0.0)
        visible = row_ok[:, None] & valid[None, :] & ((causal == 0) | (j[None, :] <= (rows % t)[:, None]))
        total += tl.sum(tl.where(visible, tl.exp2(s - lse[:, None]), 0.0), axis=0)
    return total


@triton.jit
def _scores_kernel(q_ptr, kp_ptr, kn_ptr, len_ptr, lse_ptr, probs_ptr, n, t, group, HK, past_blocks, qk_scale,
                   sqb, sqh, sqt, skpb, skph, skpn, sknb, sknh, sknn, slb, slh, spb, sph,
                   HAS_LENGTHS: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """probs[b, g, j] = sum over the group's rows of 2^(q.k_j * qk_scale - lse_row), 0 where j is not visible."""
    blk = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // HK
    g = bg % HK
    M = group * t
    offs_d = tl.arange(0, BLOCK_D)
    if blk < past_blocks:
        j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        length = n
        if HAS_LENGTHS:
            length = tl.minimum(tl.load(len_ptr + b * slb + g * slh).to(tl.int32), n)
        valid = j < length
        k = _tile(kp_ptr + b * skpb + g * skph, j, valid, skpn, offs_d, D, BLOCK_D)
        causal = 0
        out_j = j
        out_ok = j < n
    else:
        j = (blk - past_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = j < t
        k = _tile(kn_ptr + b * sknb + g * sknh, j, valid, sknn, offs_d, D, BLOCK_D)
        causal = 1
        out_j = n + j
        out_ok = valid
    total = _entry_probs(k, j, valid, causal, q_ptr, lse_ptr, b, g, bg, t, group, sqb, sqh, sqt, qk_scale, offs_d,
                         D, BLOCK_H, BLOCK_N)
    tl.store(probs_ptr + b * spb + g * sph + out_j, total, mask=out_ok)


@triton.jit
def _probs_kernel(raw_ptr, len_ptr, lse_ptr, probs_ptr, n, t, group, HK, past_blocks, RAW_STRIDE, slb, slh, spb, sph,
                  HAS_LENGTHS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_scores_kernel`'s probs from the scores stage 1 stored (RAW): 2^(raw - lse_row) summed over the group's
    rows, reading M fp32 scores an entry instead of its key (4 M bytes against 2 D for bf16 keys)."""
    blk = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // HK
    g = bg % HK
    M = group * t
    if blk < past_blocks:
        j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        length = n
        if HAS_LENGTHS:
            length = tl.minimum(tl.load(len_ptr + b * slb + g * slh).to(tl.int32), n)
        valid = j < length  # stage 1 stops at the head's length: nothing is stored past it
        col = j
        out_ok = j < n
    else:
        j = (blk - past_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = j < t
        col = n + j
        out_ok = valid
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, M, BLOCK_H):
        rows = r0 + tl.arange(0, BLOCK_H)
        row_ok = rows < M
        seen = (col[None, :] < n) | (j[None, :] <= (rows % t)[:, None])  # new token j: by rows of tokens >= j
        visible = row_ok[:, None] & valid[None, :] & seen
        s = tl.load(raw_ptr + (bg * M + rows)[:, None].to(tl.int64) * RAW_STRIDE + col[None, :], mask=visible,
                    other=float("-inf"))
        lse = tl.load(lse_ptr + bg * M + rows, mask=row_ok, other=0.0)
        total += tl.sum(tl.where(visible, tl.exp2(s - lse[:, None]), 0.0), axis=0)
    tl.store(probs_ptr + b * spb + g * sph + col, total, mask=out_ok)


# ---------------------------------------------------------------------------------------------------------
# configs and launchers


def _cfg(block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


STAGE1_CONFIGS = [_cfg(64, 4, 2), _cfg(64, 4, 3), _cfg(64, 4, 4), _cfg(32, 4, 4), _cfg(128, 4, 2), _cfg(128, 8, 3),
                  _cfg(64, 8, 3), _cfg(32, 2, 4)]
_stage1_tuned = triton.autotune(configs=STAGE1_CONFIGS,
                                key=["LEN_BUCKET", "D", "DV", "BLOCK_H", "HAS_LENGTHS", "RAW"])(_stage1_kernel)


def _pow2(v: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(max(v, 1)))


def _rows_block(m: int) -> int:
    return min(_pow2(m), 64)


def num_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep tests fast


def plan_splits(n: int, parallel: int, device: torch.device, num_splits: int | None = None, align: int = 16):
    """(splits, entries per split) for n past entries with `parallel` programs per split (b * hk * row blocks)."""
    if n == 0:
        return 0, 0
    if num_splits is None:
        want = num_programs_target(device) // parallel  # rounded down: a last, thin wave costs a whole one
        num_splits = max(1, min(want, triton.cdiv(n, MIN_SPLIT), MAX_SPLITS))
    split_len = triton.cdiv(triton.cdiv(n, num_splits), align) * align
    return triton.cdiv(n, split_len), split_len


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def partials(bh: int, splits: int, rows: int, dv: int, device):
    """fp32 partial outputs [bh, splits, rows, dv] and (max, sum) [2, bh, splits, rows]."""
    o = torch.empty(bh * splits * rows * dv, dtype=torch.float32, device=device)
    ml = torch.empty(2 * bh * splits * rows, dtype=torch.float32, device=device)
    return o, ml


def reduce(o, ml, out, splits: int, group: int, hk: int, want_lse: bool):
    """Merge the partials into out [b, h, t, dv]; returns the rows' log2-sum-exp [b * hk, rows] if asked."""
    b, h, t, dv = out.shape
    rows = group * t
    lse = torch.empty(b * hk * rows, dtype=torch.float32, device=out.device) if want_lse else o
    _reduce_kernel[(b * hk * rows,)](o, ml, out, lse, t, group, hk, splits, ml.numel() // 2,
                                     out.stride(0), out.stride(1), out.stride(2), WRITE_LSE=want_lse, DV=dv,
                                     BLOCK_S=_pow2(splits, 1), CHUNK_S=min(_pow2(splits, 1), 16),
                                     BLOCK_DV=_pow2(dv, 1))
    return lse if want_lse else None


def launch(kernel, tuned, grid, args: dict, consts: dict, config: dict | None):
    """Run with `config`, else autotuned (on the interpreter, which cannot time, the first config)."""
    if config is None and INTERPRET:
        c = STAGE1_CONFIGS[0]
        config = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    if config is None:
        tuned[grid](*args.values(), **consts)
    else:
        kernel[grid](*args.values(), **consts, **config)


def decode_attention(q, k_past, v_past, k_new, v_new, scale: float, past_lengths=None, config: dict | None = None,
                     num_splits: int | None = None, want_lse: bool = False, raw: torch.Tensor | None = None):
    """The op on the kernels: out [b, h, t, dv] (and the rows' log2-sum-exp when `want_lse`). `raw` (fp32, at
    least b * hk * group * t * (n + t) elements): stage 1 also stores the rows' scaled scores there."""
    q, k_past, v_past, k_new, v_new = map(_last_contiguous, (q, k_past, v_past, k_new, v_new))
    b, h, t, d = q.shape
    hk, n, dv = k_past.shape[1], k_past.shape[2], v_past.shape[-1]
    group = h // hk
    rows = group * t
    block_h = _rows_block(rows)
    row_blocks = triton.cdiv(rows, block_h)
    S, split_len = plan_splits(n, b * hk * row_blocks, q.device, num_splits)
    out = torch.empty(b, h, t, dv, dtype=q.dtype, device=q.device)
    programs = max(S, 1)  # the last split also attends the new tokens (one program when nothing is cached)
    o, ml = partials(b * hk, programs, rows, dv, q.device)
    lengths = past_lengths if past_lengths is not None else o
    ls = past_lengths.stride() if past_lengths is not None else (0, 0)
    args = dict(q_ptr=q, kp_ptr=k_past, vp_ptr=v_past, kn_ptr=k_new, vn_ptr=v_new, len_ptr=lengths, o_ptr=o,
                ml_ptr=ml, raw_ptr=raw if raw is not None else o, n=n, t=t, group=group, HK=hk, S=S,
                split_len=split_len, ML_STRIDE=ml.numel() // 2, RAW_STRIDE=n + t, qk_scale=scale * LOG2E,
                LEN_BUCKET=_pow2(split_len), sqb=q.stride(0), sqh=q.stride(1), sqt=q.stride(2),
                skpb=k_past.stride(0), skph=k_past.stride(1), skpn=k_past.stride(2),
                svpb=v_past.stride(0), svph=v_past.stride(1), svpn=v_past.stride(2),
                sknb=k_new.stride(0), sknh=k_new.stride(1), sknn=k_new.stride(2),
                svnb=v_new.stride(0), svnh=v_new.stride(1), svnn=v_new.stride(2), slb=ls[0], slh=ls[1])
    consts = dict(HAS_LENGTHS=past_lengths is not None, D=d, DV=dv, BLOCK_H=block_h, BLOCK_D=_pow2(d),
                  BLOCK_DV=_pow2(dv), RAW=raw is not None)
    launch(_stage1_kernel, _stage1_tuned, (programs, b * hk, row_blocks), args, consts, config)
    lse = reduce(o, ml, out, programs, group, hk, want_lse)
    return (out, lse) if want_lse else out


def score_buffer(b: int, hk: int, rows: int, total: int, key_bytes: int, device, raw_scores: bool | None = None):
    """Where stage 1 stores its rows' scaled scores (fp32 [b * hk, rows, total]) for `probs_from_scores`, or None
    to compute the probabilities by reading the keys again. raw_scores None: the one that reads fewer bytes, 4 a
    row and entry against `key_bytes` an entry (decoding, a few rows a KV group: the stored scores by far)."""
    if raw_scores is None:
        raw_scores = 4 * rows < key_bytes
    return torch.empty(b * hk * rows * total, dtype=torch.float32, device=device) if raw_scores else None


def probs_from_scores(raw, lse, b: int, hk: int, n: int, t: int, group: int, past_lengths=None) -> torch.Tensor:
    """probs fp32 [b, hk, n + t] from the scores stage 1 stored in `raw` (`_probs_kernel`); n past entries."""
    block_n = 64 if not INTERPRET else 16
    probs = torch.empty(b, hk, n + t, dtype=torch.float32, device=raw.device)
    past_blocks = triton.cdiv(n, block_n)
    lengths = past_lengths if past_lengths is not None else probs
    ls = past_lengths.stride() if past_lengths is not None else (0, 0)
    _probs_kernel[(past_blocks + triton.cdiv(t, block_n), b * hk)](
        raw, lengths, lse, probs, n, t, group, hk, past_blocks, n + t, ls[0], ls[1], probs.stride(0),
        probs.stride(1), HAS_LENGTHS=past_lengths is not None, BLOCK_H=_rows_block(group * t), BLOCK_N=block_n)
    return probs


def decode_attention_scores(q, k_past, v_past, k_new, v_new, scale: float, past_lengths=None,
                            config: dict | None = None, num_splits: int | None = None, raw_scores: bool | None = None):
    """(out, probs fp32 [b, hk, n + t]): the attention each entry received, summed over its group's rows.

    raw_scores: stage 1 stores the rows' scores and `_probs_kernel` reads them back, or `_scores_kernel` reads the
    keys again and recomputes them; None: the one that reads fewer bytes (`score_buffer`)."""
    b, h, t, d = q.shape
    hk, n = k_past.shape[1], k_past.shape[2]
    group = h // hk
    raw = score_buffer(b, hk, group * t, n + t, d * k_past.element_size(), q.device, raw_scores)
    out, lse = decode_attention(q, k_past, v_past, k_new, v_new, scale, past_lengths, config, num_splits,
                                want_lse=True, raw=raw)
    if raw is not None:
        return out, probs_from_scores(raw, lse, b, hk, n, t, group, past_lengths)
    q, k_past, k_new = map(_last_contiguous, (q, k_past, k_new))
    block_n = 64 if not INTERPRET else 16
    probs = torch.empty(b, hk, n + t, dtype=torch.float32, device=q.device)
    past_blocks = triton.cdiv(n, block_n)
    lengths = past_lengths if past_lengths is not None else probs
    ls = past_lengths.stride() if past_lengths is not None else (0, 0)
    grid = (past_blocks + triton.cdiv(t, block_n), b * hk)
    _scores_kernel[grid](q, k_past, k_new, lengths, lse, probs, n, t, group, hk, past_blocks, scale * LOG2E,
                         q.stride(0), q.stride(1), q.stride(2), k_past.stride(0), k_past.stride(1), k_past.stride(2),
                         k_new.stride(0), k_new.stride(1), k_new.stride(2), ls[0], ls[1],
                         probs.stride(0), probs.stride(1), HAS_LENGTHS=past_lengths is not None, D=d,
                         BLOCK_H=_rows_block(group * t), BLOCK_D=_pow2(d), BLOCK_N=block_n)
    return out, probs
