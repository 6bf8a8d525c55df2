"""Sibling linears as one matmul: `fuse(merge_linears=true)`.

A decoder layer's q, k and v projections read the same normed hidden state, and so do the MLP's gate and up
projections. Run apart, each is a matmul launch over its own weight; at decode (a few rows) each is a
weight-streaming GEMV-like call, and the small ones (k and v under grouped-query attention: 1024 x 4096 for
Llama-3-8B) run well below the device's bandwidth. Here such a group becomes one `aten.linear` over the
weights concatenated along the output dim, followed by `aten.split_with_sizes` (views, no copy): the same
dot products, one launch, one larger weight stream (vLLM's QKVParallelLinear and merged gate_up do the same).

A group is the `aten.linear` calls that read one input node, with parameter weights of one dtype, device and
input width, all with or all without a parameter bias, each weight read by that call alone (a weight shared
with another op, such as a tied embedding, stays where it is: concatenating it would keep two copies). The
merged weight replaces the originals in the graph (their memory is released as each group is merged), and
stays a parameter, so the parameter count does not change.
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx

from prunus.ir.graph import common_module_path

aten = torch.ops.aten


def _param(graph, node) -> bool:
    return isinstance(node, torch.fx.Node) and graph.is_parameter(node)


def _readers(graph) -> dict[str, int]:
    """Attribute name -> how many ops read it (over every get_attr node naming it)."""
    count: dict[str, int] = {}
    for n in graph.graph.nodes:
        if n.op == "get_attr":
            count[n.target] = count.get(n.target, 0) + len(n.users)
    return count


def sibling_linears(graph) -> list[list[torch.fx.Node]]:
    """Groups (in graph order, two or more each) of linears that `merge_linears` can run as one matmul."""
    readers = _readers(graph)
    groups: dict[tuple, list[torch.fx.Node]] = {}
    for n in graph.graph.nodes:
        if n.op != "call_function" or n.target is not aten.linear.default or n.kwargs:
            continue
        x, weight = n.args[0], n.args[1]
        bias = n.args[2] if len(n.args) > 2 else None
        if not _param(graph, weight) or (bias is not None and not _param(graph, bias)):
            continue
        if readers[weight.target] != 1 or (bias is not None and readers[bias.target] != 1):
            continue
        w = graph.get_attr_value(weight)
        if w.dim() != 2:
            continue
        groups.setdefault((x, w.dtype, w.device, w.shape[1], bias is None), []).append(n)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


def merge_linears(graph) -> int:
    """Merge every group of `sibling_linears`; returns how many linears were merged away."""
    g, merged = graph.graph, 0
    for nodes in sibling_linears(graph):
        weights = [graph.get_attr_value(n.args[1]) for n in nodes]
        biases = [graph.get_attr_value(n.args[2]) for n in nodes] if len(nodes[0].args) > 2 and \
            nodes[0].args[2] is not None else None
        sizes = [w.shape[0] for w in weights]
        prefix = re.sub(r"\W", "_", common_module_path(nodes) or nodes[0].name) + "_merged_"
        with torch.no_grad():
            attrs = [_add_parameter(graph, torch.cat(weights), prefix + "weight")]
            if biases is not None:
                attrs.append(_add_parameter(graph, torch.cat(biases), prefix + "bias"))
        del weights, biases
        first = nodes[0]
        with g.inserting_before(first):
            args = [g.get_attr(a) for a in attrs]
            linear = g.call_function(aten.linear.default, (first.args[0], *args))
            parts = g.call_function(aten.split_with_sizes.default, (linear, sizes, -1))
        common = common_module_path(nodes)  # model.layers.0.self_attn for q, k, v
        stack = {k: v for k, v in first.meta.get("nn_module_stack", {}).items()
                 if common and (common == v[0] or common.startswith(v[0] + "."))}
        linear.meta["nn_module_stack"] = parts.meta["nn_module_stack"] = stack
        prev = parts
        for i, n in enumerate(nodes):
            with g.inserting_after(prev):
                item = g.call_function(operator.getitem, (parts, i))
            item.meta.update(n.meta)
            n.replace_all_uses_with(item)
            g.erase_node(n)
            prev = item
        graph.drop_unreferenced()  # the separate weights go now, not after every group has a second copy
        merged += len(nodes) - 1
    return merged


def _add_parameter(graph, tensor: torch.Tensor, prefix: str) -> str:
    name, i = prefix, 0
    while hasattr(graph.gm, name):
        name, i = f"{prefix}{i}", i + 1
    graph.gm.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    return name
