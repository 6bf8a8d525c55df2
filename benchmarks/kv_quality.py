"""KV-cache policies on the CPU: SmolLM2-135M long-document perplexity with a bounded cache, passkey retrieval
with 25% / 50% budgets, and agreement of greedy continuations with the full cache.

    python benchmarks/kv_quality.py [--tokens 2048] [--chunk 32] [--passkey-n 20] [--context 400]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import prunus  # noqa: E402
from benchmarks._report import append  # noqa: E402
from prunus.data import default_corpus  # noqa: E402
from prunus.passes.kv import KVDecoder  # noqa: E402
from prunus.passes.kv.cache import KVCacheParams, kv_bytes_per_token  # noqa: E402

POLICIES = ["streaming", "h2o", "tova", "snapkv", "pyramidkv", "chunkkv", "vatp", "knorm"]
BUDGETS = [128, 256, 512]
# how the per-head policies read `budget` / `ratio` (all other policies: entries per layer and KV head)
BUDGET_MEANING = {
    "adakv": "adakv: budget x 3 KV heads entries per layer shared by the heads (SnapKV scores, 20% floor per head)",
    "think": "think: SnapKV's token selection at the budget, plus half of each head's key channels dropped "
             "(key_ratio 0.5) from the entries older than the 32-entry window",
    "kvzip": "kvzip: entries per layer and KV head, scored by the attention of the prompt fed again after itself",
    "duo": "duo: the budget bounds the streaming heads only; the retrieval heads (half of the 90 KV heads, chosen "
           "by the kv_cache pass's synthetic passkey profiling) keep every entry",
}


def agreement(opt, model_ids, ref: torch.Tensor, new: int) -> float:
    out = prunus.generate(opt, model_ids, new)
    return (out[:, model_ids.shape[1]:] == ref[:, model_ids.shape[1]:]).float().mean().item()


def cache_after_prefill(graph, doc: torch.Tensor) -> tuple[int, int]:
    """(allocated, held) cache bytes per token after a prefill of `doc` under the graph's policy (they differ by
    a ragged layout's padding: adakv's heads padded to the longest)."""
    dec = KVDecoder(graph)
    with torch.no_grad():
        dec.feed(doc)
    return round(dec.cache_bytes() / doc.shape[1]), round(dec.held_bytes() / doc.shape[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048, help="document length for long-context perplexity")
    ap.add_argument("--chunk", type=int, default=32, help="tokens per decode step while streaming the document")
    ap.add_argument("--passkey-n", type=int, default=20)
    ap.add_argument("--context", type=int, default=400, help="passkey context tokens")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    policies = args.policies.split(",")

    model, tok = prunus.models.load("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    opt = prunus.optimize(model, "kv_cache", example_inputs=(ids,))
    graph = opt.graph

    def use(**params):
        graph.kv = KVCacheParams(**params).spec()

    text = default_corpus()
    prompts = torch.stack([tok(text[i * 5000:], return_tensors="pt").input_ids[0, :300] for i in range(4)])
    new = 32

    use(policy="full")
    t0 = time.perf_counter()
    full_ppl = prunus.eval.long_ppl(opt, tok, max_tokens=args.tokens, chunk=args.chunk)
    full_pk = prunus.eval.passkey(opt, tok, context_tokens=args.context, n=args.passkey_n)
    ref = prunus.generate(opt, prompts, new)
    print(f"full: ppl {full_ppl:.3f} passkey {full_pk:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = [["full", "-", f"{full_ppl:.3f}", "-", "-", f"{full_pk:.2f}", f"{full_pk:.2f}", "1.000"]]
    kv_bytes = {("full", None): kv_bytes_per_token(graph, context=args.tokens)}
    doc = tok(text, return_tensors="pt").input_ids[:, :args.tokens]
    layout = {}
    for policy in policies:
        t0 = time.perf_counter()
        ppl = []
        for budget in BUDGETS:
            use(policy=policy, budget=budget)
            kv_bytes[policy, budget] = kv_bytes_per_token(graph, context=args.tokens)
            layout[policy, budget] = cache_after_prefill(graph, doc)
            ppl.append(prunus.eval.long_ppl(opt, tok, max_tokens=args.tokens, chunk=args.chunk))
        pk = []
        for ratio in (0.25, 0.5):
            use(policy=policy, ratio=ratio)
            pk.append(prunus.eval.passkey(opt, tok, context_tokens=args.context, n=args.passkey_n))
        use(policy=policy, budget=128)
        agree = agreement(opt, prompts, ref, new)
        rows.append([policy, "sink 4, window 32", *(f"{p:.3f}" for p in ppl), *(f"{p:.2f}" for p in pk),
                     f"{agree:.3f}"])
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    notes = (f"SmolLM2-135M (fp32). Long-document perplexity: the first {args.tokens} tokens of the default corpus "
             f"(`pydoc_data.topics`) as one document, streamed {args.chunk} tokens per decode step through the KV "
             f"graphs (`prunus.eval.long_ppl(..., chunk={args.chunk})`), the cache evicted back to the budget (entries "
             "per layer and KV head) after every step, so within a step it briefly holds budget + chunk entries. "
             f"Passkey: `prunus.eval.passkey(context_tokens={args.context}, n={args.passkey_n})` with the budget a "
             f"ratio of the prompt. Agreement: share of {new} greedy tokens equal to the full cache's, from 4 "
             "300-token corpus prompts, budget 128. Every policy keeps 4 sink and the 32 most recent positions; "
             "snapkv/pyramidkv/vatp pool scores over 7 tokens, chunkkv uses chunks of 10 shared by 2 layers.")
    meanings = [BUDGET_MEANING[p] for p in policies if p in BUDGET_MEANING]
    if meanings:
        notes += " Budgets of the per-head policies: " + "; ".join(meanings) + "."
    notes += (f" KV bytes per token of a {args.tokens}-token document (`kv_bytes_per_token`; entries the heads hold) "
              f"at budgets {'/'.join(map(str, BUDGETS))}: full {kv_bytes['full', None]}; "
              + "; ".join(f"{p} " + "/".join(str(kv_bytes[p, b]) for b in BUDGETS) for p in policies) + ".")
    notes += (f" Measured after a {doc.shape[1]}-token prefill, allocated (held) bytes per token, the difference "
              "being a ragged layout's padding: "
              + "; ".join(f"{p} " + "/".join(f"{layout[p, b][0]} ({layout[p, b][1]})" for b in BUDGETS)
                          for p in policies) + ".")
    print(append("KV-cache policies: SmolLM2-135M long-context perplexity, passkey, greedy agreement",
                 ["policy", "protected", "ppl @128", "ppl @256", "ppl @512", "passkey 25%", "passkey 50%",
                  "agreement @128"], rows, notes))


if __name__ == "__main__":
    main()
