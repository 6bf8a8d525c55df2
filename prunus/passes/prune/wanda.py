"""wanda (structured, "Wanda-sp"): sum of |W_ij| * ||X_j||_2 over the consumer columns j of a unit.

Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models") scores a weight by
its magnitude times the norm of the input feature it multiplies; the structured variant FLAP compares
against sums that score over the channels a unit feeds into its consuming projection.
"""
from __future__ import annotations

import torch

from prunus.passes.prune.units import Evidence, consumer_channels


def score(graph, group, evidence: Evidence) -> torch.Tensor:
    total = torch.zeros(group.units, dtype=torch.float64)
    for m in group.consumers:
        norms = evidence.stats[m.node].l2[m.index]  # [units, channels]
        total += (consumer_channels(graph, m).abs().sum(-1) * norms).sum(1)
    return total
