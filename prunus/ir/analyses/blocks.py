"""Residual blocks: `out = x + f(x)` where f contains a projection; entry x, exit the add, and layer index.

A transformer layer yields two blocks (attention, then MLP); pre-norm and post-norm layouts both match,
since the test is only that one operand of the add is an ancestor of the other.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx

from prunus.ir.graph import common_module_path, layer_index, module_path
from prunus.ir.ops import ATTENTION, MATMUL, SOFTMAX

aten = torch.ops.aten


@dataclass
class Block:
    layer: int
    kind: str  # "attention", "mlp" or "other"
    entry: torch.fx.Node  # the residual stream entering the block
    exit: torch.fx.Node  # the residual add
    branch: torch.fx.Node  # the block's output before the add
    body: set = field(default_factory=set, repr=False)  # nodes of f(x)

    @property
    def module(self) -> str:
        return common_module_path(self.body)


def to_networkx(graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.graph.nodes:
        g.add_node(node)
        for a in node.all_input_nodes:
            g.add_edge(a, node)
    return g


def blocks(graph) -> list[Block]:
    g = to_networkx(graph)
    found = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target != aten.add.Tensor:
            continue
        ins = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if len(ins) != 2 or ins[0] is ins[1]:
            continue
        a, b = ins
        anc_b = nx.ancestors(g, b)
        if a in anc_b:
            entry, branch, anc = a, b, anc_b
        else:
            anc_a = nx.ancestors(g, a)
            if b not in anc_a:
                continue
            entry, branch, anc = b, a, anc_a
        body = (nx.descendants(g, entry) & anc) | {branch}
        ops = {n.target for n in body if n.op == "call_function"}
        if not ops & MATMUL:
            continue
        if ops & (ATTENTION | SOFTMAX):
            kind = "attention"
        else:
            kind = "mlp"
        found.append(Block(-1, kind, entry, node, branch, body))
    order = {n: i for i, n in enumerate(graph.graph.nodes)}
    found.sort(key=lambda blk: order[blk.exit])
    for i, blk in enumerate(found):
        idx = Counter(layer_index(module_path(n)) for n in blk.body if layer_index(module_path(n)) is not None)
        blk.layer = idx.most_common()[0][0] if idx else i
    return found
