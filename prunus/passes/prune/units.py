"""Reading a group's weights unit by unit: what every importance criterion starts from."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prunus.ir.analyses.channel_groups import Member


@dataclass
class Evidence:
    """What criteria read besides the weights: consumer input statistics and parameter gradients."""

    stats: dict = field(default_factory=dict)  # consumer matmul node -> InputStats of its pruned input
    grads: dict = field(default_factory=dict)  # get_attr target -> accumulated gradient


def unit_view(tensor: torch.Tensor, member: Member) -> torch.Tensor:
    """`tensor` (shaped like the member's weight, or its bias) as [units, values of that unit]."""
    moved = tensor.detach().double().movedim(member.dim if tensor.dim() > 1 else 0, 0)
    return moved[member.index].reshape(member.index.shape[0], -1)


def weights(graph, member: Member) -> torch.Tensor:
    return graph.get_attr_value(member.weight)


def consumer_channels(graph, member: Member) -> torch.Tensor:
    """A consumer's weight as [units, channels per unit, outputs]: the columns that read each unit."""
    w = weights(graph, member).detach().double().movedim(member.dim, 0)
    return w[member.index]
