"""`prunus.generate`: greedy decoding over an optimized model (or any causal LM returning logits)."""
from __future__ import annotations

import time

import torch

from prunus.errors import SpecError


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise SpecError("generate needs a causal LM whose output holds [batch, seq, vocab] logits")
    return logits


@torch.no_grad()
def generate(model, ids: torch.Tensor, max_new_tokens: int = 32, *, eos_token_id: int | None = None,
             return_stats: bool = False):
    """Greedy continuation of `ids` ([batch, seq]); returns the full sequences (and stats if asked).

    Without KV-cache graphs every step re-runs the whole prefix through the graph, so the stats show the
    cost of that; `kv_bytes` is 0 because no cache is held.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise SpecError("ids must be a [batch, seq] tensor of token ids")
    if max_new_tokens < 1:
        raise SpecError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    t0 = time.perf_counter()
    next_token = _logits(model, ids)[:, -1].argmax(-1, keepdim=True)
    prefill = time.perf_counter() - t0
    out = torch.cat([ids, next_token], dim=1)
    done = (next_token.squeeze(1) == eos_token_id) if eos_token_id is not None else None
    t1 = time.perf_counter()
    steps = 0
    while steps < max_new_tokens - 1 and not (done is not None and bool(done.all())):
        next_token = _logits(model, out)[:, -1].argmax(-1, keepdim=True)
        if done is not None:
            next_token[done] = eos_token_id
            done |= next_token.squeeze(1) == eos_token_id
        out = torch.cat([out, next_token], dim=1)
        steps += 1
    decode = time.perf_counter() - t1
    if not return_stats:
        return out
    stats = {"kv_bytes": 0, "prefill_seconds": prefill,
             "decode_tokens_per_second": (steps * ids.shape[0] / decode) if steps and decode > 0 else 0.0,
             "new_tokens": out.shape[1] - ids.shape[1]}
    return out, stats
