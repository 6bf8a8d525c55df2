"""magnitude: the L2 norm of every weight (and producer bias) a unit owns across its group.

The baseline structured criterion that data-aware ones (Wanda, FLAP, LLM-Pruner's Taylor) are measured
against; needs no calibration.
"""
from __future__ import annotations

import torch

from prunus.passes.prune.units import Evidence, unit_view, weights


def score(graph, group, evidence: Evidence) -> torch.Tensor:
    total = torch.zeros(group.units, dtype=torch.float64)
    for m in group.members:
        total += unit_view(weights(graph, m), m).pow(2).sum(1)
        if m in group.producers and m.bias is not None:
            total += unit_view(graph.get_attr_value(m.bias), m).pow(2).sum(1)
    return total.sqrt()
