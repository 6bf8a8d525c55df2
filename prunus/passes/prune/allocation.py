"""How many units each group keeps: uniform, global or adaptive (FLAP) allocation.

uniform removes the same fraction from every group; global ranks the raw scores of all groups against one
threshold; adaptive first standardizes each group's scores (zero mean, unit variance within the layer),
as FLAP (An et al., AAAI 2024) does, so one threshold compares layers whose raw scores differ in scale.
Both global rules keep at least `floor` units per group; kept widths round to multiples of `round_to`.
"""
from __future__ import annotations

import math

import torch

from prunus.errors import PassError

ALLOCATIONS = ("uniform", "global", "adaptive")


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _rounded(keep: int, units: int, round_to: int) -> int:
    if round_to <= 1 or units <= round_to:
        return keep
    return min(units, max(round_to, _half_up(keep / round_to) * round_to))


def keep_counts(scores: list[torch.Tensor], *, ratio: float | None, remove: int | None, allocation: str,
                round_to: int, pass_name: str, names: list[str], unit: str, per_unit: int = 1) -> list[int]:
    """Units each group keeps, given per-group scores, a ratio or a total count `remove`.

    Errors count what the user asked for: `per_unit` `unit`s (query heads) make one scored unit (a KV group).
    """
    sizes = [len(s) for s in scores]
    total = sum(sizes)
    floor = 1
    if remove is not None and remove > total - floor * len(sizes):
        raise PassError(pass_name, f"cannot remove {remove * per_unit} {unit}s: the model has {total * per_unit} "
                                   f"in {len(sizes)} layers and every layer keeps at least {floor * per_unit}")
    if allocation == "uniform":
        if remove is not None and remove % len(sizes):
            raise PassError(pass_name, f"n={remove * per_unit} {unit}s do not split evenly over {len(sizes)} layers "
                                       "under allocation=uniform; give a multiple or use allocation=global")
        keeps = []
        for size, name in zip(sizes, names):
            drop = _half_up(size * ratio) if ratio is not None else remove // len(sizes)
            keep = _rounded(size - drop, size, round_to)
            if keep <= 0:
                raise PassError(pass_name, f"would remove every {unit} of {name}; lower the ratio", node=name)
            keeps.append(keep)
        return keeps
    if allocation == "adaptive":
        scores = [(s - s.mean()) / s.std().clamp_min(1e-12) if len(s) > 1 else s * 0 for s in scores]
    drop_total = _half_up(total * ratio) if ratio is not None else remove
    flat = torch.cat([s.double() for s in scores])
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    keeps = list(sizes)
    for j in torch.argsort(flat, stable=True).tolist():
        if drop_total == 0:
            break
        g = int(owner[j])
        if keeps[g] > floor:
            keeps[g] -= 1
            drop_total -= 1
    return [_rounded(k, n, round_to) for k, n in zip(keeps, sizes)]


def kept_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the `keep` highest-scoring units; ties keep the earlier unit."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[:keep].sort().values
