"""Passkey retrieval (Mohtashami & Jaggi, 2023, "Landmark Attention"): can the model find one fact in filler?

Each trial hides "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a seeded random depth
of repetitive filler, asks "What is the pass key?", greedily generates a few tokens and counts the trial
correct when the 5-digit key appears in them. Prompts use the tokenizer's chat template when it has one
(instruction-tuned models answer the question), otherwise plain text ending in "The pass key is".
A KV-cache policy that evicts the key's entries fails here while perplexity barely moves.
"""
from __future__ import annotations

import random

import torch

from prunus.errors import SpecError
from prunus.eval.decode import greedy

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"


def _encode(tok, body: str) -> torch.Tensor:
    """Prompt ids `[1, seq]` for the user message `body`."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                       add_generation_prompt=True)
        return tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    return tok(f"{body} The pass key is", return_tensors="pt").input_ids


def _body(n_filler: int, depth: int, key: int) -> str:
    parts = [FILLER] * n_filler
    parts.insert(depth, NEEDLE.format(key=key))
    return f"{INTRO}\n\n{' '.join(parts)}\n\n{QUESTION}"


def prompt(tok, context_tokens: int, key: int, depth: float) -> torch.Tensor:
    """The prompt ids `[1, ~context_tokens]` with `key` after a `depth` (0..1) fraction of the filler."""
    overhead = _encode(tok, _body(0, 0, key)).shape[1]
    per_filler = _encode(tok, _body(1, 0, key)).shape[1] - overhead
    n_filler = max(0, round((context_tokens - overhead) / per_filler))
    return _encode(tok, _body(n_filler, round(depth * n_filler), key))


def passkey(model, tok, context_tokens: int = 400, n: int = 20, seed: int = 0, max_new_tokens: int = 16) -> float:
    """Fraction of `n` seeded trials (key and depth drawn per trial) in which the model returns the key."""
    if n < 1 or context_tokens < 1 or max_new_tokens < 1:
        raise SpecError(f"passkey needs n, context_tokens and max_new_tokens >= 1, got n={n}, "
                        f"context_tokens={context_tokens}, max_new_tokens={max_new_tokens}")
    rng = random.Random(seed)
    correct = 0
    for _ in range(n):
        key, depth = rng.randint(10000, 99999), rng.random()
        ids = prompt(tok, context_tokens, key, depth)
        out = greedy(model, ids, max_new_tokens, eos_token_id=getattr(tok, "eos_token_id", None))
        correct += str(key) in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return correct / n
