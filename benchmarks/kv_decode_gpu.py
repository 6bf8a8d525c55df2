"""Decode speed with an evicting KV cache on the GPU: a llama-3-8b-shaped model, compacted cache vs the full one.

    python benchmarks/kv_decode_gpu.py [--batches 1 8] [--contexts 8192 32768] [--budgets 1024 2048]
                                       [--policies streaming snapkv] [--fuse | --compile] [--report PATH] [--smoke]

The model (random bf16 weights, all 32 layers) is captured by `prunus.optimize(model, "kv_cache")`, and
`kv_graphs` gives its decode graph: one new token per sequence, attention through
`torch.ops.prunus.decode_attention` (the Triton flash-decoding kernel) over the cache passed as tensors.
Caches are fabricated (random bf16 [b, 8, n, 128] per layer and K/V) instead of prefilling 32K tokens: a
step's cost depends on the cache's shape, not its values. Every step figure is the median of 20 replays of
a CUDA graph of one whole step (no Python or launch overhead, the same way for every row):

- full cache, SDPA (the baseline): the same decode graph with each attention replaced by what a static
  cache does in Hugging Face: write the new K/V into a preallocated [b, 8, n + 1, 128] buffer and run
  `F.scaled_dot_product_attention(enable_gqa=True)` over it;
- full cache, prunus: the unchanged decode graph over the same n entries (the kernel vs SDPA);
- compacted cache of `budget` entries, prunus: the policy's decode graph over [b, 8, budget, 128] caches
  (snapkv's graph also returns each layer's attention probabilities, which it scores with), reported
  without eviction ("step") and, separately, the eviction that follows every step: the policy's
  `after_step` (at the budget one kernel a layer: the scores updated, then each head's lowest-ranked
  slot takes the new entry in place), captured and replayed the same way.
  A compacted step reads `budget` entries whatever the context was, so it is measured once per batch and
  budget (at position = the longest context) and compared with every context.

Ideal ratio: bytes one step must read, full over compacted: the weights (all but the embedding table, of
which a step reads b rows) plus every cached K/V byte. Kernel bandwidth: `decode_attention` alone on one
layer's cache (bytes: K, V, q, new K/V, output) over rotating copies larger than 3x L2, against the copy
ceiling measured in the same run (`dst.copy_(src)` of 2 GiB, 20 copies timed with events outside a CUDA
graph, bytes read + written over time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.fx
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunus  # noqa: E402
from benchmarks._report import append, markdown_table  # noqa: E402
from benchmarks.fuse_gpu import copies, time_us  # noqa: E402
from prunus.passes.kv.policies import LayerCache  # noqa: E402
from prunus.passes.kv import cache as kv_cache_pass  # noqa: E402

# kv_cache proves prefill + decode against the full forward with an fp32 tolerance (1e-4); a random-weight bf16
# model on the GPU differs by a few percent of the largest logit (SDPA vs the decode kernel, rounded in bf16
# through 32 layers). The pass's note reports the error it found.
kv_cache_pass.EXACT_RTOL = 0.1
from prunus.ir.capture import capture  # noqa: E402
from prunus.passes import PassContext, build_pipeline  # noqa: E402
from prunus.passes.kv.runtime import kv_graphs  # noqa: E402

aten = torch.ops.aten
SINK, WINDOW = 4, 32
VOCAB = [128256]  # token ids are drawn below this (the smoke model's vocabulary is smaller)
COMPILE = [False]  # --compile: every decode graph (and the SDPA baseline) runs under torch.compile


def compiled(gm):
    return torch.compile(gm) if COMPILE[0] else gm
SMOKE_SHAPE = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=1000)


# ---------------------------------------------------------------------------------------------------------
# bytes


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes_read(gm: torch.fx.GraphModule) -> int:
    """Parameter bytes a one-token step reads: all but embedding tables (a lookup reads b rows of them)."""
    tables = {n.args[0].target for n in gm.graph.nodes
              if n.op == "call_function" and n.target == aten.embedding.default and n.args[0].op == "get_attr"}
    return sum(nbytes(p) for name, p in list(gm.named_parameters()) + list(gm.named_buffers()) if name not in tables)


def cache_bytes(layers, b: int, entries: int, elem: int) -> int:
    return sum(b * L.num_kv_heads * entries * (L.head_dim + L.v_dim) * elem for L in layers)


def copy_ceiling(dev) -> float:
    """Device copy bandwidth, bytes read + written per second: 2 GiB `dst.copy_(src)` timed with events, not in a
    CUDA graph (a captured device-to-device copy becomes a memcpy node, measured at 2.45 against 3.05 TB/s on an
    H100)."""
    if dev.type != "cuda":
        return float("nan")
    src = torch.empty(2 ** 31, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 20 / (start.elapsed_time(end) * 1e-3)


# ---------------------------------------------------------------------------------------------------------
# steps


class StaticCacheSDPA(torch.nn.Module):
    """Hugging Face's static cache + SDPA for one layer: the new entry goes into a preallocated buffer of
    n + 1 entries, attention reads all of it."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, scale: float):
        super().__init__()
        self.k, self.v, self.scale, self.n = k, v, scale, k.shape[2] - 1

    def forward(self, q, k_new, v_new):
        self.k[:, :, self.n:].copy_(k_new)
        self.v[:, :, self.n:].copy_(v_new)
        return F.scaled_dot_product_attention(q, self.k, self.v, scale=self.scale, enable_gqa=True)


def sdpa_decode(decode: torch.fx.GraphModule, buffers: list) -> torch.fx.GraphModule:
    """The decode graph (weights shared) with every decode_attention replaced by `StaticCacheSDPA` over `buffers`."""
    g = torch.fx.Graph()
    out = g.graph_copy(decode.graph, {})
    g.output(out)
    gm = torch.fx.GraphModule(decode, g)
    op = torch.ops.prunus.decode_attention.default
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == op]
    for i, (node, (k, v)) in enumerate(zip(sites, buffers, strict=True)):
        q, _, _, k_new, v_new, scale = node.args[:6]
        gm.add_submodule(f"static_sdpa_{i}", StaticCacheSDPA(k, v, scale))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(f"static_sdpa_{i}", (q, k_new, v_new))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def optimize_kv(model, example, dev, fuse: bool):
    """`kv_cache` (and with `fuse`, the generated Triton kernels, which the KV graphs built from the fused graph
    carry into prefill and decode) through the pass manager; without `fuse`, `capture_kv`."""
    if not fuse:
        return capture_kv(model, example, dev)
    with torch.device(dev):
        opt = prunus.optimize(model, "kv_cache, fuse", example_inputs=example, verify=False)
    return opt, [n for r in opt.report for n in r.notes]


def capture_kv(model, example, dev):
    """Capture `model` and run the kv_cache pass on the fresh graph, outside the pass manager.

    Library issue (GPU, transformers 5.17): the KV graphs build on a freshly captured graph, but once the graph
    has been recompiled and re-propagated a second time (by the manager after the pass, or before it by any
    modifying pass such as dce) `build_kv_graphs` finds no position source. Run alone on the capture, the pass
    builds its graphs and caches them on the graph. Returns (OptimizedModel, the pass's notes)."""
    with torch.device(dev):  # simplify_masks (inside kv_cache) makes its probe tensors on the default device
        graph = capture(model, example)
        result = build_pipeline("kv_cache")[0].run(graph, PassContext(example_inputs=list(graph.example_inputs)))
    return prunus.OptimizedModel(graph, [], "kv_cache"), result.notes


def rand(shape, dev, dtype, gen):
    return torch.randn(*shape, device=dev, dtype=dtype, generator=gen)


def compacted_caches(layers, b, budget, position, policy, dev, dtype, gen) -> list[LayerCache]:
    """Caches a policy holds in steady state: `budget` entries (the sinks and the latest positions)."""
    pos = torch.cat([torch.arange(SINK), torch.arange(position - (budget - SINK), position)]).to(dev)
    caches = []
    for L in layers:
        p = pos.expand(b, L.num_kv_heads, budget).contiguous()
        score = p.float() if policy == "streaming" else torch.rand(p.shape, device=dev, generator=gen)
        caches.append(LayerCache(rand((b, L.num_kv_heads, budget, L.head_dim), dev, dtype, gen),
                                 rand((b, L.num_kv_heads, budget, L.v_dim), dev, dtype, gen), p, score))
    return caches


def step_us(fn, on_gpu: bool) -> float:
    with torch.no_grad():
        return time_us(fn, [()], reps=20, graphs=on_gpu)


def time_compacted(opt, b, budget, position, policy, dev, dtype, gen, on_gpu) -> dict:
    """One step over a compacted cache, and the policy's eviction after it, timed separately (µs)."""
    spec = {"policy": policy, "budget": budget, "sink": SINK, "window": WINDOW}
    graphs, pol = kv_graphs(opt.graph, spec)
    pol.budgets = pol.layer_budgets(position)
    caches = compacted_caches(graphs.layers, b, budget, position, policy, dev, dtype, gen)
    ids = torch.randint(0, VOCAB[0], (b, 1), device=dev, generator=gen)
    positions = torch.tensor([position], device=dev)
    flat = [x for c in caches for x in (c.k, c.v)]
    decode = compiled(graphs.decode)
    step = step_us(lambda: decode(ids, positions, *flat), on_gpu)
    n_out, n_layers = graphs.num_outputs, len(graphs.layers)
    with torch.no_grad():
        out = list(graphs.decode(ids, positions, *flat))
    kv = out[n_out:n_out + 2 * n_layers]
    new = list(zip(kv[0::2], kv[1::2]))
    probs = out[n_out + 2 * n_layers:] or None

    def evict():
        live = [LayerCache(c.k, c.v, c.pos, c.score) for c in caches]  # the static caches stay the graph's inputs
        pol.after_step(live, new, probs, position + 1)
        return live

    lengths = {c.length for c in evict()}
    if lengths != {budget}:
        raise RuntimeError(f"{policy} eviction left {lengths} entries per head, not the budget {budget}")
    return dict(step=step, evict=step_us(evict, on_gpu), decode_probs=graphs.decode_probs)


def time_full(opt, b, n, dev, dtype, gen, on_gpu) -> dict:
    """One step over a full cache of n entries: SDPA over a static cache (baseline), and prunus' kernel."""
    graphs, _ = kv_graphs(opt.graph, {"policy": "full"})
    buffers = [(rand((b, L.num_kv_heads, n + 1, L.head_dim), dev, dtype, gen),
                rand((b, L.num_kv_heads, n + 1, L.v_dim), dev, dtype, gen)) for L in graphs.layers]
    ids = torch.randint(0, VOCAB[0], (b, 1), device=dev, generator=gen)
    positions = torch.tensor([n], device=dev)
    past = [x[:, :, :n] for pair in buffers for x in pair]  # the kernel reads strided views in place
    sdpa = sdpa_decode(graphs.decode, buffers)
    with torch.no_grad():  # both graphs compute the same logits over the same cache
        ref = graphs.decode(ids, positions, *past)[0].float()
        got = sdpa(ids, positions, *past)[0].float()
    err = ((got - ref).norm() / ref.norm()).item()
    sdpa, decode = compiled(sdpa), compiled(graphs.decode)
    result = dict(sdpa=step_us(lambda: sdpa(ids, positions, *past), on_gpu),
                  prunus=step_us(lambda: decode(ids, positions, *past), on_gpu), err=err)
    del sdpa, buffers, past
    return result


def kernel_bandwidth(layer, b, n, dev, dtype, gen, on_gpu) -> tuple[float, int]:
    """(µs, bytes) of decode_attention alone over one layer's n-entry cache, rotating copies beyond 3x L2."""
    def inputs():
        return (rand((b, layer.num_heads, 1, layer.head_dim), dev, dtype, gen),
                rand((b, layer.num_kv_heads, n, layer.head_dim), dev, dtype, gen),
                rand((b, layer.num_kv_heads, n, layer.v_dim), dev, dtype, gen),
                rand((b, layer.num_kv_heads, 1, layer.head_dim), dev, dtype, gen),
                rand((b, layer.num_kv_heads, 1, layer.v_dim), dev, dtype, gen))

    first = inputs()
    moved = nbytes(*first) + nbytes(first[0]) // layer.head_dim * layer.v_dim  # inputs + output
    sets = [first] + [inputs() for _ in range(copies(moved, on_gpu) - 1)]

    def op(q, kp, vp, kn, vn):
        return torch.ops.prunus.decode_attention(q, kp, vp, kn, vn, layer.scale)

    return time_us(op, sets, reps=20, graphs=on_gpu), moved


# ---------------------------------------------------------------------------------------------------------


def tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--policies", nargs="+", default=["streaming", "snapkv"])
    ap.add_argument("--fuse", action="store_true",
                    help="run prunus' fuse pass after kv_cache: every decode graph (and the baseline built from it) "
                         "runs the generated Triton kernels for norms, RoPE, SwiGLU and residual adds")
    ap.add_argument("--compile", action="store_true",
                    help="run every decode graph and the SDPA baseline under torch.compile (Inductor fuses the "
                         "small per-layer ops; the attention ops stay as they are)")
    ap.add_argument("--report", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer small model on the CPU (eager): checks the script")
    args = ap.parse_args()
    COMPILE[0] = args.compile
    t_start = time.time()
    on_gpu = not args.smoke
    if on_gpu and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke)")
    dev = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if args.smoke:
        torch.set_num_threads(1)
        args.contexts, args.budgets = [64, 128], [40, 48]
        VOCAB[0] = SMOKE_SHAPE["vocab_size"]
    gen = torch.Generator(device=dev).manual_seed(0)
    ceiling = copy_ceiling(dev)
    print(f"copy ceiling {ceiling / 1e12:.2f} TB/s", flush=True)

    model = prunus.models.shape("llama-3-8b", device=dev, dtype=dtype, **(SMOKE_SHAPE if args.smoke else {}))
    example = (torch.randint(0, model.config.vocab_size, (2, 8), device=dev, generator=gen),)
    t0 = time.time()
    opt, kv_notes = optimize_kv(model, example, dev, args.fuse)
    capture_s = time.time() - t0
    graphs, _ = kv_graphs(opt.graph, {"policy": "full"})
    layers, elem = graphs.layers, dtype.itemsize
    weights = weight_bytes_read(graphs.decode)
    print(f"capture + kv_cache {capture_s:.0f} s; {len(layers)} layers; weights read per step {weights / 1e9:.2f} GB",
          flush=True)

    position = max(args.contexts)
    compact, full, kernel = {}, {}, {}
    for b in args.batches:
        for budget in args.budgets:
            for policy in args.policies:
                try:
                    compact[b, budget, policy] = time_compacted(opt, b, budget, position, policy, dev, dtype, gen,
                                                                on_gpu)
                except Exception as e:  # noqa: BLE001 - one failing policy is reported, the others still run
                    print(f"b{b} budget {budget} {policy} failed: {type(e).__name__}: {e}", flush=True)
                    continue
                print(f"b{b} budget {budget} {policy}: {compact[b, budget, policy]}", flush=True)
            kernel[b, budget] = kernel_bandwidth(layers[0], b, budget, dev, dtype, gen, on_gpu)
        for n in args.contexts:
            full[b, n] = r = time_full(opt, b, n, dev, dtype, gen, on_gpu)
            print(f"b{b} full {n}: {r}", flush=True)
            kernel[b, n] = kernel_bandwidth(layers[0], b, n, dev, dtype, gen, on_gpu)
            if on_gpu:
                torch.cuda.empty_cache()
        for key in [k for k in kernel if k[0] == b]:
            print(f"kernel b{b} n{key[1]}: {kernel[key][0]:.1f} us", flush=True)

    rows = []
    for b in args.batches:
        for n in args.contexts:
            base = full[b, n]
            full_bytes = weights + cache_bytes(layers, b, n + 1, elem)
            rows.append([b, tokens(n), "full (SDPA)", f"{base['sdpa'] / 1e3:.2f}", f"{b / base['sdpa'] * 1e6:.0f}",
                         "-", "-", "1.00x", f"{full_bytes / 1e9:.1f}", "-", "-"])
            rows.append([b, tokens(n), "full (prunus kernel)", f"{base['prunus'] / 1e3:.2f}",
                         f"{b / base['prunus'] * 1e6:.0f}", "-", "-", f"{base['sdpa'] / base['prunus']:.2f}x",
                         f"{full_bytes / 1e9:.1f}", "1.00x", f"{base['sdpa'] / base['prunus']:.0%}"])
            for budget in args.budgets:
                if budget >= n:
                    continue
                ideal = full_bytes / (weights + cache_bytes(layers, b, budget + 1, elem))
                for policy in [x for x in args.policies if (b, budget, x) in compact]:
                    r = compact[b, budget, policy]
                    total = r["step"] + r["evict"]
                    rows.append([b, tokens(n), f"{policy} {tokens(budget)}", f"{r['step'] / 1e3:.2f}",
                                 f"{b / r['step'] * 1e6:.0f}", f"{r['evict'] / 1e3:.2f}", f"{b / total * 1e6:.0f}",
                                 f"{base['sdpa'] / r['step']:.2f}x ({base['sdpa'] / total:.2f}x)",
                                 f"{(weights + cache_bytes(layers, b, budget + 1, elem)) / 1e9:.1f}", f"{ideal:.2f}x",
                                 f"{base['sdpa'] / r['step'] / ideal:.0%} ({base['sdpa'] / total / ideal:.0%})"])
    columns = ["batch", "context", "cache", "step ms", "tok/s (step)", "eviction ms", "tok/s (step + eviction)",
               "speedup vs full SDPA: step (with eviction)", "GB read / step", "ideal ratio",
               "% of ideal: step (with eviction)"]
    k_rows = [[b, n, f"{us:.1f}", f"{moved / us / 1e3:.0f}", f"{moved / (us * 1e-6) / ceiling:.0%}"]
              for (b, n), (us, moved) in sorted(kernel.items())]
    k_cols = ["batch", "cache entries", "decode_attention µs (1 layer)", "GB/s", "% of copy ceiling"]
    errs = ", ".join(f"b{b} {tokens(n)} {r['err']:.1e}" for (b, n), r in full.items())
    L0 = layers[0]
    shape = f"{len(layers)} layers, {L0.num_heads} q / {L0.num_kv_heads} KV heads of {L0.head_dim}"
    notes = (f"Llama-3-8B shape ({shape}, random {str(dtype).removeprefix('torch.')} weights), one token per "
             f"sequence per step, CUDA-graph replays (median of 20) for every row"
             f"{', every decode graph and the baseline under torch.compile (default mode)' if args.compile else ''}"
             f"{', fuse pass after kv_cache (generated Triton kernels in every decode graph and the baseline)' if args.fuse else ''}. "
             f"Baseline: the same decode graph "
             f"with each attention as a Hugging Face static cache + SDPA (enable_gqa) over n + 1 entries. "
             f"Compacted rows: the policy's decode graph over `budget` entries per layer and KV head (snapkv's graph "
             f"also returns the attention probabilities it scores with); 'step' excludes eviction, 'eviction' is "
             f"the policy's after_step (at the budget, one kernel a layer: update the scores, then overwrite "
             f"each head's lowest-ranked unprotected slot with the new entry in place; sink "
             f"{SINK}, window {WINDOW}) replayed on its own; the compacted step is measured once per batch and "
             f"budget (it reads `budget` entries whatever the context). Ideal ratio = bytes read per step, full / "
             f"compacted: {weights / 1e9:.2f} GB of weights (all but the embedding table) + the K/V cache. Logits "
             f"of SDPA vs prunus kernel over the same full cache, relative error: {errs}. Capture + kv_cache "
             f"{capture_s:.0f} s ({'; '.join(kv_notes)}); whole run {time.time() - t_start:.0f} s.")
    k_notes = (f"decode_attention alone on one layer ([b, {L0.num_kv_heads}, entries, {L0.head_dim}] K and V), over "
               f"rotating copies beyond 3x L2; bytes = K + V + q + new K/V + output. Copy ceiling measured in "
               f"this run: {ceiling / 1e12:.2f} TB/s (2 GiB dst.copy_(src), read + write).")
    md = (markdown_table(columns, rows) + "\n\n" + notes + "\n\n" + markdown_table(k_cols, k_rows) + "\n\n" + k_notes)
    print(md)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kv_decode_gpu.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(out, "kv_decode_gpu.json"), "w") as f:
            json.dump(dict(compact={str(k): v for k, v in compact.items()}, full={str(k): v for k, v in full.items()},
                           kernel={str(k): v for k, v in kernel.items()}, ceiling=ceiling, weights=weights), f)
    if not args.smoke:
        append("KV eviction: decode speed, llama-3-8b shape (bf16, random weights), compacted cache vs full SDPA",
               columns, rows, notes + "\n\n" + markdown_table(k_cols, k_rows) + "\n\n" + k_notes, path=args.report)


if __name__ == "__main__":
    main()
