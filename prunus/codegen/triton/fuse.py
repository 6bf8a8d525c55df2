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
from prunus.codegen.triton.linears import merge_linears
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
    merge_linears: bool = param(True, "run linears that read one input (q, k and v projections; gate and up) "
                                      "as one matmul over their weights concatenated, its output split (the "
                                      "concatenated weights are new tensors beside the model's own)")
    share_masks: bool = param(True, "convert a boolean attention mask that several attention calls read to an "
                                    "additive one once, aligned as the memory-efficient kernel needs it (each "
                                    "call would convert and pad it again)")

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


SDPA = torch.ops.aten.scaled_dot_product_attention.default
MASK_ALIGNMENT = 8  # elements: the memory-efficient kernel's bias alignment (ATen's preprocess_mask)


def share_attention_masks(graph) -> int:
    """Give the attention calls that read one boolean mask a shared additive mask, made once; returns how many
    masks were converted.

    `scaled_dot_product_attention` turns a boolean mask into an additive one in the query's dtype (0 where
    True, -inf where False) on every call, and its memory-efficient kernel (the CUDA choice when a mask is
    given) then pads the bias to rows of a multiple of 8 elements unless its strides are aligned: on a
    decoder, the same conversion and copy once per layer (profiled on an H200: a where, fills and a copy, about
    4 µs a layer; BENCHMARKS.md). Here they happen once, with ATen's own ops and padding, so every call reads
    identical values: where(mask, 0, -inf) padded on the last dim by 8 - L % 8 and sliced back to L (a view
    whose row stride is aligned)."""
    g = graph.graph
    readers: dict[tuple, list[torch.fx.Node]] = {}
    for n in g.nodes:
        if n.op != "call_function" or n.target is not SDPA:
            continue
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        val = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
        if isinstance(val, torch.Tensor) and val.dtype == torch.bool and val.dim() >= 1:
            query = n.args[0].meta["val"]
            readers.setdefault((mask, query.dtype, query.device), []).append(n)
    shared = 0
    for (mask, dtype, device), calls in readers.items():
        if len(calls) < 2:
            continue
        length = mask.meta["val"].shape[-1]
        with g.inserting_before(calls[0]):
            neg_inf = g.call_function(torch.ops.aten.scalar_tensor.default, (float("-inf"),),
                                      dict(dtype=dtype, device=device))
            bias = g.call_function(torch.ops.aten.where.ScalarSelf, (mask, 0.0, neg_inf))
            if not isinstance(length, int):  # symbolic: the padding as graph arithmetic
                length = g.call_function(torch.ops.aten.sym_size.int, (mask, mask.meta["val"].dim() - 1))
                pad = g.call_function(operator.sub, (MASK_ALIGNMENT, g.call_function(operator.mod, (length,
                                                                                              MASK_ALIGNMENT))))
            else:
                pad = MASK_ALIGNMENT - length % MASK_ALIGNMENT
            padded = g.call_function(torch.ops.aten.constant_pad_nd.default, (bias, [0, pad]))
            aligned = g.call_function(torch.ops.aten.slice.Tensor, (padded, -1, 0, length))
        for call in calls:
            if len(call.args) > 3:
                call.args = (*call.args[:3], aligned, *call.args[4:])
            else:
                call.kwargs = {**call.kwargs, "attn_mask": aligned}
        shared += 1
    return shared


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
        merged = merge_linears(graph) if self.params.merge_linears else 0
        if merged:
            graph.gm.recompile()
            graph.propagate_shapes(self.name)  # the merged matmuls' shapes, which partition and emit read
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
        masks = share_attention_masks(graph) if self.params.share_masks else 0
        total = sum(counts.values())
        notes = [f"{total} regions fused" + (": " + ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))
                                              if counts else "")]
        notes += [f"{groups} groups of sibling regions launched as one kernel"] if groups else []
        notes += [f"{len(runtime.kernels_of(graph.gm))} distinct kernels"] if counts else []
        notes += [f"{masks} boolean attention mask(s) converted once for all the attention calls that read them"
                  ] if masks else []
        notes += [f"{merged} linears merged into the matmul of a sibling that reads the same input"
                  ] if merged else []
        notes += [f"not generated: {s}" for s in skipped]
        return PassResult(modified=total > 0 or masks > 0 or merged > 0, notes=notes)
