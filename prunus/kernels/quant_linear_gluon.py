"""Hopper (sm_90) int4 GEMM in Gluon: the weight tile dequantized while the previous tile's wgmma runs.

Why Gluon: in plain Triton the dequantized weight tile is a local value that Triton's pipeliner cannot double
buffer, so its loop waits for each wgmma before converting the next tile (offline TTGIR, Triton 3.6:
`warp_group_dot_wait {pendings = 0}`), and its automatic warp specialization does not take a loop with the
conversion in it (BENCHMARKS.md, "int4 GEMV at 1 row: one inline PTX block a word"). Gluon
(`triton.experimental.gluon`) exposes shared memory, TMA, mbarriers and async wgmma directly, so the schedule is
written out here:

- TMA brings the activation tile x [BLOCK_M, BLOCK_K] (bf16/fp16), the packed weight tile [BLOCK_N, BLOCK_K / 8]
  (int32 words, 8 codes each) and the step's scales and zero points into a ring of STAGES shared-memory stages,
  LOOKAHEAD steps ahead. (The group parameters came by plain loads at first: each step's conversion then waited
  out a global-memory latency, since the async-proxy fence below, MEMBAR.ALL.CTA in SASS, waits for every load in
  flight. H100: about 1000 cycles a step whatever the tile.)
- each step, every warp converts its share of the word tile in registers, one inline-PTX block a word (the
  codes as the magic floats 128 + q / 1024 + q, two a register, reordered into k order by PRMT, then
  (v - (128 + zero)) * scale by packed 16-bit ops: exact difference, one rounding, so the tile equals the
  dense fallback's weight bit for bit), and stores it into one of BUFFERS shared tiles;
- one async wgmma per step, acc [BLOCK_M, BLOCK_N] += x tile . W tile^T (the weight tile is the MMA's
  shared-memory B operand, read transposed), and `warpgroup_mma_wait(num_outstanding=1)`: the MMA of step j
  runs while step j + 1's tile is converted. Step 0 is peeled with use_acc=False: a zero-initialized
  accumulator entering the loop makes ptxas serialize every wgmma (C7515; the tests check this offline).

Synchronisation: one CTA-wide barrier a step, after the tile's stores, the async-proxy fence and the TMA issue.
When every warp has passed it at step j, every warp has waited (num_outstanding=1) for its MMAs up to step
j - 2. So at step j + 1 the shared tile written (BUFFERS = 3: the one MMA j - 2 read) and the stage refilled
(the one MMA j - 2 read, LOOKAHEAD = STAGES - 3 steps ahead) are free.

Split-K (SPLIT_K > 1): the K steps are split over programs whose fp32 partials meet in a workspace, as in
`quant_linear_triton` (the last to arrive writes the tile and re-zeroes the workspace).

Needs: a CUDA GPU of compute capability 9.x, Triton with Gluon's Hopper API (3.6 has it), uint8 zero points,
scales in x's dtype (bf16 or fp16), K a multiple of BLOCK_K, BLOCK_K dividing the group size, 16-byte aligned
rows for TMA (so K / group a multiple of 16 for the zero points). Anything else runs on the Triton kernels of
`quant_linear_triton`. Gluon has no interpreter: the kernel runs in tests on a Hopper GPU only
(tests/kernels/test_quant_linear.py, `-k wgmma`), and is compiled offline by one CPU test.
"""
from __future__ import annotations

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
except ImportError:  # a Triton without Gluon's Hopper API: the Triton kernels serve every shape
    gluon = None

# (v - zero') * scale on a register of two 16-bit codes, v = magic + q: exact difference, one rounding
_DEQUANT_PTX = """{{
.reg .b32 t0, t1, t2, t3, u;
lop3.b32 t0, $4, 0x000F000F, {magic}, 0xEA;
shr.u32 u, $4, 4;
lop3.b32 t1, u, 0x000F000F, {magic}, 0xEA;
shr.u32 u, $4, 8;
lop3.b32 t2, u, 0x000F000F, {magic}, 0xEA;
shr.u32 u, $4, 12;
lop3.b32 t3, u, 0x000F000F, {magic}, 0xEA;
prmt.b32 $0, t0, t1, 0x5410;
prmt.b32 $1, t2, t3, 0x5410;
prmt.b32 $2, t0, t1, 0x7632;
prmt.b32 $3, t2, t3, 0x7632;
sub.rn.{ty} $0, $0, $5;
sub.rn.{ty} $1, $1, $5;
sub.rn.{ty} $2, $2, $5;
sub.rn.{ty} $3, $3, $5;
mul.rn.{ty} $0, $0, $6;
mul.rn.{ty} $1, $1, $6;
mul.rn.{ty} $2, $2, $6;
mul.rn.{ty} $3, $3, $6;
}}"""
DEQUANT_BF16 = triton.language.constexpr(_DEQUANT_PTX.format(magic="0x43004300", ty="bf16x2"))
DEQUANT_FP16 = triton.language.constexpr(_DEQUANT_PTX.format(magic="0x64006400", ty="f16x2"))

