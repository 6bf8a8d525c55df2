"""Sibling linears as one matmul: `fuse(merge_linears=true)`.

A decoder layer's q, k and v projections read the same normed hidden state, and so do the MLP's gate and up
projections. Run apart, each is a matmul launch over its own weight; at decode (a few rows) each is a
weight-streaming GEMV-like call, and the small ones (k and v under grouped-query attention: 1024 x 4096 for
Llama-3-8B) run well below the device's bandwidth. Here such a group becomes one call over the weights
concatenated along the output dim, followed by `aten.split_with_sizes` (views, no copy): the same dot products,
one launch, one larger weight stream (vLLM's QKVParallelLinear and merged gate_up do the same). H100, bf16
(benchmarks/merge_linear_gpu.py): q/k/v 31-33 µs separate, 22 µs merged, at 1 to 64 rows.

The quantized linears of `prunus.kernels.quant_linear` merge the same way: every packed format stores one row
per output channel ([N, ...] qweight, scales, zeros, bias), so the concatenated rows are the merged layer's
(same scheme, group size and input width; W8A8 siblings only where they read one smoothing vector).

A group is the calls of one op in one layer (module path) that read one input node, with tensors of one dtype
and row width at each position, the same optional arguments present, each tensor an attribute read by that call
alone (a weight shared with another op, such as a tied embedding, stays where it is). The merged tensors replace
the originals in the graph and keep their kind: a merged parameter is a parameter, so the parameter count does
not change. They are new tensors: the user's model keeps its own (the captured graph shared them), so while both
are alive the merged projections are held twice (Llama-3-8B, bf16: 9 GB of q/k/v and gate/up); the graph's
separate copies, where it owned them (quantized), are released as each group is merged. The merged call keeps
its members' module paths (`meta["merged_paths"]`), which `quantize(include/exclude)` matches after a fuse.
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx

from prunus.ir.graph import common_module_path, layer_index, module_path

aten = torch.ops.aten


def _mergeable() -> dict:
    """op -> (argument positions concatenated along the output dim, positions every member shares)."""
    import prunus.kernels.quant_linear  # noqa: F401 - registers torch.ops.prunus.linear_*

    prunus = torch.ops.prunus
    return {aten.linear.default: ((1, 2), ()),
            prunus.linear_int4.default: ((1, 2, 3, 4), (5,)),
            prunus.linear_int8.default: ((1, 2, 3), ()),
            prunus.linear_fp8.default: ((1, 2, 3), ()),
            prunus.linear_w8a8.default: ((1, 2, 4), (3,))}


def _readers(graph) -> dict[str, int]:
    """Attribute name -> how many ops read it (over every get_attr node naming it)."""
    count: dict[str, int] = {}
    for n in graph.graph.nodes:
        if n.op == "get_attr":
            count[n.target] = count.get(n.target, 0) + len(n.users)
    return count


def _arg(n: torch.fx.Node, i: int):
    return n.args[i] if i < len(n.args) else None


def _group_key(graph, n: torch.fx.Node, concat, shared, readers) -> tuple | None:
    """What members of one group have in common, or None where `n` cannot merge."""
    if n.kwargs or not isinstance(n.args[0], torch.fx.Node):
        return None
    layout = []
    for i in concat:
        a = _arg(n, i)
        if a is None:
            layout.append(None)
            continue
        if not isinstance(a, torch.fx.Node) or a.op != "get_attr" or readers[a.target] != 1:
            return None
        t = graph.get_attr_value(a)
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        layout.append((t.dtype, t.device, tuple(t.shape[1:]), graph.is_parameter(a)))
    if layout[0] is None:
        return None
    return (n.target, n.args[0], tuple(layout), layer_index(module_path(n)),
            tuple(a.target if isinstance(a := _arg(n, i), torch.fx.Node) else a for i in shared))


def sibling_linears(graph) -> list[list[torch.fx.Node]]:
    """Groups (in graph order, two or more each) of linears that `merge_linears` can run as one call."""
    ops, readers = _mergeable(), _readers(graph)
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for n in graph.graph.nodes:
        if n.op == "call_function" and n.target in ops:
            key = _group_key(graph, n, *ops[n.target], readers)
            if key is not None:
                groups.setdefault(key, []).append(n)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def merge_linears(graph) -> int:
    """Merge every group of `sibling_linears`; returns how many linears were merged away."""
    g, ops, merged = graph.graph, _mergeable(), 0
    for nodes in sibling_linears(graph):
        first = nodes[0]
        concat, _ = ops[first.target]
        common = common_module_path(nodes)  # model.layers.0.self_attn for q, k, v
        prefix = re.sub(r"\W", "_", common or first.name) + "_merged_"
        sizes = [graph.get_attr_value(n.args[concat[0]]).shape[0] for n in nodes]
        args = list(first.args)
        with g.inserting_before(first):
            for i in concat:
                if _arg(first, i) is None:
                    continue
                parameter = graph.is_parameter(first.args[i])
                with torch.no_grad():
                    tensor = torch.cat([graph.get_attr_value(n.args[i]) for n in nodes])
                name = prefix + first.args[i].target.rpartition(".")[2].rpartition("_")[2]
                args[i] = g.get_attr(_add_parameter(graph, tensor, name) if parameter
                                     else graph.add_constant(tensor, name))
                del tensor
            call = g.call_function(first.target, tuple(args))
            parts = g.call_function(aten.split_with_sizes.default, (call, sizes, -1))
        stack = {k: v for k, v in first.meta.get("nn_module_stack", {}).items()
                 if common and (common == v[0] or common.startswith(v[0] + "."))}
        call.meta["nn_module_stack"] = parts.meta["nn_module_stack"] = stack
        call.meta["merged_paths"] = [module_path(n) for n in nodes]  # what `quantize(include/exclude)` matches
        prev = parts
        for i, n in enumerate(nodes):
            with g.inserting_after(prev):
                item = g.call_function(operator.getitem, (parts, i))
            item.meta.update(n.meta)
            n.replace_all_uses_with(item)
            g.erase_node(n)
            prev = item
        graph.drop_unreferenced()  # the separate tensors go now, not after every group has a second copy
        merged += len(nodes) - 1
    return merged


def _add_parameter(graph, tensor: torch.Tensor, name: str) -> str:
    base, i = name, 0
    while hasattr(graph.gm, name):
        name, i = f"{base}{i}", i + 1
    graph.gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    return name
