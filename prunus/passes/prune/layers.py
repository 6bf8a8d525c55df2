"""`prune_layers`: remove whole decoder layers, or their attention or MLP halves, that matter least.

Criteria:
- `block_influence` (ShortGPT: Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than
  You Expect", 2024): BI = 1 - mean over calibration tokens of cos(x_in, x_out), the residual stream entering
  and leaving the unit; units that barely turn the stream go first.
- `ppl`: the calibration next-token loss with the unit skipped, minus the loss of the whole model (the
  perplexity criterion of Kim et al., "Shortened LLaMA", 2024); one forward per unit over the calibration set.

`part` says what a unit is: `layer` (both blocks of a layer), `attention` or `mlp` (one residual block of each
layer, the `blocks` analysis), or `any` (attention and MLP blocks ranked together, so a layer may lose one half
only: "What Matters in Transformers? Not All Attention Is Needed", He et al. 2024, removes attention blocks
this way). Removing a unit routes its exit's users to its entry (the unit computes the identity) and dead code
elimination drops its ops and weights. Whole layers need a pre-norm stack, where a layer's exit is the next
layer's entry; a single block is skipped in any layout (post-norm keeps the norm after the skipped add).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx

from prunus.errors import PassError
from prunus.passes.base import LossyParams, Pass, PassResult, param
from prunus.passes.cleanup.dce import METADATA_ASSERTS, eliminate_dead_code
from prunus.passes.prune.taylor import next_token_loss
from prunus.passes.registry import register

aten = torch.ops.aten
CRITERIA = ("block_influence", "ppl")
PARTS = ("layer", "attention", "mlp", "any")
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.alias.default, aten.contiguous.default}


@dataclass(kw_only=True)
class PruneLayersParams(LossyParams):
    ratio: float | None = param(None, "fraction of the layers to remove", range="(0, 1)")
    n: int | None = param(None, "number of layers to remove, instead of ratio", range="[1, inf)")
    importance: str = param("block_influence", "how units are scored", choices=CRITERIA)
    criterion: str | None = param(None, "the same as importance (the name ShortGPT-style papers use)",
                                  choices=CRITERIA)
    part: str = param("layer", "what a removed unit is: whole layers, attention blocks, MLP blocks, or either "
                               "block ranked together", choices=PARTS)

    def check(self) -> str | None:
        if (self.ratio is None) == (self.n is None):
            return "give exactly one of ratio and n"
        if self.criterion is not None and self.importance not in ("block_influence", self.criterion):
            return f"criterion={self.criterion} and importance={self.importance} disagree: give one of them"
        return None

    @property
    def score_by(self) -> str:
        return self.criterion or self.importance


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


@dataclass
class Unit:
    """What one removal takes out: the residual stream at `entry` flows on from `exit`, skipping `nodes`."""
    name: str  # "layer 3", "layer 3 attention"
    entry: torch.fx.Node
    exit: torch.fx.Node
    nodes: set = field(default_factory=set, repr=False)


def units(graph, part: str, pass_name: str) -> list[Unit]:
    """The removable units of `graph` for `part`, in graph order."""
    blocks = graph.analysis("blocks")
    if part == "layer":
        found = []
        for i, entry, exit_ in decoder_layers(graph, pass_name):
            nodes = {n for blk in blocks if blk.layer == i for n in blk.body | {blk.exit, blk.entry}} - {entry}
            found.append(Unit(f"layer {i}", entry, exit_, nodes))
        return found
    kinds = ("attention", "mlp") if part == "any" else (part,)
    return [Unit(f"layer {blk.layer} {blk.kind}", blk.entry, blk.exit, (blk.body | {blk.exit}) - {blk.entry})
            for blk in blocks if blk.kind in kinds]


class _Recorder(torch.fx.Interpreter):
    """Accumulates, per unit exit, the sum over tokens of cos(entry, exit) and the token count."""

    def __init__(self, gm, found: list[Unit]):
        super().__init__(gm)
        self.pairs = {u.exit: u.entry for u in found}
        self.cos = dict.fromkeys(self.pairs, 0.0)
        self.tokens = dict.fromkeys(self.pairs, 0)
        self.entries = set(self.pairs.values())
        self.held = {}  # entry values, kept past the point where the interpreter frees them

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.entries:
            self.held[n] = out
        if n in self.pairs:
            x_in, x_out = (t.double().flatten(0, -2) for t in (self.held[self.pairs[n]], out))
            cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
            self.cos[n] += float(cos.sum())
            self.tokens[n] += cos.numel()
        return out


def block_influence(graph, found: list[Unit], samples: list) -> list[float]:
    """BI of each unit: 1 - mean cos(x_in, x_out) over every calibration token."""
    recorder = _Recorder(graph.gm, found)
    with torch.no_grad():
        for sample in samples:
            recorder.held.clear()
            recorder.run(*sample)
    return [1.0 - recorder.cos[u.exit] / recorder.tokens[u.exit] for u in found]


class _Skip(torch.fx.Interpreter):
    """Runs the graph with one unit skipped: its exit takes its entry's value."""

    def __init__(self, gm, unit: Unit | None):
        super().__init__(gm)
        self.unit = unit

    def run_node(self, n):
        if self.unit is not None and n is self.unit.exit:
            return self.env[self.unit.entry]
        return super().run_node(n)


