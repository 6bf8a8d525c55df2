"""Triton kernels behind the quantized linear ops of `prunus.kernels.quant_linear` (packed formats: see there).

Imported only where a kernel runs (CUDA, or the CPU under TRITON_INTERPRET=1). Each launcher takes the op's
tensors, a 2-D activation `x` [M, K], and an optional `config` (the kernel's block sizes) that bypasses
autotuning, which tests use to reach every code path under the interpreter.

Kernels (FLUTE, arXiv:2407.10960, and gpt-fast's int4 path are the models: weight-only quantized matmuls
are fast when the packed weights are read once and unpacked in registers):
- `_int4_gemv_kernel`, `_int8_gemv_kernel`: few rows (decode). One program per (row, block of outputs,
  K split); CUDA cores, fp32 accumulation. int4 steps over whole groups (per-group scale and zero point,
  GROUPS of them per step), int8 over chunks (per-channel scale, applied once at the end).
- `_int4_gemm_kernel`: more rows. Tensor-core `tl.dot` of the unpacked weight tile [BLOCK_N, BLOCK_K] with
  the activations transposed [BLOCK_K, BLOCK_M] ("swap AB": the weight fills the MMA's M side, so a
  skinny batch still maps onto full-size instructions); from 64-row tiles also the other way round (W_AS_B),
  where Hopper's wgmma reads the weight tile from shared memory and issues a step's MMAs back to back.
- `_int4_dequant_kernel`: int4 -> dense weight, for the many-row fallback (dense matmul by cuBLAS).
- `_quantize_rows_kernel` + `_int8_gemm_kernel`: W8A8 (per-token dynamic int8 activations, int32 MMA,
  the scales in the epilogue); the row quantizer also makes the e4m3 activations of the fp8 op.
- `_int8_gemm_kernel` also serves int8 weight-only with more rows: the int8 tile converted exactly to x's dtype
  in registers, a tensor-core `tl.dot`, the per-channel scale on the accumulator; split-K for few rows.

Two tricks keep the unpacking cheap (no int -> float conversion instructions, which run at 1/8 rate):
- the float "magic number": a field v OR-ed into the top mantissa bits of 2^BITS is the float 2^BITS + v
  (bf16 128 + q, fp16 1024 + q for the tensor-core operand), which goes straight into the FMA or MMA;
- offsets and zero points out of the inner loop: within a group, sum_k x_k (c + q_k - (c + z)) s =
  s (sum_k x_k (c + q_k) - (c + z) sum_k x_k), so the offset c joins the zero point once per group.

Launch configs: a config measured fastest for the exact shape on this GPU model (`measured_configs.json`, from
`benchmarks/quant_linear_gpu.py --sweep ... --sweep-table`) is used as is; other shapes and GPUs autotune over
the config lists below. The table makes the choice reproducible: the autotuner times each candidate once with
L2 flushes between calls and picked configs up to 10% slower than the sweep's winner (H100, 4096->14336 at 1 row:
21.1 against 19.0 µs). PRUNUS_MEASURED_CONFIGS=0 turns the table off.

Split-K: with few output blocks, the K range is split over SPLIT_K programs whose fp32 partials meet in a
workspace by atomic adds; the last program of a tile to arrive (a counter says which) writes the output
and zeroes its workspace and counter for the next launch, so one launch does the whole op. The partials arrive
in no fixed order, so a split-K result can differ from run to run in the last bits of fp32 (int8 W8A8 included:
each split's int32 sum is scaled to fp32 before the atomic add).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PTX = tl.constexpr(not INTERPRET and torch.version.hip is None)  # inline PTX runs (else its Triton equivalent)

# ---------------------------------------------------------------------------------------------------------
# shared device functions


@triton.jit
def _nibbles(words, BITS: tl.constexpr, TO: tl.constexpr, MAGIC: tl.constexpr, WIDE: tl.constexpr):
    """int32 words [R, W] -> [R, W * 32 // BITS] in k order (field i of word j is k = j * 32 // BITS + i).

    Each field v is moved to bit TO and OR-ed into MAGIC: no int -> float conversion instruction.
    WIDE: an fp32 result, e.g. TO = 23 - BITS with MAGIC = 2^BITS as fp32 gives the float 2^BITS + v.
    Else a 16-bit pattern the caller bitcasts (TO = 0, MAGIC = 0x4300 gives bf16 128 + v). The fields of
    a word are interleaved in registers (join keeps the new axis inside a thread): the result stays 2-D.
    """
    if BITS == 4:
        return tl.interleave(
            tl.interleave(tl.interleave(_field(words, 0, TO, 4, MAGIC, WIDE), _field(words, 16, TO, 4, MAGIC, WIDE)),
                          tl.interleave(_field(words, 8, TO, 4, MAGIC, WIDE), _field(words, 24, TO, 4, MAGIC, WIDE))),
            tl.interleave(tl.interleave(_field(words, 4, TO, 4, MAGIC, WIDE), _field(words, 20, TO, 4, MAGIC, WIDE)),
                          tl.interleave(_field(words, 12, TO, 4, MAGIC, WIDE), _field(words, 28, TO, 4, MAGIC, WIDE))))
    else:
        return tl.interleave(
            tl.interleave(_field(words, 0, TO, 8, MAGIC, WIDE), _field(words, 16, TO, 8, MAGIC, WIDE)),
            tl.interleave(_field(words, 8, TO, 8, MAGIC, WIDE), _field(words, 24, TO, 8, MAGIC, WIDE)))


@triton.jit
def _field(words, FROM: tl.constexpr, TO: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr,
           WIDE: tl.constexpr):
    if TO >= FROM:
        v = words << (TO - FROM)
    else:
        v = _shr(words, FROM - TO)
    v = (v & (((1 << BITS) - 1) << TO)) | MAGIC
    if WIDE:
        v = v.to(tl.float32, bitcast=True)
    else:
        v = v.to(tl.int16)
    return v


@triton.jit
def _shr(words, n):
    """Logical (unsigned) right shift of int32 words."""
    return (words.to(tl.uint32, bitcast=True) >> n).to(tl.int32, bitcast=True)


@triton.jit
def _minus_zero(words, zero, dtype: tl.constexpr):
    """q - zero [BLOCK_N, codes], exact, from int4 words (every field in k order, `_nibbles`). In x's 16-bit type
    for bf16/fp16 (the codes as the magic floats 128 + q / 1024 + q, less the zero point with the same offset: no
    conversion), else fp32 (16 + q less 16 + zero)."""
    if dtype == tl.bfloat16:
        codes = _nibbles(words, 4, 0, 0x4300, False).to(tl.bfloat16, bitcast=True)
        return codes - (zero + 128.0).to(tl.bfloat16)[:, None]
    elif dtype == tl.float16:
        codes = _nibbles(words, 4, 0, 0x6400, False).to(tl.float16, bitcast=True)
        return codes - (zero + 1024.0).to(tl.float16)[:, None]
    else:
        return _nibbles(words, 4, 19, 0x41800000, True) - (16.0 + zero)[:, None]


@triton.jit
def _mma(a, b, acc):
    """tl.dot, in IEEE fp32 for fp32 operands (not TF32: the kernels reproduce the reference op)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _write_tile(acc, offs_n, offs_m, M, N, b_ptr, y_ptr, stride_ym, HAS_BIAS: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] (fp32, y transposed) + bias -> y[m, n] in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish_tile(acc, offs_n, offs_m, M, N, b_ptr, y_ptr, stride_ym, ws_ptr, cnt_ptr, tile,
                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write a tile's result; with split-K, only once every split has added its partial (see module doc)."""
    if SPLIT_K == 1:
        _write_tile(acc, offs_n, offs_m, M, N, b_ptr, y_ptr, stride_ym, HAS_BIAS)
    else:
        mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
        ws = ws_ptr + offs_m[None, :] * N + offs_n[:, None]
        tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is in before this program counts itself in
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.load(ws, mask=mask, other=0.0, cache_modifier=".cg")
            tl.debug_barrier()  # all of the tile is read before any thread clears it (layouts may differ)
            tl.store(ws, tl.zeros_like(total), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)
            _write_tile(total, offs_n, offs_m, M, N, b_ptr, y_ptr, stride_ym, HAS_BIAS)


# ---------------------------------------------------------------------------------------------------------
# GEMV: few rows, CUDA cores


@triton.jit
def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, M_BUCKET,
                      stride_xm, stride_wn, stride_sn, stride_zn, stride_ym, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr, SPLIT_K: tl.constexpr):
    """int8 y[m, n] = scale[n] sum_k x[m, k] q[n, k] for one row m and BLOCK_N outputs over 1/SPLIT_K of K.

    w_ptr: the int8 weight as int32 words [N, K / 4]; per-channel scales [N]; CHUNK divides K (z_ptr unused).
    Each step reads UNROLL independent chunks of CHUNK inputs, so that many loads are in flight. The products
    stay [BLOCK_N, CHUNK] until the end: one row sum and one scale per output after the loop.
    """
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_w = tl.arange(0, CHUNK // 4)
    offs_k = tl.arange(0, CHUNK)
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    x_row = x_ptr + m * stride_xm
    n_steps = tl.cdiv(K, CHUNK * UNROLL)
    per_split = tl.cdiv(n_steps, SPLIT_K)
    acc = tl.zeros([BLOCK_N, CHUNK], dtype=tl.float32)
    x_acc = tl.zeros([CHUNK], dtype=tl.float32)
    for step in range(pid_k * per_split, tl.minimum(n_steps, (pid_k + 1) * per_split)):
        for u in tl.static_range(UNROLL):
            k0 = (step * UNROLL + u) * CHUNK
            in_k = tl.full([1, 1], k0, tl.int32) < K  # the last step may run past K (K % CHUNK == 0)
            words = tl.load(w_rows + (k0 // 4 + offs_w)[None, :], mask=n_ok[:, None] & in_k, other=0)
            x = tl.load(x_row + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)
            # b ^ 0x80 = b + 128, so the field reads as the float 256 + 128 + b (b at the top of the
            # mantissa): straight into the FMA; the offset comes off once, as 384 * sum(x)
            acc += _nibbles(words ^ -0x7F7F7F80, 8, 15, 0x43800000, True) * x[None, :]  # ^ 0x80808080
            x_acc += x
    y = (tl.sum(acc, axis=1) - 384.0 * tl.sum(x_acc, axis=0)) * tl.load(
        s_ptr + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)
    offs_m = m + tl.arange(0, 1)
    _finish_tile(y[:, None], offs_n, offs_m, M, N, b_ptr, y_ptr, stride_ym, ws_ptr, cnt_ptr,
                 m * tl.num_programs(0) + pid_n, HAS_BIAS, SPLIT_K)


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, M_BUCKET,
                      stride_xm, stride_wn, stride_sn, stride_zn, stride_ym, field_mask,
                      GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr = 0,
                      MASKREG: tl.constexpr = 0, PAIRS: tl.constexpr = 0, ASM: tl.constexpr = 0,
                      STAGES: tl.constexpr = 1):
    """int4 y[m, n] for one row m and BLOCK_N outputs, GROUPS whole groups per step (K a multiple of GROUP).

    A step reads a [BLOCK_N, GROUPS, GROUP / 8] block of words (GROUPS * GROUP / 2 contiguous bytes per
    output: 128 for two groups of 128, a full cache line) with the GROUPS scales and zero points of each
    output in one load. Per group the codes meet x in one row sum; the scale and zero point then apply to
    [BLOCK_N, GROUPS] partials, which are summed over groups only once, after the loop. PREFETCH: the next
    step's loads are issued before this step's arithmetic (double buffering in registers).

    Two variants cut the instructions per code (Nsight Compute found the kernel busy issuing: BENCHMARKS.md, "int4
    GEMV under Nsight Compute"). Counted in the loop of the SASS compiled offline for sm_90 by the GPU machine's
    Triton 3.6, BLOCK_N=8, GROUPS=8: 466 instructions for 64 codes a thread as is, 407 with MASKREG, 394 with PAIRS;
    at BLOCK_N=64, GROUPS=2 (128 codes): 724, 597, 558. MASKREG takes the field mask as the runtime `field_mask`
    (0x780000), so that mask and magic number meet in one LOP3 (with both immediates ptxas emits two). PAIRS also
    serves two fields with one shift (`_codes_paired`). Equal results (PAIRS: within 3e-4 relative for fp32
    activations, exact products for 16-bit ones). On the H100 they gain less than the counts promise (the kernel is
    issue-bound only in part): 4096->14336 at 1 row 19.0 µs with PAIRS (3.7 instructions a code) against 20.2 for
    the best plain config; 14336->4096 20.3 with MASKREG against 21.1 (`quant_linear_gpu.py --sweep 1`,
    BENCHMARKS.md). ASM (`_dot8_asm`) goes further: a word's fields and FMAs in one inline PTX block (3.5
    instructions a code at BLOCK_N=128, GROUPS=1, against PAIRS' 3.66) with the sums of x taken among a row's
    threads only; H100: 17.6 µs at 4096->14336, 19.3 at 14336->4096. On the interpreter (and non-NVIDIA GPUs) ASM
    runs the same fields and products in Triton ops (`_dot8_fields`).

    STAGES > 1 (without PREFETCH): Triton's pipeliner stages the loads through shared memory with async copies,
    STAGES - 1 steps ahead, instead of holding the next step in registers (63 registers a thread against 121 at
    BLOCK_N=128, GROUPS=1, ASM). H100, ASM: 14336->4096 18.4 µs (BLOCK_N=64, GROUPS=2, SPLIT_K=8, STAGES=2)
    against 19.3 with PREFETCH; no gain at the other two shapes.

    Where the time goes at 1 row (H100, `benchmarks/gemv_parts_gpu.py`: this loop with parts switched off, ASM and
    PREFETCH at 4096->4096 / 4096->14336 / 14336->4096): reading the words 5.0 / 14.2 / 12.7 µs, the group
    parameters and x 0.4 / 0.8 / 0.7 more, the conversion and FMAs 0.8 / 1.2 / 2.4, the split-K epilogue (atomic
    adds, the counter, the last split's reload: a chain of round trips to L2 at the end of every program) 1.8 / 1.2
    / 1.3; 8.0 / 17.4 / 17.1 in all.
    """
    tl.static_assert(PREFETCH == 0 or STAGES == 1, "PREFETCH and STAGES are two ways to load ahead: pick one")
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    n_steps = tl.cdiv(K // GROUP, GROUPS)
    per_split = tl.cdiv(n_steps, SPLIT_K)
    start = pid_k * per_split
    stop = tl.minimum(n_steps, start + per_split)
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    if PREFETCH:
        words, x, scale, zero = _gemv_step_load(x_row, w_ptr, s_ptr, z_ptr, offs_n, n_ok, start, stop, K,
                                                stride_wn, stride_sn, stride_zn, GROUP, GROUPS)
        for step in range(start, stop):
            words2, x2, scale2, zero2 = _gemv_step_load(x_row, w_ptr, s_ptr, z_ptr, offs_n, n_ok, step + 1, stop, K,
                                                        stride_wn, stride_sn, stride_zn, GROUP, GROUPS)
            acc += _gemv_step(words, x, scale, zero, field_mask, GROUP, MASKREG, PAIRS, ASM)
            words, x, scale, zero = words2, x2, scale2, zero2
    else:
        for step in tl.range(start, stop, num_stages=STAGES):
            words, x, scale, zero = _gemv_step_load(x_row, w_ptr, s_ptr, z_ptr, offs_n, n_ok, step, stop, K,
                                                    stride_wn, stride_sn, stride_zn, GROUP, GROUPS)
            acc += _gemv_step(words, x, scale, zero, field_mask, GROUP, MASKREG, PAIRS, ASM)
    offs_m = m + tl.arange(0, 1)
    _finish_tile(tl.sum(acc, axis=1)[:, None], offs_n, offs_m, M, N, b_ptr, y_ptr, stride_ym, ws_ptr, cnt_ptr,
                 m * tl.num_programs(0) + pid_n, HAS_BIAS, SPLIT_K)


@triton.jit
def _gemv_step_load(x_row, w_ptr, s_ptr, z_ptr, offs_n, n_ok, step, stop, K, stride_wn, stride_sn, stride_zn,
                    GROUP: tl.constexpr, GROUPS: tl.constexpr):
    """One step's words [BLOCK_N, GROUPS, GROUP / 8], x [GROUPS, GROUP] (fp32), scales and zero points
    [BLOCK_N, GROUPS] (fp32); all masked off past K or at step >= stop."""
    g = step * GROUPS + tl.arange(0, GROUPS)
    g_ok = (g < K // GROUP) & (g < stop * GROUPS)  # no step at or past `stop`
    ng_ok = n_ok[:, None] & g_ok[None, :]
    offs_w = g[:, None] * (GROUP // 8) + tl.arange(0, GROUP // 8)[None, :]
    words = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + offs_w[None], mask=ng_ok[:, :, None], other=0)
    x = tl.load(x_row + g[:, None] * GROUP + tl.arange(0, GROUP)[None, :], mask=g_ok[:, None], other=0.0)
    scale = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=ng_ok, other=0.0)
    zero = tl.load(z_ptr + offs_n[:, None] * stride_zn + g[None, :], mask=ng_ok, other=0)
    return words, x.to(tl.float32), scale.to(tl.float32), zero.to(tl.float32)


@triton.jit
def _gemv_step(words, x, scale, zero, field_mask, GROUP: tl.constexpr, MASKREG: tl.constexpr, PAIRS: tl.constexpr,
               ASM: tl.constexpr):
    """[BLOCK_N, GROUPS] partials: scale * (sum_k (c_k + q_k) x_k - sum_k c_k x_k - zero sum_k x_k) per group, the
    codes entering as the floats c_k + q_k (c_k = 16; with PAIRS 128 or 2048 by k's field; with ASM 128 for even k,
    2048 for odd k)."""
    if ASM:
        part, even, odd = _dot8_asm(words, x, field_mask >> 3, field_mask >> 7)
        return scale * (part - (128.0 + zero) * even - (2048.0 + zero) * odd)
    if PAIRS:
        codes = _codes_paired(words, field_mask >> 3, field_mask >> 7)
    elif MASKREG:
        codes = _nibbles_masked(words, field_mask)
    else:
        codes = _nibbles(words, 4, 19, 0x41800000, True)
    part = tl.sum(codes * x[None, :, :], axis=2)
    x_sums = tl.sum(x, axis=1)[None, :]
    if PAIRS:  # the offsets by field: 2048 for k % 8 in (0, 2, 3, 6), 128 for the others
        j = tl.arange(0, GROUP) % 8
        c = tl.where((j == 0) | (j == 2) | (j == 3) | (j == 6), 2048.0, 128.0)
        return scale * (part - tl.sum(x * c[None, :], axis=1)[None, :] - zero * x_sums)
    return scale * (part - (16.0 + zero) * x_sums)


@triton.jit
def _codes_paired(words, m16, m12):
    """int32 words [..., W] -> the fp32 floats c_k + q_k [..., 8 W] in k order, one shift for two fields: a field
    at bits 16-19 OR 128.0 (0x43000000) reads 128 + q, one at bits 12-15 OR 2048.0 (0x45000000) reads 2048 + q
    (exact: 12 bits times bf16's 8 stay exact in fp32). m16 = 0xF0000 and m12 = 0xF000 are runtime values, so
    each field is one LOP3 (mask and magic number at once); shifts: none, << 12, >> 12, << 4, >> 4."""
    up12 = words << 12
    down12 = _shr(words, 12)
    k0 = _magic(up12 & m12, 0x45000000)
    k1 = _magic(up12 & m16, 0x43000000)
    k2 = _magic((words << 4) & m12, 0x45000000)
    k3 = _magic(words & m12, 0x45000000)
    k4 = _magic(words & m16, 0x43000000)
    k5 = _magic(_shr(words, 4) & m16, 0x43000000)
    k6 = _magic(down12 & m12, 0x45000000)
    k7 = _magic(down12 & m16, 0x43000000)
    return tl.interleave(tl.interleave(tl.interleave(k0, k4), tl.interleave(k2, k6)),
                         tl.interleave(tl.interleave(k1, k5), tl.interleave(k3, k7)))


@triton.jit
def _dot8_asm(words, x, m16, m12):
    """[BLOCK_N, GROUPS] sums over each group of x_k (c_k + q_k), from `words` [BLOCK_N, GROUPS, W] and x [GROUPS, 8 W]
    (fp32), and the sums of x over each group's even and odd k [1, GROUPS]. The fields enter as the floats c_k + q_k,
    OR-ed into 128.0 at bits 16-19 (even k) or into 2048.0 at bits 12-15 (odd k). One PTX block a word: three
    shifts bring two fields each into those positions (the fourth pair is in place; a rotation by 16 serves fields
    0 and 7), one LOP3 a field (mask and magic number together, the mask a register), eight FMAs."""
    G: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1] // 8
    a, b = tl.split(tl.reshape(x, [G, W, 4, 2]))       # i even / odd
    a0, a1 = tl.split(tl.reshape(a, [G, W, 2, 2]))      # i = 0, 4 / 2, 6
    b0, b1 = tl.split(tl.reshape(b, [G, W, 2, 2]))      # i = 1, 5 / 3, 7
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    # the x sums from the split x, in the layout the words' threads hold it: a reduction among a row's threads only
    even = tl.sum((x0 + x2) + (x4 + x6), axis=1)[None, :]
    odd = tl.sum((x1 + x3) + (x5 + x7), axis=1)[None, :]
    if not PTX:  # the same fields and products in Triton ops (the interpreter, non-NVIDIA GPUs)
        dots = _dot8_fields(words, m16, m12, x0, x1, x2, x3, x4, x5, x6, x7)
    else:
        dots = tl.inline_asm_elementwise(
            """{
            .reg .b32 s8, s24, r16, f, acc;  // acc: no output register read back
            shl.b32 s8, $1, 8;
            shr.u32 s24, $1, 8;
            shf.l.wrap.b32 r16, $1, $1, 16;
            lop3.b32 f, r16, $2, 0x43000000, 0xEA;
            mul.rn.f32 acc, f, $4;
            lop3.b32 f, r16, $3, 0x45000000, 0xEA;
            fma.rn.f32 acc, f, $11, acc;
            lop3.b32 f, s8, $3, 0x45000000, 0xEA;
            fma.rn.f32 acc, f, $5, acc;
            lop3.b32 f, s8, $2, 0x43000000, 0xEA;
            fma.rn.f32 acc, f, $6, acc;
            lop3.b32 f, $1, $3, 0x45000000, 0xEA;
            fma.rn.f32 acc, f, $7, acc;
            lop3.b32 f, $1, $2, 0x43000000, 0xEA;
            fma.rn.f32 acc, f, $8, acc;
            lop3.b32 f, s24, $3, 0x45000000, 0xEA;
            fma.rn.f32 acc, f, $9, acc;
            lop3.b32 f, s24, $2, 0x43000000, 0xEA;
            fma.rn.f32 acc, f, $10, acc;
            mov.b32 $0, acc;
            }""",
            "=r,r,r,r,r,r,r,r,r,r,r,r",
            [words, tl.zeros_like(words) + m16, tl.zeros_like(words) + m12,
             x0[None], x1[None], x2[None], x3[None], x4[None], x5[None], x6[None], x7[None]],
            dtype=tl.float32, is_pure=True, pack=1)
    return tl.sum(dots, axis=2), even, odd


@triton.jit
def _dot8_fields(words, m16, m12, x0, x1, x2, x3, x4, x5, x6, x7):
    """`_dot8_asm`'s PTX block in Triton ops: the same shifts, fields and magic numbers, term for term."""
    up8 = words << 8
    down8 = _shr(words, 8)
    rot16 = (words << 16) | _shr(words, 16)
    dot = _magic(rot16 & m16, 0x43000000) * x0[None]
    dot += _magic(rot16 & m12, 0x45000000) * x7[None]
    dot += _magic(up8 & m12, 0x45000000) * x1[None]
    dot += _magic(up8 & m16, 0x43000000) * x2[None]
    dot += _magic(words & m12, 0x45000000) * x3[None]
    dot += _magic(words & m16, 0x43000000) * x4[None]
    dot += _magic(down8 & m12, 0x45000000) * x5[None]
    dot += _magic(down8 & m16, 0x43000000) * x6[None]
    return dot


@triton.jit
def _magic(field, MAGIC: tl.constexpr):
    return (field | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _nibbles_masked(words, mask):
    """`_nibbles(words, 4, 19, 0x41800000, True)` with the field mask a runtime value (0x780000)."""
    return tl.interleave(
        tl.interleave(tl.interleave(_field_masked(words, 0, mask), _field_masked(words, 16, mask)),
                      tl.interleave(_field_masked(words, 8, mask), _field_masked(words, 24, mask))),
        tl.interleave(tl.interleave(_field_masked(words, 4, mask), _field_masked(words, 20, mask)),
                      tl.interleave(_field_masked(words, 12, mask), _field_masked(words, 28, mask))))


@triton.jit
def _field_masked(words, FROM: tl.constexpr, mask):
    if FROM <= 19:
        v = words << (19 - FROM)
    else:
        v = _shr(words, FROM - 19)
    return ((v & mask) | 0x41800000).to(tl.float32, bitcast=True)


# ---------------------------------------------------------------------------------------------------------
# int4 GEMM: tensor cores, the weight tile as the MMA's first operand (or, W_AS_B, its second)


@triton.jit
def _int4_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, M_BUCKET,
                      stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
                      GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      DEQUANT: tl.constexpr = 0, PREFETCH: tl.constexpr = 1, W_AS_B: tl.constexpr = 0):
    """y^T tile [BLOCK_N, BLOCK_M] = W tile . x^T tile, group by group (BLOCK_K divides GROUP).

    DEQUANT = 0: the codes enter the MMA as they are and the scale and zero point apply to the accumulator
    (cheap for few rows). DEQUANT = 1: the tile is dequantized in registers, (q - zero) * scale in fp32 rounded to
    x's dtype (the dense fallback's weight exactly), then one MMA: for many rows, where the MMA count matters.
    DEQUANT = 2 (integer zero points only): q - zero, exact in x's 16-bit type, enters one MMA and the scale
    applies to the accumulator: half the MMAs of DEQUANT = 0, a packed subtraction per two codes instead of
    DEQUANT = 1's fp32 dequantization (offline SASS, 64x64x128 tiles: 8 HGMMA a step against 16). Its per-step
    scaling waits for each step's MMA. DEQUANT = 3 (integer zero points, scales in x's dtype): (q - zero) * scale
    in x's 16-bit type, a packed subtraction and multiplication per two codes, equal to DEQUANT = 1's tile bit for
    bit (an exact difference, then one correctly rounded product), accumulated by the MMA across steps.

    W_AS_B (DEQUANT = 1 or 3): y tile [BLOCK_M, BLOCK_N] = x tile . W^T tile, transposed once at the end. The
    dequantized weight is then the MMA's second operand, which Hopper's wgmma reads from shared memory: one store
    of the tile, then the step's MMAs issue back to back with one wait (offline SASS, Triton 3.6, 64x64x128: 8
    HGMMA, 1 wait a step). As the first operand it must be in registers in the MMA's layout, so Triton stores the
    tile, loads it back (LDSM) and waits for each MMA before the next (8 waits a step). H100, 64 rows: 5-10% faster
    (BENCHMARKS.md, "weight as the MMA's second operand"). Needs 64-row tiles for wgmma.

    PREFETCH: the next step's scales and zero points load during this step, in registers. Triton's pipeliner
    stages the word and activation tiles through shared memory (async copies, num_stages deep) but leaves these
    loads of a few bytes a thread in the loop, where each step would wait out a memory latency for them."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    m_ok = offs_m < M
    dtype = x_ptr.dtype.element_ty
    n_blocks = K // BLOCK_K
    per_split = tl.cdiv(n_blocks, SPLIT_K)
    if W_AS_B:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    start = pid_k * per_split
    stop = tl.minimum(n_blocks, start + per_split)
    if PREFETCH:
        # group indices clamped to the last group (an empty split, the step after the last): valid addresses
        scale_next, zero_next = _group_params(s_ptr, z_ptr, offs_n, stride_sn, stride_zn,
                                              tl.minimum(start * BLOCK_K // GROUP, K // GROUP - 1), n_ok)
    for blk in range(start, stop):
        k0 = blk * BLOCK_K
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :],
                        mask=n_ok[:, None], other=0)
        if W_AS_B:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_ok[:, None], other=0.0)
        else:
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_k)[:, None], mask=m_ok[None, :], other=0.0)
        if PREFETCH:
            scale, zero = scale_next, zero_next
            scale_next, zero_next = _group_params(s_ptr, z_ptr, offs_n, stride_sn, stride_zn,
                                                  tl.minimum((k0 + BLOCK_K) // GROUP, K // GROUP - 1), n_ok)
        else:
            scale, zero = _group_params(s_ptr, z_ptr, offs_n, stride_sn, stride_zn, k0 // GROUP, n_ok)
        if DEQUANT == 1:
            w = ((_nibbles(words, 4, 19, 0x41800000, True) - 16.0 - zero[:, None]) * scale[:, None]).to(dtype)
            if W_AS_B:
                acc = _mma(xt, tl.trans(w), acc)
            else:
                acc += _mma(w, xt, None)
        elif DEQUANT == 2:
            # q - zero in the MMA's type, exact for integer zero points (|q - zero| <= 15): one MMA, no x sums
            acc += scale[:, None] * _mma(_minus_zero(words, zero, dtype), xt, None)
        elif DEQUANT == 3 and W_AS_B:
            acc = _mma(xt, tl.trans(_minus_zero(words, zero, dtype) * scale.to(dtype)[:, None]), acc)
        elif DEQUANT == 3:
            # (q - zero) * scale by packed 16-bit ops: the difference is exact and the product rounds once,
            # DEQUANT = 1's weight bit for bit at a third of its instructions; the MMAs accumulate across steps
            acc = _mma(_minus_zero(words, zero, dtype) * scale.to(dtype)[:, None], xt, acc)
        else:
            # bf16/fp16: the weight enters the MMA as offset + q (16-bit magic number: no conversion at all);
            # the offset joins the zero point below.
            if dtype == tl.bfloat16:
                part = tl.dot(_nibbles(words, 4, 0, 0x4300, False).to(tl.bfloat16, bitcast=True), xt)
                offset = 128.0
            elif dtype == tl.float16:
                part = tl.dot(_nibbles(words, 4, 0, 0x6400, False).to(tl.float16, bitcast=True), xt)
                offset = 1024.0
            else:
                part = tl.dot(_nibbles(words, 4, 19, 0x41800000, True) - 16.0, xt, input_precision="ieee")
                offset = 0.0
            zero = zero + offset
            # the sums of x over the block, as an MMA with ones: [BLOCK_N, BLOCK_M] like `part`, no shuffles (a
            # column sum, tl.sum(xt, 0), measured 10-25% slower at 64 rows: its layout conversion costs more)
            x_sums = _mma(tl.full([BLOCK_N, BLOCK_K], 1.0, dtype), xt, None)
            acc += scale[:, None] * (part - zero[:, None] * x_sums)
    if W_AS_B:
        acc = tl.trans(acc)
    _finish_tile(acc, offs_n, offs_m, M, N, b_ptr, y_ptr, stride_ym, ws_ptr, cnt_ptr,
                 pid_m * tl.num_programs(0) + pid_n, HAS_BIAS, SPLIT_K)


@triton.jit
def _group_params(s_ptr, z_ptr, offs_n, stride_sn, stride_zn, g, mask):
    """The scales and zero points (fp32) of group g for the outputs offs_n."""
    scale = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + offs_n * stride_zn + g, mask=mask, other=0).to(tl.float32)
    return scale, zero


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn, stride_on,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """out[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G], computed in fp32 as the reference does.

    A [BLOCK_N, GROUPS, GROUP] tile: one scale and zero point per (output, group), broadcast over the group
    in registers (not a gather per element)."""
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    g = pid_g * GROUPS + tl.arange(0, GROUPS)
    ng_ok = (offs_n < N)[:, None] & (g < K // GROUP)[None, :]
    offs_w = g[:, None] * (GROUP // 8) + tl.arange(0, GROUP // 8)[None, :]
    words = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + offs_w[None], mask=ng_ok[:, :, None], other=0)
    scale = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=ng_ok, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + offs_n[:, None] * stride_zn + g[None, :], mask=ng_ok, other=0).to(tl.float32)
    q = _nibbles(words, 4, 19, 0x41800000, True) - 16.0
    offs_k = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    tl.store(out_ptr + offs_n[:, None, None] * stride_on + offs_k[None],
             ((q - zero[:, :, None]) * scale[:, :, None]).to(out_ptr.dtype.element_ty), mask=ng_ok[:, :, None])


# ---------------------------------------------------------------------------------------------------------
# W8A8 (and the fp8 op's activations)


@triton.jit
def _quantize_rows_kernel(x_ptr, smooth_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
                          HAS_SMOOTH: tl.constexpr, QMAX: tl.constexpr, ROUND: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row: x' = x / smooth, scale = max|x'| / QMAX (1 for a zero row), q = x' / scale (rounded half to
    even and clamped to +-QMAX when ROUND, else clamped and cast, e.g. to e4m3). IEEE divisions, as in torch."""
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _smoothed(x_ptr + m * stride_xm, smooth_ptr, k0 + offs, K, HAS_SMOOTH)
        amax = tl.maximum(amax, tl.abs(x))
    row_max = tl.max(amax, axis=0)
    scale = tl.where(row_max > 0, tl.math.div_rn(row_max, QMAX), 1.0)
    tl.store(scale_ptr + m, scale)
    for k0 in range(0, K, BLOCK_K):
        v = tl.math.div_rn(_smoothed(x_ptr + m * stride_xm, smooth_ptr, k0 + offs, K, HAS_SMOOTH), scale)
        if ROUND:  # half to even, like torch.round (v - floor(v) is exact in fp32)
            r = tl.floor(v)
            frac = v - r
            v = tl.where((frac > 0.5) | ((frac == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0)), r + 1.0, r)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        tl.store(q_ptr + m * stride_qm + k0 + offs, v.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)


@triton.jit
def _smoothed(row_ptr, smooth_ptr, offs, K, HAS_SMOOTH: tl.constexpr):
    x = tl.load(row_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + offs, mask=offs < K, other=1.0).to(tl.float32))
    return x


@triton.jit
def _int8_gemm_kernel(a_ptr, a_scale_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, M_BUCKET,
                      stride_am, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr = 1):
    """y = (a @ w_int8^T) * scales[None, :] + bias, for both int8-weight ops.

    W8A8: `a` int8 (per-token quantized), an int8 x int8 -> int32 MMA, the rows scaled by a_scale[:, None].
    Weight-only: `a` is x itself; the int8 tile converts exactly to x's dtype (|q| <= 128 fits bf16's 8
    significant bits) and goes straight into the MMA (a_scale_ptr unused). The scales multiply the accumulator
    once at the end. The weight is the MMA's second operand, read from shared memory.

    SPLIT_K: each program covers 1/SPLIT_K of K and adds its scaled partial to the fp32 workspace (see the module
    doc): for few rows, where the output tiles alone leave most SMs idle (4096 outputs at 64 rows: 64 tiles of
    64 x 64 for 132 SMs).
    """
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    dtype = a_ptr.dtype.element_ty
    if dtype == tl.int8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    for k0 in range(pid_k * per_split, tl.minimum(K, (pid_k + 1) * per_split), BLOCK_K):
        k_ok = k0 + offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :],
                    mask=(offs_m < M)[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None],
                    mask=(offs_n < N)[None, :] & k_ok[:, None], other=0)
        if dtype == tl.int8:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        elif dtype == tl.float32:
            acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(dtype), acc)
    scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if dtype == tl.int8:
        y = acc.to(tl.float32) * tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None] * scale[None, :]
    else:
        y = acc * scale[None, :]
    # y^T orientation for the shared epilogue
    _finish_tile(tl.trans(y), offs_n, offs_m, M, N, b_ptr, y_ptr, stride_ym, ws_ptr, cnt_ptr,
                 pid_m * tl.num_programs(0) + pid_n, HAS_BIAS, SPLIT_K)


