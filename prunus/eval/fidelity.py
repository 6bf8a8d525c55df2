"""Output agreement between a reference model and a candidate (e.g. the optimized one).

- `fidelity`: the pass manager's metrics (`prunus.passes.verify.fidelity_metrics`) on the logits of one
  call: top-1 agreement, KL(reference || candidate) averaged over positions, and SQNR in dB
  (10 log10 of signal energy over error energy; inf when the outputs are identical).
- `embedding_similarity`: for encoders (MiniLM, BERT), the mean cosine similarity of the sentence
  embeddings both models give, each embedding being the mean of the last hidden states over tokens
  (the pooling sentence-transformers uses for all-MiniLM-L6-v2, Reimers & Gurevych, 2019).
"""
from __future__ import annotations

import torch

from prunus.data import corpus_passages
from prunus.errors import SpecError
from prunus.eval.run import main_tensor, run
from prunus.passes.verify import fidelity_metrics


def fidelity(reference, candidate, inputs) -> dict:
    """`{"top1", "kl", "sqnr_db"}` of `candidate(*inputs)` against `reference(*inputs)`.

    `inputs` is one tuple of positional inputs (a tensor alone is taken as a 1-tuple); put several
    samples in its batch dimension. A candidate that drops tokens is compared at the last position.
    """
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not inputs:
        raise SpecError("fidelity needs at least one input tensor")
    ref, cand = (main_tensor(run(m, *inputs)) for m in (reference, candidate))
    if not ref.is_floating_point() or not cand.is_floating_point():
        raise SpecError(f"fidelity compares floating outputs; got {ref.dtype} and {cand.dtype}")
    return fidelity_metrics([ref], [cand.to(ref.device)])


def embedding_similarity(reference, candidate, tok, texts: list[str] | None = None,
                         max_length: int = 128) -> float:
    """Mean cosine similarity of mean-pooled last hidden states over `texts` (default: 16 corpus passages).

    Each text runs alone (batch 1, no padding, truncated to `max_length` tokens), so the pooling needs no
    attention mask and an OptimizedModel that takes only `input_ids` works.
    """
    texts = corpus_passages(16) if texts is None else texts
    if not texts:
        raise SpecError("embedding_similarity needs at least one text")
    keys = ("last_hidden_state", "logits")
    sims = []
    for text in texts:
        ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt").input_ids
        ref, cand = (main_tensor(run(m, ids), keys).float().mean(dim=1) for m in (reference, candidate))
        sims.append(torch.cosine_similarity(ref, cand.to(ref.device), dim=-1).item())
    return sum(sims) / len(sims)
