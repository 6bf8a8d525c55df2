"""Quantization quality on the CPU: SmolLM2-135M perplexity per scheme and method, MiniLM int8 embeddings.

    python benchmarks/quant_quality.py [--tokens 4096] [--calib 32] [--calib-len 256] [--cases int4_weight:awq:128,...]

A case is scheme:method:group, with ":sym" for int4's symmetric grid (`symmetric=true`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunus  # noqa: E402
from benchmarks._report import append  # noqa: E402
from prunus.data import Calibration, window_batch  # noqa: E402

CASES = ["int8_weight:rtn:128", "int4_weight:rtn:128", "int4_weight:hqq:128", "int4_weight:gptq:128",
         "int4_weight:awq:128", "int4_weight:rtn:128:sym", "int4_weight:gptq:128:sym", "int4_weight:awq:128:sym",
         "w8a8:rtn:128", "w8a8:smoothquant:128", "int4_weight:rtn:32"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated scheme:method:group[:sym] (default: all)")
    args = ap.parse_args()

    model, tok = prunus.models.load("smollm2-135m")
    example = window_batch(tok, 2, 16, seed=1234)
    calib = Calibration.from_corpus(tok, args.calib, args.calib_len, seed=0)
    base = prunus.eval.perplexity(model, tok, max_tokens=args.tokens)
    rows = [["fp32 (original)", "-", "-", f"{base:.3f}", "1.000", "-", f"{sum(p.numel() * 4 for p in model.parameters()) / 1e6:.1f}"]]
    for case in args.cases.split(","):
        scheme, method, group, *sym = case.split(":")
        t0 = time.perf_counter()
        opt = prunus.optimize(model, f"quantize(scheme={scheme}, method={method}, group_size={group}"
                              + (", symmetric=true)" if sym else ")"), example_inputs=example, calibration=calib)
        seconds = time.perf_counter() - t0
        ppl = prunus.eval.perplexity(opt, tok, max_tokens=args.tokens)
        rec = opt.report[0]
        rows.append([scheme, method + (" (symmetric)" if sym else ""), group if scheme == "int4_weight" else "-",
                     f"{ppl:.3f}", f"{ppl / base:.3f}",
                     f"{seconds:.0f}", f"{rec.weight_bytes_after / 1e6:.1f}"])
        print(rows[-1], flush=True)

    mini, mtok = prunus.models.load("minilm-l6")
    ids = mtok(["a sentence to embed", "another one, longer than the first"], padding=True, return_tensors="pt")
    opt = prunus.optimize(mini, "quantize(scheme=int8_weight)", example_inputs=(ids.input_ids,))
    cosine = prunus.eval.embedding_similarity(mini, opt, mtok)
    notes = (f"Perplexity: first {args.tokens} tokens of the default corpus (`pydoc_data.topics`) in 512-token windows. "
             f"Calibration (gptq, awq, smoothquant): {args.calib} seeded windows of {args.calib_len} tokens of the same "
             "corpus (they overlap the evaluation text; the relative ordering is what matters here). The output head and "
             "the (tied) embedding stay in fp32; `weights MB` counts every parameter and buffer the graph reads. "
             "SmolLM2-135M's linear weights already sit on a 4-bit grid in blocks of 32 (it ships as Q4_1 GGUF: "
             "w = d*q + m with a real-valued block minimum m), so 4-bit figures on this model are not representative "
             "of others. prunus's int4 grid (integer zero point, range forced to include 0) is not Q4_1's, so even "
             "group 32 is not lossless; group 128 is the figure to read. Symmetric: zero point 8, scale 2 max|w| / 15 "
             "a group. AWQ searches one scale for the linears that read one input (q/k/v, gate/up)."
             f" MiniLM-L6 int8_weight (rtn): mean embedding cosine to fp32 = {cosine:.5f}.")
    print(append("Quantization quality: SmolLM2-135M perplexity by scheme and method",
                 ["scheme", "method", "group", "perplexity", "ratio to fp32", "optimize s", "weights MB"], rows, notes))


if __name__ == "__main__":
    main()
