"""Speed of a structurally pruned model on the GPU: llama-3-8b shape, 25% of heads and 25% of MLP neurons removed.

    python benchmarks/prune_speed_gpu.py [--heads 0.25] [--mlp 0.25] [--prefill 2048] [--context 1024]
                                         [--report PATH] [--smoke]

The model (random bf16 weights, all 32 layers) is captured twice at a [1, prefill] example:
`prunus.optimize(model, "dce")` (the baseline) and
`prunus.optimize(model, "prune_heads(ratio=..), prune_mlp(ratio=..)")`, each followed by `kv_cache` (magnitude importance,
uniform allocation: no calibration; heads go in whole KV groups under GQA, MLP widths round to multiples of 8).
Both run the same way:
- prefill: the captured full-sequence graph (masks simplified: causal SDPA) on `prefill` tokens at batch 1;
- decode: the kv_cache decode graph, one token at batch 1 over a `context`-entry cache (fabricated random bf16
  K/V: the cost depends on the cache's shape only), attention through prunus' decode_attention kernel.
Every figure is the median of 20 replays of a CUDA graph of the whole forward (no Python or launch overhead).
Ideal ratios: prefill, FLOPs before / after (prunus' per-node count at the example: matmuls, and causal
attention at half its square); decode, bytes a step reads before / after (weights but the embedding table, of
which a step reads one row, plus the K/V cache).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunus  # noqa: E402
from benchmarks._report import append, markdown_table  # noqa: E402
from benchmarks.fuse_gpu import time_us  # noqa: E402
from benchmarks.kv_decode_gpu import SMOKE_SHAPE, cache_bytes, capture_kv, weight_bytes_read  # noqa: E402
from prunus.ir.flops import node_flops  # noqa: E402
from prunus.passes.kv.runtime import kv_graphs  # noqa: E402
from prunus.passes.kv import cache as kv_cache_pass  # noqa: E402

# kv_cache proves prefill + decode against the full forward with an fp32 tolerance (1e-4); a random-weight bf16
# model on the GPU differs by a few percent of the largest logit (SDPA vs the decode kernel, rounded in bf16
# through 32 layers). The pass's note reports the error it found.
kv_cache_pass.EXACT_RTOL = 0.1


def prefill_flops(graph) -> float:
    """prunus' FLOP count of the graph at its capture example, per sequence (capture widens batch 1 to 2)."""
    ids = graph.placeholders()[0].meta["val"]
    batch = ids.shape[0].node.hint if isinstance(ids.shape[0], torch.SymInt) else ids.shape[0]
    return sum(node_flops(n) for n in graph.gm.graph.nodes) / batch


def matmul_dims(gm: torch.fx.GraphModule) -> set[int]:
    """Every dimension of the 2-D weights (what the matmuls' tiles must divide)."""
    return {d for p in gm.parameters() if p.dim() == 2 for d in p.shape}


