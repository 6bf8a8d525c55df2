"""prunus KV-cache policies side by side with kvpress (NVIDIA) on SmolLM2-135M: the same weights, the same
prompt ids, the same greedy decoding; passkey accuracy, agreement of the two sides' outputs and kept entries,
and the KV bytes each side really holds.

    python benchmarks/kv_kvpress.py [--n 5] [--contexts 400,600] [--keeps 0.25,0.5] [--policies ...]

The defaults took 50 min wall on the shared 2-core CPU machine at load average 5-9 (the two sides run
concurrently, one thread each); lower --n for a quicker look.

kvpress 0.5.5 needs transformers<5.3, so it runs in its own environment, `.venv-peers` (git-ignored), which
this script creates on first use (once, a few minutes, about 1 GB):

    python3 -m venv .venv-peers && .venv-peers/bin/pip install torch==2.13.0 "transformers<5.3" kvpress==0.5.5

The main process (prunus's environment) builds the passkey prompts (`prunus.eval.passkey.prompt`, seeded like
`prunus.eval.passkey`), writes their ids to a temporary folder and starts this same file with `--peer` under
`.venv-peers/bin/python`, which loads the fp32 safetensors that `prunus.models.load("smollm2-135m")` cached
(transformers' `AutoModelForCausalLM`) and runs every press on the same ids while prunus runs its policies.

Matching the semantics:
- kvpress compresses the prompt once, at prefill (`compression_ratio` = fraction removed), then the cache grows
  by the generated tokens. prunus evicts at prefill and again at every decode step. prunus gets a budget of
  exactly the entries kvpress keeps (`int(n * keep)` per layer and KV head) and, from the same compressed
  cache, decodes twice: once with the budget raised by the tokens to generate (kvpress's semantics: the
  implementations compared) and once bounded, as prunus ships (never holding more than kvpress).
- The whole prompt is compressed on both sides (kvpress's pipeline would leave the question uncompressed);
  the first answer token comes from the prefill's last logits, decoding then feeds one token at a time
  with explicit positions (kvpress's own `generate_answer` does the same).
- Protected positions and pooling follow kvpress's defaults on both sides (see PAIRS), except h2o, which keeps
  prunus's recent window: H2O sums the attention a key receives, which without a window evicts the prompt's
  end (the question), while kvpress's ObservedAttentionPress divides by the number of queries instead.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_DIR = os.path.join(ROOT, ".venv-peers")
PEER_PY = os.path.join(PEER_DIR, "bin", "python")
PEER_PINS = ["torch==2.13.0", "transformers<5.3", "kvpress==0.5.5"]

WINDOW, POOL, CHUNK = 64, 5, 20  # kvpress's SnapKV window_size / kernel_size and ChunkKV chunk_length defaults

# policy -> (prunus KVCacheParams besides policy/budget, the kvpress press it is compared with)
PAIRS = {
    "streaming": (dict(sink=4, window=0), "StreamingLLMPress(n_sink=4)"),
    "snapkv": (dict(sink=0, window=WINDOW, pool=POOL), f"SnapKVPress(window_size={WINDOW}, kernel_size={POOL})"),
    "pyramidkv": (dict(sink=0, window=WINDOW, pool=POOL),
                  f"PyramidKVPress(window_size={WINDOW}, kernel_size={POOL}, beta=20)"),
    "tova": (dict(sink=0, window=1), "TOVAPress()"),
    "knorm": (dict(sink=0, window=0), "KnormPress()"),
    # H2O sums attention and keeps a recent window; kvpress's ObservedAttention averages and protects nothing.
    "h2o": (dict(sink=4, window=32), "ObservedAttentionPress() (eager attention)"),
    "chunkkv": (dict(sink=0, window=WINDOW, pool=POOL, chunk=CHUNK, reuse=1),
                f"ChunkKVPress(SnapKVPress({WINDOW}, {POOL}), chunk_length={CHUNK})"),
    "adakv": (dict(sink=0, window=WINDOW, pool=POOL), f"AdaKVPress(SnapKVPress({WINDOW}, {POOL}), alpha_safeguard=0.2)"),
}


def n_kept(n: int, keep: float) -> int:
    """Entries kvpress keeps of an `n`-token prompt (kvpress.utils.compute_n_kept with ratio 1 - keep)."""
    return max(1, int(n * (1 - (1 - keep))))


def run_key(policy: str, keep: float, context: int, trial: int) -> str:
    return f"{policy}|{keep}|{context}|{trial}"


# ---------------------------------------------------------------------------------------------------------
# kvpress side: runs under .venv-peers/bin/python; imports nothing from prunus.
# ---------------------------------------------------------------------------------------------------------
def _make_press(policy: str, keep: float):
    import kvpress

    cr = 1.0 - keep
    snap = lambda: kvpress.SnapKVPress(compression_ratio=cr, window_size=WINDOW, kernel_size=POOL)  # noqa: E731
    return {
        "streaming": lambda: kvpress.StreamingLLMPress(compression_ratio=cr, n_sink=4),
        "snapkv": snap,
        "pyramidkv": lambda: kvpress.PyramidKVPress(compression_ratio=cr, window_size=WINDOW, kernel_size=POOL),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=cr),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=cr),
        "h2o": lambda: kvpress.ObservedAttentionPress(compression_ratio=cr),
        "chunkkv": lambda: kvpress.ChunkKVPress(press=snap(), chunk_length=CHUNK),
        "adakv": lambda: kvpress.AdaKVPress(press=snap(), alpha_safeguard=0.2),
    }[policy]()


def _record_kept(press, kept: dict):
    """Wrap `press.compress` so the positions each layer keeps (or, for masking presses, leaves unmasked) are
    recorded in `kept[layer]` as a bool [kv_heads, n] mask; kept keys are found among the prompt's keys."""
    inner = press.compress

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        out_k, out_v = inner(module, hidden_states, keys, values, attentions, kwargs)
        mask = torch.zeros(keys.shape[1], keys.shape[2], dtype=torch.bool)
        masked = getattr(module, "masked_key_indices", None)
        if out_k.shape[2] == keys.shape[2] and masked is not None:  # AdaKV: full tensors, masked entries
            mask[:] = True
            _, heads, seqs = masked
            mask[heads, seqs] = False
        else:
            dist = torch.cdist(out_k[0].float(), keys[0].float())  # [kv_heads, kept, n]
            mask.scatter_(1, dist.argmin(-1), True)
        kept[module.layer_idx] = mask
        return out_k, out_v

    press.compress = compress


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


