"""Perplexity: exp of the mean negative log-likelihood of each next token given the ones before it.

- `perplexity`: fixed, non-overlapping windows of `seq_len` tokens over the first `max_tokens` tokens
  of a text (the standard windowed evaluation, e.g. GPTQ's and Wanda's WikiText-2 figures); every window
  starts with an empty context, so its first token is not predicted.
- `long_ppl`: one long document streamed through the model's decoder (`prunus.eval.decode`), token by
  token against the KV cache, as in StreamingLLM (Xiao et al., 2023) and the KV-compression papers
  that follow it; this is where a KV-cache policy changes the number. With a full cache it equals
  `perplexity` with a single window covering the document.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prunus.data import token_ids
from prunus.errors import SpecError
from prunus.eval.decode import decoder
from prunus.eval.run import logits


def _document(tok, text: str | None, max_tokens: int, min_tokens: int) -> torch.Tensor:
    """The first `max_tokens` token ids of `text` (default corpus), at least `min_tokens` of them."""
    if max_tokens < min_tokens:
        raise SpecError(f"max_tokens={max_tokens} is below the minimum of {min_tokens} tokens")
    ids = token_ids(tok, text)[:max_tokens]
    if len(ids) < min_tokens:
        raise SpecError(f"the text has {len(ids)} tokens, fewer than the {min_tokens} needed")
    return ids


def _nll_sum(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL of `targets` `[n]` under the logits `scores` `[n, vocab]`, in float64 for long sums."""
    return F.cross_entropy(scores.double(), targets.to(scores.device), reduction="sum").item()


def _check_positions(got: int, want: int, hint: str) -> None:
    if got != want:
        raise SpecError(f"the model returned logits for {got} of {want} positions (it drops tokens); {hint}")


def perplexity(model, tok, text: str | None = None, seq_len: int = 512, max_tokens: int = 4096) -> float:
    """exp(mean NLL) over `max_tokens // seq_len` windows of `seq_len` tokens; a partial last window is dropped."""
    if seq_len < 2:
        raise SpecError(f"seq_len must be >= 2 (a window predicts seq_len - 1 tokens), got {seq_len}")
    ids = _document(tok, text, max_tokens, seq_len)
    n_windows = len(ids) // seq_len
    total = 0.0
    for w in range(n_windows):
        window = ids[w * seq_len:(w + 1) * seq_len].unsqueeze(0)
        out = logits(model, window)
        _check_positions(out.shape[1], seq_len, "perplexity needs every position: use long_ppl")
        total += _nll_sum(out[0, :-1], window[0, 1:])
    return math.exp(total / (n_windows * (seq_len - 1)))


def long_ppl(model, tok, text: str | None = None, max_tokens: int = 2048, chunk: int | None = None) -> float:
    """Perplexity of the first `max_tokens` tokens of `text` as one document, streamed through the decoder.

    Tokens are fed `chunk` at a time (default: the decoder's `stream_chunk`, 1 for a KV cache, so every
    prediction is a decode step) and every token after the first is predicted. A model that drops tokens
    returns only the last position of a feed: stream it with `chunk=1`.
    """
    ids = _document(tok, text, max_tokens, 2).unsqueeze(0)
    dec = decoder(model)
    chunk = dec.stream_chunk if chunk is None else chunk
    if chunk < 1:
        raise SpecError(f"chunk must be >= 1, got {chunk}")
    total, n_predicted = 0.0, ids.shape[1] - 1
    for start in range(0, n_predicted, chunk):
        fed = ids[:, start:min(start + chunk, n_predicted)]
        out = dec.feed(fed)
        _check_positions(out.shape[1], fed.shape[1], "stream it with chunk=1")
        total += _nll_sum(out[0], ids[0, start + 1:start + 1 + fed.shape[1]])
    return math.exp(total / n_predicted)