def loss_increase(graph, found: list[Unit], samples: list, pass_name: str) -> list[float]:
    """Calibration next-token loss with each unit skipped, minus the whole model's."""
    def loss(unit):
        with torch.no_grad():
            return sum(float(next_token_loss(_Skip(graph.gm, unit).run(*s), s, pass_name, "criterion=ppl",
                                             "use block_influence")) for s in samples) / len(samples)
    base = loss(None)
    return [loss(u) - base for u in found]


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
    """Remove the decoder layers (or attention / MLP blocks) that matter least, by rewiring the residual."""

    name = "prune_layers"
    kind = "lossy"
    Params = PruneLayersParams
    requires = ("blocks",)
    needs_calibration = True

    def run(self, graph, ctx) -> PassResult:
        p = self.params
        found = units(graph, p.part, self.name)
        what = "layers" if p.part == "layer" else "blocks"
        if not found:
            raise PassError(self.name, "no residual layers found" if p.part == "layer" else
                            f"no {'attention or MLP' if p.part == 'any' else p.part} blocks found")
        remove = p.n if p.n is not None else math.floor(len(found) * p.ratio + 0.5)
        if remove >= len(found):
            raise PassError(self.name, f"cannot remove {remove} of {len(found)} {what}: at least one must stay")
        if remove == 0:
            return PassResult(modified=False, notes=[f"no {what[:-1]} removed (ratio too small)"])
        if p.score_by == "ppl":
            scores = loss_increase(graph, found, ctx.calibration, self.name)
        else:
            scores = block_influence(graph, found, ctx.calibration)
        chosen = sorted(range(len(found)), key=lambda i: (scores[i], i))[:remove]
        doomed = set()
        # last first: a removed unit's entry may be the exit of an earlier removed one, which must then pass
        # on to its own entry what it received
        for i in sorted(chosen, reverse=True):
            u = found[i]
            u.exit.replace_all_uses_with(u.entry)
            doomed |= u.nodes
        _erase(graph, doomed)  # only what no longer has users: kept entries stay
        eliminate_dead_code(graph)
        label = "block influence" if p.score_by == "block_influence" else "loss increase"
        scored = ", ".join(f"{u.name.removeprefix('layer ')}: {s:.3g}" for u, s in zip(found, scores))
        removed = ", ".join(found[i].name for i in sorted(chosen))
        return PassResult(modified=True, notes=[f"removed {removed}; {label} {scored}"])
