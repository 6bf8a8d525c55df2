"""Token dropping quality on the CPU: SmolLM2-135M (passkey accuracy, next-token agreement with the full
model), MiniLM-L6 (embedding cosine) and a tiny random ViT (prediction agreement).

    python benchmarks/tokens_quality.py [--passkey-n 5] [--windows 16] [--seq 256] [--only smollm2|minilm|vit]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prunus  # noqa: E402
from benchmarks._report import append  # noqa: E402
from prunus.data import window_batch  # noqa: E402

DECODER_METHODS = ("attention", "cascade", "gemfilter", "ttv")


def smollm2(args) -> None:
    model, tok = prunus.models.load("smollm2-135m")
    example = window_batch(tok, 2, 16, seed=1234)
    (ids,) = window_batch(tok, args.windows, args.seq, seed=7)
    base = prunus.eval.passkey(model, tok, n=args.passkey_n, max_new_tokens=args.new_tokens)
    rows = [["none (full model)", "-", "-", f"{base:.2f}", "1.00"]]
    for method in DECODER_METHODS:
        for keep in (0.5, 0.3):
            for layer in (2, 4, 8):
                t0 = time.time()
                opt = prunus.optimize(model, f"simplify_masks, drop_tokens(method={method}, keep={keep}, "
                                             f"after_layer={layer})", example_inputs=example, verify=False)
                top1 = prunus.eval.fidelity(model, opt, (ids,))["top1"]
                acc = prunus.eval.passkey(opt, tok, n=args.passkey_n, max_new_tokens=args.new_tokens)
                rows.append([method, keep, layer, f"{acc:.2f}", f"{top1:.2f}"])
                print(rows[-1], f"{time.time() - t0:.0f}s", flush=True)
    append("Token dropping: SmolLM2-135M quality (CPU)",
           ["method", "keep", "after layer", f"passkey acc (n={args.passkey_n}, ~400 tokens)",
            f"next-token agreement ({args.windows} x {args.seq}-token windows)"], rows,
           notes="drop_tokens defaults otherwise: sink=4, protect_last=1, window=8 last queries. Passkey: "
                 "prunus.eval.passkey (chat prompt, greedy, key must appear in the answer); agreement: top-1 at the "
                 "last position, pruned vs full model.")


def minilm(args) -> None:
    model, tok = prunus.models.load("minilm-l6")
    example = (tok(["a short example sentence", "another one of a similar size"], padding=True,
                   return_tensors="pt").input_ids,)
    rows = []
    for method, queries in (("attention", "first"), ("attention", "all"), ("zerotprune", "auto"),
                            ("tome", "auto"), ("ttv", "auto")):
        for layer in (1, 2, 3):
            opt = prunus.optimize(model, f"drop_tokens(method={method}, keep=0.5, after_layer={layer}, sink=1, "
                                         f"queries={queries})", example_inputs=example, verify=False)
            cos = prunus.eval.embedding_similarity(model, opt, tok)
            rows.append([method, queries, layer, f"{cos:.4f}"])
            print(rows[-1], flush=True)
    append("Token dropping: MiniLM-L6 embedding cosine at keep 0.5 (CPU)",
           ["method", "queries", "after layer", "mean cosine vs full model (16 corpus passages)"], rows,
           notes="Embeddings are the mean of the last hidden states over the tokens each model returns (the kept "
                 "ones for the pruned model); sink=1 keeps [CLS], protect_last=1 keeps [SEP].")


def vit(args) -> None:
    model = prunus.models.tiny("vit", image_size=64, patch_size=8, num_hidden_layers=4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(256, 3, 64, 64, generator=gen)
    ref = model(images).logits.argmax(-1)
    rows = []
    for method in ("tome", "zerotprune", "attention"):
        for keep in (0.7, 0.5):
            opt = prunus.optimize(model, f"drop_tokens(method={method}, keep={keep}, after_layer=1, sink=1)",
                                  example_inputs=(images[:2],), verify=False)
            agree = (opt(images).logits.argmax(-1) == ref).float().mean().item()
            rows.append([method, keep, 1, f"{agree:.3f}"])
            print(rows[-1], flush=True)
    append("Token dropping: tiny ViT (random weights, 65 tokens, 4 layers) prediction agreement (CPU)",
           ["method", "keep", "after layer", "top-1 agreement with the unpruned model (256 random images)"], rows,
           notes="A random-weight model: the figure checks that merging/pruning preserves the function, not accuracy "
                 "on a data set.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--passkey-n", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--only", choices=("smollm2", "minilm", "vit"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    for name, fn in (("vit", vit), ("minilm", minilm), ("smollm2", smollm2)):
        if args.only in (None, name):
            fn(args)


if __name__ == "__main__":
    main()
