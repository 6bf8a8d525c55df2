"""SmolLM2-135M on the CPU: perplexity on the default corpus, and ONNX Runtime vs PyTorch prefill latency.

    python benchmarks/smollm2_cpu.py [--tokens 4096] [--window 512] [--prefill 256] [--repeats 10]
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
    args = ap.parse_args()

    model, tok = prunus.models.load("smollm2-135m")
    example = window_batch(tok, 2, 16, seed=1234)
    opt = prunus.optimize(model, "dce, fold_constants, simplify_masks", example_inputs=example)
    ppl_model = prunus.eval.perplexity(model, tok, seq_len=args.window, max_tokens=args.tokens)
    ppl_opt = prunus.eval.perplexity(opt, tok, seq_len=args.window, max_tokens=args.tokens)

    ids = window_batch(tok, 1, args.prefill, seed=7)[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        opt.export_onnx(path)
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feed = {opt.graph.inputs[0].name: ids.numpy()}
        parity = check_parity(opt.graph, path, [ids])
        t_ort = _median_seconds(lambda: session.run(None, feed), args.repeats)
    with torch.no_grad():
        t_eager = _median_seconds(lambda: model(ids), args.repeats)
        t_graph = _median_seconds(lambda: opt(ids), args.repeats)

    rows = [
        ["perplexity, original (eager)", f"{ppl_model:.3f}"],
        ["perplexity, prunus clean-up pipeline", f"{ppl_opt:.3f}"],
        [f"prefill {args.prefill} tokens, PyTorch eager (ms)", f"{t_eager * 1e3:.1f}"],
        [f"prefill {args.prefill} tokens, prunus graph in PyTorch (ms)", f"{t_graph * 1e3:.1f}"],
        [f"prefill {args.prefill} tokens, ONNX Runtime CPU (ms)", f"{t_ort * 1e3:.1f}"],
        ["ONNX Runtime speed-up over PyTorch eager", f"{t_eager / t_ort:.2f}x"],
        ["ONNX Runtime vs PyTorch, max relative |diff| of logits", f"{parity:.1e}"],
    ]
    notes = (f"Perplexity: first {args.tokens} tokens of `pydoc_data.topics` (prunus.data.default_corpus) in "
             f"non-overlapping {args.window}-token windows, fp32. Latency: batch 1, median of {args.repeats} runs "
             f"after one warm-up, {torch.get_num_threads()} PyTorch threads.")
    print(append("SmolLM2-135M on the CPU: perplexity and ONNX Runtime prefill", ["measure", "value"], rows, notes))


if __name__ == "__main__":
    main()
