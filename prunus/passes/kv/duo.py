"""Which KV heads retrieve: DuoAttention's head classification (arXiv:2410.10819), by a profiling run.

DuoAttention learns a gate per KV head on synthetic passkey data and thresholds it; RazorAttention
(arXiv:2407.15891) finds the same retrieval heads by their copy behaviour. prunus measures that behaviour on a
synthetic passkey task built from token ids alone, since a pass sees no tokenizer: each sample is random filler
with a needle (`KEY_TOKENS` random tokens) at a random depth, and ends by repeating the needle's first
`ANSWER_TOKENS` tokens. To continue the repeat, the answer queries must fetch the needle from far back: a head
that serves them puts its attention there (a copy or induction head), a streaming head stays on its sinks and
its recent window, which the needle lies outside. A KV head's score is the share of the answer queries' attention
(over the query heads of its group, averaged over `SAMPLES` seeded samples) that lands on the needle; the
`retrieval` fraction of all KV heads with the highest scores, across layers (as DuoAttention thresholds its gates
globally), keeps the full cache. The result is deterministic and is stored in the KV spec, so it is computed once
per graph and saved with the model.
"""
from __future__ import annotations

import torch

from prunus.errors import PassError
from prunus.passes.kv.rewrite import PASS, build_kv_graphs

SAMPLES = 4
KEY_TOKENS = 16
ANSWER_TOKENS = 8
GAP = 48  # filler tokens on either side of the needle's range of depths
SEED = 0


def synthetic_passkey(vocab: int, sink: int, window: int, samples: int = SAMPLES, seed: int = SEED):
    """Token ids [samples, s] of the profiling task and each sample's needle start (see the module docstring).
    The needle ends at least `window + ANSWER_TOKENS` tokens before the end and starts after the sinks."""
    s = sink + 2 * GAP + KEY_TOKENS + window + ANSWER_TOKENS
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (samples, s), generator=gen)
    starts = torch.randint(sink, sink + 2 * GAP + 1, (samples,), generator=gen)
    for row, a in zip(ids, starts.tolist()):
        row[s - ANSWER_TOKENS:] = row[a:a + ANSWER_TOKENS]
    return ids, starts


def needle_attention(graph, ids: torch.Tensor, starts: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, [kv_heads]: the share of the last `ANSWER_TOKENS` queries' attention on each sample's needle,
    averaged over the samples."""
    from prunus.passes.kv.runtime import _device

    graphs = build_kv_graphs(graph, prefill_window=ANSWER_TOKENS)
    device = _device(graph)
    with torch.no_grad():
        out = graphs.prefill(ids.to(device), torch.arange(ids.shape[1], device=device))
    scores = out[graphs.num_outputs + 2 * len(graphs.layers):]
    span = torch.arange(ids.shape[1])[None, :]
    needle = ((span >= starts[:, None]) & (span < starts[:, None] + KEY_TOKENS)).float()  # [samples, s]
    rows = []
    for layer, score in zip(graphs.layers, scores):
        per_query = ANSWER_TOKENS * layer.num_heads // layer.num_kv_heads
        rows.append((score.float().cpu() * needle[:, None, :]).sum(-1).mean(0) / per_query)
    return rows


def retrieval_heads(graph, spec: dict) -> tuple[list[list[int]], list[list[float]]]:
    """Per layer, the retrieval KV heads (sorted), and every head's needle-attention score."""
    from prunus.passes.kv.runtime import KVDecoder

    vocab = KVDecoder(graph, {"policy": "full"}).feed(graph.example_inputs[0][:1, :1]).shape[-1]
    ids, starts = synthetic_passkey(vocab, spec.get("sink", 4), spec.get("window", 32))
    try:
        mass = needle_attention(graph, ids, starts)
    except (IndexError, RuntimeError) as e:
        raise PassError(PASS, f"duo's {ids.shape[1]}-token profiling run failed ({type(e).__name__}: "
                              f"{str(e)[:200]}); a model with learned positions may be shorter: lower window") from e
    where = [(layer, head) for layer, row in enumerate(mass) for head in range(len(row))]
    n = round(spec.get("retrieval", 0.5) * len(where))
    top = torch.sort(-torch.cat(mass), stable=True).indices[:n].tolist()
    heads = [sorted(where[i][1] for i in top if where[i][0] == layer) for layer in range(len(mass))]
    return heads, [[round(x, 4) for x in row.tolist()] for row in mass]
