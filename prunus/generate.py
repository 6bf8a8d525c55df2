"""`prunus.generate`: greedy decoding of an optimized model (or any causal LM), with optional stats.

The loop runs on the decoders of `prunus.eval.decode`: a model's own KV cache when it has one, else a
re-run of the growing prefix. KV-cache graphs plug in there as a third decoder.
"""
from __future__ import annotations

import time

import torch

from prunus.errors import SpecError
from prunus.eval.decode import decoder


@torch.no_grad()
def generate(model, ids: torch.Tensor, max_new_tokens: int = 32, *, eos_token_id: int | None = None,
             return_stats: bool = False):
    """Greedy continuation of `ids` `[batch, seq]` -> `[batch, seq + new]`; with `return_stats`, also a dict of
    kv_bytes (peak cache bytes), prefill_seconds, decode_tokens_per_second and new_tokens.

    With `eos_token_id`, a finished sequence is padded with it and decoding stops once all have finished.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise SpecError("ids must be a [batch, seq] tensor of token ids")
    if max_new_tokens < 1:
        raise SpecError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    dec = decoder(model)
    t0 = time.perf_counter()
    step_logits = dec.feed(ids)
    prefill = time.perf_counter() - t0
    peak = dec.cache_bytes()
    out, done, steps = ids, torch.zeros(ids.shape[0], dtype=torch.bool), 0
    t1 = time.perf_counter()
    while True:
        token = step_logits[:, -1].argmax(-1, keepdim=True).cpu()
        if eos_token_id is not None:
            token[done] = eos_token_id
            done |= token[:, 0] == eos_token_id
        out = torch.cat([out, token.to(out.device)], dim=1)
        if bool(done.all()) or out.shape[1] - ids.shape[1] == max_new_tokens:
            break
        step_logits = dec.feed(token)
        steps += 1
        peak = max(peak, dec.cache_bytes())
    decode = time.perf_counter() - t1
    if not return_stats:
        return out
    return out, {"kv_bytes": peak, "prefill_seconds": prefill,
                 "decode_tokens_per_second": steps * ids.shape[0] / decode if steps and decode > 0 else 0.0,
                 "new_tokens": out.shape[1] - ids.shape[1]}
