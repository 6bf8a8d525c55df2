"""Speed of a structurally pruned model on the GPU: llama-3-8b shape, 25% of heads and 25% of MLP neurons removed.

    python benchmarks/prune_speed_gpu.py [--heads 0.25] [--mlp 0.25] [--prefill 2048] [--context 1024] [--fuse] [--compile]
                                         [--equivalent] [--report PATH] [--smoke]

The model (random bf16 weights, all 32 layers) is captured at a [1, prefill] example twice: dense, with the
`kv_cache` pass (which simplifies the masks first), and through
`prunus.optimize(model, "simplify_masks, prune_heads(ratio=..), prune_mlp(ratio=..)")` (magnitude importance,
uniform allocation: no calibration; heads go in whole KV groups under GQA, MLP widths round to multiples of 8).
- prefill: each captured full-sequence graph (causal SDPA) on `prefill` tokens at batch 1;
- decode: a kv_cache decode graph, one token at batch 1 over a `context`-entry cache (fabricated random bf16
  K/V: the cost depends on the cache's shape only), attention through prunus' decode_attention kernel. For the
  pruned model, the pruned graph's own where kv_cache builds on it, else a model built with the pruned shapes
  (see `pruned_decode_graph`); the table's note says which.
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
from benchmarks.kv_decode_gpu import SMOKE_SHAPE, cache_bytes, capture_kv, optimize_kv, weight_bytes_read  # noqa: E402
from prunus.errors import PassError  # noqa: E402
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


def prefill_stats(opt, ids, on_gpu: bool) -> dict:
    """Prefill time of the full-sequence graph, its FLOPs, and the pruned geometry."""
    with torch.no_grad():
        prefill = time_us(lambda: opt.graph.gm(ids), [()], reps=20, graphs=on_gpu)
    heads = {(s.num_heads, s.num_kv_heads, s.head_dim) for s in opt.graph.analysis("attention_sites")}
    widths = {p.shape[1] for n, p in opt.graph.gm.named_parameters() if n.endswith("mlp.down_proj.weight")}
    return dict(prefill=prefill, flops=prefill_flops(opt.graph), heads=heads, widths=widths,
                params=sum(p.numel() for p in opt.graph.gm.parameters()), dims=sorted(matmul_dims(opt.graph.gm)),
                shapes=sorted(tuple(p.shape) for p in opt.graph.gm.parameters()),
                notes=[f"{r.name}: {'; '.join(r.notes)}" for r in opt.report if r.name.startswith("prune")])


def decode_stats(graph, ids, context: int, on_gpu: bool, compiled: bool = False) -> dict:
    """One decode step at batch 1 over a `context`-entry cache (also under torch.compile if `compiled`), and the
    bytes it must read."""
    graphs, _ = kv_graphs(graph, {"policy": "full"})
    dev, dtype = ids.device, next(graph.gm.parameters()).dtype
    gen = torch.Generator(device=dev).manual_seed(1)
    caches = [x for L in graphs.layers for x in (
        torch.randn(1, L.num_kv_heads, context, L.head_dim, device=dev, dtype=dtype, generator=gen),
        torch.randn(1, L.num_kv_heads, context, L.v_dim, device=dev, dtype=dtype, generator=gen))]
    token = ids[:, :1]
    positions = torch.tensor([context], device=dev)
    with torch.no_grad():
        decode = time_us(lambda: graphs.decode(token, positions, *caches), [()], reps=20, graphs=on_gpu)
        if compiled:  # Inductor fuses the norms, RoPE and SwiGLU: what is left is mostly the weights' reads
            step = torch.compile(graphs.decode)
            compiled = time_us(lambda: step(token, positions, *caches), [()], reps=20, graphs=on_gpu)
    weights = weight_bytes_read(graphs.decode)
    ops = sum(1 for n in graphs.decode.graph.nodes if n.op == "call_function") / len(graphs.layers)
    return dict(decode=decode, decode_compiled=compiled, weights=weights, ops_per_layer=ops,
                decode_bytes=weights + cache_bytes(graphs.layers, 1, context + 1, dtype.itemsize))


def sliced_model(model, heads: int, kv_heads: int, head_dim: int, width: int):
    """`model` (a Hugging Face Llama) with every layer's projections cut to `heads` / `kv_heads` of `head_dim` and
    `width` MLP neurons (the first ones: which units go does not change the speed). The config cannot say it:
    transformers rejects a hidden size that is not heads x head dim, so the linears are cut in place."""
    if head_dim != model.config.head_dim:
        raise RuntimeError(f"head dim {head_dim} differs from the model's {model.config.head_dim}")

    def cut(linear, rows=None, cols=None):
        weight = linear.weight[:rows] if rows else linear.weight[:, :cols]
        linear.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
        linear.out_features, linear.in_features = linear.weight.shape

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for linear, rows in ((attn.q_proj, heads * head_dim), (attn.k_proj, kv_heads * head_dim),
                             (attn.v_proj, kv_heads * head_dim), (mlp.gate_proj, width), (mlp.up_proj, width)):
            cut(linear, rows=rows)
        cut(attn.o_proj, cols=heads * head_dim)
        cut(mlp.down_proj, cols=width)
    return model


def pruned_decode_graph(opt, prefill: dict, ids, dev, dtype, overrides: dict, force_equivalent: bool):
    """The graph whose decode step is timed for the pruned model, and what it is.

    The pruned graph itself where kv_cache builds on it; otherwise (library issue on the GPU: the KV graphs do
    not build on a graph re-propagated more than once) a fresh model with its projections sliced to the pruned
    geometry (random weights: speed depends on shapes only), captured fresh, its parameter shapes checked equal."""
    if not force_equivalent:
        try:
            kv_graphs(opt.graph, {"policy": "full"})
            return opt.graph, "the pruned graph's own kv_cache decode graph"
        except PassError as e:
            why = str(e)
    else:
        why = "--equivalent"
    if len(prefill["heads"]) != 1 or len(prefill["widths"]) != 1:
        raise RuntimeError(f"non-uniform pruned geometry {prefill['heads']} / {prefill['widths']}: no equivalent")
    (h, hk, d), = prefill["heads"]
    w, = prefill["widths"]
    model = sliced_model(prunus.models.shape("llama-3-8b", device=dev, dtype=dtype, seed=1, **overrides), h, hk, d, w)
    eq, _ = capture_kv(model, (ids,), dev)
    shapes = sorted(tuple(p.shape) for p in eq.graph.gm.parameters())
    if shapes != prefill["shapes"]:
        raise RuntimeError("the equivalent model's parameter shapes differ from the pruned graph's")
    return eq.graph, (f"a fresh model with its projections sliced to the pruned shapes ({h} q / {hk} KV heads of {d}, "
                      f"MLP {w}; every parameter shape equal to the pruned graph's), kv_cache on its fresh capture "
                      f"({why})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--heads", type=float, default=0.25, help="fraction of attention heads removed")
    ap.add_argument("--mlp", type=float, default=0.25, help="fraction of MLP neurons removed")
    ap.add_argument("--prefill", type=int, default=2048, help="prefill tokens (batch 1)")
    ap.add_argument("--context", type=int, default=1024, help="cache entries for the decode step (batch 1)")
    ap.add_argument("--equivalent", action="store_true",
                    help="time the pruned decode step on a model built with the pruned shapes (pruned_decode_graph)")
    ap.add_argument("--fuse", action="store_true",
                    help="both models through prunus' fuse pass (generated Triton kernels in prefill and decode)")
    ap.add_argument("--compile", action="store_true",
                    help="also time both decode graphs under torch.compile (fewer, fused small kernels)")
    ap.add_argument("--report", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer small model on the CPU (eager): checks the script")
    args = ap.parse_args()
    t_start = time.time()
    on_gpu = not args.smoke
    if on_gpu and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke)")
    dev = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    overrides = SMOKE_SHAPE if args.smoke else {}
    if args.smoke:
        torch.set_num_threads(1)
        args.prefill, args.context = 64, 64
    model = prunus.models.shape("llama-3-8b", device=dev, dtype=dtype, **overrides)
    gen = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), device=dev, generator=gen)
    seconds = {}
    t0 = time.time()
    dense, _ = optimize_kv(model, (ids,), dev, args.fuse)  # kv_cache (which simplifies the masks first)
    seconds["dense"] = time.time() - t0
    d = {**prefill_stats(dense, ids, on_gpu), **decode_stats(dense.graph, ids, args.context, on_gpu, args.compile)}
    print(f"dense: { {k: v for k, v in d.items() if k not in ('dims', 'shapes')} }", flush=True)
    del dense
    t0 = time.time()
    with torch.device(dev):  # the pruning passes make their index and score tensors on the default device
        spec = f"simplify_masks, prune_heads(ratio={args.heads}), prune_mlp(ratio={args.mlp})" + (
            ", fuse" if args.fuse else "")
        pruned = prunus.optimize(model, spec, example_inputs=(ids,), verify=False)
    seconds["pruned"] = time.time() - t0
    p = prefill_stats(pruned, ids, on_gpu)
    decode_graph, decode_source = pruned_decode_graph(pruned, p, ids, dev, dtype, overrides, args.equivalent)
    p.update(decode_stats(decode_graph, ids, args.context, on_gpu, args.compile))
    print(f"pruned: { {k: v for k, v in p.items() if k not in ('dims', 'shapes')} }; decode on {decode_source}",
          flush=True)
    rows = []
    read = (d["decode_bytes"] / p["decode_bytes"], f"{d['decode_bytes'] / 1e9:.2f} -> {p['decode_bytes'] / 1e9:.2f} GB read")
    phases = [(f"prefill, batch 1, {args.prefill} tokens", "prefill", d["flops"] / p["flops"],
               f"{d['flops'] / 1e12:.2f} -> {p['flops'] / 1e12:.2f} TFLOP"),
              (f"decode, batch 1, {args.context} context", "decode", *read)]
    if args.compile:
        phases.append((f"decode, batch 1, {args.context} context, torch.compile of both", "decode_compiled", *read))
    for what, key, ideal, unit in phases:
        speedup = d[key] / p[key]
        rows.append([what, f"{d[key] / 1e3:.2f}", f"{p[key] / 1e3:.2f}", f"{speedup:.3f}x", unit, f"{ideal:.3f}x",
                     f"{speedup / ideal:.0%}"])
    columns = ["phase", "dense ms", "pruned ms", "speedup", "work before -> after", "ideal", "% of ideal"]
    (h, hk, hd), = p["heads"] if len(p["heads"]) == 1 else (("varies",) * 3,)
    friendly = all(x % 64 == 0 for x in p["dims"]) and len(p["heads"]) == 1 and hd % 16 == 0
    fmt_heads = lambda heads: " / ".join(f"{a} q, {b} KV of {c}" for a, b, c in sorted(heads))  # noqa: E731
    notes = (f"Llama-3-8B shape (random {str(dtype).removeprefix('torch.')} weights, {len(model.model.layers)} "
             f"layers), CUDA-graph replays (median of 20) of the captured graphs"
             f"{' after the fuse pass (generated Triton kernels) on both' if args.fuse else ''}. Pruned with "
             f"magnitude importance, "
             f"uniform allocation: {'; '.join(p['notes'])}. Parameters {d['params'] / 1e9:.2f} B -> "
             f"{p['params'] / 1e9:.2f} B; attention per layer {fmt_heads(d['heads'])} -> {fmt_heads(p['heads'])}; "
             f"MLP {sorted(d['widths'])} -> {sorted(p['widths'])}; weight dims after pruning "
             f"{', '.join(map(str, p['dims']))}: all multiples of 64 with head dim {hd} (Tensor-Core tiles): "
             f"{'yes' if friendly else 'NO'}. Pruned decode step timed on {decode_source}. Decode bytes: weights but "
             f"the embedding table ({d['weights'] / 1e9:.2f} -> {p['weights'] / 1e9:.2f} GB) + the K/V cache; at "
             f"{d['decode_bytes'] / d['decode'] / 1e6:.2f} TB/s dense"
             + (f", {d['decode_bytes'] / d['decode_compiled'] / 1e6:.2f} TB/s compiled" if args.compile else "")
             + f". Uncompiled, a step runs {d['ops_per_layer']:.0f} graph ops a layer (views included"
             + ("; fused kernels count one each" if args.fuse else "; norms, RoPE, SwiGLU, residuals unfused")
             + "), whose fixed cost pruning does not shrink. "
             f"Capture + passes {seconds['dense']:.0f} s dense, {seconds['pruned']:.0f} s pruned; whole run "
             f"{time.time() - t_start:.0f} s.")
    md = markdown_table(columns, rows) + "\n\n" + notes
    print(md)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "prune_speed_gpu.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(out, "prune_speed_gpu.json"), "w") as f:
            json.dump({k: {n: v for n, v in r.items() if n not in ("heads", "widths")} for k, r in
                       (("dense", d), ("pruned", p))}, f, default=str)
    if not args.smoke:
        append("Structured pruning: prefill and decode speed, llama-3-8b shape (bf16, random weights), "
               f"{args.heads:.0%} of heads and {args.mlp:.0%} of MLP neurons removed", columns, rows, notes,
               path=args.report)


if __name__ == "__main__":
    main()
