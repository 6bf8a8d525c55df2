"""flap: fluctuation of the consumer's input channels, var(X_j) * ||W[:, j]||^2, summed over a unit.

FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI 2024):
a channel whose input barely varies can be replaced by its mean, which `surgery.compensate` folds into the
consumer's bias; scores are standardized per layer for the adaptive allocation (see allocation.py).
"""
from __future__ import annotations

import torch

from prunus.passes.prune.units import Evidence, consumer_channels


def score(graph, group, evidence: Evidence) -> torch.Tensor:
    total = torch.zeros(group.units, dtype=torch.float64)
    for m in group.consumers:
        var = evidence.stats[m.node].var[m.index]  # [units, channels]
        total += (consumer_channels(graph, m).pow(2).sum(-1) * var).sum(1)
    return total