def measure(opt, ids, context: int, on_gpu: bool) -> dict:
    graphs, _ = kv_graphs(opt.graph, {"policy": "full"})
    dev, dtype = ids.device, next(opt.graph.gm.parameters()).dtype
    gen = torch.Generator(device=dev).manual_seed(1)
    caches = [x for L in graphs.layers for x in (
        torch.randn(1, L.num_kv_heads, context, L.head_dim, device=dev, dtype=dtype, generator=gen),
        torch.randn(1, L.num_kv_heads, context, L.v_dim, device=dev, dtype=dtype, generator=gen))]
    token = ids[:, :1]
    positions = torch.tensor([context], device=dev)
    with torch.no_grad():
        prefill = time_us(lambda: opt.graph.gm(ids), [()], reps=20, graphs=on_gpu)
        decode = time_us(lambda: graphs.decode(token, positions, *caches), [()], reps=20, graphs=on_gpu)
    weights = weight_bytes_read(graphs.decode)
    L0 = graphs.layers[0]
    return dict(prefill=prefill, decode=decode, flops=prefill_flops(opt.graph), weights=weights,
                decode_bytes=weights + cache_bytes(graphs.layers, 1, context + 1, dtype.itemsize),
                params=sum(p.numel() for p in opt.graph.gm.parameters()),
                heads=f"{L0.num_heads} q / {L0.num_kv_heads} KV x {L0.head_dim}",
                heads_uniform=len({(L.num_heads, L.num_kv_heads, L.head_dim) for L in graphs.layers}) == 1,
                dims=sorted(matmul_dims(opt.graph.gm)),
                notes=[f"{r.name}: {'; '.join(r.notes)}" for r in opt.report if r.name.startswith("prune")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--heads", type=float, default=0.25, help="fraction of attention heads removed")
    ap.add_argument("--mlp", type=float, default=0.25, help="fraction of MLP neurons removed")
    ap.add_argument("--prefill", type=int, default=2048, help="prefill tokens (batch 1)")
    ap.add_argument("--context", type=int, default=1024, help="cache entries for the decode step (batch 1)")
    ap.add_argument("--report", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer small model on the CPU (eager): checks the script")
    args = ap.parse_args()
    t_start = time.time()
    on_gpu = not args.smoke
    if on_gpu and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke)")
    dev = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if args.smoke:
        torch.set_num_threads(1)
        args.prefill, args.context = 64, 64
    model = prunus.models.shape("llama-3-8b", device=dev, dtype=dtype, **(SMOKE_SHAPE if args.smoke else {}))
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), device=dev, generator=gen)
    pipelines = {"dense": "dce", "pruned": f"prune_heads(ratio={args.heads}), prune_mlp(ratio={args.mlp})"}
    results, seconds = {}, {}
    for label, spec in pipelines.items():
        t0 = time.time()
        opt, _ = capture_kv(model, (ids,), spec, dev)  # then kv_cache, for the decode graph
        seconds[label] = time.time() - t0
        results[label] = r = measure(opt, ids, args.context, on_gpu)
        print(f"{label} ({seconds[label]:.0f} s to capture and optimize): "
              f"{ {k: v for k, v in r.items() if k != 'dims'} }", flush=True)
        del opt
        if on_gpu:
            torch.cuda.empty_cache()
    d, p = results["dense"], results["pruned"]
    rows = []
    for what, key, ideal, unit in (
            (f"prefill, batch 1, {args.prefill} tokens", "prefill", d["flops"] / p["flops"],
             f"{d['flops'] / 1e12:.2f} -> {p['flops'] / 1e12:.2f} TFLOP"),
            (f"decode, batch 1, {args.context} context", "decode", d["decode_bytes"] / p["decode_bytes"],
             f"{d['decode_bytes'] / 1e9:.2f} -> {p['decode_bytes'] / 1e9:.2f} GB read")):
        speedup = d[key] / p[key]
        rows.append([what, f"{d[key] / 1e3:.2f}", f"{p[key] / 1e3:.2f}", f"{speedup:.3f}x", unit, f"{ideal:.3f}x",
                     f"{speedup / ideal:.0%}"])
    columns = ["phase", "dense ms", "pruned ms", "speedup", "work before -> after", "ideal", "% of ideal"]
    friendly = all(x % 64 == 0 for x in p["dims"]) and p["heads_uniform"]
    notes = (f"Llama-3-8B shape (random bf16 weights, {len(model.model.layers)} layers), CUDA-graph replays "
             f"(median of 20) of the captured graphs. Pruned with magnitude importance, uniform allocation: "
             f"{'; '.join(p['notes'])}. Parameters {d['params'] / 1e9:.2f} B -> {p['params'] / 1e9:.2f} B; "
             f"attention {d['heads']} -> {p['heads']} in every layer; matmul weight dims after pruning "
             f"{', '.join(map(str, p['dims']))}: all multiples of 64 (Tensor-Core tiles): "
             f"{'yes' if friendly else 'NO'}. Decode bytes: weights but the embedding table "
             f"({d['weights'] / 1e9:.2f} -> {p['weights'] / 1e9:.2f} GB) + the K/V cache. Capture + passes "
             f"{seconds['dense']:.0f} s dense, {seconds['pruned']:.0f} s pruned; "
             f"whole run {time.time() - t_start:.0f} s.")
    md = markdown_table(columns, rows) + "\n\n" + notes
    print(md)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "prune_speed_gpu.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(out, "prune_speed_gpu.json"), "w") as f:
            json.dump(results, f)
    if not args.smoke:
        append("Structured pruning: prefill and decode speed, llama-3-8b shape (bf16, random weights), "
               f"{args.heads:.0%} of heads and {args.mlp:.0%} of MLP neurons removed", columns, rows, notes,
               path=args.report)


if __name__ == "__main__":
    main()
