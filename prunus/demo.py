"""`make demo`: the main job on the embedded default model, SmolLM2-135M.

Load it from its wheel, run the default pipeline with verification, report perplexity and fidelity
before and after, export ONNX and run it in onnxruntime, generate a short completion, and write the
artifact and its HTML dump under out/demo/.
"""
from __future__ import annotations

import os
import time

from rich.console import Console
from rich.table import Table

import prunus
from prunus.codegen.onnx import check_parity
from prunus.data import window_batch

MODEL = "smollm2-135m"
DEFAULT_PIPELINE = "dce, fold_constants, simplify_masks"
OUT = os.path.join("out", "demo")


def main() -> None:
    console = Console()
    if not console.is_terminal:  # e.g. under make with output captured: keep the tables readable
        console = Console(width=140)
    t0 = time.perf_counter()
    with console.status(f"loading {MODEL} (the first load converts its GGUF once, ~30 s)"):
        model, tok = prunus.models.load(MODEL)
    example = window_batch(tok, 2, 16, seed=1234)
    with console.status(f"optimizing: {DEFAULT_PIPELINE}"):
        opt = prunus.optimize(model, DEFAULT_PIPELINE, example_inputs=example)
    opt.source = MODEL
    console.print(prunus.report_table(opt, title=f"{MODEL}: {DEFAULT_PIPELINE}"))

    with console.status("evaluating perplexity and fidelity"):
        ppl_before = prunus.eval.perplexity(model, tok, seq_len=512, max_tokens=2048)
        ppl_after = prunus.eval.perplexity(opt, tok, seq_len=512, max_tokens=2048)
        fid = prunus.eval.fidelity(model, opt, window_batch(tok, 4, 128, seed=99))
    quality = Table(title="quality (default corpus, 2048 tokens in 512-token windows; fidelity on 4x128 tokens)")
    for col in ("", "perplexity", "top-1 agreement", "KL", "SQNR dB"):
        quality.add_column(col, justify="right")
    quality.add_row("original", f"{ppl_before:.3f}", "", "", "")
    quality.add_row("optimized", f"{ppl_after:.3f}", f"{fid['top1']:.4f}", f"{fid['kl']:.2e}", f"{fid['sqnr_db']:.1f}")
    console.print(quality)

    artifact = os.path.join(OUT, "artifact")
    with console.status("saving the artifact and exporting ONNX (checked in onnxruntime)"):
        opt.save(artifact, onnx=True)
    parity = check_parity(opt.graph, os.path.join(artifact, "model.onnx"), list(window_batch(tok, 3, 40, seed=5)))
    console.print(f"onnxruntime vs PyTorch at a new shape (3x40): max relative difference {parity:.1e}")

    prompt = tok(["The capital of France is"], return_tensors="pt").input_ids
    out = prunus.generate(opt, prompt, max_new_tokens=8)
    console.print(f"completion: 'The capital of France is' -> {tok.decode(out[0, prompt.shape[1]:])!r}")

    from prunus.dump import dump

    html_path = os.path.join(OUT, "artifact.html")
    with open(html_path, "w") as f:
        f.write(dump(artifact, "html"))
    console.print(f"artifact: {artifact}/  HTML dump: {html_path}  ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
