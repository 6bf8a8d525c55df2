"""`make demo`: capture a model, run the default pipeline with verification, export ONNX and check it."""
from __future__ import annotations

import os
import tempfile
import time

import torch
from rich.console import Console

import prunus
from prunus.codegen.onnx import check_parity
from prunus.models import example_inputs, tiny

DEFAULT_PIPELINE = "dce, fold_constants, simplify_masks"


def main() -> None:
    console = Console()
    model = tiny("llama")
    x = example_inputs(model, batch=2, seq=16)
    t0 = time.perf_counter()
    opt = prunus.optimize(model, DEFAULT_PIPELINE, example_inputs=x)
    console.print(prunus.report_table(opt, title=f"tiny llama: {DEFAULT_PIPELINE}"))
    out = tempfile.mkdtemp(prefix="prunus-demo-")
    opt.save(os.path.join(out, "artifact"), onnx=True)
    x_new = example_inputs(model, batch=3, seq=24, seed=1)
    err = check_parity(opt.graph, os.path.join(out, "artifact", "model.onnx"), list(x_new))
    torch_err = (opt(*x_new).logits - model(*x_new).logits).abs().max().item()
    console.print(f"optimized vs original at a new shape (3x24): max |diff| {torch_err:.2e}")
    console.print(f"onnxruntime vs PyTorch at 3x24: relative error {err:.2e}")
    console.print(f"artifact: {out}/artifact  ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