@torch.no_grad()
def _kvpress_generate(model, press, ids: torch.Tensor, max_new: int, eos: int | None):
    """Greedy decoding with `press` compressing the prompt at prefill; (new tokens, prefill bytes, peak bytes,
    kept mask [layers, kv_heads, n] or None)."""
    from transformers import DynamicCache

    cache, kept = DynamicCache(), {}
    n = ids.shape[1]
    if press is None:
        out = model(ids, past_key_values=cache, use_cache=True)
    else:
        _record_kept(press, kept)
        with press(model):
            out = model(ids, past_key_values=cache, use_cache=True)
    prefill = peak = _cache_bytes(cache)
    tokens = []
    for i in range(max_new):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token == eos or i == max_new - 1:
            break
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                    position_ids=torch.tensor([[n + i]]))
        peak = max(peak, _cache_bytes(cache))
    mask = torch.stack([kept[i] for i in sorted(kept)]) if kept else None
    return tokens, prefill, peak, mask


def peer_main(job_dir: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    torch.set_num_threads(1)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with open(os.path.join(job_dir, "job.json")) as f:
        job = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32).eval()
    results, t0 = {}, time.perf_counter()
    for policy, keep in job["runs"]:
        # ObservedAttentionPress scores from the attention weights, which only eager attention returns
        model.config._attn_implementation = "eager" if policy == "h2o" else "sdpa"
        for context, prompts in job["prompts"].items():
            for trial, ids in enumerate(prompts):
                press = None if policy == "full" else _make_press(policy, keep)
                tokens, prefill, peak, mask = _kvpress_generate(model, press, torch.tensor([ids]), job["max_new"],
                                                                job["eos"])
                results[run_key(policy, keep, int(context), trial)] = {
                    "tokens": tokens, "prefill_bytes": prefill, "peak_bytes": peak, "kept": mask}
        print(f"kvpress {policy} keep {keep}: {time.perf_counter() - t0:.0f} s", flush=True)
    torch.save(results, os.path.join(job_dir, "kvpress.pt"))


