"""`fuse(backend=triton, patterns=[...])`: replace fusible regions by generated Triton kernels.

partition (regions of elementwise ops with row reductions) -> emit (Triton source + reference per region)
-> runtime (a `prunus::fused` custom op call per region, the kernel cached by its source hash).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from prunus.codegen.triton import runtime
from prunus.codegen.triton.emit import Unsupported, emit
from prunus.codegen.triton.partition import PATTERNS, classify, group_siblings, partition, worth_fusing
from prunus.passes.base import LossyParams, Pass, PassResult, param
from prunus.passes.cleanup.dce import METADATA_ASSERTS
from prunus.passes.registry import register


@dataclass(kw_only=True)
class FuseParams(LossyParams):
    backend: str = param("triton", "code generator for the fused kernels", choices=("triton",))
    patterns: list[str] = param(list(PATTERNS), "which kinds of region to fuse (default: all)")
    group: bool = param(True, "launch independent sibling regions of one pattern that read a common input "
                              "(RoPE of q and k) as one kernel")

    def check(self) -> str | None:
        unknown = [p for p in self.patterns if p not in PATTERNS]
        if unknown:
            return f"unknown pattern(s) {', '.join(map(repr, unknown))} for key 'patterns' (accepted: " \
                   f"{', '.join(PATTERNS)})"
        if not self.patterns:
            return "patterns is empty: name at least one of " + ", ".join(PATTERNS)
        return None


def _topological_sort(graph: torch.fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, keeping the existing order where it already does."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    placed, result = set(), []

    def place(node):
        stack = [(node, False)]
        while stack:
            n, ready = stack.pop()
            if n in placed:
                continue
            if ready:
                placed.add(n)
                result.append(n)
                continue
            stack.append((n, True))
            for a in sorted(n.all_input_nodes, key=order.__getitem__, reverse=True):
                if a not in placed:
                    stack.append((a, False))

    for n in list(graph.nodes):
        place(n)
    output = next(n for n in result if n.op == "output")
    result.remove(output)
    result.append(output)
    prev = result[0]
    if prev is not next(iter(graph.nodes)):
        next(iter(graph.nodes)).prepend(prev)
    for n in result[1:]:
        prev.append(n)
        prev = n


def replace_region(graph, region, key: str) -> dict:
    """Swap `region`'s nodes for one `prunus::fused` call (placed after its last node) and getitems.

    Returns {replaced output node: its getitem}, for regions found before the swap that read them."""
    g = graph.graph
    last = region.nodes[-1]
    with g.inserting_after(last):
        call = g.call_function(torch.ops.prunus.fused.default, (list(region.inputs), key))
    call.meta["val"] = [o.meta["val"] for o in region.outputs]
    call.meta["nn_module_stack"] = last.meta.get("nn_module_stack", {})
    prev, replaced = call, {}
    for i, out in enumerate(region.outputs):
        with g.inserting_after(prev):
            item = g.call_function(operator.getitem, (call, i))
        item.meta.update(out.meta)
        out.replace_all_uses_with(item)
        replaced[out] = prev = item
    for n in reversed(region.nodes):
        for user in [u for u in n.users if u.target in METADATA_ASSERTS]:
            g.erase_node(user)
        g.erase_node(n)
    return replaced


@register
class Fuse(Pass):
    """Fuse chains of elementwise ops and row reductions (norms, SwiGLU, GELU, RoPE, softmax) into Triton kernels."""

    name = "fuse"
    Params = FuseParams
    kind = "exact"

    def run(self, graph, ctx) -> PassResult:
        # Kernels compute in float32 and reduce in their own order: in a float32 graph the result matches to
        # float tolerance (exact), but a bf16/fp16 value can round to the neighbouring value, so such graphs
        # are verified as lossy (fidelity reported; the budgets max_kl/min_top1/min_sqnr_db apply).
        narrow = any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype in (torch.bfloat16,
                     torch.float16) for n in graph.graph.nodes)
        self.kind = "lossy" if narrow else "exact"
        wanted = set(self.params.patterns)
        counts: dict[str, int] = {}
        skipped, replaced, groups = [], {}, 0
        chosen = [r for r in partition(graph.gm) if worth_fusing(r) and classify(r) in wanted]
        todo = group_siblings(graph.gm, chosen) if self.params.group else chosen
        while todo:
            region = todo.pop(0)
            region.inputs = [replaced.get(n, n) for n in region.inputs]
            for part in region.parts:
                part.inputs = [replaced.get(n, n) for n in part.inputs]
            try:
                key, source = emit(region)
            except Unsupported as e:
                if region.parts:  # generate the members one by one
                    todo[:0] = region.parts
                    continue
                skipped.append(f"{region.nodes[-1].name}: {e}")
                continue
            runtime.register_kernel(key, source)
            replaced.update(replace_region(graph, region, key))
            pattern = classify(region)
            counts[pattern] = counts.get(pattern, 0) + len(region.parts or [region])
            groups += bool(region.parts)
        if counts:
            _topological_sort(graph.graph)
        total = sum(counts.values())
        notes = [f"{total} regions fused" + (": " + ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))
                                              if counts else "")]
        notes += [f"{groups} groups of sibling regions launched as one kernel"] if groups else []
        notes += [f"{len(runtime.kernels_of(graph.gm))} distinct kernels"] if counts else []
        notes += [f"not generated: {s}" for s in skipped]
        return PassResult(modified=total > 0, notes=notes)
