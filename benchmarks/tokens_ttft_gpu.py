"""Time to first token with token dropping: a llama-3-8b-shaped model (random bf16 weights, all 32 layers),
prefill of 8K and 32K tokens at batch 1, against the same captured graph without dropping.

    python benchmarks/tokens_ttft_gpu.py [--lengths 8192 32768] [--repeats 3] [--report PATH]

Each graph is captured at a 16-token example (`simplify_masks` first, so attention runs as causal SDPA,
FlashAttention on the GPU), then run at the full length; the figure is the median wall time of `repeats`
prefills after one warm-up, with the GPU synchronised around each. Both graphs compute logits for every
position they return (all tokens for the baseline, the kept ones with dropping).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunus  # noqa: E402
from benchmarks._report import append  # noqa: E402

VARIANTS = [("no dropping", "simplify_masks"),
            ("keep 0.5 after layer 4", "simplify_masks, drop_tokens(keep=0.5, after_layer=4)"),
            ("progressive [[4, 0.5], [12, 0.25]]", "simplify_masks, drop_tokens(schedule=[[4, 0.5], [12, 0.25]])")]


def _prefill_seconds(opt, ids: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = opt(ids)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--report", default=None, help="append the table here instead of BENCHMARKS.md")
    args = ap.parse_args()
    t_start = time.time()
    model = prunus.models.shape("llama-3-8b")
    gen = torch.Generator(device="cuda").manual_seed(0)
    example = (torch.randint(0, 128256, (1, 16), device="cuda", generator=gen),)
    inputs = {n: torch.randint(0, 128256, (1, n), device="cuda", generator=gen) for n in args.lengths}
    times: dict = {}
    for label, spec in VARIANTS:
        t0 = time.time()
        with torch.device("cuda"):  # simplify_masks builds its probe tensors on the default device
            opt = prunus.optimize(model, spec, example_inputs=example, verify=False)
        capture_s = time.time() - t0
        for n, ids in inputs.items():
            times[label, n] = _prefill_seconds(opt, ids, args.repeats)
            print(f"{label} @ {n}: {times[label, n] * 1e3:.1f} ms (capture + pass {capture_s:.0f} s)", flush=True)
        del opt
        gc.collect()
        torch.cuda.empty_cache()
    rows = []
    for label, _ in VARIANTS:
        row = [label]
        for n in args.lengths:
            base = times[VARIANTS[0][0], n]
            row += [f"{times[label, n] * 1e3:.1f}", f"{base / times[label, n]:.2f}x"]
        rows.append(row)
    columns = ["variant"] + [c for n in args.lengths for c in (f"TTFT {n // 1024}K (ms)", f"speedup {n // 1024}K")]
    print(f"total {time.time() - t_start:.0f} s")
    append("Token dropping: time to first token, llama-3-8b shape (bf16, random weights, batch 1)", columns, rows,
           notes="Method `attention` (the last 8 queries' attention at the layer before the point; sink 4 and the "
                 "last token kept). Full 32-layer model, captured at a 16-token example and run at each length; "
                 f"median of {args.repeats} prefills after a warm-up.", path=args.report)


if __name__ == "__main__":
    main()
