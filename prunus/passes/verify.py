"""Output comparison used by the pass manager (and by `prunus.eval.fidelity`).

Exact passes must reproduce the previous outputs within float tolerance; lossy passes are scored by
top-1 agreement, KL(reference || candidate) and SQNR on the first floating output (the logits).
"""
from __future__ import annotations

import math

import torch


def _float_outputs(outs) -> list[torch.Tensor]:
    return [o for o in torch.utils._pytree.tree_leaves(outs) if isinstance(o, torch.Tensor) and o.is_floating_point()]


def max_abs_error(reference: list, candidate: list) -> tuple[float, float]:
    """Largest absolute difference over all outputs, and the largest |reference| (for a relative bound)."""
    err, scale = 0.0, 0.0
    for r, c in zip(reference, candidate):
        if not isinstance(r, torch.Tensor):
            continue
        if r.shape != c.shape:
            return math.inf, 1.0
        if r.is_floating_point():
            err = max(err, (r.double() - c.double()).abs().max().item() if r.numel() else 0.0)
            scale = max(scale, r.abs().max().item() if r.numel() else 0.0)
        elif not torch.equal(r, c):
            return math.inf, 1.0
    return err, scale


def fidelity_metrics(reference: list, candidate: list) -> dict:
    """top1 agreement, mean KL and SQNR (dB) between the first floating outputs (last dim = classes)."""
    r_all, c_all = _float_outputs(reference), _float_outputs(candidate)
    if not r_all or not c_all:
        return {}
    r, c = r_all[0].double(), c_all[0].double()
    if r.shape != c.shape:  # token dropping keeps only some positions: compare the last one
        r, c = r[..., -1:, :], c[..., -1:, :]
    top1 = (r.argmax(-1) == c.argmax(-1)).double().mean().item()
    logp, logq = torch.log_softmax(r, -1), torch.log_softmax(c, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    noise = (r - c).pow(2).sum().item()
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(r.pow(2).sum().item(), 1e-300) / noise)
    return {"top1": top1, "kl": kl, "sqnr_db": sqnr}