# ---------------------------------------------------------------------------------------------------------
# autotuning: configs, fitted to the group size


def _cfg(num_warps=4, num_stages=3, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


INT8_GEMV_CONFIGS = [
    _cfg(BLOCK_N=16, CHUNK=128, UNROLL=4, SPLIT_K=1), _cfg(BLOCK_N=32, CHUNK=128, UNROLL=4, SPLIT_K=1),
    _cfg(BLOCK_N=32, CHUNK=128, UNROLL=2, SPLIT_K=1), _cfg(BLOCK_N=64, CHUNK=128, UNROLL=2, SPLIT_K=1),
    _cfg(BLOCK_N=16, CHUNK=128, UNROLL=8, SPLIT_K=1), _cfg(BLOCK_N=64, CHUNK=128, UNROLL=4, SPLIT_K=1, num_warps=8),
    _cfg(BLOCK_N=32, CHUNK=128, UNROLL=4, SPLIT_K=2), _cfg(BLOCK_N=16, CHUNK=128, UNROLL=4, SPLIT_K=4),
    _cfg(BLOCK_N=32, CHUNK=128, UNROLL=8, SPLIT_K=2), _cfg(BLOCK_N=64, CHUNK=128, UNROLL=2, SPLIT_K=4),
]
INT4_GEMV_CONFIGS = [  # the best of `benchmarks/quant_linear_gpu.py --sweep 1` on an H100 (each shape's best within 8%)
    _cfg(BLOCK_N=8, GROUPS=4, SPLIT_K=1, PREFETCH=1), _cfg(BLOCK_N=64, GROUPS=2, SPLIT_K=4, PREFETCH=1),
    _cfg(BLOCK_N=8, GROUPS=8, SPLIT_K=1), _cfg(BLOCK_N=16, GROUPS=4, SPLIT_K=1, PREFETCH=1),
    _cfg(BLOCK_N=32, GROUPS=2, SPLIT_K=4, PREFETCH=1), _cfg(BLOCK_N=32, GROUPS=4, SPLIT_K=4),
    _cfg(BLOCK_N=16, GROUPS=8, SPLIT_K=1, PREFETCH=1), _cfg(BLOCK_N=64, GROUPS=2, SPLIT_K=1, PREFETCH=1),
    # fewer instructions a code (offline SASS counts, `benchmarks/sass_count.py`); the H100 sweep's winners at
    # 4096->14336 (PAIRS, 19.0 µs against 20.2 for the best plain config) and 14336->4096 (MASKREG, 20.3 vs 21.1)
    _cfg(BLOCK_N=64, GROUPS=2, SPLIT_K=4, PREFETCH=1, MASKREG=1),
    _cfg(BLOCK_N=8, GROUPS=4, SPLIT_K=1, PREFETCH=1, PAIRS=1),
    _cfg(BLOCK_N=16, GROUPS=4, SPLIT_K=1, PREFETCH=1, PAIRS=1),
    _cfg(BLOCK_N=64, GROUPS=1, SPLIT_K=4, PREFETCH=1, PAIRS=1),
    _cfg(BLOCK_N=64, GROUPS=2, SPLIT_K=4, PREFETCH=1, PAIRS=1),
    _cfg(BLOCK_N=128, GROUPS=1, SPLIT_K=4, PREFETCH=1, PAIRS=1),
    _cfg(BLOCK_N=256, GROUPS=1, SPLIT_K=8, PAIRS=1, num_warps=8),
    # one PTX block a word: the H100 sweep's winners at 4096->14336 (17.6 µs against PAIRS' 18.4) and 14336->4096
    # (19.3 against 20.7), `quant_linear_gpu.py --sweep 1 --sweep-only ASM=1` and `PAIRS=1` in one call
    _cfg(BLOCK_N=128, GROUPS=1, SPLIT_K=4, PREFETCH=1, ASM=1),
    _cfg(BLOCK_N=64, GROUPS=2, SPLIT_K=4, PREFETCH=1, ASM=1),
    _cfg(BLOCK_N=128, GROUPS=1, SPLIT_K=8, PREFETCH=1, ASM=1),
    _cfg(BLOCK_N=64, GROUPS=2, SPLIT_K=1, PREFETCH=1, ASM=1),
    # loads pipelined through shared memory (STAGES): the sweep's winner at 14336->4096 (18.4 µs), and the best
    # STAGES=3 config at 4096->14336 (`--sweep 1 --sweep-only STAGES=2`, `=3`, `=4`)
    _cfg(BLOCK_N=64, GROUPS=2, SPLIT_K=8, STAGES=2, ASM=1),
    _cfg(BLOCK_N=64, GROUPS=2, SPLIT_K=4, STAGES=3, ASM=1),
]
INT4_GEMM_CONFIGS = [
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_stages=4),
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_stages=4),
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_stages=4),
    _cfg(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1),
    _cfg(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2),
    _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_stages=4),
    _cfg(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, num_warps=8),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_stages=4),
    # dequantized in registers, one MMA per tile (see the kernel): the many-row end
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, DEQUANT=1, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, DEQUANT=1, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, DEQUANT=1, num_stages=4),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, DEQUANT=1, num_stages=3, num_warps=8),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, DEQUANT=1, num_stages=3, num_warps=8),
    _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, DEQUANT=1, num_stages=4),
    # split-K over 64-row tiles (64 rows) and 256-row tiles (256 rows): `quant_linear_gpu.py --sweep 64,256`
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, DEQUANT=1, num_stages=4),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4, DEQUANT=1, num_stages=3, num_warps=8),
    _cfg(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, DEQUANT=1, num_stages=3, num_warps=8),
    _cfg(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4, DEQUANT=1, num_stages=3, num_warps=8),
    # q - zero in the MMA (integer zero points): half DEQUANT = 0's MMAs (offline SASS counts,
    # `benchmarks/sass_count.py --kernel gemm`); the H100 sweep's winners at 64 rows on every shape
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, DEQUANT=2, num_stages=4),
    _cfg(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, DEQUANT=2),
    _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, DEQUANT=2, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, DEQUANT=2, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, DEQUANT=2, num_stages=4),
    _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, DEQUANT=2, num_stages=4),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4, DEQUANT=2, num_stages=3, num_warps=8),
    # packed 16-bit dequantization (integer zero points, scales in x's dtype): the H100 sweep's winners at 16 rows
    # on two shapes, 64 rows on all three, 256 rows on two (`quant_linear_gpu.py --sweep 16,64,256`, 12cfff5)
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, DEQUANT=3, num_stages=4),
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, DEQUANT=3, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4, DEQUANT=3, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, DEQUANT=3, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, DEQUANT=3, num_stages=4),
    _cfg(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, DEQUANT=3, num_stages=3, num_warps=8),
    _cfg(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4, DEQUANT=3, num_stages=3, num_warps=8),
    # the weight as the MMA's shared-memory operand: the H100 sweep's winners at 64 rows on all three shapes
    # (`quant_linear_gpu.py --sweep 64,256`), and DEQUANT = 1's best for fractional zero points
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, DEQUANT=3, W_AS_B=1, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, DEQUANT=3, W_AS_B=1, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4, DEQUANT=3, W_AS_B=1, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, DEQUANT=1, W_AS_B=1, num_stages=4),
]
INT8_GEMM_CONFIGS = [
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_stages=4), _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_stages=4), _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8), _cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    # split-K (not yet timed on a GPU: the autotuner measures them beside the others): few rows fill the SMs
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, num_warps=8),
]
INT8_WEIGHT_GEMM_CONFIGS = INT8_GEMM_CONFIGS + [  # few rows: narrower tiles fill the GPU
    _cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_stages=4), _cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_stages=3),
    _cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=256, num_stages=3),
    _cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=8, num_stages=4),
    _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_stages=4),
]


