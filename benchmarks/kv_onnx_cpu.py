"""SmolLM2-135M: greedy generation over the KV graphs in ONNX Runtime against the same graphs in PyTorch.

One kv_cache model (snapkv, so the exported graphs report the scores a policy reads) is exported once to
prefill.onnx / decode.onnx; the full cache and snapkv with a budget then decode a passkey prompt in both
runtimes. Columns: greedy tokens equal out of the new ones, the largest logit difference over all steps,
the answer, peak cache bytes and decode tokens/s of each runtime.

    python benchmarks/kv_onnx_cpu.py [--context 300] [--new 32] [--budget 128] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunus  # noqa: E402
from benchmarks._report import append  # noqa: E402
from prunus.codegen.onnx import OrtKVDecoder, export_kv_onnx  # noqa: E402
from prunus.data import window_batch  # noqa: E402
from prunus.eval.passkey import prompt  # noqa: E402
from prunus.passes.kv import KVDecoder  # noqa: E402

KEY = 52917


def _greedy(dec, ids: torch.Tensor, new: int):
    """Greedy tokens and every step's logits of the last position, decode tokens/s, peak cache bytes."""
    logits = [dec.feed(ids)[:, -1]]
    peak, tokens = dec.cache_bytes(), []
    start = time.perf_counter()
    for _ in range(new):
        tokens.append(logits[-1].argmax(-1, keepdim=True))
        if len(tokens) == new:
            break
        logits.append(dec.feed(tokens[-1])[:, -1])
        peak = max(peak, dec.cache_bytes())
    rate = (new - 1) / (time.perf_counter() - start)
    return torch.cat(tokens, dim=1), torch.stack(logits, 1), rate, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="PyTorch and onnxruntime intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = prunus.models.load("smollm2-135m")
    pipeline = f"kv_cache(policy=snapkv, budget={args.budget})"
    opt = prunus.optimize(model, pipeline, example_inputs=window_batch(tok, 2, 16, seed=1234))
    ids = prompt(tok, args.context, KEY, 0.5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        export_kv_onnx(opt.graph, tmp)
        export_s = time.perf_counter() - t0
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        for label, spec in (("full", {"policy": "full"}), (f"snapkv, budget {args.budget}", None)):
            want, want_logits, pt_rate, pt_peak = _greedy(KVDecoder(opt.graph, spec), ids, args.new)
            ort = OrtKVDecoder(tmp, spec, threads=args.threads)
            got, got_logits, ort_rate, ort_peak = _greedy(ort, ids, args.new)
            same = int((got == want).sum())
            first = next((i for i in range(args.new) if got[0, i] != want[0, i]), None)
            # logits are comparable up to the first differing token (after it the inputs differ)
            upto = args.new if first is None else first + 1
            diff = (got_logits[:, :upto] - want_logits[:, :upto]).abs().max().item()
            answer = " ".join(tok.decode(got[0], skip_special_tokens=True).split()).replace("|", "/")
            rows.append([label, ids.shape[1], f"{same}/{args.new}", f"{diff:.1e}", f"`{answer[:48]}`",
                         str(KEY) in answer, f"{pt_peak / 1e6:.2f} / {ort_peak / 1e6:.2f}",
                         f"{pt_rate:.1f}", f"{ort_rate:.1f}"])
            print(rows[-1], flush=True)
    notes = (f"One passkey prompt (key {KEY} at half depth, chat format, {ids.shape[1]} tokens), greedy, batch 1. "
             f"Both runtimes run the same Python policy between steps, {args.threads} intra-op thread(s) each "
             "(onnxruntime: CPUExecutionProvider). Export of prefill.onnx + decode.onnx (with "
             f"parity checks): {export_s:.0f} s, {size / 1e6:.0f} MB. `max logit diff`: largest absolute difference over every step up to the "
             "first differing token.")
    print(append("SmolLM2-135M: KV-cache decoding in ONNX Runtime against PyTorch (CPU)",
                 ["policy", "prompt tokens", "greedy equal", "max logit diff", "ORT answer", "key found",
                  "peak cache MB (PT / ORT)", "PyTorch tok/s", "ORT tok/s"], rows, notes))


if __name__ == "__main__":
    main()
