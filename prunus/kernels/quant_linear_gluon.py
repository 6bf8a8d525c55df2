"""int4 kernels in Gluon: a Hopper (sm_90) GEMM for many rows, and a tensor-core GEMV for few (sm_80+).

Part 1, the GEMM (`int4_gemm_wgmma`): the weight tile dequantized while the previous tile's wgmma runs.

Why Gluon: in plain Triton the dequantized weight tile is a local value that Triton's pipeliner cannot double
buffer, so its loop waits for each wgmma before converting the next tile (offline TTGIR, Triton 3.6:
`warp_group_dot_wait {pendings = 0}`), and its automatic warp specialization does not take a loop with the
conversion in it (BENCHMARKS.md, "int4 GEMV at 1 row: one inline PTX block a word"). Gluon
(`triton.experimental.gluon`) exposes shared memory, TMA, mbarriers and async wgmma directly, so the schedule is
written out here:

- TMA brings the activation tile x [BLOCK_M, BLOCK_K] (bf16) and the packed weight tile [BLOCK_N, BLOCK_K / 8]
  (int32 words, 8 codes each) into a ring of STAGES shared-memory stages, LOOKAHEAD steps ahead;
- each step, every warp converts its share of the word tile in registers, one inline-PTX block a word (the
  codes as the magic floats 128 + q, two a register, reordered into k order by PRMT, then
  (v - (128 + zero)) * scale by packed bf16 ops: exact difference, one rounding, so the tile equals the
  dense fallback's weight bit for bit), and stores it into one of BUFFERS shared tiles;
- one async wgmma per step, acc [BLOCK_M, BLOCK_N] += x tile . W tile^T (the weight tile is the MMA's
  shared-memory B operand, read transposed), and `warpgroup_mma_wait(num_outstanding=1)`: the MMA of step j
  runs while step j + 1's tile is converted. Step 0 is peeled with use_acc=False: a zero-initialized
  accumulator entering the loop makes ptxas serialize every wgmma (C7515; a CPU test checks this offline).

Synchronisation: one explicit CTA-wide barrier a step, after the tile's stores, the async-proxy fence and the TMA
issue (Gluon adds its own barriers around the TMA ops). When every warp has passed it at step j, every warp has
waited (num_outstanding=1) for its MMAs up to step j - 2. So at step j + 1 the shared tile written (BUFFERS = 3:
the one MMA j - 2 read) and the stage refilled (the one MMA j - 2 read, LOOKAHEAD = STAGES - 3 ahead) are free.

Split-K (SPLIT_K > 1): the K steps are split over programs whose fp32 partials meet in a workspace, as in
`quant_linear_triton` (the last to arrive writes the tile and re-zeroes the workspace).

Status (H100, BENCHMARKS.md "int4 wgmma GEMM in Gluon"): correct, and slower than the op's Triton path at 64 to 1024
rows on every Llama-3-8B projection shape but one (4096->14336 at 256 rows: 77.9 against 85.0 µs, still 0.67x bf16).
A step takes 0.41 µs with 64x64 tiles, 0.74 µs with 128x128 ones (4x the MMA work; 4096->4096 at 64 rows): it is
latency-bound. Candidates: four CTA-wide barriers a step (SASS; Gluon puts barriers around each TMA op), and the
group parameters (scale, zero point) that each conversion needs, plain loads issued one step ahead (moving them from
before the per-step async-proxy fence, MEMBAR.ALL.CTA in SASS, to after the MMA issue changed nothing measurable).
Fetching them by TMA with the tiles instead (tried at 6c49d40) crashed with an illegal instruction on the H100, not
yet diagnosed. So the op uses this kernel only where `measured_configs.json` holds an "int4_wgmma" entry:
`benchmarks/quant_linear_gpu.py --sweep-wgmma` writes one only where the kernel beat the Triton path in the same
run. Its one entry (4096->14336 at 256 rows) has since gone to Part 1b's kernel, which beat it there.

Needs: a CUDA GPU of compute capability 9.x, Triton with Gluon's Hopper API (3.6 has it), bf16 activations and
scales (fp16 would need the magic 1024 + q and f16x2 ops: not written), integer zero points, K a multiple of BLOCK_K
and of the group size, BLOCK_K dividing the group size, 16-byte aligned rows of x and of the words (TMA). Anything
else runs on the Triton kernels of `quant_linear_triton`. Gluon has no interpreter: the kernel runs in tests on a
Hopper GPU only (tests/kernels/test_quant_linear.py, `-k wgmma`), and one CPU test compiles it offline.

Part 1b, the weight as the wgmma's register operand (`_int4_wgmma_rs_kernel`, configs with BLOCK_T): swap A and B,
y^T = W x^T. Each warp group takes 64 REPS outputs as the wgmma's M (REPS wgmmas of M = 64 a k step) and BLOCK_T
rows of x (up to 256) as its N; x comes by TMA into a ring of STAGES shared-memory stages as the B operand. The
weight tile never goes through shared memory as bf16: each thread gets the words of its rows (W_TMA=0: loaded
straight from global memory, one step ahead; W_TMA=1: by TMA through the same ring as x, STAGES - 1 steps ahead,
then read from an unswizzled view of the stage in the threads' layout) and converts the byte its place in the MMA's
register layout needs (codes 2 t and 2 t + 1 of each word for lane t of a quad: four threads read the same words)
into the A registers. Two schedules. AHEAD=0: a program converts a step's tile, then issues its wgmma and waits for
it, so conversions overlap only the MMAs of the other programs on the SM (one warp group a program, a ring small
enough for 2-3 programs an SM). AHEAD=1 (`_rs_step_ahead`): the tile of step j + 1 is converted after step j's
wgmma is issued and before the wait that retires it, into registers of its own, so the conversion overlaps the MMA
inside the program too. Leaving a wgmma in flight across the next step's wait (wait(1)) does not work: ptxas frees
an HGMMA's A registers at the first wait after it, whatever its depth, and wrote the next conversion into them
(wrong outputs on the H100; `wgmma_a_aliasing` finds this in the SASS, and the offline compile test runs it).
AHEAD=1 has no wait between a wgmma and the one that retires it. One CTA barrier a step frees the stage for its
refill. Needs K and the group size multiples of 64 and 16-byte aligned rows of x (TMA; with W_TMA of the words
too); the words, scales and zero points contiguous along K. The group parameters come by plain loads one step
ahead, or with P_SMEM=1 from a table in shared memory of every group the program's K range touches, filled once
before the loop (`_param_table`; at most P_SMEM_BYTES). Split-K partials meet by atomic adds in a zeroed
workspace, or with SLOTS=1 by plain stores into a slot a split, summed by the last split to arrive
(`_finish_slots`: no atomics, nothing to re-zero). Status (H100, BENCHMARKS.md "int4 wgmma GEMM, weight as the
register operand: words by TMA (W_TMA) and group parameters from shared memory (P_SMEM)"): a step took about 1 µs
while its loads, issued one step ahead, waited on DRAM; with W_TMA=1 and P_SMEM=1 the loop has no global load, and
then AHEAD=1 pays too: 128 rows 0.82 / 1.25 / 1.25x bf16, 256 rows 0.78 / 0.95 / 0.88x (from 0.74 / 1.04 / 1.02x and
0.60 / 0.84 / 0.76x); that family holds the table's entries for the 14336-wide shapes at 128 and 256 rows. REPS=2
(half the reads of x from L2) was slower everywhere. At 4096->4096 the 128 programs leave one an SM, so a step's
wait for its wgmma (0.39 µs a step) is not hidden by another program.

WS=2 or 3 (warp-specialized, `gl.warp_specialize`) hides it inside the program: WS consumer warp groups take turns
at the K steps (step j to consumer j % WS, `_rs_ws_consume`), each converting its step and running its wgmma to
completion, so one converts while another's MMA runs, with never a second wgmma in flight in a warp group; one TMA
warp fills the ring (`_rs_ws_loader`), each stage freed by its consumer through an mbarrier of its own; the workers'
partials meet the default partition's in shared memory, and the epilogue is the kernel's own (split-K and SLOTS
included). Needs W_TMA=1, P_SMEM=1 (the consumers read only shared memory), one warp group a consumer and REPS=1.
Status (H100, BENCHMARKS.md "int4 wgmma GEMM, weight as the register operand, warp-specialized (WS)"): one program
an SM (168 registers for 384 threads), a step of 64 x 128 x 64 every 0.34 µs against 0.39 for AHEAD=1 alone. It wins
where the grid is one wave or less, and took these entries of the table then: 4096->4096 at 256 rows 22.1 against 25.5
µs (0.91x bf16), at 128 rows 17.0 against 20.3 (0.95x; BLOCK_T=64, WS=3), and at 64 rows every shape (13.3 / 32.7 /
30.1 µs against the Triton path's 14.7 / 34.9 / 37.1; 1.14 / 1.37 / 1.61x bf16 in the main table). With more
programs than SMs it loses to 2-3 programs an SM without it (4096->14336 at 256 rows: 75.7 µs at best, the table's
entry 54.7). Nsight Compute at 4096->4096, 256 rows: SM throughput 34%, L2 44%, 46% of the stalls at barriers (the
TMA warp group's idle warps among them). WS_K=128: a stage holds two k steps, the second converted while the
first's wgmma runs, so a consumer waits and hands a stage back half as often; 5-10% faster wherever WS won (H100,
BENCHMARKS.md "two k steps a warp-specialized stage (WS_K=128)": 0.32 µs a step at 4096->4096, 256 rows, 0.27 at
14336->4096), and with it WS holds every 4096->4096 entry from 64 rows (1.00-1.01x bf16 at 128 and 256 rows in that
sweep), 14336->4096 at 64, 128 and 256 rows, and 4096->14336 at 64 rows. Each consumer waits on ready barriers of its
own (STAGES WS of them). With one a stage, shared by the consumers that take the stage in turn, a consumer could pass
the wait for a stage whose load had not yet landed when WS does not divide STAGES (an mbarrier's wait tells only a
phase's parity): the likely cause of the launch failure of WS with SLOTS at BLOCK_T=256, split-K 4 and 3 stages on
the H100 (4096->14336, 256 rows, calls back to back; right under compute-sanitizer, whose slower timing keeps the
loads in order), and of a launch failure and a hang in the int8 kernel's first sweeps, whose candidates included WS=3
with 7 and 8 stages. Confirmed on the H100: `test_cuda_warp_specialized_calls_back_to_back_agree` runs that int4
config and three more 40 times back to back, every output equal and right (it failed to launch within ten before).
Same dequantization as above ((128 + q) - (128 + zero), then one rounded product: the dense fallback's weight bit
for bit).

Part 1c, int8 weights (per channel) as the register operand (`int8_gemm_wgmma`, `_int8_wgmma_rs_kernel`): Part 1b's
AHEAD=1, W_TMA=1 loop, or its warp-specialized one (WS, WS_K), for the int8 weight-only op. A k step of 64 is 16
words a row; thread (g, t) of a quad needs bytes 2 t, 2 t + 1 of each 8-byte group, half t % 2 of word t // 2 of it,
so the tile layout splits the quad's lane in two (`_rs8_tile_layout`) and each thread reads the 8 words of its rows
it uses from the ring (two threads read each): 16 single-word shared loads a step. The word stage has the 64-byte
swizzle (`_blocks8`, read in `_rs8_words_layout`): unswizzled, the 8 rows a warp reads at once lie 64 bytes apart
and every other one shares its banks, four ways, and with the wgmma reading x from shared memory too, the loads
took as much of the shared memory's bandwidth as the MMAs. A code pair converts exactly through an fp32 magic
(PRMT, subtraction, one `cvt.rn.bf16x2.f32`: INT8_PAIR_BF16, 3 instructions a code against about 2.5 for int4):
bf16's 7-bit mantissa cannot take a byte. The per-channel scales multiply the accumulator's rows after the loop.
Offline (Triton 3.6, sm_90a): 185 registers at BLOCK_T=256, 168 a WS consumer, no spills, no global load in the
loop. Status (H100, BENCHMARKS.md "int8 weights as the wgmma's register operand: swizzled words, warp
specialization"): x bf16 at 64 / 128 / 256 rows, 4096->4096 1.11 / 1.06 / 0.97x (WS), 4096->14336 1.34 / 1.25 /
0.94x; unswizzled and without WS it was 0.72 / 0.62x at 4096->4096, 0.96 / 0.77x at 4096->14336 (128 / 256 rows).
Through the op (the main table of d8e8fd2), 128 / 256 rows: 1.04 / 1.05x, 1.28 / 0.95x, and 14336->4096 (its
unswizzled entries, not re-swept) 1.25 / 0.92x.
Used by the op only where `measured_configs.json` has an "int8_wgmma" entry.

Part 2, the tensor-core GEMV (`int4_gemv_mma`, `_int4_gemv_mma_kernel`): up to 8 rows of x a program, as the N
of mma.sync m16n8k16, the weight rows as its M. What Gluon gives here is the choice of layouts: each thread converts
whole words of two weight rows and reads x at the same k, and the MMA's k slots are permuted to match (kernel
docstring), so both operands go from the loads into the MMA's registers with no shuffle or shared memory (x only
pairs its values by in-register byte permutes; the conversions are asserted trivial at compile time, and a CPU test
checks that no shared memory is used beyond split-K's few bytes). Instructions a
code in the loop (offline SASS, Triton 3.6, sm_90): 2.0 at 32 rows a warp against 3.5 for the best Triton GEMV
(`quant_linear_triton`, ASM). Variants: ONES (the zero point applied after the MMA, from a second MMA with an
all-ones A that sums x, instead of subtracted from the codes), AHEAD (loads one or two steps ahead in registers),
STAGES (the words by TMA through a ring of shared-memory stages, `_int4_gemv_tma_kernel`, sm_90), and with it XP
(x by TMA too and the group parameters from tables filled before the loop: no global load in the loop; on the H100
slower at 1 row than the table's entries: 9.8 / 20.8 / 19.9 µs against 7.4 / 17.7 / 18.6). Needs
bf16, integer zero points and groups of a multiple of 128 (a step's 128 codes in one group). Used by the op only where
`measured_configs.json` holds an "int4_gemv_mma" entry, written by `quant_linear_gpu.py --sweep-gemv-mma` only where
it beat the Triton path in the same run. Status (H100, BENCHMARKS.md "int4 tensor-core GEMV in Gluon"): at 4 rows
1.85-2.40x bf16 against the Triton path's 1.33-1.45x (the MMA's N is 8 whatever M), at 16 rows ahead at the two
14336-wide shapes; at 1 row level with the Triton GEMV (17.8-18.0 µs at the 14336-wide shapes, where reading the
words alone takes 12.4-12.9 µs): neither fewer instructions nor more bytes in flight (the TMA ring) moved it.
"""
from __future__ import annotations

import functools
import re

import torch
import triton

