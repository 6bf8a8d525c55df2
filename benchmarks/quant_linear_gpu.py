"""Quantized linear ops on the GPU against bf16 `F.linear` (cuBLAS), with achieved bandwidth.

    python benchmarks/quant_linear_gpu.py [--explore] [--report PATH]
    python benchmarks/quant_linear_gpu.py --sweep 1,64,256 [--sweep-shapes 4096x4096] [--sweep-log PATH]
        [--sweep-table prunus/kernels/measured_configs.json] [--sweep-wgmma | --sweep-wgmma-rs | --sweep-gemv-mma]
        [--sweep-only W_TMA=1]
    python benchmarks/quant_linear_gpu.py --table-from-log LOG --device-name NAME --sweep-table PATH

Times `torch.ops.prunus.linear_int4` (group 128) at M = 1, 16, 64, 128, 256 rows and `linear_int8` at M = 1, 16, 64, 256
for the Llama-3-8B projection shapes, bf16 activations. Each figure is the median over 20 replays of a CUDA
graph that calls the op on R copies of the weights (R x weight bytes >= 3 x the L2 cache), divided by R:
the weights come from device memory as in a real decode step, and no CPU launch overhead is counted (as
in a graph-captured decode loop). cuBLAS is timed the same way in the same run. Bandwidth counts the op's
compulsory bytes (packed weights + scales + zeros + activations in + outputs out) against the 3.0 TB/s
device-copy ceiling measured on the H100. `--explore` also times every int4 kernel path (GEMV, tensor-core
GEMM, dequantize + cuBLAS) at M = 1..1024: the dispatch thresholds in `prunus.kernels.quant_linear` come
from that table. `--sweep` times every candidate launch config of the int4 GEMV (M = 1) or tensor-core kernel
(M > 1) explicitly, without the autotuner, and prints the best five per shape and M: the autotuner's config
lists in `prunus.kernels.quant_linear_triton` come from it, and `--sweep-table` merges each shape's winner into
the table of measured configs the ops use as is (`measured_configs.json`, keyed by the GPU's name).
`--table-from-log` does the same from a `--sweep-log` file, offline. `--sweep-wgmma`, `--sweep-wgmma-rs` (the weight
as the register operand) and `--sweep-gemv-mma` sweep the Gluon kernels instead (`prunus.kernels.quant_linear_gluon`);
their winners enter the table only where they beat the op's Triton path, timed in the same run. `--sweep-only
KEY=V,...` times the configs with those values only; with `--sweep-table` the table's entry for each shape and M is
timed too, so a subset's winner replaces it only where it is faster in the same run. Each shape and M of a sweep
runs in a worker process (`benchmarks/_isolate.py`): a config whose launch fails (the CUDA context is lost with it)
or that hangs is left out, reported, and the bucket runs again without it.
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunus.kernels as pk  # noqa: E402
from benchmarks._isolate import TRY, announce, measure, run_isolated  # noqa: E402
from benchmarks._report import append, markdown_table  # noqa: E402

try:  # the `bench` extra; on the GPU machine: pip install --no-deps --target DIR torchao-*.whl
    import torchao
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
except ImportError:
    torchao = quantize_ = None

SWEEP_WORKER_TIMEOUT = 600  # seconds for one --sweep bucket (compiling every candidate included): beyond it, a hang
COPY_CEILING = 3.0e12  # bytes/s, device-to-device copy (read + write) on the H100
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features K, out_features N)
GROUP = 128
# entered in the table only where they beat the Triton path
GLUON_KERNELS = ("int4_wgmma", "int4_gemv_mma", "int8_wgmma")


def copies(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, math.ceil(3 * l2 / nbytes))


def graph_us(fn, sets, reps: int = 20) -> float:
    """Median time of one fn(*args) call, args rotating over `sets`, from CUDA-graph replays."""
    for args in sets:  # warm-up: autotuning, workspaces, caches
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in sets:
            fn(*args)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(sets))
    return statistics.median(times)


def int4_weight(n, k, gen):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda", generator=gen)
    scales = (torch.rand(n, k // GROUP, device="cuda", generator=gen) * 0.02 + 0.005).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (n, k // GROUP), dtype=torch.uint8, device="cuda", generator=gen)
    return pk.pack_int4(q), scales, zeros


def int8_weight(n, k, gen):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=gen)
    return q, (torch.rand(n, device="cuda", generator=gen) * 0.01 + 0.001).to(torch.bfloat16)


def rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Case:
    """One weight shape: R copies of the quantized weight and of its dense bf16 twin, activations per M."""

    def __init__(self, scheme, k, n, gen):
        self.k, self.n, self.gen = k, n, gen
        make = (lambda: int4_weight(n, k, gen)) if scheme == "int4" else (lambda: int8_weight(n, k, gen))
        first = make()
        self.qbytes = nbytes(*first)
        self.quant = [first] + [make() for _ in range(copies(self.qbytes) - 1)]
        dense = pk.dequantize_int4(*first, GROUP) if scheme == "int4" else pk.dequantize_int8(*first)
        self.dense = [dense] + [dense.clone() for _ in range(copies(nbytes(dense)) - 1)]
        self.ref_weight = dense.float()

    def torchao_linears(self):
        """R copies of an nn.Linear quantized by torchao (int4 weight-only, group 128, tinygemm's tile-packed
        layout: the `aten._weight_int4pack_mm` kernel gpt-fast also uses), or None without torchao."""
        if quantize_ is None:
            return None
        linears = []
        for _ in range(len(self.quant)):
            lin = torch.nn.Linear(self.k, self.n, bias=False, device="cuda", dtype=torch.bfloat16)
            quantize_(lin, Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d"))
            linears.append(lin)
        return linears

    def time_torchao(self, linears, m):
        return graph_us(lambda x, lin: lin(x), list(zip(self.x(m, len(linears)), linears)))

    def x(self, m, count):
        return [torch.randn(m, self.k, device="cuda", dtype=torch.bfloat16, generator=self.gen) for _ in range(count)]

    def time_quant(self, fn, m):
        xs = self.x(m, len(self.quant))
        return graph_us(fn, [(x, *w) for x, w in zip(xs, self.quant)])

    def time_dense(self, m):
        xs = self.x(m, len(self.dense))
        return graph_us(lambda x, w: F.linear(x, w), list(zip(xs, self.dense)))

    def error(self, fn, m):
        x = self.x(m, 1)[0]
        return rel_err(fn(x, *self.quant[0]), F.linear(x.float(), self.ref_weight))

    def row(self, fn, m, ao_linears=None):
        t_q, t_d = self.time_quant(fn, m), self.time_dense(m)
        t_ao = self.time_torchao(ao_linears, m) if ao_linears else None
        moved_q = self.qbytes + 2 * m * (self.k + self.n)
        moved_d = self.n * self.k * 2 + 2 * m * (self.k + self.n)
        return [f"{self.k}->{self.n}", m, f"{t_q:.1f}",
                f"{moved_q / t_q / 1e3:.0f} ({moved_q / t_q * 1e6 / COPY_CEILING:.0%})", f"{t_d:.1f}",
                f"{moved_d / t_d / 1e3:.0f}", f"{t_d / t_q:.2f}x",
                "-" if t_ao is None else f"{t_ao:.1f}", "-" if t_ao is None else f"{t_ao / t_q:.2f}x",
                f"{self.error(fn, m):.1e}"]


def int4_op(x, qw, s, z):
    return torch.ops.prunus.linear_int4(x, qw, s, z, None, GROUP)


def triton_path(x, qw, s, z):
    """The op's path without the wgmma kernel: the Triton tensor-core kernel up to 256 rows (its measured or
    autotuned config), else dequantize + cuBLAS."""
    from prunus.kernels import quant_linear_triton as qt

    if x.shape[0] <= pk.quant_linear.INT4_GEMM_NO_CACHE_MAX_ROWS:
        return qt.int4_gemm(x, qw, s, z, None, GROUP)
    return F.linear(x, qt.int4_dequantize(qw, s, z, GROUP, x.dtype))


def wgmma_op(x, qw, s, z, bias, group, cfg):
    """The Gluon wgmma kernel with an explicit config (the sweep's)."""
    from prunus.kernels import quant_linear_gluon as qg

    return qg.int4_gemm_wgmma(x, qw.view(torch.int32), s, z, bias, group, cfg)


def few_rows_path(x, qw, s, z):
    """The op's path at few rows without the tensor-core GEMV: the Triton GEMV at 1 row, the Triton tensor-core
    kernel above (measured or autotuned configs)."""
    from prunus.kernels import quant_linear_triton as qt

    if x.shape[0] <= pk.quant_linear.INT4_GEMV_MAX_ROWS:
        return qt.int4_gemv(x, qw, s, z, None, GROUP)
    return qt.int4_gemm(x, qw, s, z, None, GROUP)


def gemv_mma_op(x, qw, s, z, bias, group, cfg):
    """The Gluon tensor-core GEMV with an explicit config (the sweep's)."""
    from prunus.kernels import quant_linear_gluon as qg

    return qg.int4_gemv_mma(x, qw.view(torch.int32), s, z, bias, group, cfg)


def int8_op(x, q, s):
    return torch.ops.prunus.linear_int8(x, q, s, None)


def main_rows(gen):
    rows = []
    for scheme, op, ms in (("int4", int4_op, [1, 16, 64, 128, 256]), ("int8", int8_op, [1, 16, 64, 128, 256])):
        for k, n in SHAPES:
            case = Case(scheme, k, n, gen)
            ao_linears = case.torchao_linears() if scheme == "int4" else None
            for m in ms:
                rows.append([scheme] + case.row(op, m, ao_linears))
                print(rows[-1], flush=True)
            del case
    return rows


def explore(gen):
    """Every int4 path at every row count (µs), plus the other ops at M = 1, 16, 256."""
    from prunus.kernels import quant_linear_triton as qt

    rows = []
    for k, n in SHAPES:
        case = Case("int4", k, n, gen)
        for m in [1, 2, 4, 16, 32, 64, 256, 512, 1024]:
            paths = {"gemm": lambda x, qw, s, z: qt.int4_gemm(x, qw, s, z, None, GROUP)}
            if m <= 2:
                paths = {"gemv": lambda x, qw, s, z: qt.int4_gemv(x, qw, s, z, None, GROUP), **paths}
            if m in (1, 256, 512, 1024):  # the op's path when the dense-weight cache is off or full
                paths["dequant+cublas"] = lambda x, qw, s, z: F.linear(x, qt.int4_dequantize(qw, s, z, GROUP, x.dtype))
            row = [f"{k}->{n}", m, f"cublas {case.time_dense(m):.1f}"]
            for name, fn in paths.items():
                row.append(f"{name} {case.time_quant(fn, m):.1f} ({case.error(fn, m):.0e})")
            rows.append(row)
            print(" | ".join(map(str, row)), flush=True)
        del case
    for tuned in (qt._int4_gemv_tuned, qt._int4_gemm_tuned):
        for key, cfg in tuned.cache.items():
            print("best", tuned.fn.__name__, key[:4], cfg, flush=True)
    other = []
    k, n = 4096, 14336
    q8, s8 = int8_weight(n, k, gen)
    smooth = (torch.rand(k, device="cuda", generator=gen) + 0.5).to(torch.bfloat16)
    f8 = (torch.randn(n, k, device="cuda", generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    w = pk.dequantize_int8(q8, s8)
    for m in (1, 16, 256):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        for name, fn, ref in [
                ("w8a8", lambda: torch.ops.prunus.linear_w8a8(x, q8, s8, smooth, None),
                 F.linear(x.float() / smooth.float(), w.float())),
                ("fp8", lambda: torch.ops.prunus.linear_fp8(x, f8, s8, None),
                 F.linear(x.float(), f8.float() * s8.float()[:, None])),
                ("bf16", lambda: F.linear(x, w), F.linear(x.float(), w.float()))]:
            other.append([f"{k}->{n}", name, m, f"{graph_us(fn, [()] * 4):.1f}", f"{rel_err(fn(), ref):.1e}"])
            print(other[-1], flush=True)
    return rows, other


def sweep_configs(kind: str, m: int) -> list[dict]:
    """Candidate launch configs for `--sweep` (kernel block sizes + num_warps/num_stages)."""
    out = []
    if kind == "gemv_mma":  # the Gluon tensor-core GEMV: rows a warp, warps, split-K, zero point in or after the MMA
        from prunus.kernels import quant_linear_gluon as qg

        out = [dict(cfg, ONES=1) for cfg in qg.GEMV_CONFIGS.values()]
        few = [cfg for cfg in qg.GEMV_CONFIGS.values() if cfg["REPS"] <= 2 and cfg["num_warps"] == 4]
        out += [dict(cfg, ONES=0) for cfg in few] + [dict(cfg, ONES=1, AHEAD=2) for cfg in few]
        # the words by TMA through a ring of STAGES stages (`_int4_gemv_tma_kernel`)
        tma = [dict(REPS=reps, SPLIT_K=sk, num_warps=4, ONES=ones, STAGES=stages)
               for reps, sk in [(1, 4), (1, 8), (1, 16), (2, 2), (2, 4), (2, 8), (2, 16)]
               for stages in (4, 8, 12) for ones in (0, 1)]
        # XP=1: x by TMA with the words and the group parameters from tables in shared memory (no global load in
        # the loop); also 4 warps of 4 REPS (256 outputs a program) and 8 warps
        xp = [dict(cfg, XP=1) for cfg in tma] + [dict(REPS=r, SPLIT_K=sk, num_warps=w, ONES=0, STAGES=st, XP=1)
                                                 for r, w in [(4, 4), (2, 8)] for sk in (4, 8, 16) for st in (4, 8)]
        return out + tma + xp
    if kind == "wgmma_rs":  # the Gluon kernel with the weight as the register operand: rows of x a tile, warp
        # groups (64 outputs each), split-K; the ring as deep as 1, 2 or 3 programs an SM leave room for (<= 8)
        for bt in (64, 128, 256):
            for warps in (4, 8):
                for sk in (1, 2, 4):
                    if bt > max(64, 2 * m) or (sk > 1 and bt * 2 < m):
                        continue
                    for stages in sorted({min(8, 220 * 1024 // (c * bt * 128)) for c in (1, 2, 3)} - {0, 1}):
                        out.append(dict(BLOCK_T=bt, STAGES=stages, SPLIT_K=sk, num_warps=warps))
                    if warps == 4 and bt < 256:  # REPS=2: 128 outputs a warp group share each x tile (2 an SM)
                        out.append(dict(BLOCK_T=bt, STAGES=min(8, 110 * 1024 // (bt * 128)), SPLIT_K=sk, REPS=2,
                                        num_warps=4))
        # AHEAD=1: each step's conversion overlaps the previous step's MMA inside the program too (not with REPS=2
        # and 128 rows or more: two A tiles and two steps' words then spill, offline)
        out += [dict(cfg, AHEAD=1) for cfg in out if cfg.get("REPS", 1) == 1 or cfg["BLOCK_T"] == 64]
        # W_TMA=1: the words by TMA with x, through the ring, instead of loaded one step ahead into registers;
        # with P_SMEM=1 also the group parameters from a table in shared memory: no global load left in the loop
        w_tma = [dict(cfg, W_TMA=1) for cfg in out]
        w_tma_p = [dict(cfg, P_SMEM=1) for cfg in w_tma]
        # SLOTS=1: split-K partials by plain stores into a slot a split instead of atomic adds (`_finish_slots`)
        slots = [dict(cfg, SLOTS=1) for cfg in w_tma_p if cfg["SPLIT_K"] > 1]
        # WS=2, 3: warp-specialized, consumer warp groups taking turns at the K steps; one program an SM, the ring
        # as deep (<= 8) as 227 KB leave beside the consumers' partials and a full parameter table (32 KB)
        # (WS_K=128: two k steps of 64 a stage, so a stage takes twice the bytes)
        ws = [dict(BLOCK_T=bt, STAGES=stages, SPLIT_K=sk, W_TMA=1, P_SMEM=1, WS=n_ws, num_warps=4, **slot, **wide)
              for bt in (64, 128, 256) for n_ws in (2, 3) for sk in (1, 2, 4) for slot in ({}, dict(SLOTS=1))
              for wide in ({}, dict(WS_K=128))
              if bt <= max(64, 2 * m) and not (sk > 1 and bt * 2 < m) and (sk > 1 or not slot)
              and (stages := min(8, (227 * 1024 - (n_ws - 1) * 256 * bt - 33 * 1024)
                                 // ((bt * 128 + 2048) * (2 if wide else 1)))) >= 2]
        return out + w_tma + w_tma_p + slots + ws
    if kind == "wgmma":  # the Gluon kernel (Hopper): tiles, ring depth, split-K; shared memory <= 227 KB
        for bm in (64, 128, 256):
            for bn in (64, 128):
                for stages in (4, 5, 6):
                    smem = stages * (bm * 64 * 2 + bn * 32) + 3 * bn * 64 * 2  # x and word stages, 3 tiles
                    if bm > max(64, 2 * m) or smem > 220 * 1024:
                        continue
                    for sk in (1, 2, 4):
                        if sk > 1 and bm * 2 < m:
                            continue  # split-K is for few row tiles
                        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, STAGES=stages, SPLIT_K=sk,
                                        num_warps=4 if bm == 64 else 8))
        return out
    if kind == "gemv":  # the int4 GEMV: whole groups per step
        for bn in (8, 16, 32, 64):
            for groups in (2, 4, 8):
                for sk in (1, 2, 4):
                    for pf in (0, 1):
                        out.append(dict(BLOCK_N=bn, GROUPS=groups, SPLIT_K=sk, PREFETCH=pf,
                                        num_warps=8 if bn * groups >= 256 else 4))
        # the instruction-count variants (see _int4_gemv_kernel) on the last sweep's winners, and PAIRS at the
        # wider row blocks where it needs fewest instructions a code (offline SASS counts)
        for bn, groups, sk, pf in [(8, 4, 1, 1), (64, 2, 4, 1), (8, 8, 1, 0), (16, 4, 1, 1), (32, 2, 4, 1),
                                   (16, 8, 1, 1)]:
            for variant in (dict(MASKREG=1), dict(PAIRS=1)):
                out.append(dict(BLOCK_N=bn, GROUPS=groups, SPLIT_K=sk, PREFETCH=pf, **variant, num_warps=4))
        # and ASM, the fields and their FMAs in one PTX block a word (fewest instructions a code offline)
        for bn, groups, sk, warps in [(8, 4, 1, 4), (16, 4, 1, 4), (32, 2, 4, 4), (64, 1, 4, 4), (64, 2, 4, 4),
                                      (64, 2, 1, 4), (128, 1, 2, 4), (128, 1, 4, 4), (128, 1, 8, 4), (128, 2, 4, 8),
                                      (256, 1, 4, 8), (256, 1, 8, 8), (32, 4, 2, 4)]:
            for pf in (0, 1):
                for variant in (dict(PAIRS=1), dict(ASM=1)):
                    out.append(dict(BLOCK_N=bn, GROUPS=groups, SPLIT_K=sk, PREFETCH=pf, **variant, num_warps=warps))
        # STAGES: the loads pipelined through shared memory (async copies) instead of registers
        for bn, groups, sk in [(8, 4, 1), (16, 4, 1), (8, 8, 1), (32, 2, 4), (64, 2, 4), (64, 1, 8), (128, 1, 4),
                               (128, 1, 8), (32, 4, 2), (64, 2, 8)]:
            for stages in (2, 3, 4):
                for variant in (dict(ASM=1), dict(PAIRS=1)):
                    out.append(dict(BLOCK_N=bn, GROUPS=groups, SPLIT_K=sk, STAGES=stages, **variant, num_warps=4))
        return out
    for bm in (16, 32, 64, 128, 256):
        if bm > max(16, m) or (bm == 16 and m >= 64):
            continue
        for bn in (64, 128, 256):
            if bm * bn > 256 * 128:
                continue
            for sk in (1, 2, 4):
                for dq in (0, 1, 2, 3):
                    big = bm * bn >= 128 * 128
                    out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64 if big else 128, SPLIT_K=sk, DEQUANT=dq,
                                    num_warps=8 if big else 4, num_stages=3 if big else 4))
    if m <= 16:  # 16-row tiles: narrower weight blocks and deeper splits fill the GPU
        for bn, sk, dq in [(32, 4, 0), (32, 8, 0), (32, 4, 2), (32, 8, 2), (64, 8, 0), (64, 8, 2), (128, 4, 2),
                           (64, 8, 3), (32, 8, 3)]:
            out.append(dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=sk, DEQUANT=dq, num_warps=4, num_stages=4))
    if m <= 64:  # small tiles: narrower weight blocks, deeper splits, other pipeline depths and warp counts
        for bm, bn, bk, sk, dq, warps, stages in [
                (64, 32, 128, 4, 0, 4, 4), (64, 32, 128, 8, 0, 4, 4), (64, 64, 128, 8, 0, 4, 4),
                (64, 64, 64, 4, 0, 4, 4), (64, 64, 64, 8, 0, 4, 5), (64, 64, 128, 4, 0, 4, 3),
                (64, 64, 128, 4, 0, 4, 5), (64, 64, 128, 4, 0, 8, 4), (64, 64, 128, 4, 0, 2, 4),
                (64, 64, 128, 4, 1, 8, 4), (64, 128, 64, 4, 0, 4, 4), (64, 128, 64, 8, 0, 8, 4),
                (32, 64, 128, 8, 0, 4, 4), (32, 128, 128, 4, 0, 4, 4), (64, 64, 256, 4, 0, 4, 3),
                (64, 32, 128, 8, 2, 4, 4), (64, 64, 128, 8, 2, 4, 4), (64, 64, 64, 4, 2, 4, 4),
                (64, 128, 64, 8, 2, 8, 4), (64, 64, 64, 4, 3, 4, 4), (64, 64, 64, 2, 3, 4, 4),
                (64, 64, 64, 4, 2, 4, 3), (64, 64, 64, 4, 3, 4, 3), (64, 32, 64, 4, 3, 4, 4),
                (64, 64, 128, 4, 3, 4, 3), (64, 128, 64, 4, 3, 8, 3)]:
            if bm <= max(16, m):
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, DEQUANT=dq, num_warps=warps,
                                num_stages=stages))
    # the weight as the MMA's shared-memory operand (W_AS_B): DEQUANT 1 and 3, 64-row tiles and up
    out += [dict(cfg, W_AS_B=1) for cfg in out if cfg["DEQUANT"] in (1, 3) and cfg["BLOCK_M"] >= 64]
    if m >= 128:  # 128-row W_AS_B tiles on 4 warps: two programs an SM (registers), one dequantizing while the
        # other's MMAs run
        for bn, bk, sk, dq, stages in [(128, 64, 1, 3, 3), (128, 64, 2, 3, 3), (128, 64, 4, 3, 3), (128, 128, 1, 3, 2),
                                       (128, 64, 1, 1, 3), (128, 64, 1, 3, 4)]:
            out.append(dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, DEQUANT=dq, W_AS_B=1, num_warps=4,
                            num_stages=stages))
    return out


def merge_winners(path: str, device: str, winners: dict, drop=()) -> None:
    """Merge {(kernel, shape key): config} into the measured-config table at `path` under `device`, after removing
    the entries (kernel, shape key) in `drop` (a sweep's buckets, whose winners come back in `winners`)."""
    table = json.loads(open(path).read()) if os.path.exists(path) else {}
    for kernel, key in drop:
        table.get(device, {}).get(kernel, {}).pop(key, None)
    for (kernel, key), cfg in winners.items():
        table.setdefault(device, {}).setdefault(kernel, {})[key] = cfg
    lines = []  # one config a line, sorted: reviewable diffs
    for device in sorted(table):
        kernels = [f'  "{kernel}": {{\n' + ",\n".join(
            f"    {json.dumps(key)}: {json.dumps(cfg, sort_keys=True)}" for key, cfg in sorted(entries.items()))
            + "\n  }" for kernel, entries in sorted(table[device].items())]
        lines.append(f"{json.dumps(device)}: {{\n" + ",\n".join(kernels) + "\n}")
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    json.loads(text)
    with open(path, "w") as f:
        f.write(text)


def winner_entry(k: int, n: int, m: int, cfg: dict) -> tuple:
    from prunus.kernels.quant_linear_triton import shape_key

    kernel = ("int4_wgmma" if "STAGES" in cfg and ("BLOCK_M" in cfg or "BLOCK_T" in cfg)
              else "int4_gemv_mma" if "REPS" in cfg else "int4_gemv" if m == 1 else "int4_gemm")
    return (kernel, shape_key(m, n, k, GROUP)), cfg


def current_entry(table_path, device: str, kind: str, k: int, n: int, m: int) -> dict | None:
    """The measured table's entry for this sweep kind's kernel, shape and row bucket on `device`, if any."""
    from prunus.kernels.quant_linear_triton import shape_key

    if not table_path or not os.path.exists(table_path):
        return None
    kernel = dict(wgmma="int4_wgmma", wgmma_rs="int4_wgmma", gemv_mma="int4_gemv_mma", gemv="int4_gemv",
                  gemm="int4_gemm")[kind]
    table = json.loads(open(table_path).read()).get(device, {})
    return table.get(kernel, {}).get(shape_key(m, n, k, GROUP))


def table_from_log(log_path: str) -> dict:
    """The fastest finite config per (shape, M) of a `--sweep-log` file."""
    import ast

    best: dict = {}
    for line in open(log_path):
        shape, m, t, rest = line.split(" ", 3)
        cfg = ast.literal_eval(rest[:rest.rindex("}") + 1])
        k, n = (int(v) for v in shape.split("->"))
        m, t = int(m[2:]), float(t)
        # MMA_LAYOUT: a removed kernel that logs before 2026-12-06 hold (BENCHMARKS.md, "on the MMA layout")
        kernel = winner_entry(k, n, m, cfg)[0][0]
        if kernel in GLUON_KERNELS:  # their entries need the Triton path's time of the same run: --sweep-table only
            continue
        if math.isfinite(t) and "MMA_LAYOUT" not in cfg and t < best.get((kernel, k, n, m), (math.inf,))[0]:
            best[(kernel, k, n, m)] = (t, cfg)
    return dict(winner_entry(k, n, m, cfg) for (_, k, n, m), (_, cfg) in best.items())


def sweep(gen, ms, out_path, shapes=SHAPES, table_path=None, only=None, gluon=None, skip=()):
    """Time every candidate config of the int4 kernels explicitly (no autotuner): the config lists in
    `prunus.kernels.quant_linear_triton` come from this table. Prints the best five per shape and M.
    gluon: "wgmma" or "gemv_mma", that Gluon kernel's configs (`prunus.kernels.quant_linear_gluon`) instead of the
    Triton kernels'; its winner enters the table only where it beats the op's Triton path, timed in the same run.
    skip: configs left out (a worker's, `main`); each candidate is announced before it runs (`_isolate`)."""
    from prunus.kernels import quant_linear_triton as qt

    if gluon:
        from prunus.kernels import quant_linear_gluon as qg
    log = open(out_path, "a") if out_path else None
    for k, n in shapes:
        case = Case("int4", k, n, gen)
        for m in ms:
            kind = gluon or ("gemv" if m == 1 else "gemm")
            run = dict(gemv=qt.int4_gemv, gemm=qt.int4_gemm, wgmma=wgmma_op, wgmma_rs=wgmma_op,
                       gemv_mma=gemv_mma_op)[kind]
            results = []
            kernel = dict(wgmma=lambda: qg._int4_wgmma_kernel, wgmma_rs=lambda: qg._int4_wgmma_rs_kernel,
                          gemv_mma=lambda: qg._int4_gemv_mma_kernel,
                          gemv=lambda: qt._int4_gemv_kernel, gemm=lambda: qt._int4_gemm_kernel)[kind]()
            defaults = {p.name: p.default for p in kernel.params if p.default is not inspect.Parameter.empty}
            configs = [cfg for cfg in sweep_configs(kind, m)
                       if all(cfg.get(key, defaults.get(key)) in values for key, values in (only or {}).items())]
            current = current_entry(table_path, torch.cuda.get_device_name(), kind, k, n, m) if only else None
            if current and current not in configs:  # a subset's winner must beat the entry it would replace
                configs.append(current)
            for cfg in configs:
                if cfg in skip:
                    continue
                announce(cfg)
                fn = lambda x, qw, s, z, cfg=cfg: run(x, qw, s, z, None, GROUP, cfg)  # noqa: E731
                t, err = measure(case, fn, m)
                results.append((t, cfg, err))
                if log:
                    print(f"{k}->{n} M={m} {t:.2f} {cfg} {err}", file=log, flush=True)
            if not results:
                print(f"\n{k}->{n} M={m}: no {kind} config has {only}", flush=True)
                continue
            t_d = case.time_dense(m)
            results.sort(key=lambda r: r[0])
            # a Gluon kernel enters the table only where it beats the op's Triton path (wgmma: the tensor-core
            # kernel up to 256 rows, dequantize + cuBLAS beyond; gemv_mma: the GEMV at 1 row, the tensor-core kernel
            # above), timed here in the same run, and only within the op's row range for it
            gemm = kind in ("wgmma", "wgmma_rs")
            t_old = (case.time_quant(triton_path, m) if gemm else case.time_quant(few_rows_path, m)
                     if kind == "gemv_mma" else math.inf)
            ql = pk.quant_linear
            usable = (m >= ql.INT4_WGMMA_MIN_ROWS if gemm else m <= ql.INT4_GEMV_MMA_MAX_ROWS
                      if kind == "gemv_mma" else True)
            right = [r for r in results if math.isfinite(r[0]) and isinstance(r[2], float) and r[2] < 1e-2]
            if table_path and usable and right and right[0][0] < t_old:  # the fastest config whose output is right
                merge_winners(table_path, torch.cuda.get_device_name(), dict([winner_entry(k, n, m, right[0][1])]))
            if gluon:
                print(f"\n{k}->{n} M={m}: Triton path {t_old:.1f} µs ({t_d / t_old:.2f}x bf16)", flush=True)
            print(f"\n{k}->{n} M={m}: bf16 {t_d:.1f} µs; best:", flush=True)
            for t, cfg, err in results[:5]:
                print(f"  {t:.1f} µs ({t_d / t:.2f}x bf16) {cfg} err {err}", flush=True)
        del case


def _without(argv: list, *flags: str) -> list:
    """argv less these options and their values ("--flag value" or "--flag=value")."""
    out, drop = [], False
    for a in argv:
        if drop:
            drop = False
        elif a in flags:
            drop = True
        elif not a.startswith(tuple(f + "=" for f in flags)):
            out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--explore", action="store_true", help="also time each int4 kernel path at M = 1..256")
    ap.add_argument("--sweep", default=None, help="time every candidate int4 config at these M (e.g. 1,64) and exit")
    ap.add_argument("--sweep-shapes", default=None, help="only these K,N shapes, e.g. 4096x4096,14336x4096")
    ap.add_argument("--sweep-only", default=None,
                    help="only the configs with these values, e.g. W_AS_B=1,DEQUANT=2/3 (with --sweep-table, plus the "
                         "table's entry for each shape and M, so a winner must beat it in the same run)")
    ap.add_argument("--sweep-wgmma", action="store_true", help="sweep the Gluon wgmma kernel's configs (Hopper)")
    ap.add_argument("--sweep-wgmma-rs", action="store_true",
                    help="sweep the Gluon wgmma kernel with the weight as the register operand (Hopper)")
    ap.add_argument("--sweep-gemv-mma", action="store_true",
                    help="sweep the Gluon tensor-core GEMV's configs (few rows; sm_80+)")
    ap.add_argument("--sweep-log", default=None, help="file to append every swept config's time to")
    ap.add_argument("--sweep-table", default=None, help="measured-config table (JSON) to merge each winner into")
    ap.add_argument("--table-from-log", default=None, help="merge the winners of this --sweep-log into --sweep-table")
    ap.add_argument("--device-name", default=None, help="with --table-from-log: the GPU name the log was measured on")
    ap.add_argument("--report", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    ap.add_argument("--sweep-skip", default=None, help=argparse.SUPPRESS)  # a worker: one bucket, these configs out
    args = ap.parse_args()
    if args.table_from_log:
        if not (args.sweep_table and args.device_name):
            sys.exit("--table-from-log needs --sweep-table and --device-name")
        merge_winners(args.sweep_table, args.device_name, table_from_log(args.table_from_log))
        return
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    if args.sweep:
        shapes = ([tuple(int(d) for d in s.split("x")) for s in args.sweep_shapes.split(",")]
                  if args.sweep_shapes else SHAPES)
        if args.sweep_skip is None:  # each shape and M in a worker (`_isolate`): a config that kills it is left out
            for (k, n), m in itertools.product(shapes, args.sweep.split(",")):
                out, left_out = run_isolated(
                    lambda skip, k=k, n=n, m=m: [__file__, *_without(sys.argv[1:], "--sweep", "--sweep-shapes"),
                                                 "--sweep", m, "--sweep-shapes", f"{k}x{n}",
                                                 "--sweep-skip", json.dumps(skip)],
                    f"{k}->{n} M={m}", SWEEP_WORKER_TIMEOUT)
                print("\n".join(line for line in out.splitlines() if not line.startswith(TRY)), flush=True)
                if left_out:
                    print(f"{k}->{n} M={m}: left out: " + "; ".join(left_out), flush=True)
            return
        gen = torch.Generator(device="cuda").manual_seed(0)
        pairs = (kv.split("=") for kv in args.sweep_only.split(",")) if args.sweep_only else None
        only = dict((key, [int(v) for v in values.split("/")]) for key, values in pairs) if pairs else None
        sweep(gen, [int(v) for v in args.sweep.split(",")], args.sweep_log, shapes, args.sweep_table, only,
              "wgmma" if args.sweep_wgmma else "wgmma_rs" if args.sweep_wgmma_rs else "gemv_mma"
              if args.sweep_gemv_mma else None, json.loads(args.sweep_skip))
        return
    gen = torch.Generator(device="cuda").manual_seed(0)
    explored = explore(gen) if args.explore else None
    columns = ["scheme", "shape K->N", "M", "quant µs", "quant GB/s (of 3.0 TB/s)", "bf16 cuBLAS µs", "bf16 GB/s",
               "speed-up", "torchao int4 µs", "prunus vs torchao", "rel err"]
    rows = main_rows(gen)
    cache = os.environ.get("PRUNUS_DENSE_CACHE_BYTES", "0")
    dense = ("cuBLAS on a dense weight cached across calls (PRUNUS_DENSE_CACHE_BYTES=" + cache + ")"
             if cache != "0" else "a dequantize kernel into a temporary, then cuBLAS (no dense cache, the default)")
    ql = pk.quant_linear
    gemm_rows = ql.INT4_GEMM_MAX_ROWS if cache != "0" else ql.INT4_GEMM_NO_CACHE_MAX_ROWS
    notes = ("int4: asymmetric, group 128, bf16 activations and scales; int8: per-channel. µs: median of 20 "
             "CUDA-graph replays over weight copies exceeding 3x L2, per call (no launch overhead). GB/s counts "
             "packed weights + scales + zeros + activations in and out; rel err is against fp32 F.linear with "
             f"the dequantized weight. Paths: int4 M = 1 GEMV kernel, M = 2..{gemm_rows} tensor-core kernel, M > {gemm_rows} "
             f"{dense}; int8 M = 1 GEMV kernel, M > 1 "
             + ("the same dense path" if cache != "0" else "a tensor-core weight-only kernel (int8 tile converted to "
                "bf16 in registers)")
             + ". Where `measured_configs.json` holds a Gluon kernel's entry for this GPU, shape and row bucket, the "
             "op runs that kernel instead (`prunus.kernels.quant_linear_gluon`; int4: the tensor-core GEMV up to "
             f"{ql.INT4_GEMV_MMA_MAX_ROWS} rows, the wgmma GEMM from {ql.INT4_WGMMA_MIN_ROWS} rows; int8: the wgmma "
             "GEMM with the int8 weight as its register operand)"
             + ". On the dense path the quant GB/s column still counts packed bytes: read its speed-up only. torchao: "
             + (f"torchao {torchao.__version__} Int4WeightOnlyConfig(group_size=128, "
                "int4_packing_format='tile_packed_to_4d') on an nn.Linear of the same shape (tinygemm, "
                "aten._weight_int4pack_mm), timed the same way; prunus vs torchao > 1 means prunus is faster."
                if quantize_ else "not installed."))
    title = ("Quantized linear (int4 / int8 weight-only) vs bf16 cuBLAS" + (" and torchao" if quantize_ else "")
             + (", dense-weight cache on" if cache != "0" else ""))
    append(title, columns, rows, notes, path=args.report)
    if explored:
        print("\nint4 paths, µs (rel err):\n" + markdown_table(
            ["shape", "M", "bf16", "path 1", "path 2", "path 3"], [r + [""] * (6 - len(r)) for r in explored[0]]))
        print("\n" + markdown_table(["shape", "op", "M", "µs", "rel err"], explored[1]))
    print("\n" + markdown_table(columns, rows))


if __name__ == "__main__":
    main()
