"""Activation statistics at the inputs of chosen nodes, gathered over calibration data.

Quantization (GPTQ's Hessian, AWQ's and SmoothQuant's channel magnitudes) and pruning criteria (Wanda's
input norms, FLAP's fluctuation) all read the same few statistics of a layer's input X [tokens, K]; one
pass over the calibration set gathers them for every node at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx


@dataclass
class InputStats:
    """Running statistics of one node's input, flattened to [tokens, K]."""

    tokens: int = 0
    sum: torch.Tensor | None = None  # [K]
    sumsq: torch.Tensor | None = None  # [K]
    sum_abs: torch.Tensor | None = None  # [K]
    absmax: torch.Tensor | None = None  # [K]
    xtx: torch.Tensor | None = None  # [K, K], only when asked (GPTQ)
    sample: list = field(default_factory=list)  # up to `keep_rows` rows, for output-error searches (AWQ)

    def update(self, x: torch.Tensor, hessian: bool, keep_rows: int) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.tokens += x.shape[0]
        add = lambda old, new: new if old is None else old + new  # noqa: E731
        self.sum = add(self.sum, x.sum(0))
        self.sumsq = add(self.sumsq, (x * x).sum(0))
        self.sum_abs = add(self.sum_abs, x.abs().sum(0))
        amax = x.abs().amax(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if hessian:
            self.xtx = add(self.xtx, x.t() @ x)
        have = sum(r.shape[0] for r in self.sample)
        if have < keep_rows:
            self.sample.append(x[: keep_rows - have].float())

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.tokens

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.sum_abs / self.tokens

    @property
    def l2(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens (Wanda's input norm)."""
        return self.sumsq.sqrt()

    @property
    def var(self) -> torch.Tensor:
        """Sample variance of each input channel (FLAP's fluctuation)."""
        n = max(self.tokens - 1, 1)
        return (self.sumsq - self.sum * self.sum / self.tokens) / n

    @property
    def rows(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.empty(0)


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm, watch: dict, hessian: bool, keep_rows: int):
        super().__init__(gm)
        self.watch, self.hessian, self.keep_rows = watch, hessian, keep_rows

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch:
            self.watch[n].update(out, self.hessian, self.keep_rows)
        return out


def collect_input_stats(graph, samples: list, nodes: dict, *, hessian: bool = False,
                        keep_rows: int = 512) -> dict:
    """Run `graph` on every sample (a flat tensor list); `nodes` maps node -> index of the watched arg (a node).
    Nodes that read one input (q/k/v, gate/up) share one InputStats: gathered once, one Hessian among them."""
    by_input = {}
    for n, arg in nodes.items():
        by_input.setdefault(n.args[arg], InputStats())
    recorder = _Recorder(graph.gm, by_input, hessian, keep_rows)
    with torch.no_grad():
        for sample in samples:
            recorder.run(*sample)
    return {n: by_input[n.args[arg]] for n, arg in nodes.items()}
