"""`fold_constants`: evaluate ops whose inputs are all constants (buffers, literals) once, at compile time.

Parameters are never folded into new constants: later passes (pruning, quantization) must still see
each weight as the parameter it is, and folding a transposed weight would store it twice.
"""
from __future__ import annotations

import torch
import torch.fx

from prunus.passes.base import Pass, PassResult
from prunus.passes.cleanup.dce import eliminate_dead_code
from prunus.passes.registry import register


def _is_symbolic(val) -> bool:
    if isinstance(val, torch.SymInt):
        return True
    if isinstance(val, torch.Tensor):
        return any(isinstance(s, torch.SymInt) for s in val.shape)
    if isinstance(val, (tuple, list)):
        return any(_is_symbolic(v) for v in val)
    return False


def _foldable_op(node: torch.fx.Node) -> bool:
    t = node.target
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return False
    if t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags:
        return False
    return not _is_symbolic(node.meta.get("val"))


@register
class FoldConstants(Pass):
    """Evaluate ops whose inputs are all constants once, and store the results as buffers."""

    name = "fold_constants"
    kind = "exact"

    def run(self, graph, ctx) -> PassResult:
        values: dict[torch.fx.Node, object] = {}
        for node in graph.graph.nodes:
            if node.op == "get_attr" and not graph.is_parameter(node):
                value = graph.get_attr_value(node)
                if isinstance(value, torch.Tensor):
                    values[node] = value
            elif _foldable_op(node) and all(a in values for a in node.all_input_nodes):
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: values[a])
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)
        folded = 0
        for node, value in values.items():
            if node.op == "get_attr" or not isinstance(value, torch.Tensor):
                continue
            if all(u in values for u in node.users):
                continue  # an intermediate value: only the frontier becomes a constant
            name = graph.add_constant(value.detach().clone(), "_folded")
            with graph.graph.inserting_before(node):
                const = graph.graph.get_attr(name)
            const.meta.update(node.meta)
            node.replace_all_uses_with(const)
            folded += 1
        removed = eliminate_dead_code(graph)
        return PassResult(modified=folded > 0 or removed > 0,
                          notes=[f"folded {folded} constants, {removed} nodes removed"])
