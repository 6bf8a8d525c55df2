"""Structured pruning quality on the CPU: SmolLM2-135M perplexity per criterion and allocation, next to
Torch-Pruning's magnitude pruning of the same model at the same ratios; MiniLM embedding cosine at 25%.

    nice -n 10 python benchmarks/prune_quality.py [--grid reduced|full] [--tokens 4096] [--calib 16]
    nice -n 10 python benchmarks/prune_quality.py --combined [--grid reduced|full] [--tokens 4096] [--calib 16]

`--combined` removes heads and MLP neurons together, 10%, 20% and 30% of the non-embedding parameters, for
every criterion and allocation, next to Torch-Pruning removing as many parameters (see `combined`).

The SmolLM2 model is captured once; every configuration prunes a fresh graph built from that capture (the
passes replace parameters, never write them, so the captured weights stay the original ones).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import prunus  # noqa: E402
from benchmarks._report import append  # noqa: E402
from prunus.api import OptimizedModel  # noqa: E402
from prunus.data import Calibration, window_batch  # noqa: E402
from prunus.ir import capture  # noqa: E402
from prunus.ir.capture import graph_from_exported  # noqa: E402
from prunus.passes import PassManager, build_pipeline  # noqa: E402

RATIOS = (0.1, 0.2, 0.3)
IMPORTANCE = ("magnitude", "wanda", "flap", "taylor")
# (pass, importance, allocation, ratio). Heads go in whole KV groups (3 per SmolLM2 layer), so uniform allocation
# can only remove 0 or 1 of 3 per layer: it is left out for heads; the global rules rank all 90 KV groups.
GRIDS = {
    "full": [(p, i, a, r) for p in ("prune_mlp", "prune_heads") for i in IMPORTANCE
             for a in (("uniform", "global", "adaptive") if p == "prune_mlp" else ("global", "adaptive"))
             for r in RATIOS],
    # What fits in about 25 minutes on a shared 2-core CPU: every criterion at 20%, the best rule (flap,
    # adaptive) at every ratio.
    "reduced": [("prune_mlp", "flap", "adaptive", r) for r in RATIOS]
               + [("prune_mlp", i, "uniform", 0.2) for i in IMPORTANCE]
               + [("prune_mlp", "flap", "global", 0.2)]
               + [("prune_heads", "flap", "adaptive", r) for r in RATIOS]
               + [("prune_heads", i, "adaptive", 0.2) for i in ("magnitude", "wanda", "taylor")],
}


# --combined: (importance, allocation) pairs at each ratio. `reduced` (about 30 minutes on a 2-core CPU): every
# criterion x allocation at 20%, flap (the best rule) with uniform and adaptive allocation at 10% and 30%.
COMBINED = {
    "full": lambda r: [(i, a) for i in IMPORTANCE for a in ("uniform", "global", "adaptive")],
    "reduced": lambda r: ([(i, a) for i in IMPORTANCE for a in ("uniform", "global", "adaptive")] if r == 0.2
                          else [("flap", "uniform"), ("flap", "adaptive")]),
}


def _fresh_graph(base):
    """A new Graph over the captured program: what `prunus.optimize` would capture, without re-exporting."""
    return graph_from_exported(base["ep"], in_spec=base["g"].in_spec, leaf_is_tensor=base["g"].leaf_is_tensor,
                               dynamic=[dict(i.dynamic) for i in base["g"].inputs],
                               example_inputs=base["g"].example_inputs, out_spec=base["g"].out_spec)


def _prunus(base, spec: str, calib):
    graph = _fresh_graph(base)
    report = PassManager(build_pipeline(spec), calibration=calib, verify=False).run(graph)  # perplexity judges
    return OptimizedModel(graph, report, spec), report[-1].params_after


def _tp_mlp(model, example, ratio: float):
    """Torch-Pruning 1.6.1: MetaPruner with GroupMagnitudeImportance(p=2) over the MLP groups only (the
    gate/up projections are the only roots), the same per-layer ratio, round_to=8."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    roots = {p for layer in m.model.layers for p in (layer.mlp.gate_proj, layer.mlp.up_proj)}
    ignored = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod not in roots]
    pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, round_to=8, ignored_layers=ignored, global_pruning=False,
                                  output_transform=lambda o: o.logits)
    pruner.step()
    return m