from prunus.kernels.quant_linear_triton import _split_k_workspace

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Triton 3.6 (the GPU machine's) names it async_copy_global_to_shared; later versions async_load
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # likewise (bar.sync of the CTA)
    _smem = gl.shared_memory_descriptor  # 3.6 names it _reinterpret, later versions reinterpret
    _reinterpret = getattr(_smem, "reinterpret", None) or _smem._reinterpret
except (ImportError, AttributeError):  # a Triton without Gluon's Hopper API: the Triton kernels serve all
    gluon = None
try:
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except (ImportError, AttributeError):  # without it only the tensor-core GEMV is off
    mma_v2 = None

# one word's 8 codes -> 4 registers of two bf16 in k order, (v - (128 + zero)) * scale with v = 128 + q: the fields
# as magic floats (lop3: (word & mask) | 0x43004300 gives codes i and i + 4), PRMT into pairs (i, i + 1), then an
# exact difference and one rounded product. $4: the word, $5: (128 + zero) twice, $6: the scale twice.
DEQUANT_BF16 = triton.language.constexpr("""{
.reg .b32 t0, t1, t2, t3, u;
lop3.b32 t0, $4, 0x000F000F, 0x43004300, 0xEA;
shr.u32 u, $4, 4;
lop3.b32 t1, u, 0x000F000F, 0x43004300, 0xEA;
shr.u32 u, $4, 8;
lop3.b32 t2, u, 0x000F000F, 0x43004300, 0xEA;
shr.u32 u, $4, 12;
lop3.b32 t3, u, 0x000F000F, 0x43004300, 0xEA;
prmt.b32 $0, t0, t1, 0x5410;
prmt.b32 $1, t2, t3, 0x5410;
prmt.b32 $2, t0, t1, 0x7632;
prmt.b32 $3, t2, t3, 0x7632;
sub.rn.bf16x2 $0, $0, $5;
sub.rn.bf16x2 $1, $1, $5;
sub.rn.bf16x2 $2, $2, $5;
sub.rn.bf16x2 $3, $3, $5;
mul.rn.bf16x2 $0, $0, $6;
mul.rn.bf16x2 $1, $1, $6;
mul.rn.bf16x2 $2, $2, $6;
mul.rn.bf16x2 $3, $3, $6;
}""")

# one word's 8 codes -> 4 registers of two bf16, q - zero (exact): register s holds codes s and s + 4 (the k order
# the GEMV's MMA operands are permuted to, see `_int4_gemv_mma_kernel`). $4: the word, $12: (128 + zero) twice; with
# pack=8 the word and the zero point come eight times each ($4..$11, $12..$19: copies of one value).
CODES_MINUS_ZERO_BF16 = triton.language.constexpr("""{
.reg .b32 t0, t1, t2, t3, u;
lop3.b32 t0, $4, 0x000F000F, 0x43004300, 0xEA;
shr.u32 u, $4, 4;
lop3.b32 t1, u, 0x000F000F, 0x43004300, 0xEA;
shr.u32 u, $4, 8;
lop3.b32 t2, u, 0x000F000F, 0x43004300, 0xEA;
shr.u32 u, $4, 12;
lop3.b32 t3, u, 0x000F000F, 0x43004300, 0xEA;
sub.rn.bf16x2 $0, t0, $12;
sub.rn.bf16x2 $1, t1, $12;
sub.rn.bf16x2 $2, t2, $12;
sub.rn.bf16x2 $3, t3, $12;
}""")

# the same without the zero point: (128 + q) as bf16, $4 the word ($4..$11: copies)
CODES_BF16 = triton.language.constexpr("""{
.reg .b32 u;
lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA;
shr.u32 u, $4, 4;
lop3.b32 $1, u, 0x000F000F, 0x43004300, 0xEA;
shr.u32 u, $4, 8;
lop3.b32 $2, u, 0x000F000F, 0x43004300, 0xEA;
shr.u32 u, $4, 12;
lop3.b32 $3, u, 0x000F000F, 0x43004300, 0xEA;
}""")
# byte t (codes 2 t, 2 t + 1) of two words w0, w1 -> two registers of two bf16, (v - (128 + zero)) * scale with
# v = 128 + q: PRMT gathers the two bytes, the low and the high codes become magic floats' low bytes (lop3, a shift),
# and PRMT pairs each byte's two codes with the 0x43 high bytes. pack=4: $2..$5 the words (w0, w0, w1, w1), $6 the
# PRMT selector of byte t (t 0x1111 + 0x4040: bytes t of w0, t of w1, twice), $10 (128 + zero) twice, $14 the
# scale twice (copies of one value each in $6..$9, $10..$13, $14..$17).
BYTE_PAIRS_BF16 = triton.language.constexpr("""{
.reg .b32 d, x, u, y;
prmt.b32 d, $2, $4, $6;
lop3.b32 x, d, 0x00000F0F, 0x43430000, 0xEA;
shr.u32 u, d, 4;
lop3.b32 y, u, 0x00000F0F, 0x43430000, 0xEA;
prmt.b32 $0, x, y, 0x6420;
prmt.b32 $1, x, y, 0x7531;
sub.rn.bf16x2 $0, $0, $10;
sub.rn.bf16x2 $1, $1, $10;
mul.rn.bf16x2 $0, $0, $14;
mul.rn.bf16x2 $1, $1, $14;
}""")
BYTE_PAIRS_BF16_CONSTRAINTS = triton.language.constexpr("=r,=r," + ",".join(["r"] * 16))
# two int8 codes (half q of a word) -> two bf16, exact: q + 128 (the word XOR 0x80808080) as the low byte of the fp32
# magic 2^23 (PRMT with $7 = 0x4B000000; $3, $5 the selectors of the two bytes), less 2^23 + 128, then one rounding
# of the pair to bf16 (|q| <= 128 is exact in bf16's 8 bits). bf16's own magic cannot take a whole byte: its mantissa
# has 7 bits. pack=2: $1..$2 the word (twice), $3..$4, $5..$6, $7..$8 copies of one value each.
INT8_PAIR_BF16 = triton.language.constexpr("""{
.reg .b32 u, lo, hi;
xor.b32 u, $1, 0x80808080;
prmt.b32 lo, u, $7, $3;
prmt.b32 hi, u, $7, $5;
sub.f32 lo, lo, 0f4B000080;
sub.f32 hi, hi, 0f4B000080;
cvt.rn.bf16x2.f32 $0, hi, lo;
}""")
INT8_PAIR_BF16_CONSTRAINTS = triton.language.constexpr("=r," + ",".join(["r"] * 8))
CODES_MINUS_ZERO_BF16_CONSTRAINTS = triton.language.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 16))
CODES_BF16_CONSTRAINTS = triton.language.constexpr("=r,=r,=r,=r," + ",".join(["r"] * 8))

CONFIGS = {  # name -> launch config; `int4_gemm_wgmma(..., config=...)` takes one of these dicts or its own
    "m128n128": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=5, num_warps=8),
    "m128n64": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, STAGES=5, num_warps=8),
    "m64n128": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, STAGES=5, num_warps=4),
    "m256n128": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, STAGES=4, num_warps=8),
    "m64n64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, STAGES=6, num_warps=4),
    # split-K: enough programs for the SMs with few row tiles
    "m64n128k4": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, STAGES=5, SPLIT_K=4, num_warps=4),
    "m128n128k2": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=5, SPLIT_K=2, num_warps=8),
    # the weight as the register operand (`_int4_wgmma_rs_kernel`): BLOCK_T rows of x, 16 num_warps REPS outputs
    "t256n128": dict(BLOCK_T=256, STAGES=4, num_warps=8),
    "t256n64": dict(BLOCK_T=256, STAGES=3, num_warps=4),
    "t128n128": dict(BLOCK_T=128, STAGES=6, num_warps=8),
    "t128n64": dict(BLOCK_T=128, STAGES=6, num_warps=4),
    "t64n128": dict(BLOCK_T=64, STAGES=8, num_warps=8),
    "t128n128k2": dict(BLOCK_T=128, STAGES=6, SPLIT_K=2, num_warps=8),
    "t128n128r2": dict(BLOCK_T=128, STAGES=4, REPS=2, num_warps=4),
    # AHEAD=1: the next step's conversion runs while this step's MMA does (`_rs_step_ahead`)
    "t256n64a": dict(BLOCK_T=256, STAGES=3, AHEAD=1, num_warps=4),
    "t128n64a": dict(BLOCK_T=128, STAGES=6, AHEAD=1, num_warps=4),
    "t128n128k2a": dict(BLOCK_T=128, STAGES=6, SPLIT_K=2, AHEAD=1, num_warps=8),
    "t64n64r2a": dict(BLOCK_T=64, STAGES=8, REPS=2, AHEAD=1, num_warps=4),
    # W_TMA=1: the words come by TMA through the ring with x (`_rs_words`)
    "t256n64w": dict(BLOCK_T=256, STAGES=3, W_TMA=1, num_warps=4),
    "t128n64aw": dict(BLOCK_T=128, STAGES=6, AHEAD=1, W_TMA=1, num_warps=4),
    "t128n128k2w": dict(BLOCK_T=128, STAGES=6, SPLIT_K=2, W_TMA=1, num_warps=8),
    "t64n128r2w": dict(BLOCK_T=64, STAGES=8, REPS=2, W_TMA=1, num_warps=4),
    # P_SMEM=1: the group parameters from a table in shared memory filled before the loop (`_param_table`)
    "t256n64wp": dict(BLOCK_T=256, STAGES=3, W_TMA=1, P_SMEM=1, num_warps=4),
    "t128n128k2wp": dict(BLOCK_T=128, STAGES=6, SPLIT_K=2, W_TMA=1, P_SMEM=1, num_warps=8),
    "t128n64ap": dict(BLOCK_T=128, STAGES=6, AHEAD=1, P_SMEM=1, num_warps=4),
    "t64n64r2awp": dict(BLOCK_T=64, STAGES=8, REPS=2, AHEAD=1, W_TMA=1, P_SMEM=1, num_warps=4),
    # SLOTS=1: split-K partials in a slot a split, summed by the last to arrive (`_finish_slots`)
    "t128n64k2awps": dict(BLOCK_T=128, STAGES=4, SPLIT_K=2, AHEAD=1, W_TMA=1, P_SMEM=1, SLOTS=1, num_warps=4),
    "t256n64k4awps": dict(BLOCK_T=256, STAGES=3, SPLIT_K=4, AHEAD=1, W_TMA=1, P_SMEM=1, SLOTS=1, num_warps=4),
    # WS=2, 3: warp-specialized, WS consumer warp groups taking turns at the K steps and a TMA warp (`_rs_ws_consume`)
    "t128n64ws2": dict(BLOCK_T=128, STAGES=4, W_TMA=1, P_SMEM=1, WS=2, num_warps=4),
    "t256n64ws2": dict(BLOCK_T=256, STAGES=3, W_TMA=1, P_SMEM=1, WS=2, num_warps=4),
    "t64n64ws3": dict(BLOCK_T=64, STAGES=6, W_TMA=1, P_SMEM=1, WS=3, num_warps=4),
    "t128n64k2ws2s": dict(BLOCK_T=128, STAGES=4, SPLIT_K=2, W_TMA=1, P_SMEM=1, SLOTS=1, WS=2, num_warps=4),
    # WS_K=128: two k steps a stage, the second converted while the first's wgmma runs (half the stage handshakes)
    "t128n64ws2k128": dict(BLOCK_T=128, STAGES=4, W_TMA=1, P_SMEM=1, WS=2, WS_K=128, num_warps=4),
    "t64n64ws3k128": dict(BLOCK_T=64, STAGES=4, W_TMA=1, P_SMEM=1, WS=3, WS_K=128, num_warps=4),
}

P_SMEM_BYTES = 32768  # the register-operand kernel's group-parameter table (P_SMEM=1) takes at most this

# the tensor-core GEMV (`int4_gemv_mma`): BN = 16 REPS num_warps outputs a program, 8 rows of x a program
GEMV_CONFIGS = {f"r{r}w{w}k{k}": dict(REPS=r, SPLIT_K=k, num_warps=w)
                for r in (1, 2, 4) for w in (4, 8) for k in (1, 2, 4, 8, 16)}