CONFIGS = {  # name -> launch config; `int4_gemm_wgmma(..., config=...)` takes one of these dicts or its own
    "m128n128": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=5, num_warps=8),
    "m128n64": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, STAGES=5, num_warps=8),
    "m64n128": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, STAGES=5, num_warps=4),
    "m256n128": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, STAGES=4, num_warps=8),
    "m64n64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, STAGES=6, num_warps=4),
    # split-K: enough programs for the SMs with few row tiles
    "m64n128k4": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, STAGES=5, SPLIT_K=4, num_warps=4),
    "m128n128k2": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=5, SPLIT_K=2, num_warps=8),
}



if gluon is not None:

    @gluon.jit
    def _word_tile(words, zoff, scale2, FP16: gl.constexpr):
        """int32 words [BN, W] and per-row packed (magic + zero, scale) [BN, 1] -> the tile [BN, 8 W] (x dtype)."""
        asm: gl.constexpr = DEQUANT_FP16 if FP16 else DEQUANT_BF16
        o0, o1, o2, o3 = gl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r,r,r", [words, zoff, scale2],
                                                   dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True,
                                                   pack=1)
        # join stacks along a new last axis: pairs[..., i, j] = o[2 j + i], so this puts o0..o3 in k order
        pairs = gl.join(gl.join(o0, o2), gl.join(o1, o3))  # [BN, W, 2, 2]
        dtype: gl.constexpr = gl.float16 if FP16 else gl.bfloat16
        lo = pairs.to(gl.int16).to(dtype, bitcast=True)
        hi = (pairs >> 16).to(gl.int16).to(dtype, bitcast=True)
        tile = gl.join(lo, hi)  # [BN, W, 2, 2, 2]
        return gl.reshape(tile, [words.shape[0], words.shape[1] * 8])

    @gluon.jit
    def _group_params(ss, zs, layout: gl.constexpr, FP16: gl.constexpr):
        """This step's group parameters, from the first column of its stage's scale and zero tiles: per row the
        packed 16-bit pairs (magic + zero) twice and the scale twice (int32, [BN, 1] in `layout`)."""
        sc = ss.slice(0, 1, dim=1).load(layout).to(gl.int32) & 0xFFFF
        z = zs.slice(0, 1, dim=1).load(layout).to(gl.int32)
        magic: gl.constexpr = 0x64006400 if FP16 else 0x43004300
        return sc * 0x10001, (z * 0x10001) | magic

    @gluon.jit
    def _issue(descs, smem, bars, j, count, first, off_m, off_n, BLOCK_K: gl.constexpr, GROUP: gl.constexpr,
               STAGES: gl.constexpr):
        """TMA loads of this program's step j (the K step first + j) into stage j % STAGES (none past count): the
        activation tile, the word tile, and the scales and zero points of the step's group onwards (a TMA box is
        16 bytes wide at least; the kernel reads its first column)."""
        x_desc, w_desc, s_desc, z_desc = descs
        xs, ws, ss, zs = smem
        s = j % STAGES
        ok = j < count
        bar = bars.index(s)
        k = (first + j) * BLOCK_K
        nbytes: gl.constexpr = (x_desc.block_type.nbytes + w_desc.block_type.nbytes + s_desc.block_type.nbytes
                                + z_desc.block_type.nbytes)
        mbarrier.expect(bar, nbytes, pred=ok)
        _tma_load(x_desc, [off_m, k], bar, xs.index(s), pred=ok)
        _tma_load(w_desc, [off_n, k // 8], bar, ws.index(s), pred=ok)
        _tma_load(s_desc, [off_n, k // GROUP], bar, ss.index(s), pred=ok)
        _tma_load(z_desc, [off_n, k // GROUP], bar, zs.index(s), pred=ok)

    @gluon.jit
    def _step(descs, smem, tiles, bars, acc, j, count, first, off_m, off_n, use_acc, word_layout: gl.constexpr,
              GROUP: gl.constexpr, FP16: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
              BUFFERS: gl.constexpr, LOOKAHEAD: gl.constexpr):
        """Step j: convert the word tile into a shared tile, issue its wgmma, leave it in flight."""
        xs, ws, ss, zs = smem
        s = j % STAGES
        mbarrier.wait(bars.index(s), (j // STAGES) & 1)
        words = ws.index(s).load(word_layout)
        scale2, zoff = _group_params(ss.index(s), zs.index(s), word_layout, FP16)
        tile = _word_tile(words, zoff, scale2, FP16)
        buf = tiles.index(j % BUFFERS)
        buf.store(tile)
        fence_async_shared()
        # refill the stage step j - 3 used (every warp waited for that MMA before the barrier of step j - 1)
        _issue(descs, smem, bars, j + LOOKAHEAD, count, first, off_m, off_n, BLOCK_K, GROUP, STAGES)
        _cta_barrier()
        acc = warpgroup_mma(xs.index(s), buf.permute((1, 0)), acc, use_acc=use_acc, is_async=True)
        return warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))

    @gluon.jit
    def _int4_wgmma_kernel(x_desc, w_desc, s_desc, z_desc, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_ym,
                           GROUP: gl.constexpr, HAS_BIAS: gl.constexpr, FP16: gl.constexpr,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                           STAGES: gl.constexpr, SPLIT_K: gl.constexpr, num_warps: gl.constexpr):
        """y tile [BLOCK_M, BLOCK_N] over K / SPLIT_K (SPLIT_K divides K / BLOCK_K; see the module doc)."""
        BUFFERS: gl.constexpr = 3
        LOOKAHEAD: gl.constexpr = STAGES - 3
        gl.static_assert(LOOKAHEAD >= 1, "STAGES >= 4: the ring holds the steps in flight and those ahead")
        gl.static_assert(GROUP % BLOCK_K == 0, "BLOCK_K divides the group")
        W: gl.constexpr = BLOCK_K // 8
        dtype: gl.constexpr = gl.float16 if FP16 else gl.bfloat16

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
        tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype)

        descs = (x_desc, w_desc, s_desc, z_desc)
        smem = (gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout),
                gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, W], w_desc.layout),
                gl.allocate_shared_memory(s_desc.dtype, [STAGES] + s_desc.block_type.shape, s_desc.layout),
                gl.allocate_shared_memory(z_desc.dtype, [STAGES] + z_desc.block_type.shape, z_desc.layout))
        tiles = gl.allocate_shared_memory(dtype, [BUFFERS, BLOCK_N, BLOCK_K], tile_layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        for i in gl.static_range(LOOKAHEAD):
            _issue(descs, smem, bars, i, count, first, off_m, off_n, BLOCK_K, GROUP, STAGES)

        # step 0 peeled, use_acc=False: a zero-initialized accumulator entering the loop makes ptxas serialize the
        # wgmmas (C7515, "non wgmma instructions defining accumulator registers"), so none does
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, mma_layout)
        acc = _step(descs, smem, tiles, bars, acc, 0, count, first, off_m, off_n, False, word_layout, GROUP, FP16,
                    BLOCK_K, STAGES, BUFFERS, LOOKAHEAD)
        for j in range(1, count):
            acc = _step(descs, smem, tiles, bars, acc, j, count, first, off_m, off_n, True, word_layout, GROUP, FP16,
                        BLOCK_K, STAGES, BUFFERS, LOOKAHEAD)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        offs_m = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        if SPLIT_K == 1:
            _write(acc, offs_m, offs_n, mask, b_ptr, y_ptr, N, stride_ym, HAS_BIAS)
        else:
            # the partials meet in a zeroed fp32 workspace; the last split to arrive writes the tile and zeroes its
            # workspace and counter for the next launch (quant_linear_triton's split-K protocol)
            partial = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
            gl.atomic_add(partial, acc, mask=mask, sem="relaxed")
            _cta_barrier()  # every thread's partial is in before this program counts itself in
            tile = pid_m * gl.num_programs(1) + pid_n
            arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = gl.load(partial, mask=mask, other=0.0, cache_modifier=".cg")
                _cta_barrier()
                gl.store(partial, gl.zeros_like(total), mask=mask)
                gl.atomic_xchg(cnt_ptr + tile, 0)
                _write(total, offs_m, offs_n, mask, b_ptr, y_ptr, N, stride_ym, HAS_BIAS)

    @gluon.jit
    def _write(acc, offs_m, offs_n, mask, b_ptr, y_ptr, N, stride_ym, HAS_BIAS: gl.constexpr):
        """acc [BLOCK_M, BLOCK_N] (fp32) + bias -> y in its dtype."""
        if HAS_BIAS:
            acc = acc + gl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[None, :]
        gl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def available(x: torch.Tensor) -> bool:
    """Whether this GPU and Triton can run the kernel (Hopper, Gluon's Hopper API)."""
    return gluon is not None and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9


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


def _programs(config: dict, M: int, N: int) -> int:
    return triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]) * config.get("SPLIT_K", 1)


