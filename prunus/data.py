"""Text for evaluation and calibration, available offline.

The default corpus is the standard library's `pydoc_data.topics` (the help texts of `help("topics")`,
about 465k characters of English technical prose): every machine with Python has it, so perplexity
figures and calibration sets are reproducible without a download.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from prunus.errors import SpecError


@functools.lru_cache(maxsize=1)
def default_corpus() -> str:
    """The `pydoc_data.topics` texts in sorted key order, separated by a blank line (deterministic)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


def corpus_passages(n: int, min_chars: int = 300) -> list[str]:
    """The first `n` paragraphs of the default corpus that have at least `min_chars` characters."""
    passages = [p for p in default_corpus().split("\n\n") if len(p) >= min_chars]
    if not 0 < n <= len(passages):
        raise SpecError(f"n={n} passages requested; the default corpus has {len(passages)} of >= {min_chars} chars")
    return passages[:n]


def token_ids(tok, text: str | None = None) -> torch.Tensor:
    """`text` (default: the default corpus) as a 1-D LongTensor of token ids, without special tokens."""
    text = default_corpus() if text is None else text
    # verbose=False: a corpus is longer than the model's context on purpose; callers cut it into windows.
    return tok(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0]


def calibration_windows(tok, n: int, seq_len: int, seed: int = 0, text: str | None = None) -> list[tuple]:
    """`n` windows of `seq_len` tokens at seeded random offsets of `text` (default corpus): `[(ids[1, seq_len],)]`."""
    if n < 1 or seq_len < 1:
        raise SpecError(f"calibration_windows needs n >= 1 and seq_len >= 1, got n={n}, seq_len={seq_len}")
    ids = token_ids(tok, text)
    if len(ids) < seq_len:
        raise SpecError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=gen).tolist()
    return [(ids[s:s + seq_len].unsqueeze(0).clone(),) for s in starts]


@dataclass
class Calibration:
    """Calibration inputs for `prunus.optimize(calibration=...)`: a list of positional-input tuples."""

    samples: list[tuple]

    @classmethod
    def from_corpus(cls, tok, n: int, seq_len: int, seed: int = 0, text: str | None = None) -> Calibration:
        """`calibration_windows` of the default corpus (or `text`) as a Calibration."""
        return cls(calibration_windows(tok, n, seq_len, seed=seed, text=text))


def window_batch(tok, n: int, seq_len: int, seed: int = 0, text: str | None = None) -> tuple[torch.Tensor]:
    """`calibration_windows` stacked into one batch: `(ids[n, seq_len],)`, e.g. example inputs for capture."""
    return (torch.cat([w[0] for w in calibration_windows(tok, n, seq_len, seed=seed, text=text)]),)