def _dequant_unfit(dequant: int, x, scales, zeros) -> str | None:
    """Why a DEQUANT mode cannot serve these tensors (None: it can)."""
    if dequant in (2, 3) and zeros.dtype.is_floating_point:
        return f"DEQUANT={dequant} needs integer zero points (q - zero is exact in 16 bits only then)"
    if dequant == 3 and scales.dtype != x.dtype:
        return "DEQUANT=3 needs the scales in the activations' dtype (it multiplies in that type)"
    return None


def _fit(configs, named_args, **kwargs):
    """Adapt block sizes to the group size (GEMV: chunks of one group; GEMM: BLOCK_K divides it) and rows."""
    group, rows = kwargs.get("GROUP", named_args.get("GROUP", 0)), max(16, named_args["M_BUCKET"])
    out, seen = [], set()
    for c in configs:
        kw = dict(c.kwargs)
        if "BLOCK_M" in kw:
            if kw["BLOCK_M"] > rows:
                continue
            if kw.get("DEQUANT") and _dequant_unfit(kw["DEQUANT"], named_args["x_ptr"], named_args["s_ptr"],
                                                    named_args["z_ptr"]):
                continue
            if group:
                kw["BLOCK_K"] = min(kw["BLOCK_K"], group)
        elif "GROUPS" in kw:  # int4 GEMV: whole groups per step, at most 4096 codes (and no more than K holds)
            kw["GROUPS"] = max(1, min(kw["GROUPS"], 4096 // group, triton.next_power_of_2(named_args["K"] // group)))
        else:  # GEMV: chunks of one group (int4), or dividing K (int8)
            kw["CHUNK"] = group or min(kw["CHUNK"], named_args["K"] & -named_args["K"])
        key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def _tuned(kernel, configs, key):
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _fit})(kernel)


