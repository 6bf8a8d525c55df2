"""taylor: first-order Taylor importance |w * dL/dw| summed over every weight of a unit.

LLM-Pruner (Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language Models", NeurIPS 2023):
the loss change from zeroing a group is estimated from gradients of the language-modelling loss on a few
calibration samples. Gradients come from running the captured GraphModule with autograd on temporary
leaf views of the weights, so the user's parameters are never marked as requiring grad.
"""
from __future__ import annotations

import torch

from prunus.errors import PassError
from prunus.passes.prune.units import Evidence, unit_view, weights


def next_token_loss(out, sample, pass_name: str, what: str, instead: str) -> torch.Tensor:
    """Mean next-token cross-entropy of a graph's output `out` on `sample` (token ids first); a PassError
    naming `what` and suggesting `instead` when the graph is not a language model."""
    ids = sample[0]
    logits = out[0] if isinstance(out, (tuple, list)) else out
    if ids.dtype.is_floating_point or ids.dim() != 2 or logits.dim() != 3 or \
            logits.shape[:2] != ids.shape or int(ids.max()) >= logits.shape[-1]:
        raise PassError(pass_name, f"{what} needs a language model (token ids in, logits [batch, seq, vocab] "
                                   f"out); {instead}")
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def gradients(graph, samples: list, targets: set, pass_name: str) -> dict:
    """Sum over `samples` of d(next-token cross-entropy)/d(param) for each get_attr target in `targets`.

    `torch.autograd.grad` (not `backward`) so that no `.grad` lands on the user's parameters, which the
    GraphModule shares and which may require grad."""
    gm = graph.gm
    swapped = {}
    for target in sorted(targets):
        owner, _, attr = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        swapped[target] = (mod, attr, mod._parameters[attr])
        mod._parameters[attr] = torch.nn.Parameter(mod._parameters[attr].detach(), requires_grad=True)
    leaves = [mod._parameters[attr] for mod, attr, _ in swapped.values()]
    total = [torch.zeros_like(p) for p in leaves]
    try:
        with torch.enable_grad():
            for sample in samples:
                loss = next_token_loss(gm(*sample), sample, pass_name, "importance=taylor",
                                       "use magnitude, wanda or flap")
                for acc, g in zip(total, torch.autograd.grad(loss, leaves)):
                    acc += g
        return dict(zip(swapped, total))
    finally:
        for mod, attr, original in swapped.values():
            mod._parameters[attr] = original


def score(graph, group, evidence: Evidence) -> torch.Tensor:
    total = torch.zeros(group.units, dtype=torch.float64)
    for m in group.members:
        w = weights(graph, m)
        total += unit_view(w * evidence.grads[m.weight.target], m).abs().sum(1)
        if m in group.producers and m.bias is not None:
            b = graph.get_attr_value(m.bias)
            total += unit_view(b * evidence.grads[m.bias.target], m).abs().sum(1)
    return total


def targets(groups) -> set:
    """The parameters whose gradients `score` reads."""
    out = set()
    for g in groups:
        for m in g.members:
            out.add(m.weight.target)
            if m in g.producers and m.bias is not None:
                out.add(m.bias.target)
    return out
