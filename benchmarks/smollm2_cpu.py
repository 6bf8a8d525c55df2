"""SmolLM2-135M on the CPU: perplexity on the default corpus, and prefill latency in PyTorch and in
ONNX Runtime for the fp32, int8-weight and int4-weight graphs.

    python benchmarks/smollm2_cpu.py [--tokens 4096] [--window 512] [--prefill 256] [--repeats 10] [--fuse]

--fuse adds each variant again with `fuse` after it: q/k/v and gate/up of each layer merged into one matmul
(MatMul, MatMulNBits or DequantizeLinear + MatMul over the concatenated rows in the ONNX graph); the fused
elementwise regions export as the ops they came from and run their reference ops in PyTorch on the CPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunus  # noqa: E402
from benchmarks._report import append  # noqa: E402
from prunus.codegen.onnx import check_parity  # noqa: E402
from prunus.data import window_batch  # noqa: E402

VARIANTS = [("fp32", "dce, fold_constants, simplify_masks"),
            ("int8 weights", "simplify_masks, quantize(scheme=int8_weight)"),
            ("int4 weights, group 128", "simplify_masks, quantize(scheme=int4_weight, group_size=128)")]


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--fuse", action="store_true", help="also every variant with fuse after it (merged linears)")
    args = ap.parse_args()
    variants = VARIANTS + ([(f"{label}, fuse", f"{pipeline}, fuse") for label, pipeline in VARIANTS]
                           if args.fuse else [])
    import onnxruntime as ort

    model, tok = prunus.models.load("smollm2-135m")
    example = window_batch(tok, 2, 16, seed=1234)
    (ids,) = window_batch(tok, 1, args.prefill, seed=7)
    one = ids[:, :1]  # a one-token forward: the weight-bound shape of a decode step
    with torch.no_grad():
        t_eager = _median_seconds(lambda: model(ids), args.repeats)
    ppl_model = prunus.eval.perplexity(model, tok, seq_len=args.window, max_tokens=args.tokens)
    rows = [["original (PyTorch eager)", f"{ppl_model:.3f}", f"{t_eager * 1e3:.1f}", "-", "1.00x", "-", "-", "-"]]
    t_ort_fp32 = None
    for label, pipeline in variants:
        opt = prunus.optimize(model, pipeline, example_inputs=example)
        ppl = prunus.eval.perplexity(opt, tok, seq_len=args.window, max_tokens=args.tokens)
        with torch.no_grad():
            t_graph = _median_seconds(lambda: opt(ids), args.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            opt.export_onnx(path)
            size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
            parity = check_parity(opt.graph, path, [ids])
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            feed = {opt.graph.inputs[0].name: ids.numpy()}
            t_ort = _median_seconds(lambda: session.run(None, feed), args.repeats)
            feed_one = {opt.graph.inputs[0].name: one.numpy()}
            t_one = _median_seconds(lambda: session.run(None, feed_one), 5 * args.repeats)
        t_ort_fp32 = t_ort_fp32 or t_ort
        rows.append([f"prunus {label}", f"{ppl:.3f}", f"{t_graph * 1e3:.1f}", f"{t_ort * 1e3:.1f}",
                     f"{t_eager / t_ort:.2f}x", f"{t_ort_fp32 / t_ort:.2f}x", f"{t_one * 1e3:.2f}",
                     f"{size / 1e6:.0f} MB, {parity:.1e}"])
        print(rows[-1], flush=True)
    notes = (f"Perplexity: first {args.tokens} tokens of `pydoc_data.topics` (prunus.data.default_corpus) in "
             f"non-overlapping {args.window}-token windows. Latency: one {args.prefill}-token prefill at batch 1, "
             f"median of {args.repeats} runs after a warm-up, {torch.get_num_threads()} PyTorch threads, onnxruntime "
             "CPUExecutionProvider with default threads. Last column: ONNX file size and the largest relative "
             "|onnxruntime - PyTorch| of the logits. `ORT 1-token ms`: a one-token forward (median of "
             f"{5 * args.repeats}), the weight-bound shape of a decode step. int4 lowers to MatMulNBits with packed "
             "integer zero points, int8 to DequantizeLinear + MatMul."
             + (" ', fuse' rows: the same pipeline then `fuse` (q/k/v and gate/up merged into one matmul a layer; "
                "the fused elementwise regions export as their original ops and run their reference ops in "
                "PyTorch on the CPU)." if args.fuse else ""))
    print(append("SmolLM2-135M on the CPU: perplexity, PyTorch and ONNX Runtime prefill",
                 ["model", "perplexity", "PyTorch ms", "ORT ms", "ORT vs eager", "ORT vs ORT fp32",
                  "ORT 1-token ms", "ONNX size, parity"], rows, notes))


if __name__ == "__main__":
    main()
