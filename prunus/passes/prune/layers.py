"""`prune_layers`: remove whole decoder layers with the lowest block influence (ShortGPT).

ShortGPT (Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect", 2024)
scores layer i by BI_i = 1 - mean over calibration tokens of cos(x_in, x_out), the hidden state entering and
leaving the layer; layers that barely turn the residual stream are removed. A layer spans the residual
blocks (`blocks` analysis) of one layer index; removing it routes its exit's users to its entry, and dead
code elimination drops its ops and weights. Only pre-norm stacks qualify: there a layer's exit is the next
layer's entry, so skipping it is exactly "the layer computes the identity".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from prunus.errors import PassError
from prunus.passes.base import LossyParams, Pass, PassResult, param
from prunus.passes.cleanup.dce import METADATA_ASSERTS, eliminate_dead_code
from prunus.passes.registry import register

aten = torch.ops.aten
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.alias.default, aten.contiguous.default}


@dataclass(kw_only=True)
class PruneLayersParams(LossyParams):
    ratio: float | None = param(None, "fraction of the layers to remove", range="(0, 1)")
    n: int | None = param(None, "number of layers to remove, instead of ratio", range="[1, inf)")
    importance: str = param("block_influence", "how layers are scored", choices=("block_influence",))

    def check(self) -> str | None:
        if (self.ratio is None) == (self.n is None):
            return "give exactly one of ratio and n"
        return None


def _through_casts(node: torch.fx.Node) -> torch.fx.Node:
    while node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    return node


def decoder_layers(graph, pass_name: str) -> list[tuple[int, torch.fx.Node, torch.fx.Node]]:
    """(layer index, entry, exit) of every layer, checking that each exit feeds the next entry directly."""
    spans: dict = {}
    for blk in graph.analysis("blocks"):
        entry, _ = spans.get(blk.layer, (blk.entry, None))
        spans[blk.layer] = (entry, blk.exit)
    layers = [(i, entry, exit_) for i, (entry, exit_) in sorted(spans.items())]
    for (_, _, exit_), (j, entry, _) in zip(layers, layers[1:]):
        if _through_casts(entry) is not exit_:
            raise PassError(pass_name, f"layer {j} does not start from the previous layer's residual output (a "
                                       "post-norm or a reshape sits between them): removing layers needs a "
                                       "pre-norm stack", node=entry.name)
    for i, entry, exit_ in layers:
        if tuple(entry.meta["val"].shape) != tuple(exit_.meta["val"].shape):
            raise PassError(pass_name, f"layer {i} changes the residual shape", node=exit_.name)
    return layers


class _Recorder(torch.fx.Interpreter):
    """Accumulates, per layer exit, the sum over tokens of cos(entry, exit) and the token count."""

    def __init__(self, gm, layers):
        super().__init__(gm)
        self.pairs = {exit_: entry for _, entry, exit_ in layers}
        self.cos = dict.fromkeys(self.pairs, 0.0)
        self.tokens = dict.fromkeys(self.pairs, 0)
        self.entries = set(self.pairs.values())
        self.held = {}  # entry values, kept past the point where the interpreter frees them

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.entries:
            self.held[n] = out
        if n in self.pairs:
            x_in, x_out = (t.double().flatten(0, -2) for t in (self.held.pop(self.pairs[n]), out))
            cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
            self.cos[n] += float(cos.sum())
            self.tokens[n] += cos.numel()
        return out


def block_influence(graph, layers, samples: list) -> list[float]:
    """BI of each layer: 1 - mean cos(x_in, x_out) over every calibration token."""
    recorder = _Recorder(graph.gm, layers)
    with torch.no_grad():
        for sample in samples:
            recorder.run(*sample)
    return [1.0 - recorder.cos[exit_] / recorder.tokens[exit_] for _, _, exit_ in layers]


def _erase(graph, doomed: set) -> None:
    """Erase the removed layers' unused nodes even where fx counts them impure (dropout is seeded random)."""
    for node in reversed(list(graph.graph.nodes)):
        if node in doomed:
            for check in [u for u in node.users if u.target in METADATA_ASSERTS]:
                graph.graph.erase_node(check)
            if not node.users:
                graph.graph.erase_node(node)


@register
class PruneLayers(Pass):
    """Remove whole decoder layers with the lowest block influence (ShortGPT), by rewiring the residual."""

    name = "prune_layers"
    kind = "lossy"
    Params = PruneLayersParams
    requires = ("blocks",)
    needs_calibration = True

    def run(self, graph, ctx) -> PassResult:
        p = self.params
        layers = decoder_layers(graph, self.name)
        if not layers:
            raise PassError(self.name, "no residual layers found")
        remove = p.n if p.n is not None else math.floor(len(layers) * p.ratio + 0.5)
        if remove >= len(layers):
            raise PassError(self.name, f"cannot remove {remove} of {len(layers)} layers: at least one must stay")
        if remove == 0:
            return PassResult(modified=False, notes=["no layer removed (ratio too small)"])
        scores = block_influence(graph, layers, ctx.calibration)
        order = sorted(range(len(layers)), key=lambda i: (scores[i], i))[:remove]
        doomed = set()
        for i in order:
            _, entry, exit_ = layers[i]
            exit_.replace_all_uses_with(entry)
            doomed |= {n for blk in graph.analysis("blocks") if blk.layer == layers[i][0]
                       for n in blk.body | {blk.exit, blk.entry}} - {entry}
        _erase(graph, doomed)
        eliminate_dead_code(graph)
        removed = sorted(layers[i][0] for i in order)
        bi = ", ".join(f"{layers[i][0]}: {scores[i]:.3g}" for i in range(len(layers)))
        return PassResult(modified=True, notes=[f"removed layers {removed}; block influence {bi}"])
