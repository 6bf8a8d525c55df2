"""`kv_cache`: give a decoder explicit prefill/decode graphs and a cache policy.

The pass checks that the model's attention can be rewritten (causal SDPA layers, token ids as the one
input), builds the prefill and decode graphs (`rewrite.py`) and proves the rewrite exact on the example
inputs: prefilling a prefix and then decoding the remaining tokens one at a time must reproduce the
full-sequence logits. The main graph keeps computing the same thing (masks may be simplified); the
policy is recorded on the graph (`graph.kv`) and applied whenever the model is decoded (`prunus.generate`,
`prunus.eval`), where the cache really shrinks (`policies.py`, `runtime.py`; the per-head layouts of adakv,
think and duo are in `storage.py`). For duo the pass also classifies the KV heads (`duo.py`, a profiling run on
synthetic passkey data) and records the retrieval heads in the spec, so a saved model keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunus.errors import PassError
from prunus.passes.base import Pass, PassResult, param
from prunus.passes.cleanup.simplify_masks import SimplifyMasks, shape_only_ancestors
from prunus.passes.kv.policies import POLICIES, Policy
from prunus.passes.kv.quantized import quantized_bytes
from prunus.passes.kv.rewrite import attention_layers, token_drops
from prunus.passes.kv.runtime import KVDecoder, duo_classification, kv_graphs, make_policy, resolve_spec
from prunus.passes.registry import register
from prunus.passes.tokens.drop import is_causal

REFERENCE_CONTEXT = 4096  # context length at which the report states KV bytes per token
EXACT_RTOL = 1e-4  # fp32; lower-precision graphs get a tolerance scaled to their rounding (exact_rtol)
THINK_KEY_RATIO = 0.5
DUO_RETRIEVAL = 0.5
UNBUDGETED = ("streaming", "think", "duo")  # policies that run without a budget (sink + window; every token)


@dataclass(kw_only=True)
class KVCacheParams:
    policy: str = param("full", "which entries each layer keeps", choices=tuple(POLICIES))
    budget: int | None = param(None, "entries kept per layer and KV head (tokens); adakv: the mean over a layer's "
                                     "heads; duo: per streaming head", range="[1, inf)")
    ratio: float | None = param(None, "entries kept as a fraction of the prompt, instead of budget", range="(0, 1]")
    sink: int = param(4, "first positions never evicted (attention sinks)", range="[0, inf)")
    window: int = param(32, "most recent positions never evicted; the observation window of snapkv-style "
                            "scorers and think's channel scores; streaming and duo without a budget keep "
                            "sink + window", range="[0, inf)")
    pool: int = param(7, "snapkv/pyramidkv/vatp/adakv/think: width of the average pool smoothing the scores",
                      range="[1, 129]")
    chunk: int = param(10, "chunkkv: tokens per chunk", range="[1, 4096]")
    reuse: int = param(2, "chunkkv: neighbouring layers sharing one selection", range="[1, 1024]")
    slack: int = param(0, "entries a layer may hold past its budget while decoding before it evicts back to the "
                          "budget: eviction (a gather of the cache) then runs once every slack + 1 tokens, and the "
                          "cache peaks at budget + slack", range="[0, inf)")
    key_ratio: float | None = param(None, f"think: fraction of each head's key channels kept (default "
                                          f"{THINK_KEY_RATIO})", range="(0, 1]")
    retrieval: float | None = param(None, f"duo: fraction of the KV heads (over all layers) kept whole as retrieval "
                                          f"heads (default {DUO_RETRIEVAL})", range="[0, 1]")

    def check(self) -> str | None:
        if self.budget is not None and self.ratio is not None:
            return "give at most one of budget and ratio"
        if self.key_ratio is not None and self.policy != "think":
            return f"key_ratio prunes key channels under policy think, not {self.policy}"
        if self.retrieval is not None and self.policy != "duo":
            return f"retrieval chooses duo's retrieval heads; it does not apply to policy {self.policy}"
        if self.policy == "full":
            if self.slack:
                return "slack delays eviction; policy full evicts nothing: drop slack or choose an eviction policy"
            if self.budget is not None or self.ratio is not None:
                return "policy full keeps every entry: drop budget/ratio or choose an eviction policy"
            return None
        if self.policy == "think" and self.window < 1:
            return "think scores key channels with the last `window` queries of the prompt: window must be >= 1"
        if self.budget is None and self.ratio is None and self.policy not in UNBUDGETED:
            return f"policy {self.policy} needs a budget (tokens) or a ratio"
        if self.budget is not None and self.budget < self.sink + self.window:
            return (f"budget {self.budget} is below sink + window = {self.sink} + {self.window}; lower sink or "
                    "window, or raise the budget")
        return None

    def spec(self) -> dict:
        out = {"policy": self.policy, "sink": self.sink, "window": self.window, "pool": self.pool,
               "chunk": self.chunk, "reuse": self.reuse}
        if self.policy in ("streaming", "duo") and self.budget is None and self.ratio is None:
            out["budget"] = self.sink + self.window
        if self.budget is not None:
            out["budget"] = self.budget
        if self.ratio is not None:
            out["ratio"] = self.ratio
        if self.slack:
            out["slack"] = self.slack
        if self.policy == "think":
            out["key_ratio"] = THINK_KEY_RATIO if self.key_ratio is None else self.key_ratio
        if self.policy == "duo":
            out["retrieval"] = DUO_RETRIEVAL if self.retrieval is None else self.retrieval
        return out


def _cache_elem(site) -> int:
    val = site.node.args[1].meta.get("val")
    return val.element_size() if isinstance(val, torch.Tensor) else 4


def _layer_bytes(graph) -> list[int]:
    """Cache bytes per token of context of every attention layer (keys + values, full cache)."""
    return [2 * site.num_kv_heads * site.head_dim * _cache_elem(site) for site in graph.analysis("attention_sites")]


def _size_only(mask) -> bool:
    """A mask computed from sizes alone (a causal or windowed mask not yet simplified), not from an input."""
    return mask is not None and shape_only_ancestors(mask) is not None


def _tokens_at(site, context: int) -> int:
    """Prompt tokens a layer caches for a `context`-token prompt: its keys' sequence size (a SymInt of the
    sequence, e.g. ceil(s / 2) after a drop_tokens point) evaluated at `context`."""
    size = site.node.args[1].meta["val"].shape[2] if "val" in site.node.args[1].meta else context
    if not isinstance(size, torch.SymInt):
        return context
    free = list(size.node.expr.free_symbols)
    if len(free) != 1:
        return context
    return max(1, min(context, int(size.node.expr.subs(free[0], context))))


def kv_bytes_per_token(graph, context: int = REFERENCE_CONTEXT) -> int | None:
    """Cache bytes per token of a `context`-token prompt under the graph's policy (and `kv_quant`'s storage, as
    the cache holds it after prefill); None without a causal cache."""
    try:
        sites = graph.analysis("attention_sites")
    except Exception:  # noqa: BLE001 - a graph the analysis cannot read has no cache to report
        return None
    if not sites or not all(s.is_causal or _size_only(s.mask) for s in sites):
        return None
    sites = sorted(sites, key=lambda s: s.layer)
    spec = resolve_spec(graph, graph.kv or {"policy": "full"})
    policy: Policy = make_policy(spec, len(sites))
    tokens = [_tokens_at(s, context) for s in sites]  # fewer after a drop_tokens point
    if spec.get("quant"):
        budgets = policy.layer_budgets(context)
        kept = [n if b is None else min(b, n) for b, n in zip(budgets, tokens)]
        total = sum(quantized_bytes(n, s.num_kv_heads, s.head_dim, s.head_dim, _cache_elem(s), spec["quant"])
                    for s, n in zip(sites, kept))
        return round(total / context)
    # entries held over each layer's heads (adakv: exactly budget x heads, whatever the padding of its layout),
    # each a key (think: of the kept channels, outside the window) and a full value
    entries = [min(e, s.num_kv_heads * n)
               for e, s, n in zip(policy.layer_entries(context, [s.num_kv_heads for s in sites]), sites, tokens)]
    total = sum((policy.key_elements(n, s.num_kv_heads, s.head_dim) + n * s.head_dim) * _cache_elem(s)
                for s, n in zip(sites, entries))
    return round(total / context)


def exact_rtol(graph) -> float:
    """Tolerance of the prefill+decode check: 1e-4 in fp32; in fp16/bf16 the two orders of accumulation
    differ by a few roundings of the logits, so 8 machine epsilons (bf16: 0.0625, fp16: 0.0078)."""
    dtypes = {t.dtype for t in graph.gm.parameters() if t.dtype.is_floating_point}
    eps = max((torch.finfo(d).eps for d in dtypes), default=0.0)
    return max(EXACT_RTOL, 8 * eps)


def _check_exact(graph, ids: torch.Tensor) -> float:
    """Prefill all but the last two tokens, decode those one by one; max error against the full forward.

    After `drop_tokens` the full forward drops tokens among the decoded ones too, so it is no reference for
    decoding: the prefill is checked against the graph on the prompt alone, and the decode steps must run (each
    new token through every layer; tests compare them with attention masked to the kept prompt tokens)."""
    s = ids.shape[1]
    full = KVDecoder(graph, {"policy": "full"})
    split = max(1, s - 2)
    dropping = bool(full.graphs.drop_points)
    ref = full._logits(graph.run_flat([ids[:, :split] if dropping else ids]))
    got = [full.feed(ids[:, :split])] + [full.feed(ids[:, i:i + 1]) for i in range(split, s)]
    if dropping:
        if not all(tuple(x.shape) == (ids.shape[0], 1, ref.shape[-1]) and bool(x.isfinite().all()) for x in got[1:]):
            return float("inf")
        got = got[:1]
    err = (torch.cat(got, dim=1) - ref).abs().max().item()
    return err / max(1.0, ref.abs().max().item())


@register
class KVCache(Pass):
    """Explicit prefill/decode graphs with the KV cache as tensors, and an eviction policy."""

    name = "kv_cache"
    kind = "exact"  # the full-sequence graph is unchanged; the policy acts when decoding
    Params = KVCacheParams
    requires = ("attention_sites",)

    def run(self, graph, ctx) -> PassResult:
        notes, modified = [], False
        sites = graph.analysis("attention_sites")
        if token_drops(graph):  # drop_tokens simplified what masks it could; the rest were gathered with the tokens
            if not is_causal(graph, sites[0]):
                raise PassError(self.name, "an encoder-only model (bidirectional attention) has no KV cache to "
                                           "keep dropped tokens out of", node=sites[0].node.name)
        elif any(s.mask is not None or not s.is_causal for s in sites):
            modified = SimplifyMasks().run(graph, ctx).modified
            if modified:
                graph.invalidate()
                graph.recompile(self.name)
                notes.append("simplified attention masks")
        layers = attention_layers(graph)
        spec = self.params.spec()
        graphs, _ = kv_graphs(graph, {"policy": "full"})
        ids = ctx.example_inputs[0]
        if ids.shape[1] >= 2:
            err = _check_exact(graph, ids)
            if not err <= exact_rtol(graph):
                raise PassError(self.name, f"the decode graph does not reproduce the full forward (relative error "
                                           f"{err:.3g}): a position-dependent op escaped the rewrite")
            notes.append(f"prefill reproduces the token-dropping forward on the prompt (relative error {err:.1e}); "
                         "decode steps run every new token through all layers over the kept caches"
                         if graphs.drop_points else
                         f"prefill + decode reproduce the full forward (relative error {err:.1e})")
        if graph.kv and "quant" in graph.kv:  # kv_quant ran first: keep its storage
            spec["quant"] = graph.kv["quant"]
        if spec["policy"] == "duo":
            heads, scores = duo_classification(graph, spec)
            spec["retrieval_heads"] = heads
            notes.append("duo retrieval heads per layer " + "; ".join(
                f"{i}: {h}" for i, h in enumerate(heads)) + f" (needle attention {scores})")
        kv_graphs(graph, spec)  # the policy's variant (with scores) builds too
        graph.kv = spec
        full = sum(_layer_bytes(graph))
        notes.append(f"{len(layers)} cached layers, {full} bytes per token of context with the full cache")
        budget = spec.get("budget")
        if budget is not None and budget >= ids.shape[1]:
            notes.append(f"budget {budget} >= the {ids.shape[1]}-token example: nothing is evicted at that length")
        return PassResult(modified=modified, notes=notes)
