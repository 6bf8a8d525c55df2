"""`kv_quant`: store the decode-time KV cache KIVI-style (arXiv:2402.02750), 8 or 4 bits.

Keys are quantized per channel in groups of `group_size` tokens, values per token in groups of
min(`group_size`, head dim) channels; the most recent `residual` to `residual + group_size - 1` entries stay in
full precision (`quantized.py` has the storage, the flush rule and how eviction acts on quantized entries).
The pass records the storage on the graph (`graph.kv["quant"]`); decoding (`prunus.generate`, `prunus.eval`)
then keeps the cache packed and runs a decode graph that reads it through
`torch.ops.prunus.decode_attention_quantized`. The full-sequence graph is unchanged, so the manager's
fidelity figures are exact; the pass measures the decode-time error itself and reports it in its notes.

Composes with `kv_cache` in either order: a graph without a cache policy gets `kv_cache`'s full cache first
(the same checks: an encoder or a non-causal mask is a `PassError`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunus.errors import PassError
from prunus.kernels.kv_quant import BITS, value_group
from prunus.passes.base import Pass, PassResult, param
from prunus.passes.kv.cache import KVCache
from prunus.passes.kv.policies import POLICIES
from prunus.passes.kv.runtime import KVDecoder, kv_graphs
from prunus.passes.registry import register


@dataclass(kw_only=True)
class KVQuantParams:
    bits: int = param(4, "bits per cached key/value entry", choices=BITS)
    group_size: int = param(32, "tokens per key group (per channel) and channels per value group (per token); "
                                "a power of two", range="[2, 1024]")
    residual: int = param(32, "most recent entries kept in full precision (between residual and "
                              "residual + group_size - 1 of them)", range="[0, inf)")

    def check(self) -> str | None:
        if self.group_size & (self.group_size - 1):
            return f"group_size {self.group_size} is not a power of two (try 32, KIVI's group size)"
        return None

    def spec(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "residual": self.residual}


def _check_geometry(name: str, layers, bits: int, group: int) -> None:
    for layer in layers:
        for what, width in (("key", layer.head_dim), ("value", layer.v_dim)):
            if bits == 4 and width % 2:
                raise PassError(name, f"layer {layer.layer}: 4-bit packing needs an even {what} head dim, got "
                                      f"{width}; use bits=8")
        vg = value_group(group, layer.v_dim)
        if layer.v_dim % vg:
            raise PassError(name, f"layer {layer.layer}: group_size {group} does not divide the value head dim "
                                  f"{layer.v_dim}; choose a power of two dividing it")


def _decode_error(graph, spec: dict, ids: torch.Tensor) -> tuple[float, float, int]:
    """Prefill all but 2 tokens, decode those with the cache quantized as far as it goes (residual 0): the
    relative logit error and top-1 agreement of the decoded positions against the full forward, and how many
    entries per layer were quantized."""
    probe = {**spec, "quant": {**spec["quant"], "residual": 0}}
    dec = KVDecoder(graph, probe)
    ref = dec._logits(graph.run_flat([ids]))[:, -2:]
    s = ids.shape[1]
    dec.feed(ids[:, :s - 2])
    got = torch.cat([dec.feed(ids[:, i:i + 1]) for i in (s - 2, s - 1)], dim=1)
    err = (got - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return err, top1, dec.caches[0].n_quantized


@register
class KVQuant(Pass):
    """KIVI-style quantized KV cache at decode time: keys per channel, values per token, recent tokens exact."""

    name = "kv_quant"
    kind = "lossy"
    Params = KVQuantParams
    requires = ("attention_sites",)

    def run(self, graph, ctx) -> PassResult:
        notes, modified = [], False
        if graph.kv is None:
            try:
                modified = KVCache().run(graph, ctx).modified
            except PassError as e:
                raise PassError(self.name, f"needs a causal KV cache, which kv_cache cannot build: {e.reason}",
                                node=e.node) from None
            notes.append("no kv_cache policy before: quantizing the full cache")
        if not POLICIES[graph.kv.get("policy", "full")].quantizable():
            raise PassError(self.name, f"policy {graph.kv['policy']} keeps per-head lengths, pruned key channels or "
                                       "per-group caches, which the rectangular quantized storage cannot hold; "
                                       "quantize a uniform policy (snapkv, pyramidkv, ...)")
        quant = self.params.spec()
        _check_geometry(self.name, kv_graphs(graph)[0].layers, quant["bits"], quant["group_size"])
        spec = {**graph.kv, "quant": quant}
        g = quant["group_size"]
        ids = ctx.example_inputs[0]
        reps = -(-(g + 2) // ids.shape[1])  # the example repeated until a whole group is quantized
        err, top1, n_q = _decode_error(graph, spec, ids.repeat(1, reps)[:, :max(ids.shape[1], g + 2)])
        notes.append(f"decoding over {n_q} quantized entries per layer (example repeated, residual 0): relative "
                     f"logit error {err:.2e}, top-1 agreement {top1:.2f} against the full forward")
        budget = spec.get("budget")
        if budget is not None and budget < quant["residual"] + g:
            notes.append(f"budget {budget} < residual + group_size = {quant['residual'] + g}: the cache is never "
                         "quantized; lower residual or group_size")
        graph.kv = spec
        return PassResult(modified=modified, notes=notes)
