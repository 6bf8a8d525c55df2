"""`dce`: remove ops whose results are never used, and the parameters only they read."""
from __future__ import annotations

import torch

from prunus.passes.base import Pass, PassResult
from prunus.passes.registry import register

# Metadata checks that export inserts: on a fixed graph they always hold, and keeping them would keep
# the values they check alive.
METADATA_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def eliminate_dead_code(graph) -> int:
    """Erase unused pure nodes and metadata asserts on otherwise dead values; returns how many went."""
    before = len(graph.graph.nodes)
    changed = True
    while changed:
        changed = graph.graph.eliminate_dead_code()
        for node in list(graph.graph.nodes):
            if node.op == "call_function" and node.target in METADATA_ASSERTS and not node.users:
                checked = node.args[0]
                if all(u.target in METADATA_ASSERTS for u in checked.users):
                    graph.graph.erase_node(node)
                    changed = True
    return before - len(graph.graph.nodes)


@register
class DeadCodeElimination(Pass):
    """Remove ops whose results are never used, and the parameters only they read."""

    name = "dce"
    kind = "exact"
    preserves = ()

    def run(self, graph, ctx) -> PassResult:
        params = graph.num_parameters()
        removed = eliminate_dead_code(graph)
        graph.drop_unreferenced()
        freed = params - graph.num_parameters()
        notes = [f"{removed} nodes removed"] + ([f"freed {freed} parameters"] if freed else [])
        return PassResult(modified=removed > 0 or freed > 0, notes=notes)