def _blocks(config: dict, dtype: torch.dtype) -> list:
    """(element type, TMA block shape, shared layout) of the x, word, scale and zero-point descriptors. The scale
    and zero boxes are 16 bytes wide (TMA's least) and unswizzled, so that the kernel can read their first column."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    x_type = gl.float16 if dtype == torch.float16 else gl.bfloat16
    return [(x_type, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], x_type)),
            (gl.int32, [bn, bk // 8], gl.NVMMASharedLayout.get_default_for([bn, bk // 8], gl.int32)),
            (gl.int16, [bn, 8], gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)),
            (gl.uint8, [bn, 16], gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2))]


def unfit(x, words, scales, zeros, group: int, config: dict) -> str | None:
    """Why the kernel cannot take these tensors with `config` (None: it can)."""
    K = x.shape[1]
    if x.dtype not in (torch.bfloat16, torch.float16):
        return "x must be bf16 or fp16"
    if scales.dtype != x.dtype or zeros is None or zeros.dtype.is_floating_point:
        return "needs scales in x's dtype and integer zero points"
    if K % config["BLOCK_K"] or group % config["BLOCK_K"]:
        return f"BLOCK_K={config['BLOCK_K']} must divide K and the group size"
    if (K // config["BLOCK_K"]) % config.get("SPLIT_K", 1):
        return f"SPLIT_K={config.get('SPLIT_K', 1)} must divide the {K // config['BLOCK_K']} K steps"
    if zeros.dtype != torch.uint8:
        return "needs uint8 zero points"
    for t in (x, words, scales, zeros):  # TMA: 16-byte aligned base and rows, contiguous along K
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return "TMA needs 16-byte aligned, contiguous rows (x, weights, scales and zero points: K / group a multiple of 16)"
    return None


def int4_gemm_wgmma(x, words, scales, zeros, bias, group: int, config: dict) -> torch.Tensor:
    """y [M, N] = x [M, K] . W^T (+ bias) for int4 words [N, K / 8] (int32), on the Gluon kernel."""
    reason = unfit(x, words, scales, zeros, group, config)
    if reason:
        raise ValueError(reason)
    M, K = x.shape
    N = words.shape[0]
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    descs = [TensorDescriptor.from_tensor(t, block, layout) for t, (_, block, layout)
             in zip((x, words, scales.view(torch.int16), zeros), _blocks(config, x.dtype))]
    split_k = config.get("SPLIT_K", 1)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split_k)
    ws, cnt = _split_k_workspace(x.device, M * N if split_k > 1 else 0, grid[0] * grid[1])
    _int4_wgmma_kernel[grid](*descs, bias if bias is not None else y, y, ws, cnt, M, N, K, y.stride(0),
                             GROUP=group, HAS_BIAS=bias is not None, FP16=x.dtype == torch.float16,
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=config["STAGES"], SPLIT_K=split_k,
                             num_warps=config["num_warps"])
    return y


def compile_for(config: dict, arch: int = 90, dtype: torch.dtype = torch.bfloat16, group: int = 128):
    """Compile the kernel for `arch` without a GPU (for inspection: PTX, SASS, shared memory): a Triton
    CompiledKernel. Used by `benchmarks/sass_count.py --kernel wgmma` and by the tests, which check on the CPU
    that ptxas keeps the wgmmas asynchronous."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    ty = "fp16" if dtype == torch.float16 else "bf16"
    fn = _int4_wgmma_kernel
    consts = dict(GROUP=group, HAS_BIAS=False, FP16=dtype == torch.float16, BLOCK_M=config["BLOCK_M"],
                  BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], STAGES=config["STAGES"],
                  SPLIT_K=config.get("SPLIT_K", 1), num_warps=config["num_warps"])
    descs = dict(zip(("x_desc", "w_desc", "s_desc", "z_desc"), _blocks(config, dtype)))
    names = {gl.float16: "fp16", gl.bfloat16: "bf16", gl.int32: "i32", gl.int16: "i16", gl.uint8: "u8"}
    pointers = dict(b_ptr=f"*{ty}", y_ptr=f"*{ty}", ws_ptr="*fp32", cnt_ptr="*i32")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in descs:
            elem, block, layout = descs[name]
            signature[name] = f"tensordesc<{names[elem]}[{', '.join(map(str, block))}],{layout!r}>"
        elif name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        else:
            signature[name] = pointers.get(name, "i32")
            if name in pointers or name in ("N", "K", "stride_ym"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=config["num_warps"]))
