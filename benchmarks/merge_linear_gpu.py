"""Sibling linears merged (`fuse(merge_linears=true)`) against the separate calls, on the GPU.

    python benchmarks/merge_linear_gpu.py [--report PATH]

Llama-3-8B's projections (K = 4096): q, k and v (4096, 1024, 1024 outputs) and gate and up (14336 each), at 1,
8 and 64 rows, with bf16 weights (`F.linear`) and int4 weights (group 128, `torch.ops.prunus.linear_int4`).
Separate: one call a weight, as the captured graph runs them; merged: one call over the weights (or packed rows,
scales and zeros) concatenated along the output dim, then `split` (views), as the fuse pass rewrites them.
Each figure is the median of 30 replays of a CUDA graph over R copies of the weights (R x bytes >= 150 MB,
beyond L2), divided by R. GB/s: weight bytes as stored over time (the activations are a few KB) against the
device-copy ceiling of the H100 (3.0 TB/s, read + write).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import append, markdown_table  # noqa: E402
from benchmarks.fuse_gpu import time_us  # noqa: E402
from prunus.kernels import quant_linear  # noqa: E402,F401 - torch.ops.prunus.linear_int4
from prunus.passes.quant.encode import encode  # noqa: E402

COPY_CEILING = 3.0e12
GROUPS = {"q, k, v": (4096, 1024, 1024), "gate, up": (14336, 14336)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--report", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for scheme in ("bf16", "int4 g128"):
        for m in (1, 8, 64):
            for name, sizes in GROUPS.items():
                rows.append(measure(scheme, m, name, sizes, gen))
                print(rows[-1], flush=True)
    columns = ["weights", "rows", "linears", "weight MB", "separate µs", "separate GB/s", "merged µs", "merged GB/s",
               "speed-up", "max abs diff"]
    notes = ("Llama-3-8B projections, K = 4096, bf16 activations; separate: one call a weight; merged: one call "
             "over the concatenated weights (int4: the packed rows, scales and zeros concatenated), then split: "
             "what fuse(merge_linears=true) makes of them. bf16: F.linear (cuBLAS); int4 g128: "
             "torch.ops.prunus.linear_int4 (RTN, its GEMV kernel at 1 row, tensor-core kernel above). CUDA-graph "
             "replays (median of 30) over weight copies beyond L2; MB and GB/s count the weight bytes as stored. "
             "max abs diff: merged against separate outputs (another kernel or split may be picked for the wider "
             "matrix), whose magnitude is about 60 (N(0, 1) activations and weights, K = 4096), where a bf16 step "
             "is 0.25-0.5.")
    append("Sibling linears merged into one matmul (fuse's merge_linears) vs separate calls", columns, rows, notes,
           path=args.report)
    print("\n" + markdown_table(columns, rows), flush=True)


def weights(scheme: str, n: int, gen) -> tuple:
    w = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    if scheme == "bf16":
        return (w,)
    return tuple(encode("int4_weight", w.float(), 128, torch.bfloat16).tensors)


def call(scheme: str, x, tensors):
    if scheme == "bf16":
        return F.linear(x, tensors[0])
    return torch.ops.prunus.linear_int4(x, *tensors, None, 128)


def measure(scheme: str, m: int, name: str, sizes: tuple, gen) -> list:
    """[scheme, rows, group, MB, separate µs, GB/s, merged µs, GB/s, speed-up, max abs diff]."""
    probe = [weights(scheme, n, gen) for n in sizes]
    nbytes = sum(t.numel() * t.element_size() for ts in probe for t in ts)
    del probe
    copies = max(2, -(-150_000_000 // nbytes))
    sets = [(torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, generator=gen),
             *[weights(scheme, n, gen) for n in sizes]) for _ in range(copies)]
    separate = time_us(lambda x, *ws: [call(scheme, x, w) for w in ws], sets, reps=30)
    merged_sets = [(x, tuple(torch.cat(parts) for parts in zip(*ws))) for x, *ws in sets]
    x, *ws = sets[0]
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(
        call(scheme, x, merged_sets[0][1]).split(list(sizes), -1), [call(scheme, x, w) for w in ws]))
    del sets
    merged = time_us(lambda x, w: call(scheme, x, w).split(list(sizes), -1), merged_sets, reps=30)
    del merged_sets
    torch.cuda.empty_cache()
    gbs = [nbytes / t / 1e3 for t in (separate, merged)]
    return [scheme, m, name, f"{nbytes / 1e6:.0f}", f"{separate:.1f}",
            f"{gbs[0]:.0f} ({gbs[0] * 1e9 / COPY_CEILING:.0%})", f"{merged:.1f}",
            f"{gbs[1]:.0f} ({gbs[1] * 1e9 / COPY_CEILING:.0%})", f"{separate / merged:.2f}x", f"{err:.1e}"]


if __name__ == "__main__":
    main()