# ---------------------------------------------------------------------------------------------------------
# prunus side and the report
# ---------------------------------------------------------------------------------------------------------
def ensure_peer_env() -> str:
    """The peer interpreter, creating .venv-peers with kvpress on first use."""
    probe = [PEER_PY, "-c", "import kvpress"]
    if os.path.exists(PEER_PY) and subprocess.run(probe, capture_output=True).returncode == 0:
        return PEER_PY
    print(f"creating {PEER_DIR} with {' '.join(PEER_PINS)} (once)", flush=True)
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", PEER_DIR], check=True)
    subprocess.run([PEER_PY, "-m", "pip", "install", "-q", *PEER_PINS], check=True)
    subprocess.run(probe, check=True, capture_output=True)
    return PEER_PY


def _greedy(dec, logits: torch.Tensor, max_new: int, eos: int | None) -> tuple[list[int], int]:
    """Continue greedy decoding from the prefill's `logits` (`prunus.generate`'s loop); (tokens, peak bytes)."""
    tokens, peak = [], dec.cache_bytes()
    for i in range(max_new):
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        if token == eos or i == max_new - 1:
            break
        logits = dec.feed(torch.tensor([[token]]))
        peak = max(peak, dec.cache_bytes())
    return tokens, peak


@torch.no_grad()
def prunus_generate(opt, ids: torch.Tensor, max_new: int, eos: int | None) -> dict:
    """One prefill under the graph's KV policy, then two greedy continuations from the same compressed cache:
    `prefill_only`, the decoder's budgets raised by `max_new` so nothing is evicted while decoding (kvpress's
    semantics), and `bounded`, prunus as it ships (evicting back to the budget after every token). Also the
    cache bytes after prefill and the kept mask [layers, kv_heads, n]."""
    from prunus.eval.decode import decoder

    dec = decoder(opt)
    logits = dec.feed(ids)
    # The decoder's state after prefill; decoding replaces these tensors rather than writing into them.
    caches, position, budgets = list(dec.caches), dec.position, list(dec.policy.budgets)
    mask = torch.zeros(len(caches), caches[0].pos.shape[1], ids.shape[1], dtype=torch.bool)
    for i, c in enumerate(caches):
        # [kv_heads, n]; a ragged (adakv) cache pads each head with position -1: those land in a spare column
        pos = c.pos[0].masked_fill(c.pos[0] < 0, ids.shape[1])
        mask[i] = torch.zeros(pos.shape[0], ids.shape[1] + 1, dtype=torch.bool).scatter_(1, pos, True)[:, :-1]
    out = {"prefill_bytes": dec.cache_bytes(), "kept": mask}
    for variant, extra in (("prefill_only", max_new), ("bounded", 0)):
        dec.caches = [copy.copy(c) for c in caches]  # any layout; decoding replaces tensors, never writes into them
        dec.position = position
        dec.policy.budgets = [None if b is None else b + extra for b in budgets]
        out[variant] = _greedy(dec, logits, max_new, eos)
        if all(b is None for b in budgets):  # the full cache: both variants are the same run
            out["bounded"] = out[variant]
            break
    return out


