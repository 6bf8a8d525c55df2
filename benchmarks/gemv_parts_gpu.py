"""Where the int4 GEMV's time goes at 1 row: its loop with parts switched off, H100.

    python benchmarks/gemv_parts_gpu.py [--report FILE]

The kernel below is `quant_linear_triton._int4_gemv_kernel`'s PREFETCH loop (the next step's loads issued before
this step's arithmetic) at a fixed config, built from the same pieces (`_gemv_step` with ASM for the arithmetic,
`_finish_tile` for split-K), with each part behind a switch:
- words only: the packed words of each step read and XOR-ed (what reading alone costs, as
  `read_pattern_gpu.py`, but in this loop and grid);
- + params: the group's scale and zero point loaded too (else constants);
- + x: the activations loaded too (else constants);
- + math: the codes converted and multiplied (`_gemv_step`, ASM), instead of the XOR;
- + split-K epilogue: the partials added in the workspace and the last split writing y (`_finish_tile`), instead
  of each split storing its partial to a slot of its own with one plain store.
The last switch on is the GEMV itself; the table also times `qt.int4_gemv` at the same config and the op (its
measured kernel), which the full ablation should match. Times: median of 20 CUDA-graph replays over weight
copies exceeding 3x L2, as `quant_linear_gpu.py`.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmarks.quant_linear_gpu as qb  # noqa: E402
from benchmarks._report import append  # noqa: E402
from prunus.kernels import quant_linear_triton as qt  # noqa: E402

# (K, N), (BLOCK_N, GROUPS, SPLIT_K): the ASM config with PREFETCH the H100 sweep found best at each shape
SHAPES = [((4096, 4096), (64, 1, 8)), ((4096, 14336), (128, 1, 4)), ((14336, 4096), (64, 2, 8))]
PARTS = [("words only", (0, 0, 0, 0)), ("+ params", (1, 0, 0, 0)), ("+ x", (1, 1, 0, 0)),
         ("+ math (ASM)", (1, 1, 1, 0)), ("+ split-K epilogue: the GEMV", (1, 1, 1, 1)),
         ("words + split-K epilogue", (0, 0, 0, 1))]


@triton.jit
def _parts_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, stride_wn, stride_sn, stride_zn,
                  field_mask, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                  SPLIT_K: tl.constexpr, P: tl.constexpr, X: tl.constexpr, MATH: tl.constexpr, EPI: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    n_steps = tl.cdiv(K // GROUP, GROUPS)
    per_split = tl.cdiv(n_steps, SPLIT_K)
    start = pid_k * per_split
    stop = tl.minimum(n_steps, start + per_split)
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    words, x, scale, zero = _load(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, n_ok, start, stop, K, stride_wn, stride_sn,
                                  stride_zn, GROUP, GROUPS, P, X)
    if MATH:
        for step in range(start, stop):
            w2, x2, s2, z2 = _load(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, n_ok, step + 1, stop, K, stride_wn,
                                   stride_sn, stride_zn, GROUP, GROUPS, P, X)
            acc += qt._gemv_step(words, x, scale, zero, field_mask, GROUP, 0, 0, 1)
            words, x, scale, zero = w2, x2, s2, z2
        out = tl.sum(acc, axis=1)
    else:  # the loads kept alive by an XOR of the words and a sum of the rest
        bits = tl.zeros([BLOCK_N, GROUPS, GROUP // 8], dtype=tl.int32)
        for step in range(start, stop):
            w2, x2, s2, z2 = _load(x_ptr, w_ptr, s_ptr, z_ptr, offs_n, n_ok, step + 1, stop, K, stride_wn,
                                   stride_sn, stride_zn, GROUP, GROUPS, P, X)
            bits ^= words
            acc += scale + zero + tl.sum(x, axis=1)[None, :]
            words, x, scale, zero = w2, x2, s2, z2
        out = tl.sum(acc, axis=1) + tl.sum(tl.sum(bits, axis=2), axis=1).to(tl.float32)
    if EPI:
        qt._finish_tile(out[:, None], offs_n, tl.arange(0, 1), 1, N, y_ptr, y_ptr, N, ws_ptr, cnt_ptr, pid_n, False,
                        SPLIT_K)
    else:
        tl.store(ws_ptr + pid_k * N + offs_n, out, mask=n_ok)


@triton.jit
def _load(x_row, w_ptr, s_ptr, z_ptr, offs_n, n_ok, step, stop, K, stride_wn, stride_sn, stride_zn,
          GROUP: tl.constexpr, GROUPS: tl.constexpr, P: tl.constexpr, X: tl.constexpr):
    """`qt._gemv_step_load` (all on: that function itself) with the group parameters (P=0) and x (X=0) made up
    instead of loaded."""
    if P and X:
        return qt._gemv_step_load(x_row, w_ptr, s_ptr, z_ptr, offs_n, n_ok, step, stop, K, stride_wn, stride_sn,
                                  stride_zn, GROUP, GROUPS)
    g = step * GROUPS + tl.arange(0, GROUPS)
    g_ok = (g < K // GROUP) & (g < stop * GROUPS)
    ng_ok = n_ok[:, None] & g_ok[None, :]
    offs_w = g[:, None] * (GROUP // 8) + tl.arange(0, GROUP // 8)[None, :]
    words = tl.load(w_ptr + offs_n[:, None, None] * stride_wn + offs_w[None], mask=ng_ok[:, :, None], other=0)
    if X:
        x = tl.load(x_row + g[:, None] * GROUP + tl.arange(0, GROUP)[None, :], mask=g_ok[:, None],
                    other=0.0).to(tl.float32)
    else:
        x = tl.zeros([GROUPS, GROUP], dtype=tl.float32) + g[:, None].to(tl.float32)
    if P:
        scale = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=ng_ok, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + offs_n[:, None] * stride_zn + g[None, :], mask=ng_ok, other=0).to(tl.float32)
    else:
        scale = tl.zeros([offs_n.shape[0], GROUPS], dtype=tl.float32) + 1.0 + g[None, :].to(tl.float32)
        zero = scale * 0.5
    return words, x, scale, zero


def parts_op(n: int, k: int, config: tuple, flags: tuple, y, device="cuda"):
    """The ablation kernel as an op (x, words, scales, zeros) -> y (or, without the split-K epilogue, a slot of
    partials a split), for `graph_us`. Its own zeroed workspace and counters: not the ones the op shares."""
    bn, groups, sk = config
    p, x_on, math, epi = flags
    ws = torch.zeros(n, device=device) if epi else torch.empty(sk * n, device=device)
    cnt = torch.zeros(triton.cdiv(n, bn), dtype=torch.int32, device=device)

    def run(x, w, s, z):
        words = w.view(torch.int32)
        _parts_kernel[(triton.cdiv(n, bn), 1, sk)](
            x, words, s, z, y, ws, cnt, n, k, words.stride(0), s.stride(0), z.stride(0), 0xF << 19, GROUP=qb.GROUP,
            BLOCK_N=bn, GROUPS=groups, SPLIT_K=sk, P=p, X=x_on, MATH=math, EPI=epi, num_warps=4)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    columns = ["shape K->N (BLOCK_N, GROUPS, SPLIT_K)"] + [name for name, _ in PARTS] + [
        "qt.int4_gemv, same config", "the op (measured kernel)", "bf16 cuBLAS"]
    rows = []
    for (k, n), config in SHAPES:
        case = qb.Case("int4", k, n, gen)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        row = [f"{k}->{n} {config}"]
        for name, flags in PARTS:
            row.append(f"{case.time_quant(parts_op(n, k, config, flags, y), 1):.1f}")
        cfg = dict(BLOCK_N=config[0], GROUPS=config[1], SPLIT_K=config[2], PREFETCH=1, ASM=1, num_warps=4)
        row.append(f"{case.time_quant(lambda x, w, s, z: qt.int4_gemv(x, w, s, z, None, qb.GROUP, cfg), 1):.1f}")
        row.append(f"{case.time_quant(qb.int4_op, 1):.1f}")
        row.append(f"{case.time_dense(1):.1f}")
        print(" | ".join(row), flush=True)
        rows.append(row)
        del case
    append("int4 GEMV at 1 row: its loop with parts switched off (µs)", columns, rows, notes=(
        "Each column adds one part to the one before (`benchmarks/gemv_parts_gpu.py`); the last ablation column "
        "takes the loads alone again with the split-K epilogue. int4, group 128, bf16, 4 warps, PREFETCH, ASM."),
        path=args.report)


if __name__ == "__main__":
    main()
