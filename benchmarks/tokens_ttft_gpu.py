"""Time to first token with token dropping: a llama-3-8b-shaped model (random bf16 weights, all 32 layers),
prefill of 8K and 32K tokens at batch 1, against the same captured graph without dropping and against the
transformers model run eagerly.

    python benchmarks/tokens_ttft_gpu.py [--lengths 8192 32768] [--repeats 3] [--report PATH]

Each graph is captured on the GPU at a 16-token example (`simplify_masks` first, so attention runs as causal
SDPA, FlashAttention on the GPU), then run at the full length; the figure is the median wall time of
`repeats` prefills after one warm-up, with the GPU synchronised around each. Every variant computes logits
for every position it returns (all tokens without dropping, the kept ones with it). `ideal` is the FLOP
ratio against no dropping (projections and MLP, causal attention, output head; the scoring itself free).
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

VARIANTS = [("no dropping", "simplify_masks", []),
            ("keep 0.5 after layer 4", "simplify_masks, drop_tokens(keep=0.5, after_layer=4)", [(4, 0.5)]),
            ("progressive [[4, 0.5], [12, 0.25]]", "simplify_masks, drop_tokens(schedule=[[4, 0.5], [12, 0.25]])",
             [(4, 0.5), (12, 0.25)])]
EAGER = "transformers eager (sdpa), no capture"


def _ideal_speedup(cfg, points: list[tuple[int, float]], n: int) -> float:
    """FLOPs of a full prefill of `n` tokens over FLOPs with `points` [(after_layer, keep of the original)]."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_token = 2 * (h * (2 * h + 2 * kv) + 3 * h * cfg.intermediate_size)
    layer = lambda t: per_token * t + 2 * t * t * h  # noqa: E731 - causal QK^T and PV: t^2 / 2 pairs, 4h each
    head = lambda t: 2 * h * cfg.vocab_size * t  # noqa: E731

    def total(pts):
        kept = [n] * cfg.num_hidden_layers
        for after, keep in pts:
            for i in range(after, cfg.num_hidden_layers):
                kept[i] = n - int((1 - keep) * n)
        return sum(layer(t) for t in kept) + head(kept[-1])

    return total([]) / total(points)


def _prefill_seconds(run, ids: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = run(ids)
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
    ap.add_argument("--eager", action="store_true", help="also time the transformers model itself (no capture)")
    args = ap.parse_args()
    t_start = time.time()
    model = prunus.models.shape("llama-3-8b")
    gen = torch.Generator(device="cuda").manual_seed(0)
    example = (torch.randint(0, 128256, (1, 16), device="cuda", generator=gen),)
    inputs = {n: torch.randint(0, 128256, (1, n), device="cuda", generator=gen) for n in args.lengths}
    times: dict = {}
    for n, ids in inputs.items() if args.eager else ():
        times[EAGER, n] = _prefill_seconds(lambda x: model(x, use_cache=False), ids, args.repeats)
        print(f"{EAGER} @ {n}: {times[EAGER, n] * 1e3:.1f} ms", flush=True)
    captures = {}
    for label, spec, _ in VARIANTS:
        t0 = time.time()
        opt = prunus.optimize(model, spec, example_inputs=example, verify=False)
        captures[label] = time.time() - t0
        seq = opt.graph.placeholders()[0].meta["val"].shape[1]
        if not isinstance(seq, torch.SymInt) or seq.node.expr.is_number:
            # a pass built on a specialised length emits literal sizes and breaks at other lengths
            raise SystemExit(f"{label}: the sequence length was specialised to {seq} while capturing or in a pass")
        seq_dims = [info.dynamic for info in opt.graph.inputs]
        for n, ids in inputs.items():
            times[label, n] = _prefill_seconds(opt, ids, args.repeats)
            print(f"{label} @ {n}: {times[label, n] * 1e3:.1f} ms (capture + passes {captures[label]:.0f} s, "
                  f"dynamic dims {seq_dims})", flush=True)
        del opt
        gc.collect()
        torch.cuda.empty_cache()
    rows = []
    for label, _, points in VARIANTS + ([(EAGER, None, [])] if args.eager else []):
        row = [label]
        for n in args.lengths:
            base = times[VARIANTS[0][0], n]
            row += [f"{times[label, n] * 1e3:.1f}", f"{base / times[label, n]:.2f}x",
                    f"{_ideal_speedup(model.config, points, n):.2f}x"]
        rows.append(row)
    columns = ["variant"] + [c for n in args.lengths
                             for c in (f"TTFT {n // 1024}K (ms)", f"speedup {n // 1024}K", f"ideal {n // 1024}K")]
    print(f"total {time.time() - t_start:.0f} s")
    section = append("Token dropping: time to first token, llama-3-8b shape (bf16, random weights, batch 1)",
                     columns, rows,
                     notes="Method `attention` (the last 8 queries' attention at the layer before the point; sink 4 "
                           "and the last token kept). Full 32-layer model, captured on the GPU at a 16-token example "
                           "(sequence dim dynamic) and run at each length; median of "
                           f"{args.repeats} prefills after a warm-up. Speedups are against the captured graph "
                           "without dropping. `ideal`: FLOP ratio (projections and MLP, causal attention, output "
                           "head for every returned position; scoring counted free). Capture + passes took "
                           + ", ".join(f"{captures[label]:.0f} s" for label, _, _ in VARIANTS) + ".",
                     path=args.report)
    print(section)


if __name__ == "__main__":
    main()