_int8_gemv_tuned = _tuned(_int8_gemv_kernel, INT8_GEMV_CONFIGS, ["M", "N", "K"])
_int4_gemv_tuned = _tuned(_int4_gemv_kernel, INT4_GEMV_CONFIGS, ["M", "N", "K", "GROUP"])
_int4_gemm_tuned = _tuned(_int4_gemm_kernel, INT4_GEMM_CONFIGS, ["M_BUCKET", "N", "K", "GROUP"])
_int8_gemm_tuned = _tuned(_int8_gemm_kernel, INT8_GEMM_CONFIGS, ["M_BUCKET", "N", "K"])
_int8_weight_gemm_tuned = _tuned(_int8_gemm_kernel, INT8_WEIGHT_GEMM_CONFIGS, ["M_BUCKET", "N", "K"])


MEASURED_CONFIGS_PATH = Path(__file__).with_name("measured_configs.json")


@functools.cache
def measured_configs() -> dict:
    """{GPU name: {kernel: {shape key: config}}}: the fastest config the sweep measured (see the module doc)."""
    if os.environ.get("PRUNUS_MEASURED_CONFIGS", "1") == "0" or not MEASURED_CONFIGS_PATH.exists():
        return {}
    return json.loads(MEASURED_CONFIGS_PATH.read_text())


def shape_key(M: int, N: int, K: int, group: int) -> str:
    """The table's key: the weight's shape, the group size and the row bucket (`m_bucket`)."""
    return f"{K}x{N}/g{group}/m{m_bucket(M)}"


def measured_config(kernel: str, device_name: str, M: int, N: int, K: int, group: int) -> dict | None:
    """The measured config of `kernel` ("int4_gemv", "int4_gemm"; the Gluon kernels' "int4_wgmma", "int4_gemv_mma")
    on this GPU model and shape, or None."""
    return measured_configs().get(device_name, {}).get(kernel, {}).get(shape_key(M, N, K, group))


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _launch(kernel, tuned, configs, grid, args, consts, config):
    """Run with `config`; else autotuned (on the interpreter, which cannot time, the first fitting config)."""
    if config is None and INTERPRET:
        config = _fit(configs, args, **consts)[0].kwargs
    if config is None:
        tuned[grid](*args.values(), **consts)
    else:
        kernel[grid](*args.values(), **consts, **config)


def m_bucket(m: int) -> int:
    """Rows rounded up to a power of two: the autotuning key, so that nearby batch sizes share a tuning."""
    return triton.next_power_of_2(max(m, 1))


_WORKSPACE: dict = {}


def _split_k_workspace(device, numel: int, tiles: int):
    """Zeroed fp32 partial sums and arrival counters; the kernels leave them zeroed after every launch.

    One per device, so split-K launches must not overlap (one stream); allocated on first use, so a CUDA
    graph must be captured after a warm-up call at the largest row count it will see.
    """
    ws, cnt = _WORKSPACE.get(device, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < tiles:
        ws = torch.zeros(max(numel, 1 << 16), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 1 << 12), dtype=torch.int32, device=device)
        _WORKSPACE[device] = (ws, cnt)
    return ws, cnt