def _padded(tokens: list[int], length: int, eos: int | None) -> list[int]:
    return tokens + [eos if eos is not None else -1] * (length - len(tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5, help="passkey trials per context length")
    ap.add_argument("--contexts", default="400,600", help="passkey context lengths (tokens)")
    ap.add_argument("--keeps", default="0.25,0.5", help="budgets as the kept fraction of the prompt")
    ap.add_argument("--policies", default=",".join(PAIRS))
    ap.add_argument("--max-new", type=int, default=16, help="greedy tokens per trial (prunus.eval.passkey's 16)")
    ap.add_argument("--report", default=None, help="markdown file to append the table to (default BENCHMARKS.md)")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return peer_main(args.peer)

    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    import random

    import prunus
    from benchmarks._report import append
    from prunus.eval.passkey import prompt
    from prunus.models.zoo import cache_dir
    from prunus.passes.kv.cache import KVCacheParams
    from prunus.passes.kv.policies import POLICIES

    peer_py = ensure_peer_env()
    contexts = [int(c) for c in args.contexts.split(",")]
    keeps = [float(k) for k in args.keeps.split(",")]
    policies = args.policies.split(",")
    model, tok = prunus.models.load("smollm2-135m")
    eos = tok.eos_token_id
    prompts, keys = {}, {}
    for context in contexts:  # the trials of prunus.eval.passkey(context_tokens=context, n=args.n, seed=0)
        rng = random.Random(0)
        prompts[context], keys[context] = [], []
        for _ in range(args.n):
            key, depth = rng.randint(10000, 99999), rng.random()
            prompts[context].append(prompt(tok, context, key, depth)[0].tolist())
            keys[context].append(key)
    runs = [("full", 1.0)] + [(p, k) for p in policies for k in keeps]

    job_dir = tempfile.mkdtemp(prefix="kv_kvpress_")
    with open(os.path.join(job_dir, "job.json"), "w") as f:
        json.dump({"model_dir": os.path.join(cache_dir(), "smollm2-135m"), "eos": eos, "max_new": args.max_new,
                   "runs": runs, "prompts": {str(c): p for c, p in prompts.items()}}, f)
    t0 = time.perf_counter()
    peer = subprocess.Popen([peer_py, os.path.abspath(__file__), "--peer", job_dir])  # runs while prunus runs

    ids0 = torch.tensor([prompts[contexts[0]][0]])
    opt = prunus.optimize(model, "kv_cache", example_inputs=(ids0[:, :32],))
    ours = {}
    for policy, keep in runs:
        if policy != "full" and policy not in POLICIES:
            print(f"prunus has no policy {policy}: kvpress only", flush=True)
            continue
        for context in contexts:
            for trial, ids in enumerate(prompts[context]):
                if policy == "full":
                    opt.graph.kv = KVCacheParams(policy="full").spec()
                else:
                    budget = n_kept(len(ids), keep)
                    opt.graph.kv = KVCacheParams(policy=policy, budget=budget, **PAIRS[policy][0]).spec()
                ours[run_key(policy, keep, context, trial)] = prunus_generate(opt, torch.tensor([ids]), args.max_new,
                                                                              eos)
        print(f"prunus {policy} keep {keep}: {time.perf_counter() - t0:.0f} s", flush=True)
    if peer.wait() != 0:
        raise SystemExit(f"the kvpress run failed (exit {peer.returncode}); its job is in {job_dir}")
    theirs = torch.load(os.path.join(job_dir, "kvpress.pt"))
    elapsed = time.perf_counter() - t0

    def found(tokens, context, trial) -> int:
        return int(str(keys[context][trial]) in tok.decode(tokens, skip_special_tokens=True))

    def mean(xs, fmt, scale=1.0):
        return fmt.format(sum(xs) / len(xs) / scale) if xs else "-"

    rows = []
    for policy, keep in runs:
        cells, discord, agree, overlap, bytes_p, bytes_k = [], 0, [], [], [], []
        for context in contexts:
            hits = {"p": 0, "k": 0, "b": 0}
            for trial in range(args.n):
                key = run_key(policy, keep, context, trial)
                k, p = theirs[key], ours.get(key)
                hits["k"] += found(k["tokens"], context, trial)
                if context == contexts[-1]:
                    bytes_k.append(k["peak_bytes"])
                if p is None:
                    continue
                tokens, _ = p["prefill_only"]
                hits["p"] += found(tokens, context, trial)
                hits["b"] += found(p["bounded"][0], context, trial)
                discord += found(tokens, context, trial) != found(k["tokens"], context, trial)
                a, b = _padded(tokens, args.max_new, eos), _padded(k["tokens"], args.max_new, eos)
                agree.append(sum(x == y for x, y in zip(a, b)) / args.max_new)
                if k["kept"] is not None:
                    overlap.append((p["kept"] & k["kept"]).sum().item() / max(1, k["kept"].sum().item()))
                if context == contexts[-1]:
                    bytes_p.append(p["bounded"][1])
            ours_run = run_key(policy, keep, context, 0) in ours
            cells.append(" / ".join(f"{hits[s] / args.n:.2f}" if ours_run or s == "k" else "-" for s in "pkb"))
        total = len(agree)
        rows.append([policy, "-" if policy == "full" else f"{keep:.0%}", *cells,
                     f"{discord}/{total}" if total else "-", mean(agree, "{:.3f}"), mean(overlap, "{:.3f}"),
                     f"{mean(bytes_p, '{:.0f}', 1024)} / {mean(bytes_k, '{:.0f}', 1024)}"])
        print(rows[-1], flush=True)

    params = "; ".join(f"{p}: prunus {', '.join(f'{k}={v}' for k, v in PAIRS[p][0].items())} vs `{PAIRS[p][1]}`"
                       for p in policies)
    notes = (
        f"SmolLM2-135M fp32 on both sides; prunus through its `kv_cache` graphs, kvpress 0.5.5 (transformers 5.2, "
        "in `.venv-peers`) on transformers' `LlamaForCausalLM` loaded from the same safetensors with SDPA attention "
        "(eager for ObservedAttentionPress, which needs the weights). Identical prompt ids on both sides: the "
        f"trials of `prunus.eval.passkey(context_tokens=c, n={args.n}, seed=0)` for c in {contexts} (chat "
        f"template), the whole prompt compressed at prefill, then {args.max_new} greedy tokens (stop at EOS); a "
        "trial counts when the 5-digit key is in the answer. Budget: the kept fraction of the prompt; kvpress "
        "keeps `int(n * keep)` entries per layer and KV head (`compression_ratio = 1 - keep`), prunus gets the "
        "same number as its budget. Passkey columns: prunus / kvpress / prunus bounded. The first prunus figure "
        "uses kvpress's semantics (the prompt compressed once, the generated tokens appended: the decoder's "
        f"budget raised by {args.max_new} after prefill); 'bounded' is prunus as it ships, continuing from the "
        "same compressed cache but evicting back to the budget after every generated token (with window 0, as "
        "knorm is matched here, a just-generated token can be evicted; prunus's default protects the last 32). "
        "discordant: paired trials (both contexts) that exactly one of prunus / kvpress answered. token "
        "agreement: share of the greedy tokens equal on both sides (EOS-padded). kept overlap: share of "
        "kvpress's kept (layer, head, position) entries after prefill that prunus also keeps (AdaKV: the "
        f"entries it leaves unmasked). Peak KV: the largest key+value bytes held while generating, mean over the "
        f"~{contexts[-1]}-token trials, prunus bounded / kvpress; kvpress appends the generated tokens, and its "
        "AdaKV keeps the full tensors and masks the evicted keys (its attention_patch.py: 'does not reduce peak "
        "memory'). Parameters: " + params + ". kvpress's PyramidKV falls back to uniform SnapKV budgets when its "
        f"smallest layer budget would fall below window_size (every setting here: a pyramid needs about 20 x "
        f"{WINDOW} kept tokens); prunus's pyramid clamps the smallest layers at sink + window instead. kvpress's "
        "TOVA and prunus's (since 43cec75) both average the last query's attention over all heads of a layer "
        "(every KV head keeps the same entries, as TOVA's reference code). kvpress's "
        "ObservedAttention divides each key's summed attention by the number of queries that see it and protects "
        "nothing; prunus's h2o sums (H2O), which without a recent window evicts the end of the prompt, so it keeps "
        "its default sink 4 / window 32 here. Process peak memory is not shown: 538 MB of weights and the prefill activations dwarf a "
        f"cache of at most ~{contexts[-1] * 46 // 1000} MB. Both sides ran concurrently: {elapsed / 60:.0f} min "
        "wall in all.")
    cols = ["policy", "budget", *(f"passkey ~{c}" for c in contexts), "discordant", "token agreement",
            "kept overlap", f"peak KV KiB ~{contexts[-1]}"]
    print(append("KV-cache policies side by side with kvpress: SmolLM2-135M passkey, agreement, KV bytes",
                 cols, rows, notes, path=args.report))


if __name__ == "__main__":
    main()
