"""Running the KV graphs: a decoder that threads an explicit, policy-managed cache through prefill/decode.

`KVDecoder(graph)` has the `feed(ids) -> logits` / `cache_bytes()` interface of `prunus.eval.decode`'s
decoders, so `prunus.generate`, `long_ppl`, `passkey` and `speed` run a KV policy unchanged. The first feed
runs the prefill graph and lets the policy compress what it returns; every later feed runs the decode graph
on the new tokens only, appends their entries and lets the policy evict down to its budget. After
`drop_tokens` the deeper layers' prefill caches hold the kept tokens only, each entry at its true position,
and new tokens continue from the prompt length. Under `kv_quant` (`spec["quant"]`) each layer's cache is a
`QuantizedLayerCache`: prefill entries are evicted in full precision, then all but the most recent are
quantized; the decode graph reads the packed cache.
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from prunus.passes.kv.policies import POLICIES, Policy
from prunus.passes.kv.quantized import QuantizedLayerCache
from prunus.passes.kv.storage import LayerCache
from prunus.passes.kv.rewrite import KVGraphs, attention_layers, build_kv_graphs

POLICY_KEYS = ("budget", "ratio", "sink", "window", "pool", "chunk", "reuse", "slack", "key_ratio",
               "retrieval", "retrieval_heads")


def make_policy(spec: dict, num_layers: int) -> Policy:
    cls = POLICIES[spec.get("policy", "full")]
    return cls(num_layers=num_layers, **{k: spec[k] for k in POLICY_KEYS if k in spec})


def duo_classification(graph, spec: dict) -> tuple[list[list[int]], list[list[float]]]:
    """duo's retrieval heads per layer and every head's score (`duo.retrieval_heads`), once per graph version."""
    from prunus.passes.kv.duo import retrieval_heads

    key = ("duo_heads", spec.get("sink"), spec.get("window"), spec.get("retrieval"))
    return graph.cached(key, lambda: retrieval_heads(graph, spec))


def resolve_spec(graph, spec: dict) -> dict:
    """`spec` completed with what is computed once per graph: duo's retrieval heads."""
    if spec.get("policy") == "duo" and "retrieval_heads" not in spec:
        spec = {**spec, "retrieval_heads": duo_classification(graph, spec)[0]}
    return spec


def kv_graphs(graph, spec: dict | None = None) -> tuple[KVGraphs, Policy]:
    """The prefill/decode graphs for `graph` under `spec` (default: the graph's own), built once per version."""
    spec = resolve_spec(graph, spec if spec is not None else (graph.kv or {"policy": "full"}))
    layers = attention_layers(graph)
    probe, quant = make_policy(spec, len(layers)), spec.get("quant")
    groups = probe.head_groups([s.num_kv_heads for s in layers]) if probe.grouped else None
    flags = dict(prefill_window=probe.prefill_window, decode_probs=probe.decode_probs, ragged=probe.ragged,
                 query_window=probe.query_window, key_channels=probe.key_channels, head_groups=groups)
    key = ("kv_graphs", quant and (quant["bits"], quant["group_size"]),
           *((k, repr(v)) for k, v in flags.items()))
    graphs = graph.cached(key, lambda: build_kv_graphs(graph, quant=quant, **flags))
    return graphs, probe


def _device(graph) -> torch.device:
    for t in list(graph.gm.parameters()) + list(graph.gm.buffers()):
        return t.device
    return torch.device("cpu")


class KVDecoder:
    """Feeds tokens through the prefill graph once, then the decode graph, under the graph's KV policy."""

    stream_chunk = 1

    def __init__(self, graph, spec: dict | None = None):
        self.graph = graph
        self.graphs, self.policy = kv_graphs(graph, spec)
        self.quant = (spec if spec is not None else graph.kv or {}).get("quant")
        self.device = _device(graph)
        self.caches: list[LayerCache] | None = None
        self.position = 0

    def _logits(self, outputs: list) -> torch.Tensor:
        from prunus.eval.run import main_tensor

        n = self.graphs.num_outputs
        tree = pytree.tree_unflatten(outputs[:n], self.graph.out_spec) if self.graph.out_spec else outputs[0]
        return main_tensor(tree, ("logits",)).float()

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        t = ids.shape[1]
        positions = torch.arange(self.position, self.position + t, device=self.device)
        g, n_layers, n_out = self.graphs, len(self.graphs.layers), self.graphs.num_outputs
        if self.caches is None:
            out = list(g.prefill(ids, positions))
            kv = out[n_out:n_out + 2 * n_layers]
            end = len(out) - g.drop_points
            rest = out[n_out + 2 * n_layers:end]
            scores = rest[:n_layers] if g.prefill_window is not None else None
            norms = rest[-n_layers:] if g.query_window is not None else None
            b = ids.shape[0]
            # each layer's entries sit at the prompt positions, or (token dropping) at those kept before it
            stage_pos = [positions.expand(b, t)] + out[end:]
            self.caches = [self._layer_cache(k, v, stage_pos[s][:, None].expand(b, k.shape[1], -1))
                           for k, v, s in zip(kv[0::2], kv[1::2], g.stages)]
            if self.policy.reconstruct:
                scores = self._reconstruction_scores(ids, positions)
            self.policy.after_prefill(self.caches, scores, t, norms)
        else:
            flat = [x for c in self.caches for x in c.graph_inputs()]
            out = list(g.decode(ids, positions, *flat))
            kv = out[n_out:n_out + 2 * n_layers]
            probs = out[n_out + 2 * n_layers:] or None
            self.policy.after_step(self.caches, list(zip(kv[0::2], kv[1::2])), probs, self.position + t)
        if self.quant:
            for cache in self.caches:
                cache.flush()
        self.position += t
        return self._logits(out)

    def _reconstruction_scores(self, ids, positions) -> list[torch.Tensor]:
        """KVzip: per layer, the attention [b, kv_heads, s] each prompt entry receives while the prompt, fed again
        right after itself, is decoded over the cache (the reconstruction's own entries are not kept)."""
        g, t = self.graphs, ids.shape[1]
        flat = [x for c in self.caches for x in c.graph_inputs()]
        probs = list(g.decode(ids, positions + t, *flat))[g.num_outputs + 2 * len(g.layers):]
        return [p[..., :c.length] for p, c in zip(probs, self.caches)]

    def _layer_cache(self, k, v, pos):
        if self.quant:
            return QuantizedLayerCache(k, v, pos, bits=self.quant["bits"], group_size=self.quant["group_size"],
                                       residual=self.quant["residual"])
        return LayerCache(k, v, pos)

    def cache_bytes(self) -> int:
        """Bytes of the keys and values the cache holds now (packed codes, scales and minimums under kv_quant;
        a ragged cache counts its padding; positions and scores are bookkeeping, not counted)."""
        return sum(c.nbytes() for c in self.caches) if self.caches else 0

    def held_bytes(self) -> int:
        """Bytes of the entries the heads really hold: `cache_bytes` less a ragged cache's padding."""
        return sum(c.held_bytes() for c in self.caches) if self.caches else 0

    def cache_lengths(self) -> list[int]:
        """Per layer, the longest head's entries (the allocated length)."""
        return [c.length for c in self.caches] if self.caches else []

    def head_lengths(self) -> list[torch.Tensor]:
        """Per layer, the entries each (sequence, KV head) holds, [b, kv_heads]."""
        return [c.head_lengths() for c in self.caches] if self.caches else []
