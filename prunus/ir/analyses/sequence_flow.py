"""Sequence flow: which tensors carry the token dimension, in which dims, and what role they play.

The token count is read off the residual stream entering the first block (`[batch, tokens, hidden]`): a
symbolic size (`s`) for text models, an integer for vision models whose patch count is fixed. A tensor
carries the token dimension in every dim whose size is that count, so hidden states ([b, s, h]), position
ids ([1, s]), RoPE tables ([1, s, d]), masks ([b, 1, s, s]: query and key dims), keys/values ([b, hk, s, d])
and attention scores are all found the same way, and the same test with another count (the number kept
after a token-dropping point) finds what carries the token dimension downstream of it.

Roles: `hidden` (computed from the residual stream), `kv` (a key or value an attention reads), `mask`
(two token dims), `positions` (integer, not from the residual stream), `table` (float, not from the
residual stream: RoPE cos/sin, position embeddings), `size` (a symbolic int equal to the token count).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from prunus.ir.ops import ATTENTION

aten = torch.ops.aten


def size_expr(size):
    """A size as something comparable: the sympy expression of a SymInt, or the int itself."""
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def token_dims(node: torch.fx.Node, count) -> tuple[int, ...]:
    """Dims of `node`'s tensor whose size is the token count `count` (a SymInt, sympy expression or int)."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return ()
    want = size_expr(count) if isinstance(count, (torch.SymInt, int)) else count
    return tuple(d for d, size in enumerate(val.shape) if size_expr(size) == want)


def involves(node: torch.fx.Node, count) -> bool:
    """Whether any dim of the node's tensor (or the node's symbolic int) depends on a symbolic `count`."""
    want = size_expr(count) if isinstance(count, (torch.SymInt, int)) else count
    if isinstance(want, int):
        return False
    val = node.meta.get("val")
    sizes = val.shape if isinstance(val, torch.Tensor) else [val] if isinstance(val, torch.SymInt) else []
    return any(isinstance(s, torch.SymInt) and want.free_symbols & s.node.expr.free_symbols for s in sizes)


@dataclass
class SequenceFlow:
    count: object  # the token count: a sympy expression (symbolic) or an int (fixed)
    batch: object  # the batch size, same convention
    stream: torch.fx.Node | None  # the residual stream entering the first block
    dims: dict = field(default_factory=dict)  # node -> token dims
    roles: dict = field(default_factory=dict)  # node -> role (see the module docstring)

    @property
    def symbolic(self) -> bool:
        return not isinstance(self.count, int)

    def of_role(self, role: str) -> list[torch.fx.Node]:
        return [n for n, r in self.roles.items() if r == role]


def sequence_flow(graph) -> SequenceFlow:
    blocks = graph.analysis("blocks")
    if not blocks:
        return SequenceFlow(count=None, batch=None, stream=None)
    stream = blocks[0].entry
    shape = stream.meta["val"].shape
    count, batch = size_expr(shape[1]), size_expr(shape[0])
    flow = SequenceFlow(count=count, batch=batch, stream=stream)
    downstream = _descendants(stream)
    kv = set()
    for n in graph.graph.nodes:
        if n.op == "call_function" and n.target in ATTENTION:
            kv.update(a for a in n.args[1:3] if isinstance(a, torch.fx.Node))
    for n in graph.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.SymInt):
            if flow.symbolic and val.node.expr == count:
                flow.roles[n] = "size"
            continue
        dims = token_dims(n, count)
        if not dims:
            continue
        flow.dims[n] = dims
        if n in kv:
            role = "kv"
        elif len(dims) >= 2:
            role = "mask"
        elif n in downstream:
            role = "hidden"
        elif val.is_floating_point():
            role = "table"
        else:
            role = "positions"
        flow.roles[n] = role
    return flow


def _descendants(node: torch.fx.Node) -> set:
    seen, stack = {node}, [node]
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen
