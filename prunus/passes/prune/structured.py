"""`prune_mlp`, `prune_heads` and `prune_hidden`: score the units of every channel group, allocate, and cut the weights.

Importance criteria and allocation rules are plug-ins over the `channel_groups` analysis (DepGraph / SPA
style grouping): magnitude, wanda (structured Wanda, Sun et al. 2023), flap (An et al., AAAI 2024, with
bias compensation) and taylor (LLM-Pruner, Ma et al. 2023). The pruned graph is physically smaller: fewer
parameters and FLOPs, and it saves, reloads and exports like any other graph.

`prune_hidden` slices channels of the residual stream (the hidden width) without rotating it first: SliceGPT
(Ashkboos et al., ICLR 2024) deletes principal directions after a PCA rotation; here the channels themselves
are scored (magnitude of every weight reading or writing them, or wanda/flap/taylor over the projections that
read them) and removed from embeddings, projections and norms together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunus.errors import PassError
from prunus.ir.analyses.channel_groups import activation_arg
from prunus.passes.base import LossyParams, Pass, PassResult, param
from prunus.passes.prune import allocation, flap, magnitude, taylor, wanda
from prunus.passes.prune.surgery import prune_group
from prunus.passes.prune.units import Evidence
from prunus.passes.registry import register
from prunus.passes.stats import collect_input_stats

CRITERIA = {"magnitude": magnitude.score, "wanda": wanda.score, "flap": flap.score, "taylor": taylor.score}
NEEDS_STATS = {"wanda", "flap"}
CALIBRATED = {"wanda", "flap", "taylor"}


@dataclass(kw_only=True)
class PruneParams(LossyParams):
    ratio: float | None = param(None, "fraction of the units (neurons or heads) to remove", range="(0, 1)")
    n: int | None = param(None, "number of units to remove in total, instead of ratio", range="[1, inf)")
    importance: str = param("magnitude", "how units are scored", choices=tuple(CRITERIA))
    allocation: str = param("uniform", "how the removal is spread over layers", choices=allocation.ALLOCATIONS)
    compensate: bool | None = param(None, "fold the removed channels' mean output into the consumer bias "
                                          "(FLAP); default: on with importance=flap")

    def check(self) -> str | None:
        if (self.ratio is None) == (self.n is None):
            return "give exactly one of ratio and n"
        return None


@dataclass(kw_only=True)
class PruneMLPParams(PruneParams):
    round_to: int = param(8, "kept MLP widths are multiples of this (hardware-friendly)", range="[1, inf)")


class _StructuredPrune(Pass):
    kind = "lossy"
    requires = ("channel_groups",)
    unit: str
    group_kind: str

    @property
    def needs_calibration(self) -> bool:
        return self.params.importance in CALIBRATED or bool(self.params.compensate)

    def _remove(self, groups) -> int | None:
        return self.params.n

    def _round_to(self) -> int:
        return 1

    def run(self, graph, ctx) -> PassResult:
        p = self.params
        found = graph.analysis("channel_groups")
        groups = self._groups(found)
        if not groups:
            why = "; ".join(f"{node}: {reason}" for kind, node, reason in found.unsupported + found.hidden_unsupported
                            if kind == self.group_kind)
            raise PassError(self.name, f"no prunable {self.unit} group found" + (f" ({why})" if why else ""))
        compensate = p.compensate if p.compensate is not None else p.importance == "flap"
        evidence = Evidence()
        if p.importance in NEEDS_STATS or compensate:
            watched = {m.node: activation_arg(m.node) for g in groups for m in g.consumers}
            evidence.stats = collect_input_stats(graph, ctx.calibration, watched, keep_rows=0)
        if p.importance == "taylor":
            evidence.grads = taylor.gradients(graph, ctx.calibration, taylor.targets(groups), self.name)
        scores = [CRITERIA[p.importance](graph, g, evidence) for g in groups]
        names = [g.module or f"layer {g.layer}" for g in groups]
        ranked = [self._allocated(g, s) for g, s in zip(groups, scores)]
        keeps = allocation.keep_counts(ranked, ratio=p.ratio, remove=self._remove(groups),
                                       allocation=p.allocation, round_to=self._round_to(), pass_name=self.name,
                                       names=names, unit=self.unit, per_unit=self._heads_per_unit(groups[0]))
        means = {n: s.mean for n, s in evidence.stats.items()} if compensate else None
        before = sum(len(r) for r in ranked)
        for g, s, k in zip(groups, scores, keeps):
            prune_group(graph, g, self._kept(g, s, k), self.name, means)
        after = sum(keeps)
        if after == before:
            return PassResult(modified=False, notes=[f"no {self.unit} removed (ratio too small for the widths)"])
        per_layer = ", ".join(str(k * self._heads_per_unit(g)) for g, k in zip(groups, keeps))
        return PassResult(modified=True, notes=[
            f"{self.unit}s {self._count(groups, before)} -> {self._count(groups, after)} "
            f"({p.importance}, {p.allocation}{', bias compensation' if compensate else ''}); per layer: {per_layer}"])

    def _heads_per_unit(self, group) -> int:
        return 1

    def _count(self, groups, units: int) -> int:
        return units

    def _groups(self, found) -> list:
        return getattr(found, self.group_kind)

    def _allocated(self, group, scores):
        """The scores allocation ranks: one per unit it counts."""
        return scores

    def _kept(self, group, scores, keep: int):
        """The units of `group` that stay when allocation gave it `keep`."""
        return allocation.kept_units(scores, keep)


@register
class PruneMLP(_StructuredPrune):
    """Remove MLP neurons (rows of the up/gate projections, columns of the down projection)."""

    name = "prune_mlp"
    Params = PruneMLPParams
    unit = "neuron"
    group_kind = "mlp"

    def _round_to(self) -> int:
        return self.params.round_to


@dataclass(kw_only=True)
class PruneHeadsParams(PruneParams):
    within_kv_groups: bool = param(False, "under grouped-query attention, remove query heads inside each KV group "
                                          "(the same number from every group; K and V stay whole) instead of "
                                          "whole KV groups")


@register
class PruneHeads(_StructuredPrune):
    """Remove attention heads from the q/k/v and output projections: whole KV groups under GQA, or with
    `within_kv_groups` query heads inside them (q rows and o columns only; the GQA repeat's literals scale)."""

    name = "prune_heads"
    Params = PruneHeadsParams
    unit = "head"

    @property
    def group_kind(self) -> str:
        return "query_heads" if self.params.within_kv_groups else "heads"

    def _groups(self, found) -> list:
        if self.params.within_kv_groups and not found.query_heads:
            return [g for g in found.heads if g.heads_per_unit == 1]  # no GQA: a KV group is one query head
        return getattr(found, self.group_kind)

    def _heads_per_unit(self, group) -> int:
        return group.heads_per_unit

    def _remove(self, groups) -> int | None:
        n = self.params.n
        rep = groups[0].heads_per_unit
        if n is not None and (n % rep or any(g.heads_per_unit != rep for g in groups)):
            how = (f"within_kv_groups removes as many query heads from each of the {rep} KV groups"
                   if self.params.within_kv_groups else
                   f"under grouped-query attention heads go in whole KV groups of {rep}")
            raise PassError(self.name, f"n={n} heads: {how}; give a multiple of {rep}")
        return None if n is None else n // rep

    def _allocated(self, group, scores):
        if group.kind != "query_heads":
            return scores
        # slot r = the r-th best query head of every KV group: keeping k slots keeps each group's best k
        return scores.view(group.per_kv_group, -1).sort(dim=1, descending=True).values.sum(dim=0)

    def _kept(self, group, scores, keep: int):
        if group.kind != "query_heads":
            return allocation.kept_units(scores, keep)
        per_group = scores.view(group.per_kv_group, -1)
        rep = per_group.shape[1]
        return torch.cat([g * rep + allocation.kept_units(s, keep) for g, s in enumerate(per_group)])

    def _count(self, groups, units: int) -> int:
        return units * groups[0].heads_per_unit


@register
class PruneHidden(_StructuredPrune):
    """Remove channels of the hidden dimension (residual stream) from embeddings, projections and norms."""

    name = "prune_hidden"
    Params = PruneMLPParams
    unit = "channel"
    group_kind = "hidden"

    def _round_to(self) -> int:
        return self.params.round_to
