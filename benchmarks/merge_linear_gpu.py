"""Sibling linears merged (`fuse(merge_linears=true)`) against the separate calls, on the GPU.

    python benchmarks/merge_linear_gpu.py [--report PATH]

Llama-3-8B's projections (bf16, K = 4096): q, k and v (4096, 1024, 1024 outputs) and gate and up (14336 each),
at 1, 8 and 64 rows. Separate: one `F.linear` a weight, as the captured graph runs them; merged: one `F.linear`
over the weights concatenated along the output dim, then `split` (views), as the fuse pass rewrites them.
Each figure is the median of 30 replays of a CUDA graph over R copies of the weights (R x bytes >= 150 MB,
beyond L2), divided by R. GB/s: weight bytes over time (the activations are a few KB) against the device-copy
ceiling of the H100 (3.0 TB/s, read + write).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import append, markdown_table  # noqa: E402

COPY_CEILING = 3.0e12
GROUPS = {"q, k, v": (4096, 1024, 1024), "gate, up": (14336, 14336)}


def graph_us(fn, sets, reps: int = 30) -> float:
    for args in sets:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--report", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for m in (1, 8, 64):
        for name, sizes in GROUPS.items():
            nbytes = sum(sizes) * 4096 * 2
            copies = max(2, -(-150_000_000 // nbytes))
            rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
            sets = [(rnd(m, 4096), *[rnd(n, 4096) for n in sizes]) for _ in range(copies)]
            separate = graph_us(lambda x, *ws: [F.linear(x, w) for w in ws], sets)
            merged_sets = [(x, torch.cat(ws)) for x, *ws in sets]
            x, *ws = sets[0]
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(
                F.linear(x, merged_sets[0][1]).split(list(sizes), -1), [F.linear(x, w) for w in ws]))
            del sets
            merged = graph_us(lambda x, w: F.linear(x, w).split(list(sizes), -1), merged_sets)
            del merged_sets
            torch.cuda.empty_cache()
            gbs = [nbytes / t / 1e3 for t in (separate, merged)]
            rows.append([m, name, f"{nbytes / 1e6:.0f}", f"{separate:.1f}",
                         f"{gbs[0]:.0f} ({gbs[0] * 1e9 / COPY_CEILING:.0%})", f"{merged:.1f}",
                         f"{gbs[1]:.0f} ({gbs[1] * 1e9 / COPY_CEILING:.0%})", f"{separate / merged:.2f}x",
                         f"{err:.1e}"])
            print(rows[-1], flush=True)
    columns = ["rows", "linears", "weight MB", "separate µs", "separate GB/s", "merged µs", "merged GB/s",
               "speed-up", "max abs diff"]
    notes = ("Llama-3-8B projections, bf16, K = 4096; separate: one F.linear a weight; merged: one F.linear over "
             "the concatenated weights, then split (what fuse(merge_linears=true) makes of them). CUDA-graph "
             "replays (median of 30) over weight copies beyond L2. max abs diff: merged against separate outputs "
             "(cuBLAS may pick another kernel for the wider matrix), whose magnitude is about 60 (N(0, 1) "
             "activations and weights, K = 4096), where a bf16 step is 0.25-0.5.")
    append("Sibling linears merged into one matmul (fuse's merge_linears) vs separate calls", columns, rows, notes,
           path=args.report)
    print("\n" + markdown_table(columns, rows), flush=True)


if __name__ == "__main__":
    main()
