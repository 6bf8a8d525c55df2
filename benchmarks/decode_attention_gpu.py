"""Decode attention on the GPU: prunus flash-decoding kernels against torch SDPA, with achieved bandwidth.

    python benchmarks/decode_attention_gpu.py [--explore] [--scores-only] [--report PATH]

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head dim 128, bf16), one new token (t = 1), batch 1
and 8, cache length 1K, 2K, 8K, 32K. Per row:
- SDPA: `F.scaled_dot_product_attention` of the new query over the full cache (past + new entry, already
  concatenated as a static cache holds it), the faster of `enable_gqa=True` and K/V repeated per query head
  beforehand (the repeat is not timed);
- prunus `decode_attention` over the same cache (past and new entries as separate tensors);
- prunus over a kept subset of 1K and 2K entries (what eviction leaves);
- prunus `decode_attention_quantized` over the cache quantized to 8 and 4 bits (group 128, a residual of
  group - 1 full-precision entries), and 4 bits with group 32.
Each figure is the median of 20 replays of a CUDA graph that calls the op on R copies of the cache (R x cache
bytes >= 3 x L2), divided by R: the cache comes from device memory, and no launch overhead is counted.
GB/s counts compulsory bytes (every cache byte read once: K, V, scales, minimums, plus q, the new K/V and the
output) against the 3.0 TB/s device-copy ceiling of the H100. rel err: against the fp32 reference.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import append, markdown_table  # noqa: E402
from prunus.kernels import decode_attention as da  # noqa: E402
from prunus.kernels import decode_attention_triton as dat  # noqa: E402
from prunus.kernels import kv_quant as kq  # noqa: E402

COPY_CEILING = 3.0e12
H, HK, D = 32, 8, 128
SCALE = 1 / math.sqrt(D)
DTYPE = torch.bfloat16


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copies(nb: int) -> int:
    return max(2, math.ceil(3 * torch.cuda.get_device_properties(0).L2_cache_size / nb))


def graph_us(fn, sets, reps: int = 20) -> float:
    """Median time of one fn(*args) call, args rotating over `sets`, from CUDA-graph replays."""
    for args in sets:  # warm-up: autotuning, compilation
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


def rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def rnd(*shape, gen):
    return torch.randn(*shape, device="cuda", dtype=DTYPE, generator=gen)


def attention_inputs(b, n, gen):
    """q, k_past, v_past, k_new, v_new for a cache of n past entries."""
    return (rnd(b, H, 1, D, gen=gen), rnd(b, HK, n, D, gen=gen), rnd(b, HK, n, D, gen=gen),
            rnd(b, HK, 1, D, gen=gen), rnd(b, HK, 1, D, gen=gen))


def prunus_op(q, kp, vp, kn, vn):
    return torch.ops.prunus.decode_attention(q, kp, vp, kn, vn, SCALE)


def time_prunus(b, n, gen, check=True):
    first = attention_inputs(b, n, gen)
    sets = [first] + [attention_inputs(b, n, gen) for _ in range(copies(nbytes(*first)) - 1)]
    us = graph_us(prunus_op, sets)
    err = rel_err(prunus_op(*first), da.decode_attention_reference(*first, SCALE)) if check else float("nan")
    return us, nbytes(*first) + nbytes(first[0]), err, sets


def time_sdpa(sets):
    """Full caches (past + new concatenated beforehand); the faster of enable_gqa and pre-repeated K/V."""
    full = [(q, torch.cat([kp, kn], 2), torch.cat([vp, vn], 2)) for q, kp, vp, kn, vn in sets]
    gqa = graph_us(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True), full)
    rep_sets = [(q, k.repeat_interleave(H // HK, 1), v.repeat_interleave(H // HK, 1))
                for q, k, v in full[:copies(nbytes(*full[0]) * H // HK)]]
    del full
    rep = graph_us(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=SCALE), rep_sets)
    return (gqa, "gqa") if gqa <= rep else (rep, "repeat")


def quant_inputs(b, n, bits, group, gen):
    n_q = (n // group) * group
    r = group - 1
    q, k, v, kn, vn = attention_inputs(b, n_q, gen)
    K, V = kq.quantize_keys(k, bits, group), kq.quantize_values(v, bits, group)
    return (q, *K, *V, rnd(b, HK, r, D, gen=gen), rnd(b, HK, r, D, gen=gen), kn, vn)


def time_quant(b, n, bits, group, gen, config=None, check=True):
    from prunus.kernels import kv_quant_triton as kqt

    def op(*a):
        if config is None:
            return torch.ops.prunus.decode_attention_quantized(*a, SCALE, bits, group)
        return kqt.decode_attention_quantized(*a, SCALE, bits, group, config=config)

    first = quant_inputs(b, n, bits, group, gen)
    sets = [first] + [quant_inputs(b, n, bits, group, gen) for _ in range(copies(nbytes(*first)) - 1)]
    us = graph_us(op, sets)
    if not check:
        return us, nbytes(*first) + nbytes(first[0]), float("nan")
    ref = kq.decode_attention_quantized_reference(*first, SCALE, bits, group)
    return us, nbytes(*first) + nbytes(first[0]), rel_err(op(*first), ref)


def time_op(op, make, check_ref=None):
    """(µs, compulsory bytes, rel err of the output) of op over rotating copies of make()'s inputs."""
    first = make()
    sets = [first] + [make() for _ in range(copies(nbytes(*first)) - 1)]
    us = graph_us(op, sets)
    out = op(*first)
    err = rel_err(out[0], check_ref(*first)[0]) if check_ref else float("nan")
    del sets
    return us, nbytes(*first) + nbytes(first[0]), err


def pruned_inputs(b, n, gen, ratio=0.5, window=32):
    """ThinK's decode inputs: n - window older keys with ratio of the channels, the window's keys whole."""
    kept = int(D * ratio)
    channels = torch.rand(b, HK, D, device="cuda", generator=gen).argsort(-1)[..., :kept].sort(-1).values
    return (rnd(b, H, 1, D, gen=gen), channels, rnd(b, HK, n - window, kept, gen=gen), rnd(b, HK, window, D, gen=gen),
            rnd(b, HK, n, D, gen=gen), rnd(b, HK, 1, D, gen=gen), rnd(b, HK, 1, D, gen=gen))


def scores_rows(gen):
    """The ops the scoring policies decode with (attention plus each entry's probability)."""
    from prunus.passes.kv.pruned_keys import decode_attention_pruned_keys_reference

    p = torch.ops.prunus
    out = []
    for b in (1, 8):
        for n in (2048, 32768):
            plain = time_op(lambda *a: p.decode_attention(*a, SCALE), lambda: attention_inputs(b, n, gen))
            scores = time_op(lambda *a: p.decode_attention_scores(*a, SCALE), lambda: attention_inputs(b, n, gen),
                             lambda *a: da.decode_attention_reference(*[x.float() for x in a], SCALE, return_probs=True))
            quant = time_op(lambda *a: p.decode_attention_quantized_scores(*a, SCALE, 4, 128),
                            lambda: quant_inputs(b, n, 4, 128, gen),
                            lambda *a: kq.decode_attention_quantized_scores_reference(*a, SCALE, 4, 128))
            think = time_op(lambda *a: p.decode_attention_pruned_keys(*a, SCALE), lambda: pruned_inputs(b, n, gen),
                            lambda *a: decode_attention_pruned_keys_reference(*a, SCALE))
            out.append([b, n, f"{plain[0]:.1f}", *(f"{x[0]:.1f}, {bw(x[1], x[0])}, {x[2]:.0e}"
                                                    for x in (scores, quant, think))])
            print(out[-1], flush=True)
            torch.cuda.empty_cache()
    return out


def bw(nb, us) -> str:
    return f"{nb / us / 1e3:.0f} ({nb / us * 1e6 / COPY_CEILING:.0%})"


def rows(gen):
    out = []
    for b in (1, 8):
        for n in (1024, 2048, 8192, 32768):
            us, nb, err, sets = time_prunus(b, n, gen)
            sdpa_us, sdpa_kind = time_sdpa(sets)
            del sets
            kept = [time_prunus(b, m, gen, check=False)[0] if m < n else us for m in (1024, 2048)]
            q8 = time_quant(b, n, 8, 128, gen)
            q4 = time_quant(b, n, 4, 128, gen)
            q4g32 = time_quant(b, n, 4, 32, gen)
            out.append([b, n, f"{sdpa_us:.1f} ({sdpa_kind})", f"{us:.1f}", bw(nb, us), f"{sdpa_us / us:.2f}x",
                        f"{err:.1e}", f"{kept[0]:.1f} ({sdpa_us / kept[0]:.1f}x)", f"{kept[1]:.1f} ({sdpa_us / kept[1]:.1f}x)",
                        f"{q8[0]:.1f}, {bw(q8[1], q8[0])}, {q8[2]:.0e}", f"{q4[0]:.1f}, {bw(q4[1], q4[0])}, {q4[2]:.0e}",
                        f"{q4g32[0]:.1f}, {bw(q4g32[1], q4g32[0])}, {q4g32[2]:.0e}"])
            print(out[-1], flush=True)
            torch.cuda.empty_cache()
    return out


def explore(gen):
    """The split target (programs per SM) for bf16, and block configs of the quantized kernel (µs)."""
    lines = []
    base = dat.PROGRAMS_PER_SM
    for pps in (1, 2, 4, 8):
        dat.PROGRAMS_PER_SM = pps
        lines.append(f"programs/SM {pps}: " + ", ".join(
            f"b{b} n{n} {time_prunus(b, n, gen, check=False)[0]:.1f}" for b, n in ((1, 2048), (1, 32768), (8, 1024), (8, 32768))))
        print(lines[-1], flush=True)
    dat.PROGRAMS_PER_SM = base
    for key, cfg in dat._stage1_tuned.cache.items():
        lines.append(f"stage-1 best {key[:5]}: {cfg}")
    for bits, group in ((8, 128), (4, 128), (4, 32)):
        for cfg in (dict(BLOCK_N=32, num_warps=4, num_stages=3), dict(BLOCK_N=64, num_warps=4, num_stages=3),
                    dict(BLOCK_N=64, num_warps=8, num_stages=3), dict(BLOCK_N=128, num_warps=8, num_stages=2),
                    dict(BLOCK_N=64, num_warps=4, num_stages=4)):
            if cfg["BLOCK_N"] > group:
                continue
            lines.append(f"int{bits} g{group} {cfg}: " + ", ".join(
                f"b{b} n{n} {time_quant(b, n, bits, group, gen, cfg, check=False)[0]:.1f}" for b, n in ((1, 32768), (8, 8192))))
            print(lines[-1], flush=True)
    return lines


