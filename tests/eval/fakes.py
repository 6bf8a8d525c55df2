"""Tokenizer and models with known answers for the evaluation tests."""
from __future__ import annotations

import re
from types import SimpleNamespace

import torch

VOCAB = 256  # bytes; the tiny zoo models have the same vocabulary


class ByteTokenizer:
    """UTF-8 bytes as token ids: no special tokens and no chat template."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=True, return_tensors=None, verbose=True, truncation=False,
                 max_length=None):
        ids = list(text.encode())
        if truncation and max_length:
            ids = ids[:max_length]
        return SimpleNamespace(input_ids=torch.tensor([ids]))

    def decode(self, ids, skip_special_tokens=False):
        return bytes(int(i) for i in ids).decode(errors="replace")


def one_hot_logits(next_ids: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.nn.functional.one_hot(next_ids, VOCAB).float() * scale


class UniformLM(torch.nn.Module):
    """Equal logits for every token: perplexity is exactly VOCAB, and greedy output is always byte 0."""

    def forward(self, ids):
        return torch.zeros(*ids.shape, VOCAB)


class SuccessorLM(torch.nn.Module):
    """Logit `scale` on byte b+1 after byte b, 0 elsewhere: on text where that holds, NLL = log(1 + 255 e^-scale)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, ids):
        return one_hot_logits((ids + 1) % VOCAB, self.scale)


class LastPosition(torch.nn.Module):
    """Returns only the last position's logits, as a token-dropping model does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids)[:, -1:]


class Shifted(torch.nn.Module):
    """`model`'s logits times `scale` plus `shift`."""

    def __init__(self, model, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.model, self.scale, self.shift = model, scale, shift

    def forward(self, ids):
        return self.model(ids, use_cache=False).logits * self.scale + self.shift


class PasskeyOracle(torch.nn.Module):
    """Reads the pass key out of its (byte) prompt and spells it after the prompt's "The pass key is"."""

    def forward(self, ids):
        text = bytes(ids[0].tolist()).decode()
        key = re.search(r"pass key is (\d{5})", text).group(1)
        answer = f" {key}.\n"
        said = text.rsplit("The pass key is", 1)[1]
        next_char = answer[len(said)] if len(said) < len(answer) else "\n"
        return one_hot_logits(torch.full(ids.shape, ord(next_char)), 10.0)