if gluon is not None:

    @gluon.jit
    def _word_tile(words, zoff, scale2):
        """int32 words [BN, W] and per-row packed (128 + zero, scale) [BN, 1] -> the bf16 tile [BN, 8 W]."""
        o0, o1, o2, o3 = gl.inline_asm_elementwise(DEQUANT_BF16, "=r,=r,=r,=r,r,r,r", [words, zoff, scale2],
                                                   dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True,
                                                   pack=1)
        # join stacks along a new last axis: pairs[..., i, j] = o[2 i + j], o0..o3 in k order once flattened
        pairs = gl.join(gl.join(o0, o2), gl.join(o1, o3))  # [BN, W, 2, 2]
        lo = pairs.to(gl.int16).to(gl.bfloat16, bitcast=True)
        hi = (pairs >> 16).to(gl.int16).to(gl.bfloat16, bitcast=True)
        tile = gl.join(lo, hi)  # [BN, W, 2, 2, 2]
        return gl.reshape(tile, [words.shape[0], words.shape[1] * 8])

    @gluon.jit
    def _group_params(s_ptr, z_ptr, offs_n, n_ok, stride_sn, stride_zn, g):
        """Row-wise packed 16-bit pairs for group g: the scale twice, and the zero point twice (int32)."""
        sc = gl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0).to(gl.int32) & 0xFFFF
        z = gl.load(z_ptr + offs_n * stride_zn + g, mask=n_ok, other=0).to(gl.int32)
        return sc | (sc << 16), z | (z << 16)

    @gluon.jit
    def _issue(x_desc, w_desc, xs, ws, bars, j, count, first, off_m, off_n, BLOCK_K: gl.constexpr,
               STAGES: gl.constexpr):
        """TMA loads of this program's step j (the K step first + j) into stage j % STAGES (none past count)."""
        s = j % STAGES
        ok = j < count
        bar = bars.index(s)
        mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=ok)
        _tma_load(x_desc, [off_m, (first + j) * BLOCK_K], bar, xs.index(s), pred=ok)
        _tma_load(w_desc, [off_n, (first + j) * (BLOCK_K // 8)], bar, ws.index(s), pred=ok)

    @gluon.jit
    def _step(x_desc, w_desc, s_ptr, z_ptr, xs, ws, tiles, bars, acc, scale2, zoff, offs_n, n_ok, j, count, first,
              off_m, off_n, K, stride_sn, stride_zn, use_acc, word_layout: gl.constexpr, GROUP: gl.constexpr,
              BLOCK_K: gl.constexpr, STAGES: gl.constexpr, BUFFERS: gl.constexpr,
              LOOKAHEAD: gl.constexpr):
        """Step j: convert the word tile into a shared tile, issue its wgmma, leave it in flight."""
        s = j % STAGES
        mbarrier.wait(bars.index(s), (j // STAGES) & 1)
        words = ws.index(s).load(word_layout)
        tile = _word_tile(words, (zoff | 0x43004300)[:, None], scale2[:, None])
        buf = tiles.index(j % BUFFERS)
        buf.store(tile)
        fence_async_shared()
        # refill the stage step j - 3 used (every warp waited for that MMA before the barrier of step j - 1)
        _issue(x_desc, w_desc, xs, ws, bars, j + LOOKAHEAD, count, first, off_m, off_n, BLOCK_K, STAGES)
        _cta_barrier()
        acc = warpgroup_mma(xs.index(s), buf.permute((1, 0)), acc, use_acc=use_acc, is_async=True)
        # the next step's group parameters load while this step's MMA runs (clamped to the last group at the end);
        # issued before the fence above instead, they timed the same on the H100
        g_next = gl.minimum((first + j + 1) * BLOCK_K // GROUP, K // GROUP - 1)
        scale2_next, zoff_next = _group_params(s_ptr, z_ptr, offs_n, n_ok, stride_sn, stride_zn, g_next)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        return acc, scale2_next, zoff_next

    @gluon.jit
    def _int4_wgmma_kernel(x_desc, w_desc, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                           stride_sn, stride_zn, stride_ym,
                           GROUP: gl.constexpr, HAS_BIAS: gl.constexpr,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                           STAGES: gl.constexpr, SPLIT_K: gl.constexpr, num_warps: gl.constexpr):
        """y tile [BLOCK_M, BLOCK_N] over K / SPLIT_K (SPLIT_K divides K / BLOCK_K; see the module doc)."""
        BUFFERS: gl.constexpr = 3
        LOOKAHEAD: gl.constexpr = STAGES - 3
        gl.static_assert(LOOKAHEAD >= 1, "STAGES >= 4: the ring holds the steps in flight and those ahead")
        gl.static_assert(GROUP % BLOCK_K == 0, "BLOCK_K divides the group")
        W: gl.constexpr = BLOCK_K // 8

        pid_m = gl.program_id(0)  # the row tiles of one weight tile are neighbours: its words come from L2
        pid_n = gl.program_id(1)
        pid_k = gl.program_id(2)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        count = K // BLOCK_K // SPLIT_K
        first = pid_k * count

        # each thread converts whole words: up to 32 threads along a row's W words, rows over the rest
        TPW_W: gl.constexpr = W if W < 32 else 32
        word_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32 // TPW_W, TPW_W], [num_warps, 1], [1, 0])
        WIDE: gl.constexpr = BLOCK_M >= 16 * num_warps  # every warp on its own 16 rows, else warp groups side by side
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1] if WIDE else [4, num_warps // 4],
            instr_shape=[16, BLOCK_N if WIDE else BLOCK_N // (num_warps // 4), 16])
        tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.bfloat16)

        xs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        ws = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, W], w_desc.layout)
        tiles = gl.allocate_shared_memory(gl.bfloat16, [BUFFERS, BLOCK_N, BLOCK_K], tile_layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        for i in gl.static_range(LOOKAHEAD):
            _issue(x_desc, w_desc, xs, ws, bars, i, count, first, off_m, off_n, BLOCK_K, STAGES)

        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, word_layout))
        n_ok = offs_n < N
        scale2, zoff = _group_params(s_ptr, z_ptr, offs_n, n_ok, stride_sn, stride_zn, first * BLOCK_K // GROUP)
        # step 0 peeled, use_acc=False: a zero-initialized accumulator entering the loop makes ptxas serialize the
        # wgmmas (C7515, "non wgmma instructions defining accumulator registers"), so none does
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        acc, scale2, zoff = _step(x_desc, w_desc, s_ptr, z_ptr, xs, ws, tiles, bars, acc, scale2, zoff, offs_n, n_ok,
                                  0, count, first, off_m, off_n, K, stride_sn, stride_zn, False, word_layout,
                                  GROUP, BLOCK_K, STAGES, BUFFERS, LOOKAHEAD)
        for j in range(1, count):
            acc, scale2, zoff = _step(x_desc, w_desc, s_ptr, z_ptr, xs, ws, tiles, bars, acc, scale2, zoff, offs_n,
                                      n_ok, j, count, first, off_m, off_n, K, stride_sn, stride_zn, True, word_layout,
                                      GROUP, BLOCK_K, STAGES, BUFFERS, LOOKAHEAD)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        m2, n2 = gl.broadcast(offs_m[:, None], offs_n[None, :])
        _finish(acc, m2, n2, mask, b_ptr, y_ptr, ws_ptr, cnt_ptr, pid_m * gl.num_programs(1) + pid_n, N,
                stride_ym, HAS_BIAS, SPLIT_K)

    @gluon.jit
    def _finish(acc, m2, n2, mask, b_ptr, y_ptr, ws_ptr, cnt_ptr, tile, N, stride_ym, HAS_BIAS: gl.constexpr,
                SPLIT_K: gl.constexpr):
        """Write the tile acc (m2, n2: each element's row and output index); with split-K, only once every split
        has added its partial: the partials meet in a zeroed fp32 workspace, and the last split to arrive writes
        the tile and zeroes its workspace and counter for the next launch (quant_linear_triton's protocol)."""
        if SPLIT_K == 1:
            _write(acc, m2, n2, mask, b_ptr, y_ptr, stride_ym, HAS_BIAS)
        else:
            partial = ws_ptr + m2 * N + n2
            gl.atomic_add(partial, acc, mask=mask, sem="relaxed")
            _cta_barrier()  # every thread's partial is in before this program counts itself in
            arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = gl.load(partial, mask=mask, other=0.0, cache_modifier=".cg")
                _cta_barrier()
                gl.store(partial, gl.zeros_like(total), mask=mask)
                gl.atomic_xchg(cnt_ptr + tile, 0)
                _write(total, m2, n2, mask, b_ptr, y_ptr, stride_ym, HAS_BIAS)

    @gluon.jit
    def _finish_slots(acc, m2, n2, mask, b_ptr, y_ptr, slot_ptr, cnt_ptr, tile, pid_k, M, N, stride_ym,
                      HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr):
        """Split-K without atomics on the partials (SLOTS=1): each split stores its partial into a slot of its
        own [SPLIT_K, M, N] (plain stores, nothing to re-zero), counts itself in, and the last to arrive adds the
        other splits' slots to its own partial in registers and writes the tile. Against `_finish`: per element
        SPLIT_K stores and SPLIT_K - 1 loads instead of SPLIT_K atomic adds, a load and a zeroing store. The
        caller passes the tile in a layout of 4 consecutive outputs a thread, so these are 16-byte accesses
        (offline SASS: no spills, where the atomic epilogue of BLOCK_T=256 spills its addresses)."""
        here = m2 * N + n2
        gl.store(slot_ptr + (pid_k * M).to(gl.int64) * N + here, acc, mask=mask)
        _cta_barrier()  # every thread's partial is stored before this program counts itself in
        arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = acc
            for k in range(SPLIT_K):  # (a loop, not unrolled: one slot's values in registers at a time)
                slot = slot_ptr + (k * M).to(gl.int64) * N + here
                total += gl.load(slot, mask=mask & (pid_k != k), other=0.0, cache_modifier=".cg")
            gl.atomic_xchg(cnt_ptr + tile, 0)
            _write(total, m2, n2, mask, b_ptr, y_ptr, stride_ym, HAS_BIAS)

    @gluon.jit
    def _write(acc, m2, n2, mask, b_ptr, y_ptr, stride_ym, HAS_BIAS: gl.constexpr):
        """acc (fp32) + bias -> y[m2, n2] in y's dtype; m2, n2: the row and output index of each element."""
        if HAS_BIAS:
            acc = acc + gl.load(b_ptr + n2, mask=mask, other=0.0).to(gl.float32)
        gl.store(y_ptr + m2 * stride_ym + n2, acc.to(y_ptr.dtype.element_ty), mask=mask)

    # -----------------------------------------------------------------------------------------------------
    # many rows, the weight as the wgmma's register operand (swap AB: y^T = W x^T)

    @gluon.constexpr_function
    def _rs_tile_layout(NW):
        """[rw, h, g, c, s, t, e]: rows 16 rw + 8 h + g, k = 16 c + 8 s + 2 t + e (word w = 2 c + s) of the weight
        tile; lanes t, g as the wgmma's register operand has them, registers e, s (an asm instance's two words),
        h, c."""
        return gl.BlockedLayout([1, 2, 1, 4, 2, 1, 2], [1, 1, 8, 1, 1, 4, 1], [NW, 1, 1, 1, 1, 1, 1],
                                [6, 4, 1, 3, 5, 2, 0])

    @gluon.constexpr_function
    def _rs_words_layout(NW):
        """Words [RW, 2, 8, 8]: the threads of `_rs_tile_layout`, each row's 8 words in consecutive registers (two
        16-byte loads)."""
        return gl.BlockedLayout([1, 2, 1, 8], [1, 1, 8, 4], [NW, 1, 1, 1], [3, 1, 2, 0])

    @gluon.constexpr_function
    def _rs_acc_layout(NW, BLOCK_T):
        """The wgmma accumulator y^T [16 NW REPS outputs, BLOCK_T rows of x]."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BLOCK_T, 16])

    @gluon.jit
    def _rs_selector(lT: gl.constexpr):
        """The PRMT selector of a thread's byte t, [1, 1, 1, 1, 1, 4, 2] (t along the quad's lanes, the same for
        e)."""
        t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(
            3, gl.SliceLayout(4, gl.SliceLayout(6, lT)))))))
        e = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(
            3, gl.SliceLayout(4, gl.SliceLayout(5, lT)))))))
        return t[None, None, None, None, None, :, None] * 0x1111 + 0x4040 + e[None, None, None, None, None, None, :] * 0

    @gluon.jit
    def _rs_issue(x_desc, w_desc, xs, wring, bars, j, count, first, off_t, off_n, STAGES: gl.constexpr,
                  W_TMA: gl.constexpr):
        """TMA load of the x tile [BLOCK_T, 64] of this program's step j (K step first + j) into stage j % STAGES
        (none past count), and with W_TMA its word tile [BLOCK_N, 8] (int8 weights: [BLOCK_N, 16]). Rows past M
        (and N) come as zeros."""
        s = j % STAGES
        ok = j < count
        bar = bars.index(s)
        if W_TMA:
            mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=ok)
            _tma_load(w_desc, [off_n, (first + j) * w_desc.block_type.shape[1]], bar, wring.index(s), pred=ok)
        else:
            mbarrier.expect(bar, x_desc.block_type.nbytes, pred=ok)
        _tma_load(x_desc, [off_t, (first + j) * 64], bar, xs.index(s), pred=ok)

    @gluon.jit
    def _rs_load(w_base, s_ptr, z_ptr, pview, g0, rows, n_ok, stride_sn, stride_zn, step, lp: gl.constexpr,
                 GROUP: gl.constexpr, W_TMA: gl.constexpr, P_SMEM: gl.constexpr):
        """Step `step`'s words [RW, 2, 8, 8] (64 codes of each of the thread's rows; with W_TMA they come from the
        ring instead, `_rs_words`, and this returns the step) and its rows' packed group parameters (the scale
        twice, (128 + zero) twice as magic floats; with P_SMEM from the program's table in shared memory,
        `_param_table`, instead of global memory)."""
        if W_TMA:
            words = step
        else:
            words = gl.load(w_base + step * 8)
        if P_SMEM:
            v = pview.index(step * 64 // GROUP - g0).load(lp)
            sc = v & 0xFFFF
            z = v >> 16
            scale2, zoff = sc | (sc << 16), z | (z << 16)
        else:
            scale2, zoff = _group_params(s_ptr, z_ptr, rows, n_ok, stride_sn, stride_zn, step * 64 // GROUP)
        return words, scale2, zoff | 0x43004300

    @gluon.jit
    def _mma_rows(m):
        """The word tile's row (rep, warp, g, h) that the tensor-core GEMV's accumulator row m (rep, warp, h, g)
        holds: each thread converts two adjacent rows, the mma.sync layout puts them 8 apart."""
        return (m // 16) * 16 + (m % 8) * 2 + (m // 8) % 2

    @gluon.jit
    def _param_table(s_ptr, z_ptr, off_n, N, g0, g_end, stride_sn, stride_zn, PG: gl.constexpr,
                     BLOCK_N: gl.constexpr, MMA_ORDER: gl.constexpr, num_warps: gl.constexpr):
        """The group parameters of all the groups this program's K range touches (g0 .. g_end - 1, at most PG),
        read from global memory once, before the loop: [PG, BLOCK_N] int32 in shared memory, the scale's bits in
        the low half and the zero point in the high half, column i for output off_n + i (MMA_ORDER=1: for the
        output of the mma.sync accumulator's row i, `_gemv_bases`). The loop then reads each step's from there,
        so no global load of the loop waits on DRAM for them (P_SMEM of the register-operand GEMM, XP of the
        GEMV)."""
        lg: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [1, num_warps], [0, 1])  # along the groups: coalesced
        gi = gl.arange(0, PG, layout=gl.SliceLayout(1, lg))
        i = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, lg))
        if MMA_ORDER:
            i = _mma_rows(i)
        ni = off_n + i
        ok = ((g0 + gi) < g_end)[:, None] & (ni < N)[None, :]
        g = g0 + gl.minimum(gi, g_end - 1 - g0)
        sc = gl.load(s_ptr + ni[None, :] * stride_sn + g[:, None], mask=ok, other=0)
        sc = sc.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF  # (bf16 scales or their int16 view)
        z = gl.load(z_ptr + ni[None, :] * stride_zn + g[:, None], mask=ok, other=0).to(gl.int32)
        return gl.allocate_shared_memory(gl.int32, [PG, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]),
                                         sc | (z << 16))

    @gluon.jit
    def _rs_tile(words, scale2, zoff, sel, lT: gl.constexpr, a_layout: gl.constexpr, BLOCK_N: gl.constexpr):
        """The bf16 A operand [BLOCK_N, 64] in the wgmma's register layout, from words [RW, 2, 8, 8]: thread
        (g, t) of a quad holds k = 8 w + 2 t + e of rows g and g + 8 of each block of 16 rows its warp has, codes
        2 t and 2 t + 1 of each word of those rows, byte t (sel: its PRMT selector), two words an asm instance."""
        RW: gl.constexpr = BLOCK_N // 16
        # words [rw, h, g, c, s] (w = 2 c + s) in the registers lT gives them: a register permutation
        w5 = gl.convert_layout(gl.reshape(words, [RW, 2, 8, 4, 2]), gl.SliceLayout(5, gl.SliceLayout(6, lT)),
                               assert_trivial=True)
        w7, sl = gl.broadcast(w5[:, :, :, :, :, None, None], sel)
        z7, _ = gl.broadcast(zoff[:, :, :, None, None, None, None], sl)
        s7, _ = gl.broadcast(scale2[:, :, :, None, None, None, None], sl)
        pairs = gl.inline_asm_elementwise(BYTE_PAIRS_BF16, BYTE_PAIRS_BF16_CONSTRAINTS, [w7, sl, z7, s7],
                                          dtype=gl.bfloat16, is_pure=True, pack=4)
        # [rw, h, g | c, s, t, e] is [row = 16 rw + 8 h + g, k = 16 c + 8 s + 2 t + e]
        return gl.convert_layout(gl.reshape(pairs, [BLOCK_N, 64]), a_layout, assert_trivial=True)

    @gluon.jit
    def _rs_words(wview, bars, j, count, lw: gl.constexpr, STAGES: gl.constexpr):
        """W_TMA: step j's words [RW, 2, 8, 8] from its stage of the ring, once its TMA load has landed (no wait
        past the last step: the words read then are never used)."""
        s = j % STAGES
        mbarrier.wait(bars.index(s), (j // STAGES) & 1, pred=j < count)
        return wview.index(s).load(lw)

    @gluon.jit
    def _rs_step(x_desc, w_desc, xs, wring, wview, bars, acc, words, scale2, zoff, w_base, s_ptr, z_ptr, pview, g0,
                 rows, n_ok, sel, j, count, first, last, off_t, off_n, stride_sn, stride_zn, use_acc,
                 lT: gl.constexpr, lw: gl.constexpr, lp: gl.constexpr, a_layout: gl.constexpr, GROUP: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, W_TMA: gl.constexpr, P_SMEM: gl.constexpr):
        """Step j: load step j + 1's words (from global memory; with W_TMA step j's come from the ring), convert
        step j's into registers, run its wgmma to completion, then (every warp group done: the CTA barrier) refill
        the stage it read with step j + STAGES.

        The MMA is waited for before the next step's conversion: with one wgmma left in flight (wait(1)), ptxas
        (Triton 3.6) gave the next conversion the registers the MMA in flight was still reading (its A operand),
        and the outputs were wrong on the H100 in most configs. The conversion of one program overlaps the MMAs
        of the others on its SM instead (configs with one warp group and a ring small enough for 2-3 programs),
        or with AHEAD=1 the previous step's MMA in the same program (`_rs_step_ahead`)."""
        s = j % STAGES
        if W_TMA:
            words = _rs_words(wview, bars, j, count, lw, STAGES)
        words2, scale22, zoff2 = _rs_load(w_base, s_ptr, z_ptr, pview, g0, rows, n_ok, stride_sn, stride_zn,
                                          gl.minimum(first + j + 1, last), lp, GROUP, W_TMA, P_SMEM)
        a = _rs_tile(words, scale2, zoff, sel, lT, a_layout, BLOCK_N)
        mbarrier.wait(bars.index(s), (j // STAGES) & 1)
        acc = warpgroup_mma(a, xs.index(s).permute((1, 0)), acc, use_acc=use_acc, is_async=True)
        acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        _cta_barrier()
        _rs_issue(x_desc, w_desc, xs, wring, bars, j + STAGES, count, first, off_t, off_n, STAGES, W_TMA)
        return acc, words2, scale22, zoff2

    @gluon.jit
    def _rs_step_ahead(x_desc, w_desc, xs, wring, wview, bars, acc, a, words, scale2, zoff, w_base, s_ptr, z_ptr,
                       pview, g0, rows, n_ok, sel, j, count, first, last, off_t, off_n, stride_sn, stride_zn,
                       use_acc, lT: gl.constexpr, lw: gl.constexpr, lp: gl.constexpr, a_layout: gl.constexpr,
                       GROUP: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, W_TMA: gl.constexpr,
                       P_SMEM: gl.constexpr):
        """Step j with its A operand `a` converted the step before (AHEAD=1): issue its wgmma, then, while it runs,
        load step j + 2's words and convert step j + 1's (`words`; with W_TMA from the ring) into new registers,
        then wait for the MMA.

        No other wait comes between the wgmma and the one that retires it, so ptxas keeps its A registers from the
        conversion (it frees them at the first wait after the HGMMA: `wgmma_a_aliasing`), and the conversion
        overlaps the MMA within the program, with one wgmma in flight at a time."""
        s = j % STAGES
        mbarrier.wait(bars.index(s), (j // STAGES) & 1)
        acc = warpgroup_mma(a, xs.index(s).permute((1, 0)), acc, use_acc=use_acc, is_async=True)
        if W_TMA:
            words = _rs_words(wview, bars, j + 1, count, lw, STAGES)
        words2, scale22, zoff2 = _rs_load(w_base, s_ptr, z_ptr, pview, g0, rows, n_ok, stride_sn, stride_zn,
                                          gl.minimum(first + j + 2, last), lp, GROUP, W_TMA, P_SMEM)
        a2 = _rs_tile(words, scale2, zoff, sel, lT, a_layout, BLOCK_N)
        acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        _cta_barrier()
        _rs_issue(x_desc, w_desc, xs, wring, bars, j + STAGES, count, first, off_t, off_n, STAGES, W_TMA)
        return acc, a2, words2, scale22, zoff2

    @gluon.jit
    def _rs_ws_state(BLOCK_N: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr):
        """WS: the barriers of stages loaded (`ready`: STAGES WS of them, see `_rs_ws_consume`) and freed by their
        consumers (`empty`), the worker consumers' partials (`red`) and the barrier of their arrival (`done`)."""
        ready = gl.allocate_shared_memory(gl.int64, [STAGES * WS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES * WS):
            mbarrier.init(ready.index(i), count=1)
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(empty.index(i), count=1)
        done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(done, count=WS - 1)
        red = gl.allocate_shared_memory(gl.float32, [WS - 1, BLOCK_N, BLOCK_T],
                                        gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        return ready, empty, done, red

    @gluon.jit
    def _rs_ws_loader(x_desc, w_desc, xs, wring, ready, empty, count, first, off_t, off_n, STAGES: gl.constexpr,
                      KS: gl.constexpr, WS: gl.constexpr):
        """WS: the TMA partition (one warp). Stage i (KS k steps of 64: ring slots i KS .. i KS + KS - 1 of x and
        of the words) is loaded into stage i % STAGES once the consumer of stage i - STAGES has freed it (`empty`;
        a fresh barrier passes the wait for the phase before its first), and announced on ready barrier
        i % (STAGES WS), which only its consumer (i % WS) waits on (`_rs_ws_consume`)."""
        for i in range(count // KS):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(i % (STAGES * WS))
            mbarrier.expect(bar, KS * (x_desc.block_type.nbytes + w_desc.block_type.nbytes))
            for h in gl.static_range(KS):
                step = first + i * KS + h
                _tma_load(w_desc, [off_n, step * w_desc.block_type.shape[1]], bar, wring.index(s * KS + h))
                _tma_load(x_desc, [off_t, step * 64], bar, xs.index(s * KS + h))

    @gluon.jit
    def _rs_ws_tile(wview, pview, slot, step, g0, sel, lT: gl.constexpr, lw: gl.constexpr, lp: gl.constexpr,
                    a_layout: gl.constexpr, GROUP: gl.constexpr, INT8: gl.constexpr):
        """WS: the A operand of k step `step` from ring slot `slot` (its words) and the parameter table. (W_TMA and
        P_SMEM: `_rs_load` reads only the table, its pointer and stride arguments go unused.) INT8: of int8 weights
        (`_int8_wgmma_rs_kernel`), from the words alone."""
        if INT8:  # int8 weights: wview is the (swizzled) ring itself, no group parameters
            lT8: gl.constexpr = _rs8_tile_layout(4)
            sel_lo, sel_hi, magic = _rs8_constants(lT8)
            words = _rs8_slot_words(wview, slot, gl.SliceLayout(6, gl.SliceLayout(7, lT8)), 4)
            return _rs8_tile(words, sel_lo, sel_hi, magic, a_layout, 64)
        else:
            _, scale2, zoff = _rs_load(0, 0, 0, pview, g0, 0, 0, 0, 0, step, lp, GROUP, 1, 1)
            return _rs_tile(wview.index(slot).load(lw), scale2, zoff, sel, lT, a_layout, 64)

    @gluon.jit
    def _rs_ws_consume(xs, wview, pview, ready, empty, part, count, first, g0, GROUP: gl.constexpr,
                       BLOCK_T: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr, KS: gl.constexpr,
                       INT8: gl.constexpr):
        """WS: one consumer warp group's partial y^T [64, BLOCK_T], over stages part, part + WS, ... (KS k steps of
        64 each): each step's words (from the ring) and group parameters (from the table) converted into the A
        registers and its wgmma issued, with KS=2 the second step converted while the first's wgmma runs (no wait
        between: ptxas keeps the first's A registers, see `_rs_step_ahead`); then the wgmmas run to completion and
        the stage is freed for the loader. While one warp group waits for its MMAs, the others convert, without a
        wgmma in flight across a wait in any warp group (see `_rs_step` on ptxas and the A registers).

        Each consumer waits on ready barriers of its own: STAGES WS of them, stage i's is i % (STAGES WS). With one
        barrier a stage, shared by the consumers that take the stage in turn, a consumer could wait on stage i +
        STAGES while the load of stage i (the same barrier, a phase earlier) had not landed: an mbarrier's wait
        tells only the parity of a phase, so it passed at once and the consumer read a stage not yet loaded (where
        WS does not divide STAGES, as in WS=3, STAGES=8, or WS=2, STAGES=3): the cause of the unspecified launch
        failures seen on an H100 in back-to-back calls, which stopped with this (H100, 40 calls of each such config
        in `test_cuda_warp_specialized_calls_back_to_back_agree`)."""
        lT: gl.constexpr = _rs_tile_layout(4)
        lw: gl.constexpr = _rs_words_layout(4)
        lp: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, gl.SliceLayout(5, gl.SliceLayout(6, lT))))
        mma: gl.constexpr = _rs_acc_layout(4, BLOCK_T)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        sel = _rs_selector(lT)
        acc = gl.zeros([64, BLOCK_T], gl.float32, mma)
        for i in range(part, count // KS, WS):
            s = i % STAGES
            mbarrier.wait(ready.index(i % (STAGES * WS)), (i // (STAGES * WS)) & 1)
            a = _rs_ws_tile(wview, pview, s * KS, first + i * KS, g0, sel, lT, lw, lp, a_layout, GROUP, INT8)
            acc = warpgroup_mma(a, xs.index(s * KS).permute((1, 0)), acc, is_async=True)
            if KS == 2:
                a2 = _rs_ws_tile(wview, pview, s * KS + 1, first + i * KS + 1, g0, sel, lT, lw, lp, a_layout,
                                 GROUP, INT8)
                acc = warpgroup_mma(a2, xs.index(s * KS + 1).permute((1, 0)), acc, is_async=True)
                acc, a, a2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a, a2))
            else:
                acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
            fence_async_shared()  # the words' generic reads of the stage, before its TMA refill
            mbarrier.arrive(empty.index(s), count=1)
        return acc

    @gluon.jit
    def _rs_ws_first(xs, wview, pview, ready, empty, red, done, count, first, g0, GROUP: gl.constexpr,
                     BLOCK_T: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr, KS: gl.constexpr,
                     INT8: gl.constexpr):
        """WS: the default partition, consumer 0; then the other consumers' partials added from shared memory."""
        acc = _rs_ws_consume(xs, wview, pview, ready, empty, 0, count, first, g0, GROUP, BLOCK_T, STAGES, WS, KS,
                             INT8)
        mbarrier.wait(done, 0)
        for p in gl.static_range(WS - 1):
            acc += red.index(p).load(acc.type.layout)
        return (acc, )

    @gluon.jit
    def _rs_ws_other(xs, wview, pview, ready, empty, red, done, part: gl.constexpr, count, first, g0,
                     GROUP: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr,
                     KS: gl.constexpr, INT8: gl.constexpr):
        """WS: consumer `part` (1 .. WS - 1), a worker partition; its partial goes to shared memory for the
        default partition."""
        acc = _rs_ws_consume(xs, wview, pview, ready, empty, part, count, first, g0, GROUP, BLOCK_T, STAGES, WS,
                             KS, INT8)
        red.index(part - 1).store(acc)
        mbarrier.arrive(done, count=1)

    @gluon.jit
    def _int4_wgmma_rs_kernel(x_desc, w_desc, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                              stride_wn, stride_sn, stride_zn, stride_ym,
                              GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_T: gl.constexpr,
                              STAGES: gl.constexpr, SPLIT_K: gl.constexpr, REPS: gl.constexpr,
                              AHEAD: gl.constexpr, W_TMA: gl.constexpr, P_SMEM: gl.constexpr, PG: gl.constexpr,
                              SLOTS: gl.constexpr, WS: gl.constexpr, WS_REGS: gl.constexpr, KS: gl.constexpr,
                              num_warps: gl.constexpr):
        """y^T tile [BLOCK_N = 16 num_warps REPS outputs, BLOCK_T rows of x] over K / SPLIT_K, in steps of 64.

        The weight is the wgmma's A operand, in registers: each warp group takes 64 REPS outputs (REPS wgmmas of
        M = 64 a k step: more outputs share each x tile, less x read from L2), the rows of x are its N (BLOCK_T,
        up to 256), and x is its B operand in shared memory, brought by TMA through a ring of STAGES stages. The
        words go into the registers of the threads that convert them (W_TMA=0: loaded from global memory one step
        ahead; W_TMA=1: by TMA with x, read back from the stage): thread (g, t) of a quad takes the 8 words (64
        codes) of each of its rows (two a block of 16; four threads read the same words) and keeps byte t of each,
        the two codes the MMA's layout gives it (`_rs_tile`, asserted trivial at compile time). The bf16 weight
        tile never goes through shared memory. With AHEAD=0 each step's MMA completes before the next conversion
        (`_rs_step`); with AHEAD=1 the next conversion runs while it does (`_rs_step_ahead`). One CTA barrier a
        step then frees its stage for the refill. The group parameters come from global memory one step ahead, or
        with P_SMEM=1 from a table of the program's groups (PG rows) filled before the loop (`_param_table`).
        Split-K partials meet by atomic adds in a zeroed workspace (`_finish`), or with SLOTS=1 in a slot a split
        (`_finish_slots`; ws_ptr is then the slots). WS=2, 3: the loop warp-specialized instead (`_rs_ws_consume`:
        WS consumer warp groups taking turns at the steps, a TMA warp; WS_REGS registers a worker consumer
        thread)."""
        BLOCK_N: gl.constexpr = 16 * num_warps * REPS
        NW: gl.constexpr = num_warps
        RW: gl.constexpr = num_warps * REPS  # row blocks of 16: block rw = REPS' index * NW + warp (lT wraps)
        gl.static_assert(num_warps % 4 == 0, "whole warp groups")
        gl.static_assert(GROUP % 64 == 0, "a step (64 codes) lies in one group")
        gl.static_assert(STAGES >= 2, "the ring holds the step being multiplied and the next")
        lT: gl.constexpr = _rs_tile_layout(NW)
        lw: gl.constexpr = _rs_words_layout(NW)
        lp: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, gl.SliceLayout(5, gl.SliceLayout(6, lT))))
        mma: gl.constexpr = _rs_acc_layout(NW, BLOCK_T)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)

        pid_t = gl.program_id(0)  # the row tiles of x that share a weight tile are neighbours: its words from L2
        pid_n = gl.program_id(1)
        pid_k = gl.program_id(2)
        off_t = pid_t * BLOCK_T
        off_n = pid_n * BLOCK_N
        count = K // 64 // SPLIT_K
        first = pid_k * count
        last = first + count - 1

        r_w = gl.arange(0, RW, layout=gl.SliceLayout(1, gl.SliceLayout(2, lp)))
        r_h = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, lp)))
        r_g = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, lp)))
        rows = off_n + r_w[:, None, None] * 16 + r_h[None, :, None] * 8 + r_g[None, None, :]
        n_ok = rows < N
        rows = gl.minimum(rows, N - 1)  # rows past N read the last one (masked at the store)
        w_k = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, lw))))
        w_rows = gl.convert_layout(rows, gl.SliceLayout(3, lw))
        w_base = w_ptr + w_rows[:, :, :, None] * stride_wn + w_k[None, None, None, :]
        sel = _rs_selector(lT)

        # KS k steps of 64 a stage (WS only: 1 or 2), each in a slot of the ring
        xs = gl.allocate_shared_memory(gl.bfloat16, [STAGES * KS, BLOCK_T, 64], x_desc.layout)
        if W_TMA:  # the word tiles [BLOCK_N, 8] in the same ring (unswizzled), read as lw's [RW, 2, 8, 8]
            wring = gl.allocate_shared_memory(gl.int32, [STAGES * KS, BLOCK_N, 8], w_desc.layout)
            wview = _reinterpret(wring, gl.int32, [STAGES * KS, RW, 2, 8, 8],
                                 gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
        else:
            wring = xs
            wview = xs
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        if WS:
            ready, empty, done, red = _rs_ws_state(BLOCK_N, BLOCK_T, STAGES, WS)
        else:
            for i in gl.static_range(STAGES):
                _rs_issue(x_desc, w_desc, xs, wring, bars, i, count, first, off_t, off_n, STAGES, W_TMA)
        g0 = first * 64 // GROUP
        if P_SMEM:  # the program's group parameters into shared memory while the ring's first loads fly
            params = _param_table(s_ptr, z_ptr, off_n, N, g0, last * 64 // GROUP + 1, stride_sn, stride_zn, PG,
                                  BLOCK_N, 0, num_warps)
            pview = _reinterpret(params, gl.int32, [PG, RW, 2, 8], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
            _cta_barrier()
        else:
            pview = xs

        if WS == 2:  # warp-specialized (WS consumer warp groups, a TMA warp): `_rs_ws_consume`
            acc, = gl.warp_specialize([
                (_rs_ws_first, (xs, wview, pview, ready, empty, red, done, count, first, g0, GROUP, BLOCK_T, STAGES,
                                WS, KS, 0)),
                (_rs_ws_other, (xs, wview, pview, ready, empty, red, done, 1, count, first, g0, GROUP, BLOCK_T,
                                STAGES, WS, KS, 0)),
                (_rs_ws_loader, (x_desc, w_desc, xs, wring, ready, empty, count, first, off_t, off_n, STAGES, KS,
                                 WS)),
            ], [4, 1], [WS_REGS, 24])
        elif WS == 3:
            acc, = gl.warp_specialize([
                (_rs_ws_first, (xs, wview, pview, ready, empty, red, done, count, first, g0, GROUP, BLOCK_T, STAGES,
                                WS, KS, 0)),
                (_rs_ws_other, (xs, wview, pview, ready, empty, red, done, 1, count, first, g0, GROUP, BLOCK_T,
                                STAGES, WS, KS, 0)),
                (_rs_ws_other, (xs, wview, pview, ready, empty, red, done, 2, count, first, g0, GROUP, BLOCK_T,
                                STAGES, WS, KS, 0)),
                (_rs_ws_loader, (x_desc, w_desc, xs, wring, ready, empty, count, first, off_t, off_n, STAGES, KS,
                                 WS)),
            ], [4, 4, 1], [WS_REGS, WS_REGS, 24])
        else:
            words, scale2, zoff = _rs_load(w_base, s_ptr, z_ptr, pview, g0, rows, n_ok, stride_sn, stride_zn, first,
                                           lp, GROUP, W_TMA, P_SMEM)
            # step 0 peeled, use_acc=False (see _int4_wgmma_kernel)
            acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, mma)
            if AHEAD:  # each step's conversion runs while the previous step's MMA does (`_rs_step_ahead`)
                if W_TMA:
                    words = _rs_words(wview, bars, 0, count, lw, STAGES)
                a = _rs_tile(words, scale2, zoff, sel, lT, a_layout, BLOCK_N)
                words, scale2, zoff = _rs_load(w_base, s_ptr, z_ptr, pview, g0, rows, n_ok, stride_sn, stride_zn,
                                               gl.minimum(first + 1, last), lp, GROUP, W_TMA, P_SMEM)
                acc, a, words, scale2, zoff = _rs_step_ahead(x_desc, w_desc, xs, wring, wview, bars, acc, a, words,
                                                             scale2, zoff, w_base, s_ptr, z_ptr, pview, g0, rows, n_ok,
                                                             sel, 0, count, first, last, off_t, off_n, stride_sn,
                                                             stride_zn, False, lT, lw, lp, a_layout, GROUP, BLOCK_N,
                                                             STAGES, W_TMA, P_SMEM)
                for j in range(1, count):
                    acc, a, words, scale2, zoff = _rs_step_ahead(x_desc, w_desc, xs, wring, wview, bars, acc, a, words,
                                                                 scale2, zoff, w_base, s_ptr, z_ptr, pview, g0, rows,
                                                                 n_ok, sel, j, count, first, last, off_t, off_n,
                                                                 stride_sn, stride_zn, True, lT, lw, lp, a_layout,
                                                                 GROUP, BLOCK_N, STAGES, W_TMA, P_SMEM)
            else:
                acc, words, scale2, zoff = _rs_step(x_desc, w_desc, xs, wring, wview, bars, acc, words, scale2, zoff,
                                                    w_base, s_ptr, z_ptr, pview, g0, rows, n_ok, sel, 0, count, first,
                                                    last, off_t, off_n, stride_sn, stride_zn, False, lT, lw, lp,
                                                    a_layout, GROUP, BLOCK_N, STAGES, W_TMA, P_SMEM)
                for j in range(1, count):
                    acc, words, scale2, zoff = _rs_step(x_desc, w_desc, xs, wring, wview, bars, acc, words, scale2,
                                                        zoff, w_base, s_ptr, z_ptr, pview, g0, rows, n_ok, sel, j,
                                                        count, first, last, off_t, off_n, stride_sn, stride_zn, True,
                                                        lT, lw, lp, a_layout, GROUP, BLOCK_N, STAGES, W_TMA, P_SMEM)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
        offs_t = off_t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, mma))
        mask = (offs_n < N)[:, None] & (offs_t < M)[None, :]
        n2, m2 = gl.broadcast(offs_n[:, None], offs_t[None, :])
        if SLOTS:  # the tile moved to a layout with 4 consecutive outputs a thread first: 16-byte stores and loads
            lc: gl.constexpr = gl.BlockedLayout([4, 1], [16, 2], [1, num_warps], [0, 1])
            offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, lc))
            offs_t = off_t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, lc))
            n2, m2 = gl.broadcast(offs_n[:, None], offs_t[None, :])
            _finish_slots(gl.convert_layout(acc, lc), m2, n2, (offs_n < N)[:, None] & (offs_t < M)[None, :], b_ptr,
                          y_ptr, ws_ptr, cnt_ptr, pid_t * gl.num_programs(1) + pid_n, pid_k, M, N, stride_ym,
                          HAS_BIAS, SPLIT_K)
        else:
            _finish(acc, m2, n2, mask, b_ptr, y_ptr, ws_ptr, cnt_ptr, pid_t * gl.num_programs(1) + pid_n, N,
                    stride_ym, HAS_BIAS, SPLIT_K)

    # -----------------------------------------------------------------------------------------------------
    # many rows, int8 weights (per-channel scales) as the wgmma's register operand

    @gluon.constexpr_function
    def _rs8_tile_layout(NW):
        """[rw, h, g, c, s, p, q, e]: rows 16 rw + 8 h + g, k = 16 c + 8 s + 4 p + 2 q + e of the int8 weight tile;
        `_rs_tile_layout` with the quad's lane t = 2 p + q split in two: k's bytes 2 t, 2 t + 1 of each 8-byte group
        lie in word p (= t // 2) of the group, half q (= t % 2) of it. The same registers (e, s, h, c) and lanes, so
        the tile reshaped to [BLOCK_N, 64] is the wgmma's A layout as it stands."""
        return gl.BlockedLayout([1, 2, 1, 4, 2, 1, 1, 2], [1, 1, 8, 1, 1, 2, 2, 1], [NW, 1, 1, 1, 1, 1, 1, 1],
                                [7, 4, 1, 3, 6, 5, 2, 0])

    @gluon.constexpr_function
    def _rs8_words_layout(NW):
        """The words [BLOCK_N, 16] of a step as `_rs8_tile_layout`'s threads read them (row 16 rw + 8 h + g, word
        4 c + 2 s + p): registers s, h, c; lanes q (both read the same word), p, g; warps rw. Read from the
        64-byte-swizzled stage (`_blocks8`), the 16 words a warp reads at once (8 rows g, 2 words p) lie in 16
        different banks: unswizzled, rows 2 apart (128 bytes) share theirs, four ways."""
        return gl.DistributedLinearLayout(reg_bases=[[0, 2], [8, 0], [0, 4], [0, 8]],
                                          lane_bases=[[0, 0], [0, 1], [1, 0], [2, 0], [4, 0]],
                                          warp_bases=[[16 << i, 0] for i in range(NW.bit_length() - 1)],
                                          block_bases=[], shape=[16 * NW, 16])

    @gluon.jit
    def _rs8_words(wring, bars, j, count, lw: gl.constexpr, RW: gl.constexpr, STAGES: gl.constexpr):
        """Step j's words [RW, 2, 8, 4, 2] (rw, h, g, c, s; p on the lanes) from its swizzled stage of the ring, in
        the layout `_rs8_tile_layout` leaves with q and e sliced off, once its TMA load has landed (no wait past the
        last step: the words read then are never used)."""
        s = j % STAGES
        mbarrier.wait(bars.index(s), (j // STAGES) & 1, pred=j < count)
        return _rs8_slot_words(wring, s, lw, RW)

    @gluon.jit
    def _rs8_slot_words(wring, slot, lw: gl.constexpr, RW: gl.constexpr):
        """The words [RW, 2, 8, 4, 2] of ring slot `slot` in `_rs8_words`' layout lw."""
        words = wring.index(slot).load(_rs8_words_layout(RW))
        return gl.convert_layout(gl.reshape(words, [RW, 2, 8, 4, 2, 2]), lw, assert_trivial=True)

    @gluon.jit
    def _rs8_constants(lT: gl.constexpr):
        """The PRMT selectors of a thread's two bytes (half q of a word: bytes 2 q and 2 q + 1 as the low byte of
        0x4B0000xx) and the magic's high byte, [1, 1, 1, 1, 1, 1, 2, 2] (q along the lanes, the same for e)."""
        q = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(
            3, gl.SliceLayout(4, gl.SliceLayout(5, gl.SliceLayout(7, lT))))))))
        e = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(
            3, gl.SliceLayout(4, gl.SliceLayout(5, gl.SliceLayout(6, lT))))))))
        lo = (q[None, None, None, None, None, None, :, None] * 2 + 0x7540
              + e[None, None, None, None, None, None, None, :] * 0)
        return lo, lo + 1, lo * 0 + 0x4B000000

    @gluon.jit
    def _rs8_tile(words, sel_lo, sel_hi, magic, a_layout: gl.constexpr, BLOCK_N: gl.constexpr):
        """The bf16 A operand [BLOCK_N, 64] in the wgmma's register layout, from words [RW, 2, 8, 4, 2, 2] (word
        4 c + 2 s + p of rows 16 rw + 8 h + g, in the layout `_rs8_tile_layout` leaves with q and e sliced off: the
        two threads of a quad that share p read the same word)."""
        w8, lo = gl.broadcast(words[:, :, :, :, :, :, None, None], sel_lo)
        hi, _ = gl.broadcast(sel_hi, lo)
        mg, _ = gl.broadcast(magic, lo)
        pairs = gl.inline_asm_elementwise(INT8_PAIR_BF16, INT8_PAIR_BF16_CONSTRAINTS, [w8, lo, hi, mg],
                                          dtype=gl.bfloat16, is_pure=True, pack=2)
        return gl.convert_layout(gl.reshape(pairs, [BLOCK_N, 64]), a_layout, assert_trivial=True)

    @gluon.jit
    def _rs8_step(x_desc, w_desc, xs, wring, bars, acc, a, sel_lo, sel_hi, magic, j, count, first, off_t,
                  off_n, use_acc, lw: gl.constexpr, a_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr):
        """Step j with its A operand converted the step before: issue its wgmma, convert step j + 1's words (from the
        ring) while it runs, wait for it, then (every warp group done: the CTA barrier) refill its stage with step
        j + STAGES. `_rs_step_ahead` with words by TMA and no group parameters."""
        s = j % STAGES
        mbarrier.wait(bars.index(s), (j // STAGES) & 1)
        acc = warpgroup_mma(a, xs.index(s).permute((1, 0)), acc, use_acc=use_acc, is_async=True)
        words = _rs8_words(wring, bars, j + 1, count, lw, BLOCK_N // 16, STAGES)
        a2 = _rs8_tile(words, sel_lo, sel_hi, magic, a_layout, BLOCK_N)
        acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        _cta_barrier()
        _rs_issue(x_desc, w_desc, xs, wring, bars, j + STAGES, count, first, off_t, off_n, STAGES, 1)
        return acc, a2

    @gluon.jit
    def _int8_wgmma_rs_kernel(x_desc, w_desc, s_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_ym,
                              HAS_BIAS: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr,
                              SPLIT_K: gl.constexpr, WS: gl.constexpr, WS_REGS: gl.constexpr, KS: gl.constexpr,
                              num_warps: gl.constexpr):
        """y^T tile [BLOCK_N = 16 num_warps outputs, BLOCK_T rows of x] = scale * (q x^T) for int8 weights q with
        per-channel scales, over K / SPLIT_K in steps of 64: `_int4_wgmma_rs_kernel`'s AHEAD=1, W_TMA=1 loop. The
        int8 words [BLOCK_N, 16] come by TMA with x through a ring of STAGES stages (64-byte swizzled: `_blocks8`);
        each thread converts the bytes the wgmma's A layout gives it (`_rs8_tile`, exact: a code is an integer of at
        most 8 bits) while the previous step's wgmma runs; the scales multiply the accumulator's rows once, after
        the loop. WS=2, 3: the int4 kernel's warp-specialized loop instead (`_rs_ws_consume` with INT8; KS k steps
        a stage, WS_REGS registers a worker consumer thread)."""
        BLOCK_N: gl.constexpr = 16 * num_warps
        RW: gl.constexpr = num_warps
        gl.static_assert(num_warps % 4 == 0, "whole warp groups")
        gl.static_assert(STAGES >= 2, "the ring holds the step being multiplied and the next")
        lT: gl.constexpr = _rs8_tile_layout(num_warps)
        lw: gl.constexpr = gl.SliceLayout(6, gl.SliceLayout(7, lT))
        mma: gl.constexpr = _rs_acc_layout(num_warps, BLOCK_T)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)

        pid_t = gl.program_id(0)  # the row tiles of x that share a weight tile are neighbours: its words from L2
        pid_n = gl.program_id(1)
        pid_k = gl.program_id(2)
        off_t = pid_t * BLOCK_T
        off_n = pid_n * BLOCK_N
        count = K // 64 // SPLIT_K
        first = pid_k * count

        xs = gl.allocate_shared_memory(gl.bfloat16, [STAGES * KS, BLOCK_T, 64], x_desc.layout)
        wring = gl.allocate_shared_memory(gl.int32, [STAGES * KS, BLOCK_N, 16], w_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        if WS:
            ready, empty, done, red = _rs_ws_state(BLOCK_N, BLOCK_T, STAGES, WS)
            # the consumers' arguments past the ring: no parameter table, group and first group unused
            if WS == 2:
                acc, = gl.warp_specialize([
                    (_rs_ws_first, (xs, wring, wring, ready, empty, red, done, count, first, 0, 64, BLOCK_T, STAGES,
                                    WS, KS, 1)),
                    (_rs_ws_other, (xs, wring, wring, ready, empty, red, done, 1, count, first, 0, 64, BLOCK_T,
                                    STAGES, WS, KS, 1)),
                    (_rs_ws_loader, (x_desc, w_desc, xs, wring, ready, empty, count, first, off_t, off_n, STAGES,
                                     KS, WS)),
                ], [4, 1], [WS_REGS, 24])
            else:
                acc, = gl.warp_specialize([
                    (_rs_ws_first, (xs, wring, wring, ready, empty, red, done, count, first, 0, 64, BLOCK_T, STAGES,
                                    WS, KS, 1)),
                    (_rs_ws_other, (xs, wring, wring, ready, empty, red, done, 1, count, first, 0, 64, BLOCK_T,
                                    STAGES, WS, KS, 1)),
                    (_rs_ws_other, (xs, wring, wring, ready, empty, red, done, 2, count, first, 0, 64, BLOCK_T,
                                    STAGES, WS, KS, 1)),
                    (_rs_ws_loader, (x_desc, w_desc, xs, wring, ready, empty, count, first, off_t, off_n, STAGES,
                                     KS, WS)),
                ], [4, 4, 1], [WS_REGS, WS_REGS, 24])
        else:
            for i in gl.static_range(STAGES):
                _rs_issue(x_desc, w_desc, xs, wring, bars, i, count, first, off_t, off_n, STAGES, 1)
            sel_lo, sel_hi, magic = _rs8_constants(lT)
            a = _rs8_tile(_rs8_words(wring, bars, 0, count, lw, RW, STAGES), sel_lo, sel_hi, magic, a_layout,
                          BLOCK_N)
            acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, mma)
            acc, a = _rs8_step(x_desc, w_desc, xs, wring, bars, acc, a, sel_lo, sel_hi, magic, 0, count, first,
                               off_t, off_n, False, lw, a_layout, BLOCK_N, STAGES)  # step 0 peeled: use_acc=False
            for j in range(1, count):
                acc, a = _rs8_step(x_desc, w_desc, xs, wring, bars, acc, a, sel_lo, sel_hi, magic, j, count,
                                   first, off_t, off_n, True, lw, a_layout, BLOCK_N, STAGES)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
        offs_t = off_t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, mma))
        acc = acc * gl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[:, None]
        mask = (offs_n < N)[:, None] & (offs_t < M)[None, :]
        n2, m2 = gl.broadcast(offs_n[:, None], offs_t[None, :])
        _finish(acc, m2, n2, mask, b_ptr, y_ptr, ws_ptr, cnt_ptr, pid_t * gl.num_programs(1) + pid_n, N,
                stride_ym, HAS_BIAS, SPLIT_K)

    # -----------------------------------------------------------------------------------------------------
    # few rows: the tensor-core GEMV (mma.sync, sm_80+)

    @gluon.jit
    def _gemv_bases(x_ptr, s_ptr, z_ptr, rows, n0, pid_m, M, N, stride_xm, stride_sn, stride_zn, lx: gl.constexpr,
                    mma: gl.constexpr, BN: gl.constexpr):
        """The GEMV's base pointers: x [8, 128] (rows past M copy the last one), the zero points of the word tile's
        rows and of the accumulator's, its scales; and the accumulator's rows (the MMA's row m is rep, warp,
        h (8 rows), g: the word tile's row rep, warp, g, h), past N clamped for the loads."""
        x_rows = gl.minimum(pid_m * 8 + gl.arange(0, 8, layout=gl.SliceLayout(1, lx)), M - 1)
        x_base = x_ptr + x_rows[:, None] * stride_xm + gl.arange(0, 128, layout=gl.SliceLayout(0, lx))[None, :]
        m_rows = n0 + _mma_rows(gl.arange(0, BN, layout=gl.SliceLayout(1, mma)))
        m_safe = gl.minimum(m_rows, N - 1)
        return x_base, z_ptr + rows * stride_zn, z_ptr + m_safe * stride_zn, s_ptr + m_safe * stride_sn, m_rows

    @gluon.jit
    def _gemv_finish(out, m_rows, pid_m, pid_n, M, N, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym, mma: gl.constexpr,
                     HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr):
        """Write out [BN outputs, 8 rows of x] into y (or its split-K partial)."""
        cols = pid_m * 8 + gl.arange(0, 8, layout=gl.SliceLayout(0, mma))
        n2, m2 = gl.broadcast(m_rows[:, None], cols[None, :])
        _finish(out, m2, n2, (m_rows < N)[:, None] & (cols < M)[None, :], b_ptr, y_ptr, ws_ptr, cnt_ptr,
                pid_m * gl.num_programs(0) + pid_n, N, stride_ym, HAS_BIAS, SPLIT_K)

    @gluon.jit
    def _gemv_params(x_base, s_base, z_words, z_rows, step, GROUP: gl.constexpr, ONES: gl.constexpr):
        """Step `step`'s x tile [8, 128], zero points (of the word tile's rows, or with ONES of the accumulator's)
        and scales of the accumulator's rows (fp32). Rows past N and x rows past M were clamped to the last one:
        no masks, no predicated loads."""
        g = step * 128 // GROUP
        xt = gl.load(x_base + step * 128)
        z = gl.load((z_rows if ONES else z_words) + g).to(gl.int32)
        sc = gl.load(s_base + g).to(gl.float32)
        return xt, z, sc

    @gluon.jit
    def _gemv_load(w_base, x_base, s_base, z_words, z_rows, step, GROUP: gl.constexpr, ONES: gl.constexpr):
        """`_gemv_params` and the step's words [BN, 16] (128 codes a row)."""
        words = gl.load(w_base + step * 16)
        xt, z, sc = _gemv_params(x_base, s_base, z_words, z_rows, step, GROUP, ONES)
        return words, xt, z, sc

    @gluon.jit
    def _gemv_step(words, xt, z, sc, out, l3: gl.constexpr, a_layout: gl.constexpr, b_layout: gl.constexpr,
                   REPS: gl.constexpr, ONES: gl.constexpr, num_warps: gl.constexpr):
        """out [BN, 8] += one step's products: the words converted into the MMA's A operand, x into its B."""
        BN: gl.constexpr = 16 * REPS * num_warps
        eight = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, l3)))[None, None, :]
        w3, _ = gl.broadcast(words[:, :, None], eight)  # pack=8: one word's 8 codes an asm instance
        if ONES:
            codes = gl.inline_asm_elementwise(CODES_BF16, CODES_BF16_CONSTRAINTS, [w3],
                                              dtype=gl.bfloat16, is_pure=True, pack=8)
        else:
            z3, _ = gl.broadcast(((z * 0x10001) | 0x43004300)[:, None, None], w3)
            codes = gl.inline_asm_elementwise(CODES_MINUS_ZERO_BF16, CODES_MINUS_ZERO_BF16_CONSTRAINTS,
                                              [w3, z3], dtype=gl.bfloat16, is_pure=True, pack=8)
        # [rep, warp, g, h, t, i, s_hi, s_lo, e] -> [rep, warp, h, g | i, s_hi, s_lo, t, e]
        a = gl.reshape(codes, [REPS, num_warps, 8, 2, 4, 4, 2, 2, 2])
        a = gl.reshape(gl.permute(a, [0, 1, 3, 2, 5, 6, 7, 4, 8]), [BN, 128])
        a = gl.convert_layout(a, a_layout, assert_trivial=True)
        # x [col, k = 32 t + 8 i + 4 e + 2 s_hi + s_lo] -> [i, s_hi, s_lo, t, e | col]
        b = gl.reshape(xt, [8, 4, 4, 2, 2, 2])
        b = gl.reshape(gl.permute(b, [2, 4, 5, 1, 3, 0]), [128, 8])
        b = gl.convert_layout(b, b_layout, assert_trivial=True)
        zero_acc = gl.zeros_like(out)
        dot = mma_v2(a, b, zero_acc)
        if ONES:  # (128 + q) . x - (128 + zero) sum(x)
            ones = gl.full([BN, 128], 1.0, gl.bfloat16, a_layout)
            dot = dot - (z.to(gl.float32) + 128.0)[:, None] * mma_v2(ones, b, zero_acc)
        return out + sc[:, None] * dot

    @gluon.jit
    def _int4_gemv_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                              stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
                              GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, REPS: gl.constexpr, ONES: gl.constexpr,
                              AHEAD: gl.constexpr, SPLIT_K: gl.constexpr, num_warps: gl.constexpr):
        """y[m, n] for up to 8 rows m (the MMA's N) and BN = 16 REPS num_warps outputs n (its M), K / SPLIT_K.

        A step takes 128 codes of each output: thread (g, t) of a quad converts 4 consecutive words of two rows
        (2 g, 2 g + 1 of its warp's 16) and reads x at the same 32 k. The MMA's k slots are a permutation of those
        k (slot i 32 + s_hi 16 + s_lo 8 + 2 t + e holds k = 32 t + 8 i + 4 e + 2 s_hi + s_lo, the order the
        conversion leaves the codes in), the same for both operands, so the dot product is unchanged and both
        operands are in the MMA's register layout as converted and loaded: the layout conversions are trivial
        (asserted at compile time). Per step the MMA sums exact products in fp32, either (q - zero) . x (ONES=0:
        the zero point subtracted from the codes, exact in bf16) or (128 + q) . x, with the sums of x from a second
        MMA whose A is all ones (ONES=1: fewer instructions a code; its rounding error scales with 143 |x| rather
        than |q - zero| |x|, 10-20x ONES=0's, still far below a bf16 unit unless x has outliers of ~1000x); the
        scale, and with ONES the zero point, then apply to the step's [BN, 8] sums in fp32. The loads run AHEAD (1
        or 2) steps ahead, in registers.
        """
        BN: gl.constexpr = 16 * REPS * num_warps
        gl.static_assert(GROUP % 128 == 0, "a step (128 codes) lies in one group")
        # words [BN, 16]: rows as rep, warp, g, h (h = row parity, in-thread), words as t (quad lane), i
        l3: gl.constexpr = gl.BlockedLayout([2, 4, 8], [8, 4, 1], [num_warps, 1, 1], [2, 1, 0])
        lw: gl.constexpr = gl.SliceLayout(2, l3)
        lx: gl.constexpr = gl.BlockedLayout([1, 32], [8, 4], [num_warps, 1], [1, 0])  # x [8, 128], every warp
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)

        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        steps = K // 128
        per_split = (steps + SPLIT_K - 1) // SPLIT_K
        first = pid_k * per_split
        stop = gl.minimum(steps, first + per_split)
        n0 = pid_n * BN

        rows = gl.minimum(n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, lw)), N - 1)  # the word tile's rows
        w_base = w_ptr + rows[:, None] * stride_wn + gl.arange(0, 16, layout=gl.SliceLayout(0, lw))[None, :]
        x_base, z_words, z_rows, s_base, m_rows = _gemv_bases(x_ptr, s_ptr, z_ptr, rows, n0, pid_m, M, N, stride_xm,
                                                              stride_sn, stride_zn, lx, mma, BN)

        out = gl.zeros([BN, 8], gl.float32, mma)
        # loads AHEAD steps ahead of the arithmetic, in registers (clamped to the last step at the end)
        words, xt, z, sc = _gemv_load(w_base, x_base, s_base, z_words, z_rows, gl.minimum(first, steps - 1),
                                      GROUP, ONES)
        if AHEAD == 1:
            for step in range(first, stop):
                words2, xt2, z2, sc2 = _gemv_load(w_base, x_base, s_base, z_words, z_rows,
                                                  gl.minimum(step + 1, stop - 1), GROUP, ONES)
                out = _gemv_step(words, xt, z, sc, out, l3, a_layout, b_layout, REPS, ONES, num_warps)
                words, xt, z, sc = words2, xt2, z2, sc2
        else:
            words2, xt2, z2, sc2 = _gemv_load(w_base, x_base, s_base, z_words, z_rows,
                                              gl.minimum(first + 1, steps - 1), GROUP, ONES)
            for step in range(first, stop):
                words3, xt3, z3, sc3 = _gemv_load(w_base, x_base, s_base, z_words, z_rows,
                                                  gl.minimum(step + 2, stop - 1), GROUP, ONES)
                out = _gemv_step(words, xt, z, sc, out, l3, a_layout, b_layout, REPS, ONES, num_warps)
                words, xt, z, sc = words2, xt2, z2, sc2
                words2, xt2, z2, sc2 = words3, xt3, z3, sc3

        _gemv_finish(out, m_rows, pid_m, pid_n, M, N, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym, mma, HAS_BIAS,
                     SPLIT_K)

    @gluon.jit
    def _gemv_issue(w_desc, x_desc, ws, xr, bars, j, count, first, n0, m0, STAGES: gl.constexpr, XP: gl.constexpr):
        """TMA load of the words of this program's step j (K step first + j) into stage j % STAGES (none past
        count), and with XP its x tile [8, 128] too. Rows past N (and M) come as zeros."""
        s = j % STAGES
        ok = j < count
        bar = bars.index(s)
        if XP:
            mbarrier.expect(bar, w_desc.block_type.nbytes + x_desc.block_type.nbytes, pred=ok)
            _tma_load(x_desc, [m0, (first + j) * 128], bar, xr.index(s), pred=ok)
        else:
            mbarrier.expect(bar, w_desc.block_type.nbytes, pred=ok)
        _tma_load(w_desc, [n0, (first + j) * 16], bar, ws.index(s), pred=ok)

    @gluon.jit
    def _int4_gemv_tma_kernel(x_ptr, w_desc, x_desc, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                              stride_xm, stride_sn, stride_zn, stride_ym,
                              GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, REPS: gl.constexpr, ONES: gl.constexpr,
                              STAGES: gl.constexpr, SPLIT_K: gl.constexpr, XP: gl.constexpr, PG: gl.constexpr,
                              num_warps: gl.constexpr):
        """`_int4_gemv_mma_kernel` with the words brought by TMA into a ring of STAGES shared-memory stages, all
        of them in flight: up to STAGES x BN x 64 bytes a program on their way, against one step's in registers.
        One CTA barrier a step (after every warp has read its stage) frees the stage for the refill.

        x and the group parameters: XP=0, plain loads one step ahead (each step can wait on them); XP=1, the x
        tile by TMA with the words (rows past M as zeros) and the parameters of the program's groups from tables
        in shared memory filled before the loop (`_param_table`: PG rows, in the accumulator's row order for the
        scales, and for ONES=0 one in the word tile's order for the zero points), so the loop has no global load."""
        BN: gl.constexpr = 16 * REPS * num_warps
        gl.static_assert(GROUP % 128 == 0, "a step (128 codes) lies in one group")
        l3: gl.constexpr = gl.BlockedLayout([2, 4, 8], [8, 4, 1], [num_warps, 1, 1], [2, 1, 0])
        lw: gl.constexpr = gl.SliceLayout(2, l3)
        lx: gl.constexpr = gl.BlockedLayout([1, 32], [8, 4], [num_warps, 1], [1, 0])
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, 8])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)

        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        steps = K // 128
        per_split = (steps + SPLIT_K - 1) // SPLIT_K
        first = pid_k * per_split
        count = gl.maximum(gl.minimum(steps, first + per_split) - first, 0)
        n0 = pid_n * BN

        ws = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 16], w_desc.layout)
        if XP:
            xr = gl.allocate_shared_memory(gl.bfloat16, [STAGES, 8, 128], x_desc.layout)
        else:
            xr = ws
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        for i in gl.static_range(STAGES):
            _gemv_issue(w_desc, x_desc, ws, xr, bars, i, count, first, n0, pid_m * 8, STAGES, XP)

        rows = gl.minimum(n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, lw)), N - 1)
        x_base, z_words, z_rows, s_base, m_rows = _gemv_bases(x_ptr, s_ptr, z_ptr, rows, n0, pid_m, M, N, stride_xm,
                                                              stride_sn, stride_zn, lx, mma, BN)

        out = gl.zeros([BN, 8], gl.float32, mma)
        last = first + count - 1  # (read in the loop only, where count >= 1)
        if XP:
            g0 = first * 128 // GROUP
            g_end = last * 128 // GROUP + 1
            # (viewed with a layout of the rank a row has, to read one row a step)
            row: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
            acc_t = _reinterpret(_param_table(s_ptr, z_ptr, n0, N, g0, g_end, stride_sn, stride_zn, PG, BN, 1,
                                              num_warps), gl.int32, [PG, BN], row)
            if ONES:
                w_t = acc_t
            else:
                w_t = _reinterpret(_param_table(s_ptr, z_ptr, n0, N, g0, g_end, stride_sn, stride_zn, PG, BN, 0,
                                                num_warps), gl.int32, [PG, BN], row)
            _cta_barrier()
            for j in range(0, count):
                s = j % STAGES
                mbarrier.wait(bars.index(s), (j // STAGES) & 1)
                words = ws.index(s).load(lw)
                xt = xr.index(s).load(lx)
                _cta_barrier()  # every warp has read stage s: refill it
                _gemv_issue(w_desc, x_desc, ws, xr, bars, j + STAGES, count, first, n0, pid_m * 8, STAGES, XP)
                g = (first + j) * 128 // GROUP - g0
                v = acc_t.index(g).load(gl.SliceLayout(1, mma))
                sc = (v << 16).to(gl.float32, bitcast=True)  # the scale's bf16 bits, as fp32
                if ONES:
                    z = v >> 16
                else:
                    z = w_t.index(g).load(gl.SliceLayout(1, lw)) >> 16
                out = _gemv_step(words, xt, z, sc, out, l3, a_layout, b_layout, REPS, ONES, num_warps)
        else:
            xt, z, sc = _gemv_params(x_base, s_base, z_words, z_rows, gl.minimum(first, steps - 1), GROUP, ONES)
            for j in range(0, count):
                # x and the group parameters one step ahead in registers, the words STAGES steps ahead by TMA
                xt2, z2, sc2 = _gemv_params(x_base, s_base, z_words, z_rows, gl.minimum(first + j + 1, last),
                                            GROUP, ONES)
                s = j % STAGES
                mbarrier.wait(bars.index(s), (j // STAGES) & 1)
                words = ws.index(s).load(lw)
                _cta_barrier()  # every warp has read stage s: refill it
                _gemv_issue(w_desc, x_desc, ws, xr, bars, j + STAGES, count, first, n0, pid_m * 8, STAGES, XP)
                out = _gemv_step(words, xt, z, sc, out, l3, a_layout, b_layout, REPS, ONES, num_warps)
                xt, z, sc = xt2, z2, sc2
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        _gemv_finish(out, m_rows, pid_m, pid_n, M, N, b_ptr, y_ptr, ws_ptr, cnt_ptr, stride_ym, mma, HAS_BIAS,
                     SPLIT_K)


@functools.cache
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def available(x: torch.Tensor) -> bool:
    """Whether this GPU and Triton can run the kernel (Hopper, Gluon's Hopper API)."""
    return gluon is not None and x.is_cuda and _capability(x.device.index or 0)[0] == 9


def config_for(x, words, scales, zeros, group: int) -> dict | None:
    """The launch config for these tensors on this GPU, or None (the op then runs the Triton kernels): the config
    `benchmarks/quant_linear_gpu.py --sweep ... --sweep-wgmma` measured fastest for the shape and row bucket, kept
    in `measured_configs.json` (kernel "int4_wgmma") only where it beat the op's Triton path in the same run."""
    if not available(x):
        return None
    from prunus.kernels.quant_linear_triton import _device_name, measured_config

    (M, K), N = x.shape, words.shape[0]
    config = measured_config("int4_wgmma", _device_name(x.device.index or 0), M, N, K, group)
    return None if config is None or unfit(x, words, scales, zeros, group, config) else config


def int8_config_for(x, qweight, scales) -> dict | None:
    """The launch config of `int8_gemm_wgmma` for these tensors on this GPU, or None (the op then runs the Triton
    weight-only kernel): the config `benchmarks/int8_wgmma_gpu.py` measured fastest for the shape and row bucket,
    kept in `measured_configs.json` (kernel "int8_wgmma", group 0: per channel) only where it beat the op's Triton
    path in the same run."""
    if not available(x) or qweight.dtype != torch.int8 or not qweight.is_contiguous() or qweight.shape[1] % 64:
        return None
    from prunus.kernels.quant_linear_triton import _device_name, measured_config

    (M, K), N = x.shape, qweight.shape[0]
    config = measured_config("int8_wgmma", _device_name(x.device.index or 0), M, N, K, 0)
    return None if config is None or int8_unfit(x, qweight.view(torch.int32), scales, config) else config


_SLOTS = {}


def _split_k_slots(device, numel: int) -> torch.Tensor:
    """SLOTS=1's partials, [SPLIT_K, M, N] fp32, one buffer a device, grown on demand (uninitialized: every slot
    read is written first in the same launch). Like the atomic workspace: launches must not overlap, and a CUDA
    graph is captured after a warm-up call at the largest shape."""
    slots = _SLOTS.get(device)
    if slots is None or slots.numel() < numel:
        slots = torch.empty(max(numel, 1 << 16), dtype=torch.float32, device=device)
        _SLOTS[device] = slots
    return slots


def _groups_spanned(K: int, step: int, group: int, split: int) -> int:
    """The most groups that one split's steps of `step` codes touch (split-K gives each ceil(steps / split) steps),
    rounded up to a power of two: the rows of a group-parameter table in shared memory (`_param_table`)."""
    steps = K // step
    per = -(-steps // split)
    spans = [(min(steps, p * per + per) - 1) * step // group - p * per * step // group + 1
             for p in range(split) if p * per < steps]
    return triton.next_power_of_2(max(spans))


def _param_groups(K: int, group: int, config: dict) -> int:
    """P_SMEM: the rows of the register-operand kernel's group-parameter table (steps of 64; 1 without P_SMEM)."""
    return _groups_spanned(K, 64, group, config.get("SPLIT_K", 1)) if config.get("P_SMEM") else 1


def _ws_regs(config: dict) -> int:
    """WS: the registers a thread of each worker consumer warp group asks for (setmaxnreg); the TMA warp takes
    24 and the default partition what is left of the CTA's share of the register file."""
    return {2: 232, 3: 160}.get(config.get("WS", 0), 0)


def _blocks(config: dict) -> list:
    """(element type, TMA block shape, shared layout) of the activation (bf16) and word descriptors (only the
    activation's for the register-operand kernel)."""
    if "BLOCK_T" in config:  # with W_TMA the word tiles too, unswizzled (read back in the threads' layout)
        bt, bn = config["BLOCK_T"], 16 * config["num_warps"] * config.get("REPS", 1)
        x = (gl.bfloat16, [bt, 64], gl.NVMMASharedLayout.get_default_for([bt, 64], gl.bfloat16))
        return [x, (gl.int32, [bn, 8], gl.NVMMASharedLayout(0, 32, rank=2))] if config.get("W_TMA") else [x]
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    return [(gl.bfloat16, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gl.bfloat16)),
            (gl.int32, [bn, bk // 8], gl.NVMMASharedLayout.get_default_for([bn, bk // 8], gl.int32))]


def unfit(x, words, scales, zeros, group: int, config: dict) -> str | None:
    """Why the kernel cannot take these tensors with `config` (None: it can)."""
    K = x.shape[1]
    if x.dtype != torch.bfloat16:
        return "x must be bf16"
    if scales.dtype != x.dtype or zeros is None or zeros.dtype.is_floating_point:
        return "needs scales in x's dtype and integer zero points"
    if K % group:
        return f"K={K} is not a multiple of the group size {group}"
    if "BLOCK_T" in config:  # the register-operand kernel: steps of 64, whole warp groups, TMA for x only
        if (config["BLOCK_T"] not in (64, 128, 256) or config.get("num_warps") not in (4, 8) or config["STAGES"] < 2
                or config.get("REPS", 1) not in (1, 2) or config.get("AHEAD", 0) not in (0, 1)
                or config.get("W_TMA", 0) not in (0, 1) or config.get("P_SMEM", 0) not in (0, 1)
                or config.get("SLOTS", 0) not in (0, 1) or config.get("WS", 0) not in (0, 2, 3)):
            return f"bad config {config}"
        if config.get("WS") and not (config.get("W_TMA") and config.get("P_SMEM") and config["num_warps"] == 4
                                     and config.get("REPS", 1) == 1):
            return "WS (warp-specialized) needs W_TMA=1, P_SMEM=1, num_warps=4 and REPS=1"
        if config.get("WS_K", 64) not in (64, 128) or (config.get("WS_K", 64) == 128 and not config.get("WS")):
            return f"bad config {config}: WS_K (the K of a WS stage) is 64 or 128, and only with WS"
        if (K // 64 // config.get("SPLIT_K", 1)) % (config.get("WS_K", 64) // 64):
            return f"WS_K={config['WS_K']} must divide each split's K ({K // config.get('SPLIT_K', 1)})"
        if K % 64 or group % 64:
            return "the K step of 64 must divide K and the group size"
        if (K // 64) % config.get("SPLIT_K", 1):
            return f"SPLIT_K={config.get('SPLIT_K', 1)} must divide the {K // 64} K steps"
        table = _param_groups(K, group, config) * 16 * config["num_warps"] * config.get("REPS", 1) * 4
        if table > P_SMEM_BYTES:
            return (f"P_SMEM: the group parameters of a program's K range take {table} bytes of shared memory "
                    f"(at most {P_SMEM_BYTES}): use SPLIT_K or P_SMEM=0")
        if words.stride(1) != 1 or scales.stride(1) != 1 or zeros.stride(1) != 1:
            return "needs the words, scales and zero points contiguous along K"
        for t in (x, words) if config.get("W_TMA") else (x,):
            if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
                return f"TMA needs 16-byte aligned, contiguous rows of {'the words' if t is words else 'x'}"
        return None
    if K % config["BLOCK_K"] or group % config["BLOCK_K"]:
        return f"BLOCK_K={config['BLOCK_K']} must divide K and the group size"
    if (K // config["BLOCK_K"]) % config.get("SPLIT_K", 1):
        return f"SPLIT_K={config.get('SPLIT_K', 1)} must divide the {K // config['BLOCK_K']} K steps"
    for t in (x, words):  # TMA: 16-byte aligned base and rows, contiguous along K
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return "TMA needs 16-byte aligned, contiguous rows of x and of the weights"
    return None


def int4_gemm_wgmma(x, words, scales, zeros, bias, group: int, config: dict) -> torch.Tensor:
    """y [M, N] = x [M, K] . W^T (+ bias) for int4 words [N, K / 8] (int32), on the Gluon kernel."""
    reason = unfit(x, words, scales, zeros, group, config)
    if reason:
        raise ValueError(reason)
    M, K = x.shape
    N = words.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    split_k = config.get("SPLIT_K", 1)
    if "BLOCK_T" in config:  # the weight as the register operand
        bt, bn = config["BLOCK_T"], 16 * config["num_warps"] * config.get("REPS", 1)
        descs = [TensorDescriptor.from_tensor(t, block, layout) for t, (_, block, layout) in zip((x, words),
                                                                                                 _blocks(config))]
        grid = (triton.cdiv(M, bt), triton.cdiv(N, bn), split_k)
        ws, cnt = _split_k_workspace(x.device, M * N if split_k > 1 else 0, grid[0] * grid[1])
        slots = config.get("SLOTS", 0) and split_k > 1
        if slots:  # a slot a split, overwritten on every launch: not the zeroed workspace of the atomic protocol
            ws = _split_k_slots(x.device, split_k * M * N)
        _int4_wgmma_rs_kernel[grid](descs[0], descs[-1], words, scales.view(torch.int16), zeros,
                                    bias if bias is not None else y, y, ws, cnt, M, N, K, words.stride(0),
                                    scales.stride(0), zeros.stride(0), y.stride(0), GROUP=group,
                                    HAS_BIAS=bias is not None, BLOCK_T=bt, STAGES=config["STAGES"],
                                    SPLIT_K=split_k, REPS=config.get("REPS", 1), AHEAD=config.get("AHEAD", 0),
                                    W_TMA=config.get("W_TMA", 0), P_SMEM=config.get("P_SMEM", 0),
                                    PG=_param_groups(K, group, config), SLOTS=int(slots), WS=config.get("WS", 0),
                                    WS_REGS=_ws_regs(config), KS=config.get("WS_K", 64) // 64,
                                    num_warps=config["num_warps"])
        return y
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    x_desc, w_desc = [TensorDescriptor.from_tensor(t, block, layout)
                      for t, (_, block, layout) in zip((x, words), _blocks(config))]
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split_k)
    ws, cnt = _split_k_workspace(x.device, M * N if split_k > 1 else 0, grid[0] * grid[1])
    _int4_wgmma_kernel[grid](x_desc, w_desc, scales.view(torch.int16), zeros, bias if bias is not None else y, y,
                             ws, cnt, M, N, K, scales.stride(0), zeros.stride(0), y.stride(0),
                             GROUP=group, HAS_BIAS=bias is not None,
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=config["BLOCK_K"], STAGES=config["STAGES"],
                             SPLIT_K=split_k, num_warps=config["num_warps"])
    return y


def gemv_available(x: torch.Tensor) -> bool:
    """Whether this GPU and Triton can run the tensor-core GEMV (mma.sync, NVIDIA: compute capability 8.0 or later;
    its STAGES variant, TMA, 9.0)."""
    return (gluon is not None and mma_v2 is not None and x.is_cuda and torch.version.hip is None
            and _capability(x.device.index or 0) >= (8, 0))


def gemv_config_for(x, words, scales, zeros, group: int) -> dict | None:
    """The tensor-core GEMV's launch config for these tensors on this GPU, or None (the op then runs the Triton
    GEMV): the one `benchmarks/quant_linear_gpu.py --sweep 1 --sweep-gemv-mma` measured fastest for the shape
    and row bucket, kept in `measured_configs.json` (kernel "int4_gemv_mma") only where it beat the Triton GEMV in
    the same run."""
    if not gemv_available(x):
        return None
    from prunus.kernels.quant_linear_triton import _device_name, measured_config

    (M, K), N = x.shape, words.shape[0]
    config = measured_config("int4_gemv_mma", _device_name(x.device.index or 0), M, N, K, group)
    return None if config is None or gemv_unfit(x, words, scales, zeros, group, config) else config


INT8_CONFIGS = {  # name -> launch config of `int8_gemm_wgmma` (`_int8_wgmma_rs_kernel`)
    "t256n64": dict(BLOCK_T=256, STAGES=3, num_warps=4),
    "t128n64": dict(BLOCK_T=128, STAGES=4, num_warps=4),
    "t128n128": dict(BLOCK_T=128, STAGES=4, num_warps=8),
    "t64n64k2": dict(BLOCK_T=64, STAGES=6, SPLIT_K=2, num_warps=4),
    "t128n64ws2k128": dict(BLOCK_T=128, STAGES=4, WS=2, WS_K=128, num_warps=4),
    "t256n64ws2": dict(BLOCK_T=256, STAGES=3, WS=2, num_warps=4),
    "t64n64ws3k128": dict(BLOCK_T=64, STAGES=6, WS=3, WS_K=128, SPLIT_K=2, num_warps=4),
}


def _blocks8(config: dict) -> list:
    """(element type, TMA block shape, shared layout) of x and of the int8 words (int32, 16 a row: 64 codes) for
    `_int8_wgmma_rs_kernel`; the words with the 64-byte swizzle, so that the threads' single-word reads of them
    (`_rs8_words`) meet no bank conflict."""
    bt, bn = config["BLOCK_T"], 16 * config["num_warps"]
    return [(gl.bfloat16, [bt, 64], gl.NVMMASharedLayout.get_default_for([bt, 64], gl.bfloat16)),
            (gl.int32, [bn, 16], gl.NVMMASharedLayout(64, 32, rank=2))]


def int8_unfit(x, words, scales, config: dict) -> str | None:
    """Why `int8_gemm_wgmma` cannot take these tensors with `config` (None: it can)."""
    K = x.shape[1]
    if x.dtype != torch.bfloat16 or scales.dtype != x.dtype:
        return "needs bf16 x and scales"
    if scales.shape != (words.shape[0],) or scales.stride(0) != 1:
        return f"needs contiguous per-channel scales [{words.shape[0]}], got {tuple(scales.shape)}"
    if (set(config) - {"BLOCK_T", "STAGES", "SPLIT_K", "WS", "WS_K", "num_warps"}
            or config.get("BLOCK_T") not in (64, 128, 256) or config.get("num_warps") not in (4, 8)
            or config.get("STAGES", 0) < 2 or config.get("WS", 0) not in (0, 2, 3)):
        return f"bad config {config}"
    if config.get("WS") and config["num_warps"] != 4:
        return "WS (warp-specialized) needs num_warps=4 (one warp group a consumer)"
    if config.get("WS_K", 64) not in (64, 128) or (config.get("WS_K", 64) == 128 and not config.get("WS")):
        return f"bad config {config}: WS_K (the K of a WS stage) is 64 or 128, and only with WS"
    if K % 64:
        return f"K={K} is not a multiple of the step of 64"
    if (K // 64) % config.get("SPLIT_K", 1):
        return f"SPLIT_K={config.get('SPLIT_K', 1)} must divide the {K // 64} K steps"
    if (K // 64 // config.get("SPLIT_K", 1)) % (config.get("WS_K", 64) // 64):
        return f"WS_K={config['WS_K']} must divide each split's K ({K // config.get('SPLIT_K', 1)})"
    for t in (x, words):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"TMA needs 16-byte aligned, contiguous rows of {'the weight' if t is words else 'x'}"
    return None


def int8_gemm_wgmma(x, qweight, scales, bias, config: dict) -> torch.Tensor:
    """y [M, N] = x [M, K] . (qweight * scales[:, None])^T (+ bias) for an int8 weight [N, K] with per-channel
    scales, on `_int8_wgmma_rs_kernel` (Hopper)."""
    if qweight.dtype == torch.int8 and (qweight.dim() != 2 or qweight.shape[1] % 64):
        raise ValueError(f"needs an int8 weight [N, K] with K a multiple of the step of 64, got {tuple(qweight.shape)}")
    # the int8 weight [N, K] as words [N, K / 4], four codes each
    words = qweight.contiguous().view(torch.int32) if qweight.dtype == torch.int8 else qweight
    reason = int8_unfit(x, words, scales, config)
    if reason:
        raise ValueError(reason)
    M, K = x.shape
    N = words.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    split_k = config.get("SPLIT_K", 1)
    bt, bn = config["BLOCK_T"], 16 * config["num_warps"]
    x_desc, w_desc = [TensorDescriptor.from_tensor(t, block, layout)
                      for t, (_, block, layout) in zip((x, words), _blocks8(config))]
    grid = (triton.cdiv(M, bt), triton.cdiv(N, bn), split_k)
    ws, cnt = _split_k_workspace(x.device, M * N if split_k > 1 else 0, grid[0] * grid[1])
    _int8_wgmma_rs_kernel[grid](x_desc, w_desc, scales, bias if bias is not None else y, y, ws, cnt, M, N, K,
                                y.stride(0), HAS_BIAS=bias is not None, BLOCK_T=bt, STAGES=config["STAGES"],
                                SPLIT_K=split_k, WS=config.get("WS", 0), WS_REGS=_ws_regs(config),
                                KS=config.get("WS_K", 64) // 64, num_warps=config["num_warps"])
    return y


def gemv_unfit(x, words, scales, zeros, group: int, config: dict) -> str | None:
    """Why the tensor-core GEMV cannot take these tensors with `config` (None: it can)."""
    if x.dtype != torch.bfloat16:
        return "x must be bf16"
    if scales.dtype != x.dtype or zeros is None or zeros.dtype.is_floating_point:
        return "needs scales in x's dtype and integer zero points"
    if x.shape[1] == 0 or group % 128 or x.shape[1] % group:
        return f"needs a group size that is a multiple of 128 and divides K > 0 (group {group}, K={x.shape[1]})"
    if (not {"REPS", "num_warps"} <= config.keys() or config.get("SPLIT_K", 1) < 1
            or config["REPS"] not in (1, 2, 4, 8) or config.get("AHEAD", 1) not in (1, 2)):
        return f"bad config {config}"
    if words.stride(1) != 1 or scales.stride(1) != 1 or zeros.stride(1) != 1:
        return "needs the words, scales and zero points contiguous along K"
    if config.get("STAGES"):  # TMA: Hopper, at most 256 rows a box, 16-byte aligned rows of words
        if not x.is_cuda or _capability(x.device.index or 0)[0] < 9:
            return "STAGES (TMA) needs a GPU of compute capability 9.0 or later"
        if 16 * config["REPS"] * config["num_warps"] > 256:
            return "STAGES (TMA) takes at most 256 outputs a program"
        if (words.stride(0) * 4) % 16 or words.data_ptr() % 16:  # (contiguous along K: checked above)
            return "TMA needs 16-byte aligned rows of the weights"
        if config.get("XP", 0) not in (0, 1):
            return f"bad config {config}"
        if config.get("XP"):
            if x.stride(-1) == 1 and ((x.stride(0) * 2) % 16 or x.data_ptr() % 16):  # (else copied: aligned)
                return "XP (x by TMA) needs 16-byte aligned rows of x"
            tables = _gemv_param_groups(x.shape[1], group, config) * 16 * config["REPS"] * config["num_warps"] * 4
            if tables * (1 if config.get("ONES", 1) else 2) > P_SMEM_BYTES:
                return (f"XP: the group parameters of a program's steps take more than {P_SMEM_BYTES} bytes of "
                        "shared memory: use SPLIT_K or XP=0")
    elif config.get("XP"):
        return "XP needs STAGES (the TMA ring)"
    return None


_GEMV_X_BLOCK = ([8, 128], gl.NVMMASharedLayout(0, 16, rank=2)) if gluon is not None else None  # XP's x tile


def _gemv_param_groups(K: int, group: int, config: dict) -> int:
    """XP: the rows of the tensor-core GEMV's group-parameter tables (steps of 128; 1 without XP)."""
    return _groups_spanned(K, 128, group, config.get("SPLIT_K", 1)) if config.get("XP") else 1


def _gemv_words_block(config: dict):
    """The TMA box of the tensor-core GEMV's words (BN rows of 16 words) and its shared layout."""
    bn = 16 * config["REPS"] * config["num_warps"]
    return [bn, 16], gl.NVMMASharedLayout.get_default_for([bn, 16], gl.int32)


def int4_gemv_mma(x, words, scales, zeros, bias, group: int, config: dict) -> torch.Tensor:
    """y [M, N] = x [M, K] . W^T (+ bias) for int4 words [N, K / 8] (int32), on the tensor-core GEMV (8 rows of x a
    program: meant for few rows)."""
    reason = gemv_unfit(x, words, scales, zeros, group, config)
    if reason:
        raise ValueError(reason)
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    N = words.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    bn = 16 * config["REPS"] * config["num_warps"]
    split_k = config.get("SPLIT_K", 1)
    grid = (triton.cdiv(N, bn), triton.cdiv(M, 8), split_k)
    ws, cnt = _split_k_workspace(x.device, M * N if split_k > 1 else 0, grid[0] * grid[1])
    if config.get("STAGES"):
        w_desc = TensorDescriptor.from_tensor(words, *_gemv_words_block(config))
        x_desc = TensorDescriptor.from_tensor(x, *_GEMV_X_BLOCK) if config.get("XP") else w_desc
        _int4_gemv_tma_kernel[grid](x, w_desc, x_desc, scales, zeros, bias if bias is not None else y, y, ws, cnt,
                                    M, N, K, x.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
                                    GROUP=group, HAS_BIAS=bias is not None, REPS=config["REPS"],
                                    ONES=config.get("ONES", 1), STAGES=config["STAGES"], SPLIT_K=split_k,
                                    XP=config.get("XP", 0), PG=_gemv_param_groups(K, group, config),
                                    num_warps=config["num_warps"])
        return y
    _int4_gemv_mma_kernel[grid](x, words, scales, zeros, bias if bias is not None else y, y, ws, cnt, M, N, K,
                                x.stride(0), words.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
                                GROUP=group, HAS_BIAS=bias is not None, REPS=config["REPS"],
                                ONES=config.get("ONES", 1), AHEAD=config.get("AHEAD", 1), SPLIT_K=split_k,
                                num_warps=config["num_warps"])
    return y


def compile_for(config: dict, arch: int = 90, group: int = 128, kernel: str = "wgmma", k: int = 4096):
    """Compile a kernel ("wgmma": the Hopper GEMM, "wgmma8": its int8 register-operand one, "gemv": the tensor-core
    GEMV) for `arch` without a GPU (for inspection: PTX, SASS, shared memory): a Triton CompiledKernel. Used by
    `benchmarks/sass_count.py` and by the tests, which check on the CPU that ptxas keeps the wgmmas asynchronous and
    that the GEMV's operands need no layout conversion."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    if kernel == "gemv" and config.get("STAGES"):
        fn = _int4_gemv_tma_kernel
        consts = dict(GROUP=group, HAS_BIAS=False, REPS=config["REPS"], ONES=config.get("ONES", 1),
                      STAGES=config["STAGES"], SPLIT_K=config.get("SPLIT_K", 1), XP=config.get("XP", 0),
                      PG=_gemv_param_groups(k, group, config), num_warps=config["num_warps"])
        block, layout = _gemv_words_block(config)
        descs = dict(w_desc=(gl.int32, block, layout),
                     x_desc=(gl.bfloat16, *_GEMV_X_BLOCK) if config.get("XP") else (gl.int32, block, layout))
        pointers = dict(x_ptr="*bf16", s_ptr="*bf16", z_ptr="*u8", b_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32",
                        cnt_ptr="*i32")
        divisible = ("K", "stride_xm", "stride_ym")
    elif kernel == "gemv":
        fn = _int4_gemv_mma_kernel
        consts = dict(GROUP=group, HAS_BIAS=False, REPS=config["REPS"], ONES=config.get("ONES", 1),
                      AHEAD=config.get("AHEAD", 1),
                      SPLIT_K=config.get("SPLIT_K", 1),
                      num_warps=config["num_warps"])
        descs = {}
        pointers = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*u8", b_ptr="*bf16", y_ptr="*bf16",
                        ws_ptr="*fp32", cnt_ptr="*i32")
        divisible = ("K", "stride_xm", "stride_wn", "stride_ym")
    elif kernel == "wgmma8":
        fn = _int8_wgmma_rs_kernel
        consts = dict(HAS_BIAS=False, BLOCK_T=config["BLOCK_T"], STAGES=config["STAGES"],
                      SPLIT_K=config.get("SPLIT_K", 1), WS=config.get("WS", 0), WS_REGS=_ws_regs(config),
                      KS=config.get("WS_K", 64) // 64, num_warps=config["num_warps"])
        descs = dict(zip(("x_desc", "w_desc"), _blocks8(config)))
        pointers = dict(s_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32", cnt_ptr="*i32")
        divisible = ("N", "K", "stride_ym")
    elif "BLOCK_T" in config:
        fn = _int4_wgmma_rs_kernel
        consts = dict(GROUP=group, HAS_BIAS=False, BLOCK_T=config["BLOCK_T"], STAGES=config["STAGES"],
                      SPLIT_K=config.get("SPLIT_K", 1), REPS=config.get("REPS", 1), AHEAD=config.get("AHEAD", 0),
                      W_TMA=config.get("W_TMA", 0), P_SMEM=config.get("P_SMEM", 0),
                      PG=_param_groups(k, group, config),
                      SLOTS=int(bool(config.get("SLOTS")) and config.get("SPLIT_K", 1) > 1),
                      WS=config.get("WS", 0), WS_REGS=_ws_regs(config), KS=config.get("WS_K", 64) // 64,
                      num_warps=config["num_warps"])
        descs = dict(x_desc=_blocks(config)[0], w_desc=_blocks(config)[-1])
        pointers = dict(w_ptr="*i32", s_ptr="*i16", z_ptr="*u8", b_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32",
                        cnt_ptr="*i32")
        divisible = ("N", "K", "stride_wn", "stride_sn", "stride_zn", "stride_ym")
    else:
        fn = _int4_wgmma_kernel
        consts = dict(GROUP=group, HAS_BIAS=False, BLOCK_M=config["BLOCK_M"],
                      BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], STAGES=config["STAGES"],
                      SPLIT_K=config.get("SPLIT_K", 1), num_warps=config["num_warps"])
        descs = dict(zip(("x_desc", "w_desc"), _blocks(config)))
        pointers = dict(s_ptr="*i16", z_ptr="*u8", b_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32", cnt_ptr="*i32")
        divisible = ("N", "K", "stride_sn", "stride_zn", "stride_ym")
    names = {gl.bfloat16: "bf16", gl.int32: "i32"}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in descs:
            elem, block, layout = descs[name]
            signature[name] = f"tensordesc<{names[elem]}[{', '.join(map(str, block))}],{layout!r}>"
        elif name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        else:
            signature[name] = pointers.get(name, "i32")
            if name in pointers or name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=config["num_warps"]))


def loop_global_loads(sass: str) -> int:
    """Global loads (LDG) in the K loop of a kernel's SASS: the shortest span of a backward branch that holds an
    MMA (HGMMA or HMMA); the longer ones that hold one are mbarrier retries, branching from the end of the kernel
    back into the loop. 0 for the register-operand GEMM with W_TMA and P_SMEM and the GEMV with XP: each step then
    waits on nothing but its stage of the TMA ring."""
    ins = [(int(a, 16), re.sub(r"^@!?U?P\w+\s+", "", t.strip()))
           for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    spans = [(int(m.group(1), 16), a) for a, t in ins
             if (m := re.match(r"BRA 0x([0-9a-f]+)", t)) and int(m.group(1), 16) < a]
    spans = [(lo, hi) for lo, hi in spans if any(t.startswith(("HGMMA", "HMMA")) and lo <= a <= hi for a, t in ins)]
    if not spans:
        raise ValueError("no loop with an MMA in this SASS")
    lo, hi = min(spans, key=lambda span: span[1] - span[0])
    return sum(1 for a, t in ins if lo <= a <= hi and t.startswith("LDG"))


def wgmma_a_aliasing(sass: str) -> list[str]:
    """Writes to a register-operand HGMMA's A registers before the wait that retires it, in the loop that holds the
    HGMMAs: with `WARPGROUP.DEPBAR.LE gsb0, 0x1` in the loop that wait is the second DEPBAR after it, else the
    first. ptxas (Triton 3.6) frees the A registers at the first, so a loop that leaves a wgmma in flight gets its
    next conversion written into them (wrong outputs on the H100; `_int4_wgmma_rs_kernel`). Empty: none."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), a) for a, t in ins
             if (m := re.search(r"@!?P\d+ BRA 0x([0-9a-f]+)", t)) and int(m.group(1), 16) < a]
    loops = [(lo, hi) for lo, hi in loops if any("HGMMA" in t and lo <= a <= hi for a, t in ins)]
    if not loops:
        return []
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    body = [(a, t) for a, t in ins if lo <= a <= hi]
    need = 2 if any("DEPBAR.LE gsb0, 0x1" in t for _, t in body) else 1
    found = []
    for i, (a, t) in enumerate(body):
        m = re.search(r"HGMMA\S*\s+R\d+,\s*R(\d+),", t)
        if not m:  # (an HGMMA whose A comes from shared memory names a descriptor there)
            continue
        regs, seen, j = set(range(int(m.group(1)), int(m.group(1)) + 4)), 0, i
        while True:
            j = (j + 1) % len(body)
            other = re.sub(r"^@!?U?P\w+\s+", "", body[j][1])
            if "WARPGROUP.DEPBAR" in other:
                seen += 1
                if seen == need:
                    break
                continue
            if other.startswith(("ST", "HGMMA", "BAR", "BRA", "WARPGROUP", "SYNCS", "UTMA", "RED", "ATOM")):
                continue
            d = re.match(r"\S+\s+R(\d+)", other)
            width = 4 if ".128" in other.split()[0] else 2 if (".64" in other.split()[0] or "WIDE" in other) else 1
            if d and regs & set(range(int(d.group(1)), int(d.group(1)) + width)):
                found.append(f"{a:#06x} {t} <- {body[j][0]:#06x} {body[j][1]}")
                break
    return found