def explore_splits(gen, shapes=((1, 1024), (1, 2048), (8, 1024), (8, 2048))):
    """Short caches (what eviction keeps): every split count and stage-1 config against the default plan (µs)."""
    lines = []
    for b, n in shapes:
        first = attention_inputs(b, n, gen)
        sets = [first] + [attention_inputs(b, n, gen) for _ in range(copies(nbytes(*first)) - 1)]
        default = graph_us(prunus_op, sets)
        plan = dat.plan_splits(n, b * HK, first[0].device)[0]
        results = []
        for splits in (1, 2, 3, 4, 6, 8, 12, 16):
            for cfg in dat.STAGE1_CONFIGS:
                config = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                us = graph_us(lambda *a: dat.decode_attention(*a, SCALE, config=config, num_splits=splits), sets)
                results.append((us, dat.plan_splits(n, b * HK, first[0].device, splits)[0], config))
        results.sort(key=lambda r: r[0])
        lines.append(f"b{b} n{n}: default ({plan} splits, autotuned) {default:.1f} us; best "
                     + "; ".join(f"{us:.1f} us S={sp} {cfg}" for us, sp, cfg in results[:4]))
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--explore", action="store_true", help="also sweep split targets and quantized-kernel blocks")
    ap.add_argument("--report", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    ap.add_argument("--scores-only", action="store_true", help="only the table of the ops with probabilities")
    ap.add_argument("--splits-only", action="store_true",
                    help="only sweep split counts and stage-1 configs over short caches (1K, 2K entries)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.splits_only:
        explore_splits(gen)
        return
    columns = ["batch", "cache", "SDPA µs (peer)", "prunus µs", "prunus GB/s (of 3.0 TB/s)", "vs SDPA", "rel err",
               "kept 1K µs (vs SDPA full)", "kept 2K µs (vs SDPA full)", "int8 g128: µs, GB/s, err",
               "int4 g128: µs, GB/s, err", "int4 g32: µs, GB/s, err"]
    table = [] if args.scores_only else rows(gen)
    notes = ("Llama-3-8B attention (32 q / 8 KV heads, d 128), bf16, one new token. µs: median of 20 CUDA-graph "
             "replays over cache copies exceeding 3x L2, per call (no launch overhead). SDPA peer: the faster of "
             "enable_gqa=True ('gqa') and K/V repeated beforehand ('repeat'), over the concatenated cache. GB/s "
             "counts every cache byte once (K, V, and for the quantized cache the packed codes, scales and "
             "minimums, 16-bit) plus q, new K/V and output. Kept: prunus over a compacted cache of 1K / 2K entries. "
             "Quantized: KIVI layout of prunus.kernels.kv_quant with a full-precision residual of group - 1 "
             "entries; err against the fp32 reference on the dequantized cache.")
    if table:
        append("Decode attention (flash-decoding, kept subset, quantized cache) vs SDPA", columns, table, notes,
               path=args.report)
        print("\n" + markdown_table(columns, table), flush=True)
    columns = ["batch", "cache", "decode_attention µs", "+ probs (bf16): µs, GB/s, err",
               "+ probs over int4 g128: µs, GB/s, err", "think, half the key channels: µs, GB/s, err"]
    table = scores_rows(gen)
    notes = ("The ops the scoring policies decode with: attention plus each entry's probability summed over its "
             "group's query heads (`decode_attention_scores`: h2o, tova, snapkv, ... over a bf16 cache; "
             "`decode_attention_quantized_scores`: the same over a 4-bit KIVI cache, group 128, residual 127; "
             "`decode_attention_pruned_keys`: ThinK, keys older than the 32-entry window keep 64 of 128 channels, "
             "probabilities included). The attention kernel also stores each row's scaled scores (4 bytes a row and "
             "entry), and a second kernel turns them into probabilities with the rows' log-sum-exp (it re-reads "
             "the keys instead where that moves fewer bytes: many query rows a group); GB/s counts every cache "
             "byte once and not the stored scores. Same timing as the table above; err: output against the fp32 "
             "reference.")
    append("Decode attention with per-entry probabilities (scoring policies, kv_quant, think)", columns, table, notes,
           path=args.report)
    print("\n" + markdown_table(columns, table), flush=True)
    if args.explore:
        print("\n".join(explore(gen)))


if __name__ == "__main__":
    main()