def combined(args, model, tok, example, calib, base, ppl) -> None:
    """Heads and MLP neurons pruned together at the same ratio, which removes that share of the non-embedding
    parameters (attention and MLP weights are all of them but the norms), for each criterion and allocation;
    Torch-Pruning's magnitude pruning removes as many parameters from the MLP (its GQA head pruning does not
    build on this model: see the notes)."""
    embedding = model.get_input_embeddings().weight.numel()
    n_dense = sum(p.numel() for p in model.parameters())
    body = n_dense - embedding
    mlp = sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())
    dense = ppl(model)
    share = lambda n: f"{(n_dense - n) / body:.1%}"  # noqa: E731
    rows = [["dense", "-", "-", "-", f"{dense:.3f}", f"{body / 1e6:.2f}", "-"]]
    best: dict[float, float] = {}
    for r in args.ratios:
        for importance, alloc in COMBINED[args.grid](r):
            heads_alloc = "global" if alloc == "uniform" else alloc  # 3 KV groups a layer: no uniform 10-30%
            spec = (f"prune_heads(ratio={r}, importance={importance}, allocation={heads_alloc}), "
                    f"prune_mlp(ratio={r}, importance={importance}, allocation={alloc})")
            t0 = time.perf_counter()
            opt, n = _prunus(base, spec, calib)
            value = ppl(opt)
            best[r] = min(best.get(r, float("inf")), value)
            rows.append([r, f"prunus {importance}", alloc, share(n), f"{value:.3f}", f"{(n - embedding) / 1e6:.2f}",
                         f"{time.perf_counter() - t0:.0f}"])
            print(rows[-1], flush=True)
        t0 = time.perf_counter()
        m = _tp_mlp(model, example[0], min(r * body / mlp, 0.95))
        n = sum(p.numel() for p in m.parameters())
        value = ppl(m)
        rows.append([r, "Torch-Pruning magnitude", "uniform (per layer), MLP only", share(n), f"{value:.3f}",
                     f"{(n - embedding) / 1e6:.2f}", f"{time.perf_counter() - t0:.0f}"])
        print(rows[-1], f"prunus best {best[r]:.3f}", flush=True)
    notes = (f"SmolLM2-135M, {body / 1e6:.2f} M non-embedding parameters ({mlp / 1e6:.2f} M in the MLPs); the tied "
             f"{embedding / 1e6:.2f} M embedding is never pruned. prunus rows: `prune_heads(ratio=r)` then "
             f"`prune_mlp(ratio=r)` with the row's importance and allocation (heads go in whole KV groups, 3 a layer, "
             "so `uniform` means uniform MLP widths with global head ranking). Torch-Pruning 1.6.1: MetaPruner, "
             "GroupMagnitudeImportance(p=2), per-layer ratio r x non-embedding / MLP parameters over the MLP neurons "
             "only, round_to=8: the same number of parameters. Its GQA head pruning (q/k/v as roots, num_heads set) "
             "was still building dependency groups after 150 s on this model, so Torch-Pruning prunes MLP only. "
             f"Perplexity: first {args.tokens} tokens of `pydoc_data.topics` in 512-token windows. Calibration "
             f"(wanda, flap, taylor): {args.calib} seeded windows of {args.calib_len} tokens of the same corpus. "
             f"Grid `{args.grid}`" + (": every criterion x allocation at 20%, flap with uniform and adaptive "
             "allocation at 10% and 30% (`--grid full`: every pair at every ratio)" if args.grid == "reduced" else "")
             + ". prunus's best at each ratio vs Torch-Pruning: "
             + "; ".join(f"{r:.0%}: {best[r]:.3f} vs {float(row[4]):.3f}" for r in args.ratios
                         for row in rows if row[0] == r and row[1].startswith("Torch"))
             + ". `s`: seconds to prune and evaluate one row.")
    print(append("Structured pruning quality: SmolLM2-135M, heads and MLP together, by share of non-embedding "
                 "parameters removed", ["ratio", "importance", "allocation", "non-embedding removed", "perplexity",
                                        "non-embedding params M", "s"], rows, notes, path=args.report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--grid", choices=tuple(GRIDS), default="reduced")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--combined", action="store_true", help="heads and MLP together by non-embedding share")
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="--combined: the shares to run")
    ap.add_argument("--report", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    args = ap.parse_args()
    t_start = time.perf_counter()

    model, tok = prunus.models.load("smollm2-135m")
    example = window_batch(tok, 2, 16, seed=1234)
    calib = Calibration.from_corpus(tok, args.calib, args.calib_len, seed=0).samples
    g = capture(model, example)
    base = {"g": g, "ep": g.exported()}
    ppl = lambda m: prunus.eval.perplexity(m, tok, max_tokens=args.tokens)  # noqa: E731
    if args.combined:
        return combined(args, model, tok, example, calib, base, ppl)
    dense = ppl(model)
    n_dense = sum(p.numel() for p in model.parameters())
    print(f"dense {dense:.3f} {n_dense}", flush=True)

    rows = [["dense", "-", "-", "-", f"{dense:.3f}", f"{n_dense / 1e6:.2f}", "-"]]
    for pass_name, importance, alloc, r in GRIDS[args.grid]:
        spec = f"{pass_name}(ratio={r}, importance={importance}, allocation={alloc})"
        t0 = time.perf_counter()
        opt, n = _prunus(base, spec, calib)
        rows.append([pass_name, importance, alloc, r, f"{ppl(opt):.3f}", f"{n / 1e6:.2f}",
                     f"{time.perf_counter() - t0:.0f}"])
        print(rows[-1], flush=True)
    for r in RATIOS:
        t0 = time.perf_counter()
        m = _tp_mlp(model, example[0], r)
        rows.append(["prune_mlp", "Torch-Pruning magnitude", "uniform (per layer)", r, f"{ppl(m):.3f}",
                     f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}", f"{time.perf_counter() - t0:.0f}"])
        print(rows[-1], flush=True)

    mini, mtok = prunus.models.load("minilm-l6")
    ids = mtok(["a sentence to embed", "another one, longer than the first"], padding=True, return_tensors="pt")
    mcalib = Calibration.from_corpus(mtok, 8, 128, seed=0).samples
    mini_rows = []
    for importance in ("magnitude", "flap"):
        spec = (f"prune_heads(ratio=0.25, importance={importance}), "
                f"prune_mlp(ratio=0.25, importance={importance})")
        opt = prunus.optimize(mini, spec, example_inputs=(ids.input_ids,), calibration=mcalib)
        cos = prunus.eval.embedding_similarity(mini, opt, mtok)
        mini_rows.append(f"{importance} {cos:.4f} ({opt.report[-1].params_after / 1e6:.2f}M params)")
        print(mini_rows[-1], flush=True)

    notes = (f"Perplexity: first {args.tokens} tokens of the default corpus (`pydoc_data.topics`) in 512-token windows, "
             f"the setting of quant_quality.py. Calibration (wanda, flap, taylor): {args.calib} seeded windows of "
             f"{args.calib_len} tokens of the same corpus. `ratio` is the fraction of the pass's units removed (MLP "
             "neurons, kept widths rounded to multiples of 8; or attention heads, which prunus removes as whole KV "
             "groups of 3 query heads). `params M` counts every parameter after pruning (the 28.3M tied embedding "
             "included). Torch-Pruning 1.6.1: MetaPruner, GroupMagnitudeImportance(p=2), local (per-layer) ratio, "
             "round_to=8, gate/up projections as the only roots (MLP neurons only). No Torch-Pruning row for heads: with "
             "q/k/v as roots and num_heads set (its GQA head pruning), MetaPruner's constructor was still building "
             "dependency groups (`get_all_groups`) after 150 s on this model, so it was left out. "
             f"Grid `{args.grid}`" + (" (cut to fit about 25 minutes on a shared CPU: flap with adaptive allocation, the "
             "best rule in a first look, at every ratio; the other criteria and allocations at 20% only; "
             "`--grid full` runs every criterion x allocation x ratio)" if args.grid == "reduced" else "")
             + f"; `s` is seconds to prune and evaluate one row (CPU shared with other jobs). "
             f"MiniLM-L6, 25% of heads and 25% of MLP neurons removed (uniform, calibration 8 windows of 128 tokens), "
             f"mean embedding cosine to the original: {'; '.join(mini_rows)}. "
             f"Total run {time.perf_counter() - t_start:.0f} s.")
    print(append("Structured pruning quality: SmolLM2-135M perplexity by criterion and allocation",
                 ["pass", "importance", "allocation", "ratio", "perplexity", "params M", "s"], rows, notes,
                 path=args.report))


if __name__ == "__main__":
    main()