def _words(qweight: torch.Tensor) -> torch.Tensor:
    return qweight.contiguous().view(torch.int32)


def _contiguous_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ---------------------------------------------------------------------------------------------------------
# launchers


def _weight_only(x, words, scales, zeros, bias, group, bits, config, gemm: bool):
    x = _contiguous_rows(x)
    M, K = x.shape
    N = words.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    ws, cnt = _split_k_workspace(x.device, M * N, M * triton.cdiv(N, 8))
    zeros_arg = zeros if zeros is not None else scales
    args = dict(x_ptr=x, w_ptr=words, s_ptr=scales, z_ptr=zeros_arg, b_ptr=bias if bias is not None else y,
                y_ptr=y, ws_ptr=ws, cnt_ptr=cnt, M=M, N=N, K=K, M_BUCKET=m_bucket(M),
                stride_xm=x.stride(0), stride_wn=words.stride(0), stride_sn=scales.stride(0),
                stride_zn=zeros_arg.stride(0), stride_ym=y.stride(0))
    consts = dict(HAS_BIAS=bias is not None) if bits == 8 else dict(GROUP=group, HAS_BIAS=bias is not None)
    if bits == 4 and config is None:
        config = None if INTERPRET or x.device.type != "cuda" else measured_config(
            "int4_gemm" if gemm else "int4_gemv", _device_name(x.device.index or 0), M, N, K, group)
        if config is not None and _dequant_unfit(config.get("DEQUANT", 0), x, scales, zeros_arg):
            config = None  # measured for integer zero points and matching scales: autotune over those that fit
    if gemm:
        reason = config is not None and _dequant_unfit(config.get("DEQUANT", 0), x, scales, zeros_arg)
        if config is not None and config.get("W_AS_B") and config.get("DEQUANT", 0) not in (1, 3):
            reason = "W_AS_B needs DEQUANT=1 or 3 (a dequantized weight tile that the MMA accumulates)"
        if reason:
            raise ValueError(reason)
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]), meta["SPLIT_K"])
        _launch(_int4_gemm_kernel, _int4_gemm_tuned, INT4_GEMM_CONFIGS, grid, args, consts, config)
        return y
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M, meta["SPLIT_K"])  # noqa: E731
    if bits == 4:
        args["field_mask"] = 0xF << 19  # a runtime value for MASKREG, PAIRS and ASM (see the kernel)
        _launch(_int4_gemv_kernel, _int4_gemv_tuned, INT4_GEMV_CONFIGS, grid, args, consts, config)
    else:
        _launch(_int8_gemv_kernel, _int8_gemv_tuned, INT8_GEMV_CONFIGS, grid, args, consts, config)
    return y


