"""Partition an ATen graph into fusible regions: connected chains of table ops over the same rows.

A region's nodes all have the same leading dims (the rows, e.g. [batch, seq] or [batch, heads, seq]);
their last dims (the columns) may differ through reductions (width 1), slices and concatenations. Inputs
from outside broadcast to the rows. Nodes are visited in order and each joins the regions of its fusible
producers when the union stays acyclic (no path leaves the region and comes back) and has the same rows;
otherwise it starts a region of its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from prunus.codegen.triton import ops
from prunus.passes.cleanup.dce import METADATA_ASSERTS


@dataclass
class Region:
    """A set of fusible nodes, in graph order, with the row shape (leading dims) they share."""

    nodes: list
    rows: tuple
    inputs: list = field(default_factory=list)   # outside nodes the region reads, in first-use order
    outputs: list = field(default_factory=list)  # member nodes read outside the region, in graph order
    parts: list = field(default_factory=list)    # a group of sibling regions (one kernel): its members

    @property
    def has_reduction(self) -> bool:
        return any(n.target in ops.REDUCTIONS or n.target in ops.COMPOSITES for n in self.nodes)

    def ops(self) -> list[str]:
        return [str(n.target).removeprefix("aten.") for n in self.nodes]


def _same(a, b) -> bool:
    return a == b if isinstance(a, int) and isinstance(b, int) else str(a) == str(b)


def _same_rows(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def broadcasts_to(shape, rows: tuple) -> bool:
    """Whether a tensor of `shape` can be read per row: its leading dims broadcast to `rows`."""
    lead = tuple(shape)[:-1]
    if len(lead) > len(rows):
        return False
    return all(_same(s, 1) or _same(s, r) for s, r in zip(reversed(lead), reversed(rows)))


def _rows_of(node) -> tuple:
    return tuple(node.meta["val"].shape)[:-1]


def _reaches(starts, members: set, lowest: int, order: dict) -> bool:
    """Whether any of `starts` (outside nodes) depends on a member through outside nodes."""
    seen, stack = set(), list(starts)
    while stack:
        n = stack.pop()
        if n in seen or order[n] < lowest:
            continue
        seen.add(n)
        for a in n.all_input_nodes:
            if a in members:
                return True
            stack.append(a)
    return False


def _inputs_ok(node, rows) -> bool:
    return all(broadcasts_to(a.meta["val"].shape, rows) if a.meta["val"].dim() else True
               for a in node.all_input_nodes)


def partition(gm: torch.fx.GraphModule) -> list[Region]:
    """The fusible regions of `gm`, each with its inputs and outputs filled in, in graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    region_of: dict = {}
    regions: list[Region] = []
    for node in gm.graph.nodes:
        if not ops.fusible(node):
            continue
        rows = _rows_of(node)
        if not _inputs_ok(node, rows):
            continue
        producers = []
        for a in node.all_input_nodes:
            r = region_of.get(a)
            if r is not None and r not in producers and _same_rows(r.rows, rows):
                producers.append(r)
        # Join as many producer regions as stay acyclic, the largest first.
        joined: list[Region] = []
        for r in sorted(producers, key=lambda r: -len(r.nodes)):
            members = {n for g in joined + [r] for n in g.nodes} | {node}
            outside = {a for m in members for a in m.all_input_nodes if a not in members}
            lowest = min(order[m] for m in members)
            if not _reaches(outside, members, lowest, order):
                joined.append(r)
        if joined:
            target = joined[0]
            for r in joined[1:]:
                target.nodes.extend(r.nodes)
                for n in r.nodes:
                    region_of[n] = target
                regions.remove(r)
            target.nodes.append(node)
            target.nodes.sort(key=order.__getitem__)
        else:
            target = Region([node], rows)
            regions.append(target)
        region_of[node] = target
    for r in regions:
        members = set(r.nodes)
        for n in r.nodes:
            for a in n.all_input_nodes:
                if a not in members and a not in r.inputs:
                    r.inputs.append(a)
        # a metadata assert on a value inside the region checks what the kernel guarantees: it keeps no output
        r.outputs = [n for n in r.nodes if any(u not in members and u.target not in METADATA_ASSERTS
                                               for u in n.users)]
    return sorted(regions, key=lambda r: order[r.nodes[0]])


PATTERNS = ("rmsnorm", "layernorm", "add_norm", "swiglu", "gelu", "rope", "softmax", "elementwise")


def classify(region: Region) -> str:
    """The pattern name a region implements, from the ops it holds (for `fuse(patterns=...)` and reports)."""
    if region.parts:
        return classify(region.parts[0])
    targets = {n.target for n in region.nodes}
    aten = torch.ops.aten
    norm = aten.layer_norm.default in targets or aten.rms_norm.default in targets or aten.mean.dim in targets
    if norm:
        first = region.nodes[0]
        residual = first.target in (aten.add.Tensor,) and all(a in region.inputs for a in first.all_input_nodes) \
            and len(region.outputs) > 1
        if residual:
            return "add_norm"
        return "layernorm" if aten.layer_norm.default in targets else "rmsnorm"
    if targets & {aten.softmax.int, aten._softmax.default}:
        return "softmax"
    if aten.cat.default in targets and aten.neg.default in targets:
        return "rope"
    if aten.silu.default in targets and aten.mul.Tensor in targets:
        return "swiglu"
    if aten.gelu.default in targets or aten.tanh.default in targets:
        return "gelu"
    return "elementwise"


def worth_fusing(region: Region) -> bool:
    """A kernel per region pays off once it replaces two or more compute ops (or one row-wide composite)."""
    compute = [n for n in region.nodes if n.target in ops.COMPUTE]
    return len(compute) >= 2 or any(n.target in ops.COMPOSITES for n in compute)


def group_siblings(gm: torch.fx.GraphModule, regions: list[Region]) -> list[Region]:
    """Merge sibling regions into groups launched as one kernel: regions of one pattern and rank that read a
    common input and do not depend on each other (RoPE of q and of k reading the same cos and sin; two
    softmaxes over one mask). Each region is tried against the latest group it shares an input with,
    so a model's layers (whose regions all read the same cos and sin, one after the other) stay apart.
    A group is a Region whose `parts` are its members; it keeps the members' inputs and outputs."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: list[list[Region]] = []
    latest: dict = {}  # input node -> the latest group reading it
    for r in regions:
        home = None
        for a in r.inputs:
            g = latest.get(a)
            if g is None or home is not None:
                continue
            first = g[0]
            if classify(first) != classify(r) or len(first.rows) != len(r.rows):
                continue
            if any(n in r.inputs for m in g for n in m.outputs):  # r reads the group's result
                continue
            members = {n for m in g + [r] for n in m.nodes}
            outside = {a for m in members for a in m.all_input_nodes if a not in members}
            if not _reaches(outside, members, min(order[m] for m in members), order):
                home = g
        if home is None:
            home = []
            groups.append(home)
        home.append(r)
        for a in r.inputs:
            latest[a] = home
    merged = []
    for g in groups:
        if len(g) == 1:
            merged.append(g[0])
            continue
        inputs = []
        for m in g:
            inputs += [a for a in m.inputs if a not in inputs]
        merged.append(Region(nodes=sorted((n for m in g for n in m.nodes), key=order.__getitem__), rows=g[0].rows,
                             inputs=inputs, outputs=[o for m in g for o in m.outputs], parts=g))
    return merged
