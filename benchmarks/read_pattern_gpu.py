"""How fast the GPU reads a packed int4 weight [N, K / 2] in the access patterns of the GEMV kernels.

    python benchmarks/read_pattern_gpu.py

A Triton kernel only reads the words and sums them (no dequantization, no MMA): the bandwidth each pattern can
reach, against which the GEMVs' own figures read. Patterns, for a program of BN rows and split-K S:
- "rows x 64 B": each step reads 64 bytes (16 words, 128 codes) of each of the program's BN rows, as the
  tensor-core GEMV does (`quant_linear_gluon`, one step = one group of 128);
- "rows x 256 B": 256 bytes of each row a step (the Triton GEMV with GROUPS=4);
- "contiguous": the same bytes as one flat array, each program a contiguous run (the best case).
Times: median of 20 CUDA-graph replays over copies exceeding 3x L2, as `quant_linear_gpu.py`.
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.quant_linear_gpu import graph_us  # noqa: E402


@triton.jit
def _rows_kernel(w_ptr, out_ptr, N, KW, stride, BN: tl.constexpr, WORDS: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    cols = tl.arange(0, WORDS)
    per = KW // SPLIT_K
    acc = tl.zeros([BN, WORDS], dtype=tl.int32)
    for c in range(pid_k * per, pid_k * per + per, WORDS):
        acc ^= tl.load(w_ptr + rows[:, None] * stride + (c + cols)[None, :])
    tl.store(out_ptr + pid_k * N + rows, tl.sum(acc, axis=1))


@triton.jit
def _flat_kernel(w_ptr, out_ptr, total, BLOCK: tl.constexpr, PER: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, PER, BLOCK):
        acc ^= tl.load(w_ptr + pid * PER + i + tl.arange(0, BLOCK))
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def main():
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(torch.cuda.get_device_name())
    for k, n in [(4096, 4096), (4096, 14336), (14336, 4096)]:
        kw = k // 8
        nbytes = n * kw * 4
        copies = max(2, -(-3 * l2 // nbytes))
        ws = [torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32, device="cuda") for _ in range(copies)]
        out = torch.empty(16 * n, dtype=torch.int32, device="cuda")
        best = {}
        for name, words in (("rows x 64 B", 16), ("rows x 256 B", 64)):
            for bn in (32, 64, 128):
                for sk in (1, 2, 4, 8, 16):
                    if kw % (sk * words):
                        continue
                    for warps in (4, 8):
                        fn = lambda w, bn=bn, sk=sk, words=words, warps=warps: _rows_kernel[(n // bn, sk)](
                            w, out, n, kw, kw, BN=bn, WORDS=words, SPLIT_K=sk, num_warps=warps)
                        t = graph_us(fn, [(w,) for w in ws])
                        if t < best.get(name, (1e9,))[0]:
                            best[name] = (t, f"BN={bn} S={sk} warps={warps}")
        for per in (4096, 16384, 65536):
            for block in (1024, 2048):
                total = n * kw
                fn = lambda w, per=per, block=block: _flat_kernel[(total // per,)](w, out, total, BLOCK=block, PER=per,
                                                                                    num_warps=8)
                t = graph_us(fn, [(w,) for w in ws])
                if t < best.get("contiguous", (1e9,))[0]:
                    best["contiguous"] = (t, f"{per * 4} B a program, block {block}")
        for name, (t, cfg) in best.items():
            print(f"{k}->{n} {name}: {t:.1f} µs, {nbytes / t / 1e6:.2f} TB/s ({cfg})", flush=True)


if __name__ == "__main__":
    main()