def int4_gemv(x, qweight, scales, zeros, bias, group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (few rows) times the int4 weight: CUDA-core kernel. group_size: a power of two >= 8."""
    return _weight_only(x, _words(qweight), scales, zeros, bias, group_size, 4, config, gemm=False)


def int4_gemm(x, qweight, scales, zeros, bias, group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [M, K] times the int4 weight: tensor-core kernel. group_size: a power of two >= 16."""
    return _weight_only(x, _words(qweight), scales, zeros, bias, group_size, 4, config, gemm=True)


def int8_gemv(x, qweight, scales, bias, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (few rows) times the int8 per-channel weight (K a multiple of 4)."""
    return _weight_only(x, _words(qweight), scales, None, bias, 0, 8, config, gemm=False)


def int8_gemm_weight_only(x, qweight, scales, bias, config: dict | None = None) -> torch.Tensor:
    """x [M, K] times the int8 per-channel weight on tensor cores (any M; the GEMV serves one row)."""
    x = _contiguous_rows(x)
    return _int8_gemm(x, x, qweight, scales, bias, x.dtype, _int8_weight_gemm_tuned, INT8_WEIGHT_GEMM_CONFIGS, config)


def int4_dequantize(qweight, scales, zeros, group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight [N, K] (in `dtype`, default the scales' dtype); K a multiple of group_size (>= 8)."""
    words = _words(qweight)
    N, K = words.shape[0], words.shape[1] * 8
    out = torch.empty(N, K, dtype=dtype or scales.dtype, device=qweight.device)
    block_n, groups = 8, max(1, 1024 // group_size)  # 1024 codes (512 bytes) per output row and program
    grid = (triton.cdiv(N, block_n), triton.cdiv(K // group_size, groups))
    _int4_dequant_kernel[grid](words, scales, zeros, out, N, K, words.stride(0), scales.stride(0), zeros.stride(0),
                               out.stride(0), GROUP=group_size, BLOCK_N=block_n, GROUPS=groups)
    return out


def quantize_rows(x, smooth, dtype: torch.dtype):
    """Per-token dynamic quantization of x [M, K] (divided by `smooth` [K] if given) to int8 (round half to
    even, +-127) or float8_e4m3fn (+-448): returns (q [M, K], scale [M] fp32) with x' ~ q * scale."""
    x = _contiguous_rows(x)
    M, K = x.shape
    q = torch.empty(M, K, dtype=dtype, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    is_int = dtype == torch.int8
    qmax = 127.0 if is_int else torch.finfo(dtype).max
    if M:
        _quantize_rows_kernel[(M,)](x, smooth if smooth is not None else x, q, scale, K, x.stride(0), q.stride(0),
                                    HAS_SMOOTH=smooth is not None, QMAX=qmax, ROUND=is_int,
                                    BLOCK_K=min(4096, triton.next_power_of_2(K)))
    return q, scale


def int8_gemm(xq, a_scale, qweight, scales, bias, out_dtype: torch.dtype, config: dict | None = None):
    """(xq int8 [M, K] @ qweight int8 [N, K]^T, int32) * a_scale[:, None] * scales[None, :] + bias."""
    return _int8_gemm(xq, a_scale, qweight, scales, bias, out_dtype, _int8_gemm_tuned, INT8_GEMM_CONFIGS, config)


def _int8_gemm(a, a_scale, qweight, scales, bias, out_dtype, tuned, configs, config):
    M, K = a.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0:
        return y
    qweight = qweight.contiguous()
    ws, cnt = _split_k_workspace(a.device, M * N, M * triton.cdiv(N, 8))
    args = dict(a_ptr=a, a_scale_ptr=a_scale, w_ptr=qweight, s_ptr=scales, b_ptr=bias if bias is not None else y,
                y_ptr=y, ws_ptr=ws, cnt_ptr=cnt, M=M, N=N, K=K, M_BUCKET=m_bucket(M), stride_am=a.stride(0),
                stride_wn=qweight.stride(0), stride_ym=y.stride(0))
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]), meta.get("SPLIT_K", 1))
    _launch(_int8_gemm_kernel, tuned, configs, grid, args, dict(HAS_BIAS=bias is not None), config)
    return y
