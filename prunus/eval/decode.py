"""Token-by-token decoding for evaluation: greedy generation and streaming perplexity share one stepper.

A decoder holds the state of one batch of sequences; `feed(ids)` appends tokens and returns the logits
the model gives at the fed positions. Three kinds exist:

- `CacheDecoder`: a Hugging Face-style `nn.Module` whose forward takes `past_key_values`/`use_cache`;
  each feed runs only the new tokens against the model's KV cache.
- `PrefixDecoder`: any other callable, e.g. a `prunus.OptimizedModel` captured as one full-sequence
  graph; each feed re-runs the whole growing prefix and keeps the logits of the new positions.

- `prunus.passes.kv.KVDecoder`: an OptimizedModel that went through `kv_cache` runs its prefill graph
  once, then its decode graph on new tokens only, with the cache as explicit tensors that the graph's
  policy compresses. `greedy`, `passkey`, `long_ppl` and `speed` run it unchanged, which is what makes a
  KV policy (eviction, quantized entries) show in their numbers.

Anything else with a `kv_decoder()` method hands out its own decoder: `prunus.codegen.onnx.OrtKVDecoder`
(the KV graphs in onnxruntime) is passed as the model that way.
"""
from __future__ import annotations

import inspect

import torch

from prunus.errors import SpecError
from prunus.eval.run import device_of, logits, main_tensor


class CacheDecoder:
    """Feeds new tokens through an `nn.Module`'s own KV cache (`past_key_values`, `use_cache=True`)."""

    stream_chunk = 1  # tokens per feed when streaming a document: each position sees the cache as decode does

    def __init__(self, model: torch.nn.Module):
        self.model, self.device, self.past = model, device_of(model), None

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(ids.to(self.device), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return main_tensor(out, ("logits",)).float()

    def cache_bytes(self) -> int:
        """Bytes of the key/value tensors the cache holds now."""
        tensors = [t for t in torch.utils._pytree.tree_leaves(_cache_tensors(self.past)) if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _cache_tensors(past):
    layers = getattr(past, "layers", None)
    if layers is not None:  # transformers' DynamicCache: one entry per layer with .keys and .values
        return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    return past


class PrefixDecoder:
    """Re-runs the whole prefix on every feed; exact for causal models, whatever the chunk size."""

    stream_chunk = 256  # re-running the prefix per token would cost a full forward per token

    def __init__(self, model):
        self.model, self.ids = model, None

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids = ids if self.ids is None else torch.cat([self.ids, ids.to(self.ids.device)], dim=1)
        out = logits(self.model, self.ids)
        # A token-dropping model returns only the kept positions (the last one always): keep what exists.
        return out[:, -min(ids.shape[1], out.shape[1]):]

    def cache_bytes(self) -> int:
        return 0  # nothing is cached: every feed recomputes the prefix


def decoder(model):
    """A fresh decoder for `model`: its KV graphs when `kv_cache` gave it some, its own KV cache when its
    forward has one, else prefix re-runs. A model with a `kv_decoder()` method makes its own."""
    make = getattr(model, "kv_decoder", None)
    if callable(make):
        return make()
    graph = getattr(model, "graph", None)
    if getattr(graph, "kv", None) is not None:
        from prunus.passes.kv.runtime import KVDecoder

        return KVDecoder(graph)
    if isinstance(model, torch.nn.Module):
        params = inspect.signature(model.forward).parameters
        if "past_key_values" in params and "use_cache" in params:
            return CacheDecoder(model)
    return PrefixDecoder(model)


def greedy(model, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy continuation of `ids` `[batch, seq]`: `prunus.generate` without the stats."""
    from prunus.generate import generate

    return generate(model, ids, max_new_tokens, eos_token_id=eos_token_id)
